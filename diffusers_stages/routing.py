"""Routing a denoising loop's model calls to stages: the one place where a scheduler meets a partition."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from .partition import TimestepPartition
from .schedulers import check_scheduler_units, is_edm_scheduler  # noqa: F401  (their old home)


class StageRouter:
    r"""
    Picks the stage of each model call in a denoising loop from the noise level the scheduler is at.

    The value a diffusers scheduler passes to the model as ``timestep`` *is* its current noise level in the
    model's units (training timesteps mapped back from sigmas, shifts included; ``ln(sigma)/4`` for EDM), so the
    stage is looked up from that value through the partition. Second-order schedulers (Heun, KDPM2) call the model
    twice per step; the corrector call stays with the predictor's stage so that a pair is never split.

    Example:

    ```py
    >>> from diffusers import HeunDiscreteScheduler
    >>> from diffusers_stages import StageRouter, TimestepPartition
    >>> scheduler = HeunDiscreteScheduler()
    >>> scheduler.set_timesteps(4)
    >>> router = StageRouter(TimestepPartition([500]), scheduler)
    >>> router(scheduler.timesteps[0])
    1

    ```
    """

    def __init__(self, partition: TimestepPartition, scheduler):
        """Route the model calls of ``scheduler`` (checked to be in ``partition``'s units) to ``partition``'s stages."""
        check_scheduler_units(scheduler, partition)
        self.partition = partition
        self.scheduler = scheduler
        self.stage: int | None = None

    def __call__(self, timestep: torch.Tensor | float, is_corrector: bool | None = None) -> int:
        """The stage of a model call at ``timestep``; ``is_corrector`` says whether it is the second call of a
        predictor/corrector pair (``None``: read the scheduler's ``state_in_first_order`` now)."""
        if is_corrector is None:
            is_corrector = getattr(self.scheduler, "state_in_first_order", True) is False
        if self.stage is None or not is_corrector:
            self.stage = int(self.partition.stage_for_timestep(torch.as_tensor(timestep).reshape(1))[0])
        return self.stage


def check_stage_index(stage_index: int, num_stages: int) -> None:
    """A stage index must be a Python integer (not a bool, not a tensor: a stage read from a tensor would be a
    data-dependent branch) in ``[0, num_stages)``."""
    if isinstance(stage_index, bool) or not isinstance(stage_index, numbers.Integral):
        raise ValueError(f"`stage_index` must be an integer, got {stage_index!r}.")  # noqa: TRY004
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"`stage_index` must be in [0, {num_stages}), got {stage_index}.")


def dispatch_by_stage(
    partition: TimestepPartition,
    timesteps: torch.Tensor,
    stage_index: int | None,
    run_stage: Callable[[int, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    r"""
    Run a batch through per-stage networks: the one place where a model splits a mixed batch by stage.

    ``run_stage(stage, rows)`` computes the output of ``stage``'s network for the samples at ``rows`` (``None``:
    the whole batch). With ``stage_index`` given, or when every sample falls in one stage, the network runs once on
    the whole batch; otherwise each network runs only on its own samples and the outputs are scattered back in
    order, so the cost is ``sum_s network_s(B_s)``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.routing import dispatch_by_stage
    >>> x = torch.arange(3.0)
    >>> run = lambda stage, rows: (x if rows is None else x[rows]) + 10 * stage
    >>> dispatch_by_stage(TimestepPartition([500]), torch.tensor([900, 100, 600]), None, run).tolist()
    [10.0, 1.0, 12.0]

    ```
    """
    if stage_index is not None:
        check_stage_index(stage_index, partition.num_stages)
        return run_stage(int(stage_index), None)
    stages = partition.stage_for_timestep(timesteps.reshape(-1))
    if bool((stages == stages[0]).all()):
        return run_stage(int(stages[0]), None)
    stages = stages.to(timesteps.device)
    out = None
    for stage in range(partition.num_stages):
        rows = (stages == stage).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        part = run_stage(stage, rows)
        if out is None:
            out = part.new_empty((stages.numel(), *part.shape[1:]))
        out[rows] = part
    return out


def select_rows(value, rows: torch.Tensor, batch: int):
    r"""
    The rows ``rows`` of every per-sample tensor in ``value``: a tensor whose first dimension is ``batch``, or such
    tensors inside dicts, lists and tuples (``added_cond_kwargs``, attention masks, ...); anything else unchanged.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.routing import select_rows
    >>> cond = {"text_embeds": torch.arange(3.0)[:, None], "scale": 0.5}
    >>> select_rows(cond, torch.tensor([0, 2]), batch=3)["text_embeds"].tolist()
    [[0.0], [2.0]]

    ```
    """
    if isinstance(value, dict):
        return {key: select_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(item, rows, batch) for item in value)
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows.to(value.device)]
    return value
