"""Decoder widths (or expert sizes) chosen to fit a FLOP budget, capacity going where the stages are hardest.

The cost of a plan is counted, not estimated: every candidate width is built once on the ``meta`` device (no memory,
no weights) and its FLOPs are counted by `torch.utils.flop_counter` ([`~diffusers_stages.evaluation.count_flops`])
with PyTorch's math attention kernel, so attention's two matrix products are counted too (the fused CPU kernel counts
as 0 FLOPs). Two costs can be budgeted:

- sampling: the expected FLOPs of generating one image in ``num_inference_steps`` steps of a scheduler,
  ``sum_s n_s (encoder + decoder_s)``, with ``n_s`` the model calls of that run that fall in stage ``s``;
- training: the FLOPs (forward and backward) of one step of ``batch_size`` images, each stage receiving its share of
  the usual training distribution ([`~diffusers_stages.timestep_sampling.stage_mass`]).

Both count the denoiser only: for a latent model, the VAE's encoding of the training batches and decoding of the
samples are not counted.

The widths maximise ``sum_s w_s d_s log(decoder FLOPs_s)`` within the budget, with ``d_s`` the stage's difficulty
([`stage_difficulty`]) and ``w_s`` its calls per image (or its share of a training batch): each stage's decoder
FLOPs then grow in proportion to its difficulty (the continuous optimum), as the paper's rule "larger decoders near
the data end" asks, and the whole budget is spent; a harder stage never gets a smaller decoder than an easier one. The discrete choice (each stage picks one width among
``block_out_channels`` scaled by ``scales``) is solved exactly as a multiple-choice knapsack (SciPy's MILP solver).
For expert routing (``architecture="experts"``) each stage's whole model is sized the same way.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from scipy.optimize import Bounds, LinearConstraint, milp

from ..evaluation import count_flops
from ..models.checks import positive_integer_arguments
from ..partition import TimestepPartition, _numbers
from ..schedulers import check_scheduler_units, model_call_timesteps
from ..timestep_sampling import stage_mass
from .sizing import config_value, partition_to_model_config, plain_config, scaled_widths, width_multiple

ARCHITECTURES = ("multistage", "experts")
DEFAULT_SCALES = tuple(k / 8 for k in range(1, 17))  # x0.125 (the paper's smallest decoder) to x2 of the encoder


@dataclass
class BudgetPlan:
    """Widths chosen for a FLOP budget.

    Attributes:
        widths: ``block_out_channels`` of each stage's decoder (or expert), clean stage first.
        expected_flops: what they cost, in the budget's terms (sampling FLOPs per image, or training FLOPs per step).
        budget: the budget.
        stage_flops: FLOPs of one model call (or one training sample) in each stage, encoder included.
        stage_calls: model calls per image (or samples per training step) falling in each stage.
        architecture: what ``widths`` size: ``"multistage"`` (decoders; ``decoder_block_out_channels`` in
            [`to_dict`]) or ``"experts"`` (whole experts; ``expert_block_out_channels``, what ``train_experts.py
            --expert_block_out_channels`` takes).

    Example:

    ```py
    >>> from diffusers import DDIMScheduler
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.planning import BudgetPlan, widths_for_budget
    >>> config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    ...               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...               norm_num_groups=8)
    >>> plan = widths_for_budget(config, TimestepPartition([500]), difficulty=[0.8, 0.2], budget=3e7,  # per image
    ...                          num_inference_steps=4, scheduler=DDIMScheduler(), scales=(0.5, 1.0))  # of 4 steps
    >>> isinstance(plan, BudgetPlan), plan.widths, plan.stage_calls  # the harder (clean) stage keeps the full widths
    (True, ((16, 32), (8, 16)), [2.0, 2.0])
    >>> plan.expected_flops <= plan.budget
    True

    ```
    """

    widths: tuple[tuple[int, ...], ...]
    expected_flops: float
    budget: float
    stage_flops: list[float]
    stage_calls: list[float]
    architecture: str = "multistage"

    def to_dict(self) -> dict:
        """JSON-serialisable summary."""
        sized = "expert" if self.architecture == "experts" else "decoder"
        return {
            f"{sized}_block_out_channels": [list(w) for w in self.widths],
            "expected_flops": self.expected_flops,
            "budget": self.budget,
            "stage_flops": self.stage_flops,
            "stage_calls": self.stage_calls,
        }


def check_budget(budget: float, name: str = "budget") -> float:
    """``budget`` as a float: a finite positive number (a python or numpy number), else a `ValueError` naming it as
    ``name`` (``--budget`` on the command line)."""
    real = isinstance(budget, numbers.Real) and not isinstance(budget, (bool, np.bool_))
    if not real or not 0 < budget <= sys.float_info.max:  # a float holds it (not 10**400)
        raise ValueError(f"`{name}` must be a positive number of FLOPs, got {budget!r}.")
    return float(budget)


def check_budget_config(config: Mapping, name: str = "model_config") -> None:
    """Refuse a model config whose widths a budget cannot plan: a ``sample_size`` that is not a side or a
    ``[height, width]`` of positive integers (None, `UNet2DModel`'s default, takes any size, but a call's FLOPs depend
    on the size of its samples), or per-stage ``decoder_up_block_types`` (the candidate decoders all use
    ``up_block_types``), or no config at all. ``name`` is the argument the config came from."""
    if not isinstance(config, Mapping):
        raise ValueError(f"`{name}` must be a model config (a mapping) or a model, got {type(config).__name__}.")
    size = config.get("sample_size")
    pair = isinstance(size, (list, tuple))  # [height, width], else one side
    sides = list(size) if pair else [size]
    if len(sides) != (2 if pair else 1) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise ValueError(
            f"`{name}` has no usable `sample_size` (got {size!r}): the FLOPs a budget pays for depend on the size of "
            "the samples; set it to the side (or [height, width]) of the samples the model trains on (of its "
            "latents, for a latent model)."
        )
    if config.get("decoder_up_block_types") is not None:
        raise ValueError(
            f"`{name}` sets per-stage `decoder_up_block_types`={config['decoder_up_block_types']}: budget planning "
            "sizes decoders that all use `up_block_types`; remove it to plan widths."
        )


def stage_calls(
    partition: TimestepPartition,
    num_inference_steps: int | None = None,
    scheduler=None,
    batch_size: int = 1,
) -> list[float]:
    r"""
    How often each stage runs: its model calls in one sampling run of ``num_inference_steps`` steps of
    ``scheduler`` (a Heun-type corrector call counts for its predictor's stage, as the pipelines route it), or, when
    ``num_inference_steps`` is None, its expected samples in a training batch of ``batch_size``.

    Example:

    ```py
    >>> from diffusers import DDIMScheduler
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.planning.budget import stage_calls
    >>> stage_calls(TimestepPartition([442, 631]), 10, DDIMScheduler(timestep_spacing="trailing"))
    [4.0, 2.0, 4.0]

    ```
    """
    if not isinstance(partition, TimestepPartition):
        raise ValueError(f"`partition` must be a TimestepPartition, got {type(partition).__name__}.")
    if num_inference_steps is None:  # Python or numpy integers, as the package's other call arguments
        (batch_size,) = positive_integer_arguments(batch_size=batch_size)
        return [batch_size * mass for mass in stage_mass(partition)]
    (num_inference_steps,) = positive_integer_arguments(num_inference_steps=num_inference_steps)
    if scheduler is None:
        raise ValueError("`scheduler` is required with `num_inference_steps` (its steps are the ones counted).")
    if not isinstance(scheduler, SchedulerMixin):
        raise ValueError(f"`scheduler` must be a diffusers scheduler, got {type(scheduler).__name__}.")
    check_scheduler_units(scheduler, partition)
    counts, stage = [0.0] * partition.num_stages, 0
    for timestep, is_corrector in model_call_timesteps(scheduler, num_inference_steps):
        if not is_corrector:
            stage = int(partition.stage_for_timestep(torch.tensor([timestep], dtype=torch.float64))[0])
        counts[stage] += 1
    return counts


def check_budget_covers_cheapest_widths(
    budget: float,
    config: Mapping,
    num_inference_steps: int | None = None,
    scheduler: SchedulerMixin | None = None,
    batch_size: int = 1,
    architecture: str = "multistage",
    scales: Sequence[float] = DEFAULT_SCALES,
    name: str = "budget",
) -> None:
    """Refuse a ``budget`` below what the cheapest candidate widths cost, with [`widths_for_budget`]'s message
    (naming the budget ``name``). That cost depends on neither the data nor the stages (every model call of
    ``num_inference_steps`` steps of ``scheduler``, or every one of the ``batch_size`` training samples, at the
    cheapest width), so it is checked before any planning: [`plan_stages`] and the ``plan`` command call it first."""
    budget = check_budget(budget, name)
    config = getattr(config, "config", config)
    check_budget_config(config)
    if num_inference_steps is None:
        (calls,) = positive_integer_arguments(batch_size=batch_size)
    else:
        (num_inference_steps,) = positive_integer_arguments(num_inference_steps=num_inference_steps)
        if not isinstance(scheduler, SchedulerMixin):
            raise ValueError(f"`scheduler` must be a diffusers scheduler, got {type(scheduler).__name__}.")
        calls = len(model_call_timesteps(scheduler, num_inference_steps))  # each call falls in one stage
    candidates = candidate_widths(
        config_value(config, "block_out_channels"), width_multiple(config, architecture), scales
    )
    flops, _ = measure_stage_flops(config, candidates, architecture, training=num_inference_steps is None)
    _refuse_below_cheapest(budget, calls, candidates, flops, name)


def _refuse_below_cheapest(
    budget: float, calls: float, candidates: list[tuple[int, ...]], flops: list[float], name: str = "budget"
) -> None:
    """Refuse a ``budget`` below ``calls`` model calls (or training samples) at the cheapest of ``candidates``."""
    cheapest = calls * min(flops)
    if budget < cheapest:
        # the plan command has no `scales` option: its remedy names what it has
        remedy = (
            f"raise {name} or plan a narrower --model_config"
            if name.startswith("--")
            else "raise the budget or allow smaller `scales`"
        )
        raise ValueError(
            f"`{name}`={budget:.4g} FLOPs is below what the smallest allowed widths cost ({cheapest:.4g} FLOPs, "
            f"every stage at {candidates[int(np.argmin(flops))]}): {remedy}."
        )


def candidate_widths(
    block_out_channels: Sequence[int], norm_num_groups: int, scales: Sequence[float] = DEFAULT_SCALES
) -> list[tuple[int, ...]]:
    """``block_out_channels`` scaled by each of ``scales`` and rounded to positive multiples of ``norm_num_groups``
    (duplicates dropped, smallest first)."""
    values = _numbers(scales, "scales")
    if not values or not all(0 < s < math.inf for s in values):
        raise ValueError(f"`scales` must be positive numbers, got {values}.")
    return sorted({scaled_widths(block_out_channels, s, norm_num_groups) for s in values}, key=sum)


def measure_stage_flops(
    config: Mapping, widths: Sequence[Sequence[int]], architecture: str = "multistage", training: bool = False
) -> tuple[list[float], list[float]]:
    r"""
    FLOPs of one sample through each decoder (or expert) of ``widths``, counted on the ``meta`` device.

    Returns:
        ``(call_flops, capacity)``: per width, the FLOPs of one model call on one sample, encoder included (forward
        and backward when ``training``), and the forward FLOPs of the part being sized (the decoder, or the whole
        expert).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"`architecture` must be one of {ARCHITECTURES}, got {architecture!r}.")
    config = getattr(config, "config", config)
    check_budget_config(config)
    config = plain_config(config)  # the widths written over it are what is counted
    key = json.dumps(config, sort_keys=True, default=str)  # a model config is plain JSON
    widths = tuple(tuple(int(x) for x in w) for w in widths)
    try:
        calls, capacity = _measure(key, widths, architecture, training)
    except (ValueError, TypeError, RuntimeError) as error:  # torch's, for a size too large to build even on meta
        raise ValueError(
            f"`model_config` builds no model of the candidate widths {list(widths)}: {type(error).__name__}: {error}"
        ) from None
    return list(calls), list(capacity)


