"""`plan_stages`: one entry point for every stage-division method (and for decoder widths under a FLOP budget)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.checks import _is_integral, positive_integer_arguments
from ..schedulers import check_scheduler_units, model_call_timesteps
from .budget import check_budget, check_budget_config, check_budget_covers_cheapest_widths, widths_for_budget
from .methods import (
    METHODS,
    StagePlan,
    gradient_plan,
    ilp_plan,
    optimal_denoiser_plan,
    snr_clustering_plan,
    snr_plan,
    uniform_plan,
)
from .schedule import NoiseSchedule
from .sizing import config_value, stage_difficulty


def plan_stages(
    data: torch.Tensor | None,
    schedule: NoiseSchedule | SchedulerMixin,
    num_stages: int = 3,
    method: str = "optimal_denoiser",
    alpha: float = 0.9,
    eta: float = 0.1,
    num_samples: int = 128,
    num_levels: int = 100,
    generator: torch.Generator | None = None,
    model: torch.nn.Module | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
    *,
    budget: float | None = None,
    model_config: Mapping | None = None,
    num_inference_steps: int | None = None,
    sampling_scheduler: SchedulerMixin | None = None,
    batch_size: int = 1,
    architecture: str = "multistage",
) -> StagePlan:
    r"""
    Stage boundaries for a data set and a noise schedule, as a [`StagePlan`] whose ``partition`` is in the schedule's
    own units (training timesteps for DDPM-style schedules, sigmas for EDM).

    Args:
        data (`torch.Tensor`): training images ``(N, C, H, W)`` (or ``(N, D)``), floating point, scaled as the model
            sees them (``[-1, 1]``), at least two different ones; anything else is refused before planning (see
            [`~diffusers_stages.planning.optimal_denoiser.check_planning_data`]). Not used by ``"uniform"``,
            ``"snr"`` and ``"snr_clustering"``.
        schedule: a [`NoiseSchedule`], or a diffusers scheduler (``alphas_cumprod`` or EDM) turned into one with
            ``num_levels`` levels.
        num_stages (`int`): number of stages (>= 2).
        method (`str`): ``"optimal_denoiser"`` (Zhang et al., Algorithm 1, thresholded rule), ``"ilp"`` (the same
            similarity split by the integer program of the authors' code, [`ilp_plan`]), ``"uniform"``, ``"snr"``
            (equal log-SNR spacing), ``"snr_clustering"`` (the paper's SNR baseline, [`snr_clustering_plan`]) or
            ``"gradient"`` (see [`gradient_plan`]).
        alpha, eta (`float`): thresholds of the optimal-denoiser method, both in ``(0, 1]`` (``"ilp"`` takes
            ``eta`` only). ``eta`` is a pixel tolerance in the data's units: the default 0.1 on ``[-1, 1]`` data is
            6.4 times the authors' ``4/256`` (``2/256`` on ``[0, 1]``, `methods.AUTHORS_ETA`).
        num_samples (`int`): Monte Carlo draws ``K`` (optimal-denoiser and gradient-without-model methods).
        num_levels (`int`): grid size when ``schedule`` is a scheduler.
        generator (`torch.Generator`, *optional*): for reproducible draws.
        model (`torch.nn.Module`, *optional*): a trained denoiser for the ``"gradient"`` method (refused with the
            others, which would ignore it).
        chunk_size (`int`): training images per chunk of the streamed optimal denoiser.
        device: where the optimal denoiser runs (CUDA when available by default).
        progress_bar (`bool`): show tqdm progress bars.
        budget (`float`, *optional*): a FLOP budget: also choose each stage's decoder widths (with
            ``architecture="experts"``, each expert's ``block_out_channels``) so that their expected cost stays within
            it, capacity going to the stages of highest [`stage_difficulty`]
            ([`~diffusers_stages.planning.budget.widths_for_budget`]); the result's ``decoder_block_out_channels``
            go into the model config with [`partition_to_model_config`]. Needs ``data`` and ``model_config``. The
            budget counts the denoiser (the model of ``model_config``) only: for a latent model, the VAE's encoding
            of the training batches and decoding of the samples are not counted.
        model_config (`Mapping`, *optional*): the model whose widths are planned (its ``block_out_channels`` are
            the encoder's), for ``budget``: a model of ``data``'s samples (``in_channels`` and ``sample_size``).
        num_inference_steps (`int`, *optional*): the budget is the sampling FLOPs per image of this many steps of
            ``sampling_scheduler`` (default: ``schedule`` when it is a diffusers scheduler); None: the budget is the
            training FLOPs (forward and backward) of one step of ``batch_size`` images.
        sampling_scheduler (`SchedulerMixin`, *optional*): the scheduler whose ``num_inference_steps`` are counted.
        batch_size (`int`): the training batch a budget without ``num_inference_steps`` pays for.
        architecture (`str`): ``"multistage"`` (a shared encoder, one decoder per stage) or ``"experts"``.
            ``model_config``, ``num_inference_steps``, ``sampling_scheduler``, ``batch_size`` and ``architecture``
            are read with a ``budget`` only, and ``sampling_scheduler`` only with ``num_inference_steps``,
            ``batch_size`` only without it: given otherwise, they are refused (they would be ignored).

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDPMScheduler
    >>> from diffusers_stages.planning import plan_stages
    >>> plan = plan_stages(None, DDPMScheduler(), num_stages=3, method="snr_clustering")
    >>> plan.partition  # Zhang et al. report 0.348 / 0.709 of T for this baseline on CIFAR-10's schedule
    TimestepPartition(boundaries=[353.0, 716.0], num_train_timesteps=1000, units='timestep')

    ```
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if not isinstance(schedule, (NoiseSchedule, SchedulerMixin)):
        raise ValueError(
            f"`schedule` must be a NoiseSchedule or a diffusers scheduler, got {type(schedule).__name__}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__} (for a seed, pass "
            "`torch.Generator().manual_seed(seed)`)."
        )
    if model is not None and method != "gradient":  # it would be ignored
        raise ValueError(
            f"`model` is read by the 'gradient' method only, not {method!r}: drop it or use method='gradient'."
        )
    _check_budget_options(budget, model_config, num_inference_steps, sampling_scheduler, batch_size, architecture)
    if budget is not None:  # before the (long) planning: what the widths will need
        _check_budget_arguments(data, budget, model_config, num_inference_steps, sampling_scheduler, schedule)
        num_inference_steps, batch_size = positive_integer_arguments(  # Python or numpy integers
            ("num_inference_steps",), num_inference_steps=num_inference_steps, batch_size=batch_size
        )
        sampling_scheduler = schedule if sampling_scheduler is None and num_inference_steps else sampling_scheduler
        if num_inference_steps is not None:  # a step count the scheduler can run (the budget's own count)
            if not isinstance(sampling_scheduler, SchedulerMixin):
                name = type(sampling_scheduler).__name__
                raise ValueError(f"`sampling_scheduler` must be a diffusers scheduler, got {name}.")
            model_call_timesteps(sampling_scheduler, num_inference_steps)
            # and whose timesteps are in the schedule's units (a partition of the grid's units stands for the plan's)
            grid = (
                schedule if isinstance(schedule, NoiseSchedule) else NoiseSchedule.from_scheduler(schedule, num_levels)
            )
            check_scheduler_units(sampling_scheduler, grid.partition([float(grid.levels[grid.num_levels // 2])]))
        # what the cheapest widths cost depends on neither the data nor the stages: a budget below it is refused now
        check_budget_covers_cheapest_widths(
            budget, model_config, num_inference_steps, sampling_scheduler, batch_size, architecture
        )
    if not isinstance(schedule, NoiseSchedule):
        schedule = NoiseSchedule.from_scheduler(schedule, num_levels)
    plan = _boundaries(
        data, schedule, num_stages, method, alpha, eta, num_samples, generator, model, chunk_size, device, progress_bar
    )
    if budget is not None:
        plan.stage_difficulty = stage_difficulty(data, schedule, plan.partition)
        plan.budget = widths_for_budget(
            model_config,
            plan.partition,
            plan.stage_difficulty,
            budget,
            num_inference_steps,
            sampling_scheduler,
            batch_size,
            architecture,
        )
    return plan


def _check_budget_options(budget, model_config, num_inference_steps, sampling_scheduler, batch_size, architecture):
    """Refuse the budget arguments that would be ignored: any of them without a ``budget`` (no widths are planned),
    a ``sampling_scheduler`` without ``num_inference_steps`` (the budget is then training FLOPs) and a ``batch_size``
    with it (the budget is then sampling FLOPs per image)."""
    default_batch = _is_integral(batch_size) and batch_size == 1  # a Python or numpy 1
    if budget is None:
        given = {
            "model_config": model_config is not None,
            "num_inference_steps": num_inference_steps is not None,
            "sampling_scheduler": sampling_scheduler is not None,
            "batch_size": not default_batch,
            "architecture": architecture != "multistage",
        }
        values = {"model_config": type(model_config).__name__, "num_inference_steps": repr(num_inference_steps),
                  "sampling_scheduler": type(sampling_scheduler).__name__, "batch_size": repr(batch_size),
                  "architecture": repr(architecture)}  # fmt: skip
        for name in (name for name, is_given in given.items() if is_given):
            raise ValueError(
                f"`{name}` is read with a `budget` only (it says what the budget pays for or sizes), got {values[name]} "
                "without one: give `budget` too, or drop it."
            )
    elif num_inference_steps is None and sampling_scheduler is not None:
        raise ValueError(
            "`sampling_scheduler` is the scheduler whose sampling steps `budget` counts: give `num_inference_steps` "
            "too (without it the budget is the training FLOPs of one step of `batch_size` images)."
        )
    elif num_inference_steps is not None and not default_batch:
        raise ValueError(
            f"`batch_size` {batch_size!r} is the training batch a budget without `num_inference_steps` pays for; "
            f"with `num_inference_steps`={num_inference_steps!r} the budget is the sampling FLOPs per image: drop one."
        )


def _check_budget_arguments(data, budget, model_config, num_inference_steps, sampling_scheduler, schedule) -> None:
    check_budget(budget)
    if model_config is None:
        raise ValueError("`budget` needs `model_config`: the model whose decoder widths are planned.")
    check_budget_config(getattr(model_config, "config", model_config))
    if data is None:
        raise ValueError("`budget` needs `data` (the training images): the stages' difficulty is measured on them.")
    if num_inference_steps and sampling_scheduler is None and isinstance(schedule, NoiseSchedule):
        raise ValueError(
            "`num_inference_steps` needs `sampling_scheduler` (whose steps are counted) when `schedule` is a "
            "NoiseSchedule rather than a diffusers scheduler."
        )
    _check_model_takes_data(getattr(model_config, "config", model_config), data)


def _check_model_takes_data(config: Mapping, data) -> None:
    """Refuse a budget's model config whose samples (``in_channels`` x ``sample_size``) are not those of ``data``
    (``(N, C, H, W)``, or flattened ``(N, D)``): the widths would be planned, and their FLOPs counted, for a model
    that does not take the data the stages are measured on. Data of another kind is left to the planning checks."""
    if not torch.is_tensor(data) or data.ndim not in (2, 4):
        return
    channels, size = config_value(config, "in_channels"), config.get("sample_size")  # a usable size: checked before
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if data.ndim == 4:
        fits = tuple(data.shape[1:]) == (channels, height, width)
        held = f"{data.shape[1]}-channel samples of size {tuple(data.shape[2:])}"
    else:
        fits, held = data.shape[1] == channels * height * width, f"samples of {data.shape[1]} values"
    if not fits:
        raise ValueError(
            f"`model_config` takes {channels}-channel samples of size {(height, width)} "
            f"({channels * height * width} values), but `data` holds {held}: the widths would be planned, and their "
            "FLOPs counted, for other samples than the data the stages are measured on. Give the config of the model "
            "trained on `data` (of a latent model, with `data` its latents)."
        )


def _boundaries(
    data, schedule, num_stages, method, alpha, eta, num_samples, generator, model, chunk_size, device, progress_bar
) -> StagePlan:
    """The stage boundaries by ``method``."""
    if method == "uniform":
        return uniform_plan(schedule, num_stages)
    if method == "snr":
        return snr_plan(schedule, num_stages)
    if method == "snr_clustering":
        return snr_clustering_plan(schedule, num_stages)
    if data is None:
        raise ValueError(f"`data` (the training images) is required by the {method!r} method.")
    if method == "gradient":
        return gradient_plan(
            schedule,
            num_stages,
            model,
            data,
            num_samples=num_samples,
            generator=generator,
            chunk_size=chunk_size,
            device=device,
            progress_bar=progress_bar,
        )
    # the two optimal-denoiser methods: the same similarity, split by the paper's rule or by the authors' program
    streaming = {"chunk_size": chunk_size, "device": device, "progress_bar": progress_bar}
    if method == "ilp":
        return ilp_plan(data, schedule, num_stages, eta, num_samples, generator, **streaming)
    return optimal_denoiser_plan(data, schedule, num_stages, alpha, eta, num_samples, generator, **streaming)
