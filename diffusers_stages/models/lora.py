"""LoRA on the staged text-to-image U-Nets, through diffusers' own `PeftAdapterMixin`: a LoRA made for the source
`UNet2DConditionModel` is renamed onto the staged model (down/mid keys kept for the shared encoder, up-path keys
copied to every decoder), checked against the layers it lands on, and handed to diffusers' loader."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .ip_adapter import source_layer_name
from .warm_start import DECODER_PREFIXES

# how `_fetch_state_dict` locates a LoRA file (the rest of `load_lora_adapter`'s keywords go on to diffusers)
FETCH_KWARGS = ("weight_name", "local_files_only", "cache_dir", "force_download", "proxies", "token", "revision")
# the LoRA config entries that name modules (`LoraConfig` matches `target_modules` entries as suffixes of module
# names and `rank_pattern`/`alpha_pattern` keys as regular expressions, `^`-anchored ones from the module's start)
NAMING_ENTRIES = ("target_modules", "rank_pattern", "alpha_pattern")


def require_peft() -> None:
    """An `ImportError` that says what to install when diffusers' PEFT backend (``peft``) is missing."""
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise ImportError("LoRA needs the PEFT backend, as in diffusers: `pip install peft` (and `transformers`).")


def fetch_lora(
    pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor], kwargs: dict
) -> dict[str, torch.Tensor]:
    """The LoRA state dict given, or read from a folder or Hub repository with diffusers' `_fetch_state_dict`
    (safetensors only: no pickle is read); pops the file-locating keywords from ``kwargs`` and leaves the file's
    adapter metadata, if any, in ``kwargs["metadata"]``."""
    if isinstance(pretrained_model_name_or_path_or_dict, dict):
        return dict(pretrained_model_name_or_path_or_dict)
    if not isinstance(pretrained_model_name_or_path_or_dict, (str, os.PathLike)):
        raise ValueError(
            "`pretrained_model_name_or_path_or_dict` must be a LoRA state dict, a folder or a Hub repository id, got "
            f"{type(pretrained_model_name_or_path_or_dict).__name__}."
        )
    from diffusers.loaders.lora_base import _fetch_state_dict

    if kwargs.pop("use_safetensors", True) is False:
        raise ValueError("`use_safetensors` must be True (or not given): LoRA weights are read from safetensors only.")
    fetch = {key: kwargs.pop(key, None) for key in FETCH_KWARGS}
    weight_name = fetch["weight_name"]
    if weight_name is not None and not str(weight_name).endswith(".safetensors"):
        raise ValueError(f"`weight_name` must name a .safetensors file, got {weight_name!r}.")
    state_dict, metadata = _fetch_state_dict(
        pretrained_model_name_or_path_or_dict,
        use_safetensors=True,
        subfolder=kwargs.pop("subfolder", None),
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
        allow_pickle=False,
        metadata=kwargs.pop("metadata", None),
        **fetch,
    )
    kwargs["metadata"] = metadata
    return state_dict


def _split(key: str, prefix: str | None) -> tuple[str, str] | None:
    """``(head, name)`` of a key under ``prefix`` (``head`` the prefix and its dot, or ``"^"`` for an anchored
    pattern); ``None`` for a key of another component (``text_encoder.``)."""
    head = f"{prefix}." if prefix else ""
    if not key.startswith(head):
        return None
    name = key[len(head) :]
    if name.startswith("^"):
        return head + "^", name[1:]
    return head, name