@functools.lru_cache(maxsize=16)
def _measure(key: str, widths: tuple, architecture: str, training: bool) -> tuple[tuple[float, ...], ...]:
    """[`measure_stage_flops`] on a config given as its JSON text (cached: planning and costing reuse it)."""
    from diffusers import UNet2DModel

    from ..models.unet_multistage import MultiStageUNet2DModel

    config = json.loads(key)
    with torch.device("meta"), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        if architecture == "experts":
            models = [UNet2DModel.from_config({**config, "block_out_channels": w}) for w in widths]
            stages = [None] * len(widths)
        else:  # one model whose stages hold every candidate decoder (at least two stages)
            both = widths if len(widths) > 1 else widths * 2
            planned = partition_to_model_config(config, TimestepPartition.uniform(len(both)), both)
            models, stages = [MultiStageUNet2DModel.from_config(planned)] * len(widths), list(range(len(widths)))
        inputs = _example_inputs(models[0])
        counted = [_count_call(model, inputs, stage, training) for model, stage in zip(models, stages)]
    return tuple(call for call, _ in counted), tuple(capacity for _, capacity in counted)


def _count_call(model: torch.nn.Module, inputs: tuple, stage: int | None, training: bool) -> tuple[float, float]:
    """``(FLOPs of one call, forward FLOPs of the sized part)`` of ``model`` (at ``stage``'s decoder, if any)."""
    kwargs = {} if stage is None else {"stage_index": stage}
    forward, _ = count_flops(lambda: model(*inputs, **kwargs))
    encoder = 0 if stage is None else count_flops(lambda: model.encode(*inputs))[0]  # shared: not sized
    call = count_flops(lambda: model(*inputs, **kwargs).sample.sum().backward())[0] if training else forward
    return float(call), float(forward - encoder)


