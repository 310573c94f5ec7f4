"""Stage-division methods: Zhang et al.'s optimal-denoiser clustering (Algorithm 1) and its baselines.

Every method returns a [`StagePlan`]: a [`TimestepPartition`] in the schedule's own units, plus the curves it was
derived from (for plotting and inspection).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix
from tqdm.auto import tqdm

from ..partition import TimestepPartition
from .optimal_denoiser import check_planning_data, optimal_predictions, pixel_agreement, similarity_matrix
from .schedule import NoiseSchedule

METHODS = ("optimal_denoiser", "ilp", "uniform", "snr", "snr_clustering", "gradient")
AUTHORS_ETA = 4 / 256  # the authors' pixel threshold, 2/256 on [0, 1] data, on the [-1, 1] data planned on here


@dataclass
class StagePlan:
    """The result of stage planning.

    Attributes:
        partition: the stage boundaries, in the schedule's units.
        method: the method that produced them.
        levels: the grid of noise levels the curves are sampled on.
        curves: named curves over ``levels`` (similarities, log-SNR, loss, ...), for plotting.
        fractions: each boundary's position on the schedule in [0, 1] (``t / T``, or by log-sigma).
    """

    partition: TimestepPartition
    method: str
    levels: torch.Tensor
    curves: dict[str, torch.Tensor] = field(default_factory=dict)
    fractions: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (what the command prints)."""
        return {
            "method": self.method,
            **self.partition.to_config(),
            "fractions": [round(f, 4) for f in self.fractions],
        }


def _check_num_stages(num_stages: int, schedule: NoiseSchedule) -> None:
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 2:
        raise ValueError(f"`num_stages` must be an integer >= 2, got {num_stages!r}.")
    if num_stages > schedule.num_levels:
        raise ValueError(
            f"`num_stages`={num_stages} exceeds the {schedule.num_levels} noise levels of the planning grid; "
            "raise `num_levels`."
        )


def _check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")


def _plan(schedule: NoiseSchedule, method: str, boundaries, curves: dict) -> StagePlan:
    partition = schedule.partition(boundaries)
    fractions = [schedule.fraction(b) for b in partition.boundaries]
    return StagePlan(partition, method, schedule.levels, curves, fractions)


# ----------------------------------------------------------------------------------------------------------------
# optimal-denoiser clustering
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
    the first grid level past the previous boundary; the middle stage takes what is left. The running mean's crossing
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
    if len(positions) != num_stages - 1 or not inside or any(b <= a for a, b in zip(positions, positions[1:])):
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


def _level_at(schedule: NoiseSchedule, position: float) -> float:
    """The noise level at a fractional grid index (linear between grid levels; whole timesteps when discrete)."""
    low = min(math.floor(position), schedule.num_levels - 2)
    w = position - low
    level = (1 - w) * float(schedule.levels[low]) + w * float(schedule.levels[low + 1])
    return float(round(level)) if schedule.units == "timestep" else level


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
    _check_unit_interval("alpha", alpha)
    predictions = _checked_predictions(
        data, schedule, num_stages, eta, num_samples, generator, target, chunk_size, device, progress_bar
    )
    positions, anchor_curves = boundaries_from_similarity(
        lambda anchor: pixel_agreement(predictions, anchor, eta), schedule.num_levels, num_stages, alpha
    )
    curves = {
        f"similarity to {schedule.units} {schedule.levels[a].item():g}": c for a, c in sorted(anchor_curves.items())
    }
    return _plan(schedule, "optimal_denoiser", [_level_at(schedule, p) for p in positions], curves)


def _checked_predictions(
    data, schedule, num_stages, eta, num_samples, generator, target, chunk_size, device, progress_bar
) -> torch.Tensor:
    """The optimal denoiser's predictions on the grid, after checking the arguments both similarity methods share."""
    _check_num_stages(num_stages, schedule)
    _check_unit_interval("eta", eta)
    check_planning_data(data)
    predictions, _, _ = optimal_predictions(
        data, schedule, num_samples, generator, target, chunk_size=chunk_size, device=device, progress_bar=progress_bar
    )
    return predictions


