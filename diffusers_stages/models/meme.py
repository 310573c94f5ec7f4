"""MEME expert presets (Lee et al., "Multi-Architecture Multi-Expert Diffusion Models", AAAI 2024, arXiv 2306.04990).

MEME gives each expert of a uniform timestep partition its own architecture: an iU-Net ([`IUNet2DModel`]) whose
Inception mixers give more of their channels to self-attention (low frequencies, global structure) on the noisy
intervals and more to convolution and max-pooling (high frequencies, detail) near the data.

What comes from the paper and what is this package's choice:

- From the paper: 4 experts on the uniform intervals ``((n-1)T/N, nT/N]``; every expert an iU-Net (iFormer's
  Inception mixer in a U-Net); the attention share of the mixer set per expert, rising toward the noise end. The
  soft interval assignment used to train them (`diffusers_stages.timestep_sampling.soft_assignment_timesteps`,
  default ``p = 0.8, 0.4, 0.2, 0.1``) takes its values from a secondary source, not the paper's full text: they
  remain a configurable default. Checked again (30 Nov 2026): the copies of the paper reachable from this project
  (the arXiv abstract and the opening of the AAAI 2024 text) name "a soft interval assignment strategy" but not
  its probabilities, so the values stay unconfirmed. A secondary source also gives the paper's FFHQ sizes (4
  experts of 82.9M parameters against a 274.1M LDM); the widths that give them are not reproduced here.
- This package's choices: the per-expert shares ``(n + 1/2) / N`` (0.125, 0.375, 0.625, 0.875 for 4 experts: never
  0 or 1, though each level rounds its share to whole heads of ``attention_head_dim``, so a narrow level can still
  get a pure mixer: 0.875 of 32 channels in heads of 8 is 3.5 heads, rounded up to 4, all attention; check with
  `attention_share` or each mixer's ``widths``), the same share at every resolution level of an expert, attention
  average-pooled by 2 at the highest-resolution level (iFormer's choice for its high-resolution stages) and at full
  resolution below, and the default widths. Every one of them is an argument.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence

from torch import nn

from .checks import check_positive_integers
from .iunet import InceptionMixer, IUNet2DModel


def default_attention_shares(num_experts: int) -> list[float]:
    """Attention share of each expert, clean expert first: ``(n + 1/2) / N``, rising evenly toward the noise end."""
    return [(n + 0.5) / num_experts for n in range(num_experts)]


def _per_expert(value, num_experts: int, name: str) -> list:
    """One value for all experts, or one per expert (a sequence of sequences for widths)."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"`{name}` must be a list of widths, or one list per expert, got {value!r}.")
    if value and isinstance(value[0], Sequence):
        if any(not isinstance(v, Sequence) or isinstance(v, str) for v in value):
            raise ValueError(f"`{name}` must be a list of widths, or one list per expert, got {value!r}.")
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
    attention_pool_sizes: int | Sequence[int] | None = None,
    layers_per_block: int = 2,
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
    dropout: float = 0.0,
    num_class_embeds: int | None = None,
) -> list[dict]:
    r"""
    [`IUNet2DModel`] configs of ``num_experts`` MEME experts, clean end first.

    Args:
        num_experts (`int`, defaults to 4): MEME uses 4 experts on uniform intervals.
        sample_size (`int`, defaults to 32), in_channels (`int`, defaults to 3), out_channels (`int`, *optional*):
            the shared input/output contract (``out_channels`` defaults to ``in_channels``).
        block_out_channels (`tuple[int]` or one `tuple[int]` per expert, defaults to `(64, 128, 256)`): widths;
            per expert to give the experts different sizes. Every expert needs the same number of levels.
        attention_shares (`list[float]`, *optional*): per expert, the share of its mixers' channels given to
            self-attention (``attention_ratios`` at every level), in ``[0, 1]`` and non-decreasing toward the noise
            end. Defaults to [`default_attention_shares`].
        attention_pool_sizes (`int` or `tuple[int]`, *optional*): pooling before attention per level, for every
            expert. Defaults to 2 at the highest resolution and 1 below (1 everywhere for a single level).
        layers_per_block, attention_head_dim, norm_num_groups, dropout, num_class_embeds: as in [`IUNet2DModel`].

    Example:

    ```py
    >>> from diffusers_stages.models.meme import meme_expert_configs
    >>> configs = meme_expert_configs(num_experts=4, block_out_channels=(32, 64, 64))
    >>> [c["attention_ratios"] for c in configs]  # convolution-heavy near the data, attention-heavy near the noise
    [0.125, 0.375, 0.625, 0.875]

    ```
    """
    check_positive_integers(num_experts=num_experts)
    check_positive_integers(("out_channels",), out_channels=out_channels)  # 0 would become `in_channels` below
    widths = _per_expert(block_out_channels, num_experts, "block_out_channels")
    levels = len(widths[0])
    if any(len(w) != levels for w in widths):
        raise ValueError(f"Every expert needs the same number of levels in `block_out_channels`, got {widths}.")
    shares = default_attention_shares(num_experts) if attention_shares is None else attention_shares
    shares = shares.tolist() if hasattr(shares, "tolist") else shares  # a tensor or an array
    if (
        not isinstance(shares, Sequence)
        or isinstance(shares, str)
        or len(shares) != num_experts
        or any(isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= s <= 1.0 for s in shares)
    ):
        raise ValueError(f"`attention_shares` must hold {num_experts} values in [0, 1], got {attention_shares!r}.")
    shares = [float(s) for s in shares]
    if any(b < a for a, b in itertools.pairwise(shares)):
        raise ValueError(f"`attention_shares` must not decrease toward the noise end (MEME), got {shares}.")
    if attention_pool_sizes is None:
        attention_pool_sizes = tuple(2 if i == 0 and levels > 1 else 1 for i in range(levels))

    shared = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels or in_channels,
        "attention_head_dim": attention_head_dim,
        "attention_pool_sizes": attention_pool_sizes,
        "layers_per_block": layers_per_block,
        "norm_num_groups": norm_num_groups,
        "dropout": dropout,
        "num_class_embeds": num_class_embeds,
    }
    return [{**shared, "block_out_channels": width, "attention_ratios": share} for width, share in zip(widths, shares)]


