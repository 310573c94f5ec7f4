"""Training-time sampling of noise levels over a [`TimestepPartition`].

- `stratified_timesteps`: every stage gets its share of each batch (so every decoder/expert is used at every
  step, and DDP needs no `find_unused_parameters`), with a configurable share per stage; a batch smaller than the
  number of stages draws each sample's stage at random by the shares instead.
- `soft_assignment_timesteps`: MEME's soft interval assignment: expert ``n`` trains on its own interval with
  probability ``p_n`` and on the rest of the schedule otherwise.
- `stage_sampled_timesteps`: the multi-stage schemes (`STAGE_SAMPLING`): mixed batches (the package's default,
  `stratified_timesteps`), or the authors' one stage per batch (their EDM code) or per process (their LDM code).

``"timestep"`` partitions give integer training timesteps in ``[0, num_train_timesteps)``; ``"sigma"`` partitions
give EDM noise levels drawn from EDM's log-normal ``ln(sigma) ~ N(p_mean, p_std^2)`` truncated to each stage, as
float32 sigmas whose ``c_noise`` the model routes to that stage (a draw that rounds onto a boundary is moved the few
float32 steps into its stage).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .models.checks import _is_integral, positive_integer_arguments
from .partition import TimestepPartition

MEME_OWN_INTERVAL_PROBABILITIES = (0.8, 0.4, 0.2, 0.1)  # Lee et al. (AAAI 2024), clean expert first
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # Karras et al. (2022), training noise distribution


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _check_log_normal(p_mean: float, p_std: float) -> None:
    """Refuse a log-normal ``ln(sigma) ~ N(p_mean, p_std^2)`` that has no finite mean or positive spread, naming the
    argument (read by ``"sigma"`` partitions only)."""
    for name, value, positive in (("p_mean", p_mean, False), ("p_std", p_std, True)):
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not real or not math.isfinite(value) or (positive and value <= 0):
            raise ValueError(f"`{name}` must be a finite number{' > 0' if positive else ''}, got {value!r}.")


def stage_mass(partition: TimestepPartition, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD) -> list[float]:
    """Share of the usual training distribution that falls in each stage (uniform t, or EDM's log-normal sigma)."""
    if partition.units == "sigma":
        _check_log_normal(p_mean, p_std)
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
    partition: TimestepPartition,
    stage: int,
    count: int,
    generator: torch.Generator | None,
    p_mean: float,
    p_std: float,
) -> torch.Tensor:
    low, high = partition.intervals()[stage]
    if partition.units == "timestep":
        lo = math.ceil(low)
        hi = min(math.ceil(high), partition.num_train_timesteps)  # integer timesteps t with low <= t < high
        if hi <= lo:
            raise ValueError(f"Stage {stage} {partition.interval_text(stage)} holds no integer timestep; widen it.")
        return torch.randint(lo, hi, (count,), generator=generator)
    # inverse-CDF sampling of the log-normal, truncated to (low, high]
    _check_log_normal(p_mean, p_std)
    lo = 0.0 if low <= 0 else _normal_cdf((math.log(low) - p_mean) / p_std)
    hi = 1.0 if math.isinf(high) else _normal_cdf((math.log(high) - p_mean) / p_std)
    u = lo + (hi - lo) * torch.rand(count, generator=generator, dtype=torch.float64)
    u = u.clamp(1e-12, 1 - 1e-12)
    sigmas = torch.exp(p_mean + p_std * math.sqrt(2.0) * torch.special.erfinv(2 * u - 1)).float()
    # float32 rounding could carry a draw next to a boundary across it, as the model routes it
    return sigmas.clamp(*_float32_sigma_limits(partition.boundaries, stage))


@functools.lru_cache(maxsize=64)
def _float32_sigma_limits(boundaries: tuple[float, ...], stage: int) -> tuple[float, float]:
    """The smallest and largest float32 sigma that a model routes to ``stage`` of a ``"sigma"`` partition of
    ``boundaries``, from its ``c_noise = 0.25 * log(sigma)`` computed as the EDM schedulers do, also where a float32
    ``log`` accurate to one ulp (CUDA's ``logf``) rounds it the other way: each end of the stage's interval, in
    float32, moved inwards until so."""
    partition = TimestepPartition(boundaries, units="sigma")
    limits = []
    for end, inwards in zip(partition.intervals()[stage], (math.inf, 0.0)):
        sigma = torch.tensor([end], dtype=torch.float32)
        for _ in range(1024):  # a few float32 steps (about 10 |c_noise|) next to a boundary
            c_noise = 0.25 * torch.log(sigma)
            near = torch.cat([c_noise, torch.nextafter(c_noise, c_noise - 1), torch.nextafter(c_noise, c_noise + 1)])
            if set(partition.stage_for_timestep(near).tolist()) == {stage}:
                limits.append(float(sigma))
                break
            sigma = torch.nextafter(sigma, torch.full_like(sigma, inwards))
    if len(limits) < 2 or limits[0] > limits[1]:
        raise ValueError(
            f"Stage {stage} {partition.interval_text(stage)} holds no float32 sigma that routes to it; widen it."
        )
    return limits[0], limits[1]


