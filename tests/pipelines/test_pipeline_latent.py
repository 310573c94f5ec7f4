"""Latent diffusion in the three pipelines: each VAE class the package supports decodes the sampled latents with the
inverse of the transform training encodes with (as diffusers' pipelines for that class do); any other VAE class is
refused by name."""

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2, AutoencoderTiny, VQModel

from diffusers_stages.conventions import model_to_vae_latents, vae_to_model_latents

from .conftest import KINDS, tiny_pipeline

KL = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    latent_channels=3,  # the tiny pipelines' networks take 3 channels
    norm_num_groups=4,
    layers_per_block=1,
    sample_size=16,
)
# every VAE downsamples by 2: the tiny networks' 8 x 8 latents are 16 x 16 images
VAES = {
    "AutoencoderKL": lambda: AutoencoderKL(**KL, scaling_factor=0.5, shift_factor=0.25),
    "AutoencoderKL-latents_mean": lambda: AutoencoderKL(
        **KL, scaling_factor=0.5, latents_mean=[0.1, -0.2, 0.3], latents_std=[2.0, 0.5, 4.0]
    ),
    "VQModel": lambda: VQModel(**KL, scaling_factor=0.7, num_vq_embeddings=16),
    "AutoencoderTiny": lambda: AutoencoderTiny(
        latent_channels=3, encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
    ),
    "AutoencoderDC": lambda: AutoencoderDC(
        latent_channels=3, attention_head_dim=2, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(6, 6), decoder_block_out_channels=(6, 6), encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
        upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.4,
    ),
}  # fmt: skip


def _expected_vae_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """What diffusers' pipeline for ``vae``'s class hands its decoder (SDXL's with ``latents_mean``, Flux's with
    ``shift_factor``, SD's, LDM's, Sana's otherwise)."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (config.latents_mean, config.latents_std))
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)


def _latent_pipeline(kind: str, vae):
    pipe = tiny_pipeline(kind, switch_timestep=500)
    pipe = type(pipe)(**{**pipe.components, "vae": vae.eval()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("vae_name", list(VAES))
@pytest.mark.parametrize("kind", KINDS)
def test_each_vae_class_decodes_with_the_inverse_of_the_training_transform(kind, vae_name, tmp_path):
    torch.manual_seed(0)
    vae = VAES[vae_name]()
    pipe = _latent_pipeline(kind, vae)
    run = {"batch_size": 2, "num_inference_steps": 2}
    latents = pipe(generator=torch.manual_seed(0), output_type="latent", **run).images
    images = pipe(generator=torch.manual_seed(0), output_type="pt", **run).images
    assert latents.shape == (2, 3, 8, 8) and images.shape == (2, 3, 16, 16)
    with torch.no_grad():
        expected = vae.decode(_expected_vae_latents(vae, latents)).sample
    assert torch.allclose(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5)
    # training's transform is the one sampling inverts
    assert torch.allclose(model_to_vae_latents(vae, vae_to_model_latents(vae, latents)), latents, atol=1e-5)
    assert torch.allclose(vae_to_model_latents(vae, _expected_vae_latents(vae, latents)), latents, atol=1e-5)

    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is type(vae)
    assert torch.equal(images, loaded(generator=torch.manual_seed(0), output_type="pt", **run).images)


@pytest.mark.parametrize("kind", KINDS)
def test_a_vae_class_the_pipelines_cannot_decode_is_refused_by_name(kind):
    """Flux 2's VAE takes patchified, batch-norm-normalized latents: decoding sampled latents directly would give
    wrong images (it was an AttributeError on `scaling_factor`)."""
    torch.manual_seed(0)
    one_level = {"block_out_channels": (8,), "down_block_types": KL["down_block_types"][:1]}
    vae = AutoencoderKLFlux2(**{**KL, **one_level, "up_block_types": KL["up_block_types"][:1]})
    with pytest.raises(ValueError, match="`vae` must be an AutoencoderKL, .*got a AutoencoderKLFlux2"):
        _latent_pipeline(kind, vae)
    pipe = tiny_pipeline(kind, switch_timestep=500)
    pipe.vae = vae  # set after construction: refused when sampling
    with pytest.raises(ValueError, match="got a AutoencoderKLFlux2"):
        pipe(num_inference_steps=2, output_type="pt")


@pytest.mark.parametrize("kind", KINDS)
def test_a_vae_whose_latent_statistics_do_not_fit_its_latents_is_refused_before_sampling(kind):
    """`latents_mean`/`latents_std` of another length than the latent channels failed in the decoding, after every
    step (a broadcasting RuntimeError); a zero std divided the latents by zero, silently."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**KL, latents_mean=[0.1, 0.2], latents_std=[1.0, 2.0])
    pipe = _latent_pipeline(kind, vae)
    calls = []
    pipe.scheduler.step = lambda *a, **k: calls.append(1)  # no step may run
    with pytest.raises(ValueError, match=r"`vae` AutoencoderKL: `latents_mean` must give one number per latent channel "
                       r"\(3\), got \[0.1, 0.2\]"):  # fmt: skip
        pipe(batch_size=1, num_inference_steps=2, output_type="np")
    assert not calls
    vae.register_to_config(latents_mean=[0.0] * 3, latents_std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="`vae` AutoencoderKL: `latents_std` must be positive"):
        pipe(batch_size=1, num_inference_steps=2, output_type="np")
    # a zero `scaling_factor` decoded inf/NaN images silently; None or a text one failed after every step (TypeError)
    vae.register_to_config(latents_mean=None, latents_std=None, scaling_factor=0.0)
    with pytest.raises(ValueError, match="`vae` AutoencoderKL: `scaling_factor` must be a positive number"):
        pipe(batch_size=1, num_inference_steps=2, output_type="np")
    vae.register_to_config(scaling_factor=0.5, shift_factor="0.1")
    with pytest.raises(ValueError, match="`vae` AutoencoderKL: `shift_factor` must be a number or null"):
        pipe(batch_size=1, num_inference_steps=2, output_type="np")
    assert not calls