def build_meme_experts(**kwargs) -> list[IUNet2DModel]:
    r"""
    The [`IUNet2DModel`] experts of [`meme_expert_configs`] (same arguments), clean end first; pass them to
    [`ExpertRoutingModel`] with ``TimestepPartition.uniform(num_experts).boundaries`` as MEME does.

    Example:

    ```py
    >>> from diffusers_stages import ExpertRoutingModel, TimestepPartition
    >>> from diffusers_stages.models.meme import attention_share, build_meme_experts
    >>> experts = build_meme_experts(num_experts=4, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
    ...                              layers_per_block=1, attention_head_dim=4)
    >>> [round(attention_share(e), 2) for e in experts]  # 0.125 ... 0.875, rounded to whole heads of 4 channels
    [0.19, 0.5, 0.69, 1.0]
    >>> model = ExpertRoutingModel(experts, stage_boundaries=TimestepPartition.uniform(4).boundaries)

    ```
    """
    return [IUNet2DModel(**config) for config in meme_expert_configs(**kwargs)]


def attention_share(model: nn.Module) -> float:
    """Share of an iU-Net's mixer channels that go to self-attention (over all its blocks, after rounding to heads)."""
    mixers = [m for m in model.modules() if isinstance(m, InceptionMixer)]
    if not mixers:
        raise ValueError(f"`model` must hold Inception mixers (an `IUNet2DModel`), got a {type(model).__name__}.")
    return sum(m.widths[2] for m in mixers) / sum(sum(m.widths) for m in mixers)
