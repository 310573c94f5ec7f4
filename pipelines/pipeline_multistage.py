"""Sampling pipeline for the multi-stage, multi-decoder U-Net (Zhang et al., CVPR 2024)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, VQModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.unet_multistage import MultiStageUNet2DModel
from ..models.unet_multistage_ddpmpp import MultiStageDDPMppUNet2DModel
from ..partition import TimestepPartition
from .pipeline_staged import StagedDiffusionPipeline


class MultiStagePipeline(StagedDiffusionPipeline):
    r"""
    Pipeline for image generation with a [`MultiStageUNet2DModel`]: at each step the U-Net's shared encoder runs
    and the decoder of the stage the scheduler's noise level falls in.

    Args:
        unet ([`MultiStageUNet2DModel`] or [`MultiStageDDPMppUNet2DModel`]): the multi-stage denoiser.
        scheduler ([`~diffusers.SchedulerMixin`]): any diffusers scheduler that fits the model's prediction type.
        vae ([`~diffusers.AutoencoderKL`] or [`~diffusers.VQModel`], *optional*): for latent diffusion; latents are
            divided by ``vae.config.scaling_factor`` and shifted by ``shift_factor`` before decoding.

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

    model_cpu_offload_seq = "unet->vae"

    def __init__(
        self,
        unet: MultiStageUNet2DModel | MultiStageDDPMppUNet2DModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | VQModel | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    @property
    def partition(self) -> TimestepPartition:
        return self.unet.partition

    def stage_denoiser(self, stage: int) -> tuple[torch.nn.Module, dict]:
        return self.unet, {"stage_index": stage}
