"""Shared tiny components for the test suite (channels (8, 16), 8-16 px)."""

import diffusers
import pytest
import torch
from diffusers.utils import logging

logging.set_verbosity_error()  # keep expected warnings (e.g. deliberate key mismatches) out of the test log
# the test models are tiny, so every op is overhead-bound: one thread is faster than two on CI's 2 cores, and far
# faster when the cores are shared (subprocess tests set their own threads)
torch.set_num_threads(1)

# every scheduler the pipelines are tested with (EDM schedulers need "sigma"-unit models)
SCHEDULERS = [
    getattr(diffusers, name)
    for name in (
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LMSDiscreteScheduler",
        "DEISMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "EDMEulerScheduler",
    )
]

TINY_UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=4,
)


@pytest.fixture
def tiny_unet_kwargs() -> dict:
    """Keyword arguments of a tiny `UNet2DModel` (also the encoder vocabulary of `MultiStageUNet2DModel`)."""
    return dict(TINY_UNET)


@pytest.fixture
def tiny_multistage():
    """A tiny 3-stage `MultiStageUNet2DModel` with tailored decoders (wide, encoder-wide, narrow)."""
    from diffusers_stages import MultiStageUNet2DModel

    torch.manual_seed(0)
    return MultiStageUNet2DModel(
        **TINY_UNET, stage_boundaries=(442, 631), decoder_block_out_channels=((16, 24), (8, 16), (4, 8))
    ).eval()
