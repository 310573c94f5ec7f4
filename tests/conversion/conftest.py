"""Tiny source folders for the conversion tests, written once per test into `tmp_path`."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, LDMPipeline, UNet2DModel, VQModel

from tests.conftest import TINY_UNET


def tiny_unet(seed: int = 0, width: int = 8) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET, "block_out_channels": (width, 2 * width)}).eval()


@pytest.fixture
def ddpm_folder(tmp_path):
    path = str(tmp_path / "ddpm")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture
def ldm_folder(tmp_path):
    """An LDMPipeline with a VQModel whose scaling factor is not 1 (both pipelines must divide by it)."""
    torch.manual_seed(0)
    vqvae = VQModel(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        latent_channels=3,
        vq_embed_dim=3,
        num_vq_embeddings=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.5,
    )
    path = str(tmp_path / "ldm")
    LDMPipeline(vqvae=vqvae, unet=tiny_unet(1), scheduler=DDIMScheduler()).save_pretrained(path)
    return path
