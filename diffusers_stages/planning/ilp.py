"""The boundary program of Zhang et al.'s public code, solved exactly (a longest path, by dynamic programming)."""

from __future__ import annotations

import torch

from ..models.checks import _is_integral, positive_integer_arguments
from .clustering import _checked_predictions
from .optimal_denoiser import similarity_matrix
from .schedule import NoiseSchedule
from .stage_plan import StagePlan, _check_num_stages, _check_unit_interval, _level_at, _plan


def ilp_boundaries(similarity: torch.Tensor, num_stages: int, min_levels: int = 1) -> list[int]:
    r"""
    The boundary program of Zhang et al.'s public code (``interval_split/analysis/solver.py``, solved there with
    Gurobi), solved exactly without a solver: split the ``n`` grid levels into ``num_stages``
    contiguous, non-empty stages maximising the sum over stages of the mean pairwise similarity inside the stage,

        max  sum_k (1 / n_k^2) sum_{i, j in stage k} S[i, j].

    The authors state it with per-level stage labels (quadratic, with a ``1 / n_k^2`` variable); since stages are
    contiguous it is a choice of labelled intervals that chain from the first level to the last, i.e. a longest path
    through a layered graph, which dynamic programming finds exactly in ``O(num_stages n^2)`` (see the comments). A
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
    num_stages, min_levels = _check_stages_fit(num_stages, min_levels, n)
    # 1. the value of every candidate stage [a, b) of the grid: the mean of S over its pairs (2-D prefix sums); this
    #    linearises the authors' product of stage labels and 1 / n_k
    prefix = torch.nn.functional.pad(similarity.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    value = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    a, b = torch.triu_indices(n + 1, n + 1, offset=min_levels)
    value[a, b] = (prefix[b, b] - prefix[a, b] - prefix[b, a] + prefix[a, a]) / (b - a).double() ** 2
    # 2. the authors' labels (interval[i] = k on the levels a <= i < b) as a path through the layered graph of nodes
    #    (k, b) = "stages 0..k-1 cover levels [0, b)": stage k's interval [a, b) leads from (k, a) to (k + 1, b), and
    #    the best split is the longest path from (0, 0) to (num_stages, n), found exactly layer by layer (dynamic
    #    programming: O(num_stages n^2), where a MILP over the same arcs took 18 s at 300 levels and minutes at 1000)
    arcs = torch.full_like(value, -torch.inf)
    arcs[a, b] = value[a, b]  # intervals of at least `min_levels` levels
    best = torch.full((n + 1,), -torch.inf, dtype=torch.float64)
    best[0] = 0.0
    starts = []
    for _ in range(num_stages):
        best, start = (best[:, None] + arcs).max(dim=0)  # for every end b: the best start a of the next stage
        starts.append(start)
    # 3. follow the best path back from the end of the grid (ties: the first maximum, so the result is deterministic)
    cuts, end = [], n
    for start in reversed(starts):
        end = int(start[end])
        cuts.append(end)
    return sorted(cuts)[1:]


def _check_stages_fit(num_stages: int, min_levels: int, num_levels: int) -> tuple[int, int]:
    """``num_stages`` (an integer >= 2) and ``min_levels`` (a positive integer) as Python ints, when that many stages
    of that many levels fit ``num_levels`` grid levels."""
    if not _is_integral(num_stages) or num_stages < 2:
        raise ValueError(f"`num_stages` must be an integer >= 2, got {num_stages!r}.")
    (min_levels,) = positive_integer_arguments(min_levels=min_levels)
    if num_stages * min_levels > num_levels:
        raise ValueError(
            f"`num_stages`={num_stages} stages of at least `min_levels`={min_levels} levels do not fit {num_levels} "
            "levels."
        )
    return int(num_stages), min_levels


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
    num_stages, eta = _check_num_stages(num_stages, schedule.num_levels), _check_unit_interval("eta", eta)
    _check_stages_fit(num_stages, min_levels, schedule.num_levels)  # before the (long) optimal denoiser
    predictions = _checked_predictions(
        data, schedule, num_samples, generator, target, chunk_size, device, progress_bar
    )
    similarity = similarity_matrix(predictions, eta)
    cuts = ilp_boundaries(similarity, num_stages, min_levels)
    curves = {
        f"similarity to {schedule.units} {schedule.levels[a].item():g}": similarity[a]
        for a in (0, schedule.num_levels - 1)
    }
    return _plan(schedule, "ilp", [_level_at(schedule, c - 0.5) for c in cuts], curves)
