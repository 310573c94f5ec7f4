"""What the package knows about diffusers schedulers, in one place (RESEARCH.md section 3).

Schedulers differ in the units of their timesteps (integer training timesteps, fractional ones, ``ln(sigma)/4`` for
EDM), in what they expect the model to predict, in the keyword arguments their ``step`` takes, and in how many model
calls a step makes (Heun and KDPM2 call the model twice). The pipelines, the stage routing and the dual-backbone
switch read all of that through the functions below.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import DPMSolverSinglestepScheduler, PNDMScheduler
from diffusers.configuration_utils import register_to_config

from .models.checks import positive_integer_arguments
from .partition import cleaner_stage_boundary

if TYPE_CHECKING:
    from .partition import TimestepPartition

# arguments of `scheduler.step` that the sampling loop passes itself
_LOOP_STEP_ARGUMENTS = ("model_output", "timestep", "sample", "return_dict", "generator", "eta")


def is_edm_scheduler(scheduler) -> bool:
    """EDM schedulers (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`) condition on ``ln(sigma)/4``."""
    return hasattr(scheduler, "precondition_noise")


# the scheduler options that set what a model learns: the training noise schedule (DDPM betas, EDM's sigma_data that
# weights and preconditions its loss) and the prediction type; the others (`timestep_spacing`, `steps_offset`,
# `clip_sample`, the sampler's class, ...) only change how it samples
TRAINING_SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
    "prediction_type", "sigma_data",
)  # fmt: skip


def training_schedule_differences(scheduler, other) -> list[str]:
    """The `TRAINING_SCHEDULE_KEYS` on which two schedulers' configs differ (none: a model trained with one was
    trained with the other's schedule, whatever their classes and sampling options)."""
    return [k for k in TRAINING_SCHEDULE_KEYS if _training_option(scheduler, k) != _training_option(other, k)]


# what a scheduler that does not take the option trains on (PNDM, LMS, Heun... never rescale the betas)
_TRAINING_DEFAULTS = {"rescale_betas_zero_snr": False}


def _training_option(scheduler, key: str):
    return scheduler.config.get(key, _TRAINING_DEFAULTS.get(key))


# schedulers of other model families, whose model timesteps are in no partition's units (training timesteps, or
# sigma as EDM's ln(sigma)/4), by class name (KarrasVeScheduler's module is deprecated: not imported here)
UNSUPPORTED_SCHEDULERS = {
    "CMStochasticIterativeScheduler": "consistency models: it conditions the model on 250 ln(sigma)",
    "SCMScheduler": "sCM consistency models: it conditions the model on TrigFlow times arctan(sigma / sigma_data)",
    "ScoreSdeVeScheduler": "variance-exploding score models (NCSN): it conditions the model on sigma itself",
    "KarrasVeScheduler": "variance-exploding score models: it conditions the model on sigma itself",
    "IPNDMScheduler": "models of its own sin^2 schedule: it conditions the model on a time t in [0, 1]",
    "DDPMWuerstchenScheduler": "Wuerstchen's cosine schedule: it conditions the model on a ratio r in [0, 1]",
    "MiniMaxH3Scheduler": "MiniMax-H3's rectified flow: it conditions the model on t = 1 - sigma in [0, 1] (1: clean)",
    # an EDM-style scheduler (it has `precondition_noise`), but its c_noise is atan(sigma) 2/pi, not ln(sigma)/4
    "CosineDPMSolverMultistepScheduler": "Stable Audio's cosine schedule: it conditions the model on atan(sigma) 2/pi",
    # discrete-token models: their steps unmask or resample token indices, not denoise a continuous sample
    "AmusedScheduler": "masked image tokens (aMUSEd): it conditions the model on token masks, not a noise level",
    "VQDiffusionScheduler": "discrete tokens (VQ-Diffusion): its steps resample token indices from class probabilities",
    "DiscreteDDIMScheduler": "discrete tokens (uniform corruption): its steps resample token indices from logits",
    "EntropyBoundScheduler": "discrete tokens (uniform corruption): its steps resample token indices from logits",
    "BlockRefinementScheduler": "discrete tokens refined block by block: its steps commit token indices by confidence",
}


def check_scheduler_supported(scheduler) -> None:
    """Refuse a scheduler of another model family (`UNSUPPORTED_SCHEDULERS`): its model timesteps are in no
    partition's units, and its model output is not a DDPM- or EDM-style prediction; and a flow-matching scheduler
    with ``invert_sigmas=True``, whose timesteps run from the noisy end at 0."""
    for cls in type(scheduler).__mro__:
        if cls.__name__ in UNSUPPORTED_SCHEDULERS:
            raise ValueError(
                f"`scheduler` {type(scheduler).__name__} samples {UNSUPPORTED_SCHEDULERS[cls.__name__]}, which no "
                "stage boundaries are in (training timesteps, or sigma as EDM's ln(sigma)/4): use a DDPM-style "
                "scheduler (DDIMScheduler, EulerDiscreteScheduler, ...) or, for an EDM-style model, EDMEulerScheduler "
                "or EDMDPMSolverMultistepScheduler."
            )
    if scheduler.config.get("invert_sigmas"):  # a flow-matching scheduler set up for Mochi's reversed timesteps
        name = type(scheduler).__name__
        raise ValueError(
            f"`scheduler` {name} has invert_sigmas=True (Mochi's convention): it conditions the model on "
            "num_train_timesteps * (1 - sigma), 0 at the noisy end, which the stage boundaries (noise levels) would "
            f"route backwards: use `{name}.from_config(scheduler.config, invert_sigmas=False)`."
        )


# what a DDPM-style model predicts (the training scripts' `--prediction_type`); a flow-matching one predicts the velocity
DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION = "flow_prediction"


@functools.cache
def _takes_prediction_type(scheduler_class: type) -> bool:
    return "prediction_type" in inspect.signature(scheduler_class.__init__).parameters


def is_flow_matching_scheduler(scheduler) -> bool:
    """Whether ``scheduler`` samples a flow-matching (rectified flow) schedule, ``x_t = (1 - sigma) x_0 + sigma noise``:
    a class without a ``prediction_type`` option or a DDPM noise schedule (`FlowMatchEulerDiscreteScheduler`,
    `FlowMatchHeunDiscreteScheduler`, ...), or a DDPM-style solver with ``use_flow_sigmas=True`` (DPM-Solver, UniPC,
    DEIS, SA-Solver)."""
    if scheduler.config.get("use_flow_sigmas"):
        return True
    return not _takes_prediction_type(type(scheduler)) and getattr(scheduler, "alphas_cumprod", None) is None


def scheduler_prediction_type(scheduler) -> str:
    """What a scheduler expects the model to predict: its ``prediction_type`` option, or, for a flow-matching scheduler
    without one, the velocity (``"flow_prediction"``; a ``prediction_type`` its config carries over from the scheduler
    it was built from with ``from_config`` is ignored by its step, and here); a DDPM-style scheduler without the
    option (`RePaintScheduler`) predicts the noise."""
    check_scheduler_supported(scheduler)
    if _takes_prediction_type(type(scheduler)):
        return scheduler.config.prediction_type
    return FLOW_PREDICTION if is_flow_matching_scheduler(scheduler) else "epsilon"


def check_prediction_type(scheduler, model_prediction_type: str | None = None, model: str = "the model") -> None:
    r"""
    Refuse, before sampling, a scheduler that cannot sample the model: a flow-matching scheduler
    (`is_flow_matching_scheduler`) for a model that predicts ``epsilon``, ``v_prediction`` or ``sample``, or a
    DDPM-style one for a model that predicts the velocity, which diffusers samples into garbage images without an
    error. What the model predicts is ``model_prediction_type`` where the model says it (`ExpertRoutingModel`), and
    otherwise what the scheduler's config says, as in diffusers, where the scheduler carries the prediction type:
    ``FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)`` keeps the model's ``prediction_type`` in its
    config, which its step ignores. A `ValueError` names the scheduler's class and the prediction types (``model``:
    what the message calls the model, e.g. ``"the experts"``).

    Example:

    ```py
    >>> from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    >>> from diffusers_stages.schedulers import check_prediction_type
    >>> check_prediction_type(DDIMScheduler(prediction_type="v_prediction"), "v_prediction")
    >>> check_prediction_type(FlowMatchEulerDiscreteScheduler.from_config(DDIMScheduler(prediction_type="epsilon").config))
    Traceback (most recent call last):
    ...
    ValueError: `scheduler` FlowMatchEulerDiscreteScheduler steps with a velocity (flow_prediction), but its config has prediction_type='epsilon' (carried over by `from_config` from the scheduler it replaced): a model that predicts 'epsilon' needs a DDPM-style scheduler, e.g. `DDIMScheduler.from_config(scheduler.config)`.

    ```
    """
    name = type(scheduler).__name__
    expected = scheduler_prediction_type(scheduler)
    flow = is_flow_matching_scheduler(scheduler)
    if model_prediction_type is not None and model_prediction_type != expected:
        if model_prediction_type == FLOW_PREDICTION:  # no DDPM-style scheduler steps with a velocity
            fix = "use a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)"
        elif not _takes_prediction_type(type(scheduler)):  # flow matching: velocity only, no option to change it
            fix = f"{name} takes no `prediction_type`: use e.g. `DDIMScheduler(prediction_type={model_prediction_type!r})`"
        else:
            fix = f"build the scheduler with `prediction_type={model_prediction_type!r}`"
        verb = "predict" if model.endswith("s") else "predicts"
        raise ValueError(
            f"`scheduler` {name} has prediction_type={expected!r}, but {model} {verb} {model_prediction_type!r}: {fix}."
        )
    carried = scheduler.config.get("prediction_type")  # a key of the config it was built from, for a FlowMatch class
    if flow and expected == FLOW_PREDICTION and carried in DDPM_PREDICTION_TYPES:
        raise ValueError(
            f"`scheduler` {name} steps with a velocity (flow_prediction), but its config has prediction_type="
            f"{carried!r} (carried over by `from_config` from the scheduler it replaced): a model that predicts "
            f"{carried!r} needs a DDPM-style scheduler, e.g. `DDIMScheduler.from_config(scheduler.config)`."
        )
    if flow and expected != FLOW_PREDICTION:  # use_flow_sigmas with a DDPM-style prediction
        raise ValueError(
            f"`scheduler` {name} has use_flow_sigmas=True (a flow-matching noise schedule) but prediction_type="
            f"{expected!r}, which a DDPM-style model predicts on other noise levels: build it with "
            "`use_flow_sigmas=False` for a DDPM-style model, or `prediction_type='flow_prediction'` for a flow one."
        )
    if not flow and expected == FLOW_PREDICTION:
        raise ValueError(
            f"`scheduler` {name} has prediction_type='flow_prediction' (a velocity) but samples DDPM noise levels: "
            "build it with `use_flow_sigmas=True` for a flow-matching model (DPM-Solver, UniPC, DEIS and SA-Solver "
            "take it), or with the DDPM-style model's `prediction_type`."
        )


def has_continuous_timesteps(scheduler) -> bool:
    """`EulerDiscreteScheduler` with ``timestep_type="continuous"`` and v-prediction (CosXL-style models) passes the
    model ``0.25 ln(sigma)``, EDM's ``c_noise``, instead of training timesteps."""
    config = scheduler.config
    return getattr(config, "timestep_type", None) == "continuous" and config.get("prediction_type") == "v_prediction"


def scheduler_units(scheduler) -> str:
    """The units a partition must be in to route this scheduler's model calls: ``"sigma"`` (the schedulers that pass
    ``c_noise = ln(sigma)/4``: EDM's, continuous-timestep Euler) or ``"timestep"``."""
    check_scheduler_supported(scheduler)
    return "sigma" if is_edm_scheduler(scheduler) or has_continuous_timesteps(scheduler) else "timestep"


def check_scheduler_units(scheduler, partition: TimestepPartition) -> None:
    """Refuse a scheduler whose timesteps are not in the partition's units (RESEARCH.md section 3)."""
    edm = scheduler_units(scheduler) == "sigma"
    if edm and partition.units != "sigma":
        other = "`timestep_type='discrete'`" if has_continuous_timesteps(scheduler) else "a DDPM-style scheduler"
        raise ValueError(
            f"`scheduler` {type(scheduler).__name__} conditions the model on c_noise = ln(sigma)/4, but the stage "
            f"boundaries are in {partition.units!r} units: use a model with `boundary_units='sigma'` (EDM-style), or "
            f"{other}."
        )
    if not edm and partition.units == "sigma":
        raise ValueError(
            f"The stage boundaries are in 'sigma' units (an EDM-style model), but `scheduler` "
            f"{type(scheduler).__name__} is not an EDM scheduler: use EDMEulerScheduler or EDMDPMSolverMultistepScheduler."
        )
    train_steps = getattr(scheduler.config, "num_train_timesteps", None)
    if partition.units == "timestep" and train_steps is not None and train_steps != partition.num_train_timesteps:
        name = type(scheduler).__name__
        raise ValueError(
            f"`scheduler` {name} has num_train_timesteps={train_steps}, but the stage boundaries are for a "
            f"{partition.num_train_timesteps}-step schedule: build it with "
            f"`{name}.from_config(scheduler.config, num_train_timesteps={partition.num_train_timesteps})`."
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
        # any real number, numpy's too (a bool is not one)
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"`eta` must be a finite number >= 0, got {eta!r}.")
        if "eta" not in accepted:
            raise ValueError(
                f"`eta`={eta} needs a scheduler whose `step` takes `eta` (DDIMScheduler does), but {name}'s does not."
            )
        kwargs["eta"] = float(eta)
    if extra is not None and not isinstance(extra, Mapping):
        raise ValueError(f"`scheduler_step_kwargs` must be a dict of `{name}.step` arguments, got {extra!r}.")
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


def seed_noise_sampler(
    scheduler, sample: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
) -> None:
    """Seed a `DPMSolverSDEScheduler` run from ``generator`` (after ``set_timesteps``): its ``step`` takes no
    generator and seeds its Brownian noise from the global generator unless its config sets ``noise_sampler_seed``,
    so a seeded run gave other images at every call. Its noise sampler is built here as its first ``step`` builds it,
    with seeds drawn from ``generator`` (one per image for a list, which ``sample``'s batch must match)."""
    if generator is None or getattr(scheduler, "noise_sampler_seed", 0) is not None or scheduler.noise_sampler:
        return  # not an SDE scheduler, a seed of its own, or a sampler already built
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    generators = generator if isinstance(generator, list) else [generator]
    seeds = [int(torch.randint(0, 2**63 - 1, (), generator=g, device=g.device)) for g in generators]
    sigmas = scheduler.sigmas
    low, high = float(sigmas[sigmas > 0].min()), float(sigmas.max())
    scheduler.noise_sampler = BrownianTreeNoiseSampler(sample, low, high, seeds if len(seeds) > 1 else seeds[0])


def set_sampling_timesteps(
    scheduler,
    num_inference_steps: int | None = None,
    device: str | torch.device | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
) -> None:
    r"""
    ``scheduler.set_timesteps`` for a sampling run, as diffusers' ``retrieve_timesteps`` (`StableDiffusionPipeline`)
    calls it: from custom ``timesteps`` or ``sigmas`` when one of them is given (``num_inference_steps`` is then
    not used: the run has one step per timestep, or per sigma but the last), else from ``num_inference_steps``
    (`check_num_inference_steps`). A `ValueError` names custom values that are no non-empty list of finite numbers,
    both given at once, or a scheduler whose ``set_timesteps`` takes no such values (diffusers' check); the scheduler
    checks the values themselves (DDPM's must descend, ...).

    Example:

    ```py
    >>> from diffusers import DDIMScheduler, DDPMScheduler
    >>> from diffusers_stages.schedulers import set_sampling_timesteps
    >>> scheduler = DDPMScheduler()
    >>> set_sampling_timesteps(scheduler, timesteps=[999, 500, 0])
    >>> scheduler.timesteps.tolist()
    [999, 500, 0]
    >>> set_sampling_timesteps(DDIMScheduler(), timesteps=[999, 500, 0])
    Traceback (most recent call last):
    ...
    ValueError: `timesteps`=[999, 500, 0] needs a scheduler whose `set_timesteps` takes custom timesteps, but the current scheduler class DDIMScheduler's `set_timesteps` does not support custom timestep schedules (as diffusers' retrieve_timesteps says): use e.g. DDPMScheduler, EulerDiscreteScheduler or DPMSolverMultistepScheduler, or give `num_inference_steps`.

    ```
    """
    custom = {
        name: _custom_schedule_values(name, values)
        for name, values in (("timesteps", timesteps), ("sigmas", sigmas))
        if values is not None
    }
    if len(custom) > 1:
        raise ValueError(
            "Only one of `timesteps` or `sigmas` can be passed. Please choose one to set custom values, got "
            f"timesteps={custom['timesteps']} and sigmas={custom['sigmas']}."
        )
    name = type(scheduler).__name__
    for key, values in custom.items():
        if key not in inspect.signature(scheduler.set_timesteps).parameters:
            kind = "timestep" if key == "timesteps" else "sigmas"
            takers = (
                "DDPMScheduler, EulerDiscreteScheduler or DPMSolverMultistepScheduler"
                if key == "timesteps"
                else "EulerDiscreteScheduler or FlowMatchEulerDiscreteScheduler"
            )
            raise ValueError(
                f"`{key}`={values} needs a scheduler whose `set_timesteps` takes custom {key}, but the current "
                f"scheduler class {name}'s `set_timesteps` does not support custom {kind} schedules (as diffusers' "
                f"retrieve_timesteps says): use e.g. {takers}, or give `num_inference_steps`."
            )
        if key == "sigmas" and is_edm_scheduler(scheduler):  # its `sigmas` is a ramp its sigma_schedule maps
            raise ValueError(
                f"`sigmas`={values} cannot be given to {name}: its `set_timesteps(sigmas=...)` takes a ramp in [0, 1] "
                f"that its `sigma_schedule` ({scheduler.config.sigma_schedule!r}) maps to noise levels between "
                "`sigma_min` and `sigma_max`, not the noise levels themselves: give `num_inference_steps`, or set "
                "the ramp on the scheduler and sample in your own loop."
            )
    if not custom:
        check_num_inference_steps(scheduler, num_inference_steps)
        custom = {"num_inference_steps": int(num_inference_steps)}
    try:
        scheduler.set_timesteps(device=device, **custom)
    except ValueError as error:
        check_timesteps_from_step_count(scheduler, error)
        raise


def _custom_schedule_values(name: str, values: object) -> list[float]:
    """Custom ``timesteps`` or ``sigmas`` (a list, tuple, 1-D array or tensor) as a list of Python numbers; a
    `ValueError` naming ``name`` for anything else (a string, an empty list, a bool, NaN or inf, a 2-D tensor)."""
    plain = values.tolist() if isinstance(values, (np.ndarray, torch.Tensor)) else values
    if (
        not isinstance(plain, (list, tuple))
        or not plain
        or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) for v in plain)
    ):
        raise ValueError(f"`{name}` must be a non-empty list of finite numbers, got {values!r}.")
    return [v.item() if isinstance(v, np.generic) else v for v in plain]


def check_num_inference_steps(scheduler, num_inference_steps: int) -> None:
    """Refuse, before any step, a step count ``scheduler`` cannot run: one that is not a positive integer (diffusers'
    schedulers give no steps, a fraction's worth, or a ZeroDivisionError), and, for PNDM's Runge-Kutta warm-up
    (``skip_prk_steps=False``, its default), fewer than ``pndm_order`` (4) steps, which fail inside its
    ``set_timesteps`` with a NumPy broadcasting error."""
    (num_inference_steps,) = positive_integer_arguments(num_inference_steps=num_inference_steps)  # numpy's too
    warm_up = getattr(scheduler, "pndm_order", None) if not getattr(scheduler.config, "skip_prk_steps", True) else None
    if warm_up is not None and num_inference_steps < warm_up:
        raise ValueError(
            f"{type(scheduler).__name__} with Runge-Kutta warm-up steps needs `num_inference_steps` of at least "
            f"{warm_up}, got {num_inference_steps}: give more steps, or use "
            f"`{type(scheduler).__name__}.from_config(scheduler.config, skip_prk_steps=True)`."
        )


def check_timesteps_from_step_count(scheduler, error: ValueError) -> None:
    """Name a scheduler whose ``set_timesteps`` failed with ``error`` because it needs more than the step count the
    pipelines give it: with ``use_dynamic_shifting=True`` FlowMatch and UniPC need ``mu``, the image-size-dependent
    shift that Flux's and SD3's pipelines compute (diffusers fails inside ``set_timesteps``); DPM-Solver and DEIS
    take ``mu`` only as an option and run on their ``flow_shift`` without it, so they never get here."""
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        name = type(scheduler).__name__
        shift = "shift" if "shift" in scheduler.config else "flow_shift"  # FlowMatch's, or UniPC's
        raise ValueError(
            f"`scheduler` {name} has use_dynamic_shifting=True, which needs a `mu` (an image-size-dependent shift) "
            "at every `set_timesteps`, but the pipelines set the timesteps from `num_inference_steps` alone: use "
            f"`{name}.from_config(scheduler.config, use_dynamic_shifting=False, {shift}=...)` (a fixed shift)."
        ) from error


def is_corrector_call(scheduler) -> bool:
    """Whether ``scheduler``'s next model call, read from its state now, is the second of a predictor/corrector pair,
    which must stay with its predictor's network: a Heun-type scheduler's (``state_in_first_order`` false), or PLMS's
    first step (`PNDMScheduler` with ``skip_prk_steps=True``, at its second call: averaged with the first, it steps
    from the first call's sample)."""
    if getattr(scheduler, "state_in_first_order", True) is False:
        return True
    return isinstance(scheduler, PNDMScheduler) and bool(scheduler.config.skip_prk_steps) and scheduler.counter == 1


def model_call_timesteps(
    scheduler,
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
) -> list[tuple[float, bool]]:
    r"""
    ``(timestep, is_corrector)`` of every model call a run of ``num_inference_steps`` (or of custom ``timesteps`` or
    ``sigmas``, see `set_sampling_timesteps`) makes, in order: a dry run of a copy of ``scheduler`` (no model is
    called; ``scheduler`` itself and the global random generator are left as they are). The copy keeps the state that
    is not in the config (FlowMatch's ``set_shift``), which a run's ``set_timesteps`` reads too. ``is_corrector``
    marks the second call of a Heun-type predictor/corrector pair (``state_in_first_order`` false, or the second call
    of PNDM's first PLMS step with ``skip_prk_steps=True``), which must stay with its predictor's network.

    Example:

    ```py
    >>> from diffusers import HeunDiscreteScheduler
    >>> from diffusers_stages.schedulers import model_call_timesteps
    >>> [(round(t), corrector) for t, corrector in model_call_timesteps(HeunDiscreteScheduler(), 2)]
    [(999, False), (0, True), (0, False)]

    ```
    """
    scheduler = copy.deepcopy(scheduler)  # `set_timesteps` resets the run state (step index, model history)
    set_sampling_timesteps(scheduler, num_inference_steps, timesteps=timesteps, sigmas=sigmas)
    if not hasattr(scheduler, "state_in_first_order"):  # one model call per listed timestep: no dry steps needed
        # but PLMS's first step (PNDM without its Runge-Kutta warm-up) is Heun's: its second call, at the next
        # timestep, is averaged with the first and steps from the first call's sample
        plms_pair = isinstance(scheduler, PNDMScheduler) and scheduler.config.skip_prk_steps
        return [(float(t), plms_pair and i == 1) for i, t in enumerate(scheduler.timesteps)]
    sample = torch.zeros(1, 1, 2, 2)
    step_kwargs = scheduler_step_kwargs(scheduler, generator=torch.Generator().manual_seed(0))
    calls = []
    with torch.random.fork_rng(devices=[]):  # a step may draw from the global generator (DPMSolverSDE's seed)
        for t in scheduler.timesteps:
            calls.append((float(t), is_corrector_call(scheduler)))
            if hasattr(scheduler, "scale_model_input"):
                scheduler.scale_model_input(sample, t)  # some schedulers track this call
            sample = scheduler.step(torch.zeros_like(sample), t, sample, **step_kwargs).prev_sample
    return calls


def sigma_to_timestep(scheduler, sigma: float, to_boundary: bool = False) -> float:
    """The (fractional) training timestep whose noise level is ``sigma``, from the scheduler's ``alphas_cumprod``.
    With ``to_boundary``, ``sigma`` is a boundary (``switch_sigma``), and the result the boundary in training
    timesteps that keeps the rule of ``"sigma"`` units: a sigma on the boundary, or within float32 rounding of it (the
    schedulers hold sigmas in float32), belongs to the cleaner stage; that is, the timestep of the largest sigma that
    rounds to float32 as ``sigma`` does, moved just above its float32 rounding by `cleaner_stage_boundary`."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"`switch_sigma` needs a scheduler with a training noise schedule (`alphas_cumprod`); "
            f"{type(scheduler).__name__} has none: give `switch_timestep` or `switch_step_fraction` instead."
        )
    if not sigma > 0:
        raise ValueError(f"`switch_sigma` must be a noise level > 0, got {sigma}.")
    alphas_cumprod = alphas_cumprod.cpu().double()  # on the CPU first: `add_noise` moves it to the samples' device
    log_sigmas = np.log(((1 - alphas_cumprod) / alphas_cumprod).sqrt().numpy())
    if not log_sigmas[0] < math.log(sigma) < log_sigmas[-1]:
        raise ValueError(
            f"`switch_sigma` must lie inside the training schedule's noise levels "
            f"({math.exp(log_sigmas[0]):.4g}, {math.exp(log_sigmas[-1]):.4g}), got {sigma}."
        )
    if to_boundary:  # the largest sigma that rounds to float32 as ``sigma`` does (a tie rounds to either)
        rounded = np.float32(sigma)
        sigma = max(sigma, (float(rounded) + float(np.nextafter(rounded, np.float32(np.inf)))) / 2)
    timestep = float(np.interp(math.log(sigma), log_sigmas, np.arange(len(log_sigmas))))  # clamped at the ends
    return cleaner_stage_boundary(timestep) if to_boundary else timestep


# ------------------------------------------------------------------------------------------------------------------
# score_sde's continuous-time VP SDE (Song et al. 2021), as DPM-Solver samples it (Lu et al. 2022)
#
# A continuously trained VP model is conditioned on ``(N - 1) t`` for a time ``t`` in ``(0, 1]`` (score_sde's
# ``labels = t * 999``, N = 1000): that label is the timestep the package's pipelines hand the model, and the unit of
# its stage boundaries. It lies within a fraction of a step of the discrete DDPM timestep at the same noise level:
# the discrete linear schedule ``betas = linspace(beta_min, beta_max, N) / N`` has noise level ``n`` at about
# ``t = (n + 1) / N`` (label ``n + 1 - t``), so a discrete scheduler would condition the model up to one unit off.
def vp_log_alpha(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """``log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2`` of the continuous VP SDE."""
    return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min


def vp_lambda(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """The half log-SNR ``lambda_t = log alpha_t - log sigma_t``, with ``sigma_t = sqrt(1 - alpha_t^2)``."""
    log_alpha = vp_log_alpha(t, beta_min, beta_max)
    return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def vp_inverse_lambda(lamb: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """The time ``t`` whose half log-SNR is ``lamb`` (DPM-Solver's closed form for the linear schedule)."""
    tmp = 2.0 * (beta_max - beta_min) * torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb))
    return tmp / (torch.sqrt(beta_min**2 + tmp) + beta_min) / (beta_max - beta_min)


def dpm_solver_fast_orders(steps: int, order: int) -> list[int]:
    """The solver order of each singlestep block for ``steps`` model calls ("DPM-Solver-fast", Lu et al. 2022,
    section 3.4): blocks of order ``order`` (1, 2 or 3), the last one or two of lower order to use up the calls
    exactly."""
    (steps,) = positive_integer_arguments(steps=steps)
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"`order` must be 1, 2 or 3, got {order!r}.")
    if order == 3 and steps % 3 == 0:
        return [3] * (steps // 3 - 1) + [2, 1]
    if order == 3:
        return [3] * (steps // 3) + [steps % 3]
    return [order] * (steps // order) + [1] * (steps % order)


class ContinuousVPDPMSolverSinglestepScheduler(DPMSolverSinglestepScheduler):
    r"""
    Singlestep DPM-Solver ("DPM-Solver-fast") on score_sde's continuous-time VP SDE: the sampler of the authors'
    score_sde code (``dpm_solver.py``, ``method="singlestep"``, ``skip_type="logSNR"``), on diffusers'
    `DPMSolverSinglestepScheduler`.

    Its timesteps are the model's labels ``(num_train_timesteps - 1) t``, ``t`` running from ``t_start`` to
    ``t_end``. ``num_inference_steps`` model calls are grouped into blocks of ``solver_order`` calls (the last one
    or two blocks of lower order): the block ends are uniform in half log-SNR ``lambda``, and each order-k block is
    split into k equal ``lambda`` steps, as the authors' solver places its intermediate times (``r1 = 1/3, r2 =
    2/3``). diffusers' `DPMSolverSinglestepScheduler` cannot place them: its grid is one spacing of discrete
    timesteps, and its second-order step is one formula (``solver_type``), while DPM-Solver-3 computes its
    intermediate point with the first-order Taylor form ("heun") and ends a block with the ``midpoint`` form.

    Parameters:
        num_train_timesteps (`int`, defaults to 1000): ``N``; the model is conditioned on ``(N - 1) t``.
        beta_min (`float`, defaults to 0.1), beta_max (`float`, defaults to 20.0): the VP SDE's linear ``beta(t)``.
        solver_order (`int`, defaults to 3): 1, 2 or 3.
        algorithm_type (`str`, defaults to `"dpmsolver"`): `"dpmsolver"` (noise prediction, the authors') or
            `"dpmsolver++"`.
        t_start (`float`, defaults to 1.0), t_end (`float`, defaults to 1e-4): the time interval sampled (the
            authors' evaluation, ``sample.sh``, ends at ``t_end = 1e-4``; their config's ``sampling.eps`` is 1e-3).

    Example:

    ```py
    >>> from diffusers_stages.schedulers import ContinuousVPDPMSolverSinglestepScheduler
    >>> scheduler = ContinuousVPDPMSolverSinglestepScheduler()
    >>> scheduler.set_timesteps(5)  # an order-3 block, then an order-2 block
    >>> [round(t) for t in scheduler.timesteps.tolist()], scheduler.order_list  # model labels 999 t
    ([999, 800, 536, 194, 11], [1, 2, 3, 1, 2])

    ```
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        solver_order: int = 3,
        algorithm_type: str = "dpmsolver",
        t_start: float = 1.0,
        t_end: float = 1e-4,
    ):
        if (
            isinstance(num_train_timesteps, bool)
            or not isinstance(num_train_timesteps, int)
            or num_train_timesteps < 2
        ):
            raise ValueError(f"`num_train_timesteps` must be an integer >= 2, got {num_train_timesteps!r}.")
        # the config is saved as JSON: Python numbers only (a numpy one is refused with a hint)
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order not in (1, 2, 3):
            numpy = isinstance(solver_order, numbers.Integral) and not isinstance(solver_order, (bool, int))
            hint = " (a Python int: the config is saved as JSON; pass int(...))" if numpy else ""
            raise ValueError(f"`solver_order` must be 1, 2 or 3{hint}, got {solver_order!r}.")
        for name, value in (("beta_min", beta_min), ("beta_max", beta_max), ("t_start", t_start), ("t_end", t_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                numpy = isinstance(value, numbers.Real)
                hint = " (a Python float: the config is saved as JSON; pass float(...))" if numpy else ""
                raise ValueError(f"`{name}` must be a number{hint}, got {value!r}.")
        if algorithm_type not in ("dpmsolver", "dpmsolver++"):
            raise ValueError(f"`algorithm_type` must be 'dpmsolver' or 'dpmsolver++', got {algorithm_type!r}.")
        if not 0.0 < t_end < t_start <= 1.0:
            raise ValueError(f"`t_start` and `t_end` must satisfy 0 < t_end < t_start <= 1, got {t_start}, {t_end}.")
        if not 0.0 < beta_min < beta_max:
            raise ValueError(
                f"`beta_min` and `beta_max` must satisfy 0 < beta_min < beta_max, got {beta_min}, {beta_max}."
            )
        with warnings.catch_warnings():  # diffusers deprecates "dpmsolver", which is the authors' algorithm
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(
                num_train_timesteps=num_train_timesteps,
                beta_start=beta_min / num_train_timesteps,  # the discrete schedule of the same SDE (unused here)
                beta_end=beta_max / num_train_timesteps,
                solver_order=solver_order,
                algorithm_type=algorithm_type,
                final_sigmas_type="sigma_min",  # sampling ends at t_end, not at sigma 0
                lower_order_final=True,
            )
        self._taylor_steps: list[bool] = []

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """The authors' grid for ``num_inference_steps`` model calls (see the class docstring)."""
        if timesteps is not None or mu is not None:
            raise ValueError(f"{type(self).__name__} places its own timesteps: give only `num_inference_steps`.")
        (num_inference_steps,) = positive_integer_arguments(num_inference_steps=num_inference_steps)
        config = self.config
        orders = dpm_solver_fast_orders(num_inference_steps, config.solver_order)
        ends = torch.tensor([config.t_start, config.t_end], dtype=torch.float64)
        lam_start, lam_end = vp_lambda(ends, config.beta_min, config.beta_max).tolist()
        edges = torch.linspace(lam_start, lam_end, len(orders) + 1, dtype=torch.float64)
        # each order-k block split into k equal lambda steps; the k-th call of a block is the one after it
        lambdas = [edges[b] + (edges[b + 1] - edges[b]) * j / k for b, k in enumerate(orders) for j in range(k)]
        lambdas = torch.stack([*lambdas, edges[-1]])
        t = vp_inverse_lambda(lambdas, config.beta_min, config.beta_max)
        self.sigmas = torch.exp(-lambdas).float()  # diffusers' sigma = sigma_t / alpha_t = exp(-lambda)
        self.timesteps = ((config.num_train_timesteps - 1) * t[:-1]).float().to(device)
        self.order_list = [j + 1 for k in orders for j in range(k)]
        self._taylor_steps = [k == 3 and j == 1 for k in orders for j in range(k)]  # DPM-Solver-3's second call
        self.num_inference_steps = num_inference_steps
        self.model_outputs = [None] * config.solver_order
        self.sample, self._step_index, self._begin_index = None, None, None

    def singlestep_dpm_solver_second_order_update(
        self, model_output_list: list[torch.Tensor], *args, sample: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """diffusers' second-order step (``midpoint``); inside an order-3 block, DPM-Solver-3's intermediate point:
        the first-order Taylor form (diffusers' ``heun``)."""
        if not self._taylor_steps[self.step_index]:
            return super().singlestep_dpm_solver_second_order_update(model_output_list, *args, sample=sample, **kwargs)
        indices = (self.step_index + 1, self.step_index, self.step_index - 1)  # t, s0 (last call), s1 (block start)
        (alpha_t, sigma_t), _, (alpha_s1, sigma_s1) = [self._sigma_to_alpha_sigma_t(self.sigmas[i]) for i in indices]
        lambda_t, lambda_s0, lambda_s1 = [-torch.log(self.sigmas[i]) for i in indices]
        h = lambda_t - lambda_s1
        d0, m0 = model_output_list[-2], model_output_list[-1]
        d1 = (m0 - d0) * (h / (lambda_s0 - lambda_s1))
        if self.config.algorithm_type == "dpmsolver":
            return (
                (alpha_t / alpha_s1) * sample
                - sigma_t * torch.expm1(h) * d0
                - sigma_t * (torch.expm1(h) / h - 1.0) * d1
            )
        return (
            (sigma_t / sigma_s1) * sample - alpha_t * torch.expm1(-h) * d0 + alpha_t * (torch.expm1(-h) / h + 1.0) * d1
        )
