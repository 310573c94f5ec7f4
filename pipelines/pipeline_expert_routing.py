"""Sampling pipeline for expert routing (MEME, Lee et al., AAAI 2024): one scheduler, one denoiser per stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate.hooks import CpuOffload
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderTiny, VQModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.early_exit import EarlyExitUViT2DModel
from ..models.expert_routing import ExpertRoutingModel
from ..partition import TimestepPartition
from ..schedulers import check_prediction_type, scheduler_prediction_type, scheduler_units
from .pipeline_staged import StagedDiffusionPipeline, vae_scale_factor

__all__ = ["ExpertRoutingPipeline", "scheduler_prediction_type"]  # the latter's old home


class ExpertRoutingPipeline(StagedDiffusionPipeline):
    r"""
    Pipeline for image generation with an [`ExpertRoutingModel`]: at every model call the scheduler's noise level
    picks the expert (the stage it falls in), as `WanPipeline` switches between its two transformers at
    ``boundary_ratio``. A Heun-type predictor/corrector pair always stays with one expert.

    The switch points are the experts' ``stage_boundaries``; [`~ExpertRoutingPipeline.expert_schedule`] shows which
    expert runs each model call of a run before it starts. ``guidance_scale`` may be given per expert (clean expert
    first) for class-conditional experts.

    Args:
        experts ([`ExpertRoutingModel`]): the denoisers, one per stage.
        scheduler ([`~diffusers.SchedulerMixin`]): any diffusers scheduler whose ``prediction_type`` is the experts'.
        vae ([`~diffusers.AutoencoderKL`], [`~diffusers.VQModel`], [`~diffusers.AutoencoderTiny`] or
            [`~diffusers.AutoencoderDC`], *optional*): for latent diffusion.
        id2label (`dict`, *optional*): class index -> name of a class-conditional model (saved in
            ``model_index.json``; `get_label_ids` turns names into ``class_labels``), as `DiTPipeline`'s.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMScheduler, UNet2DModel
    >>> from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline
    >>> def unet(width):
    ...     return UNet2DModel(sample_size=8, block_out_channels=(width, width), norm_num_groups=4,
    ...         layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    >>> experts = ExpertRoutingModel([unet(16), unet(8)], stage_boundaries=(500,))
    >>> pipe = ExpertRoutingPipeline(experts=experts, scheduler=DDIMScheduler())
    >>> pipe.set_progress_bar_config(disable=True)
    >>> pipe.expert_schedule(num_inference_steps=4)  # (timestep, expert) of each model call
    [(750.0, 1), (500.0, 1), (250.0, 0), (0.0, 0)]
    >>> pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images.shape
    (2, 8, 8, 3)

    ```
    """

    model_cpu_offload_seq = "experts->vae"

    def __init__(
        self,
        experts: ExpertRoutingModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | VQModel | AutoencoderTiny | AutoencoderDC | None = None,
        id2label: dict[str, str] | None = None,
    ):
        super().__init__()
        _check_experts(experts)
        vae_scale_factor(vae)  # refuses a VAE class the pipelines cannot decode
        self.register_modules(experts=experts, scheduler=scheduler, vae=vae)
        self.register_class_names(id2label)
        self.check_prediction_type()

    def model_prediction_type(self) -> str:
        """What the experts predict (their container's ``prediction_type``), which the scheduler must expect."""
        return self.experts.config.prediction_type

    def check_prediction_type(self) -> None:
        """Refuse a scheduler that expects another prediction type than the experts give."""
        if getattr(self, "scheduler", None) is not None:
            check_prediction_type(self.scheduler, self.model_prediction_type(), model="the experts")

    def check_components(self) -> None:
        _check_experts(self.experts)

    @property
    def partition(self) -> TimestepPartition:
        return self.experts.partition

    def stage_denoiser(self, stage: int) -> tuple[torch.nn.Module, dict]:
        # the expert itself, called exactly as a single-model pipeline would call it
        return self.experts.expert(stage), {}

    def _loaded_denoiser(self) -> torch.nn.Module:
        # not expert 0: a container loaded with `load_experts` may hold only the noisy experts
        loaded = self.experts.loaded_experts
        return self.experts.experts[loaded[0]] if loaded else super()._loaded_denoiser()

    def denoise(self, stage: int, *args, **kwargs) -> torch.Tensor:
        """As the base class's, after `enable_model_cpu_offload`'s hook of the `experts` component: the loop calls an
        expert, not the container the hook is on, so the hook is run as the container's forward would run it (it
        moves the experts onto the accelerator)."""
        hook = getattr(self.experts, "_hf_hook", None)
        for offload in getattr(hook, "hooks", [hook]):  # accelerate's `SequentialHook` holds several
            if isinstance(offload, CpuOffload):
                offload.pre_forward(self.experts)
        return super().denoise(stage, *args, **kwargs)


def _check_experts(experts: torch.nn.Module) -> None:
    """A `ValueError` for ``experts`` that are no `ExpertRoutingModel` (a single network has no stages to route), or
    one compiled as a whole, whose compiled forward the pipeline would never run (it calls each expert directly)."""
    if not isinstance(getattr(experts, "_orig_mod", experts), ExpertRoutingModel):
        raise ValueError(
            f"`experts` must be an ExpertRoutingModel, got {type(experts).__name__}: wrap the denoisers, one per "
            "stage, as `ExpertRoutingModel([...], stage_boundaries=...)`."
        )
    if hasattr(experts, "_orig_mod") or getattr(experts, "_compiled_call_impl", None) is not None:
        raise ValueError(
            "`experts` is a compiled ExpertRoutingModel (`torch.compile(experts)` or `experts.compile()`), but this "
            "pipeline calls each expert directly, not the container's forward, so nothing would run compiled: "
            "compile the experts instead, with `experts.compile_stages(**compile_kwargs)` on the uncompiled "
            "container (each expert compiled on its own), or `torch.compile` each expert."
        )


@torch.no_grad()
def record_exit_profile(
    model: EarlyExitUViT2DModel,
    scheduler: SchedulerMixin,
    num_inference_steps: int = 50,
    exit_threshold: float | None = None,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> list[tuple[float, int]]:
    r"""
    Sample with ``model`` through the package's sampling loop and return ``(timestep, exit layer)`` of every model
    call: AdaDiff's exit-depth profile (with ``batch_size > 1``, the deepest exit of the batch: the blocks that call
    ran; ``model.last_exit_layers`` holds each sample's). A class-conditional model samples ``class_labels`` (one per
    image), with classifier-free guidance at ``guidance_scale``, as the pipelines' call takes them.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMScheduler
    >>> from diffusers_stages.models import EarlyExitUViT2DModel
    >>> from diffusers_stages.pipelines import record_exit_profile
    >>> model = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
    >>> record_exit_profile(model, DDIMScheduler(), num_inference_steps=2, exit_threshold=1.0)
    [(500.0, 1), (0.0, 1)]

    ```
    """
    previous, model.exit_threshold = (
        model.exit_threshold,
        exit_threshold if exit_threshold is not None else model.exit_threshold,
    )
    profile = []

    def record(module, args, out):  # one timestep for the whole batch (the model may receive it once per sample)
        profile.append((float(torch.as_tensor(args[1]).reshape(-1)[0]), module.last_exit_layer))

    handle = model.register_forward_hook(record)
    try:
        # one stage in the scheduler's own units, steps and prediction type (a flow-matching scheduler has none in
        # its config): a single model has no boundary for them to disagree with
        single = ExpertRoutingModel(
            [model],
            stage_boundaries=(),
            boundary_units=scheduler_units(scheduler),
            num_train_timesteps=getattr(scheduler.config, "num_train_timesteps", None) or 1000,
            prediction_type=scheduler_prediction_type(scheduler),
        )
        pipe = ExpertRoutingPipeline(experts=single, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe(
            batch_size=batch_size,
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="pt",
            class_labels=class_labels,
            guidance_scale=guidance_scale,
        )
    finally:
        handle.remove()
        model.exit_threshold = previous
    return profile
