"""Training-time sampling of noise levels over a [`TimestepPartition`].

- `stratified_timesteps`: every stage gets its share of each batch (so every decoder/expert is used at every
  step, and DDP needs no `find_unused_parameters`), with a configurable share per stage.
- `soft_assignment_timesteps`: MEME's soft interval assignment: expert ``n`` trains on its own interval with
  probability ``p_n`` and on the rest of the schedule otherwise.

``"timestep"`` partitions give integer training timesteps in ``[0, num_train_timesteps)``; ``"sigma"`` partitions
give EDM noise levels drawn from EDM's log-normal ``ln(sigma) ~ N(p_mean, p_std^2)`` truncated to each stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .partition import TimestepPartition

MEME_OWN_INTERVAL_PROBABILITIES = (0.8, 0.4, 0.2, 0.1)  # Lee et al. (AAAI 2024), clean expert first
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # Karras et al. (2022), training noise distribution


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def stage_mass(partition: TimestepPartition, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD) -> list[float]:
    """Share of the usual training distribution that falls in each stage (uniform t, or EDM's log-normal sigma)."""
    masses = []
    for low, high in partition.intervals():
        if partition.units == "timestep":
            lo, hi = math.ceil(low), math.ceil(high) if high < partition.num_train_timesteps else high
            masses.append((hi - lo) / partition.num_train_timesteps)
        else:
            lo = 0.0 if low <= 0 else _normal_cdf((math.log(low) - p_mean) / p_std)
            hi = 1.0 if math.isinf(high) else _normal_cdf((math.log(high) - p_mean) / p_std)
            masses.append(hi - lo)
    return masses


def _draw_in_interval(
    partition: TimestepPartition, stage: int, count: int, generator: torch.Generator | None, p_mean: float, p_std: float
) -> torch.Tensor:
    low, high = partition.intervals()[stage]
    if partition.units == "timestep":
        lo = math.ceil(low)
        hi = min(math.ceil(high), partition.num_train_timesteps)  # integer timesteps t with low <= t < high
        if hi <= lo:
            raise ValueError(f"Stage {stage} ({low}, {high}) holds no integer timestep; widen it.")
        return torch.randint(lo, hi, (count,), generator=generator)
    # inverse-CDF sampling of the log-normal, truncated to [low, high)
    lo = 0.0 if low <= 0 else _normal_cdf((math.log(low) - p_mean) / p_std)
    hi = 1.0 if math.isinf(high) else _normal_cdf((math.log(high) - p_mean) / p_std)
    u = lo + (hi - lo) * torch.rand(count, generator=generator, dtype=torch.float64)
    u = u.clamp(1e-12, 1 - 1e-12)
    return torch.exp(p_mean + p_std * math.sqrt(2.0) * torch.special.erfinv(2 * u - 1)).float()


def stage_counts(batch_size: int, shares: Sequence[float], generator: torch.Generator | None = None) -> list[int]:
    """Split ``batch_size`` over stages in proportion to ``shares``: at least one sample per stage (when the batch
    allows it), the remainder given to the largest fractional parts, ties broken at random."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    total = float(sum(shares))
    if any(s < 0 for s in shares) or total <= 0:
        raise ValueError(f"`stage_shares` must be non-negative with a positive sum, got {list(shares)}.")
    guaranteed = [1 if s > 0 and batch_size >= sum(x > 0 for x in shares) else 0 for s in shares]
    rest = batch_size - sum(guaranteed)
    exact = [rest * s / total for s in shares]
    counts = [g + math.floor(e) for g, e in zip(guaranteed, exact)]
    jitter = torch.rand(len(shares), generator=generator).tolist()
    order = sorted(range(len(shares)), key=lambda i: (exact[i] - math.floor(exact[i]), jitter[i]), reverse=True)
    for i in order[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_timesteps(
    partition: TimestepPartition,
    batch_size: int,
    stage_shares: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    p_mean: float = EDM_P_MEAN,
    p_std: float = EDM_P_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Noise levels for one training batch, stratified over the stages of ``partition``.

    Args:
        partition: the stages.
        batch_size: samples in the batch.
        stage_shares: relative share of each stage (clean stage first). Defaults to the stage's mass under the usual
            training distribution, so the batch as a whole follows it (uniform timesteps, or EDM's log-normal).
        generator: for reproducible draws.

    Returns:
        ``(timesteps, stages)``: noise levels in the partition's units (shuffled) and the stage of each.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.timestep_sampling import stratified_timesteps
    >>> t, stages = stratified_timesteps(TimestepPartition([442, 631]), 8, generator=torch.manual_seed(0))
    >>> sorted(stages.tolist())
    [0, 0, 0, 1, 1, 2, 2, 2]

    ```
    """
    shares = stage_mass(partition, p_mean, p_std) if stage_shares is None else list(stage_shares)
    if len(shares) != partition.num_stages:
        raise ValueError(f"`stage_shares` needs {partition.num_stages} values (one per stage), got {len(shares)}.")
    counts = stage_counts(batch_size, shares, generator)
    draws = [_draw_in_interval(partition, s, n, generator, p_mean, p_std) for s, n in enumerate(counts) if n > 0]
    stages = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(counts) if n > 0])
    perm = torch.randperm(batch_size, generator=generator)
    return torch.cat(draws)[perm], stages[perm]


