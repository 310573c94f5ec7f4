"""iU-Net: a U-Net whose blocks mix tokens with iFormer's Inception mixer, the expert architecture of MEME.

MEME (Lee et al., "Multi-Architecture Multi-Expert Diffusion Models", AAAI 2024, arXiv 2306.04990) builds every
expert as an iU-Net: a U-Net whose blocks use the Inception token mixer of iFormer (Si et al., "Inception
Transformer", NeurIPS 2022, arXiv 2205.12956, Sec. 3.2). The mixer splits a block's ``C`` channels into a
high-frequency part ``C_h`` (a max-pooling branch and a depthwise-convolution branch) and a low-frequency part
``C_l`` (multi-head self-attention), concatenates the branches and fuses them. The share ``C_l / C`` is the knob
MEME turns per expert: attention-heavy experts for the noisy intervals, convolution-heavy ones near the data.

Here the share is a config value per resolution level (``attention_ratios``: 0 = convolution branches only,
1 = attention only). The U-Net around the mixer is `UNet2DModel`'s layout (skips, resampling, time and class
embeddings) made of diffusers blocks, so the model is called like `UNet2DModel` and fits `ExpertRoutingModel` and
the pipelines unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from .checks import (
    check_class_labels,
    check_norm_eps_and_dropout,
    check_positive_integers,
    check_sample,
    check_sample_size,
    compute_dtype,
    is_positive_integer,
    per_sample_timesteps,
)
from .loading import StrictLoadingMixin


def attention_channels(channels: int, ratio: float, head_dim: int) -> int:
    """``C_l``: the channels of ``channels`` that go to self-attention, ``ratio`` of them rounded (half up) to whole
    heads of ``head_dim`` channels."""
    return math.floor(ratio * channels / head_dim + 0.5) * head_dim


def compute_memory_format(sample: torch.Tensor) -> torch.memory_format:
    """The layout the blocks run in: channels-last on CPU, where oneDNN's depthwise convolutions, max-pooling and
    1x1 convolutions (the Inception mixer's branches) run about 3x faster in NHWC than in NCHW; unchanged elsewhere."""
    return torch.channels_last if sample.device.type == "cpu" and sample.ndim == 4 else torch.contiguous_format


class InceptionMixer(nn.Module):
    r"""
    iFormer's Inception token mixer (Sec. 3.2) behind a group norm, on ``channels`` channels of which
    ``low_channels`` (a multiple of ``head_dim``) take the low-frequency path.

    The high-frequency channels ``C_h = channels - low_channels`` split in two: ``conv`` (1x1 conv, then depthwise
    3x3 conv) and ``pool`` (3x3 max-pooling, then 1x1 conv); each doubles its width, as in iFormer. The low path
    average-pools by ``pool_size`` (1: no pooling), attends and upsamples back. A branch with no channels is left
    out, so ``low_channels=0`` is a pure convolution mixer and ``low_channels=channels`` a pure attention one.
    """

    def __init__(self, channels: int, low_channels: int, head_dim: int, pool_size: int, groups: int, eps: float):
        super().__init__()
        high = channels - low_channels
        # (conv, max-pool, attention) channels: iFormer's X_h2, X_h1 and X_l, in the order of its code
        self.widths = (high - high // 2, high // 2, low_channels)
        conv, pool, low = self.widths
        self.pool_size = pool_size
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.conv = None
        if conv:
            self.conv = nn.Sequential(
                nn.Conv2d(conv, 2 * conv, 1, bias=False),
                nn.Conv2d(2 * conv, 2 * conv, 3, padding=1, groups=2 * conv, bias=False),
                nn.GELU(),
            )
        self.pool = None
        if pool:
            self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(pool, 2 * pool, 1), nn.GELU())
        self.attention = Attention(query_dim=low, heads=low // head_dim, dim_head=head_dim, bias=True) if low else None
        mixed = 2 * conv + 2 * pool + low
        self.fuse = nn.Conv2d(mixed, mixed, 3, padding=1, groups=mixed, bias=False)
        self.proj = nn.Conv2d(mixed, channels, 1)

    def _low(self, x: torch.Tensor) -> torch.Tensor:
        # iFormer Sec. 3.2, low-frequency mixer: Y_l = Upsample(MSA(AvgPooling(X_l)))
        height, width = x.shape[-2:]
        if self.pool_size > 1:
            x = F.avg_pool2d(x, self.pool_size, ceil_mode=True)
        x = self.attention(x)
        if self.pool_size == 1:
            return x
        # upsample by the pooling factor (iFormer's `nn.Upsample(scale_factor=pool_size)`), then crop the cells that
        # `ceil_mode` padded: every pixel gets the output of the cell it was pooled into, also when the factor does
        # not divide the map (resizing to the map's size would spread the cells evenly over it instead)
        x = F.interpolate(x, scale_factor=self.pool_size, mode="nearest")
        return x[..., :height, :width]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # 1. split the channels into X_h2, X_h1 (high frequency) and X_l (low frequency)
        parts = torch.split(self.norm(hidden), self.widths, dim=1)
        branches = []
        # 2. high-frequency mixer: Y_h2 = DwConv(FC(X_h2)), Y_h1 = FC(MaxPool(X_h1)) (iFormer Sec. 3.2)
        if self.conv is not None:
            branches.append(self.conv(parts[0]))
        if self.pool is not None:
            branches.append(self.pool(parts[1]))
        # 3. low-frequency mixer: self-attention
        if self.attention is not None:
            branches.append(self._low(parts[2]))
        # 4. fusion: Y_c = Concat(Y_l, Y_h1, Y_h2) (any order: a permutation of channels); Y = FC(Y_c + DwConv(Y_c))
        mixed = torch.cat(branches, dim=1)
        return self.proj(mixed + self.fuse(mixed))


def _blocks_layout_without_gradients(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a `ResnetBlock2D`'s shortcut convolution. diffusers makes the shortcut's input contiguous
    (NCHW) whenever the block is in training mode, gradients or not, so a model as built (training mode) rounded
    differently from the same weights in eval mode (as `from_pretrained` returns them) and sampled other images.
    Without gradients the input goes back to the blocks' layout (see `compute_memory_format`); with gradients
    diffusers' layout is kept (its gradient strides suit DDP)."""
    if torch.is_grad_enabled():
        return None
    return (args[0].contiguous(memory_format=compute_memory_format(args[0])),)


class IUNetBlock(nn.Module):
    """One iU-Net block: a `ResnetBlock2D` (width change, time embedding; residual), then norm -> Inception mixer
    (residual) at the block's output width, so that the channel split is the level's."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, ratio: float, head_dim: int,
                 pool_size: int, groups: int, eps: float, dropout: float):  # fmt: skip
        super().__init__()
        self.gradient_checkpointing = False  # set by the model's `enable_gradient_checkpointing()`
        self.resnet = ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                                    groups=groups, eps=eps, dropout=dropout)  # fmt: skip
        if self.resnet.conv_shortcut is not None:
            self.resnet.conv_shortcut.register_forward_pre_hook(_blocks_layout_without_gradients)
        low = attention_channels(out_channels, ratio, head_dim)
        self.mixer = InceptionMixer(out_channels, low, head_dim, pool_size, groups, eps)

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:  # recompute activations in the backward pass
            hidden = self._gradient_checkpointing_func(self.resnet, hidden, emb)
            return hidden + self._gradient_checkpointing_func(self.mixer, hidden)
        hidden = self.resnet(hidden, emb)
        return hidden + self.mixer(hidden)  # iFormer: Y = X + ITM(Norm(X))


class IUNetLevel(nn.Module):
    """The blocks of one resolution level and the resampling after them (none at the end of the path). Run by
    calling the level (not its blocks one by one), so that hooks on the level (diffusers' block-level group offload,
    which loads a level's weights before its forward) see its use."""

    def __init__(self, blocks: list[IUNetBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample

    def forward(
        self,
        hidden: torch.Tensor,
        emb: torch.Tensor,
        skips: Sequence[torch.Tensor] | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Down path (no ``skips``): returns the output and every block's and the resampling's output (the skips
        the level gives). Up path: each block concatenates the latest of the level's ``skips`` (one per block,
        latest last), then a doubling to ``output_size`` (odd sizes too). The skips are arguments and outputs, not
        a list changed in place: hooks (group offload's move to the device) pass copies of the arguments."""
        outputs, skips = [], None if skips is None else list(skips)
        for block in self.blocks:
            hidden = block(hidden if skips is None else torch.cat([hidden, skips.pop()], dim=1), emb)
            outputs.append(hidden)
        if self.resample is not None:
            hidden = self.resample(hidden) if skips is None else self.resample(hidden, output_size=output_size)
            outputs.append(hidden)
        return hidden, outputs


def _per_level(value, levels: int, name: str) -> list:
    """One value for every level, or one per level."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"`{name}` must be one value or one per level ({levels}), got {value}.")
    return values


class IUNet2DModel(StrictLoadingMixin, ModelMixin, AttentionMixin, ConfigMixin):
    r"""
    An iU-Net denoiser: `UNet2DModel`'s layout whose blocks mix tokens with iFormer's Inception mixer.

    Parameters:
        sample_size (`int` or `tuple[int, int]`, *optional*): input height and width (read by the pipelines).
        in_channels (`int`, defaults to 3), out_channels (`int`, defaults to 3): input and output channels.
        block_out_channels (`tuple[int]`, defaults to `(64, 128, 256)`): width of each resolution level; each must
            be a multiple of ``norm_num_groups`` and of ``attention_head_dim``.
        attention_ratios (`float` or `tuple[float]`, defaults to 0.5): per level (or one for all), the share of a
            block's channels given to self-attention (iFormer's ``C_l / C``), in ``[0, 1]``: 0 is a pure
            convolution mixer, 1 a pure attention mixer. Rounded half up to whole heads; the middle blocks use the
            last level's.
        attention_head_dim (`int`, defaults to 8): channels per attention head.
        attention_pool_sizes (`int` or `tuple[int]`, defaults to 1): per level (or one for all), the average-pooling
            factor before attention (iFormer pools by 2 at its high-resolution stages); 1 attends at full resolution.
        layers_per_block (`int`, defaults to 2): blocks per level on the down path (one more on the up path).
        norm_num_groups (`int`, defaults to 32), norm_eps (`float`, defaults to 1e-5): group norm settings.
        dropout (`float`, defaults to 0.0): dropout inside the residual blocks.
        num_class_embeds (`int`, *optional*): class-conditional when given (a class embedding added to the time's).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.models.iunet import IUNet2DModel
    >>> model = IUNet2DModel(sample_size=8, block_out_channels=(8, 16), attention_ratios=(0.5, 1.0),
    ...                      attention_head_dim=4, layers_per_block=1, norm_num_groups=4)
    >>> model(torch.randn(2, 3, 8, 8), 500).sample.shape
    torch.Size([2, 3, 8, 8])
    >>> model.down_blocks[0].blocks[0].mixer.widths  # (conv, max-pool, attention) channels at width 8, ratio 0.5
    (2, 2, 4)

    ```
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["IUNetBlock"]  # a block is one unit (`device_map`, FSDP wrapping)
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["norm"]  # as diffusers' UNet2DModel
    # every `Attention` fused (AttentionMixin's version fuses only diffusers' newer attention classes, leaving these
    # unfused, silently), the fused processor set; unfusing restores the processors (UNet2DConditionModel's own)
    fuse_qkv_projections = UNet2DConditionModel.fuse_qkv_projections
    unfuse_qkv_projections = UNet2DConditionModel.unfuse_qkv_projections

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64, 128, 256),
        attention_ratios: float | tuple[float, ...] = 0.5,
        attention_head_dim: int = 8,
        attention_pool_sizes: int | tuple[int, ...] = 1,
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        num_class_embeds: int | None = None,
    ):
        super().__init__()
        # 0. check the configuration
        ratios, pools = self.check_config(block_out_channels, attention_ratios, attention_head_dim,
                                          attention_pool_sizes, layers_per_block, norm_num_groups,
                                          sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                                          num_class_embeds=num_class_embeds, norm_eps=norm_eps,
                                          dropout=dropout)  # fmt: skip
        widths, levels = list(block_out_channels), len(block_out_channels)
        temb = 4 * widths[0]
        block = {"temb_channels": temb, "head_dim": attention_head_dim, "groups": norm_num_groups, "eps": norm_eps,
                 "dropout": dropout}  # fmt: skip

        # 1. time and class embeddings, as `UNet2DModel` (sinusoidal projection, MLP; classes added)
        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(widths[0], temb)
        self.class_embedding = nn.Embedding(num_class_embeds, temb) if num_class_embeds is not None else None
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        # 2. down path: ``layers_per_block`` blocks per level, then a strided-conv halving; every output is a skip
        skips, width, self.down_blocks = [widths[0]], widths[0], nn.ModuleList()
        for i, out in enumerate(widths):
            blocks = []
            for j in range(layers_per_block):
                blocks.append(IUNetBlock(width if j == 0 else out, out, ratio=ratios[i], pool_size=pools[i], **block))
                skips.append(out)
            last = i == levels - 1
            self.down_blocks.append(IUNetLevel(blocks, None if last else Downsample2D(out, use_conv=True, name="op")))
            skips += [] if last else [out]
            width = out

        # 3. middle: two blocks at the deepest width, with the deepest level's channel split
        self.mid_blocks = nn.ModuleList(
            [IUNetBlock(width, width, ratio=ratios[-1], pool_size=pools[-1], **block) for _ in range(2)]
        )

        # 4. up path, deepest level first: ``layers_per_block + 1`` blocks that each take a skip, then a doubling
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            out, blocks = widths[i], []
            for _ in range(layers_per_block + 1):
                blocks.append(IUNetBlock(width + skips.pop(), out, ratio=ratios[i], pool_size=pools[i], **block))
                width = out
            self.up_blocks.append(IUNetLevel(blocks, Upsample2D(out, use_conv=True) if i > 0 else None))

        # 5. output head: norm -> SiLU -> conv
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    @staticmethod
    def check_config(
        block_out_channels: tuple[int, ...],
        attention_ratios: float | tuple[float, ...] = 0.5,
        attention_head_dim: int = 8,
        attention_pool_sizes: int | tuple[int, ...] = 1,
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        **other,
    ) -> tuple[list[float], list[int]]:
        """Check a configuration's shape arguments before building anything (a `ValueError` naming the argument);
        returns the attention ratio and pooling factor of each level. Of the other config keys, ``sample_size``,
        ``in_channels``, ``out_channels``, ``num_class_embeds``, ``norm_eps`` and ``dropout`` are checked when given;
        the rest are ignored."""
        if (
            not isinstance(block_out_channels, (list, tuple))
            or not block_out_channels
            or not all(is_positive_integer(w) for w in block_out_channels)
        ):
            raise ValueError(
                f"`block_out_channels` must be positive integers, one per level, got {block_out_channels!r}."
            )
        widths, head_dim, groups = list(block_out_channels), attention_head_dim, norm_num_groups
        ratios = _per_level(attention_ratios, len(widths), "attention_ratios")
        pools = _per_level(attention_pool_sizes, len(widths), "attention_pool_sizes")
        for name, divisor in (("norm_num_groups", groups), ("attention_head_dim", head_dim)):
            if not is_positive_integer(divisor):
                raise ValueError(f"`{name}` must be a positive integer, got {divisor!r}.")
            if any(w % divisor for w in widths):
                raise ValueError(f"`block_out_channels` {widths} must be multiples of `{name}`={divisor}.")
        if any(isinstance(r, bool) or not (isinstance(r, (int, float)) and 0.0 <= r <= 1.0) for r in ratios):
            raise ValueError(f"`attention_ratios` must lie in [0, 1] (0: convolution only, 1: attention only), "
                             f"got {ratios}.")  # fmt: skip
        if not all(is_positive_integer(p) for p in pools):
            raise ValueError(f"`attention_pool_sizes` must be positive integers, got {pools}.")
        check_positive_integers(layers_per_block=layers_per_block)
        check_sample_size(other.get("sample_size"))
        given = {name: other[name] for name in ("in_channels", "out_channels", "num_class_embeds") if name in other}
        check_positive_integers(("num_class_embeds",), **given)
        check_norm_eps_and_dropout(other.get("norm_eps", 1.0), other.get("dropout", 0.0))
        return ratios, pools

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor`): noisy input `(batch, channels, height, width)`.
            timestep (`torch.Tensor` or `float` or `int`): one timestep, or one per sample.
            class_labels (`torch.Tensor`, *optional*): class labels; required when ``num_class_embeds`` is set.
            return_dict (`bool`, defaults to `True`): return a `UNet2DOutput` rather than a tuple.
        """
        # 0. check the inputs: shapes always, values not (no host read per call, as `UNet2DModel`)
        config = self.config
        check_sample(sample, config.in_channels, dtype=compute_dtype(self.conv_in))
        timesteps = per_sample_timesteps(timestep, sample.shape[0], sample.device, check_values=False)
        check_class_labels(class_labels, sample.shape[0], self.class_embedding is not None, config.num_class_embeds,
                           check_values=False)  # fmt: skip

        # 1. time (and class) embedding
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(dtype=self.dtype)

        # 2. down path, keeping every block's output as a skip (channels-last on CPU: see `compute_memory_format`)
        hidden = self.conv_in(sample).contiguous(memory_format=compute_memory_format(sample))
        skips = [hidden]
        for level in self.down_blocks:
            hidden, given = level(hidden, emb)
            skips += given

        # 3. middle blocks
        for block in self.mid_blocks:
            hidden = block(hidden, emb)

        # 4. up path: each block concatenates the latest skip; doubling to the next skip's size (odd sizes too)
        for level in self.up_blocks:
            taken = skips[-len(level.blocks) :]
            del skips[-len(level.blocks) :]
            hidden, _ = level(hidden, emb, taken, skips[-1].shape[-2:] if skips else None)

        # 5. output head
        out = self.conv_out(F.silu(self.conv_norm_out(hidden))).contiguous()  # the caller's usual layout
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)