def _shares(shares: Sequence[float]) -> list[float]:
    """``shares`` as floats (Python's, numpy's or 0-d tensors); a `ValueError` naming ``stage_shares`` for anything
    else (a string, a bool, None), where ``sum`` and ``float`` would fail on their own terms or take a bool."""
    try:
        if isinstance(shares, (str, bytes)) or any(isinstance(s, (str, bytes, bool, np.bool_)) for s in shares):
            raise TypeError  # a string's characters or a bool are not shares, even where float() takes them
        return [float(s) for s in shares]
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        raise ValueError(f"`stage_shares` must be a sequence of numbers (one per stage), got {shares!r}.") from None


def stage_counts(batch_size: int, shares: Sequence[float], generator: torch.Generator | None = None) -> list[int]:
    """Split ``batch_size`` over stages in proportion to ``shares``: at least one sample per stage (when the batch
    allows it), the remainder given to the largest fractional parts, ties broken at random. A batch smaller than the
    number of stages with a positive share draws each sample's stage at random in proportion to the shares (the
    largest fractional parts would leave the same stages out of every batch)."""
    counts = _split(batch_size, shares, lambda counts: torch.rand(len(shares), generator=generator).tolist())
    values = _shares(shares)
    if int(batch_size) >= sum(s > 0 for s in values):
        return counts
    weights = torch.tensor(values, dtype=torch.float64)
    drawn = torch.multinomial(weights, int(batch_size), replacement=True, generator=generator)
    return torch.bincount(drawn, minlength=len(values)).tolist()


def most_even_stage_counts(batch_size: int, shares: Sequence[float]) -> list[int]:
    """The split of `stage_counts` with its ties broken towards the stages that hold the fewest samples: of the
    splits it can draw, one whose largest count is the smallest (the one that padding every stage to the largest
    count, as fused decoders do, costs least)."""
    return _split(batch_size, shares, lambda counts: [-count for count in counts])


