"""Zhang et al.'s optimal-denoiser clustering (CVPR 2024, Algorithm 1): the thresholded boundary rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .optimal_denoiser import check_planning_data, optimal_predictions, pixel_agreement
from .schedule import NoiseSchedule
from .stage_plan import StagePlan, _check_num_stages, _check_unit_interval, _level_at, _plan


def boundaries_from_similarity(
    similarity: Callable[[int], torch.Tensor], num_levels: int, num_stages: int, alpha: float
) -> tuple[list[float], dict[int, torch.Tensor]]:
    r"""
    Zhang et al.'s boundary rule on a grid of ``num_levels`` levels, for any number of stages.

    A stage grows from an anchor level while the mean similarity of its levels to the anchor stays ``>= alpha``:
    from the clean end, the boundary is the largest ``tau`` with ``mean_{[anchor, tau)} S(t, anchor) >= alpha``;
    from the noisy end, the smallest ``tau`` with ``mean_{[tau, anchor]} S(t, anchor) >= alpha``. With 3 stages this
    is Algorithm 1 (anchors ``t = 0`` and ``t = T``; the middle stage is what is left). With ``S`` stages,
    ``ceil((S-1)/2)`` boundaries come from the clean end and the rest from the noisy end, each new stage anchored at
    the first grid level past the previous boundary; the middle stage takes what is left, and must hold a grid level
    (stages that meet between two levels are refused, as stages that overlap are). The running mean's crossing
    of ``alpha`` is interpolated linearly between grid levels, so a boundary is not tied to the grid. Means are taken
    over the grid's levels: uniform in ``t`` for discrete schedules (the paper's setting), Karras-spaced for EDM.

    Args:
        similarity: ``anchor index -> (num_levels,)`` similarity of every level to the anchor.
        num_levels: size of the grid.
        num_stages: number of stages (>= 2).
        alpha: mean-similarity threshold in ``(0, 1]``.

    Returns:
        ``(positions, curves)``: each boundary as a fractional grid index, and the similarity curve of each anchor.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning import boundaries_from_similarity
    >>> ramp = torch.linspace(1, 0, 11, dtype=torch.float64)  # S(t, 0) falls linearly, S(t, T) rises linearly
    >>> curves = {0: ramp, 10: ramp.flip(0)}
    >>> positions, _ = boundaries_from_similarity(curves.__getitem__, 11, 3, alpha=0.8)
    >>> [round(p, 2) for p in positions]  # running mean 1 - 0.05 j crosses 0.8 at j = 4
    [4.0, 6.0]

    ```
    """
    num_stages, alpha = _check_num_stages(num_stages, num_levels), _check_unit_interval("alpha", alpha)
    num_clean = math.ceil((num_stages - 1) / 2)
    curves, positions = {}, []
    anchor = 0
    for _ in range(num_clean):  # stages 0, 1, ... grown from the clean end
        if anchor >= num_levels:
            break
        curves[anchor] = curve = similarity(anchor)
        running_mean = curve[anchor:].cumsum(0) / torch.arange(1, num_levels - anchor + 1)
        positions.append(anchor + _last_crossing(running_mean, alpha))
        anchor = math.floor(positions[-1]) + 1  # first grid level of the next stage
    noisy_positions, anchor = [], num_levels - 1
    for _ in range(num_stages - 1 - num_clean):  # stages S-1, S-2, ... grown from the noisy end
        if anchor < 0:
            break
        curves[anchor] = curve = similarity(anchor)
        running_mean = curve[: anchor + 1].flip(0).cumsum(0) / torch.arange(1, anchor + 2)
        noisy_positions.append(anchor - _last_crossing(running_mean, alpha))
        anchor = math.ceil(noisy_positions[-1]) - 1  # last grid level of the next (cleaner) stage
    positions += noisy_positions[::-1]
    inside = all(0 < p < num_levels - 1 for p in positions)
    # every stage holds a grid level (stage [a, b) holds level ceil(a) if it lies below b): stages that meet between
    # two levels leave the middle nothing the rule measured, and may round to one whole timestep
    meet = any(b <= math.ceil(a) for a, b in zip(positions, positions[1:]))
    if len(positions) != num_stages - 1 or not inside or meet:
        raise ValueError(
            f"`alpha`={alpha} leaves no room for {num_stages} stages: the stages grown from the ends of the schedule "
            f"reach the other end, or meet (boundaries at grid positions {[round(p, 2) for p in positions]} of "
            f"{num_levels} levels). Raise `alpha` or lower `eta` (tighter stages), or plan fewer `num_stages`."
        )
    return positions, curves


def _last_crossing(running_mean: torch.Tensor, alpha: float) -> float:
    """Fractional index past the last entry ``>= alpha`` where the running mean falls below ``alpha`` (linear)."""
    last = int((running_mean >= alpha).nonzero().max())  # entry 0 is the anchor itself: similarity 1
    if last + 1 >= running_mean.numel():
        return float(running_mean.numel())  # never falls below: the stage reaches the end of the grid
    above, below = float(running_mean[last]), float(running_mean[last + 1])
    return last + (above - alpha) / (above - below)


def optimal_denoiser_plan(
    data: torch.Tensor,
    schedule: NoiseSchedule,
    num_stages: int = 3,
    alpha: float = 0.9,
    eta: float = 0.1,
    num_samples: int = 128,
    generator: torch.Generator | None = None,
    target: str = "sample",
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
) -> StagePlan:
    r"""
    Zhang et al. (CVPR 2024), Algorithm 1: stage boundaries from the optimal denoiser's pixel-agreement similarity.

    The closed-form optimal denoiser on ``data`` is evaluated at every grid level on ``num_samples`` shared
    ``(x0, noise)`` draws; the similarity of two levels is the fraction of pixels where its predictions there differ
    by at most ``eta``; stages grow from the ends of the schedule while their mean similarity to the end stays
    ``>= alpha`` (see [`boundaries_from_similarity`]).

    Args:
        data (`torch.Tensor`): training images ``(N, C, H, W)`` (or ``(N, D)``), scaled as the model sees them
            (``[-1, 1]`` for pixels, scaled latents for a VAE model).
        schedule ([`NoiseSchedule`]): grid of noise levels; gives the boundaries' units.
        num_stages (`int`): number of stages (>= 2).
        alpha (`float`): mean-similarity threshold in ``(0, 1]``; higher gives tighter end stages.
        eta (`float`): pixel tolerance in ``(0, 1]``, in the data's units; higher gives looser stages. The default
            0.1 on ``[-1, 1]`` data is 6.4 times the authors' ``4/256`` (their ``2/256`` on ``[0, 1]`` data,
            `AUTHORS_ETA`); on data of another range (latents) scale it with the range.
        num_samples (`int`): Monte Carlo draws ``K``.
        generator (`torch.Generator`, *optional*): for reproducible draws.
        target (`str`): compare ``E[x0 | x_t]`` (``"sample"``, default) or ``eps*`` (``"epsilon"``); see
            [`~diffusers_stages.planning.optimal_denoiser`].
        chunk_size (`int`): training images per chunk of the streamed softmax.
        device: where the denoiser runs (CUDA when available by default).
        progress_bar (`bool`): show a tqdm bar over the grid.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning import NoiseSchedule, optimal_denoiser_plan
    >>> data = torch.rand(32, 1, 4, 4, generator=torch.manual_seed(0)) * 2 - 1
    >>> schedule = NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0), 50)
    >>> plan = optimal_denoiser_plan(data, schedule, num_stages=3, generator=torch.manual_seed(0))
    >>> plan.partition.num_stages, plan.partition.units
    (3, 'timestep')

    ```
    """
    alpha = _check_unit_interval("alpha", alpha)
    num_stages, eta = _check_num_stages(num_stages, schedule.num_levels), _check_unit_interval("eta", eta)
    predictions = _checked_predictions(
        data, schedule, num_samples, generator, target, chunk_size, device, progress_bar
    )
    positions, anchor_curves = boundaries_from_similarity(
        lambda anchor: pixel_agreement(predictions, anchor, eta), schedule.num_levels, num_stages, alpha
    )
    curves, num_clean = {}, math.ceil((num_stages - 1) / 2)
    for i, (anchor, curve) in enumerate(sorted(anchor_curves.items())):
        name = f"{schedule.units} {schedule.levels[anchor].item():g}"
        curves[f"similarity to {name}"] = curve
        curves[f"{RUNNING_MEAN} from {name}"] = _running_mean(curve, anchor, from_clean_end=i < num_clean)
    plan = _plan(schedule, "optimal_denoiser", [_level_at(schedule, p) for p in positions], curves)
    plan.alpha = float(alpha)
    return plan


RUNNING_MEAN = "mean similarity over the stage"  # the curves that are compared with `alpha` (a plot draws both)


def _running_mean(curve: torch.Tensor, anchor: int, from_clean_end: bool) -> torch.Tensor:
    """The mean of ``curve`` from ``anchor`` to each level on its stage's side (NaN on the other side): the value the
    rule compares with ``alpha``."""
    out = torch.full_like(curve, math.nan)
    if from_clean_end:
        out[anchor:] = curve[anchor:].cumsum(0) / torch.arange(1, curve.numel() - anchor + 1)
    else:
        out[: anchor + 1] = (curve[: anchor + 1].flip(0).cumsum(0) / torch.arange(1, anchor + 2)).flip(0)
    return out


def _checked_predictions(
    data, schedule, num_samples, generator, target, chunk_size, device, progress_bar
) -> torch.Tensor:
    """The optimal denoiser's predictions on the grid, after checking the data (both similarity methods check
    ``num_stages`` and ``eta`` first, with `_check_num_stages` and `_check_unit_interval`)."""
    check_planning_data(data)
    predictions, _, _ = optimal_predictions(
        data, schedule, num_samples, generator, target, chunk_size=chunk_size, device=device, progress_bar=progress_bar
    )
    return predictions
