"""The frozen VAE of latent training is read as strictly as the package's models (its folder may be a download)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL

from diffusers_stages.training.loop import _load_vae
from tests.conftest import corrupt_weights

TINY_VAE = dict(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8)


@pytest.mark.parametrize("corruption", [None, "missing", "integers", "link"])
def test_the_vae_loads_strictly(tmp_path, corruption):
    folder = tmp_path / "source" / "vae"
    AutoencoderKL(**TINY_VAE).save_pretrained(folder)
    if corruption is not None:
        key = corrupt_weights(folder / "diffusion_pytorch_model.safetensors", corruption)
    task = SimpleNamespace(vae_path=str(tmp_path / "source"), vae_subfolder="vae")
    if corruption is None:
        assert _load_vae(task, torch.device("cpu"), torch.float32).dtype == torch.float32
        return
    with pytest.raises(ValueError, match="outside" if corruption == "link" else key):
        _load_vae(task, torch.device("cpu"), torch.float32)
