"""The captioned image folder of the text-to-image training task (`metadata.jsonl`), read before any training."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffusers_stages.training.tasks.text_to_image import captioned_folder


def _folder(root, entries: list) -> str:
    """``root/data`` with two 8x8 images and a metadata.jsonl of ``entries`` (dicts, or raw lines as str)."""
    folder = root / "data"
    os.makedirs(folder / "sub")
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / name)
    lines = [e if isinstance(e, str) else json.dumps(e) for e in entries]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_files_of_the_folder_and_their_captions(tmp_path):
    entries = [{"file_name": "a.png", "text": "one"}, {"file_name": "sub/../sub/b.png", "text": ["two", "2"]}]
    paths, captions = captioned_folder(_folder(tmp_path, entries), "text")
    folder = str(tmp_path / "data")
    assert paths == [os.path.join(folder, "a.png"), os.path.join(folder, "sub/../sub/b.png")]
    assert captions == [["one"], ["two", "2"]]  # each image's captions (a list: one drawn per step, as diffusers)


def test_a_caption_that_is_a_number_is_refused_as_diffusers_refuses_it(tmp_path):
    # was trained as the text "2"; diffusers' train_text_to_image.py: "should contain either strings or lists of
    # strings"
    folder = _folder(tmp_path, [{"file_name": "a.png", "text": "one"}, {"file_name": "sub/b.png", "text": 2}])
    with pytest.raises(ValueError, match=r"`--caption_column` 'text': .*line 2 has the caption 2, which is neither"):
        captioned_folder(folder, "text")


@pytest.mark.parametrize("file_name", ["../private.png", "sub/../../private.png", "ABSOLUTE", "link.png", 3, "", None])
def test_a_file_name_that_is_not_a_file_of_the_folder_is_refused(tmp_path, file_name):
    # were read: `..`, an absolute path or a link led to any file on the machine; a non-string was a TypeError
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "private.png")
    if file_name == "ABSOLUTE":
        file_name = str(tmp_path / "private.png")
    folder = _folder(tmp_path, [{"file_name": "a.png", "text": "one"}, {"file_name": file_name, "text": "two"}])
    os.symlink(tmp_path / "private.png", os.path.join(folder, "link.png"))
    with pytest.raises(ValueError, match=r"`--train_data_dir`: .*metadata.jsonl line 2 has `file_name` (.+), which is "
                       r"not a file of .*\(a path relative to it that stays inside it\)") as error:  # fmt: skip
        captioned_folder(folder, "text")
    assert f"`file_name` {file_name!r}," in str(error.value)


def test_a_line_that_is_not_json_is_named(tmp_path):
    # was a bare JSONDecodeError ("Expecting value: line 1 column 1") naming neither the file nor the argument
    folder = _folder(tmp_path, [{"file_name": "a.png", "text": "one"}, "{file_name: b.png}"])
    with pytest.raises(ValueError, match=r"`--train_data_dir`: .*metadata.jsonl line 2 is not JSON \(Expecting"):
        captioned_folder(folder, "text")


@pytest.mark.parametrize(
    "file",
    ["unet/config.json", "vae/config.json", "text_encoder/config.json",
     "unet/diffusion_pytorch_model.safetensors.index.json", "vae/diffusion_pytorch_model.safetensors.index.json",
     "text_encoder/model.safetensors.index.json"],
)  # fmt: skip
@pytest.mark.parametrize("content", ["[1, 2]", "{not json"], ids=["not-an-object", "not-json"])
def test_a_malformed_file_of_a_source_folder_names_the_option_and_the_file(
    tiny_sd_components, tmp_path, capsys, file, content
):
    # were read as the networks loaded, after the data: an AttributeError ("'list' object has no attribute 'get'")
    # for a config that is no object, the loaders' check (`check_folder_files`) naming neither the option nor the
    # source for the others (and `--vae_path`, not given, for a VAE config that is not JSON)
    import importlib.util

    from diffusers import StableDiffusionPipeline

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    path = os.path.join(repo, "examples", "multistage", "train_text_to_image.py")
    spec = importlib.util.spec_from_file_location("train_text_to_image_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    sd = tmp_path / "sd"
    StableDiffusionPipeline(**tiny_sd_components).save_pretrained(sd)
    (sd / file).write_text(content)
    data = _folder(tmp_path, [{"file_name": "a.png", "text": "one"}, {"file_name": "sub/b.png", "text": "two"}])
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--pretrained_model_name_or_path", str(sd), "--train_data_dir", data, "--resolution", "16",
                           "--output_dir", str(tmp_path / "run")])  # fmt: skip
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"`--pretrained_model_name_or_path` {str(sd)!r}" in error
    assert str(sd / file) in error


@pytest.mark.parametrize(
    "statistics",
    [{"shift_factor": 0.25}, {"latents_mean": [0.1, -0.2, 0.3, 0.4], "latents_std": [2.0, 0.5, 1.0, 4.0]}],
)
def test_training_latents_are_those_the_stable_diffusion_pipeline_decodes(tiny_sd_components, tmp_path, statistics):
    # the task saves a StableDiffusionPipeline, which decodes `latents / scaling_factor` (no shift_factor, no
    # latents_mean), as diffusers' train_text_to_image.py encodes; the loop encoded (E(x) - shift) * scaling (the
    # package's own pipelines' convention) for it too, so a source VAE with a shift or latent statistics was
    # fine-tuned on latents its pipeline then decoded shifted
    import importlib.util
    from types import SimpleNamespace

    import torch
    from diffusers import StableDiffusionPipeline

    from diffusers_stages.training.loop import _clean_samples
    from diffusers_stages.training.tasks.text_to_image import TextToImageTask

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    path = os.path.join(repo, "examples", "multistage", "train_text_to_image.py")
    spec = importlib.util.spec_from_file_location("train_text_to_image_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    vae = tiny_sd_components["vae"]
    vae.register_to_config(scaling_factor=0.5, **statistics)
    sd = tmp_path / "sd"
    StableDiffusionPipeline(**{**tiny_sd_components, "vae": vae.eval()}).save_pretrained(sd)
    data = _folder(tmp_path, [{"file_name": "a.png", "text": "one"}, {"file_name": "sub/b.png", "text": "two"}])
    args = script.parse_args(["--pretrained_model_name_or_path", str(sd), "--train_data_dir", data, "--resolution",
                              "16", "--output_dir", str(tmp_path / "run")])  # fmt: skip
    task = TextToImageTask(args)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    state = SimpleNamespace(vae=vae, task=task, weight_dtype=torch.float32)
    latents = _clean_samples(state, {"pixel_values": pixels}, torch.Generator().manual_seed(1))
    with torch.no_grad():
        encoded = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
    assert torch.allclose(latents, encoded * 0.5, atol=1e-6)  # diffusers' train_text_to_image.py
    assert torch.allclose(latents / StableDiffusionPipeline.from_pretrained(sd).vae.config.scaling_factor, encoded)


@pytest.mark.parametrize(("shares", "says"), [(None, "every batch stratified over the stages;"),
                                              ([1.0, 0.0], "batch shares 1:0 (clean stage first)")])  # fmt: skip
def test_the_card_gives_the_batch_shares_the_stages_trained_on(shares, says):
    # the card said "every batch stratified over the stages" whatever `--stage_shares` gave them: a stage with share 0
    # never trained (its decoder or expert kept the source's weights)
    from types import SimpleNamespace

    from diffusers_stages.training.tasks.text_to_image import TextToImageTask

    task = SimpleNamespace(args=SimpleNamespace(method="multistage", stage_shares=shares), source="me/sd",
                           _stage_table=lambda: "")  # fmt: skip
    assert says in TextToImageTask.description(task)
