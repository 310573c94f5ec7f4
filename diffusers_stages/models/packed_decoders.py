"""Channel-packed decoding: several `StageDecoder`s of one architecture run as one network whose channels are the
decoders' channels side by side (stage-major), so that a mixed batch is decoded with one call per layer.

Every layer of diffusers' up path has an exact packed form:
- a convolution of ``S`` decoders is one grouped convolution (``groups = S``) over the stacked weights;
- a group norm of ``G`` groups is one group norm of ``S * G`` groups (each decoder's groups are contiguous channels);
- a linear layer (time-embedding projection, attention projections) is one batched matrix product over the stages;
- activations, nearest upsampling, residual sums and rescalings are per element or per channel;
- the concatenation with a skip is done per stage (``(n, S, C, H, W)`` views), and attention runs on ``S * n``
  sequences.

A packed tensor holds ``n`` samples of each of ``S`` stages as ``(n, S * C, H, W)``. This avoids what
`torch.func.vmap` costs around every convolution and norm (moving the stage axis in and out of the batch), and keeps
the per-layer Python cost of one decoder whatever the number of stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import AttnUpBlock2D, UpBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

# activations that act per element, so that they apply to a packed tensor as they are
_ELEMENTWISE = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU, nn.Identity)

__all__ = ["PACKED_UP_BLOCKS", "packable", "packed_decoders"]

# the up blocks that have a packed form (`_block_packable`), by the names a config gives them
PACKED_UP_BLOCKS = (UpBlock2D.__name__, AttnUpBlock2D.__name__)


def _conv_packable(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and conv.groups == 1


def _norm_packable(norm: nn.Module) -> bool:
    return type(norm) is nn.GroupNorm


def _resnet_packable(resnet: nn.Module) -> bool:
    return (
        type(resnet) is ResnetBlock2D
        and (resnet.upsample is None or (_upsampler_packable(resnet.upsample) and not resnet.upsample.use_conv))
        and resnet.downsample is None
        and resnet.time_embedding_norm in ("default", "scale_shift")
        and type(resnet.time_emb_proj) is nn.Linear
        and _norm_packable(resnet.norm1)
        and _norm_packable(resnet.norm2)
        and _conv_packable(resnet.conv1)
        and _conv_packable(resnet.conv2)
        and (resnet.conv_shortcut is None or _conv_packable(resnet.conv_shortcut))
        and type(resnet.nonlinearity) in _ELEMENTWISE
        and type(resnet.dropout) is nn.Dropout
    )


def _attention_packable(attn: nn.Module) -> bool:
    return (
        type(attn) is Attention
        and type(attn.processor) in (AttnProcessor, AttnProcessor2_0)
        and attn.spatial_norm is None
        and attn.group_norm is not None
        and _norm_packable(attn.group_norm)
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.is_cross_attention
        and all(type(getattr(attn, name)) is nn.Linear for name in ("to_q", "to_k", "to_v"))
        and type(attn.to_out[0]) is nn.Linear
        and type(attn.to_out[1]) is nn.Dropout
    )


def _upsampler_packable(upsampler: nn.Module) -> bool:
    return (
        type(upsampler) is Upsample2D
        and upsampler.norm is None
        and upsampler.interpolate
        and not upsampler.use_conv_transpose
        and (not upsampler.use_conv or _conv_packable(getattr(upsampler, upsampler.name)))
    )


def _block_packable(block: nn.Module) -> bool:
    freeu = all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))
    if type(block) is AttnUpBlock2D:
        if not all(_attention_packable(attn) for attn in block.attentions):
            return False
    elif type(block) is not UpBlock2D or freeu:
        return False
    return all(_resnet_packable(resnet) for resnet in block.resnets) and all(
        _resnet_packable(upsampler) if type(upsampler) is ResnetBlock2D else _upsampler_packable(upsampler)
        for upsampler in block.upsamplers or []
    )


def packable(decoder: nn.Module) -> bool:
    """Whether ``decoder`` is a `StageDecoder` made only of layers that have a packed form: diffusers' `UpBlock2D`
    and `AttnUpBlock2D` (what `MultiStageUNet2DModel` builds) with either upsampling, and diffusers' own attention
    processors (`AttnProcessor2_0`, `AttnProcessor`); not with FreeU or another attention processor."""
    from .decoders import StageDecoder

    adapters = [decoder.mid_adapter, *decoder.skip_adapters] if isinstance(decoder, StageDecoder) else []
    return (
        type(decoder) is StageDecoder
        and all(type(adapter) is nn.Identity or _conv_packable(adapter) for adapter in adapters)
        and all(_block_packable(block) for block in decoder.up_blocks)
        and _norm_packable(decoder.conv_norm_out)
        and type(decoder.conv_act) in _ELEMENTWISE
        and _conv_packable(decoder.conv_out)
    )


def _nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2.0, mode="nearest")`` of a 4-d tensor. A contiguous one on CPU is written
    into the output by strided copies instead: for outputs at most 128 pixels high plus wide, ATen's CPU kernel
    converts an NCHW tensor to channels-last and its output back (the small benchmark model's packed
    ``(2, 512, 8, 8)``: 0.09 ms here against 0.7 ms; a channels-last tensor, as a decoder's attention gives the
    per-stage path, costs it 0.03 ms)."""
    if x.device.type != "cpu" or not x.is_contiguous():
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    n, channels, height, width = x.shape
    out = x.new_empty(n, channels, height, 2, width, 2)
    out[:, :, :, 0, :, 0] = x  # the even rows: each pixel twice
    out[:, :, :, 0, :, 1] = x
    out[:, :, :, 1] = out[:, :, :, 0]  # the odd rows: the even ones
    return out.view(n, channels, 2 * height, 2 * width)


