"""Multi-stage, multi-decoder U-Net (Zhang et al., "Improving Training Efficiency of Diffusion Models via
Multi-Stage Framework and Tailored Multi-Decoder Architecture", CVPR 2024).

One shared encoder (time embedding, down path, middle block) feeds one decoder per stage of a
[`TimestepPartition`]. Decoders may be narrower or wider than the encoder (the paper's "tailored" decoders): either
1x1 adapters match the encoder's skip connections to a decoder's widths, or (as in the authors' code) each decoder
resnet takes the encoder's skips at the encoder's widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from ..conventions import DEFAULT_STAGE_BOUNDARIES
from ..partition import TimestepPartition
from .checks import (
    check_freq_shift,
    check_norm_eps_and_dropout,
    check_options,
    check_positive_integers,
    check_sample_size,
    check_table_timesteps,
    compute_dtype,
    is_positive_integer,
    per_sample_timesteps,
)
from .decoders import (
    CONCATENATING_UP_BLOCKS,
    SkipAdapters,
    StageDecoder,
    resolve_decoder_up_block_types,
    resolve_decoder_widths,
    skip_adapter,
    skip_channels,
)
from .loading import StrictLoadingMixin
from .staged import StagedModelMixin
from .warm_start import DECODER_PREFIXES, unet_state_dict_to_multistage, warm_start

# the decoder blocks and warm-start helpers lived here first; they stay importable from this module
__all__ = [
    "CONCATENATING_UP_BLOCKS",
    "DECODER_PREFIXES",
    "MultiStageUNet2DModel",
    "SkipAdapters",
    "StageDecoder",
    "resolve_decoder_widths",
    "skip_adapter",
    "skip_channels",
    "unet_state_dict_to_multistage",
    "warm_start",
]

# the per-level lists of the config: (name, what each entry is, its check), so that a config read from a file with
# a string or a number where a list belongs is named, not counted letter by letter or a TypeError
BLOCK_LISTS = (
    ("block_out_channels", "positive integers", is_positive_integer),
    ("down_block_types", "block type names", lambda v: isinstance(v, str)),
    ("up_block_types", "block type names", lambda v: isinstance(v, str)),
)


class MultiStageUNet2DModel(StagedModelMixin, StrictLoadingMixin, ModelMixin, ConfigMixin, AttentionMixin):
    r"""
    A 2D U-Net with one shared encoder and one decoder per stage of the noise schedule.

    The encoder (time/class embedding, down blocks, middle block) runs once on the whole batch; each sample is then
    decoded by the decoder of its stage only, so a mixed batch costs ``encoder(B) + sum_s decoder_s(B_s)``. With
    decoders of one architecture (`from_unet`), `enable_fused_decoders()` decodes a mixed batch in one pass through
    all its stages' decoders (one channel-packed network, same outputs and gradients but for dropout's random
    numbers): opt-in, as it is faster only for small decoders (see [`~StagedModelMixin.enable_fused_decoders`]).

    The encoder arguments are those of [`~diffusers.UNet2DModel`]; the multi-stage arguments are:

    Parameters:
        stage_boundaries (`tuple[float]`, defaults to `(442, 631)`):
            Inner stage boundaries, strictly increasing, in ``boundary_units`` (see [`TimestepPartition`]). The
            default is the optimal-denoiser split of Zhang et al. on CIFAR-10 (``[0,442)``, ``[442,631)``,
            ``[631,1000]``).
        boundary_units (`str`, defaults to `"timestep"`):
            ``"timestep"`` (training timesteps, DDPM-style models) or ``"sigma"`` (EDM-style models, conditioned on
            ``c_noise = ln(sigma)/4``).
        num_train_timesteps (`int`, defaults to 1000):
            Length of the training schedule (also the table size of a ``"learned"`` time embedding).
        decoder_block_out_channels (`tuple[tuple[int]]`, *optional*):
            Block widths of each stage's decoder, from the clean stage to the noisy one. ``None`` gives every
            decoder the encoder's ``block_out_channels``. The paper's tailored CIFAR-10 decoders around a 128-wide
            encoder are ``(192,)*k``, ``(128,)*k`` and ``(16,)*k``.
        decoder_skip_adapters (`bool`, defaults to `True`):
            ``True``: 1x1 adapters map the encoder's skip connections (and middle-block output) to each decoder's
            widths. ``False``: no adapters; each decoder resnet concatenates its input with the encoder's skip at the
            *encoder's* width, and the middle block's output enters the first resnet at the encoder's last width, as
            in the authors' ``UNetModel_multistage`` (needs up blocks among ``"UpBlock2D"``, ``"AttnUpBlock2D"``).
            The two coincide for decoders of the encoder's widths.
        decoder_up_block_types (`tuple[tuple[str]]`, *optional*):
            Up block types of each stage's decoder, from the clean stage to the noisy one, so that decoders may
            attend at different levels. ``None`` gives every decoder ``up_block_types``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import MultiStageUNet2DModel
    >>> model = MultiStageUNet2DModel(
    ...     sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
    ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ...     layers_per_block=1, norm_num_groups=4, stage_boundaries=(400, 700),
    ...     decoder_block_out_channels=((16, 16), (8, 16), (4, 8)),
    ... )
    >>> noisy = torch.randn(3, 3, 16, 16)
    >>> model(noisy, torch.tensor([10, 500, 900])).sample.shape  # one sample per stage, each to its own decoder
    torch.Size([3, 3, 16, 16])
    >>> authors = MultiStageUNet2DModel(  # the authors' layout: skips unadapted, attention in decoder 0 only
    ...     sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ...     decoder_block_out_channels=((16, 16), (8, 16), (4, 8)), decoder_skip_adapters=False,
    ...     decoder_up_block_types=(("AttnUpBlock2D", "UpBlock2D"),) + (("UpBlock2D", "UpBlock2D"),) * 2,
    ... )
    >>> authors.decoders[2].up_blocks[0].resnets[0].conv1.in_channels  # middle block (16) + encoder skip (16)
    32

    ```
    """

    _supports_gradient_checkpointing = True
    _supports_fused_decoders = True
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["norm"]
    _plain_class_conversions: ClassVar[dict[str, str]] = {
        "UNet2DModel": "convert it with `{cls}.from_unet({name}.from_pretrained({args}), stage_boundaries=...)`"
    }
    _no_split_modules: ClassVar[list[str]] = ["StageDecoder"]  # a decoder is one unit for `device_map`
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
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int = 1000,
        stage_boundaries: tuple[float, ...] = DEFAULT_STAGE_BOUNDARIES,
        boundary_units: str = "timestep",
        decoder_block_out_channels: tuple[tuple[int, ...], ...] | None = None,
        decoder_skip_adapters: bool = True,
        decoder_up_block_types: tuple[tuple[str, ...], ...] | None = None,
    ):
        super().__init__()
        # 0. check the configuration (every problem is a ValueError that names the argument) and keep the partition;
        # `self.config` holds every argument above already (@register_to_config sets it before this body runs)
        self.partition, decoder_block_out_channels, decoder_up_block_types = self._check_config()
        self.register_to_config(stage_boundaries=list(self.partition.boundaries))  # floats: JSON whatever was given
        self.sample_size = sample_size
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4

        # 1. shared encoder, part 1: input convolution, time and class embeddings (as UNet2DModel)
        self._build_embeddings(time_embed_dim)

        # 2. shared encoder, part 2: down path and middle block
        self._build_encoder(time_embed_dim)

        # 3. one tailored decoder per stage, clean stage first
        self.decoders = nn.ModuleList(
            [
                StageDecoder(
                    encoder_block_out_channels=block_out_channels,
                    block_out_channels=widths,
                    up_block_types=types,
                    layers_per_block=layers_per_block,
                    out_channels=out_channels,
                    temb_channels=time_embed_dim,
                    norm_num_groups=norm_num_groups,
                    norm_eps=norm_eps,
                    act_fn=act_fn,
                    attention_head_dim=attention_head_dim,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    upsample_type=upsample_type,
                    dropout=dropout,
                    skip_adapters=decoder_skip_adapters,
                )
                for widths, types in zip(decoder_block_out_channels, decoder_up_block_types)
            ]
        )

    def _check_config(self) -> tuple[TimestepPartition, tuple[tuple[int, ...], ...], tuple[tuple[str, ...], ...]]:
        """Check the configuration before anything is built (a `ValueError` naming the argument); returns the
        partition and every decoder's widths and up block types (the encoder's where not given)."""
        c = self.config
        decoder_block_out_channels, decoder_up_block_types = c.decoder_block_out_channels, c.decoder_up_block_types
        partition = TimestepPartition.from_config(c)
        for name, kind, valid in BLOCK_LISTS:
            value = getattr(c, name)
            if not isinstance(value, (list, tuple)) or not value or not all(map(valid, value)):
                raise ValueError(f"`{name}` must be a list of {kind}, one per level, got {value!r}.")
        if len(c.down_block_types) != len(c.up_block_types) or len(c.block_out_channels) != len(c.down_block_types):
            raise ValueError(
                "`down_block_types`, `up_block_types` and `block_out_channels` must have the same length, got "
                f"{len(c.down_block_types)}, {len(c.up_block_types)} and {len(c.block_out_channels)}."
            )
        self._check_sizes_and_kinds()
        decoder_block_out_channels = resolve_decoder_widths(
            decoder_block_out_channels, c.block_out_channels, partition, c.norm_num_groups
        )
        decoder_up_block_types = resolve_decoder_up_block_types(
            decoder_up_block_types, c.up_block_types, partition.num_stages, c.decoder_skip_adapters,
            CONCATENATING_UP_BLOCKS,
        )  # fmt: skip
        attention_widths = [w for w, b in zip(c.block_out_channels, c.down_block_types) if "Attn" in b]
        attention_widths += [c.block_out_channels[-1]] if c.mid_block_type is not None and c.add_attention else []
        for widths, types in zip(decoder_block_out_channels, decoder_up_block_types):
            attention_widths += [w for w, b in zip(reversed(widths), types) if "Attn" in b]
        if c.attention_head_dim is not None and any(w < c.attention_head_dim for w in attention_widths):
            raise ValueError(
                f"Attention blocks of widths {sorted(set(attention_widths))} need at least one head of "
                f"`attention_head_dim`={c.attention_head_dim}: lower it, or widen the narrow blocks."
            )
        if c.time_embedding_type not in ("positional", "fourier", "learned"):
            raise ValueError(
                f"`time_embedding_type` must be positional, fourier or learned, got {c.time_embedding_type!r}."
            )
        if c.time_embedding_type == "positional":
            check_freq_shift(c.freq_shift, c.block_out_channels[0], "block_out_channels[0]")
        return partition, decoder_block_out_channels, decoder_up_block_types

    def _check_sizes_and_kinds(self) -> None:
        """The integer sizes, ``norm_eps``, ``dropout``, the numeric options and flags (`check_options`) and the block
        kinds that `UNet2DModel` only fails on deep inside torch, or ignores."""
        c = self.config
        optional = ("attention_head_dim", "attn_norm_num_groups", "time_embedding_dim", "num_class_embeds")
        names = ("in_channels", "out_channels", "layers_per_block", "norm_num_groups", *optional)
        check_positive_integers(optional, **{name: getattr(c, name) for name in names})
        check_sample_size(c.sample_size)
        check_norm_eps_and_dropout(c.norm_eps, c.dropout)
        options = ("center_input_sample", "flip_sin_to_cos", "freq_shift", "mid_block_scale_factor",
                   "downsample_padding", "add_attention", "act_fn", "resnet_time_scale_shift")  # fmt: skip
        check_options(**{name: getattr(c, name) for name in options})
        kinds = {
            "downsample_type": ("conv", "resnet"),
            "upsample_type": ("conv", "resnet"),
            "mid_block_type": ("UNetMidBlock2D", None),
            "class_embed_type": (None, "timestep", "identity"),
        }
        for name, allowed in kinds.items():
            if getattr(c, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(c, name)!r}.")

    def _build_embeddings(self, time_embed_dim: int) -> None:
        """The shared encoder's input convolution and time / class embeddings, as `UNet2DModel` builds them."""
        c = self.config
        self.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], kernel_size=3, padding=(1, 1))
        if c.time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=c.block_out_channels[0], scale=16)
            timestep_input_dim = 2 * c.block_out_channels[0]
        elif c.time_embedding_type == "positional":
            self.time_proj = Timesteps(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
            timestep_input_dim = c.block_out_channels[0]
        else:
            self.time_proj = nn.Embedding(c.num_train_timesteps, c.block_out_channels[0])
            timestep_input_dim = c.block_out_channels[0]
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        if c.class_embed_type is None and c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, time_embed_dim)
        elif c.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        elif c.class_embed_type == "identity":
            self.class_embedding = nn.Identity(time_embed_dim, time_embed_dim)
        else:
            self.class_embedding = None

    def _build_encoder(self, time_embed_dim: int) -> None:
        """The shared encoder's down blocks and middle block, as `UNet2DModel` builds them."""
        c = self.config
        self.down_blocks = nn.ModuleList([])
        output_channel = c.block_out_channels[0]
        for i, down_block_type in enumerate(c.down_block_types):
            input_channel, output_channel = output_channel, c.block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    down_block_type,
                    num_layers=c.layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=i < len(c.block_out_channels) - 1,
                    resnet_eps=c.norm_eps,
                    resnet_act_fn=c.act_fn,
                    resnet_groups=c.norm_num_groups,
                    attention_head_dim=c.attention_head_dim if c.attention_head_dim is not None else output_channel,
                    downsample_padding=c.downsample_padding,
                    resnet_time_scale_shift=c.resnet_time_scale_shift,
                    downsample_type=c.downsample_type,
                    dropout=c.dropout,
                )
            )
        self.mid_block = None
        if c.mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                in_channels=c.block_out_channels[-1],
                temb_channels=time_embed_dim,
                dropout=c.dropout,
                resnet_eps=c.norm_eps,
                resnet_act_fn=c.act_fn,
                output_scale_factor=c.mid_block_scale_factor,
                resnet_time_scale_shift=c.resnet_time_scale_shift,
                attention_head_dim=c.attention_head_dim
                if c.attention_head_dim is not None
                else c.block_out_channels[-1],
                resnet_groups=c.norm_num_groups,
                attn_groups=c.attn_norm_num_groups,
                add_attention=c.add_attention,
            )

    def encode(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Run the shared encoder (on inputs checked as `forward` checks them): returns ``(hidden, skips, emb,
        timesteps)`` for the whole batch, with one timestep per sample."""
        # time embedding (shared by every decoder), in the dtype the embedding's first layer computes in (cheaper
        # than `self.dtype`, which walks every decoder)
        timesteps = per_sample_timesteps(timestep, sample.shape[0], sample.device, check_values=False)
        dtype = compute_dtype(self.time_embedding.linear_1)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=dtype))
        if self.class_embedding is not None:
            if self.config.class_embed_type == "timestep":  # one label as a 0-d tensor too (`Timesteps` takes 1-D);
                class_labels = self.time_proj(class_labels.reshape(-1)).to(dtype=dtype)  # float32: cast as the time's
            emb = emb + self.class_embedding(class_labels).to(dtype=dtype)

        # down path and middle block
        skip_sample = sample
        hidden = self.conv_in(sample)
        skips = (hidden,)
        for down_block in self.down_blocks:
            if hasattr(down_block, "skip_conv"):
                hidden, res_samples, skip_sample = down_block(hidden_states=hidden, temb=emb, skip_sample=skip_sample)
            else:
                hidden, res_samples = down_block(hidden_states=hidden, temb=emb)
            skips += res_samples
        if self.mid_block is not None:
            hidden = self.mid_block(hidden, emb)
        return hidden, skips, emb, timesteps

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        stage_index: int | None = None,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor`): noisy input of shape `(batch, in_channels, height, width)`.
            timestep (`torch.Tensor` or `float` or `int`): one timestep, or one per sample (stages may differ).
            class_labels (`torch.Tensor`, *optional*): class labels for class-conditional models.
            return_dict (`bool`, defaults to `True`): return a `UNet2DOutput` rather than a tuple.
            stage_index (`int`, *optional*): decode every sample with this stage's decoder, skipping the
                data-dependent routing (the pipelines pass it; it makes `torch.compile(fullgraph=True)` work).

        Bad inputs raise a `ValueError` naming the argument. Shapes, ranks and dtypes are always checked. Values
        (finite timesteps, inside the partition's range; class indices in range) are checked on the routed path
        only: with ``stage_index`` given the call reads no tensor value on the host (no device synchronisation,
        no data-dependent branch), so out-of-range values there are the caller's responsibility.
        """
        # 0. check the inputs (values only when routing, see above), then centre the sample
        config = self.config
        timestep = self.check_inputs(sample, timestep, stage_index, config.in_channels,
                                     multiple_of=2 ** (len(config.block_out_channels) - 1),
                                     dtype=compute_dtype(self.conv_in))  # fmt: skip
        if config.time_embedding_type == "learned":  # table rows: the partition's range ends one step further
            check_table_timesteps(timestep, config.num_train_timesteps, check_values=stage_index is None)
        num_labels = config.num_class_embeds if config.class_embed_type is None else None
        self.check_labels(class_labels, sample.shape[0], stage_index, num_labels)
        if config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. shared encoder, once on the whole batch
        hidden, skips, emb, timesteps = self.encode(sample, timestep, class_labels)
        skips = list(skips)  # handed over to the decoders, which free each skip once read

        # 2. route: each stage's decoder on its own samples only (the whole batch when one stage holds it)
        out = self.decode(hidden, skips, emb, timesteps, stage_index)

        # 3. fourier-embedded models predict a scaled output (as UNet2DModel), in the model's dtype (float32
        # timesteps would promote a half-precision output)
        if self.config.time_embedding_type == "fourier":
            out = out / timesteps.reshape((out.shape[0], *([1] * (out.ndim - 1)))).to(out.dtype)
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_unet(
        cls,
        unet: UNet2DModel,
        stage_boundaries: Sequence[float] = DEFAULT_STAGE_BOUNDARIES,
        boundary_units: str = "timestep",
        num_train_timesteps: int | None = None,
    ) -> MultiStageUNet2DModel:
        r"""
        Warm-start from a pretrained [`~diffusers.UNet2DModel`]: the encoder is the U-Net's down path and every
        decoder is a copy of its up path, so the new model's output equals the source's at every timestep given as
        a tensor or an integer. (A Python float such as `450.5` is taken as that value here, while `UNet2DModel`
        truncates a non-tensor timestep to an integer, 450: give both a tensor for equal outputs.)

        Example:

        ```py
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from diffusers_stages import MultiStageUNet2DModel
        >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> staged = MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300, 600))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(staged(x, 450).sample, unet(x, 450).sample, atol=1e-5)
        True

        ```
        """
        return warm_start(cls, UNet2DModel, unet, stage_boundaries, boundary_units, num_train_timesteps)
