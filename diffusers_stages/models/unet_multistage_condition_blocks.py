"""Building blocks of [`MultiStageUNet2DConditionModel`]: the `UNet2DConditionModel` options it supports, the
check of its configuration, its down path and one stage's decoder (both built exactly as `UNet2DConditionModel`
builds its own), and the attention masks as additive biases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.models.activations import get_activation
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_up_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from ..partition import TimestepPartition
from .checks import (
    check_freq_shift,
    check_norm_eps_and_dropout,
    check_options,
    check_positive_integers,
    check_sample_size,
    is_positive_integer,
)
from .decoders import SkipAdapters, resolve_decoder_up_block_types, resolve_decoder_widths, take_encoder_widths

# the options Stable Diffusion 1.x/2.x and SDXL configs use; anything else is refused by name
SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
SUPPORTED_ADDITION_EMBEDS = (None, "text_time")
# up blocks whose resnets alone see the skips: decoders without skip adapters take the encoder's widths there
UP_BLOCKS_WITHOUT_ADAPTERS = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value: Any, count: int) -> list:
    """One value per block: ``value`` repeated when it is a single value (as `UNet2DConditionModel` expands it)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def _check_supported(**options: Any) -> None:
    """Refuse the `UNet2DConditionModel` options this model does not implement (those of ``options``), naming each."""
    allowed = {
        "down_block_types": lambda v: all(t in SUPPORTED_DOWN_BLOCKS for t in v),
        "up_block_types": lambda v: all(t in SUPPORTED_UP_BLOCKS for t in v),
        "decoder_up_block_types": lambda v: all(t in SUPPORTED_UP_BLOCKS for types in v for t in types),
        "mid_block_type": lambda v: v in SUPPORTED_MID_BLOCKS,
        "addition_embed_type": lambda v: v in SUPPORTED_ADDITION_EMBEDS,
        "encoder_hid_dim": lambda v: v is None,
        "encoder_hid_dim_type": lambda v: v is None,
        "num_attention_heads": lambda v: v is None,
        "dual_cross_attention": lambda v: v is False,
        "attention_type": lambda v: v == "default",
    }
    for name, value in options.items():
        if not allowed[name](value):
            raise ValueError(
                f"`{name}`={options[name]!r} is not supported by MultiStageUNet2DConditionModel (supported: the "
                f"options of Stable Diffusion 1.x/2.x and SDXL: down blocks {SUPPORTED_DOWN_BLOCKS}, up blocks "
                f"{SUPPORTED_UP_BLOCKS}, mid blocks {SUPPORTED_MID_BLOCKS}, `addition_embed_type` in "
                f"{SUPPORTED_ADDITION_EMBEDS}, no `encoder_hid_dim`, `num_attention_heads`, dual cross-attention or "
                "GLIGEN)."
            )


def check_heads(
    decoder_block_out_channels: Sequence[Sequence[int]],
    decoder_up_block_types: Sequence[Sequence[str]],
    decoder_heads: Sequence[Sequence[int]],
) -> None:
    """Every cross-attention up block's width must split into its number of heads (each decoder its own)."""
    for widths, up_block_types, heads in zip(decoder_block_out_channels, decoder_up_block_types, decoder_heads):
        for width, block, count in zip(reversed(widths), up_block_types, reversed(heads)):
            if "CrossAttn" in block and width % count:
                raise ValueError(
                    f"`decoder_block_out_channels`={tuple(widths)}: the {block} of width {width} must split into "
                    f"{count} attention heads (`attention_head_dim`, or the decoder's `decoder_attention_head_dim`), "
                    f"so its width must be a multiple of {count}."
                )


