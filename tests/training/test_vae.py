"""The frozen VAE of latent training is read as strictly as the package's models (its folder may be a download)."""

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL

from diffusers_stages.training.loop import _load_vae

TINY_VAE = dict(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8)


@pytest.mark.parametrize("corruption", [None, "missing", "integers", "link"])
def test_the_vae_loads_strictly(tmp_path, corruption):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "source" / "vae"
    AutoencoderKL(**TINY_VAE).save_pretrained(folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(state)[0]
    if corruption == "link":
        os.rename(path, tmp_path / "elsewhere.safetensors")
        os.symlink(tmp_path / "elsewhere.safetensors", path)
    elif corruption is not None:
        changed = {key: state[key].int()} if corruption == "integers" else {}
        save_file({**{k: v for k, v in state.items() if k != key}, **changed}, path)
    task = SimpleNamespace(vae_path=str(tmp_path / "source"), vae_subfolder="vae")
    if corruption is None:
        assert _load_vae(task, torch.device("cpu"), torch.float32).dtype == torch.float32
        return
    with pytest.raises(ValueError, match="outside" if corruption == "link" else key):
        _load_vae(task, torch.device("cpu"), torch.float32)
