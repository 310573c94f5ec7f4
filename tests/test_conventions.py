"""The package's shared conventions: how a VAE's latents are encoded for the networks."""

import copy

import pytest
import torch

from diffusers_stages.conventions import encode_model_latents, vae_to_model_latents
from tests.conftest import tiny_vae


@pytest.mark.parametrize("force_upcast", [True, False])
def test_a_float16_vae_encodes_in_float32_when_its_config_asks_as_training_does(force_upcast):
    """The switch command encodes with the VAE of a float16 pipeline: one whose config has ``force_upcast`` (SDXL's
    overflows in float16) encoded in float16 all the same, where training keeps it in float32 and the pipelines decode
    in float32 (diffusers' SDXL pipelines encode and decode so). It now encodes in float32 and is left in float16."""
    vae = tiny_vae()
    vae.register_to_config(force_upcast=force_upcast)
    vae.half()
    seen = []
    vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_model_latents(vae, images, torch.Generator().manual_seed(1))
    assert seen == [torch.float32 if force_upcast else torch.float16] and vae.dtype == torch.float16
    assert latents.dtype == torch.float32
    if force_upcast:  # the float16 weights, in float32
        upcast = copy.deepcopy(vae).float()
        with torch.no_grad():
            posterior = upcast.encode(images).latent_dist
        expected = vae_to_model_latents(upcast, posterior.sample(torch.Generator().manual_seed(1)))
        assert torch.allclose(latents, expected, atol=1e-6)