# the constructor arguments of `MultiStageUNet2DConditionModel` that `check_config` takes
CHECKED_ARGUMENTS = ("stage_boundaries", "num_train_timesteps", "boundary_units", "decoder_block_out_channels",
                     "norm_num_groups", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                     "only_cross_attention", "cross_attention_dim", "transformer_layers_per_block",
                     "reverse_transformer_layers_per_block", "attention_head_dim", "mid_block_type",
                     "addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type", "num_attention_heads",
                     "dual_cross_attention", "attention_type", "decoder_up_block_types", "decoder_skip_adapters",
                     "decoder_attention_head_dim", "in_channels", "out_channels", "conv_in_kernel",
                     "conv_out_kernel", "sample_size", "norm_eps", "dropout", "time_embedding_dim",
                     "time_cond_proj_dim", "num_class_embeds", "addition_time_embed_dim",
                     "projection_class_embeddings_input_dim", "mid_block_only_cross_attention",
                     "class_embed_type", "time_embedding_type")  # fmt: skip
# the class embeddings `UNet2DConditionModel` builds (any other `class_embed_type` it builds as none, silently)
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
# its numeric options and flags, each checked by the rule every model of the package shares (`check_options`)
CHECKED_OPTIONS = ("center_input_sample", "flip_sin_to_cos", "freq_shift", "downsample_padding", "mid_block_scale_factor",
                   "resnet_out_scale_factor", "upcast_attention", "use_linear_projection", "resnet_skip_time_act",
                   "class_embeddings_concat", "act_fn", "time_embedding_act_fn", "timestep_post_act",
                   "resnet_time_scale_shift")  # fmt: skip


