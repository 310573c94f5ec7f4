"""Sampling pipeline for the multi-stage, multi-decoder U-Net (Zhang et al., CVPR 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderTiny, VQModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.class_context import ClassContextEmbedding
from ..models.unet_multistage import MultiStageUNet2DModel
from ..models.unet_multistage_condition import MultiStageUNet2DConditionModel
from ..models.unet_multistage_ddpmpp import MultiStageDDPMppUNet2DModel
from ..partition import TimestepPartition
from .pipeline_staged import StagedDiffusionPipeline, vae_scale_factor


class MultiStagePipeline(StagedDiffusionPipeline):
    r"""
    Pipeline for image generation with a [`MultiStageUNet2DModel`]: at each step the U-Net's shared encoder runs
    and the decoder of the stage the scheduler's noise level falls in.

    Args:
        unet ([`MultiStageUNet2DModel`], [`MultiStageDDPMppUNet2DModel`] or [`MultiStageUNet2DConditionModel`]): the
            multi-stage denoiser; a cross-attention U-Net needs ``class_embedder`` (for text prompts, use it as the
            ``unet`` of diffusers' `StableDiffusionPipeline` instead).
        scheduler ([`~diffusers.SchedulerMixin`]): any diffusers scheduler that fits the model's prediction type.
        vae ([`~diffusers.AutoencoderKL`], [`~diffusers.VQModel`], [`~diffusers.AutoencoderTiny`] or
            [`~diffusers.AutoencoderDC`], *optional*): for latent diffusion; latents are divided by
            ``vae.config.scaling_factor`` and shifted by ``shift_factor`` (or by ``latents_std`` and ``latents_mean``)
            before decoding.
        class_embedder ([`ClassContextEmbedding`], *optional*): for a cross-attention U-Net conditioned on classes
            (the authors' class-conditional latent-diffusion models, ``cin-mul*``): each class label becomes the
            one-token ``encoder_hidden_states`` the U-Net attends to; its last embedding is the unconditional label.
        id2label (`dict`, *optional*): class index -> name of a class-conditional model (saved in
            ``model_index.json``; `get_label_ids` turns names into ``class_labels``), as `DiTPipeline`'s.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMScheduler
    >>> from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel
    >>> unet = MultiStageUNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    >>> pipe = MultiStagePipeline(unet=unet, scheduler=DDIMScheduler())
    >>> pipe.set_progress_bar_config(disable=True)
    >>> pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images.shape
    (2, 8, 8, 3)

    ```
    """

    # the class embedder runs at every step: out of the chain, as diffusers leaves a ControlNet, it is offloaded on its
    # own (on the device from its first call to the end of the run) instead of moving in and out at every step
    model_cpu_offload_seq = "unet->vae"
    _optional_components: ClassVar[list[str]] = ["vae", "class_embedder"]

    def __init__(
        self,
        unet: MultiStageUNet2DModel | MultiStageDDPMppUNet2DModel | MultiStageUNet2DConditionModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | VQModel | AutoencoderTiny | AutoencoderDC | None = None,
        class_embedder: ClassContextEmbedding | None = None,
        id2label: dict[str, str] | None = None,
    ):
        super().__init__()
        _check_unet(unet, class_embedder)
        vae_scale_factor(vae)  # refuses a VAE class the pipelines cannot decode
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, class_embedder=class_embedder)
        self.register_class_names(id2label)
        self.check_prediction_type()

    def check_components(self) -> None:
        _check_unet(self.unet, getattr(self, "class_embedder", None))

    @property
    def partition(self) -> TimestepPartition:
        return self.unet.partition

    def stage_denoiser(self, stage: int) -> tuple[torch.nn.Module, dict]:
        return self.unet, {"stage_index": stage}

    def label_config(self, model: torch.nn.Module):
        class_embedder = getattr(self, "class_embedder", None)
        return model.config if class_embedder is None else class_embedder.config

    def label_conditioning(self, class_labels: torch.Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
        class_embedder = getattr(self, "class_embedder", None)
        if class_embedder is None:
            return {"class_labels": class_labels}
        # the U-Net attends to its class (labels checked once per run: no host read on each step)
        return {"encoder_hidden_states": class_embedder(class_labels, check_values=False).to(dtype)}


def _check_unet(unet: torch.nn.Module, class_embedder: ClassContextEmbedding | None) -> None:
    """A `ValueError` for a ``unet`` that is no multi-stage U-Net, or a ``class_embedder`` that does not fit it."""
    staged = (MultiStageUNet2DModel, MultiStageDDPMppUNet2DModel, MultiStageUNet2DConditionModel)
    model = getattr(unet, "_orig_mod", unet)  # a torch.compile'd model is its `_orig_mod`
    if not isinstance(model, staged):
        raise ValueError(
            f"`unet` must be a {', '.join(c.__name__ for c in staged)}, got {type(unet).__name__} (a plain "
            "UNet2DModel converts with `MultiStageUNet2DModel.from_unet`)."
        )
    cross_attention = isinstance(model, MultiStageUNet2DConditionModel)
    if cross_attention != (class_embedder is not None):
        raise ValueError(
            "`class_embedder` must be given exactly when `unet` is a cross-attention MultiStageUNet2DConditionModel"
            f" (it turns class labels into the context the U-Net attends to), got a {type(model).__name__} and "
            f"`class_embedder`={type(class_embedder).__name__ if class_embedder is not None else None}. For text "
            "prompts, use the U-Net as the `unet` of diffusers' StableDiffusionPipeline."
        )
    if cross_attention and unet.config.num_class_embeds is not None:
        raise ValueError(
            f"A cross-attention `unet` takes its class from `class_embedder` only, but it also has "
            f"`num_class_embeds`={unet.config.num_class_embeds} (a class embedding added to the time embedding)."
        )
    if cross_attention and class_embedder.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ValueError(
            f"`class_embedder` gives contexts of width {class_embedder.config.cross_attention_dim}, but the U-Net "
            f"attends to width `cross_attention_dim`={unet.config.cross_attention_dim}."
        )
