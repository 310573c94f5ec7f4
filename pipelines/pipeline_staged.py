"""The denoising loop shared by every pipeline of the package: route each model call to its stage's network."""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderTiny,
    DiffusionPipeline,
    DiTTransformer2DModel,
    ImagePipelineOutput,
    ModelMixin,
    Transformer2DModel,
    VQModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..conventions import (
    class_embedding_count,
    latent_statistics_error,
    model_to_vae_latents,
    null_class_label,
    num_data_classes,
    upcast_vae,
)
from ..hub import PackageCardPushMixin, pop_push_kwargs, push_saved_folder
from ..models.checks import (
    _preview,
    check_savable,
    compute_dtype,
    is_integer_tensor,
    positive_integer_arguments,
)
from ..models.expert_routing import call_denoiser
from ..models.loading import realign_storage
from ..partition import TimestepPartition
from ..routing import StageRouter
from ..schedulers import check_prediction_type, model_call_timesteps, seed_noise_sampler, set_sampling_timesteps
from ..schedulers import scheduler_step_kwargs as scheduler_step_kwargs_for
from .loading import (
    check_trusted_load_dtypes,
    load_pipeline,
    remove_stale_weight_indexes,
    trusted_variant_error,
    write_reexport_files,
)
from .offload import StageOffloadMixin, offloaded_on_error

# the VAEs whose latents `conventions.model_to_vae_latents` scales as diffusers' pipelines for them do (SD, SDXL and
# Flux's AutoencoderKL, LDM's VQModel, TAESD, Sana's AutoencoderDC); others (video, audio, Flux 2's patchified
# latents, ...) would decode wrong images and are refused by name
LATENT_VAE_CLASSES = (AutoencoderKL, VQModel, AutoencoderTiny, AutoencoderDC)


def vae_scale_factor(vae) -> int:
    """Image pixels per latent pixel along each side (1 without a VAE); a `ValueError` for a VAE class the pipelines
    cannot decode."""
    if vae is None:
        return 1
    module = getattr(vae, "_orig_mod", vae)  # a torch.compile'd VAE is its `_orig_mod`
    if not isinstance(module, LATENT_VAE_CLASSES):
        names = [c.__name__ for c in LATENT_VAE_CLASSES]
        raise ValueError(
            f"`vae` must be an {', '.join(names[:-1])} or {names[-1]} (the latent-diffusion VAEs whose latents the "
            f"pipelines know how to scale and decode), got a {type(module).__name__}."
        )
    config = module.config
    channels = config.encoder_block_out_channels if isinstance(module, AutoencoderDC) else config.block_out_channels
    return 2 ** (len(channels) - 1)


def _vae_latent_channels(vae) -> int:
    """The channels of the latents ``vae`` decodes (a VQModel's: its codebook's `vq_embed_dim`, when set)."""
    config = getattr(vae, "_orig_mod", vae).config
    return config.get("vq_embed_dim") or config.latent_channels