def check_config(
    model: nn.Module,
    *,
    stage_boundaries: Sequence[float],
    num_train_timesteps: int,
    boundary_units: str,
    decoder_block_out_channels: Sequence[Sequence[int]] | None,
    norm_num_groups: int | None,
    down_block_types: Sequence[str],
    up_block_types: Sequence[str],
    block_out_channels: Sequence[int],
    layers_per_block: int | Sequence[int],
    only_cross_attention: bool | Sequence[bool],
    cross_attention_dim: int | Sequence[int],
    transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]],
    reverse_transformer_layers_per_block: Sequence[Sequence[int]] | None,
    attention_head_dim: int | Sequence[int],
    decoder_up_block_types: Sequence[Sequence[str]] | None,
    decoder_skip_adapters: bool,
    decoder_attention_head_dim: Sequence[int | Sequence[int]] | None,
    in_channels: int,
    out_channels: int,
    conv_in_kernel: int,
    conv_out_kernel: int,
    sample_size: int | Sequence[int] | None,
    norm_eps: float,
    dropout: float,
    time_embedding_dim: int | None = None,
    time_cond_proj_dim: int | None = None,
    num_class_embeds: int | None = None,
    addition_time_embed_dim: int | None = None,
    projection_class_embeddings_input_dim: int | None = None,
    mid_block_only_cross_attention: bool | None = None,
    class_embed_type: str | None = None,
    time_embedding_type: str = "positional",
    options: Mapping[str, Any] | None = None,
    **unsupported: Any,
) -> tuple[TimestepPartition, list[dict[str, Any]], dict[str, list]]:
    """Check a configuration of `MultiStageUNet2DConditionModel` (``model``) before anything is built, each problem
    a `ValueError` naming the argument: the options it does not support (``unsupported`` holds the rest of
    `_check_supported`'s), the numeric options and flags (``options``, by name: those of `CHECKED_OPTIONS`, see
    `check_options`), the optional sizes, the per-block values, ``class_embed_type``, diffusers' own checks, the partition, the decoders' widths, up blocks and heads. Returns
    the partition, each decoder's layout (``block_out_channels``, ``up_block_types`` and its per-block values, in
    encoder order) and the encoder's per-block values."""
    _check_supported(down_block_types=down_block_types, up_block_types=up_block_types, **unsupported)
    check_positive_integers(in_channels=in_channels, out_channels=out_channels)
    for name, kernel in (("conv_in_kernel", conv_in_kernel), ("conv_out_kernel", conv_out_kernel)):
        if not is_positive_integer(kernel) or kernel % 2 == 0:  # padding (kernel - 1) // 2 keeps only odd sizes
            raise ValueError(f"`{name}` must be an odd positive integer (the map keeps its size), got {kernel!r}.")
    # sizes that diffusers builds without a word and that fail only in torch at the first forward
    check_sample_size(sample_size)
    check_positive_integers(norm_num_groups=norm_num_groups)  # None: only diffusers' K-blocks, unsupported here
    check_norm_eps_and_dropout(norm_eps, dropout)
    check_options(**(options or {}))
    sizes = {"time_embedding_dim": time_embedding_dim, "time_cond_proj_dim": time_cond_proj_dim,
             "num_class_embeds": num_class_embeds, "addition_time_embed_dim": addition_time_embed_dim,
             "projection_class_embeddings_input_dim": projection_class_embeddings_input_dim}  # fmt: skip
    check_positive_integers(tuple(sizes), **sizes)  # 0: the default width (time), or empty layers, silently
    for name, value in (("layers_per_block", layers_per_block), ("attention_head_dim", attention_head_dim),
                        ("cross_attention_dim", cross_attention_dim)):  # fmt: skip
        if not all(is_positive_integer(v) for v in _per_block(value, len(down_block_types))):
            raise ValueError(f"`{name}` must be a positive integer or one per block, got {value!r}.")
    layers = _per_block(transformer_layers_per_block, len(down_block_types))  # each block's: a count, or one per layer
    if not all(is_positive_integer(n) or (isinstance(n, (list, tuple)) and n and all(map(is_positive_integer, n)))
               for n in layers):  # fmt: skip
        raise ValueError(  # 0: cross-attention blocks with no transformer layer, attending to nothing
            "`transformer_layers_per_block` must be a positive integer or one per block (each a positive integer or "
            f"one per layer), got {transformer_layers_per_block!r}."
        )
    if not all(isinstance(v, bool) for v in _per_block(only_cross_attention, len(down_block_types))):
        raise ValueError(  # a string was one flag per letter ("no": every block only cross-attention)
            f"`only_cross_attention` must be True or False or one per block, got {only_cross_attention!r}."
        )
    if mid_block_only_cross_attention is not None and not isinstance(mid_block_only_cross_attention, bool):
        raise ValueError(
            f"`mid_block_only_cross_attention` must be True, False or None, got {mid_block_only_cross_attention!r}."
        )
    if class_embed_type not in CLASS_EMBED_TYPES:
        raise ValueError(f"`class_embed_type` must be one of {CLASS_EMBED_TYPES}, got {class_embed_type!r}.")
    num_attention_heads = attention_head_dim  # diffusers' historical naming (UNet2DConditionModel, issue 2011)
    UNet2DConditionModel._check_config(
        model,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        only_cross_attention=only_cross_attention,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        transformer_layers_per_block=transformer_layers_per_block,
        reverse_transformer_layers_per_block=reverse_transformer_layers_per_block,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
    )
    partition = TimestepPartition.from_config(
        stage_boundaries=stage_boundaries, num_train_timesteps=num_train_timesteps, boundary_units=boundary_units
    )
    decoder_block_out_channels = resolve_decoder_widths(
        decoder_block_out_channels, block_out_channels, partition, norm_num_groups
    )
    count = len(down_block_types)
    per_block = {
        "num_attention_heads": _per_block(num_attention_heads, count),
        "attention_head_dim": _per_block(attention_head_dim, count),
        "cross_attention_dim": _per_block(cross_attention_dim, count),
        "layers_per_block": _per_block(layers_per_block, count),
        "transformer_layers_per_block": _per_block(transformer_layers_per_block, count),
        "reverse_transformer_layers_per_block": reverse_transformer_layers_per_block,
        "only_cross_attention": _per_block(only_cross_attention, count),
    }
    decoder_up_block_types = resolve_decoder_up_block_types(
        decoder_up_block_types, up_block_types, partition.num_stages, decoder_skip_adapters,
        UP_BLOCKS_WITHOUT_ADAPTERS,
    )  # fmt: skip
    _check_supported(decoder_up_block_types=decoder_up_block_types)
    freq_shift = (options or {}).get("freq_shift", 0)  # the time's and the added time ids' sinusoidal projections
    if time_embedding_type == "positional":
        check_freq_shift(freq_shift, block_out_channels[0], "block_out_channels[0]")
    if unsupported.get("addition_embed_type") == "text_time" and addition_time_embed_dim is not None:
        check_freq_shift(freq_shift, addition_time_embed_dim, "addition_time_embed_dim")
    decoder_heads = _decoder_heads(decoder_attention_head_dim, per_block["num_attention_heads"], partition.num_stages)
    check_heads(decoder_block_out_channels, decoder_up_block_types, decoder_heads)
    decoders = [
        # diffusers' historical naming again: the heads are both `num_attention_heads` and `attention_head_dim`
        {"block_out_channels": widths, "up_block_types": types,
         "per_block": {**per_block, "num_attention_heads": list(heads), "attention_head_dim": list(heads)}}
        for widths, types, heads in zip(decoder_block_out_channels, decoder_up_block_types, decoder_heads)
    ]  # fmt: skip
    return partition, decoders, per_block