def soft_assignment_timesteps(
    partition: TimestepPartition,
    expert_index: int,
    batch_size: int,
    own_interval_probability: float | None = None,
    generator: torch.Generator | None = None,
    p_mean: float = EDM_P_MEAN,
    p_std: float = EDM_P_STD,
) -> torch.Tensor:
    r"""
    MEME's soft interval assignment: noise levels for training expert ``expert_index``.

    Each sample comes from the expert's own interval with probability ``p`` and otherwise from one of the other
    intervals (chosen in proportion to their mass under the usual training distribution). ``p = 1`` is hard
    assignment. The default ``p`` is MEME's ``(0.8, 0.4, 0.2, 0.1)`` for 4 experts (clean expert first); other
    expert counts must give it explicitly.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.timestep_sampling import soft_assignment_timesteps
    >>> partition = TimestepPartition.uniform(4)
    >>> t = soft_assignment_timesteps(partition, 0, 1000, generator=torch.manual_seed(0))
    >>> 0.75 < (t < 250).float().mean().item() < 0.85
    True

    ```
    """
    num_stages = partition.num_stages
    if not 0 <= expert_index < num_stages:
        raise ValueError(f"`expert_index` must be in [0, {num_stages}), got {expert_index}.")
    if own_interval_probability is None:
        if num_stages != len(MEME_OWN_INTERVAL_PROBABILITIES):
            raise ValueError(
                f"`own_interval_probability` has MEME's defaults for 4 experts only; give it for {num_stages} experts."
            )
        own_interval_probability = MEME_OWN_INTERVAL_PROBABILITIES[expert_index]
    if not 0.0 < own_interval_probability <= 1.0:
        raise ValueError(f"`own_interval_probability` must be in (0, 1], got {own_interval_probability}.")
    mass = stage_mass(partition, p_mean, p_std)
    # per-sample interval: own with probability p, else another in proportion to its mass
    probs = torch.tensor([m if s != expert_index else 0.0 for s, m in enumerate(mass)], dtype=torch.float64)
    probs = (1.0 - own_interval_probability) * probs / probs.sum() if probs.sum() > 0 else probs
    probs[expert_index] = own_interval_probability if num_stages > 1 else 1.0
    stages = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
    out = torch.empty(batch_size, dtype=torch.long if partition.units == "timestep" else torch.float32)
    for s in range(num_stages):
        idx = (stages == s).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = _draw_in_interval(partition, s, idx.numel(), generator, p_mean, p_std).to(out.dtype)
    return out