def _split(batch_size: int, shares: Sequence[float], tie_break: Callable[[list[int]], Sequence[float]]) -> list[int]:
    """`stage_counts`' split, ``tie_break(counts)`` ordering (highest first) the stages whose remainders tie, given
    the counts before the remainder is handed out."""
    (batch_size,) = positive_integer_arguments(batch_size=batch_size)
    shares = _shares(shares)
    total = float(sum(shares))
    if any(not math.isfinite(s) or s < 0 for s in shares) or total <= 0:  # nan fails no comparison
        raise ValueError(f"`stage_shares` must be finite and non-negative, with a positive sum, got {list(shares)}.")
    guaranteed = [1 if s > 0 and batch_size >= sum(x > 0 for x in shares) else 0 for s in shares]
    rest = batch_size - sum(guaranteed)
    exact = [rest * s / total for s in shares]
    counts = [g + math.floor(e) for g, e in zip(guaranteed, exact)]
    ties = tie_break(counts)
    order = sorted(range(len(shares)), key=lambda i: (exact[i] - math.floor(exact[i]), ties[i]), reverse=True)
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
    Noise levels for one training batch, stratified over the stages of ``partition`` (a batch smaller than the
    number of stages with a positive share: each sample's stage drawn at random in proportion to the shares).

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
    (batch_size,) = positive_integer_arguments(batch_size=batch_size)
    shares = stage_mass(partition, p_mean, p_std) if stage_shares is None else _shares(stage_shares)
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
    if not _is_integral(expert_index) or not 0 <= expert_index < num_stages:
        raise ValueError(f"`expert_index` must be in [0, {num_stages}), got {expert_index!r}.")
    if not _is_integral(batch_size) or batch_size < 0:
        raise ValueError(f"`batch_size` must be a non-negative integer, got {batch_size!r}.")
    expert_index, batch_size = int(expert_index), int(batch_size)
    if own_interval_probability is None:
        if num_stages != len(MEME_OWN_INTERVAL_PROBABILITIES):
            raise ValueError(
                f"`own_interval_probability` has MEME's defaults for 4 experts only; give it for {num_stages} experts."
            )
        own_interval_probability = MEME_OWN_INTERVAL_PROBABILITIES[expert_index]
    if (
        isinstance(own_interval_probability, bool)
        or not isinstance(own_interval_probability, numbers.Real)
        or not 0.0 < own_interval_probability <= 1.0
    ):
        raise ValueError(f"`own_interval_probability` must be in (0, 1], got {own_interval_probability!r}.")
    own_interval_probability = float(own_interval_probability)  # a numpy number too
    mass = stage_mass(partition, p_mean, p_std)
    # per-sample interval: own with probability p, else another in proportion to its mass
    probs = torch.tensor([m if s != expert_index else 0.0 for s, m in enumerate(mass)], dtype=torch.float64)
    probs = (1.0 - own_interval_probability) * probs / probs.sum() if probs.sum() > 0 else probs
    probs[expert_index] = own_interval_probability if num_stages > 1 else 1.0
    # an expert with no share of the batch (`--stage_shares ...,0`) draws nothing
    stages = torch.empty(0, dtype=torch.long)
    if batch_size:
        stages = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
    out = torch.empty(batch_size, dtype=torch.long if partition.units == "timestep" else torch.float32)
    for s in range(num_stages):
        idx = (stages == s).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = _draw_in_interval(partition, s, idx.numel(), generator, p_mean, p_std).to(out.dtype)
    return out


STAGE_SAMPLING = ("mixed", "per_batch", "per_rank")


def stage_sampled_timesteps(
    partition: TimestepPartition,
    batch_size: int,
    scheme: str = "mixed",
    stage_shares: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    p_mean: float = EDM_P_MEAN,
    p_std: float = EDM_P_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Noise levels for one multi-stage training batch, under one of three schemes:

    - ``"mixed"`` (default): every batch holds every stage, ``stage_shares`` of it each ([`stratified_timesteps`]);
      a batch smaller than the number of stages: each sample's stage drawn at random by ``stage_shares``.
    - ``"per_batch"``: the whole batch comes from one stage, drawn anew for each batch with probability
      ``stage_shares`` (default: the stage's mass under the usual training distribution). This is the authors' EDM
      code (``EDMMultistageLoss``: one log-normal sigma picks the stage, then the batch is drawn from the
      log-normal truncated to it).
    - ``"per_rank"``: process ``process_index`` always trains stage ``process_index % num_stages``, on timesteps
      drawn from that stage alone. This is the authors' LDM code (``choose_stage = rank % 3``, uniform timesteps in
      the stage), where every stage gets an equal share of the processes: ``num_processes`` must be a multiple of
      the number of stages, and ``stage_shares`` cannot be given.

    Args:
        partition: the stages.
        batch_size: samples in the batch.
        scheme: one of `STAGE_SAMPLING`.
        stage_shares: relative share of each stage (clean stage first), for ``"mixed"`` and ``"per_batch"``.
        generator: for reproducible draws.
        process_index, num_processes: this process's rank and the number of processes (``"per_rank"``).

    Returns:
        ``(timesteps, stages)``: noise levels in the partition's units and the stage of each.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.timestep_sampling import stage_sampled_timesteps
    >>> partition = TimestepPartition([442, 631])
    >>> _, stages = stage_sampled_timesteps(partition, 4, "per_rank", process_index=4, num_processes=6)
    >>> stages.tolist()  # rank 4 of 6 trains stage 4 % 3 = 1
    [1, 1, 1, 1]

    ```
    """
    if scheme not in STAGE_SAMPLING:
        raise ValueError(f"`stage_sampling` must be one of {STAGE_SAMPLING}, got {scheme!r}.")
    (batch_size,) = positive_integer_arguments(batch_size=batch_size)
    if scheme == "mixed":
        return stratified_timesteps(partition, batch_size, stage_shares, generator, p_mean, p_std)
    num_stages = partition.num_stages
    if scheme == "per_rank":
        if stage_shares is not None:
            raise ValueError(
                "`stage_shares` cannot be given with `stage_sampling`='per_rank': each process trains one stage."
            )
        integers = _is_integral(process_index) and _is_integral(num_processes)
        if not integers or num_processes < 1 or num_processes % num_stages or not 0 <= process_index < num_processes:
            raise ValueError(
                f"`stage_sampling`='per_rank' gives each of the {num_stages} stages an equal share of the processes: "
                f"the number of processes must be a multiple of {num_stages}, got process {process_index!r} of "
                f"{num_processes!r}."
            )
        stage = int(process_index) % num_stages
    else:
        shares = stage_mass(partition, p_mean, p_std) if stage_shares is None else _shares(stage_shares)
        if len(shares) != num_stages or any(not math.isfinite(s) or s < 0 for s in shares) or sum(shares) <= 0:
            raise ValueError(
                f"`stage_shares` needs {num_stages} non-negative values (finite) with a positive sum, got {shares}."
            )
        stage = int(torch.multinomial(torch.tensor(shares, dtype=torch.float64), 1, generator=generator))
    timesteps = _draw_in_interval(partition, stage, batch_size, generator, p_mean, p_std)
    return timesteps, torch.full((batch_size,), stage, dtype=torch.long)