def lora_to_stages(
    state_dict: dict[str, torch.Tensor],
    num_stages: int,
    prefix: str | None = None,
    network_alphas: dict[str, float] | None = None,
    metadata: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    r"""
    A LoRA of a `UNet2DConditionModel` renamed for a `MultiStageUNet2DConditionModel` of ``num_stages`` stages
    built from it: the keys of its up path (``up_blocks.``, ``conv_norm_out.``, ``conv_out.``) go to every decoder
    (``decoders.{s}.``, each its own copy of the tensor), the others (down blocks, middle block, embeddings) stay
    the shared encoder's. Keys outside ``prefix`` (``"unet"`` in a pipeline's LoRA: the text encoder's) are kept as
    they are, and so is a LoRA already in the staged model's names. ``network_alphas`` and the module names in the
    adapter ``metadata`` (``target_modules``, ``rank_pattern``, ``alpha_pattern``) are renamed alike. A LoRA with
    both naming schemes is a `ValueError`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models.lora import lora_to_stages
    >>> lora = {"unet.up_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 8),
    ...         "unet.mid_block.attn.to_q.lora_A.weight": torch.ones(4, 8)}
    >>> sorted(lora_to_stages(lora, num_stages=2, prefix="unet")[0])  # doctest: +NORMALIZE_WHITESPACE
    ['unet.decoders.0.up_blocks.0.attn.to_q.lora_A.weight', 'unet.decoders.1.up_blocks.0.attn.to_q.lora_A.weight',
     'unet.mid_block.attn.to_q.lora_A.weight']

    ```
    """
    names = [parts[1] for parts in map(lambda key: _split(key, prefix), state_dict) if parts is not None]
    source = [name for name in names if name.startswith(DECODER_PREFIXES)]
    staged = [name for name in names if name.startswith("decoders.")]
    if source and staged:
        raise ValueError(
            f"The LoRA `state_dict` holds both a source U-Net's up-path keys (e.g. {source[0]!r}) and a staged "
            f"model's decoder keys (e.g. {staged[0]!r}): it must be in one naming or the other."
        )
    if not source:
        return state_dict, network_alphas, metadata

    def rename_name(name: str) -> list[str]:  # a bare module name, or an anchored pattern
        anchor = "^" if name.startswith("^") else ""
        if not name[len(anchor) :].startswith(DECODER_PREFIXES):
            return [name]
        return [f"{anchor}decoders.{s}.{name[len(anchor) :]}" for s in range(num_stages)]

    def rename(key: str) -> list[str]:
        parts = _split(key, prefix)
        return [key] if parts is None else [parts[0] + new for new in rename_name(parts[1])]

    state_dict = {new: value.clone() for key, value in state_dict.items() for new in rename(key)}
    if network_alphas:
        network_alphas = {new: value for key, value in network_alphas.items() for new in rename(key)}
    if metadata:
        metadata = dict(metadata)
        for entry in NAMING_ENTRIES:
            key = f"{prefix}.{entry}" if prefix else entry
            value = metadata.get(key)
            if isinstance(value, dict):
                metadata[key] = {new: v for name, v in value.items() for new in rename_name(name)}
            elif isinstance(value, (list, tuple, set)):
                metadata[key] = sorted({new for name in value for new in rename_name(name)})
            elif isinstance(value, str):  # a regular expression: the layers the state dict holds, by name
                names = (_split(k, prefix) for k in state_dict)
                metadata[key] = sorted({parts[1].split(".lora")[0] for parts in names if parts is not None})
    return state_dict, network_alphas, metadata


def check_lora_fits(
    model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str | None, where: Callable[[str], str]
) -> None:
    """A `ValueError` if a LoRA tensor under ``prefix`` names a layer ``model`` does not have, or does not fit its
    layer's weight (``lora_A``: the layer's input width, ``lora_B``: its output width); ``where(module_name)``
    names the part of the model (``"decoder 1"``, ``"expert 0"``) in the message. Nothing is changed."""
    for key, value in state_dict.items():
        parts = _split(key, prefix)
        if parts is None or not torch.is_tensor(value) or not (".lora_A." in parts[1] or ".lora_B." in parts[1]):
            continue
        name, kind = parts[1].split(".lora_")[0], parts[1].split(".lora_")[1][0]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"The LoRA tensor {key!r} names the layer {name!r}, which {where(name)} does not have."
            ) from None
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        if weight is None:
            raise ValueError(f"The LoRA tensor {key!r} names {name!r} of {where(name)}, which has no weight.")
        dim = 1 if kind == "A" else 0
        if value.ndim < dim + 1 or value.shape[dim] != weight.shape[dim]:
            raise ValueError(
                f"The LoRA does not fit {where(name)}: {key!r} has shape {tuple(value.shape)}, but the layer "
                f"{name!r} has a weight of shape {tuple(weight.shape)} (lora_{kind} must match its "
                f"{'input' if dim else 'output'} width). Nothing was loaded."
            )


def with_decoder_scales(scales: dict[str, float], names: Iterable[str]) -> dict[str, float]:
    r"""
    A block-wise LoRA scale expanded for the source U-Net (``{"up_blocks.0.attentions.1": 0.5, "mid_block": 1.0,
    ...}``, as diffusers' `_maybe_expand_lora_scales` gives it) with an entry for each LoRA layer in ``names`` that no
    key names (``decoders.{s}.up_blocks.{i}.resnets.{j}.conv1``): diffusers' `set_adapters` gives such a layer of
    the source (``up_blocks.{i}.resnets.{j}.conv1``) the scale of ``up_blocks.{i}.attentions.{j}`` (1.0 where there
    is none), read from the first parts of its name, which for a decoder's layer are ``decoders.{s}``; the entry
    gives it the source's scale. A name of fewer than four parts (``conv_out``) is left to diffusers, as for the
    source.

    Example:

    ```py
    >>> from diffusers_stages.models.lora import with_decoder_scales
    >>> with_decoder_scales({"up_blocks.0.attentions.1": 0.5}, ["decoders.2.up_blocks.0.resnets.1.conv1"])
    {'up_blocks.0.attentions.1': 0.5, 'decoders.2.up_blocks.0.resnets.1.conv1': 0.5}

    ```
    """
    scales = dict(scales)
    for name in names:
        source = source_layer_name(name)
        parts = source.split(".")
        if source == name or len(parts) < 4 or any(key in name for key in scales):
            continue
        scales[name] = scales.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)
    return scales