def _decoder_heads(
    decoder_attention_head_dim: Sequence[int | Sequence[int]] | None, heads: Sequence[int], num_stages: int
) -> list[list[int]]:
    """Each decoder's attention heads per block (encoder order): the encoder's (``heads``) when
    ``decoder_attention_head_dim`` is ``None``, else one entry per decoder (a head count, or one per block)."""
    if decoder_attention_head_dim is None:
        return [list(heads)] * num_stages
    entries = list(decoder_attention_head_dim) if isinstance(decoder_attention_head_dim, (list, tuple)) else []
    decoder_heads = [_per_block(entry, len(heads)) for entry in entries]
    if len(entries) != num_stages or any(
        len(h) != len(heads) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in h)
        for h in decoder_heads
    ):
        raise ValueError(
            f"`decoder_attention_head_dim` must give {num_stages} decoders (one per stage) a positive head count, or "
            f"one per block ({len(heads)}), got {decoder_attention_head_dim!r}."
        )
    return decoder_heads


def cross_attn_down_blocks(
    down_block_types: Sequence[str],
    block_out_channels: Sequence[int],
    per_block: dict[str, list],
    temb_channels: int,
    norm_eps: float,
    act_fn: str,
    norm_num_groups: int | None,
    downsample_padding: int,
    block_kwargs: dict[str, Any],
) -> nn.ModuleList:
    """The down path of a `UNet2DConditionModel`, built exactly as it builds its own."""
    down_blocks = nn.ModuleList([])
    output_channel = block_out_channels[0]
    for i, down_block_type in enumerate(down_block_types):
        input_channel, output_channel = output_channel, block_out_channels[i]
        head_dim = per_block["attention_head_dim"][i]
        down_blocks.append(
            get_down_block(
                down_block_type,
                num_layers=per_block["layers_per_block"][i],
                transformer_layers_per_block=per_block["transformer_layers_per_block"][i],
                in_channels=input_channel,
                out_channels=output_channel,
                temb_channels=temb_channels,
                add_downsample=i < len(down_block_types) - 1,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                cross_attention_dim=per_block["cross_attention_dim"][i],
                num_attention_heads=per_block["num_attention_heads"][i],
                downsample_padding=downsample_padding,
                only_cross_attention=per_block["only_cross_attention"][i],
                attention_head_dim=head_dim if head_dim is not None else output_channel,
                **block_kwargs,
            )
        )
    return down_blocks