def _example_inputs(model: torch.nn.Module) -> tuple:
    """One sample, one timestep and (for class-conditional models) one class label, on the model's device."""
    size = model.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    sample = torch.zeros(1, model.config.in_channels, *size)
    labels = torch.zeros(1, dtype=torch.long) if getattr(model, "class_embedding", None) is not None else None
    return sample, torch.zeros(1), labels


def expected_flops(
    config: Mapping,
    partition: TimestepPartition,
    widths: Sequence[Sequence[int]],
    num_inference_steps: int | None = None,
    scheduler: SchedulerMixin | None = None,
    batch_size: int = 1,
    architecture: str = "multistage",
) -> float:
    """What ``widths`` (one per stage, clean stage first) cost: sampling FLOPs per image of ``num_inference_steps``
    steps of ``scheduler``, or, when ``num_inference_steps`` is None, training FLOPs per step of ``batch_size``."""
    calls = stage_calls(partition, num_inference_steps, scheduler, batch_size)
    if len(widths) != partition.num_stages:
        raise ValueError(f"`widths` needs one entry per stage ({partition.num_stages}), got {len(widths)}.")
    flops, _ = measure_stage_flops(config, widths, architecture, training=num_inference_steps is None)
    return float(sum(n * f for n, f in zip(calls, flops)))


