"""Multi-stage, multi-decoder DDPM++ U-Net: the EDM variant of Zhang et al. (CVPR 2024).

The authors' EDM code (``MultistageUNet`` in LucasYFL/Multistage_Diffusion, ``edm/training/networks.py``) gives
EDM's DDPM++ network (Karras et al. 2022, after Song et al. 2021) one shared encoder and one tailored decoder per
stage. Its blocks differ from diffusers' `UNet2DModel` in ways no `UNet2DModel` option covers (every residual sum is
scaled by ``sqrt(0.5)``, each decoder has its own middle blocks, decoders attend only after the last block of a level,
group counts change with the width), so it is its own model here, built from diffusers' `ResnetBlock2D` and
`Attention` with those settings. Converted checkpoints reproduce the original's outputs
(`diffusers_stages.conversion.original_multistage_edm`).

The authors' third family, score_sde's ``ncsnpp_multistage`` (NCSN++, Song et al. 2021), is the same network with
three options set: FIR resampling (``resample_filter=(1, 3, 3, 1)``), a residual input pyramid
(``encoder_type="residual"``) and the middle blocks in the shared encoder (``decoder_mid_blocks=False``); it is
conditioned on ``999 t`` of a continuous-time VP SDE, with ``"timestep"`` boundaries
(`diffusers_stages.conversion.original_multistage_ncsnpp`).

The model is EDM's raw network ``F``: with EDM's preconditioning (diffusers' `EDMEulerScheduler` /
`EDMDPMSolverMultistepScheduler` with ``prediction_type="epsilon"``) it is conditioned on ``c_noise = ln(sigma)/4``
and its stage boundaries are in sigma.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import FirDownsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.upsampling import upfirdn2d_native
from torch import nn

from ..conventions import DEFAULT_SIGMA_BOUNDARIES, num_data_classes
from ..partition import TimestepPartition
from .checks import check_norm_eps_and_dropout, check_positive_integers, compute_dtype, is_positive_integer
from .loading import StrictLoadingMixin
from .staged import StagedModelMixin

SKIP_SCALE = math.sqrt(2.0)  # DDPM++ divides every residual sum by sqrt(2) (EDM's skip_scale = sqrt(0.5))
# resampling filter -> ResnetBlock2D kernel: 2x2 average pooling / nearest up-sampling, or NCSN++'s FIR filter
RESAMPLE_KERNELS = {(1, 1): "sde_vp", (1, 3, 3, 1): "fir"}
ENCODER_TYPES = ("standard", "residual")


def group_count(channels: int, norm_num_groups: int, min_channels_per_group: int = 4) -> int:
    """EDM's per-layer group count: ``norm_num_groups``, fewer where a group would hold under 4 channels."""
    groups = min(norm_num_groups, channels // min_channels_per_group)
    if groups < 1 or channels % groups:
        raise ValueError(
            f"A layer of width {channels} cannot be group-normalised with `norm_num_groups`={norm_num_groups} "
            f"({groups} groups of at least {min_channels_per_group} channels): change `encoder_channels`, "
            "`decoder_channels` or `channel_mult`."
        )
    return groups


class StridedFirConv2d(nn.Conv2d):
    """The convolution of `CastingFirDownsample2D` (diffusers' `FirDownsample2D.Conv2d_0`: same initialisation, same
    state dict) as that downsampling applies it to the filtered input: stride 2, no padding, the bias added after, its
    weights read in the input's dtype."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight, bias = (p.to(hidden_states.dtype) for p in (self.weight, self.bias))
        return F.conv2d(hidden_states, weight, stride=self.stride) + bias.reshape(1, -1, 1, 1)


class CastingFirDownsample2D(FirDownsample2D):
    """diffusers' `FirDownsample2D` with a convolution (same parameters, same state dict, same outputs) that calls its
    convolution layer instead of reading the layer's weights: hooks on the layer (diffusers' layerwise casting, which
    casts the weights from their storage dtype, and leaf-level group offload, which loads them onto the device) then
    see their use."""

    def __init__(self, channels: int, out_channels: int, fir_kernel: tuple[int, ...] = (1, 3, 3, 1)):
        super().__init__(channels, out_channels, use_conv=False, fir_kernel=fir_kernel)
        self.use_conv = True
        self.Conv2d_0 = StridedFirConv2d(channels, out_channels, kernel_size=3, stride=2)  # diffusers' initialisation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # `FirDownsample2D._downsample_2d`'s filter for a 3x3 convolution that halves the size
        kernel = torch.tensor(self.fir_kernel, dtype=torch.float32)
        kernel = torch.outer(kernel, kernel) if kernel.ndim == 1 else kernel
        kernel /= torch.sum(kernel)
        pad = (kernel.shape[0] - 2) + (3 - 1)  # (filter taps - factor) + (convolution size - 1)
        kernel = kernel.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return self.Conv2d_0(upfirdn2d_native(hidden_states, kernel, pad=((pad + 1) // 2, pad // 2)))


class DDPMppBlock(nn.Module):
    """One DDPM++ block (EDM's ``UNetBlock``): a residual block, optionally resampling, then optional self-attention.

    The residual path is norm -> SiLU -> [resample] -> conv -> + time embedding -> norm -> SiLU -> dropout -> conv; a
    1x1 convolution (after the same resampling) carries the input whenever the width or resolution changes; the sum,
    and the attention's residual sum, are divided by sqrt(2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        norm_num_groups: int,
        norm_eps: float,
        dropout: float,
        resample: str | None = None,
        attention: bool = False,
        kernel: str = "sde_vp",
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.resample = in_channels, out_channels, resample
        self.gradient_checkpointing = False  # set by the model's `enable_gradient_checkpointing()`
        self.resnet = ResnetBlock2D(
            in_channels=in_channels,
            out_channels=out_channels,
            temb_channels=temb_channels,
            groups=group_count(in_channels, norm_num_groups),
            groups_out=group_count(out_channels, norm_num_groups),
            eps=norm_eps,
            dropout=dropout,
            non_linearity="silu",
            kernel=kernel,  # "sde_vp": EDM's resample_filter [1, 1]; "fir": the [1, 3, 3, 1] FIR filter
            output_scale_factor=SKIP_SCALE,
            use_in_shortcut=in_channels != out_channels or resample is not None,
            up=resample == "up",
            down=resample == "down",
        )
        self.attention = None
        if attention:  # single-head self-attention over all positions (DDPM++ uses one head)
            self.attention = Attention(
                query_dim=out_channels,
                heads=1,
                dim_head=out_channels,
                rescale_output_factor=SKIP_SCALE,
                eps=norm_eps,
                norm_num_groups=group_count(out_channels, norm_num_groups),
                residual_connection=True,
                bias=True,
                upcast_softmax=True,
                _from_deprecated_attn_block=True,
            )

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:  # recompute activations in the backward pass
            hidden = self._gradient_checkpointing_func(self.resnet, hidden, emb)
            return hidden if self.attention is None else self._gradient_checkpointing_func(self.attention, hidden)
        hidden = self.resnet(hidden, emb)
        return hidden if self.attention is None else self.attention(hidden)


def middle_blocks(width: int, block_kwargs: dict) -> nn.ModuleList:
    """The two middle blocks at the deepest level: the first attends."""
    return nn.ModuleList(
        [DDPMppBlock(width, width, attention=True, **block_kwargs), DDPMppBlock(width, width, **block_kwargs)]
    )


class DDPMppStageDecoder(nn.Module):
    """One stage's decoder: two middle blocks at the encoder's width (unless the encoder holds them), the up path at
    this decoder's width (each level's blocks concatenate the encoder's skips at the encoder's widths), and the
    output head."""

    def __init__(
        self,
        resolution: int,
        encoder_skips: Sequence[int],
        encoder_top: int,
        channels: int,
        channel_mult: Sequence[int],
        layers_per_block: int,
        attention_resolutions: Sequence[int],
        out_channels: int,
        block_kwargs: dict,
        mid_blocks: bool = True,
    ):
        super().__init__()
        # 1. middle blocks, at the encoder's deepest width: the first attends
        self.mid_blocks = middle_blocks(encoder_top, block_kwargs) if mid_blocks else nn.ModuleList()
        # 2. up path, deepest level first: [up-sampling block,] then layers_per_block + 1 blocks that each take a skip
        pending, width, self.takes_skip = list(encoder_skips), encoder_top, []
        blocks = []
        for level in reversed(range(len(channel_mult))):
            res = resolution >> level
            if level < len(channel_mult) - 1:
                blocks.append(DDPMppBlock(width, width, resample="up", **block_kwargs))
                self.takes_skip.append(False)
            for j in range(layers_per_block + 1):
                attend = j == layers_per_block and res in attention_resolutions  # after the level's last block
                blocks.append(
                    DDPMppBlock(
                        width + pending.pop(), channels * channel_mult[level], attention=attend, **block_kwargs
                    )
                )
                width = channels * channel_mult[level]
                self.takes_skip.append(True)
        self.up_blocks = nn.ModuleList(blocks)
        # 3. output head
        self.conv_norm_out = nn.GroupNorm(
            group_count(width, block_kwargs["norm_num_groups"]), width, eps=block_kwargs["norm_eps"]
        )
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    def forward(self, hidden: torch.Tensor, skips: Sequence[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Decode; a list of ``skips`` is emptied, so that each skip is freed once read (as in `UNet2DModel`)."""
        skips, given = list(skips), skips
        if isinstance(given, list):
            given.clear()
        for block in self.mid_blocks:
            hidden = block(hidden, emb)
        for block, takes_skip in zip(self.up_blocks, self.takes_skip):
            if takes_skip:
                hidden = torch.cat([hidden, skips.pop()], dim=1)
            hidden = block(hidden, emb)
        return self.conv_out(F.silu(self.conv_norm_out(hidden)))


def check_augment_labels(augment_labels: torch.Tensor, batch: int, augment_dim: int) -> None:
    """Check EDM's ``augment_labels``: a tensor of shape ``(batch, augment_dim)``, or one row for every sample
    (``(1, augment_dim)`` or ``(augment_dim,)``); a `ValueError` naming them otherwise."""
    shape = tuple(augment_labels.shape) if torch.is_tensor(augment_labels) else None
    if shape is None or len(shape) not in (1, 2) or shape[-1] != augment_dim or shape[:-1] not in ((), (1,), (batch,)):
        got = f"shape {shape}" if shape is not None else type(augment_labels).__name__
        raise ValueError(
            f"`augment_labels` must have shape ({batch}, {augment_dim}): one row of `augment_dim` augmentation labels "
            f"per sample (or one row for all), got {got}."
        )


class MultiStageDDPMppUNet2DModel(StagedModelMixin, StrictLoadingMixin, ModelMixin, ConfigMixin, AttentionMixin):
    r"""
    EDM's DDPM++ U-Net with one shared encoder and one tailored decoder per stage (the multi-stage EDM model of
    Zhang et al., CVPR 2024): the network ``F`` that EDM's preconditioning wraps. With ``resample_filter=(1, 3, 3,
    1)``, ``encoder_type="residual"`` and ``decoder_mid_blocks=False`` it is their score_sde NCSN++ model instead.

    The encoder (noise, class and augmentation embeddings, input convolution and down path) runs once on the whole
    batch; each sample is decoded by its stage's decoder only.

    Parameters:
        sample_size (`int`, defaults to 32): height and width of the input.
        in_channels (`int`, defaults to 3), out_channels (`int`, defaults to 3): image channels.
        encoder_channels (`int`, defaults to 128): the encoder's base width (EDM's ``en_model_channels``).
        decoder_channels (`tuple[int]`, defaults to `(192, 128, 16)`): each stage's decoder base width, from the
            clean stage to the noisy one (EDM's ``de_model_channels``; the paper's CIFAR-10 decoders).
        channel_mult (`tuple[int]`, defaults to `(2, 2, 2)`): width multiplier per resolution level.
        channel_mult_emb (`int`, defaults to 4): embedding width = ``encoder_channels * channel_mult_emb``.
        layers_per_block (`int`, defaults to 4): blocks per level in the encoder (the decoders have one more).
        attention_resolutions (`tuple[int]`, defaults to `(16,)`): the map sizes with self-attention (``sample_size``
            halved per level; a size no level has is a `ValueError`).
        dropout (`float`, defaults to 0.13): dropout inside the residual blocks.
        num_class_embeds (`int`, *optional*): class-conditional when given: ``num_class_embeds - 1`` classes, fed
            as scaled one-hot vectors (EDM's ``map_label``), and the last label meaning "no class" (the zero vector,
            EDM's unconditional input), as the package's classifier-free guidance expects.
        augment_dim (`int`, defaults to 0): width of EDM's augmentation labels (9 for EDM's CIFAR-10 runs); they are
            only used when ``augment_labels`` are passed.
        norm_num_groups (`int`, defaults to 16): groups per norm, fewer where a group would hold under 4 channels.
        norm_eps (`float`, defaults to 1e-6): epsilon of the norms.
        stage_boundaries (`tuple[float]`, defaults to `(2.5103, 7.6577)`): inner stage boundaries in
            ``boundary_units`` (the default: the authors' sigma boundaries for CIFAR-10).
        boundary_units (`str`, defaults to `"sigma"`): ``"sigma"`` (the model is conditioned on ``ln(sigma)/4``, as
            diffusers' EDM schedulers pass) or ``"timestep"``.
        num_train_timesteps (`int`, defaults to 1000): the schedule length, for ``"timestep"`` boundaries.
        resample_filter (`tuple[int]`, defaults to `(1, 1)`): the up/down-sampling filter of the residual blocks:
            `(1, 1)` (2x2 average pooling, nearest up-sampling: DDPM++) or `(1, 3, 3, 1)` (NCSN++'s FIR filter).
        encoder_type (`str`, defaults to `"standard"`): `"residual"` adds NCSN++'s input pyramid: at each
            down-sampling the input, down-sampled by a FIR-resampling 3x3 convolution, is summed into the encoder
            (divided by sqrt(2)).
        decoder_mid_blocks (`bool`, defaults to `True`): each decoder has its own two middle blocks (the EDM
            model); `False` puts them in the shared encoder (score_sde's ``ncsnpp_multistage``).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import MultiStageDDPMppUNet2DModel
    >>> model = MultiStageDDPMppUNet2DModel(
    ...     sample_size=8, encoder_channels=16, decoder_channels=(24, 16, 8), channel_mult=(1, 2),
    ...     layers_per_block=1, attention_resolutions=(4,), dropout=0.0,
    ... )
    >>> sigmas = torch.tensor([0.5, 5.0, 40.0])  # one per stage: each sample goes to its own decoder
    >>> model(torch.randn(3, 3, 8, 8), sigmas.log() / 4).sample.shape
    torch.Size([3, 3, 8, 8])

    ```
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["norm"]
    # a decoder and an encoder block are units for `device_map`
    _no_split_modules: ClassVar[list[str]] = ["DDPMppStageDecoder", "DDPMppBlock"]
    # every `Attention` fused (AttentionMixin's version fuses only diffusers' newer attention classes, leaving these
    # unfused, silently), the fused processor set; unfusing restores the processors (UNet2DConditionModel's own)
    fuse_qkv_projections = UNet2DConditionModel.fuse_qkv_projections
    unfuse_qkv_projections = UNet2DConditionModel.unfuse_qkv_projections

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_channels: int = 128,
        decoder_channels: tuple[int, ...] = (192, 128, 16),
        channel_mult: tuple[int, ...] = (2, 2, 2),
        channel_mult_emb: int = 4,
        layers_per_block: int = 4,
        attention_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.13,
        num_class_embeds: int | None = None,
        augment_dim: int = 0,
        norm_num_groups: int = 16,
        norm_eps: float = 1e-6,
        stage_boundaries: tuple[float, ...] = DEFAULT_SIGMA_BOUNDARIES,
        boundary_units: str = "sigma",
        num_train_timesteps: int = 1000,
        resample_filter: tuple[int, ...] = (1, 1),
        encoder_type: str = "standard",
        decoder_mid_blocks: bool = True,
    ):
        super().__init__()
        # 0. check the configuration (every problem is a ValueError that names the argument) and keep the partition
        check_positive_integers(
            in_channels=in_channels, out_channels=out_channels, encoder_channels=encoder_channels,
            channel_mult_emb=channel_mult_emb, layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
        )  # fmt: skip
        check_norm_eps_and_dropout(norm_eps, dropout)
        if not isinstance(channel_mult, Sequence) or not channel_mult:
            raise ValueError(f"`channel_mult` must be positive integers, one per level, got {channel_mult!r}.")
        check_positive_integers(**{f"channel_mult[{i}]": m for i, m in enumerate(channel_mult)})
        if isinstance(augment_dim, bool) or not isinstance(augment_dim, int) or augment_dim < 0:
            raise ValueError(
                f"`augment_dim` must be an integer >= 0 (0: no augmentation labels), got {augment_dim!r}."
            )
        if not isinstance(decoder_mid_blocks, bool):
            raise ValueError(f"`decoder_mid_blocks` must be True or False, got {decoder_mid_blocks!r}.")
        if (
            not isinstance(attention_resolutions, Sequence)
            or isinstance(attention_resolutions, str)
            or not all(is_positive_integer(r) for r in attention_resolutions)  # 4.0 or True: not a map size
        ):
            raise ValueError(
                "`attention_resolutions` must be a list of resolutions (integers: the map sizes that attend, e.g. "
                f"(16,); () for none), got {attention_resolutions!r}."
            )
        self.partition = self._check_config(stage_boundaries, num_train_timesteps, boundary_units, decoder_channels,
                                            sample_size, channel_mult, num_class_embeds)  # fmt: skip
        sizes = [sample_size >> level for level in range(len(channel_mult))]
        absent = [r for r in attention_resolutions if r not in sizes]
        if absent:  # else built without that attention, silently
            raise ValueError(
                f"`attention_resolutions`={tuple(attention_resolutions)} must be map sizes of this model: "
                f"{', '.join(map(str, sizes))} (`sample_size`={sample_size} halved per level of "
                f"`channel_mult`={tuple(channel_mult)}), got {', '.join(map(repr, absent))}."
            )
        self.register_to_config(stage_boundaries=list(self.partition.boundaries))  # floats: JSON whatever was given
        kernel = self._check_options(resample_filter, encoder_type)
        noise_channels, emb_channels = encoder_channels, encoder_channels * channel_mult_emb
        block_kwargs = {"temb_channels": emb_channels, "norm_num_groups": norm_num_groups, "norm_eps": norm_eps,
                        "dropout": dropout, "kernel": kernel}  # fmt: skip

        # 1. embeddings: EDM's positional noise embedding ([sin, cos], frequencies 10000^(-i/(n-1))), plus the class
        #    and augmentation embeddings, then a two-layer MLP (EDM's map_layer0 / map_layer1)
        self.time_proj = Timesteps(noise_channels, flip_sin_to_cos=False, downscale_freq_shift=1)
        self.class_embedding = (
            nn.Linear(num_data_classes(num_class_embeds), noise_channels) if num_class_embeds else None
        )
        self.augment_embedding = nn.Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.time_embedding = TimestepEmbedding(noise_channels, emb_channels)

        # 2. shared encoder: input convolution, then per level [a down-sampling block,] layers_per_block blocks;
        #    every output is a skip connection; a residual encoder's input pyramid joins each down-sampling
        self.conv_in = nn.Conv2d(in_channels, encoder_channels, kernel_size=3, padding=1)
        blocks, skips, width, pyramid = [], [encoder_channels], encoder_channels, []
        for level, mult in enumerate(channel_mult):
            if level > 0:
                blocks.append(DDPMppBlock(width, width, resample="down", **block_kwargs))
                skips.append(width)
                if encoder_type == "residual":
                    source = pyramid[-1].out_channels if pyramid else in_channels
                    pyramid.append(CastingFirDownsample2D(source, width, fir_kernel=tuple(resample_filter)))
            for _ in range(layers_per_block):
                attend = (sample_size >> level) in attention_resolutions
                blocks.append(DDPMppBlock(width, encoder_channels * mult, attention=attend, **block_kwargs))
                width = encoder_channels * mult
                skips.append(width)
        self.down_blocks = nn.ModuleList(blocks)
        self.input_pyramid = nn.ModuleList(pyramid) if pyramid else None
        self.mid_blocks = None if decoder_mid_blocks else middle_blocks(width, block_kwargs)

        # 3. one tailored decoder per stage, clean stage first
        self.decoders = nn.ModuleList(
            [
                DDPMppStageDecoder(
                    sample_size,
                    skips,
                    width,
                    channels,
                    channel_mult,
                    layers_per_block,
                    attention_resolutions,
                    out_channels,
                    block_kwargs,
                    decoder_mid_blocks,
                )
                for channels in decoder_channels
            ]
        )

    @staticmethod
    def _check_config(
        stage_boundaries: Sequence[float],
        num_train_timesteps: int,
        boundary_units: str,
        decoder_channels: Sequence[int],
        sample_size: int,
        channel_mult: Sequence[int],
        num_class_embeds: int | None,
    ) -> TimestepPartition:
        """Check a configuration before anything is built (a `ValueError` naming the argument; group counts are
        checked as the layers are built); returns the partition."""
        partition = TimestepPartition.from_config(
            stage_boundaries=stage_boundaries, num_train_timesteps=num_train_timesteps, boundary_units=boundary_units
        )
        if not isinstance(decoder_channels, Sequence) or isinstance(decoder_channels, str):
            raise ValueError(
                f"`decoder_channels` must be a list of widths, one per stage ({partition.num_stages} stages from "
                f"`stage_boundaries`={tuple(stage_boundaries)}), got {decoder_channels!r}."
            )
        check_positive_integers(**{f"decoder_channels[{i}]": width for i, width in enumerate(decoder_channels)})
        if len(decoder_channels) != partition.num_stages:
            raise ValueError(
                f"`decoder_channels` must give one width per stage ({partition.num_stages} stages from "
                f"`stage_boundaries`={tuple(stage_boundaries)}), got {tuple(decoder_channels)}."
            )
        if not is_positive_integer(sample_size) or sample_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"`sample_size` must be a positive integer divisible by 2**{len(channel_mult) - 1} (one halving per level of "
                f"`channel_mult`={tuple(channel_mult)}), got {sample_size!r}."
            )
        integral = isinstance(num_class_embeds, numbers.Integral) and not isinstance(num_class_embeds, bool)
        if num_class_embeds is not None and (not integral or num_class_embeds < 2):
            raise ValueError(
                "`num_class_embeds` must be an integer >= 2 (classes + the 'no class' label) or None (unconditional), "
                f"got {num_class_embeds!r}."
            )
        return partition

    @staticmethod
    def _check_options(resample_filter: Sequence[int], encoder_type: str) -> str:
        """Check the NCSN++ options; returns the residual blocks' resampling kernel."""
        kernel = RESAMPLE_KERNELS.get(tuple(resample_filter) if isinstance(resample_filter, Sequence) else None)
        if kernel is None:
            raise ValueError(f"`resample_filter` must be one of {list(RESAMPLE_KERNELS)}, got {resample_filter!r}.")
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"`encoder_type` must be one of {ENCODER_TYPES}, got {encoder_type!r}.")
        return kernel

    def embed(
        self,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """The embedding every block receives: noise level + class + augmentation, through the MLP (on labels
        checked as `forward` checks them)."""
        dtype = compute_dtype(self.time_embedding.linear_1)  # cheaper than `self.dtype`, which walks every decoder
        emb = self.time_proj(timesteps).to(dtype=dtype)
        if self.class_embedding is not None:
            num_classes = self.class_embedding.in_features
            if not class_labels.is_floating_point():  # indices to one-hot rows; the last ("no class") to zeros
                classes = torch.arange(num_classes, device=class_labels.device)
                class_labels = class_labels.reshape(-1, 1) == classes  # not F.one_hot: it reads the labels on CPU
            emb = emb + self.class_embedding(class_labels.to(dtype) * math.sqrt(num_classes))  # EDM's scaling
        if augment_labels is not None:
            if self.augment_embedding is None:
                raise ValueError("`augment_labels` were given, but this model has no augmentation embedding.")
            emb = emb + self.augment_embedding(augment_labels.to(dtype))
        return self.time_embedding(emb)  # linear, SiLU, linear; each block applies the final SiLU

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        stage_index: int | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor`): input of shape `(batch, in_channels, height, width)` (EDM's ``c_in * x``).
            timestep (`torch.Tensor` or `float`): the noise conditioning, ``ln(sigma)/4`` for sigma boundaries; one
                value, or one per sample (stages may differ).
            class_labels (`torch.Tensor`, *optional*): class indices (the last index is "no class"), or one-hot
                rows of width ``num_class_embeds - 1``.
            return_dict (`bool`, defaults to `True`): return a `UNet2DOutput` rather than a tuple.
            stage_index (`int`, *optional*): decode every sample with this stage's decoder (the pipelines pass it).
            augment_labels (`torch.Tensor`, *optional*): EDM's augmentation labels, for training with augmentation.

        Bad inputs raise a `ValueError` naming the argument. Shapes, ranks and dtypes are always checked. Values
        (finite timesteps, inside the partition's range; class indices in range) are checked on the routed path
        only: with ``stage_index`` given the call reads no tensor value on the host (no device synchronisation,
        no data-dependent branch, so it compiles with ``fullgraph=True``), and values are the caller's
        responsibility.
        """
        # 0. check the inputs (values only when routing, see above)
        config = self.config
        timesteps = self.check_inputs(sample, timestep, stage_index, config.in_channels,
                                      multiple_of=2 ** (len(config.channel_mult) - 1),
                                      dtype=compute_dtype(self.conv_in))  # fmt: skip
        self.check_labels(class_labels, sample.shape[0], stage_index, config.num_class_embeds, one_hot=True)
        if augment_labels is not None and self.augment_embedding is not None:
            check_augment_labels(augment_labels, sample.shape[0], config.augment_dim)

        # 1. embeddings and the shared encoder, once on the whole batch
        emb = self.embed(timesteps, class_labels, augment_labels)
        hidden = self.conv_in(sample)
        skips, pyramid, downsample = [hidden], sample, iter(self.input_pyramid or ())
        for block in self.down_blocks:
            hidden = block(hidden, emb)
            if block.resample == "down" and self.input_pyramid is not None:  # the residual input pyramid joins
                pyramid = hidden = (next(downsample)(pyramid) + hidden) / SKIP_SCALE
            skips.append(hidden)
        for block in self.mid_blocks or ():  # middle blocks shared by every stage (score_sde's NCSN++)
            hidden = block(hidden, emb)

        # 2. route: each stage's decoder on its own samples only (the whole batch when one stage holds it)
        out = self.decode(hidden, skips, emb, timesteps, stage_index)
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)