def _divided(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x / factor``, without a pass over ``x`` for the factor of 1 that diffusers' blocks default to (exact)."""
    return x if factor == 1 else x / factor


class _Packed:
    """The packed forward of a template decoder over stacked parameters ``params`` (name -> ``(S, ...)``)."""

    def __init__(self, template: nn.Module, params: dict[str, torch.Tensor], stages: int):
        self.template, self.params, self.stages = template, params, stages

    def get(self, name: str) -> torch.Tensor | None:
        return self.params.get(name)

    def conv(self, x: torch.Tensor, conv: nn.Conv2d, name: str) -> torch.Tensor:
        # S convolutions = one grouped convolution over the stacked weights
        weight, bias = self.params[f"{name}.weight"], self.get(f"{name}.bias")
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
            # a 1x1 convolution is a batched matrix product per stage (oneDNN has no fast grouped 1x1 kernel)
            n, _, height, width = x.shape
            out = torch.matmul(weight.flatten(2), x.reshape(n, self.stages, -1, height * width))
            out = out if bias is None else out + bias.unsqueeze(-1)
            return out.view(n, -1, height, width)
        if x.device.type == "cpu" and weight.shape[1] < 8:
            # so few outputs per group (the output head): oneDNN's grouped kernel is about 4x faster in NHWC than in
            # NCHW (measured for the small benchmark model's head, 8 stages: 0.6 ms against 2.6 ms)
            x = x.contiguous(memory_format=torch.channels_last)
        out = F.conv2d(
            x,
            weight.flatten(0, 1),
            bias.flatten() if bias is not None else None,
            conv.stride,
            conv.padding,
            conv.dilation,
            groups=self.stages,
        )
        return out.contiguous()

    def norm(self, x: torch.Tensor, norm: nn.GroupNorm, name: str) -> torch.Tensor:
        # S group norms of G groups = one group norm of S * G groups
        weight, bias = self.get(f"{name}.weight"), self.get(f"{name}.bias")
        return F.group_norm(
            x,
            self.stages * norm.num_groups,
            weight.flatten() if weight is not None else None,
            bias.flatten() if bias is not None else None,
            norm.eps,
        )

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # S linear layers on (S, M, in) = one batched matrix product
        weight, bias = self.params[f"{name}.weight"], self.get(f"{name}.bias")
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def dropout(self, x: torch.Tensor, dropout: nn.Dropout) -> torch.Tensor:
        return F.dropout(x, dropout.p, dropout.training)

    def cat(self, hidden: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # the concatenation with a skip, per stage
        n, _, height, width = hidden.shape
        joined = torch.cat(
            [hidden.view(n, self.stages, -1, height, width), skip.view(n, self.stages, -1, height, width)], 2
        )
        return joined.view(n, -1, height, width)

    def resnet(self, x: torch.Tensor, emb: torch.Tensor, resnet: ResnetBlock2D, name: str) -> torch.Tensor:
        hidden = resnet.nonlinearity(self.norm(x, resnet.norm1, f"{name}.norm1"))
        if resnet.upsample is not None:  # an up-sampling resnet (``upsample_type="resnet"``): nearest, x2
            x, hidden = _nearest_2x(x), _nearest_2x(hidden)
        hidden = self.conv(hidden, resnet.conv1, f"{name}.conv1")
        temb = emb if resnet.skip_time_act else resnet.nonlinearity(emb)
        temb = self.linear(temb, f"{name}.time_emb_proj")  # (S, n, C) -> packed (n, S * C, 1, 1) below
        if resnet.time_embedding_norm == "default":
            hidden = self.norm(
                hidden + temb.transpose(0, 1).flatten(1)[:, :, None, None], resnet.norm2, f"{name}.norm2"
            )
        else:
            scale, shift = (part.transpose(0, 1).flatten(1)[:, :, None, None] for part in temb.chunk(2, dim=-1))
            hidden = self.norm(hidden, resnet.norm2, f"{name}.norm2") * (1 + scale) + shift
        hidden = self.conv(self.dropout(resnet.nonlinearity(hidden), resnet.dropout), resnet.conv2, f"{name}.conv2")
        if resnet.conv_shortcut is not None:
            x = self.conv(x, resnet.conv_shortcut, f"{name}.conv_shortcut")
        return _divided(x + hidden, resnet.output_scale_factor)

    def attention(self, x: torch.Tensor, attn: Attention, name: str) -> torch.Tensor:
        n, channels, height, width = x.shape
        channels //= self.stages
        hidden = self.norm(x, attn.group_norm, f"{name}.group_norm")
        # tokens of each stage: (S, n * H * W, C)
        tokens = (
            hidden.view(n, self.stages, channels, height * width)
            .permute(1, 0, 3, 2)
            .reshape(self.stages, -1, channels)
        )
        query, key, value = (self.linear(tokens, f"{name}.{part}") for part in ("to_q", "to_k", "to_v"))
        head_dim = query.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (S, n * L, heads * d) -> (S * n, heads, L, d)
            return t.reshape(self.stages * n, height * width, attn.heads, head_dim).transpose(1, 2)

        # AttnProcessor2_0 uses the default scale, AttnProcessor the layer's
        scale = attn.scale if type(attn.processor) is AttnProcessor else None
        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), scale=scale)
        out = out.transpose(1, 2).reshape(self.stages, n * height * width, -1)
        out = self.dropout(self.linear(out, f"{name}.to_out.0"), attn.to_out[1])
        out = out.view(self.stages, n, height * width, channels).permute(1, 0, 3, 2).reshape(x.shape)
        if attn.residual_connection:
            out = out + x
        return _divided(out, attn.rescale_output_factor)

    def upsample(self, x: torch.Tensor, upsampler: Upsample2D, name: str) -> torch.Tensor:
        x = _nearest_2x(x)
        if upsampler.use_conv:
            x = self.conv(x, getattr(upsampler, upsampler.name), f"{name}.{upsampler.name}")
        return x

    def __call__(self, hidden: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        decoder, stages = self.template, self.stages
        n = hidden.shape[0] // stages

        def pack(t: torch.Tensor) -> torch.Tensor:  # (n * S, C, H, W), sample-major -> (n, S * C, H, W): a view
            return t.reshape(n, -1, *t.shape[2:])

        # 1. the inputs packed (the skips freed from the caller's list), through the skip adapters
        packed_skips = [pack(skip) for skip in skips]
        skips.clear()
        adapters = [("mid_adapter", decoder.mid_adapter)]
        adapters += [(f"skip_adapters.{i}", adapter) for i, adapter in enumerate(decoder.skip_adapters)]
        packed = [pack(hidden), *packed_skips]
        del hidden, packed_skips
        packed = [
            value if type(adapter) is nn.Identity else self.conv(value, adapter, name)
            for (name, adapter), value in zip(adapters, packed)
        ]
        sample, skips = packed[0], packed[1:]
        emb = emb.unflatten(0, (n, stages)).transpose(0, 1)  # (S, n, D): the stages' rows for the projections

        # 2. the up path, block by block as UpBlock2D / AttnUpBlock2D run it
        for b, block in enumerate(decoder.up_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for r, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
                sample = self.cat(sample, skips.pop())
                sample = self.resnet(sample, emb, resnet, f"up_blocks.{b}.resnets.{r}")
                if attn is not None:
                    sample = self.attention(sample, attn, f"up_blocks.{b}.attentions.{r}")
            for u, upsampler in enumerate(block.upsamplers or []):
                name = f"up_blocks.{b}.upsamplers.{u}"
                if type(upsampler) is ResnetBlock2D:
                    sample = self.resnet(sample, emb, upsampler, name)
                else:
                    sample = self.upsample(sample, upsampler, name)

        # 3. the output head, and its rows back to one per input row (sample-major: a view)
        sample = decoder.conv_act(self.norm(sample, decoder.conv_norm_out, "conv_norm_out"))
        sample = self.conv(sample, decoder.conv_out, "conv_out")
        return sample.reshape(n * stages, -1, *sample.shape[2:])


def packed_decoders(
    template: nn.Module, stages: int, stacked: Callable[[], dict[str, torch.Tensor]]
) -> Callable[..., torch.Tensor]:
    """The packed pass of ``stages`` decoders shaped like ``template`` (checked with [`packable`]), with their
    parameters stacked on a stage axis by ``stacked()``: it takes ``hidden``, ``skips`` and ``emb`` sample-major
    (row ``i * stages + s`` is the ``i``-th sample of stage ``s``) and returns the decoders' outputs in the same
    order."""

    def run(hidden: torch.Tensor, skips: Sequence[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        return _Packed(template, stacked(), stages)(hidden, skips if isinstance(skips, list) else list(skips), emb)

    return run