def widths_for_budget(
    config: Mapping,
    partition: TimestepPartition,
    difficulty: Sequence[float],
    budget: float,
    num_inference_steps: int | None = None,
    scheduler: SchedulerMixin | None = None,
    batch_size: int = 1,
    architecture: str = "multistage",
    scales: Sequence[float] = DEFAULT_SCALES,
) -> BudgetPlan:
    r"""
    Each stage's decoder widths (or, with ``architecture="experts"``, each expert's ``block_out_channels``) such
    that the expected cost stays within ``budget`` FLOPs, capacity going where ``difficulty`` is highest (see the
    module docstring for the objective).

    Args:
        config: the model config (a `UNet2DModel` or `MultiStageUNet2DModel` config, or a model); its
            ``block_out_channels`` are the encoder's, which ``scales`` multiply.
        partition: the stages.
        difficulty: one finite value ``>= 0`` per stage, not all 0 ([`stage_difficulty`]); only their ratios count.
        budget: FLOPs: per image of ``num_inference_steps`` sampling steps of ``scheduler``, or (when
            ``num_inference_steps`` is None) per training step of ``batch_size`` images.
        scales: the widths each stage may take, as multiples of ``block_out_channels`` (rounded to multiples of
            ``norm_num_groups``).

    Example:

    ```py
    >>> from diffusers import DDIMScheduler
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.planning.budget import expected_flops, widths_for_budget
    >>> config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    ...               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...               norm_num_groups=8)
    >>> partition, scheduler = TimestepPartition([442, 631]), DDIMScheduler(timestep_spacing="trailing")
    >>> baseline = expected_flops(config, partition, [(16, 32)] * 3, 10, scheduler)  # = the UNet2DModel's FLOPs
    >>> plan = widths_for_budget(config, partition, [0.9, 0.4, 0.05], baseline, 10, scheduler)
    >>> plan.widths, plan.expected_flops <= baseline
    (((16, 40), (16, 40), (8, 16)), True)

    ```
    """
    budget = check_budget(budget)
    config = getattr(config, "config", config)
    check_budget_config(config)
    calls = stage_calls(partition, num_inference_steps, scheduler, batch_size)
    difficulty = _numbers(difficulty, "difficulty")
    if (
        len(difficulty) != partition.num_stages
        or not all(0 <= d < math.inf for d in difficulty)
        or max(difficulty) <= 0
    ):
        raise ValueError(
            f"`difficulty` needs one finite value >= 0 per stage ({partition.num_stages}), not all 0, got "
            f"{difficulty}."
        )
    candidates = candidate_widths(
        config_value(config, "block_out_channels"), width_multiple(config, architecture), scales
    )
    flops, capacity = measure_stage_flops(config, candidates, architecture, training=num_inference_steps is None)
    _refuse_below_cheapest(budget, sum(calls), candidates, flops)
    weights = [n * d / max(difficulty) for n, d in zip(calls, difficulty)]  # only ratios count (1e308 * n: inf)
    picks = _multiple_choice_knapsack(weights, difficulty, calls, flops, capacity, budget)
    return BudgetPlan(
        tuple(candidates[k] for k in picks),
        float(sum(n * flops[k] for n, k in zip(calls, picks))),
        float(budget),
        [flops[k] for k in picks],
        calls,
        architecture,
    )


