"""What every stage-division method shares: the [`StagePlan`] it returns, the method names, and the checks and
conversions between grid positions and noise levels."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..models.checks import _is_integral
from ..partition import TimestepPartition
from .schedule import NoiseSchedule

if TYPE_CHECKING:
    from .budget import BudgetPlan

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
        alpha: the mean-similarity threshold the boundaries were drawn with (Algorithm 1 only), for plotting.
        stage_difficulty: each stage's difficulty in ``[0, 1]``, when widths were planned ([`stage_difficulty`]).
        budget: the decoder widths chosen for a FLOP budget ([`~diffusers_stages.planning.budget.BudgetPlan`]).

    Example:

    ```py
    >>> from diffusers import DDPMScheduler
    >>> from diffusers_stages.planning import StagePlan, plan_stages
    >>> plan = plan_stages(None, DDPMScheduler(), num_stages=4, method="uniform")
    >>> isinstance(plan, StagePlan), plan.partition.boundaries, plan.fractions
    (True, (250.0, 500.0, 750.0), [0.25, 0.5, 0.75])
    >>> plan.to_dict()  # what `python -m diffusers_stages.plan` prints
    {'method': 'uniform', 'stage_boundaries': [250.0, 500.0, 750.0], 'num_train_timesteps': 1000,
     'boundary_units': 'timestep', 'fractions': [0.25, 0.5, 0.75]}

    ```
    """

    partition: TimestepPartition
    method: str
    levels: torch.Tensor
    curves: dict[str, torch.Tensor] = field(default_factory=dict)
    fractions: list[float] = field(default_factory=list)
    alpha: float | None = None
    stage_difficulty: list[float] | None = None
    budget: BudgetPlan | None = None

    @property
    def decoder_block_out_channels(self) -> tuple[tuple[int, ...], ...] | None:
        """The planned widths of each stage's decoder (or expert), clean stage first; None without a budget."""
        return None if self.budget is None else self.budget.widths

    def to_dict(self) -> dict:
        """JSON-serialisable summary (what the command prints)."""
        summary = {
            "method": self.method,
            **self.partition.to_config(),
            "fractions": [round(f, 4) for f in self.fractions],
        }
        if self.stage_difficulty is not None:
            summary["stage_difficulty"] = [round(d, 4) for d in self.stage_difficulty]
        if self.budget is not None:
            summary.update(self.budget.to_dict())
        return summary


def _check_num_stages(num_stages: int, num_levels: int) -> int:
    """``num_stages`` as a Python int: an integer of any kind (numpy's too, not a bool) from 2 to the grid's size,
    ``num_levels``."""
    if not _is_integral(num_stages) or num_stages < 2:
        raise ValueError(f"`num_stages` must be an integer >= 2, got {num_stages!r}.")
    if num_stages > num_levels:
        raise ValueError(
            f"`num_stages`={num_stages} exceeds the {num_levels} noise levels of the planning grid; raise `num_levels`."
        )
    return int(num_stages)


def _check_unit_interval(name: str, value: float) -> float:
    """``value`` as a Python float: a real number of any kind (numpy's too, not a bool) in ``(0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")
    return float(value)


def _plan(schedule: NoiseSchedule, method: str, boundaries, curves: dict) -> StagePlan:
    partition = schedule.partition(boundaries)
    fractions = [schedule.fraction(b) for b in partition.boundaries]
    return StagePlan(partition, method, schedule.levels, curves, fractions)


def _level_at(schedule: NoiseSchedule, position: float) -> float:
    """The noise level at a fractional grid index (linear between grid levels; whole timesteps when discrete). A
    position past a grid level gives a boundary past it (that level stays in the cleaner stage of ``[b_{s-1}, b_s)``)
    and not past the next one, also where rounding would not (consecutive timesteps: ``t + 0.5`` gives ``t + 1``)."""
    low = min(math.floor(position), schedule.num_levels - 2)
    w = position - low
    below, above = float(schedule.levels[low]), float(schedule.levels[low + 1])
    level = (1 - w) * below + w * above
    if schedule.units != "timestep":
        return level
    rounded = float(round(level))
    return rounded if w == 0 or below < rounded <= above else min(math.floor(below) + 1.0, above)


def _interpolate(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> float:
    i = int(torch.searchsorted(xs, x).clamp(1, xs.numel() - 1))
    w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return float(ys[i - 1] + w * (ys[i] - ys[i - 1]))
