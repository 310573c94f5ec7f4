"""IP-Adapter on the staged text-to-image U-Nets, through diffusers' own loader: an IP-Adapter made for the source
`UNet2DConditionModel` numbers its ``to_k_ip``/``to_v_ip`` weights by the source's cross-attention layers (in its
``attn_processors`` order: down blocks, up blocks, middle block); the staged model's down and middle layers are the
source's, and each up-path layer is the same layer of every decoder. The layers are listed in the source's order,
checked against the state dicts, and diffusers' conversion builds the processors on that view. Block-wise (dict)
scales reach every decoder's (every expert's) layer through its name, which also starts with the source's."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
from torch import nn

# the parts of an IP-Adapter state dict (diffusers' `load_ip_adapter` splits a file's keys into them)
IP_ADAPTER_PARTS = ("image_proj", "ip_adapter")


def check_ip_adapter_state_dicts(state_dicts: object) -> list[dict]:
    """``state_dicts`` (one IP-Adapter state dict or a list of them) as a list; a `ValueError` naming the argument
    unless each is a dict of ``image_proj`` and ``ip_adapter`` tensor dicts."""
    listed = state_dicts if isinstance(state_dicts, list) else [state_dicts]
    for state_dict in listed:
        if not isinstance(state_dict, dict) or any(not isinstance(state_dict.get(p), dict) for p in IP_ADAPTER_PARTS):
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                "`state_dicts` must be IP-Adapter state dicts, each a dict of `image_proj` and `ip_adapter` tensor "
                f"dicts (what diffusers' `load_ip_adapter` reads from a file), got {got!r}."
            )
    return listed


def check_image_embeds(added_cond_kwargs: dict | None, batch: int) -> None:
    """With an IP-Adapter loaded: ``added_cond_kwargs["image_embeds"]`` must be given, one tensor (or a list of one
    per IP-Adapter) with one row per sample, so that each stage gets its own samples' image embeddings (a
    `ValueError` naming the argument otherwise)."""
    embeds = (added_cond_kwargs or {}).get("image_embeds")
    if embeds is None:
        raise ValueError(
            "`added_cond_kwargs` must hold `image_embeds` (the image embeddings, `ip_adapter_image_embeds` in a "
            f"pipeline): an IP-Adapter is loaded; got `added_cond_kwargs`={added_cond_kwargs!r}."
        )
    if isinstance(embeds, tuple):  # diffusers takes a list (or one tensor): a tuple fails inside it, unnamed
        raise ValueError(
            '`added_cond_kwargs["image_embeds"]` must be a list of tensors, one per IP-Adapter (or one tensor), got '
            f"tuple of {len(embeds)}: `list(image_embeds)`."
        )
    listed = embeds if isinstance(embeds, list) else [embeds]
    shapes = [tuple(e.shape) if torch.is_tensor(e) else type(e).__name__ for e in listed]
    if any(not torch.is_tensor(e) or e.ndim < 2 or e.shape[0] != batch for e in listed):
        raise ValueError(
            f'`added_cond_kwargs["image_embeds"]` must be a list of tensors, one per IP-Adapter, each with one row per '
            f"sample ({batch}), got {shapes}."
        )


def ip_adapter_layers(model: nn.Module) -> dict[str, list[str]]:
    r"""
    The attention processors of ``model`` in the source U-Net's ``attn_processors`` order, as ``{source name: the
    model's names}``: a `UNet2DConditionModel` maps each name to itself; a model with ``decoders`` (a
    `MultiStageUNet2DConditionModel`) maps its down and middle layers to themselves and each up-path layer of decoder
    0 to that layer of every decoder (``decoders.{s}.up_blocks...``). A decoder whose attention layers differ from
    decoder 0's is a `ValueError` naming it.

    Example:

    ```py
    >>> from diffusers import UNet2DConditionModel
    >>> from diffusers_stages import MultiStageUNet2DConditionModel
    >>> from diffusers_stages.models.ip_adapter import ip_adapter_layers
    >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
    ...     norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
    ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    >>> staged = MultiStageUNet2DConditionModel.from_unet(unet, stage_boundaries=(500,))
    >>> ip_adapter_layers(staged)["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
    ... # doctest: +NORMALIZE_WHITESPACE
    ['decoders.0.up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor',
     'decoders.1.up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor']

    ```
    """
    names = [name for name in model.attn_processors if not name.startswith("encoder_hid_proj.")]
    decoders = getattr(model, "decoders", None)
    if decoders is None:
        return {name: [name] for name in names}
    per_decoder = [
        [n[len(f"decoders.{s}.") :] for n in names if n.startswith(f"decoders.{s}.")] for s in range(len(decoders))
    ]
    for s, decoder_names in enumerate(per_decoder):
        if decoder_names != per_decoder[0]:
            raise ValueError(
                f"Decoder {s} has other attention layers than decoder 0 ({len(decoder_names)} against "
                f"{len(per_decoder[0])}; `decoder_up_block_types`): an IP-Adapter of the source U-Net has one up path "
                "for every decoder."
            )
    encoder = [name for name in names if not name.startswith("decoders.")]
    layers = {name: [name] for name in encoder if not name.startswith("mid_block.")}
    layers.update({name: [f"decoders.{s}.{name}" for s in range(len(decoders))] for name in per_decoder[0]})
    layers.update({name: [name] for name in encoder if name.startswith("mid_block.")})
    return layers


def source_layer_name(name: str) -> str:
    """The source U-Net's name of a layer of a staged model: ``name`` without its leading ``experts.{e}.`` and
    ``decoders.{s}.`` (``experts.1.decoders.0.up_blocks.0...`` is the source's ``up_blocks.0...``)."""
    return re.sub(r"^(experts\.\d+\.)?(decoders\.\d+\.)?", "", name)


class SourceLayerName(str):
    """An attention processor's name in a staged model whose `startswith` also answers for the source U-Net's name
    of the layer (see [`source_layer_name`]): diffusers' `set_ip_adapter_scale` gives a block-wise (dict) scale to
    the processors whose name starts with ``down_blocks.{i}.attentions.{j}`` (``up_blocks``, ``mid_block``), so
    each decoder's (each expert's) layer takes the scale of the source's layer. Equal to (and hashed as) the name."""

    __slots__ = ()

    def startswith(self, prefix: str | tuple[str, ...], *bounds: int) -> bool:
        return str.startswith(self, prefix, *bounds) or str.startswith(source_layer_name(self), prefix, *bounds)


def with_source_layer_names(processors: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``processors`` (a model's ``attn_processors``) with each name that is not the source's a
    [`SourceLayerName`]."""
    return {SourceLayerName(n) if source_layer_name(n) != n else n: p for n, p in processors.items()}


def blocks_with_attentions(parts: Sequence[nn.Module], blocks: str) -> tuple[SimpleNamespace, ...]:
    """The ``blocks`` (``"down_blocks"``, ``"up_blocks"``) of the U-Nets or decoders ``parts`` as diffusers'
    `_maybe_expand_lora_scales` reads a U-Net's (for block-wise LoRA and IP-Adapter scales): block ``i`` has
    ``attentions`` where a part's block ``i`` has them, so that each part takes a scale as a U-Net of its own
    layout would (a block without attention layers takes none)."""
    listed = [getattr(part, blocks, ()) for part in parts]
    return tuple(
        SimpleNamespace(attentions=None)
        if any(i < len(b) and hasattr(b[i], "attentions") for b in listed)
        else SimpleNamespace()
        for i in range(max(map(len, listed), default=0))
    )


def check_ip_adapter_fits(model: nn.Module, state_dicts: list[dict], where: Callable[[str], str]) -> None:
    """A `ValueError` unless every IP-Adapter in ``state_dicts`` has one ``to_k_ip``/``to_v_ip`` pair per
    cross-attention layer of ``model`` (``{i}.`` with ``i`` = 1, 3, 5, ... in the source's order, see
    [`ip_adapter_layers`]), each of the shape of the layer's ``to_k``/``to_v`` weight; ``where(name)`` names the part
    of the model (``"decoder 1"``, ``"expert 0"``) in the message. Nothing is changed."""
    cross = [
        (source, targets) for source, targets in ip_adapter_layers(model).items() if source.endswith("attn2.processor")
    ]
    expected = {2 * i + 1 for i in range(len(cross))}
    for index, state_dict in enumerate(state_dicts):
        prefixes = [key.split(".")[0] for key in state_dict["ip_adapter"] if key.endswith(".to_k_ip.weight")]
        ids = {int(prefix) if prefix.isdigit() else prefix for prefix in prefixes}  # a name from a file: any string
        if ids != expected:
            raise ValueError(
                f"The IP-Adapter {index}'s `ip_adapter` weights are for {len(ids)} cross-attention layers, but "
                f"{where('')} has {len(cross)} cross-attention layers (keys 1, 3, ..., {2 * len(cross) - 1}): it was "
                "made for another U-Net layout. Nothing was loaded."
            )
        for key_id, (source, targets) in zip(sorted(expected), cross):
            for target in targets:
                attention = model.get_submodule(target[: -len(".processor")])
                for projection in ("k", "v"):
                    key = f"{key_id}.to_{projection}_ip.weight"
                    value = state_dict["ip_adapter"].get(key)
                    weight = getattr(attention, f"to_{projection}").weight
                    shape = tuple(value.shape) if torch.is_tensor(value) else None
                    if shape != tuple(weight.shape):
                        raise ValueError(
                            f"The IP-Adapter does not fit {where(target)}: `ip_adapter` {key!r} (the source's layer "
                            f"{source!r}) has shape {shape}, but the layer {target[: -len('.processor')]!r} takes "
                            f"shape {tuple(weight.shape)} (that of its `to_{projection}` weight). Nothing was loaded."
                        )
