"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023) as a diffusers model.

DuoDiff (arXiv 2410.09633) uses two U-ViTs of the same width as its backbones: a shallow one (depth 3) for the first,
noisiest sampling steps and a deep one (depth 13) for the rest. The AdaDiff early-exit baseline
([`EarlyExitUViT2DModel`]) is this model plus an exit head after every block.

The time token embeds the timestep the model is called with, as U-ViT's code and diffusers' models do. DuoDiff's
CIFAR-10 and CelebA configs divide the timestep by 1000 before the sinusoidal embedding (``normalize_timesteps``);
that variant is not reproduced here.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from .checks import (
    check_class_labels,
    check_options,
    check_positive_integers,
    check_sample,
    compute_dtype,
    per_sample_timesteps,
)
from .loading import StrictLoadingMixin


class UViTOutputHead(nn.Module):
    r"""
    U-ViT's output: layer norm, a linear map of each patch token to its pixels, unpatchify, then a 3x3 convolution
    (U-ViT's "final conv", against patch-boundary artefacts; optional).

    Parameters:
        hidden_size (`int`), patch_size (`int`), out_channels (`int`), final_conv (`bool`).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, final_conv: bool):
        super().__init__()
        self.patch_size, self.out_channels = patch_size, out_channels
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, patch_size**2 * out_channels)
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if final_conv else None

    def forward(self, hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, extra + N, D)`` tokens -> ``(B, out_channels, height, width)``; the leading extra tokens (time,
        class) are dropped."""
        p = self.patch_size
        patches = self.proj(self.norm(hidden[:, -(height // p) * (width // p) :]))  # (B, N, p*p*C)
        image = F.fold(patches.transpose(1, 2), output_size=(height, width), kernel_size=p, stride=p)  # unpatchify
        return image if self.conv is None else self.conv(image)


def check_uvit_config(
    sample_size: int,
    in_channels: int,
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    num_attention_heads: int,
    mlp_ratio: float,
    num_class_embeds: int | None,
    out_channels: int | None = None,
) -> None:
    """Check a U-ViT configuration before building anything (a `ValueError` naming the argument)."""
    check_positive_integers(sample_size=sample_size, in_channels=in_channels, patch_size=patch_size,
                            hidden_size=hidden_size, num_attention_heads=num_attention_heads)  # fmt: skip
    if sample_size % patch_size:
        raise ValueError(f"`sample_size`={sample_size} must be a multiple of `patch_size`={patch_size}.")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1 or num_layers % 2 == 0:
        raise ValueError(f"`num_layers` must be odd (in-blocks, middle block, out-blocks), got {num_layers!r}.")
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"`hidden_size`={hidden_size} must be a multiple of `num_attention_heads`={num_attention_heads}."
        )
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio < math.inf:
        raise ValueError(f"`mlp_ratio` must be a positive finite number, got {mlp_ratio!r}.")
    if int(hidden_size * mlp_ratio) < 1:  # the feed-forward width: 0 would leave each block's MLP a constant
        raise ValueError(
            f"`mlp_ratio`={mlp_ratio!r} gives a feed-forward layer of no width at `hidden_size`={hidden_size} "
            f"(int(hidden_size * mlp_ratio) = 0): give at least {1 / hidden_size:g}."
        )
    optional = ("num_class_embeds", "out_channels")
    check_positive_integers(optional, num_class_embeds=num_class_embeds, out_channels=out_channels)


class UViT2DModel(StrictLoadingMixin, ModelMixin, AttentionMixin, ConfigMixin):
    r"""
    A U-ViT denoiser: every input is a token (the time, the class, the image patches), pre-norm transformer blocks,
    and long skips from each block of the first half to its mirror block of the second half (concatenate, then a
    linear map back to the width, as U-ViT). Its call and output are those of `UNet2DModel`.

    Parameters:
        sample_size (`int`, defaults to 32): input height and width.
        in_channels (`int`, defaults to 3), out_channels (`int`, *optional*, defaults to ``in_channels``).
        patch_size (`int`, defaults to 2): side of the square patches that become tokens.
        hidden_size (`int`, defaults to 512): the token width (U-ViT's ``embed_dim``).
        num_layers (`int`, defaults to 13): the number of blocks, odd: ``num_layers // 2`` in-blocks, a middle block
            and as many out-blocks (U-ViT's ``depth`` 12 or 13 both give 13 blocks; DuoDiff's shallow model has 3).
        num_attention_heads (`int`, defaults to 8).
        mlp_ratio (`float`, defaults to 4.0): width of each block's feed-forward layer over ``hidden_size``.
        qkv_bias (`bool`, defaults to `False`): bias in the query/key/value projections (U-ViT: none).
        mlp_time_embed (`bool`, defaults to `False`): pass the sinusoidal time embedding through an MLP before it
            becomes the time token (off in every configuration of U-ViT's and DuoDiff's code, ImageNet included).
        num_class_embeds (`int`, *optional*): class-conditional when given (a class token).
        final_conv (`bool`, defaults to `True`): U-ViT's 3x3 convolution after unpatchify.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import UViT2DModel
    >>> model = UViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
    >>> model(torch.randn(2, 3, 8, 8), 500).sample.shape
    torch.Size([2, 3, 8, 8])

    ```
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock"]  # a transformer block is one unit (`device_map`, FSDP wrapping)
    # layerwise casting keeps these in the model's dtype (as diffusers' DiT): the tokens are computed in their dtype,
    # then cast to the blocks' compute dtype (`embed`)
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["pos_embed", "patch_embed", "norm"]
    # its position embedding is learned for `sample_size` tokens: pipelines sample no other height or width
    _fixed_sample_size: ClassVar[bool] = True
    # every block's `Attention` fused (AttentionMixin's version fuses only diffusers' newer attention classes), as in
    # `IUNet2DModel`; unfusing restores the processors
    fuse_qkv_projections = UNet2DConditionModel.fuse_qkv_projections
    unfuse_qkv_projections = UNet2DConditionModel.unfuse_qkv_projections

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 512,
        num_layers: int = 13,
        num_attention_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_class_embeds: int | None = None,
        final_conv: bool = True,
    ):
        super().__init__()
        # 0. check the configuration
        check_uvit_config(sample_size, in_channels, patch_size, hidden_size, num_layers, num_attention_heads,
                          mlp_ratio, num_class_embeds, out_channels)  # fmt: skip
        check_options(qkv_bias=qkv_bias, mlp_time_embed=mlp_time_embed, final_conv=final_conv)
        out_channels = out_channels or in_channels
        num_tokens = (sample_size // patch_size) ** 2
        self.gradient_checkpointing = False  # set by `enable_gradient_checkpointing()`

        # 1. tokens: patches, a time token and an optional class token (U-ViT "all as tokens")
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)  # [cos, sin] as U-ViT
        self.time_embed = (
            TimestepEmbedding(hidden_size, 4 * hidden_size, out_dim=hidden_size) if mlp_time_embed else None
        )
        self.class_embed = nn.Embedding(num_class_embeds, hidden_size) if num_class_embeds else None
        extra = 1 + (num_class_embeds is not None)
        self.pos_embed = nn.Parameter(torch.zeros(1, extra + num_tokens, hidden_size))

        # 2. pre-norm transformer blocks (diffusers' `Attention` inside); out-blocks first merge a long skip
        self.blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    hidden_size,
                    num_attention_heads,
                    hidden_size // num_attention_heads,
                    activation_fn="gelu",
                    attention_bias=qkv_bias,
                    ff_inner_dim=int(hidden_size * mlp_ratio),
                )
                for _ in range(num_layers)
            ]
        )
        self.skip_proj = nn.ModuleList([nn.Linear(2 * hidden_size, hidden_size) for _ in range(num_layers // 2)])

        # 3. output: norm, linear to patch pixels, unpatchify, 3x3 convolution
        self.output_head = UViTOutputHead(hidden_size, patch_size, out_channels, final_conv)
        self._init_weights()

    def _init_weights(self) -> None:
        """U-ViT's initialisation: truncated normal (std 0.02) for linear layers and the position embedding."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------------------------------
    def _check_inputs(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor | None, values: bool
    ) -> torch.Tensor:
        """Check the inputs (a `ValueError` naming the argument) and return one timestep per sample."""
        config = self.config
        check_sample(sample, config.in_channels, size=config.sample_size, dtype=self.input_dtype())
        timesteps = per_sample_timesteps(timestep, sample.shape[0], sample.device, check_values=values)
        check_class_labels(class_labels, sample.shape[0], self.class_embed is not None, config.num_class_embeds,
                           check_values=values)  # fmt: skip
        return timesteps

    def input_dtype(self) -> torch.dtype:
        """The dtype ``sample`` must have: the blocks' compute dtype (the model's dtype; under diffusers' layerwise
        casting its ``compute_dtype``, which ``model.dtype`` reports too)."""
        return compute_dtype(self.blocks[0].attn1)

    def embed(self, sample: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The token sequence ``[time, (class), patches]`` plus the position embedding, ``(B, extra + N, D)``, in
        ``sample``'s dtype. The patch embedding runs in its own dtype and the position embedding is cast: layerwise
        casting keeps both in the model's dtype while the blocks compute in another."""
        batch, dtype = sample.shape[0], sample.dtype
        time_token = self.time_proj(timesteps).to(dtype)
        if self.time_embed is not None:
            time_token = self.time_embed(time_token)
        tokens = [time_token[:, None]]
        if self.class_embed is not None:
            tokens.append(self.class_embed(class_labels.reshape(-1).expand(batch))[:, None])
        patches = self.patch_embed(sample.to(compute_dtype(self.patch_embed))).to(dtype)
        tokens.append(patches.flatten(2).transpose(1, 2))
        return torch.cat(tokens, dim=1) + self.pos_embed.to(dtype)

    def block(self, layer: int, hidden: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Run block ``layer``: an out-block first merges the long skip of its mirror in-block (popped from
        ``skips``), an in-block pushes its output onto ``skips``."""
        half = len(self.blocks) // 2
        if layer > half:
            hidden = self.skip_proj[layer - half - 1](torch.cat([hidden, skips.pop()], dim=-1))
        if torch.is_grad_enabled() and self.gradient_checkpointing:  # recompute activations in the backward pass
            hidden = self._gradient_checkpointing_func(self.blocks[layer], hidden)
        else:
            hidden = self.blocks[layer](hidden)
        if layer < half:
            skips.append(hidden)
        return hidden

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor`): the noisy input, ``(batch, in_channels, sample_size, sample_size)``.
            timestep (`torch.Tensor` or `float`): one timestep, or one per sample.
            class_labels (`torch.Tensor`, *optional*): one class index, or one per sample (class-conditional only).
            return_dict (`bool`): return a `UNet2DOutput` rather than a tuple.

        Returns:
            `UNet2DOutput` (or a one-tuple) whose ``sample`` has the input's height and width.
        """
        # 0. check the inputs: shapes always, values not (no host read per call, as `UNet2DModel`)
        timesteps = self._check_inputs(sample, timestep, class_labels, values=False)
        # 1. tokens, 2. blocks with long skips, 3. output head
        hidden, skips = self.embed(sample, timesteps, class_labels), []
        for layer in range(len(self.blocks)):
            hidden = self.block(layer, hidden, skips)
        image = self.output_head(hidden, *sample.shape[-2:])
        if not return_dict:
            return (image,)
        return UNet2DOutput(sample=image)


def dual_uvit_configs(
    shallow_depth: int, deep_depth: int, hidden_size: int, patch_size: int, num_attention_heads: int, **common
) -> dict[str, dict]:
    r"""
    DuoDiff's two backbones as `UViT2DModel` configs: the same width, heads and patch size, depths ``shallow_depth``
    and ``deep_depth`` (the authors': 3 and 13 at width 512). ``common`` goes to both (``sample_size``, ...).

    Example:

    ```py
    >>> from diffusers_stages.models.uvit import dual_uvit_configs
    >>> configs = dual_uvit_configs(3, 13, hidden_size=512, patch_size=2, num_attention_heads=8, sample_size=32)
    >>> configs["shallow"]["num_layers"], configs["deep"]["num_layers"], configs["deep"]["hidden_size"]
    (3, 13, 512)

    ```
    """
    for name, depth in (("shallow", shallow_depth), ("deep", deep_depth)):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 or depth % 2 == 0:
            raise ValueError(f"`{name}_depth` must be an odd positive number of U-ViT blocks, got {depth!r}.")
    if shallow_depth >= deep_depth:
        raise ValueError(f"`shallow_depth` ({shallow_depth}) must be smaller than `deep_depth` ({deep_depth}).")
    if "num_layers" in common:
        raise ValueError(
            f"`num_layers` ({common['num_layers']!r}) is set per backbone by `shallow_depth` and `deep_depth`: leave it "
            "out of the common arguments."
        )
    shared = {"hidden_size": hidden_size, "patch_size": patch_size, "num_attention_heads": num_attention_heads}
    depths = {"shallow": shallow_depth, "deep": deep_depth}
    return {name: {**shared, **common, "num_layers": depth} for name, depth in depths.items()}
