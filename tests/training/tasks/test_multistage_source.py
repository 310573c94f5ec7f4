"""`--pretrained_model_name_or_path` of `train_multistage.py`: its `model_index.json` is hostile input."""

import json

import pytest
from diffusers import DDIMScheduler

from diffusers_stages import MultiStagePipeline
from diffusers_stages.training.tasks.multistage import PretrainedSource


@pytest.mark.parametrize("entry", [5, [], "AutoencoderKL", ["diffusers"], {"a": 1}, ["diffusers", 5]])
def test_a_vae_entry_that_is_no_library_class_pair_is_named(tiny_multistage, tmp_path, entry):
    folder = tmp_path / "source"
    MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler()).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": entry}))
    with pytest.raises(ValueError, match="`vae`"):
        PretrainedSource.read(str(folder))
