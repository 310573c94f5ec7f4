"""What the package knows about diffusers schedulers, in one place (RESEARCH.md section 3).

Schedulers differ in the units of their timesteps (integer training timesteps, fractional ones, ``ln(sigma)/4`` for
EDM), in what they expect the model to predict, in the keyword arguments their ``step`` takes, and in how many model
calls a step makes (Heun and KDPM2 call the model twice). The pipelines, the stage routing and the dual-backbone
switch read all of that through the functions below.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .partition import TimestepPartition

# arguments of `scheduler.step` that the sampling loop passes itself
_LOOP_STEP_ARGUMENTS = ("model_output", "timestep", "sample", "return_dict", "generator", "eta")


def is_edm_scheduler(scheduler) -> bool:
    """EDM schedulers (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`) condition on ``ln(sigma)/4``."""
    return hasattr(scheduler, "precondition_noise")


def scheduler_prediction_type(scheduler) -> str:
    """What a scheduler expects the model to predict (flow-matching schedulers: the velocity)."""
    return getattr(scheduler.config, "prediction_type", None) or "flow_prediction"


def scheduler_units(scheduler) -> str:
    """The units a partition must be in to route this scheduler's model calls: ``"sigma"`` (EDM) or ``"timestep"``."""
    return "sigma" if is_edm_scheduler(scheduler) else "timestep"


def check_scheduler_units(scheduler, partition: TimestepPartition) -> None:
    """Refuse a scheduler whose timesteps are not in the partition's units (RESEARCH.md section 3)."""
    edm = is_edm_scheduler(scheduler)
    if edm and partition.units != "sigma":
        raise ValueError(
            f"`scheduler` {type(scheduler).__name__} conditions the model on c_noise = ln(sigma)/4, but the stage "
            f"boundaries are in {partition.units!r} units: use a model with `boundary_units='sigma'` (EDM-style), or "
            "a DDPM-style scheduler."
        )
    if not edm and partition.units == "sigma":
        raise ValueError(
            f"The stage boundaries are in 'sigma' units (an EDM-style model), but `scheduler` "
            f"{type(scheduler).__name__} is not an EDM scheduler: use EDMEulerScheduler or EDMDPMSolverMultistepScheduler."
        )
    train_steps = getattr(scheduler.config, "num_train_timesteps", None)
    if partition.units == "timestep" and train_steps is not None and train_steps != partition.num_train_timesteps:
        raise ValueError(
            f"`scheduler` has num_train_timesteps={train_steps}, but the stage boundaries are for a "
            f"{partition.num_train_timesteps}-step schedule."
        )


def fresh_scheduler(scheduler):
    """A new scheduler of the same class and config, in its initial state (no timesteps set, no model history)."""
    return type(scheduler).from_config(scheduler.config)


def step_parameters(scheduler) -> frozenset[str]:
    """The keyword arguments ``scheduler.step`` takes (its signature, read once per scheduler class)."""
    return _step_parameters(type(scheduler))


@functools.cache
def _step_parameters(scheduler_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(scheduler_class.step).parameters) - {"self"}


def scheduler_step_kwargs(
    scheduler,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    r"""
    The keyword arguments for ``scheduler.step`` beside ``(model_output, timestep, sample)``.

    ``generator`` is passed where the step takes one (stochastic samplers) and dropped otherwise, as diffusers'
    pipelines do. ``eta`` (DDIM's noise weight) and the ``extra`` arguments are the caller's explicit choice: a
    scheduler whose ``step`` does not take one of them is a `ValueError` rather than a silent no-op.

    Example:

    ```py
    >>> from diffusers import DDIMScheduler, DDPMScheduler
    >>> from diffusers_stages.schedulers import scheduler_step_kwargs
    >>> scheduler_step_kwargs(DDIMScheduler(), eta=0.5)
    {'generator': None, 'eta': 0.5}
    >>> scheduler_step_kwargs(DDPMScheduler(), eta=0.5)
    Traceback (most recent call last):
    ...
    ValueError: `eta`=0.5 needs a scheduler whose `step` takes `eta` (DDIMScheduler does), but DDPMScheduler's does not.

    ```
    """
    accepted = step_parameters(scheduler)
    kwargs = {"generator": generator} if "generator" in accepted else {}
    name = type(scheduler).__name__
    if eta is not None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"`eta` must be a finite number >= 0, got {eta!r}.")
        if "eta" not in accepted:
            raise ValueError(
                f"`eta`={eta} needs a scheduler whose `step` takes `eta` (DDIMScheduler does), but {name}'s does not."
            )
        kwargs["eta"] = float(eta)
    for key, value in (extra or {}).items():
        if key in _LOOP_STEP_ARGUMENTS:
            raise ValueError(f"`scheduler_step_kwargs` may not set {key!r}: the pipeline passes it itself.")
        if key not in accepted:
            raise ValueError(
                f"`scheduler_step_kwargs` has {key!r}, which {name}.step does not take; it takes "
                f"{sorted(accepted - set(_LOOP_STEP_ARGUMENTS))}."
            )
        kwargs[key] = value
    return kwargs


def model_call_timesteps(scheduler, num_inference_steps: int) -> list[tuple[float, bool]]:
    r"""
    ``(timestep, is_corrector)`` of every model call a run of ``num_inference_steps`` makes, in order: a dry run of a
    fresh copy of ``scheduler`` (no model is called; ``scheduler`` itself is left as it is). ``is_corrector`` marks
    the second call of a Heun-type predictor/corrector pair (``state_in_first_order`` false), which must stay with
    its predictor's network.

    Example:

    ```py
    >>> from diffusers import HeunDiscreteScheduler
    >>> from diffusers_stages.schedulers import model_call_timesteps
    >>> [(round(t), corrector) for t, corrector in model_call_timesteps(HeunDiscreteScheduler(), 2)]
    [(999, False), (0, True), (0, False)]

    ```
    """
    scheduler = fresh_scheduler(scheduler)
    scheduler.set_timesteps(num_inference_steps)
    if not hasattr(scheduler, "state_in_first_order"):  # one model call per listed timestep: no dry steps needed
        return [(float(t), False) for t in scheduler.timesteps]
    sample = torch.zeros(1, 1, 2, 2)
    step_kwargs = scheduler_step_kwargs(scheduler, generator=torch.Generator().manual_seed(0))
    calls = []
    for t in scheduler.timesteps:
        calls.append((float(t), getattr(scheduler, "state_in_first_order", True) is False))
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(sample, t)  # some schedulers track this call
        sample = scheduler.step(torch.zeros_like(sample), t, sample, **step_kwargs).prev_sample
    return calls


def sigma_to_timestep(scheduler, sigma: float) -> float:
    """The (fractional) training timestep whose noise level is ``sigma``, from the scheduler's ``alphas_cumprod``."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"`switch_sigma` needs a scheduler with a training noise schedule (`alphas_cumprod`); "
            f"{type(scheduler).__name__} has none: give `switch_timestep` or `switch_step_fraction` instead."
        )
    log_sigmas = np.log(((1 - alphas_cumprod) / alphas_cumprod).double().sqrt().numpy())
    if not log_sigmas[0] < math.log(sigma) < log_sigmas[-1]:
        raise ValueError(
            f"`switch_sigma` must lie inside the training schedule's noise levels "
            f"({math.exp(log_sigmas[0]):.4g}, {math.exp(log_sigmas[-1]):.4g}), got {sigma}."
        )
    return float(np.interp(math.log(sigma), log_sigmas, np.arange(len(log_sigmas))))
