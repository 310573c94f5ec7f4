"""Dual-backbone sampling (DuoDiff, arXiv 2410.09633): a shallow denoiser for the first, noisiest steps and a deep
one for the rest. It samples exactly as a two-expert [`ExpertRoutingPipeline`] whose single boundary is the switch
point, but holds its two backbones as components of their own (``shallow``, ``deep``)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderTiny,
    DiffusionPipeline,
    DiTTransformer2DModel,
    UNet2DModel,
    VQModel,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.expert_routing import (
    CONDITIONING_KEYS,
    CONTRACT_KEYS,
    ExpertRoutingModel,
    _config_value,
    class_embedding_counts,
    learned_time_embedding_steps,
)
from ..models.iunet import IUNet2DModel
from ..models.uvit import UViT2DModel
from ..partition import TimestepPartition
from ..schedulers import (
    check_scheduler_units,
    model_call_timesteps,
    scheduler_prediction_type,
    scheduler_units,
    sigma_to_timestep,
)
from .pipeline_staged import StagedDiffusionPipeline, custom_schedule, vae_scale_factor

__all__ = ["DEFAULT_SWITCH_STEP_FRACTION", "DualBackbonePipeline", "sigma_to_timestep"]  # the last: its old home

SWITCH_KEYS = ("switch_step_fraction", "switch_timestep", "switch_sigma")
DEFAULT_SWITCH_STEP_FRACTION = 0.4  # DuoDiff picks the switch by a sweep; no published rule

# a backbone is any denoiser; diffusers' `from_pipe` keeps a model component only when its exact class is named in
# the annotation, so the classes the package builds backbones from are listed before the catch-all `ModelMixin` (and
# `StagedDiffusionPipeline.from_pipe` passes on the components of the other classes the annotation takes)
Backbone = UNet2DModel | UViT2DModel | IUNet2DModel | DiTTransformer2DModel | ModelMixin


class DualBackbonePipeline(StagedDiffusionPipeline):
    r"""
    Pipeline for image generation with a shallow and a deep denoiser (DuoDiff): the shallow one runs the noisy end
    of the schedule, the deep one takes over at the switch point. At most one switch is given (none: a step fraction
    of ``DEFAULT_SWITCH_STEP_FRACTION`` = 0.4) and saved in the pipeline's config:

    - ``switch_step_fraction``: the shallow model runs the first ``round(f * num_inference_steps)`` steps (at least
      one step each; a Heun/KDPM2 predictor/corrector pair is one step, each timestep of DPM-Solver's singlestep
      updates and of PNDM's Runge-Kutta warm-up is one: README, "Routing by noise level"). It is resolved at every
      call from the scheduler's timesteps after ``set_timesteps``, so it means the same share of steps for any step
      count; the boundary is put halfway between the last shallow step's timestep and the first deep one's.
    - ``switch_timestep``: a training timestep; the shallow model runs every call at ``t >= switch_timestep``, the
      rule `WanPipeline` applies to its high-noise ``transformer`` (Wan 2.2's ``boundary_ratio`` r is
      ``switch_timestep = r * num_train_timesteps``, a fraction of the timestep range, not ``switch_step_fraction``).
      DuoDiff's sampler counts one step more: its ``--t_switch`` swaps in the deep model *after* the first call at
      ``t < 1000 - t_switch``, so that call still runs on the shallow model (with DDIM 50 steps and ``t_switch=300``:
      16 shallow calls of its 49, where ``switch_timestep=700`` gives 15 of 50 here). To reproduce its split, give
      the first sampling timestep below ``1000 - t_switch`` (e.g. ``switch_timestep=693`` on its grid, 680 on
      `DDIMScheduler`'s default 50-step grid).
    - ``switch_sigma``: a noise level sigma (EDM-style models route on it directly; DDPM-style models through the
      scheduler's training schedule ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``, so shifted schedules are
      handled). The deep model runs the sigmas ``<= switch_sigma``: a call at a sigma on the switch, or within float32
      rounding of it, runs the deep model (a sigma on a boundary belongs to the cleaner stage), also on a DDPM-style
      scheduler, whose switch is then the float32 timestep just above that of the largest sigma rounding to
      ``switch_sigma``'s float32 (`sigma_to_timestep` with ``to_boundary``).

    Args:
        shallow ([`~diffusers.ModelMixin`]): the small denoiser, trained on all timesteps (a `UNet2DModel`,
            `UViT2DModel`, `IUNet2DModel`, `DiTTransformer2DModel`, or any other denoiser; `from_pipe` carries it
            over, whatever its class).
        deep ([`~diffusers.ModelMixin`]): the large denoiser, as ``shallow``.
        scheduler ([`~diffusers.SchedulerMixin`]): one scheduler for both.
        vae ([`~diffusers.AutoencoderKL`], [`~diffusers.VQModel`], [`~diffusers.AutoencoderTiny`] or
            [`~diffusers.AutoencoderDC`], *optional*): for latent diffusion.
        switch_step_fraction (`float`, *optional*): see above, in ``(0, 1)``; the default when no switch is given.
        switch_timestep (`float`, *optional*): see above.
        switch_sigma (`float`, *optional*): see above.
        id2label (`dict`, *optional*): class index -> name of a class-conditional model (saved in
            ``model_index.json``; `get_label_ids` turns names into ``class_labels``), as `DiTPipeline`'s.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMScheduler, UNet2DModel
    >>> from diffusers_stages import DualBackbonePipeline
    >>> def unet(width):
    ...     return UNet2DModel(sample_size=8, block_out_channels=(width, width), norm_num_groups=4,
    ...         layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    >>> pipe = DualBackbonePipeline(shallow=unet(8), deep=unet(16), scheduler=DDIMScheduler(), switch_step_fraction=0.5)
    >>> pipe.set_progress_bar_config(disable=True)
    >>> [expert for _, expert in pipe.expert_schedule(num_inference_steps=4)]  # 1 = shallow, 0 = deep
    [1, 1, 0, 0]
    >>> pipe(batch_size=1, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images.shape
    (1, 8, 8, 3)

    ```
    """

    model_cpu_offload_seq = "shallow->deep->vae"

    def __init__(
        self,
        shallow: Backbone,
        deep: Backbone,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | VQModel | AutoencoderTiny | AutoencoderDC | None = None,
        switch_step_fraction: float | None = None,
        switch_timestep: float | None = None,
        switch_sigma: float | None = None,
        id2label: dict[str, str] | None = None,
    ):
        super().__init__()
        switch = checked_switch(
            {
                "switch_step_fraction": switch_step_fraction,
                "switch_timestep": switch_timestep,
                "switch_sigma": switch_sigma,
            }
        )
        _check_interchangeable(shallow, deep)
        vae_scale_factor(vae)  # refuses a VAE class the pipelines cannot decode
        self.register_modules(shallow=shallow, deep=deep, scheduler=scheduler, vae=vae)
        self.register_to_config(**switch)
        self.register_class_names(id2label)
        if scheduler is not None:  # a fixed switch now (without a scheduler, at sampling: `check_scheduler`)
            check_fixed_switch(switch, scheduler)  # a step fraction depends on the step count
        self.check_prediction_type()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DualBackbonePipeline:
        """As [`StagedDiffusionPipeline.from_pretrained`]; a switch passed here (``switch_timestep=600``, ...)
        replaces the saved one, whichever kind that is (as `WanPipeline` takes a new ``boundary_ratio``)."""
        return super().from_pretrained(pretrained_model_name_or_path, **_replacing_switch(kwargs))

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> DualBackbonePipeline:
        """As diffusers' `from_pipe`; a switch passed here replaces the pipeline's, whichever kind that is."""
        return super().from_pipe(pipeline, **_replacing_switch(kwargs))

    # --------------------------------------------------------------------------------------------------------------
    @property
    def partition(self) -> TimestepPartition:
        """The deep/shallow boundary of a fixed switch (a step-fraction switch: see `resolve_partition`)."""
        return self.resolve_partition(None)

    @property
    def experts(self) -> ExpertRoutingModel:
        """Deprecated view of the two backbones as a new routing model, ``[deep, shallow]`` (stage 0 is the clean
        end), built on every read and not a component: use `shallow` and `deep`, or `expert_schedule`."""
        warnings.warn(
            "`DualBackbonePipeline.experts` builds a new ExpertRoutingModel on every read and will be removed: use "
            "`pipe.shallow` and `pipe.deep`.",
            FutureWarning,
            stacklevel=2,
        )
        partition = self.resolve_partition(None)
        prediction_type = scheduler_prediction_type(self.scheduler)  # the backbones predict what the scheduler expects
        return ExpertRoutingModel([self.deep, self.shallow], prediction_type=prediction_type, **partition.to_config())

    def check_components(self) -> None:
        _check_interchangeable(self.shallow, self.deep)
        scheduler = getattr(self, "scheduler", None)
        steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
        if steps is None or scheduler_units(scheduler) != "timestep":
            return
        for name in ("shallow", "deep"):  # as `ExpertRoutingModel` refuses such an expert
            rows = learned_time_embedding_steps(getattr(self, name))
            if rows is not None and rows != steps:
                kind = type(scheduler).__name__
                raise ValueError(
                    f"`{name}` ({type(getattr(self, name)).__name__}) was built for num_train_timesteps={rows}, but "
                    f"`scheduler` {kind} has {steps} (its learned time embedding has one row per training timestep): "
                    f"build it with `{kind}.from_config(scheduler.config, num_train_timesteps={rows})`."
                )

    def _num_stages(self) -> int:
        # the deep and the shallow backbone, whatever the switch: a step fraction is not resolved for a step count
        # (the sampling default of 50 is more than LCM's or a short training schedule's steps)
        return 2

    def stage_denoiser(self, stage: int) -> tuple[torch.nn.Module, dict]:
        # stage 0 is the clean end: the deep backbone; the shallow one runs the noisy first steps
        return (self.deep, self.shallow)[stage], {}

    def resolve_partition(
        self,
        num_inference_steps: int | None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> TimestepPartition:
        """The deep/shallow boundary for this scheduler (and, for a step fraction, this number of steps, or these
        custom ``timesteps`` or ``sigmas``: the fraction of their steps)."""
        fixed = fixed_switch_partition(self.config, self.scheduler)
        if fixed is not None:
            return fixed
        scheduler = self.scheduler
        steps = getattr(scheduler.config, "num_train_timesteps", None) or 1000
        units = scheduler_units(scheduler)
        custom = custom_schedule(timesteps, sigmas)
        if num_inference_steps is None and not custom:
            raise ValueError(
                "The switch is a step fraction, which depends on the number of steps: call "
                "`resolve_partition(num_inference_steps)`, or sample with the pipeline."
            )
        return self._partition_from_fraction(num_inference_steps, steps, units, custom)

    def _partition_from_fraction(
        self, num_inference_steps: int | None, steps: int, units: str, custom: Mapping | None = None
    ) -> TimestepPartition:
        calls = model_call_timesteps(self.scheduler, num_inference_steps, **(custom or {}))
        # one timestep per step: a predictor/corrector pair is one step (KDPM2's corrector has a timestep of its own),
        # and repeated timesteps (PNDM's Runge-Kutta calls) count once
        predictors = [t for t, is_corrector in calls if not is_corrector]
        timesteps = torch.unique_consecutive(torch.tensor(predictors, dtype=torch.float64))
        if len(timesteps) < 2:
            given = ", ".join(f"`{k}`={v}" for k, v in (custom or {}).items()) or f"{num_inference_steps}"
            wanted = "at least 2 steps" if custom else "`num_inference_steps` >= 2"
            raise ValueError(f"A step-fraction switch needs {wanted}, got {given}.")
        shallow_steps = min(max(round(self.config.switch_step_fraction * len(timesteps)), 1), len(timesteps) - 1)
        middle = (timesteps[shallow_steps - 1] + timesteps[shallow_steps]) / 2
        level = TimestepPartition([], steps, units).noise_level(middle)  # model timestep -> partition units
        return TimestepPartition([float(level)], steps, units)


def fixed_switch_partition(switch: Mapping, scheduler: SchedulerMixin) -> TimestepPartition | None:
    """The deep/shallow boundary of a fixed switch (``switch_timestep`` or ``switch_sigma`` of ``switch``, a pipeline
    config or `checked_switch`'s dict) for ``scheduler``; None for a step fraction (it depends on the step count)."""
    timestep, sigma = switch.get("switch_timestep"), switch.get("switch_sigma")
    steps = getattr(scheduler.config, "num_train_timesteps", None) or 1000
    if timestep is not None:
        if not 0 < timestep < steps:  # named here: the partition would name its `boundaries`
            raise ValueError(
                f"`switch_timestep` must lie strictly inside the training schedule (0, {steps}) of "
                f"{type(scheduler).__name__}, got {timestep}."
            )
        return TimestepPartition([timestep], steps, "timestep")
    if sigma is None:
        return None
    if not sigma > 0:
        raise ValueError(f"`switch_sigma` must be a noise level > 0, got {sigma}.")
    if scheduler_units(scheduler) == "sigma":
        low, high = (getattr(scheduler.config, key, None) for key in ("sigma_min", "sigma_max"))
        if low is not None and high is not None and not low < sigma < high:
            raise ValueError(  # as a DDPM-style schedule refuses a switch outside its noise levels
                f"`switch_sigma` must lie inside the noise levels ({low:g}, {high:g}) of "
                f"{type(scheduler).__name__}'s `sigma_min` and `sigma_max` (else one backbone never runs), got {sigma}."
            )
        return TimestepPartition([sigma], steps, "sigma")
    # a sigma on the boundary is the cleaner stage's (the deep model's), also at its timestep
    return TimestepPartition([sigma_to_timestep(scheduler, sigma, to_boundary=True)], steps, "timestep")


def check_fixed_switch(switch: Mapping, scheduler: SchedulerMixin) -> None:
    """Refuse a fixed switch ``switch`` (as `fixed_switch_partition` reads it) that ``scheduler`` cannot sample: outside
    its schedule, or in units it does not take (a `ValueError` naming the key)."""
    partition = fixed_switch_partition(switch, scheduler)
    if partition is not None:
        check_scheduler_units(scheduler, partition)


def checked_switch(switch: dict) -> dict:
    """The switch ``switch`` gives (its `SWITCH_KEYS` entries; none: the default step fraction) as a pipeline saves
    it: every key, exactly one a float (an int such as ``switch_timestep=600`` made every load by diffusers'
    `DiffusionPipeline.from_pretrained` warn "Expected types ... got int"); a `ValueError` naming the key otherwise."""
    switch = {key: switch.get(key) for key in SWITCH_KEYS}
    given = {k: v for k, v in switch.items() if v is not None}
    if not given:  # no switch given: the package's default
        given = {"switch_step_fraction": DEFAULT_SWITCH_STEP_FRACTION}
    if len(given) != 1:
        raise ValueError(
            f"Give exactly one of {SWITCH_KEYS} (or none: the default step fraction), got {given} (to replace a "
            "saved switch of another kind, load with `DualBackbonePipeline.from_pretrained`, or pass the other "
            "keys as None)."
        )
    ((key, value),) = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{key}` must be a number, got {value!r}.")
    if key == "switch_step_fraction" and not 0.0 < value < 1.0:
        raise ValueError(f"`switch_step_fraction` must be in (0, 1), got {value}.")
    return {**switch, key: float(value)}


def _check_interchangeable(shallow: Backbone | None, deep: Backbone | None) -> None:
    """Both backbones are given (a `torch.nn.Module` each), and the deep one continues the shallow one's samples:
    they must agree on their inputs, outputs and labels (what `ExpertRoutingModel` requires of its experts), checked
    at construction rather than at the switch (or at the first step, for a missing one)."""
    backbones = {"shallow": shallow, "deep": deep}
    for name, model in backbones.items():
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"`{name}` must be a denoiser (a torch.nn.Module), got "
                f"{'None' if model is None else type(model).__name__}: the pipeline runs both backbones."
            )
    for key in CONTRACT_KEYS + CONDITIONING_KEYS:
        values = {name: _config_value(model.config, key) for name, model in backbones.items()
                  if model is not None and getattr(model, "config", None) is not None and key in model.config}  # fmt: skip
        if len(set(values.values())) > 1:
            raise ValueError(f"`shallow` and `deep` must agree on `{key}` (the deep one continues the shallow one's "
                             f"samples), got {values}.")  # fmt: skip
    counts = class_embedding_counts(backbones)
    if len(set(counts.values())) > 1:
        raise ValueError(
            "`shallow` and `deep` must agree on their class embeddings (the classes and the unconditional label: "
            "`num_class_embeds`, a DiT's `num_embeds_ada_norm` + 1; None: not class-conditional; the deep one continues "
            f"the shallow one's samples), got {counts}."
        )


def _replacing_switch(kwargs: dict) -> dict:
    """``kwargs`` where a switch given by the caller also clears the other switch keys, so that it replaces a saved
    switch of another kind instead of clashing with it (two switches given by the caller are still refused)."""
    given = [key for key in SWITCH_KEYS if kwargs.get(key) is not None]
    if not given:
        return kwargs
    return {**{key: None for key in SWITCH_KEYS}, **kwargs}