class StagedDiffusionPipeline(StageOffloadMixin, PackageCardPushMixin, DiffusionPipeline):
    r"""
    Base class of the package's pipelines: one scheduler, one network per stage of a [`TimestepPartition`], and an
    optional VAE for latent diffusion. Subclasses register their components and say which network denoises a
    stage ([`~StagedDiffusionPipeline.stage_denoiser`]); the sampling loop below is the same for all of them.

    Class-conditional models reserve their last class embedding (``num_class_embeds - 1``) for the unconditional
    label used by classifier-free guidance, as the package's training scripts do; a `DiTTransformer2DModel`'s
    unconditional label is likewise the one after its ``num_embeds_ada_norm`` classes. A model that predicts a
    learned variance as well (``out_channels`` twice ``in_channels``, as DiT) gives the scheduler its first half,
    unless the scheduler uses learned variances itself (guidance then applies to the first half only, and the
    variance is the conditional prediction's, as in DiT).

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMScheduler, UNet2DModel
    >>> from diffusers_stages import StagedDiffusionPipeline, TimestepPartition
    >>> class TwoUNetPipeline(StagedDiffusionPipeline):  # `noisy` denoises t >= 500, `clean` the rest
    ...     def __init__(self, clean, noisy, scheduler):
    ...         super().__init__()
    ...         self.register_modules(clean=clean, noisy=noisy, scheduler=scheduler)
    ...
    ...     @property
    ...     def partition(self):
    ...         return TimestepPartition([500])
    ...
    ...     def stage_denoiser(self, stage):  # stage 0 is the clean end
    ...         return (self.clean, self.noisy)[stage], {}
    >>> def unet():
    ...     return UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    >>> pipe = TwoUNetPipeline(unet(), unet(), DDIMScheduler())
    >>> pipe.expert_schedule(num_inference_steps=4)  # (timestep, stage) of each model call
    [(750.0, 1), (500.0, 1), (250.0, 0), (0.0, 0)]
    >>> pipe.set_progress_bar_config(disable=True)
    >>> pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images.shape
    (2, 8, 8, 3)

    ```
    """

    _optional_components: ClassVar[list[str]] = ["vae"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]  # what `callback_on_step_end` may read and replace

    # --------------------------------------------------------------------------------------------------------------
    # what a subclass provides
    @property
    def partition(self) -> TimestepPartition:
        raise NotImplementedError

    def stage_denoiser(self, stage: int) -> tuple[torch.nn.Module, dict]:
        """The network for ``stage`` and the extra keyword arguments its forward takes."""
        raise NotImplementedError

    def label_config(self, model: torch.nn.Module):
        """The config that says whether, and with how many classes, ``model`` is class-conditional
        (``num_class_embeds``, see `diffusers_stages.conventions`): the model's own, unless a subclass conditions it
        through another component."""
        return model.config

    def label_conditioning(self, class_labels: torch.Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
        """The keyword arguments that give ``class_labels`` (one per sample) to a stage's network: ``class_labels``
        itself, unless a subclass turns labels into another input (a cross-attention context)."""
        return {"class_labels": class_labels}

    def register_modules(self, **kwargs) -> None:
        """As diffusers' (the constructors register their components here), refusing a ``scheduler`` that is not a
        scheduler instance (the class, ``scheduler=DDIMScheduler``, or its name), which diffusers' registration fails
        on with an AttributeError; None is taken, as in diffusers."""
        scheduler = kwargs.get("scheduler")
        if scheduler is not None and (isinstance(scheduler, type) or not isinstance(scheduler, ConfigMixin)):
            shown = f"the class {scheduler.__name__}" if isinstance(scheduler, type) else repr(scheduler)
            raise ValueError(
                f"`scheduler` must be a scheduler instance (a diffusers scheduler such as `DDIMScheduler()`, or "
                f"`DDIMScheduler.from_pretrained(folder, subfolder='scheduler')`), got {shown}."
            )
        super().register_modules(**kwargs)

    def check_components(self) -> None:
        """Refuse components the constructor refuses, also when swapped in later (``pipe.unet = ...``, which diffusers
        registers unchecked): run before every sampling run, `expert_schedule` and `enable_stage_offload`. Nothing to
        check here."""

    def model_prediction_type(self) -> str | None:
        """What the stage networks predict (``"epsilon"``, ``"v_prediction"``, ``"sample"``, ``"flow_prediction"``),
        where the model says it (`ExpertRoutingModel`'s config); None where it does not, as a diffusers model does not:
        the scheduler's ``prediction_type`` is then taken as the model's, as diffusers' pipelines take it."""
        return None

    def check_prediction_type(self) -> None:
        """Refuse a scheduler that cannot sample the model (`diffusers_stages.schedulers.check_prediction_type`: a
        flow-matching scheduler for a DDPM-style model, or the reverse, or another prediction type than the model
        declares): run by the constructors, and before every sampling run and `expert_schedule`, so a scheduler
        swapped in later (``pipe.scheduler = ...``) is checked too. A pipeline built without one (``scheduler=None``,
        which the constructors took before this check) is left to the sampling run."""
        if getattr(self, "scheduler", None) is not None:
            check_prediction_type(self.scheduler, self.model_prediction_type())

    def check_scheduler(self) -> None:
        """Refuse sampling without a scheduler (a pipeline built with ``scheduler=None``, which the constructors take,
        or given None later): the routing and the loop follow its timesteps. Run before every sampling run and
        `expert_schedule`."""
        if getattr(self, "scheduler", None) is None:
            raise ValueError(
                "`scheduler` is None: the pipeline samples with a diffusers scheduler; give it one, e.g. "
                "`pipe.scheduler = DDIMScheduler()` (one that fits the model's prediction type)."
            )

    def resolve_partition(
        self,
        num_inference_steps: int,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> TimestepPartition:
        """The partition a run of ``num_inference_steps`` (or of custom ``timesteps`` or ``sigmas``) routes by:
        `partition`, unless a subclass's switch depends on the step count (`DualBackbonePipeline`'s step fraction).
        The pipelines pass ``timesteps`` and ``sigmas`` only when they are given, so an override without them (written
        as ``resolve_partition(self, num_inference_steps)``) still serves runs without custom values; a run with them
        is refused naming the override (`_resolve_partition`)."""
        return self.partition

    def _resolve_partition(self, num_inference_steps: int | None, custom: Mapping[str, Any]) -> TimestepPartition:
        """`resolve_partition` with the run's custom ``timesteps`` or ``sigmas`` (``custom``, passed only when given):
        a `ValueError` names an override that takes no such argument (one written before they were added), rather
        than Python's TypeError about an unexpected keyword, or a partition for a step count the run does not use."""
        if custom:
            parameters = inspect.signature(self.resolve_partition).parameters
            any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
            for name, value in custom.items():
                if name not in parameters and not any_keyword:
                    override = getattr(type(self).resolve_partition, "__qualname__", "resolve_partition")
                    override = override.rsplit("<locals>.", 1)[-1]
                    raise ValueError(
                        f"`{name}`={value!r} cannot be given to this pipeline: {override} takes no `{name}` (an "
                        "override written before the pipelines took custom timesteps and sigmas), so its partition "
                        "would be for a step count the run does not use. Give it the run's custom values, as "
                        "`resolve_partition(self, num_inference_steps, timesteps=None, sigmas=None)`, or sample with "
                        "`num_inference_steps`."
                    )
        return self.resolve_partition(num_inference_steps, **custom)

    # --------------------------------------------------------------------------------------------------------------
    # class names: DiTPipeline's `id2label` (saved in model_index.json) and `get_label_ids`
    def register_class_names(self, id2label: Mapping[int | str, str] | None) -> None:
        """Save ``id2label`` (class index -> name; a name may list synonyms separated by commas, as DiT's ImageNet
        names) in the pipeline's config, with the indices as strings (as JSON keeps them); see `checked_id2label`."""
        if id2label is not None:
            num_class_embeds = class_embedding_count(self.label_config(self._loaded_denoiser()))
            try:
                if num_class_embeds is None:
                    raise ValueError("`id2label` was given, but this pipeline's model is not class-conditional.")
                id2label = checked_id2label(id2label, num_data_classes(num_class_embeds))
            except ValueError as error:  # `from_pipe` and `from_pretrained` pass the source's names on
                raise ValueError(
                    f"{error} Not passed by you, `id2label` was kept from the pipeline or folder `from_pipe` or "
                    "`from_pretrained` started from: pass `id2label=None` to drop those names, or the new model's own."
                ) from None
        self.register_to_config(id2label=id2label)

    def check_class_names(self) -> None:
        """Refuse class names (``id2label``) that do not fit the pipeline's model, as the constructor refuses them,
        also after a model was swapped in (``pipe.unet = ...``, which diffusers registers unchecked, keeps the
        pipeline's class names): run before sampling, `get_label_ids` and `save_pretrained` (a folder whose names do
        not fit its model would not load)."""
        id2label = getattr(self.config, "id2label", None)
        denoiser = self._loaded_denoiser() if id2label else None
        if denoiser is None:
            return
        num_class_embeds = class_embedding_count(self.label_config(denoiser))
        try:
            if num_class_embeds is None:
                raise ValueError("the model is not class-conditional.")
            checked_id2label(id2label, num_data_classes(num_class_embeds))
        except ValueError as error:
            raise ValueError(
                f"The pipeline's class names (`id2label`) do not fit its model: {error} A model swapped in after "
                "construction keeps the pipeline's class names: give it its own with "
                "`pipe.register_class_names({index: name, ...})`, or none with `pipe.register_class_names(None)`."
            ) from None

    def _loaded_denoiser(self) -> torch.nn.Module:
        """A network of the pipeline that is in memory (its class count is the pipeline's)."""
        return self.stage_denoiser(0)[0]

    @property
    def labels(self) -> dict[str, int]:
        """Each class name (and synonym) of the saved ``id2label`` -> its class index, sorted by name (DiTPipeline's
        ``labels``), but for a name of two classes; empty when the pipeline has no class names."""
        return label_ids(getattr(self.config, "id2label", None) or {})

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """The class indices of ``label`` (a class name or a list of them), for ``class_labels``, as
        `DiTPipeline.get_label_ids`. A `ValueError` names a label the pipeline does not know and lists its names."""
        self.check_class_names()
        labels = [label] if isinstance(label, str) else list(label) if isinstance(label, (list, tuple)) else None
        if labels is None or not all(isinstance(name, str) for name in labels):  # an index is `class_labels`' value
            raise ValueError(f"`label` must be a class name or a list of class names, got {label!r}.")
        named = _name_classes(getattr(self.config, "id2label", None) or {})
        for name in labels:  # DiT's takes the last of them, silently
            classes = named.get(name, [])
            if len(classes) > 1:
                raise ValueError(
                    f"`label` {name!r} names classes {', '.join(map(str, classes[:-1]))} and {classes[-1]}: pass its "
                    "index as `class_labels` (or one of the class's other names)."
                )
        unknown = [name for name in labels if name not in named]
        if unknown:
            listed = ", ".join(self.labels) or "none: this pipeline was saved without `id2label`"
            raise ValueError(f"`label` {unknown} is not a class name of this pipeline; its names are: {listed}.")
        return [named[name][0] for name in labels]  # each names one class (checked above)

    # --------------------------------------------------------------------------------------------------------------
    def _prepare_class_labels(
        self, class_labels: Sequence[int] | torch.Tensor | None, batch_size: int, config, device: torch.device
    ) -> tuple[torch.Tensor | None, int]:
        num_class_embeds = class_embedding_count(config)
        embed_type = getattr(config, "class_embed_type", None)
        if num_class_embeds is None and embed_type is not None:  # labels are values: no classes, no null label
            raise ValueError(
                f"This pipeline's model embeds its `class_labels` with `class_embed_type`={embed_type!r}, as values, "
                "not class indices: the pipeline's `class_labels` are indices into `num_class_embeds` (the last one "
                "the unconditional label), so it cannot drive this model. Call the model with its labels in your "
                "own denoising loop."
            )
        if num_class_embeds is not None and num_data_classes(num_class_embeds) < 1:
            raise ValueError(
                f"This pipeline's model has `num_class_embeds`={num_class_embeds}: its last class embedding is the "
                "unconditional label (classifier-free guidance), which leaves it no class to sample with "
                "`class_labels`. A class-conditional model needs `num_class_embeds` = classes + 1 >= 2."
            )
        if class_labels is None:
            if num_class_embeds is not None:
                names = list(self.labels)  # by name, as `get_label_ids` lists them
                shown = ", ".join(names[:10]) + (f", ... ({len(names)} names)" if len(names) > 10 else "")
                by_name = f", or pipe.get_label_ids([...]) of its names: {shown}" if names else ""
                raise ValueError(
                    "`class_labels` must be given: this pipeline's model is class-conditional. Pass one class index "
                    f"per image, 0 to {num_data_classes(num_class_embeds) - 1} (e.g. `class_labels=[0, 1]`){by_name}."
                )
            return None, batch_size
        if num_class_embeds is None:
            raise ValueError("`class_labels` were given, but this pipeline's model is not class-conditional.")
        labels = _integer_labels(class_labels, num_class_embeds)
        if batch_size not in (1, labels.numel()):
            raise ValueError(f"`batch_size`={batch_size} disagrees with the {labels.numel()} `class_labels` given.")
        return labels.to(device), labels.numel()

    def _guidance_scales(
        self, guidance_scale: float | Sequence[float], num_stages: int, conditional: bool = True
    ) -> list[float]:
        value = guidance_scale.tolist() if hasattr(guidance_scale, "tolist") else guidance_scale  # tensor / numpy
        scales = [value] * num_stages if isinstance(value, numbers.Real) else value
        if (
            not isinstance(scales, (list, tuple))
            or len(scales) != num_stages
            or any(isinstance(s, bool) or not isinstance(s, numbers.Real) for s in scales)
        ):
            raise ValueError(
                f"`guidance_scale` must be a number >= 1 or one per stage ({num_stages}), got {guidance_scale!r}."
            )
        scales = [float(s) for s in scales]
        if not all(math.isfinite(s) for s in scales):
            raise ValueError(f"`guidance_scale` must be finite, got {_shown(value)}.")
        if any(s < 1.0 for s in scales):
            raise ValueError(f"`guidance_scale` must be >= 1 (1 disables guidance), got {_shown(value)}.")
        if not conditional and any(s != 1.0 for s in scales):
            raise ValueError(
                f"`guidance_scale`={_shown(value)} needs a class-conditional model, but this pipeline's model is "
                "unconditional (classifier-free guidance has no label to drop): leave `guidance_scale` at 1."
            )
        return scales

    def denoise(
        self,
        stage: int,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """One model call of ``stage``'s network, with classifier-free guidance when ``guidance_scale > 1``. The
        network gets ``sample`` in its own dtype (the stage networks may differ, e.g. after a per-component
        ``torch_dtype``), and the prediction comes back in ``sample``'s."""
        model, kwargs = self.stage_denoiser(stage)
        dtype = compute_dtype(model)
        if class_labels is None or guidance_scale == 1.0:
            labels = self.label_conditioning(class_labels, dtype)
            output = call_denoiser(model, sample.to(dtype), timestep, **labels, **kwargs).sample
            return self._mean_prediction(output, sample).to(sample.dtype)
        null = torch.full_like(class_labels, null_class_label(class_embedding_count(self.label_config(model))))
        if torch.is_tensor(timestep) and timestep.ndim == 1:
            timestep = torch.cat([timestep, timestep])
        labels = self.label_conditioning(torch.cat([class_labels, null]), dtype)
        both = call_denoiser(model, torch.cat([sample, sample]).to(dtype), timestep, **labels, **kwargs)
        cond, uncond = self._mean_prediction(both.sample, sample).to(sample.dtype).chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)  # classifier-free guidance (Ho & Salimans, eq. 6)
        if cond.shape[1] == sample.shape[1]:  # no learned variance: no copy
            return guided
        # a learned variance the scheduler reads (DiT's second half) is the conditional one, as DiT's sampler takes it
        return torch.cat([guided[:, : sample.shape[1]], cond[:, sample.shape[1] :]], dim=1)

    def _mean_prediction(self, output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The prediction without a learned variance (DiT's second half), unless the scheduler reads it."""
        if output.shape[1] == 2 * sample.shape[1] and not self._scheduler_reads_variance():
            return output[:, : sample.shape[1]]
        return output

    def _scheduler_reads_variance(self) -> bool:
        """Whether the scheduler takes a learned variance from the model's output (``variance_type`` learned), rather
        than only dropping it (`VARIANCE_DROPPING_SCHEDULERS`, which are handed the mean half as any other)."""
        return _learned_variance_type(self.scheduler) is not None and not _drops_learned_variance(self.scheduler)

    def _check_variance_output(self, config) -> None:
        """Refuse, before sampling, a model whose prediction is neither the latents' channels nor twice them (a
        learned variance), which the scheduler's step would broadcast over the latents or fail on, and a scheduler
        that reads a learned variance for a model that predicts none (diffusers' step then fails on ``None``
        arithmetic)."""
        in_channels, out_channels = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
        if in_channels and out_channels and out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(
                f"The model predicts out_channels={out_channels}, but denoises in_channels={in_channels}: its "
                "prediction must have the latents' channels (or twice them, with a learned variance as DiT's)."
            )
        if self._scheduler_reads_variance() and in_channels and out_channels and out_channels != 2 * in_channels:
            raise ValueError(
                f"`scheduler` {type(self.scheduler).__name__} has variance_type="
                f"{self.scheduler.config.variance_type!r}, which reads a learned variance from the model's output, but "
                f"the model predicts none (out_channels={out_channels}, not twice in_channels={in_channels}): build "
                "the scheduler with `variance_type='fixed_small'` (or its default)."
            )
        variance_type = _learned_variance_type(self.scheduler)
        if variance_type is not None and _drops_learned_variance(self.scheduler) and in_channels and in_channels != 3:
            raise ValueError(
                f"`scheduler` {type(self.scheduler).__name__} has variance_type={variance_type!r}, with which its step "
                "takes the first 3 channels of the model's output as its prediction (diffusers' rule for RGB pixel "
                f"models), but the model denoises in_channels={in_channels}: build it with `variance_type=None` (the "
                "pipeline hands it the mean half of a learned-variance output itself)."
            )

    # --------------------------------------------------------------------------------------------------------------
    def expert_schedule(
        self,
        num_inference_steps: int | None = 50,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> list[tuple[float, int]]:
        """``(timestep, stage)`` of every model call a run with ``num_inference_steps`` (or with custom ``timesteps``
        or ``sigmas``, as the pipeline's call takes them) makes: which network runs which step (stage 0 is the clean
        end). It is the schedule the sampling loop follows, from a dry run of a copy of the scheduler (no model is
        called)."""
        custom = custom_schedule(timesteps, sigmas)
        if not (custom and num_inference_steps is None):  # None with custom values, as diffusers' docs ask
            (num_inference_steps,) = positive_integer_arguments(num_inference_steps=num_inference_steps)
        self.check_components()
        self.check_scheduler()
        self.check_prediction_type()
        return self._stage_schedule(self._resolve_partition(num_inference_steps, custom), num_inference_steps, custom)

    def _stage_schedule(
        self, partition: TimestepPartition, num_inference_steps: int, custom: Mapping[str, Any] | None = None
    ) -> list[tuple[float, int]]:
        router = StageRouter(partition, self.scheduler)  # checks the scheduler's units
        calls = model_call_timesteps(self.scheduler, num_inference_steps, **(custom or {}))
        return [(t, router(t, is_corrector)) for t, is_corrector in calls]

    @property
    def num_timesteps(self) -> int:
        """The number of model calls of the last run (``len(scheduler.timesteps)``)."""
        return self._num_timesteps

    @property
    def guidance_scale(self) -> float | Sequence[float]:
        """The ``guidance_scale`` of the last run, as given (one value, or one per stage). A `callback_on_step_end`
        that sets ``pipe._guidance_scale`` changes the guidance of the following steps, as in diffusers (checked as
        the argument is: 1, or a value below it such as diffusers' callbacks' 0.0, turns guidance off)."""
        return self._guidance_scale

    @property
    def interrupt(self) -> bool:
        """Whether the current run was interrupted: a `callback_on_step_end` that sets ``pipe._interrupt = True``
        skips the remaining steps, and the latents so far are decoded (diffusers' contract). Reset at every call."""
        return self._interrupt

    def _sample_shape(
        self, config, stages: Sequence[int], batch_size: int, height: int | None, width: int | None
    ) -> tuple[int, int, int, int]:
        """``(batch, channels, latent height, latent width)`` of the initial noise for images of ``height`` x
        ``width`` pixels (default: the model's ``sample_size``, times the VAE's scale factor; both must be given for
        a model without one)."""
        vae = getattr(self, "vae", None)
        vae_scale = vae_scale_factor(vae)
        channels = None if vae is None else _vae_latent_channels(vae)
        if channels is not None and channels != config.in_channels:  # else its decoder fails, after every step
            raise ValueError(
                f"`vae` {type(getattr(vae, '_orig_mod', vae)).__name__} decodes latents of "
                f"{channels} channels, but the networks denoise latents of `in_channels`="
                f"{config.in_channels}: give a VAE whose latents the networks were trained on."
            )
        statistics = None if vae is None else latent_statistics_error(getattr(vae, "_orig_mod", vae).config, channels)
        if statistics is not None:  # else the decoding fails (or divides by zero), after every step
            raise ValueError(f"`vae` {type(getattr(vae, '_orig_mod', vae)).__name__}: {statistics}.")
        networks = {id(n): n for n in (self.stage_denoiser(stage)[0] for stage in stages)}.values()  # each once
        multiple = math.lcm(*(spatial_multiple(network.config) for network in networks)) * vae_scale
        size = getattr(config, "sample_size", None)  # a custom backbone's config may have no such entry
        if size is None and (height is None or width is None):  # `UNet2DModel`'s default: no size to fall back on
            raise ValueError(
                f"`height` and `width` must be given: the model has no `sample_size` to default to, got "
                f"height={height!r}, width={width!r}."
            )
        default = (None, None) if size is None else (size, size) if isinstance(size, int) else tuple(size)
        sides = []
        for name, value, fallback in (("height", height, default[0]), ("width", width, default[1])):
            value = fallback * vae_scale if value is None else value
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or value % multiple:
                raise ValueError(
                    f"`{name}` must be a positive multiple of {multiple} (the networks' downsampling"
                    f"{' times the VAE scale factor' if vae_scale > 1 else ''}), got {value!r}."
                )
            sides.append(int(value) // vae_scale)  # a numpy integer too, as a Python int
        for network in networks:
            if _square_only(network) and sides[0] != sides[1]:
                raise ValueError(  # its unpatchify takes a square token grid: a RuntimeError of its reshape otherwise
                    f"`height` and `width` must be equal for a {type(getattr(network, '_orig_mod', network)).__name__} "
                    f"(it samples square images only), got height={sides[0] * vae_scale}, width={sides[1] * vae_scale}."
                )
            fixed = network.config.sample_size if getattr(network, "_fixed_sample_size", False) else None
            for name, side in zip(("height", "width"), sides):
                if fixed is not None and side != fixed:  # e.g. U-ViT: a position embedding learned for one size
                    raise ValueError(
                        f"`{name}` must be {fixed * vae_scale}: the {type(network).__name__}'s position embedding is "
                        f"learned for its `sample_size` {fixed}{' times the VAE scale factor' if vae_scale > 1 else ''}"
                        f", got {side * vae_scale}. Leave `{name}` out, or train a network of that size."
                    )
        return (batch_size, config.in_channels, *sides)

    def _prepare_latents(
        self,
        shape: tuple[int, ...],
        latents: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The initial noise (``latents`` given by the user, or drawn from ``generator``), scaled to the scheduler's
        first noise level as diffusers' pipelines do."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif not torch.is_tensor(latents) or not latents.is_floating_point() or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            dtype_note = "" if not torch.is_tensor(latents) or latents.is_floating_point() else f" ({latents.dtype})"
            raise ValueError(f"`latents` must be a floating-point tensor of shape {shape}, got {got}{dtype_note}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def _check_callback(self, callback, tensor_inputs: Sequence[str]) -> None:
        if callback is not None and not callable(callback):
            raise ValueError(f"`callback_on_step_end` must be callable, got {callback!r}.")
        if isinstance(tensor_inputs, str):  # not its characters
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a list of names, got the string {tensor_inputs!r}: "
                f"pass [{tensor_inputs!r}]."
            )
        if not isinstance(tensor_inputs, (list, tuple)):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a list of names, got {tensor_inputs!r}.")
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {unknown}."
            )

    @torch.no_grad()
    @offloaded_on_error
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float | Sequence[float] = 1.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        eta: float | None = None,
        scheduler_step_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images (the number of `class_labels` when those are given).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes generation deterministic; a
                list gives one generator per image and must have one per image of the batch.
            num_inference_steps (`int`, defaults to 50): denoising steps of the scheduler (None with `timesteps` or
                `sigmas`).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (float32), `"pt"` (in the dtype the VAE
                decodes in, float32 for a ``force_upcast`` float16 one, or without a VAE the latents', which are the
                first network to run's), or `"latent"` (no VAE decoding).
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` rather than a tuple.
            class_labels (`list[int]` or `torch.Tensor`, *optional*): one class per image, for class-conditional models:
                python ints or an integer tensor (floats and bools are refused, not rounded).
            guidance_scale (`float` or `list[float]`, defaults to 1.0): classifier-free guidance scale, one for all
                stages or one per stage (clean stage first), finite and >= 1; 1 disables guidance. Class-conditional
                models only: an unconditional model refuses any other value.
            num_images_per_prompt (`int`, defaults to 1): images per class label (each label repeated, in order);
                for an unconditional model the batch is ``batch_size * num_images_per_prompt``.
            height (`int`, *optional*): image height in pixels, defaults to the model's ``sample_size`` (times the
                VAE's scale factor; required, with `width`, for a model whose ``sample_size`` is None); a multiple of
                the networks' downsampling factor (and of the VAE's).
            width (`int`, *optional*): image width, as ``height``.
            latents (`torch.Tensor`, *optional*): the initial noise, shape ``(batch, in_channels, height, width)`` in
                latent pixels, drawn from a unit normal; it is scaled by the scheduler's ``init_noise_sigma`` as in
                diffusers' pipelines. Without it the noise is drawn from ``generator``.
            eta (`float`, *optional*): DDIM's noise weight (0: deterministic DDIM, 1: DDPM-like). Only for schedulers
                whose ``step`` takes ``eta``: any other scheduler refuses it with a `ValueError` (diffusers' own
                pipelines drop it silently). Not given: the step's own default (0.0 for `DDIMScheduler`, 0.3 for
                `TCDScheduler`), as `DDPMPipeline` and `DiTPipeline` leave it (`DDIMPipeline` and
                `StableDiffusionPipeline` pass 0.0, so a TCD run there matches ``eta=0.0`` here).
            scheduler_step_kwargs (`dict`, *optional*): further keyword arguments of ``scheduler.step`` (e.g.
                ``{"s_churn": 0.5}`` for `EulerDiscreteScheduler`); a key the step does not take is a `ValueError`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called
                after every model call as ``callback_on_step_end(pipe, i, t, callback_kwargs)``; ``callback_kwargs``
                holds the tensors named in `callback_on_step_end_tensor_inputs`, and a ``"latents"`` entry in the
                returned dict replaces the latents. A callback that sets ``pipe._interrupt = True`` stops the run:
                the remaining steps are skipped and the latents so far are the output; one that sets
                ``pipe._guidance_scale`` changes the guidance of the following steps (1 or 0.0 turns it off).
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): tensors passed to the
                callback, among the pipeline's ``_callback_tensor_inputs``; None is the default.
            timesteps (`list[float]`, *optional*): custom timesteps for a scheduler whose ``set_timesteps`` takes
                them (`DDPMScheduler`, `EulerDiscreteScheduler`, ...), as `StableDiffusionPipeline`'s; the run has
                one step per timestep and ``num_inference_steps`` is not used (it may be None). Each model call goes
                to the stage of its actual timestep (see `expert_schedule`, which takes them too). Another scheduler
                refuses them with a `ValueError`, as diffusers' ``retrieve_timesteps`` does.
            sigmas (`list[float]`, *optional*): custom noise levels instead, as ``timesteps``, in the scheduler's
                own convention (`EulerDiscreteScheduler`'s end with the final sigma, usually 0;
                `FlowMatchEulerDiscreteScheduler` appends it); only one of ``timesteps`` and ``sigmas``.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. check the inputs
        _refuse_labels_as_batch_size(batch_size)
        custom = custom_schedule(timesteps, sigmas)  # passed on only when given (overrides without them still run)
        batch_size, num_images_per_prompt = positive_integer_arguments(
            batch_size=batch_size, num_images_per_prompt=num_images_per_prompt
        )  # numpy integers, as diffusers takes them, become Python ints
        if not (custom and num_inference_steps is None):  # None with custom values, as diffusers' docs ask
            (num_inference_steps,) = positive_integer_arguments(num_inference_steps=num_inference_steps)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:  # as diffusers' checks let it through: the default
            callback_on_step_end_tensor_inputs = ("latents",)
        self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        self.check_components()
        self.check_class_names()
        self.check_scheduler()
        self.check_prediction_type()
        partition = self._resolve_partition(num_inference_steps, custom)
        # which network runs which model call (of the custom timesteps too: routed by the timesteps the run takes)
        schedule = self._stage_schedule(partition, num_inference_steps, custom)
        # the stage networks' order, for their prefetch
        self._plan_stage_offload([stage for _, stage in schedule], partition.num_stages)
        denoiser = self.stage_denoiser(schedule[0][1])[0]  # the first network to run: shape, dtype, labels
        config, model_dtype = denoiser.config, compute_dtype(denoiser)  # `.dtype` would walk every submodule
        self._check_variance_output(config)
        label_config = self.label_config(denoiser)
        class_labels, batch_size = self._prepare_class_labels(class_labels, batch_size, label_config, device)
        if class_labels is not None:
            class_labels = class_labels.repeat_interleave(num_images_per_prompt)
        batch_size *= num_images_per_prompt
        scales = self._guidance_scales(guidance_scale, partition.num_stages, conditional=class_labels is not None)
        self._guidance_scale = guidance_scale
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"`generator` must be a torch.Generator or a list of them, got {generator!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but the batch has {batch_size} images: give "
                "one generator per image, or a single generator."
            )
        step_kwargs = scheduler_step_kwargs_for(self.scheduler, generator, eta, scheduler_step_kwargs)
        shape = self._sample_shape(config, sorted({stage for _, stage in schedule}), batch_size, height, width)

        # 2. timesteps
        set_sampling_timesteps(self.scheduler, num_inference_steps, device=device, **custom)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        if len(timesteps) != len(schedule):
            raise RuntimeError(f"The dry run of {type(self.scheduler).__name__} disagrees with its timesteps.")

        # 3. initial noise at the scheduler's first noise level
        latents = self._prepare_latents(shape, latents, generator, device, model_dtype)
        seed_noise_sampler(self.scheduler, latents, generator)  # DPMSolverSDE's noise, from the generator too

        # 4. denoising loop: every model call goes to the network of the stage its noise level falls in
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:  # set by a callback: the remaining steps are skipped, as in diffusers' pipelines
                continue
            stage = schedule[i][1]  # the stage switch (a Heun-type predictor/corrector pair stays in one stage)
            model_input = latents
            if hasattr(self.scheduler, "scale_model_input"):
                model_input = self.scheduler.scale_model_input(latents, t)
            timestep = t.expand(latents.shape[0]) if torch.is_tensor(t) else t  # one per sample, as DiT needs
            model_output = self.denoise(stage, model_input, timestep, class_labels, scales[stage])
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample

            if callback_on_step_end is not None:  # the callback may read and replace the latents
                callback_kwargs = {}
                for k in callback_on_step_end_tensor_inputs:
                    callback_kwargs[k] = locals()[k]
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = _callback_latents(callback_outputs, latents)
                if self._guidance_scale is not guidance_scale:  # set by the callback: diffusers' dynamic guidance
                    guidance_scale = self._guidance_scale
                    scales = self._guidance_scales(
                        _guidance_turned_off(guidance_scale), partition.num_stages, class_labels is not None
                    )

        # 5. decode latents (latent diffusion) and convert to the requested output type
        images = latents
        if output_type != "latent":
            if getattr(self, "vae", None) is not None:
                images = self._decode(latents)
            # "pt" keeps the images' dtype, as diffusers' postprocess does; "np" and "pil" go through float32
            images = VaeImageProcessor(do_resize=False).postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's images of sampled ``latents``. A float16 VAE whose config asks for it (``force_upcast``: SDXL's
        VAE overflows in float16) decodes in float32 and is left in float16, as diffusers' SDXL pipeline does."""
        vae = self.vae
        with upcast_vae(vae):
            return vae.decode(model_to_vae_latents(vae, latents).to(vae.dtype), return_dict=False)[0]

    # --------------------------------------------------------------------------------------------------------------
    # saving: a folder that loads with `<Pipeline>.from_pretrained`, and with
    # `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` locally and from the Hub
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ) -> None:
        """Save every component as diffusers does (safetensors by default; ``safe_serialization=False`` writes
        ``.bin`` files, which are only ever read back with ``weights_only=True``), plus the re-export files that let
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` find the package's classes. With
        ``push_to_hub=True`` the complete folder is then uploaded (``repo_id``, ``token``, ``private``,
        ``commit_message``, ``create_pr`` as in diffusers); a failed push is an `OSError` naming the repository. The
        arguments come in diffusers' order (``variant`` and ``max_shard_size`` before ``push_to_hub``, then
        ``use_flashpack``)."""
        self.check_class_names()  # before anything is written
        for name, component in self.components.items():
            if isinstance(component, torch.nn.Module):
                check_savable(component, f"`{name}`")
        push = pop_push_kwargs(kwargs, save_directory, push_to_hub)
        super().save_pretrained(
            save_directory,
            safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            use_flashpack=use_flashpack,
            **kwargs,
        )
        remove_stale_weight_indexes(save_directory, safe_serialization, variant)
        write_reexport_files(save_directory, type(self))
        if push_to_hub:
            push_saved_folder(self, save_directory, is_pipeline=True, **push)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> StagedDiffusionPipeline:
        r"""
        Load a saved pipeline folder (or Hub repository) as this package's classes.

        No file from the folder is executed: every class and module name in `model_index.json` is checked against
        the package's own classes (and diffusers' and transformers' exported ones), each component is loaded by the
        class the package resolves itself, and a component of the wrong kind is a `ValueError`. With
        ``trust_remote_code=True`` the folder is loaded by diffusers itself, re-export files included (only for a
        folder you trust), after the same checks of ``dtype``/``torch_dtype``. Components may be passed to replace the saved ones (``scheduler=...``);
        ``dtype`` (or diffusers' deprecated ``torch_dtype``: one dtype or a ``{component: dtype, "default": dtype}``
        dict), ``variant``, ``use_safetensors`` and ``low_cpu_mem_usage`` are passed on to every model, and so is a
        ``device_map`` of one device (``"cpu"``, ``"cuda"``), which becomes the pipeline's ``hf_device_map`` as in
        diffusers.
        """
        if kwargs.get("trust_remote_code"):  # the user's explicit choice: diffusers' own loading, code files included
            # (the base class: the folder names the pipeline, whose components are checked once it is loaded)
            check_trusted_load_dtypes(None if cls is StagedDiffusionPipeline else cls, kwargs)
            try:
                pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            except IndexError as error:
                clear = trusted_variant_error(error, cls.__name__, kwargs.get("variant"))
                if clear is None:
                    raise
                raise clear from error
            if cls is not StagedDiffusionPipeline and not isinstance(pipeline, cls):
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds a {type(pipeline).__name__}, not a {cls.__name__}: load "
                    f"it with {type(pipeline).__name__}.from_pretrained."
                )
            check_trusted_load_dtypes(type(pipeline), kwargs)
            for component in pipeline.components.values():  # diffusers' own models too: same seed, same images
                if isinstance(component, torch.nn.Module):
                    realign_storage(component)
            return pipeline
        kwargs.pop("trust_remote_code", None)
        return load_pipeline(cls, pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> StagedDiffusionPipeline:
        """As diffusers' `from_pipe` (the new pipeline shares ``pipeline``'s components; a component or config value
        passed here replaces the source's). A model component of the source is carried over when it is an instance
        of a class the new pipeline's signature names, a subclass included (a user's ``MyUNet(MultiStageUNet2DModel)``,
        the package's `EarlyExitUViT2DModel` as a `DualBackbonePipeline` backbone): diffusers' own check asks for the
        exact class, dropped such a component with a warning and then failed ("expected [...] but only {...} were
        passed"). So is one whose parameter names no class (a subclass's ``__init__(self, clean, noisy, scheduler)``
        without annotations, which diffusers dropped the same way). The constructor checks the components as it
        checks any."""
        expected, _ = cls._get_signature_keys(cls)
        annotated = cls._get_signature_types()
        for name, component in pipeline.components.items():
            if name not in expected or name in kwargs or not isinstance(component, ModelMixin):
                continue
            hints = annotated.get(name, ())
            classes = tuple(c for c in hints if isinstance(c, type) and c not in (type(None), inspect.Parameter.empty))
            unannotated = all(hint is inspect.Parameter.empty for hint in hints)
            if unannotated or (classes and type(component) not in classes and isinstance(component, classes)):
                kwargs[name] = component  # passed on explicitly, as `from_pipe(pipe, unet=pipe.unet)` would be
        _check_from_pipe_components(cls, pipeline, kwargs)
        return super().from_pipe(pipeline, **kwargs)


def _check_from_pipe_components(cls: type, pipeline: DiffusionPipeline, kwargs: Mapping[str, Any]) -> None:
    """A `ValueError` for `cls.from_pipe(pipeline, **kwargs)` where a component ``cls`` needs (no default in its
    signature) is neither passed nor carried over from ``pipeline``: it has none of that name, or a model of a class
    the new pipeline's signature does not name (which diffusers drops, then fails with "expected [...], but only
    {...} were passed", listing optional components too and not saying what to pass)."""
    expected, _ = cls._get_signature_keys(cls)
    parameters = inspect.signature(cls.__init__).parameters
    annotated = cls._get_signature_types()
    source = pipeline.components
    problems = {}  # name -> what the source has instead
    for name in sorted(expected):
        if name in kwargs or name not in parameters or parameters[name].default is not inspect.Parameter.empty:
            continue
        component = source.get(name)
        hints = annotated.get(name, ())
        classes = tuple(c for c in hints if isinstance(c, type) and c not in (type(None), inspect.Parameter.empty))
        if name not in source:
            problems[name] = f"no `{name}`"
        elif isinstance(component, ModelMixin) and classes and type(component) not in classes:
            wanted = " or ".join(c.__name__ for c in classes)
            problems[name] = f"a {type(component).__name__} as `{name}`, not a {wanted}"
    if problems:
        source_name = type(pipeline).__name__
        raise ValueError(
            f"{cls.__name__}.from_pipe({source_name}) cannot share the components it needs: the {source_name} has "
            f"{' and '.join(problems.values())}; pass {'it' if len(problems) == 1 else 'them'}: "
            f"`from_pipe(pipe, {', '.join(f'{name}=...' for name in problems)})`."
        )


# schedulers whose step, with variance_type "learned" or "learned_range", only drops a learned variance: it takes the
# first 3 channels of the model's output as the prediction (diffusers' rule for RGB pixel models); SA-Solver also
# draws its noise in the shape of the whole output. The pipelines hand them the mean half, as any scheduler that does
# not read the variance, and refuse them for models of other channels, which they would cut.
VARIANCE_DROPPING_SCHEDULERS = (
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverMultistepInverseScheduler",
    "SASolverScheduler",
)


def _learned_variance_type(scheduler) -> str | None:
    """The scheduler's ``variance_type`` when it is a learned one ("learned", "learned_range"), else None."""
    variance_type = getattr(scheduler.config, "variance_type", None)
    return variance_type if variance_type in ("learned", "learned_range") else None


def _drops_learned_variance(scheduler) -> bool:
    """Whether ``scheduler`` (or a class it derives from) is one of `VARIANCE_DROPPING_SCHEDULERS`."""
    return any(cls.__name__ in VARIANCE_DROPPING_SCHEDULERS for cls in type(scheduler).__mro__)


def checked_id2label(id2label: Mapping[int | str, str], classes: int) -> dict[str, str]:
    """``id2label`` with string indices, sorted; a `ValueError` names a key that is no class index in
    ``[0, classes)`` or a name that is no text (a name may name two classes: see `get_label_ids`)."""
    if not isinstance(id2label, Mapping):
        raise ValueError(f"`id2label` must be a dict of class index -> name, got {type(id2label).__name__}.")
    names = {}
    for key, name in id2label.items():
        text_index = isinstance(key, str) and key.isascii() and key.isdigit()  # JSON's keys are strings
        index = int(key) if text_index or (isinstance(key, numbers.Integral) and not isinstance(key, bool)) else -1
        if not 0 <= index < classes:
            raise ValueError(
                f"`id2label` keys must be class indices in [0, {classes}) (the model's classes, without the "
                f"unconditional label), got {key!r}."
            )
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"`id2label` names must be non-empty strings, got {name!r} for class {index}.")
        if index in names:  # `1` and `"1"`: one would silently replace the other
            raise ValueError(f"`id2label` names class {index} twice ({names[index]!r} and {name!r}).")
        names[index] = name
    return {str(index): names[index] for index in sorted(names)}


def label_ids(id2label: Mapping[str, str]) -> dict[str, int]:
    """Name (each comma-separated synonym) -> class index of a saved ``id2label``, of the names of one class only."""
    return {name: classes[0] for name, classes in _name_classes(id2label).items() if len(classes) == 1}


def _name_classes(id2label: Mapping[str, str]) -> dict[str, list[int]]:
    """Name (each comma-separated synonym) -> the indices of the classes it names, sorted by name: a name may name
    two classes (ImageNet's, as DiT's `id2label`, call classes 134 and 517 "crane")."""
    classes = {}
    for key, names in id2label.items():
        for name in (n.strip() for n in names.split(",")):
            if name and int(key) not in classes.setdefault(name, []):
                classes[name].append(int(key))
    return dict(sorted(classes.items()))


def spatial_multiple(config) -> int:
    """What a network's height and width must be multiples of: its patch size (DiT), or ``2**(levels - 1)`` for a
    U-Net that halves the resolution between its levels (``channel_mult`` of DDPM++, ``block_out_channels``)."""
    if getattr(config, "patch_size", None):
        return int(config.patch_size)
    levels = getattr(config, "channel_mult", None) or getattr(config, "block_out_channels", None) or (1,)
    return 2 ** (len(levels) - 1)


def _square_only(network: torch.nn.Module) -> bool:
    """Whether ``network`` unpatchifies a square token grid only: a `DiTTransformer2DModel`, or diffusers' legacy
    `Transformer2DModel` on patches without PixArt's ``adaln_single`` (a DiT built in the old class)."""
    module = getattr(network, "_orig_mod", network)
    legacy = isinstance(module, Transformer2DModel) and getattr(module, "is_input_patches", False)
    return isinstance(module, DiTTransformer2DModel) or (legacy and getattr(module, "adaln_single", None) is None)


def custom_schedule(timesteps: Sequence[float] | None, sigmas: Sequence[float] | None) -> dict[str, Any]:
    """The custom ``timesteps`` / ``sigmas`` of a call that were given, as keyword arguments (checked by
    `set_sampling_timesteps` in the scheduler's dry run, before any model call)."""
    return {name: value for name, value in (("timesteps", timesteps), ("sigmas", sigmas)) if value is not None}


def _guidance_turned_off(value: object) -> object:
    """A scale a callback set: 1 for a number in [0, 1), with which diffusers' callbacks turn guidance off (its
    pipelines guide only above 1; `SDCFGCutoffCallback` sets 0.0); anything else as it is, checked as the argument."""
    plain = value.tolist() if hasattr(value, "tolist") else value  # tensor / numpy
    if isinstance(plain, numbers.Real) and not isinstance(plain, bool) and 0 <= plain < 1:
        return 1.0
    return value


def _callback_latents(callback_outputs, latents: torch.Tensor) -> torch.Tensor:
    """The latents after a `callback_on_step_end` call: its ``"latents"`` entry, when it returns one, which must be a
    tensor of the latents' shape (another batch size would change the run's images silently)."""
    if not isinstance(callback_outputs, dict):
        raise ValueError(
            f"`callback_on_step_end` must return a dict (empty, or with the new 'latents'), got {callback_outputs!r}."
        )
    new = callback_outputs.pop("latents", latents)
    if not torch.is_tensor(new) or not new.is_floating_point() or new.shape != latents.shape:
        got = f"shape {tuple(new.shape)} ({new.dtype})" if torch.is_tensor(new) else repr(new)
        raise ValueError(
            f"`callback_on_step_end` returned 'latents' that are not a floating-point tensor of shape "
            f"{tuple(latents.shape)}: got {got}."
        )
    return new


def _refuse_labels_as_batch_size(batch_size: object) -> None:
    """A `ValueError` for class labels given as the first argument, as `DiTPipeline` takes them (``pipe([1, 2])``):
    the first argument here is ``batch_size``, as `DDPMPipeline`'s and `DDIMPipeline`'s."""
    if isinstance(batch_size, (list, tuple, np.ndarray)) or (torch.is_tensor(batch_size) and batch_size.ndim > 0):
        raise ValueError(
            f"`batch_size` must be a positive integer, got {batch_size!r}: class labels go in `class_labels=` "
            "(DiTPipeline's first argument is `batch_size` here)."
        )


INT64_MAX = 2**63 - 1  # what a `long` label holds


def _integer_labels(class_labels, num_class_embeds: int) -> torch.Tensor:
    """``class_labels`` as a 1-D ``long`` tensor of class indices in ``[0, num_class_embeds - 1)``: python ints or an
    integer tensor / array only (a float such as 1.7 is not silently truncated, and a bool is not a class). A value
    out of range is a `ValueError` showing the values as given (one beyond int64 too: not torch's overflow, nor a
    uint64 wrapped around into a negative label)."""
    labels = class_labels
    if isinstance(labels, np.ndarray):  # names, objects, dates (pandas' `.values`): checked as the list they hold
        labels = torch.from_numpy(labels) if labels.dtype.kind in "biufc" else labels.tolist()
    if torch.is_tensor(labels):
        if not is_integer_tensor(labels):
            raise ValueError(
                f"`class_labels` must be integers, got a tensor of dtype {labels.dtype}: {_preview(labels)}."
            )
        if labels.dtype == torch.uint64 and any(v > INT64_MAX for v in labels.reshape(-1).tolist()):
            raise _labels_out_of_range(labels.reshape(-1).tolist(), num_class_embeds)
        labels = labels.reshape(-1).long()
    else:
        values = list(labels) if isinstance(labels, (list, tuple)) else [labels]
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            names = any(isinstance(v, str) for v in values)
            hint = ": turn class names into indices with `pipe.get_label_ids([...])`" if names else ""
            raise ValueError(f"`class_labels` must be integers (class indices), got {class_labels!r}{hint}.")
        values = [int(v) for v in values]
        if any(not -INT64_MAX - 1 <= v <= INT64_MAX for v in values):
            raise _labels_out_of_range(values, num_class_embeds)
        labels = torch.tensor(values, dtype=torch.long)
    classes = num_data_classes(num_class_embeds)
    if labels.numel() == 0 or bool((labels < 0).any()) or bool((labels >= classes).any()):
        raise _labels_out_of_range(labels.tolist(), num_class_embeds)
    return labels


def _labels_out_of_range(values: list[int], num_class_embeds: int) -> ValueError:
    return ValueError(
        f"`class_labels` must be class indices in [0, {num_data_classes(num_class_embeds)}) (the last of the "
        f"{num_class_embeds} embeddings is the unconditional label), got {values}."
    )


def _shown(value) -> str:
    """A number or list of numbers as the error messages show it (``nan``, ``[2.0, inf]``)."""
    return repr([float(v) for v in value]) if isinstance(value, (list, tuple)) else repr(float(value))
