"""Routing a denoising loop's model calls to stages: the one place where a scheduler meets a partition."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from .partition import TimestepPartition, as_levels
from .schedulers import check_scheduler_units, is_corrector_call, is_edm_scheduler  # noqa: F401  (the others' old home)


class StageRouter:
    r"""
    Picks the stage of each model call in a denoising loop from the noise level the scheduler is at.

    The value a diffusers scheduler passes to the model as ``timestep`` *is* its current noise level in the
    model's units (training timesteps mapped back from sigmas, shifts included; ``ln(sigma)/4`` for EDM), so the
    stage is looked up from that value through the partition. Second-order schedulers (Heun, KDPM2) call the model
    twice per step, and so does PLMS's first step (`PNDMScheduler` with ``skip_prk_steps=True``); the corrector call
    stays with the predictor's stage so that a pair is never split.

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
        if not isinstance(partition, TimestepPartition):
            raise ValueError(
                f"`partition` must be a TimestepPartition (e.g. TimestepPartition([442, 631])), got {partition!r}."
            )
        check_scheduler_units(scheduler, partition)
        self.partition = partition
        self.scheduler = scheduler
        self.stage: int | None = None

    def __call__(self, timestep: torch.Tensor | float, is_corrector: bool | None = None) -> int:
        """The stage of a model call at ``timestep`` (one value, or the call's timestep expanded over its batch, all in
        one stage); ``is_corrector`` says whether it is the second call of a predictor/corrector pair (``None``: read
        it from the scheduler's state now, `diffusers_stages.schedulers.is_corrector_call`)."""
        if is_corrector is None:
            is_corrector = is_corrector_call(self.scheduler)
        if self.stage is None or not is_corrector:
            levels = as_levels(timestep).reshape(-1)
            if not levels.numel():
                raise ValueError(f"`timestep` must hold at least one value, got {timestep!r}.")
            stages = self.partition.stage_for_timestep(levels)
            stages = stages.tolist() if levels.numel() == 1 else stages.unique().tolist()  # (one value: no sort)
            if len(stages) > 1:
                raise ValueError(
                    f"StageRouter picks one stage per model call, but `timestep` {timestep!r} falls in the stages "
                    f"{stages}: route a batch of several noise levels with `dispatch_by_stage`."
                )
            self.stage = int(stages[0])
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
    run_stage: Callable[[int, object], torch.Tensor],
    inputs: object,
    fuse: Callable[[list[int]], Callable[[object], torch.Tensor] | None] | None = None,
) -> torch.Tensor:
    r"""
    Run a batch through per-stage networks: the one place where a model splits a mixed batch by stage.

    ``inputs`` holds the per-sample inputs of the stages' networks (tensors whose first dimension is the batch, also
    inside dicts, lists and tuples; anything else is passed unchanged, see [`select_rows`]), and
    ``run_stage(stage, stage_inputs)`` computes ``stage``'s network on ``stage_inputs``, the rows of ``inputs``
    that belong to the stage. With ``stage_index`` given, or when every sample falls in one stage, the network runs
    once on ``inputs`` itself (no copy). Otherwise the batch is sorted by stage once (a stable sort, so each stage
    sees its samples in their order), ``inputs`` are gathered once in that order, each stage's network runs on its
    contiguous slice (a view), and the outputs are put back in order with one scatter: the cost is
    ``sum_s network_s(B_s)`` plus one gather and one scatter, whatever the number of stages. The routed path reads
    on the host the timesteps' smallest and largest value (the partition's range check) and the per-stage counts,
    whatever the number of stages; the ``stage_index`` path reads no tensor value. The routed output is on
    ``timesteps``' device, whichever device each stage's network ran on (a ``device_map`` may place them on several).

    ``inputs`` given as a list are handed over: the routing empties the list once it has gathered them, and hands
    each network a list of its own, so that a network that empties what it reads (the package's decoders do) frees
    each input as soon as the last network that reads it is done with it.

    ``fuse`` offers a fused path for mixed batches: ``fuse(counts)`` gets the number of samples of every stage (at
    least two stages hold some) and returns a callable that runs the networks of the stages present in one pass, or
    `None` to decline (then the per-stage path runs). That callable gets ``inputs`` padded to ``slots`` samples per
    present stage (``slots`` the largest count; a stage with fewer samples repeats its last one), slot-major: row
    ``slot * P + p`` holds a sample of the ``p``-th of the ``P`` present stages, so that a channel-packed pass can view
    the rows of one slot as one sample of every stage without a copy. It returns one output row per input row; the
    padding rows are dropped (see [`padded_order`]).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.routing import dispatch_by_stage
    >>> run = lambda stage, x: x + 10 * stage
    >>> dispatch_by_stage(TimestepPartition([500]), torch.tensor([900, 100, 600]), None, run, torch.arange(3.0))
    tensor([10.,  1., 12.])

    ```
    """
    if stage_index is not None:
        check_stage_index(stage_index, partition.num_stages)
        return run_stage(int(stage_index), inputs)
    # 1. the stage of every sample (after the partition's range check), and how many samples each stage holds
    stages = partition.stage_for_timestep(timesteps.reshape(-1)).to(timesteps.device)
    batch = stages.numel()
    counts = torch.bincount(stages, minlength=partition.num_stages).tolist()
    if batch in counts:
        return run_stage(counts.index(batch), inputs).to(timesteps.device)
    order = torch.argsort(stages, stable=True)
    run_fused = fuse(counts) if fuse is not None else None
    if run_fused is not None:
        # 2'. fused: every stage's rows padded to one block, one gather, one pass, one scatter of the real rows
        rows, kept = padded_order(counts)
        padded = select_rows(inputs, order[rows.to(order.device)], batch)
        if isinstance(inputs, list):
            inputs.clear()
        padded_out = run_fused(padded)
        out = padded_out.new_empty((batch, *padded_out.shape[1:]))
        out[order] = padded_out[kept.to(padded_out.device)]
        return out
    # 2. one stable sort by stage, one gather of the inputs in that order (the caller's inputs are freed then)
    ordered = select_rows(inputs, order, batch)
    if isinstance(inputs, list):
        inputs.clear()
    # 3. each stage's network on its contiguous slice; before the last one runs, only its slices hold the gathered
    # inputs, so that it frees each of them once read
    parts, start, last = [], 0, max(s for s, count in enumerate(counts) if count)
    for stage, count in enumerate(counts):
        if count:
            stage_inputs = select_rows(ordered, slice(start, start + count), batch)
            ordered = None if stage == last else ordered
            parts.append(run_stage(stage, stage_inputs))
            start += count
    # 4. one scatter back to the caller's order
    ordered_out = torch.cat([part.to(timesteps.device) for part in parts])
    out = torch.empty_like(ordered_out)
    out[order] = ordered_out
    return out