class CrossAttnStageDecoder(SkipAdapters):
    """One stage's decoder: skip adapters, the up path of a `UNet2DConditionModel` (built exactly as it builds its
    own, at this decoder's widths) and the output head."""

    def __init__(
        self,
        encoder_block_out_channels: Sequence[int],
        block_out_channels: Sequence[int],
        up_block_types: Sequence[str],
        per_block: dict[str, list],
        out_channels: int,
        temb_channels: int,
        norm_num_groups: int | None,
        norm_eps: float,
        act_fn: str,
        conv_out_kernel: int,
        block_kwargs: dict[str, Any],
        skip_adapters: bool = True,
    ):
        # adapters: encoder widths -> this decoder's widths (identities for a copy of the source's up path); without
        # adapters every layer is an identity and the resnets take the encoder's widths (after the up path)
        layers_per_block = per_block["layers_per_block"]
        super().__init__(
            encoder_block_out_channels,
            block_out_channels if skip_adapters else encoder_block_out_channels,
            layers_per_block,
        )

        # up path; ``per_block`` holds encoder-order lists, reversed here exactly as UNet2DConditionModel does
        reversed_channels = list(reversed(block_out_channels))
        heads = list(reversed(per_block["num_attention_heads"]))
        layers = list(reversed(per_block["layers_per_block"]))
        cross_dims = list(reversed(per_block["cross_attention_dim"]))
        only_cross = list(reversed(per_block["only_cross_attention"]))
        transformer_layers = per_block["reverse_transformer_layers_per_block"]
        if transformer_layers is None:
            transformer_layers = list(reversed(per_block["transformer_layers_per_block"]))
        head_dims = per_block["attention_head_dim"]  # not reversed, as in UNet2DConditionModel
        self.up_blocks = nn.ModuleList([])
        output_channel = reversed_channels[0]
        for i, up_block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.up_blocks.append(
                get_up_block(
                    up_block_type,
                    num_layers=layers[i] + 1,
                    transformer_layers_per_block=transformer_layers[i],
                    in_channels=reversed_channels[min(i + 1, len(block_out_channels) - 1)],
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=temb_channels,
                    add_upsample=i < len(block_out_channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resolution_idx=i,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_dims[i],
                    num_attention_heads=heads[i],
                    only_cross_attention=only_cross[i],
                    attention_head_dim=head_dims[i] if head_dims[i] is not None else output_channel,
                    **block_kwargs,
                )
            )
        if not skip_adapters:  # the authors' decoder: its resnets take the encoder's skips at the encoder's widths
            take_encoder_widths(self.up_blocks, encoder_block_out_channels, layers_per_block, act_fn)

        # output head (no normalisation when norm_num_groups is None, as UNet2DConditionModel)
        self.conv_norm_out = None
        self.conv_act = None
        if norm_num_groups is not None:
            self.conv_norm_out = nn.GroupNorm(
                num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps
            )
            self.conv_act = get_activation(act_fn)
        padding = (conv_out_kernel - 1) // 2
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=conv_out_kernel, padding=padding)

    def forward(
        self,
        hidden: torch.Tensor,
        skips: Sequence[torch.Tensor],
        emb: torch.Tensor,
        conditioning: dict[str, Any],
        forward_upsample_size: bool,
    ) -> torch.Tensor:
        """Decode; ``conditioning`` holds ``encoder_hidden_states``, ``attention_mask``, ``encoder_attention_mask``
        and ``cross_attention_kwargs`` for the cross-attention up blocks."""
        sample, skips = self.adapt(hidden, skips)
        upsample_size = None
        for i, up_block in enumerate(self.up_blocks):
            res_samples, skips = tuple(skips[-len(up_block.resnets) :]), skips[: -len(up_block.resnets)]
            # sizes that are not a multiple of the total upsampling factor: upsample to the skip's size
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            extra = conditioning if getattr(up_block, "has_cross_attention", False) else {}
            sample = up_block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res_samples,
                upsample_size=upsample_size,
                **extra,
            )
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        return self.conv_out(sample)


def check_encoder_attention_mask(mask: torch.Tensor | None, batch: int, tokens: int) -> None:
    """Check a keep(1)/discard(0) mask of the text tokens: ``(batch, tokens)``, or ``(batch, 1, tokens)`` (both of
    which `UNet2DConditionModel` takes), of the ``encoder_hidden_states``' batch and token count."""
    if mask is None:
        return
    shape = tuple(mask.shape) if torch.is_tensor(mask) else None
    if shape not in ((batch, tokens), (batch, 1, tokens)):
        got = f"shape {shape}" if shape is not None else type(mask).__name__
        raise ValueError(
            f"`encoder_attention_mask` must be a tensor of shape ({batch}, {tokens}) (or ({batch}, 1, {tokens})): one "
            f"keep (1) / discard (0) flag per token of `encoder_hidden_states`, per sample; got {got}."
        )


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A keep(1)/discard(0) mask of shape ``(batch, tokens)`` as an additive bias ``(batch, 1, tokens)``."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
