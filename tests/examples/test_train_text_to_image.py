"""`examples/text_to_image/train_text_to_image_multistage.py`: fine-tunes a staged Stable Diffusion U-Net on
captioned images and saves a folder that `StableDiffusionPipeline` reloads (issue 15, part 5)."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_stages import MultiStageUNet2DConditionModel

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "examples",
    "text_to_image",
    "train_text_to_image_multistage.py",
)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_text_to_image_multistage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def source_and_data(tiny_sd_components, tmp_path):
    StableDiffusionPipeline(**tiny_sd_components).save_pretrained(tmp_path / "sd")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(["a red cat", "a blue cat", "a dog", "a cat"]):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (data / "metadata.jsonl").write_text("\n".join(lines))
    return str(tmp_path / "sd"), str(data), tmp_path


@pytest.mark.parametrize("decoders_only", [False, True], ids=["all", "decoders_only"])
def test_fine_tunes_every_decoder_and_saves_a_standard_folder(script, source_and_data, decoders_only, capsys):
    source, data, tmp_path = source_and_data
    argv = ["--pretrained_model_name_or_path", source, "--train_data_dir", data, "--output_dir", str(tmp_path / "out")]
    argv += ["--stage_boundaries", "300", "600", "--stage_shares", "1", "1", "1", "--max_train_steps", "2"]
    argv += ["--learning_rate", "1e-2"] + (["--train_decoders_only"] if decoders_only else [])
    script.main(script.parse_args(argv))
    assert capsys.readouterr().out.count("per stage {0: ") == 2  # every batch holds every stage

    tuned = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    start = MultiStageUNet2DConditionModel.from_unet(StableDiffusionPipeline.from_pretrained(source).unet, (300, 600))
    assert type(tuned.unet) is MultiStageUNet2DConditionModel and tuned.unet.partition == start.partition
    tuned_weights, start_weights = tuned.unet.state_dict(), start.state_dict()
    for stage in range(3):  # every decoder trained
        key = f"decoders.{stage}.conv_out.weight"
        assert not torch.equal(tuned_weights[key], start_weights[key]), key
    assert torch.equal(tuned_weights["conv_in.weight"], start_weights["conv_in.weight"]) == decoders_only
    tuned.set_progress_bar_config(disable=True)
    image = tuned("a cat", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_refuses_bad_arguments_by_name(script, source_and_data, tmp_path):
    source, data, _ = source_and_data
    base = ["--pretrained_model_name_or_path", source, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="learning_rate"):
        script.parse_args([*base, "--train_data_dir", data, "--learning_rate", "nan"])
    with pytest.raises(ValueError, match="metadata.jsonl"):
        script.main(script.parse_args([*base, "--train_data_dir", str(tmp_path), "--max_train_steps", "1"]))