def ilp_boundaries(similarity: torch.Tensor, num_stages: int, min_levels: int = 1) -> list[int]:
    r"""
    The boundary program of Zhang et al.'s public code (``interval_split/analysis/solver.py``, solved there with
    Gurobi), solved exactly with SciPy's open MILP solver (HiGHS): split the ``n`` grid levels into ``num_stages``
    contiguous, non-empty stages maximising the sum over stages of the mean pairwise similarity inside the stage,

        max  sum_k (1 / n_k^2) sum_{i, j in stage k} S[i, j].

    The authors state it with per-level stage labels (quadratic, with a ``1 / n_k^2`` variable); since stages are
    contiguous it is linear in a choice of labelled intervals, which is what is solved here (see the comments). A
    stage of a single level scores ``S[i, i] = 1``, the most a stage can, so the program favours a one-level stage
    where similarity falls fast, as the authors' does; ``min_levels`` (not in the authors' program) rules that out.

    Args:
        similarity: ``(n, n)`` similarity of every pair of grid levels ([`similarity_matrix`]).
        num_stages: number of stages (``2 <= num_stages``, ``num_stages * min_levels <= n``).
        min_levels: fewest grid levels per stage (1: the authors' program).

    Returns:
        The index of the first level of every stage after the first.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning.methods import ilp_boundaries
    >>> groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    >>> ilp_boundaries((groups[:, None] == groups[None]).double(), 3)
    [3, 5]

    ```
    """
    n = similarity.shape[0]
    if similarity.ndim != 2 or similarity.shape[1] != n:
        raise ValueError(f"`similarity` must be a square matrix, got shape {tuple(similarity.shape)}.")
    if not 2 <= num_stages or min_levels < 1 or num_stages * min_levels > n:
        raise ValueError(
            f"`num_stages`={num_stages} stages of at least `min_levels`={min_levels} levels do not fit {n} levels."
        )
    # 1. the value of every candidate stage [a, b) of the grid: the mean of S over its pairs (2-D prefix sums); this
    #    linearises the authors' product of stage labels and 1 / n_k
    prefix = torch.nn.functional.pad(similarity.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    value = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    a, b = torch.triu_indices(n + 1, n + 1, offset=min_levels)
    value[a, b] = (prefix[b, b] - prefix[a, b] - prefix[b, a] + prefix[a, a]) / (b - a).double() ** 2
    # 2. one binary variable per (stage k, interval [a, b)) that can hold it (room for the stages before and after):
    #    the authors' label interval[i] = k on the levels a <= i < b
    arcs = [
        (k, a[fit], b[fit])
        for k in range(num_stages)
        if (fit := (a >= k * min_levels) & (b <= n - (num_stages - 1 - k) * min_levels)).any()
    ]
    stage = torch.cat([torch.full_like(first, k) for k, first, _ in arcs])
    first, end = torch.cat([x for _, x, _ in arcs]), torch.cat([x for _, _, x in arcs])
    # 3. contiguity and order (labels start at 1, end at num_stages, step by 0 or 1) as a path through the layered
    #    graph of nodes (k, i) = "stage k starts at level i": stage k's interval [a, b) leads from (k, a) to
    #    (k + 1, b); one unit of flow from (0, 0) to (num_stages, n). The constraint matrix is a network matrix
    #    (totally unimodular), so the linear relaxation is already integral and HiGHS solves it at the root.
    count, nodes = first.numel(), (num_stages + 1) * (n + 1)
    tail, head = (stage * (n + 1) + first).numpy(), ((stage + 1) * (n + 1) + end).numpy()
    columns = np.arange(count)
    flow = coo_matrix(
        (np.r_[np.ones(count), -np.ones(count)], (np.r_[tail, head], np.r_[columns, columns])), shape=(nodes, count)
    )
    balance = np.zeros(nodes)
    balance[0], balance[-1] = 1.0, -1.0
    # 4. maximise the total value (milp minimises) over binary choices
    result = milp(
        -value[first, end].numpy(),
        constraints=LinearConstraint(flow.tocsr(), balance, balance),
        integrality=np.ones(count),
        bounds=Bounds(0, 1),
        options={"presolve": False},  # presolve only slows down a problem whose relaxation is integral
    )
    if not result.success:
        raise ValueError(
            f"The stage program found no solution for {num_stages} stages of {n} levels: {result.message}"
        )
    return sorted(int(first[i]) for i in np.flatnonzero(result.x > 0.5))[1:]


def ilp_plan(
    data: torch.Tensor,
    schedule: NoiseSchedule,
    num_stages: int = 3,
    eta: float = 0.1,
    num_samples: int = 128,
    generator: torch.Generator | None = None,
    target: str = "sample",
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
    min_levels: int = 1,
) -> StagePlan:
    r"""
    Stage boundaries as the authors' code chooses them: the optimal denoiser's pixel-agreement similarity between
    every pair of grid levels ([`similarity_matrix`]), split by their integer program ([`ilp_boundaries`]) instead
    of the thresholded rule of [`optimal_denoiser_plan`] (no ``alpha``). A boundary sits half-way between the last
    level of a stage and the first of the next, as the authors place it.

    ``eta`` is in the data's units: pass `AUTHORS_ETA` (``4/256`` on ``[-1, 1]`` data) for the authors' threshold.
    ``min_levels`` is [`ilp_boundaries`]'s; the other arguments are [`optimal_denoiser_plan`]'s.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning import NoiseSchedule
    >>> from diffusers_stages.planning.methods import ilp_plan
    >>> data = torch.rand(32, 1, 4, 4, generator=torch.manual_seed(0)) * 2 - 1
    >>> schedule = NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0), 21)
    >>> plan = ilp_plan(data, schedule, num_stages=3, generator=torch.manual_seed(0))
    >>> plan.method, plan.partition.num_stages
    ('ilp', 3)

    ```
    """
    predictions = _checked_predictions(
        data, schedule, num_stages, eta, num_samples, generator, target, chunk_size, device, progress_bar
    )
    similarity = similarity_matrix(predictions, eta)
    cuts = ilp_boundaries(similarity, num_stages, min_levels)
    curves = {
        f"similarity to {schedule.units} {schedule.levels[a].item():g}": similarity[a]
        for a in (0, schedule.num_levels - 1)
    }
    return _plan(schedule, "ilp", [_level_at(schedule, c - 0.5) for c in cuts], curves)


# ----------------------------------------------------------------------------------------------------------------
# baselines
def uniform_plan(schedule: NoiseSchedule, num_stages: int = 3) -> StagePlan:
    """Equal-length stages: equal shares of the training timesteps, or of log-sigma for EDM schedules."""
    _check_num_stages(num_stages, schedule)
    if schedule.units == "timestep":
        boundaries = TimestepPartition.uniform(num_stages, schedule.num_train_timesteps).boundaries
    else:
        log_sigma = torch.linspace(
            schedule.levels[0].log(), schedule.levels[-1].log(), num_stages + 1, dtype=torch.float64
        )
        boundaries = log_sigma[1:-1].exp().tolist()
    return _plan(schedule, "uniform", boundaries, {})


def snr_plan(schedule: NoiseSchedule, num_stages: int = 3) -> StagePlan:
    """Equal spacing in log-SNR, ``log(a^2 / s^2)``, between the two ends of the schedule."""
    _check_num_stages(num_stages, schedule)
    log_snr = schedule.log_snr()
    targets = torch.linspace(float(log_snr[0]), float(log_snr[-1]), num_stages + 1, dtype=torch.float64)[1:-1]
    # log-SNR decreases along the grid: interpolate the level at each target (linear between grid points)
    boundaries = [_interpolate(-log_snr, schedule.levels, -target) for target in targets]
    return _plan(schedule, "snr", boundaries, {"log-SNR": log_snr})


def snr_clustering_plan(schedule: NoiseSchedule, num_stages: int = 3) -> StagePlan:
    """The "SNR" baseline of Zhang et al. (Table 4): Go et al.'s [`interval_clustering`] of the grid with affinity
    ``-|log-SNR(t) - log-SNR(t')|``. On DDPM's linear schedule with every timestep on the grid it gives 0.347 / 0.708
    of T; the paper reports 0.348 / 0.709."""
    _check_num_stages(num_stages, schedule)
    log_snr = schedule.log_snr()
    cuts = interval_clustering(-(log_snr[:, None] - log_snr[None]).abs(), num_stages)
    return _plan(schedule, "snr_clustering", schedule.levels[cuts], {"log-SNR": log_snr})


def _interpolate(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> float:
    i = int(torch.searchsorted(xs, x).clamp(1, xs.numel() - 1))
    w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return float(ys[i - 1] + w * (ys[i] - ys[i - 1]))


def interval_clustering(affinity: torch.Tensor, num_clusters: int) -> list[int]:
    r"""
    Split ``n`` ordered items into ``num_clusters`` contiguous intervals maximising the affinity of each item to its
    interval's centre (middle item), by dynamic programming, with interval sizes in ``[n/(2k), 3n/(2k)]`` (the
    timestep clustering of Go et al., NeurIPS 2023, that Zhang et al. use as the "gradient" baseline).

    Returns the index of the first item of each interval after the first.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning.methods import interval_clustering
    >>> groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    >>> interval_clustering((groups[:, None] == groups[None]).double(), 3)
    [3, 6]

    ```
    """
    n, k = affinity.shape[0], num_clusters
    low, high = max(1, math.floor(n / (2 * k))), math.ceil(3 * n / (2 * k))
    # prefix sums: the affinity of items i..j-1 to a centre c is prefix[c, j] - prefix[c, i]
    prefix = torch.cat([torch.zeros(n, 1, dtype=torch.float64), affinity.double().cumsum(1)], dim=1)
    best = torch.full((k + 1, n + 1), math.inf, dtype=torch.float64)
    best[0, 0] = 0.0
    start = torch.zeros((k + 1, n + 1), dtype=torch.long)
    for c in range(1, k + 1):
        for j in range(c * low, n + 1):
            starts = torch.arange(max(0, j - high), j - low + 1)  # every admissible first item of the last interval
            centres = (starts + j - 1) // 2
            values = best[c - 1, starts] - (prefix[centres, j] - prefix[centres, starts])
            pick = int(values.argmin())
            best[c, j], start[c, j] = values[pick], starts[pick]
    if not math.isfinite(best[k, n]):
        raise ValueError(f"{n} items cannot be split into {k} intervals of {low} to {high} items.")
    cuts, j = [], n
    for c in range(k, 1, -1):
        j = int(start[c, j])
        cuts.append(j)
    return cuts[::-1]


def gradient_affinity(
    model: torch.nn.Module,
    data: torch.Tensor,
    schedule: NoiseSchedule,
    level_indices: list[int],
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
) -> torch.Tensor:
    """Cosine similarity of the model's loss gradients (w.r.t. its parameters) between noise levels, on one fixed
    batch and one fixed noise (Go et al., NeurIPS 2023). ``model(sample, timestep).sample`` predicts the noise for
    ``"timestep"`` schedules and EDM's preconditioned ``F`` for ``"sigma"`` schedules."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    clean = data.to(device=device, dtype=params[0].dtype)
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(device)
    grads = []
    for g in tqdm(level_indices, desc="loss gradients", disable=not progress_bar):
        a, s = float(schedule.signal_scale[g]), float(schedule.noise_scale[g])
        noisy = a * clean + s * noise
        batch = torch.full((clean.shape[0],), float(schedule.levels[g]), device=device)
        if schedule.units == "timestep":
            loss = torch.mean((model(noisy, batch.long()).sample - noise) ** 2)
        else:  # EDM preconditioning (Karras et al. 2022, table 1) and its loss weight 1 / c_out^2
            sd = schedule.sigma_data
            c_in, c_skip = 1 / math.sqrt(s**2 + sd**2), sd**2 / (s**2 + sd**2)
            c_out = s * sd / math.sqrt(s**2 + sd**2)
            denoised = c_skip * noisy + c_out * model(c_in * noisy, batch.log() / 4).sample
            loss = torch.mean((denoised - clean) ** 2) / c_out**2
        # parameters a level does not reach (another stage's decoder) get a zero gradient
        grad = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for p, x in zip(params, grad)]))
    grads = torch.nn.functional.normalize(torch.stack(grads).double().cpu(), dim=1)
    return grads @ grads.T


def gradient_plan(
    schedule: NoiseSchedule,
    num_stages: int = 3,
    model: torch.nn.Module | None = None,
    data: torch.Tensor | None = None,
    num_gradient_levels: int = 50,
    batch_size: int = 64,
    num_samples: int = 128,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
) -> StagePlan:
    r"""
    Loss-gradient-based boundaries, in one of two documented forms:

    - with a trained ``model``: the "gradient" baseline of Zhang et al. (Table 4), Go et al.'s timestep clustering:
      the cosine affinity of the model's parameter gradients between ``num_gradient_levels`` noise levels, on a fixed
      batch of ``batch_size`` images from ``data``, split into contiguous stages by [`interval_clustering`].
      Memory: ``num_gradient_levels x num_parameters`` float64 on the CPU.
    - without a model (a network-free proxy): the loss curve ``L(t) = E||eps*_t(x_t) - eps||^2 / D`` of the optimal
      denoiser on ``data``, with boundaries splitting its total variation ``int |dL/dt| dt`` into equal shares (each
      stage sees the same amount of change in the loss).
    """
    _check_num_stages(num_stages, schedule)
    if data is None:
        raise ValueError("`data` is required by the 'gradient' method (the training images).")
    check_planning_data(data)
    if model is not None:
        picks = torch.randperm(data.shape[0], generator=generator)[:batch_size]
        grid = torch.linspace(0, schedule.num_levels - 1, min(num_gradient_levels, schedule.num_levels)).round().long()
        grid = grid.unique().tolist()
        if len(grid) < 2 * num_stages:
            raise ValueError(f"`num_gradient_levels`={num_gradient_levels} is too small for {num_stages} stages.")
        affinity = gradient_affinity(model, data[picks], schedule, grid, generator, progress_bar)
        cuts = interval_clustering(affinity, num_stages)
        boundaries = schedule.levels[[grid[c] for c in cuts]]
        curves = {"gradient affinity to the clean end": _on_grid(affinity[0], grid, schedule)}
        curves["gradient affinity to the noisy end"] = _on_grid(affinity[-1], grid, schedule)
        return _plan(schedule, "gradient", boundaries, curves)
    predictions, _, noise = optimal_predictions(
        data,
        schedule,
        num_samples,
        generator,
        "epsilon",
        chunk_size=chunk_size,
        device=device,
        progress_bar=progress_bar,
    )
    loss = ((predictions - noise) ** 2).mean(dim=(1, 2)).double()
    variation = torch.cat([torch.zeros(1, dtype=torch.float64), (loss[1:] - loss[:-1]).abs().cumsum(0)])
    if variation[-1] <= 0:
        raise ValueError("The optimal denoiser's loss is flat over the schedule (e.g. a single training image).")
    targets = variation[-1] * torch.arange(1, num_stages, dtype=torch.float64) / num_stages
    cuts = torch.searchsorted(variation, targets).clamp(1, schedule.num_levels - 1)
    if len(cuts.unique()) != num_stages - 1:
        raise ValueError(f"The loss curve changes in too few levels for {num_stages} stages; raise `num_levels`.")
    return _plan(schedule, "gradient", schedule.levels[cuts], {"optimal denoiser loss": loss})


def _on_grid(values: torch.Tensor, grid: list[int], schedule: NoiseSchedule) -> torch.Tensor:
    """Values given on a sub-grid, linearly interpolated to every level of the schedule (for plotting)."""
    sub = schedule.levels[grid]
    return torch.tensor([_interpolate(sub, values, level) for level in schedule.levels], dtype=torch.float64)
