"""MEME expert presets (Lee et al., "Multi-Architecture Multi-Expert Diffusion Models", AAAI 2024).

MEME gives each expert of a uniform timestep partition its own architecture: convolution-heavy near the data
(high-frequency detail) and attention-heavy near the noise (global, low-frequency structure). MEME mixes the two
inside each block (iFormer-style channel split); here the mix is made from stock diffusers blocks at the level of
resolution stages: expert ``n`` uses self-attention (``AttnDownBlock2D`` / ``AttnUpBlock2D``, and the middle
block's attention) at its ``round(share_n * levels)`` lowest resolutions, the rest are plain ResNet blocks. Every
expert is a plain `UNet2DModel`, so it saves, loads and converts like any diffusers U-Net.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from diffusers import UNet2DModel


def default_attention_shares(num_experts: int) -> list[float]:
    """Attention share rising linearly from 0 (clean expert) to 1 (noisiest expert)."""
    return [n / (num_experts - 1) if num_experts > 1 else 1.0 for n in range(num_experts)]


def _per_expert(value, num_experts: int, name: str) -> list:
    """One value for all experts, or one per expert (a sequence of sequences for widths)."""
    if isinstance(value, Sequence) and value and isinstance(value[0], Sequence):
        if len(value) != num_experts:
            raise ValueError(f"`{name}` must be given once or once per expert ({num_experts}), got {len(value)}.")
        return [tuple(v) for v in value]
    return [tuple(value)] * num_experts


def meme_expert_configs(
    num_experts: int = 4,
    sample_size: int = 32,
    in_channels: int = 3,
    out_channels: int | None = None,
    block_out_channels: Sequence[int] | Sequence[Sequence[int]] = (64, 128, 256),
    attention_shares: Sequence[float] | None = None,
    layers_per_block: int = 2,
    attention_head_dim: int | None = 8,
    norm_num_groups: int = 32,
    num_class_embeds: int | None = None,
) -> list[dict]:
    r"""
    `UNet2DModel` configs of ``num_experts`` MEME experts, clean end first.

    Args:
        num_experts (`int`, defaults to 4): MEME uses 4 experts on uniform intervals.
        sample_size (`int`, defaults to 32), in_channels (`int`, defaults to 3), out_channels (`int`, *optional*):
            the shared input/output contract (``out_channels`` defaults to ``in_channels``).
        block_out_channels (`tuple[int]` or one `tuple[int]` per expert, defaults to `(64, 128, 256)`): widths;
            per expert to give the experts different sizes. Every expert needs the same number of levels.
        attention_shares (`list[float]`, *optional*): per expert, the share of resolution levels with
            self-attention, in ``[0, 1]`` and non-decreasing toward the noise end. Defaults to ``0 ... 1`` linearly.
        layers_per_block, attention_head_dim, norm_num_groups, num_class_embeds: as in `UNet2DModel`.

    Example:

    ```py
    >>> from diffusers_stages.models.meme import meme_expert_configs
    >>> configs = meme_expert_configs(num_experts=4, block_out_channels=(32, 64, 64))
    >>> [c["down_block_types"] for c in configs][::3]  # the clean expert is all convolution, the noisy one all attention
    [('DownBlock2D', 'DownBlock2D', 'DownBlock2D'), ('AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D')]

    ```
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"`num_experts` must be a positive integer, got {num_experts!r}.")
    widths = _per_expert(block_out_channels, num_experts, "block_out_channels")
    levels = len(widths[0])
    if any(len(w) != levels for w in widths):
        raise ValueError(f"Every expert needs the same number of levels in `block_out_channels`, got {widths}.")
    shares = (
        default_attention_shares(num_experts) if attention_shares is None else [float(s) for s in attention_shares]
    )
    if len(shares) != num_experts or any(not 0.0 <= s <= 1.0 for s in shares):
        raise ValueError(f"`attention_shares` must hold {num_experts} values in [0, 1], got {attention_shares}.")
    if any(b < a for a, b in itertools.pairwise(shares)):
        raise ValueError(f"`attention_shares` must not decrease toward the noise end (MEME), got {shares}.")

    configs = []
    for width, share in zip(widths, shares):
        attention_levels = round(share * levels)  # attention at the lowest resolutions first
        down = tuple("AttnDownBlock2D" if i >= levels - attention_levels else "DownBlock2D" for i in range(levels))
        up = tuple(block.replace("Down", "Up") for block in reversed(down))
        configs.append(
            {
                "sample_size": sample_size,
                "in_channels": in_channels,
                "out_channels": out_channels or in_channels,
                "block_out_channels": width,
                "down_block_types": down,
                "up_block_types": up,
                "layers_per_block": layers_per_block,
                "attention_head_dim": attention_head_dim,
                "norm_num_groups": norm_num_groups,
                "add_attention": share > 0,  # the middle block's attention
                "num_class_embeds": num_class_embeds,
            }
        )
    return configs


def build_meme_experts(**kwargs) -> list[UNet2DModel]:
    r"""
    The `UNet2DModel` experts of [`meme_expert_configs`] (same arguments), clean end first; pass them to
    [`ExpertRoutingModel`] with ``TimestepPartition.uniform(num_experts).boundaries`` as MEME does.

    Example:

    ```py
    >>> from diffusers_stages import ExpertRoutingModel, TimestepPartition
    >>> from diffusers_stages.models.meme import attention_share, build_meme_experts
    >>> experts = build_meme_experts(num_experts=4, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
    ...                              layers_per_block=1, attention_head_dim=4)
    >>> [attention_share(e) for e in experts]
    [0.0, 0.5, 0.5, 1.0]
    >>> model = ExpertRoutingModel(experts, stage_boundaries=TimestepPartition.uniform(4).boundaries)

    ```
    """
    return [UNet2DModel(**config) for config in meme_expert_configs(**kwargs)]


def attention_share(unet: UNet2DModel) -> float:
    """Share of a U-Net's down blocks that use self-attention."""
    blocks = unet.config.down_block_types
    return sum("Attn" in block for block in blocks) / len(blocks)