def _multiple_choice_knapsack(
    weights: list[float],
    difficulty: list[float],
    calls: list[float],
    flops: list[float],
    capacity: list[float],
    budget: float,
) -> list[int]:
    """One candidate per stage maximising ``sum_s weights_s log(capacity_k)`` with ``sum_s calls_s flops_k <=
    budget``, exactly (MILP), a harder stage never getting less capacity than an easier one (a stage run less often
    would otherwise soak up what is left of the budget); among equal values the cheaper choice wins (unused stages
    take the smallest width)."""
    num_stages, num_candidates = len(weights), len(flops)
    log_capacity = np.log(np.maximum(np.asarray(capacity), 1.0))
    cost = np.outer(calls, flops)  # (stage, candidate) FLOPs of that choice
    # 1. maximise the weighted log-capacity (milp minimises; weights scaled to at most 1, the tie-break's scale), with
    # a tie-break that favours the cheaper choice, and the narrower one in a stage no call reaches (it costs nothing)
    weights = np.asarray(weights) / (max(weights) or 1.0)
    objective = -np.outer(weights, log_capacity) + 1e-9 * (cost / budget + np.asarray(flops) / max(flops))
    # 2. one candidate per stage, the budget, and capacity ordered as difficulty is
    one_each = np.kron(np.eye(num_stages), np.ones(num_candidates))
    order = [
        np.kron(np.eye(num_stages)[a] - np.eye(num_stages)[b], log_capacity)
        for a in range(num_stages)
        for b in range(num_stages)
        if difficulty[a] > difficulty[b]
    ]
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(cost.reshape(1, -1), -np.inf, budget * (1 + 1e-12)),
    ]
    if order:
        constraints.append(LinearConstraint(np.stack(order), -1e-9, np.inf))
    # 3. the solver's tolerances may let a choice a few FLOPs over the budget through: each one is cut off (that
    # choice alone) and the problem solved again, until the choice's exact cost is within the budget
    while True:
        result = milp(objective.ravel(), constraints=constraints, integrality=np.ones(cost.size), bounds=Bounds(0, 1))
        if not result.success:
            raise ValueError(f"No widths fit the budget {budget:.4g} FLOPs: {result.message}")
        picks = [int(k) for k in result.x.reshape(num_stages, num_candidates).argmax(1)]
        if sum(cost[s, k] for s, k in enumerate(picks)) <= budget:
            return picks
        chosen = np.zeros(cost.shape)
        chosen[range(num_stages), picks] = 1
        constraints.append(LinearConstraint(chosen.reshape(1, -1), -np.inf, num_stages - 1))