def fits_padding(counts: list[int], max_padding: float) -> bool:
    r"""
    Whether a fused pass over ``counts`` (samples per stage) adds at most ``max_padding`` of the batch in padding
    rows: every present stage is padded to the largest count (see [`padded_order`]).

    Example:

    ```py
    >>> from diffusers_stages.routing import fits_padding
    >>> fits_padding([2, 2, 2], 0.0), fits_padding([3, 0, 1], 0.25), fits_padding([3, 0, 1], 0.5)
    (True, False, True)

    ```
    """
    present = sum(1 for count in counts if count)
    return present * max(counts) <= (1 + max_padding) * sum(counts)


def padded_order(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The layout of a fused pass over the stages present in ``counts`` (samples per stage), slot-major: ``rows``, for
    each of ``max(counts)`` slots and each present stage in turn, the position of the stage's sample in the batch
    sorted by stage (a stage with fewer samples repeats its last one: real values, so that the padding computes
    nothing out of range), and ``kept``, the rows that hold a real sample, in sorted order.

    Example:

    ```py
    >>> from diffusers_stages.routing import padded_order
    >>> rows, kept = padded_order([1, 0, 3])  # slots (stage 0, stage 2): (0, 1), (0, 2), (0, 3)
    >>> rows.tolist(), kept.tolist()
    ([0, 1, 0, 2, 0, 3], [0, 1, 3, 5])

    ```
    """
    present = [count for count in counts if count]
    starts = [sum(present[:p]) for p in range(len(present))]  # where each present stage begins, sorted by stage
    rows = [start + min(slot, count - 1) for slot in range(max(present)) for start, count in zip(starts, present)]
    kept = [slot * len(present) + p for p, count in enumerate(present) for slot in range(count)]
    return torch.tensor(rows), torch.tensor(kept)


def select_rows(value, rows: torch.Tensor | slice, batch: int, _seen: dict | None = None):
    r"""
    The rows ``rows`` (indices, or a slice: then views) of every per-sample tensor in ``value``: a tensor whose
    first dimension is ``batch``, or such tensors inside dicts, lists and tuples (``added_cond_kwargs``, attention
    masks, ...); anything else unchanged. A tensor found twice is selected once, so that inputs that are one tensor
    (a U-Net's last skip and its middle input, without a middle block) stay one tensor.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.routing import select_rows
    >>> cond = {"text_embeds": torch.arange(3.0)[:, None], "scale": 0.5}
    >>> select_rows(cond, torch.tensor([0, 2]), batch=3)["text_embeds"].tolist()
    [[0.0], [2.0]]

    ```
    """
    seen = {} if _seen is None else _seen
    if isinstance(value, dict):
        return {key: select_rows(item, rows, batch, seen) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(item, rows, batch, seen) for item in value)
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        if id(value) not in seen:
            seen[id(value)] = value[rows if isinstance(rows, slice) else rows.to(value.device)]
        return seen[id(value)]
    return value
