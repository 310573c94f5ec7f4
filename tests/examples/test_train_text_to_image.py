"""`examples/multistage/train_text_to_image.py`: fine-tunes a Stable Diffusion U-Net on a captioned image folder as a
multi-stage model or as experts (frozen VAE and text encoder, EMA, checkpoints), resumes exactly, and saves a folder
that `StableDiffusionPipeline` reloads (issue 15, part 5)."""

import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusers_stages import ExpertRoutingModel, MultiStageUNet2DConditionModel
from tests.conftest import corrupt_weights, with_safety_checker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "multistage", "train_text_to_image.py")
TINY = ["--resolution", "16", "--train_batch_size", "4", "--num_sample_images", "2", "--num_inference_steps", "2",
        "--logger", "none", "--learning_rate", "1e-2", "--save_images_steps", "1000"]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_text_to_image_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def source(tiny_sd_components, tmp_path):
    """A tiny StableDiffusionPipeline folder and a 16-image folder with a metadata.jsonl of captions."""
    StableDiffusionPipeline(**tiny_sd_components).save_pretrained(tmp_path / "sd")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (20, 18, 3), dtype=np.uint8)).save(data / f"{i}.png")
        lines.append(
            json.dumps({"file_name": f"{i}.png", "caption": ["a red cat", "a dog", "cat", "a big cat"][i % 4]})
        )
    (data / "metadata.jsonl").write_text("\n".join(lines))
    return str(tmp_path / "sd"), str(data)


def _weights(folder) -> dict:
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def _run(script, argv: list[str]) -> str:
    return script.main(script.parse_args(argv))


def test_multistage_with_ema_resumes_exactly_and_reloads(script, source, tmp_path):
    sd, data = source
    # 16 images, batch 4: 4 steps per epoch; 6 steps cross an epoch, the checkpoint at step 2 is mid-epoch
    args = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--stage_boundaries", "300", "600", "--use_ema", "--random_flip", "--max_train_steps", "6",
            "--checkpointing_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
            "--validation_prompts", "a cat", "a dog", "--class_dropout_prob", "0.25"]  # fmt: skip
    straight = str(tmp_path / "straight")
    _run(script, [*args, "--output_dir", straight])

    # the same run interrupted after step 2 (its checkpoint alone in the folder) and resumed: the same weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(os.path.join(straight, "checkpoint-2"), resumed / "checkpoint-2")
    _run(script, [*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    for sub in ("unet", "checkpoint-6/unet", "checkpoint-6/unet_ema", "checkpoint-4/unet_ema"):
        a, b = _weights(os.path.join(straight, sub)), _weights(resumed / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub

    # the final pipeline holds the EMA weights (as diffusers' script); every decoder and the encoder trained
    final, ema = _weights(os.path.join(straight, "unet")), _weights(os.path.join(straight, "checkpoint-6", "unet_ema"))
    raw = _weights(os.path.join(straight, "checkpoint-6", "unet"))
    assert all(torch.equal(final[k], ema[k]) for k in final) and not all(torch.equal(final[k], raw[k]) for k in final)
    start = MultiStageUNet2DConditionModel.from_unet(StableDiffusionPipeline.from_pretrained(sd).unet, (300, 600))
    start = start.state_dict()
    for key in (
        "decoders.0.conv_out.weight",
        "decoders.1.conv_out.weight",
        "decoders.2.conv_out.weight",
        "conv_in.weight",
    ):
        assert not torch.equal(raw[key], start[key]), key
    assert os.path.isfile(os.path.join(straight, "sample_grid.png"))

    # a standard StableDiffusionPipeline folder: reloads staged and samples the same images twice
    pipe = StableDiffusionPipeline.from_pretrained(straight)
    assert type(pipe.unet) is MultiStageUNet2DConditionModel and pipe.unet.config.stage_boundaries == [300, 600]
    pipe.set_progress_bar_config(disable=True)
    images = [
        pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images for _ in "ab"
    ]
    assert images[0].shape == (1, 16, 16, 3) and np.isfinite(images[0]).all() and (images[0] == images[1]).all()


def test_the_ema_decays_as_diffusers_text_to_image_script(script, source, tmp_path, capsys):
    # diffusers' train_text_to_image.py keeps `EMAModel(unet.parameters(), ...)`: no warmup, the decay of step s
    # (1 + s) / (10 + s) up to 0.9999; this script used train_unconditional.py's warmup 1 - (1 + s)^-0.75 (0.41, not
    # 0.18, at the second step), and took `--ema_inv_gamma` / `--ema_power`, which shape that warmup only
    sd, data = source
    base = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--max_train_steps", "2", "--use_ema", "--checkpointing_steps", "2"]  # fmt: skip
    out = str(tmp_path / "o")
    _run(script, [*base, "--output_dir", out])
    with open(os.path.join(out, "checkpoint-2", "unet_ema", "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["use_ema_warmup"] is False and saved["decay"] == 0.9999 and saved["optimization_step"] == 2
    for option in ("--ema_inv_gamma", "--ema_power"):
        with pytest.raises(SystemExit):
            script.parse_args([*base, option, "0.5", "--output_dir", str(tmp_path / "p")])
        assert f"`{option}` 0.5 is refused" in capsys.readouterr().err


def test_experts_from_the_same_command(script, source, tmp_path):
    sd, data = source
    out = str(tmp_path / "experts")
    _run(script, ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption",
                  *TINY, "--method", "experts", "--center_crop", "--max_train_steps", "2", "--output_dir", out,
                  "--push_to_hub", "--hub_model_id", "me/t2i", "--hub_local_dir", str(tmp_path / "hub")])  # fmt: skip
    with open(tmp_path / "hub" / "me" / "t2i" / "README.md", encoding="utf-8") as f:
        card = f.read()  # the source's noise schedule and a StableDiffusionPipeline to sample with
    assert "DDIMScheduler, 1000 steps, linear, prediction type `epsilon`" in card
    assert "pipe = StableDiffusionPipeline.from_pretrained(folder)" in card and "multi-expert" in card
    assert f"the U-Net of `{os.path.basename(sd)}`" in card and sd not in card  # a local source: its name only
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert type(pipe.unet) is ExpertRoutingModel and pipe.unet.config.stage_boundaries == [500]
    source_unet = StableDiffusionPipeline.from_pretrained(sd).unet.state_dict()
    for expert in pipe.unet.experts:  # both experts trained (each on its own half of the schedule)
        assert not torch.equal(expert.state_dict()["conv_out.weight"], source_unet["conv_out.weight"])
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a dog", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

    # a routed source keeps its experts and stages: trains again with --method experts only
    base = ["--pretrained_model_name_or_path", out, "--train_data_dir", data, "--caption_column", "caption", *TINY]
    with pytest.raises(SystemExit):
        script.parse_args([*base, "--output_dir", str(tmp_path / "again")])  # default --method multistage
    assert (
        script.parse_args([*base, "--method", "experts", "--output_dir", str(tmp_path / "again")]).method == "experts"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--caption_column", "text"], "`--caption_column` 'text'"),
        (["--caption_column", "caption", "--prediction_type", "v_prediction"], "`--prediction_type` v_prediction"),
        (["--caption_column", "caption", "--stage_boundaries", "700", "300"], "`--stage_boundaries`"),
        (["--caption_column", "caption", "--class_conditional"], "`--class_conditional`"),
        (["--caption_column", "caption", "--method", "experts", "--train_decoders_only"], "--train_decoders_only"),
        # the shared parser's options for a model built from scratch: the source gives them (they were ignored)
        (["--caption_column", "caption", "--vae_path", "other-vae"], "`--vae_path` 'other-vae' is refused"),
        (["--caption_column", "caption", "--block_out_channels", "16,32"], "`--block_out_channels` (16, 32)"),
        (["--caption_column", "caption", "--model_config", "unet.json"], "`--model_config` 'unet.json'"),
        (["--caption_column", "caption", "--num_train_timesteps", "500"], "`--num_train_timesteps` 500 disagrees"),
        (["--caption_column", "caption", "--ddpm_beta_schedule", "squaredcos_cap_v2"], "`--ddpm_beta_schedule`"),
        # an image folder's images are its metadata.jsonl's `file_name` entries (datasets' `image` column): the option
        # was ignored, where diffusers' script refuses a column the folder does not have
        (["--caption_column", "caption", "--image_column", "picture"], "`--image_column` 'picture'"),
        # more prompts than the grid has images: the last ones were never sampled (TINY: 2 images)
        (["--caption_column", "caption", "--validation_prompts", "a", "b", "c"], "`--validation_prompts` gives 3"),
    ],
)
def test_bad_arguments_are_refused_by_name(script, source, tmp_path, capsys, extra, message):
    sd, data = source
    argv = [
        "--pretrained_model_name_or_path",
        sd,
        "--train_data_dir",
        data,
        *TINY,
        "--output_dir",
        str(tmp_path / "o"),
    ]
    argv += extra
    try:
        _run(script, argv)
    except SystemExit:
        assert message in capsys.readouterr().err
    except ValueError as error:  # found when the data are read
        assert message in str(error)
    else:
        pytest.fail(f"{extra} was accepted")


@pytest.mark.parametrize(
    "method, component, corruption",
    [
        ("multistage", "unet", "link"),
        ("multistage", "unet", "integers"),
        ("experts", "unet", "missing"),  # was torch's NotImplementedError on a meta tensor, deep in training
        ("multistage", "text_encoder", "missing"),
        ("multistage", "text_encoder", "link"),
        ("multistage", "text_encoder", "integers"),
        ("multistage", "tokenizer", "link"),
        ("multistage", "safety_checker", "missing"),  # saved with the result: was written with a random weight
        ("multistage", "safety_checker", "integers"),
    ],
)
def test_a_corrupted_source_is_refused_not_trained(
    script, source, tiny_sd_components, tmp_path, capsys, method, component, corruption
):
    # diffusers' and transformers' loaders only warn of a missing weight (left random), cast integer weights
    # silently and follow a file that links out of the folder: the source is hostile input, read strictly
    sd, data = source
    if component == "safety_checker":
        StableDiffusionPipeline(**with_safety_checker(tiny_sd_components)).save_pretrained(sd)
    folder = os.path.join(sd, component)
    if component == "tokenizer":  # no weights: its vocabulary linked to a file outside the folder
        os.rename(os.path.join(folder, "tokenizer.json"), tmp_path / "tokenizer.json")
        os.symlink(tmp_path / "tokenizer.json", os.path.join(folder, "tokenizer.json"))
        key = "tokenizer.json"
    else:
        name = "diffusion_pytorch_model.safetensors" if component == "unet" else "model.safetensors"
        key = corrupt_weights(os.path.join(folder, name), corruption, outside=str(tmp_path))
        key = name if corruption == "link" else key
    args = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--method", method, "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    if corruption == "link":  # a file leading out of the folder: refused with the arguments, before the data
        with pytest.raises(SystemExit):
            script.parse_args(args)
        error = capsys.readouterr().err
        assert f"`--pretrained_model_name_or_path` {sd!r}" in error and f"{key!r} in {folder}" in error
        return
    with pytest.raises(ValueError, match=re.escape(key)):
        _run(script, args)
    assert not os.path.exists(tmp_path / "o" / "model_index.json")


def test_the_safety_checker_is_checked_up_front_not_held_and_saved_unchanged(
    script, source, tiny_sd_components, tmp_path
):
    # held through the whole run on every process (about 1.2 GB for SD 1.5's) only to be saved at the end: it is
    # checked when the networks are built, released, and loaded (strictly) again at each save
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from diffusers_stages.training.loop import build_task
    from diffusers_stages.training.tasks.text_to_image import TextToImageTask

    sd, data = source
    StableDiffusionPipeline(**with_safety_checker(tiny_sd_components)).save_pretrained(sd)
    args = script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                              "caption", *TINY, "--output_dir", str(tmp_path / "o")])  # fmt: skip
    task = build_task(TextToImageTask, args)
    task.read_records(args)
    networks = task.build_networks(4, 2, None)
    held = [v for v in vars(task).values() if isinstance(v, StableDiffusionSafetyChecker)]
    held += [v for d in vars(task).values() if isinstance(d, dict) for v in d.values()
             if isinstance(v, StableDiffusionSafetyChecker)]  # fmt: skip
    assert not held
    task.save(networks, DDIMScheduler(), None, str(tmp_path / "saved"))
    saved = StableDiffusionPipeline.from_pretrained(tmp_path / "saved").safety_checker
    original = StableDiffusionPipeline.from_pretrained(sd).safety_checker
    assert isinstance(saved, StableDiffusionSafetyChecker)
    for (name, a), (_, b) in zip(saved.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("component", ["text_encoder", "tokenizer"])
def test_a_source_without_its_text_encoder_is_refused_by_name(script, source, tiny_sd_components, component, capsys):
    # was an AttributeError of None after the output folder and accelerator were set up: now a usage error
    sd, data = source
    StableDiffusionPipeline(**{**tiny_sd_components, component: None}).save_pretrained(sd)
    args = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--max_train_steps", "1", "--output_dir", os.path.join(sd, "o")]  # fmt: skip
    with pytest.raises(SystemExit):
        _run(script, args)
    assert f"holds no {component} (model_index.json: {component}=[None, None])" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(sd, "o"))


@pytest.mark.parametrize(
    "removed, message",
    [
        ("tokenizer", "holds no vocabulary"),  # the whole folder
        ("tokenizer/tokenizer.json", "holds no vocabulary"),
        ("tokenizer/tokenizer_config.json", "pads text to `model_max_length` 1000000000000000019884624838656"),
    ],
)
def test_a_source_tokenizer_without_its_files_is_refused_not_trained(script, source, tmp_path, removed, message):
    # transformers 5 builds a CLIPTokenizer from a missing folder or one without its vocabulary (2 special tokens:
    # every caption encoded as end-of-text tokens, trained silently and saved with the result), and without
    # tokenizer_config.json one with transformers' huge default `model_max_length` (an OverflowError at the first step)
    sd, data = source
    path = os.path.join(sd, removed)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    args = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        _run(script, args)
    assert f"`--pretrained_model_name_or_path` {sd!r}: its tokenizer" in str(error.value)
    assert not os.path.exists(tmp_path / "o" / "model_index.json")


@pytest.mark.parametrize("method", ["multistage", "experts"])
def test_a_text_encoder_of_another_width_than_the_unet_takes_is_refused_not_trained(
    script, source, tiny_tokenizer, tmp_path, method
):
    # a 48-wide text encoder for a U-Net that attends to 32-wide text: the first step's matmul RuntimeError (experts)
    # or the staged U-Net's input error (naming no source), once the output folder was made
    from transformers import CLIPTextConfig, CLIPTextModel

    sd, data = source
    config = CLIPTextConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=77)  # fmt: skip
    shutil.rmtree(os.path.join(sd, "text_encoder"))
    CLIPTextModel(config).save_pretrained(os.path.join(sd, "text_encoder"))
    args = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--method", method, "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    message = f"`--pretrained_model_name_or_path` {sd!r}: its text encoder gives 48-wide hidden states"
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(script, args)
    assert not os.path.exists(tmp_path / "o" / "model_index.json")


def test_the_source_schedule_may_be_repeated(script, source, tmp_path):
    sd, data = source
    args = script.parse_args(
        ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
         "--num_train_timesteps", "1000", "--ddpm_beta_schedule", "linear", "--output_dir", str(tmp_path / "o")]
    )  # fmt: skip
    assert args.ddpm_beta_schedule == "linear" and args.vae_path is None


def test_a_source_schedule_of_other_length_is_kept_without_the_option(script, source, tmp_path, capsys):
    # `--num_train_timesteps` defaulted to 1000 here (its siblings to None, "given by the source"), so a source
    # scheduler of another length was refused with "drop `--num_train_timesteps`", an option the user never gave
    sd, data = source
    config_file = os.path.join(sd, "scheduler", "scheduler_config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump({**config, "num_train_timesteps": 500}, f)
    argv = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--stage_boundaries", "200", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    args = script.parse_args(argv)
    assert script.build_task(script.TextToImageTask, args).partition.num_train_timesteps == 500
    with pytest.raises(SystemExit):  # a length given that is not the source's is still refused
        script.parse_args([*argv, "--num_train_timesteps", "1000"])
    assert "`--num_train_timesteps` 1000 disagrees with the scheduler" in capsys.readouterr().err


def test_the_optimiser_defaults_are_diffusers_text_to_image_ones(script, source, tmp_path):
    # were train_unconditional.py's (beta1 0.95, weight decay 1e-6) under the text-to-image learning-rate defaults
    sd, data = source
    args = script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                              "caption", *TINY, "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert (args.adam_beta1, args.adam_beta2, args.adam_weight_decay, args.adam_epsilon) == (0.9, 0.999, 1e-2, 1e-8)
    # diffusers' text-to-image warm-up default (500 steps; `constant`, the default schedule, has none)
    assert (args.lr_scheduler, args.lr_warmup_steps, args.resolution) == ("constant", 500, 16)


def test_old_path_runs_the_new_script(monkeypatch, capsys):
    import runpy

    old = os.path.join(REPO, "examples", "text_to_image", "train_text_to_image_multistage.py")
    monkeypatch.setattr("sys.argv", [old, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(old, run_name="__main__")
    assert exit_info.value.code == 0 and "--validation_prompts" in capsys.readouterr().out


def test_dataset_name_with_a_caption_column(script, source, tmp_path):
    sd, data = source  # a local imagefolder that `datasets.load_dataset` reads: columns `image` and `caption`
    out = str(tmp_path / "from-dataset")
    base = ["--pretrained_model_name_or_path", sd, "--dataset_name", data, *TINY, "--max_train_steps", "1"]
    _run(script, [*base, "--caption_column", "caption", "--output_dir", out])
    assert type(StableDiffusionPipeline.from_pretrained(out).unet) is MultiStageUNet2DConditionModel
    with pytest.raises(ValueError, match="`--caption_column` 'title' is not a column"):
        _run(script, [*base, "--caption_column", "title", "--output_dir", str(tmp_path / "bad")])


def test_max_train_samples_keeps_each_image_with_its_caption(script, source, tmp_path, monkeypatch):
    # the captions ride on the label indices: the first N images after the seeded shuffle keep their own captions
    from diffusers_stages.training import loop

    seen = []
    images = loop.TrainingImages
    monkeypatch.setattr(loop, "TrainingImages", lambda records, *args: seen.append(records) or images(records, *args))
    sd, data = source
    out = str(tmp_path / "o")
    _run(script, ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption",
                  *TINY, "--stage_boundaries", "500", "--max_train_steps", "1", "--max_train_samples", "4",
                  "--seed", "3", "--output_dir", out])  # fmt: skip
    (records,) = seen
    chosen = np.random.default_rng(3).permutation(16)[:4].tolist()
    captions = ["a red cat", "a dog", "cat", "a big cat"]
    assert [records.class_names[label] for label in records.labels] == [captions[i % 4] for i in chosen]
    assert StableDiffusionPipeline.from_pretrained(out).unet.num_stages == 2


def _captioned(tmp_path, captions) -> str:
    data = tmp_path / "listed"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (data / "metadata.jsonl").write_text("\n".join(lines))
    return str(data)


def test_a_list_of_captions_trains_on_one_of_them_at_random(script, source, tmp_path):
    # diffusers' train_text_to_image.py draws one caption of a list per step; they were trained as "['a', 'b']"
    from diffusers_stages.training.loop import build_task
    from diffusers_stages.training.tasks.text_to_image import TextToImageTask

    sd, _ = source
    data = _captioned(tmp_path, [["a red cat", "a dog"], "cat", ["a big cat"], "a dog"] * 2)
    args = script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, *TINY,
                              "--output_dir", str(tmp_path / "o")])  # fmt: skip
    task = build_task(TextToImageTask, args)
    records = task.read_records(args)
    assert records.class_names[:4] == ["a red cat", "cat", "a big cat", "a dog"]  # the first caption: prompts
    task.build_networks(4, 2, None)
    tokens = task.tokenizer(["a red cat", "a dog", "cat", "a big cat", ""], padding="max_length", truncation=True,
                            max_length=task.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
    encoded = task.text_encoder(tokens)[0]
    torch.manual_seed(0)  # the loop seeds the global generator at every step: the draw repeats with the seed
    seen = {i: set() for i in range(4)}
    for _ in range(20):
        states = task.encode_captions(torch.tensor([0, 1, 2, 8]))  # 8: the null label, the empty caption
        for label, row in zip(range(4), states):
            seen[label] |= {j for j in range(5) if torch.allclose(row, encoded[j], atol=1e-6)}
    assert seen == {0: {0, 1}, 1: {2}, 2: {3}, 3: {4}}


@pytest.mark.parametrize("caption", [None, 3, [], ["a cat", 2]])
def test_a_caption_that_is_no_text_is_refused_by_name(script, source, tmp_path, caption):
    sd, _ = source
    data = _captioned(tmp_path, ["a cat", caption] * 4)
    with pytest.raises(ValueError, match=r"`--caption_column` 'text': .* line 2 .* neither a string nor a list"):
        _run(script, ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, *TINY, "--max_train_steps",
                      "1", "--output_dir", str(tmp_path / "o")])  # fmt: skip


def test_captions_are_tokenized_batch_by_batch(script, source, tmp_path, monkeypatch):
    # every caption of the data (images past --max_train_samples too) was tokenized and held as int64 token ids in
    # every process before training; diffusers' script tokenizes each batch's captions
    from transformers import CLIPTokenizer

    from diffusers_stages.training.loop import build_task
    from diffusers_stages.training.tasks.text_to_image import TextToImageTask

    sd, data = source
    args = script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                              "caption", *TINY, "--output_dir", str(tmp_path / "o")])  # fmt: skip
    task = build_task(TextToImageTask, args)
    task.read_records(args)
    seen, call = [], CLIPTokenizer.__call__
    monkeypatch.setattr(
        CLIPTokenizer, "__call__", lambda self, text, **kw: seen.append(text) or call(self, text, **kw)
    )
    task.build_networks(4, 2, None)
    assert seen == []
    task.encode_captions(torch.tensor([1, 16]))  # image 1's caption and the null label's
    assert seen == [["a dog", ""]]


def test_the_sample_grid_decodes_on_the_device_the_networks_train_on(script, source, tmp_path):
    # the float32 VAE of the source, which the grids and the saved pipeline decode with, stayed on the CPU while the
    # networks and the text encoder trained on the accelerator: every grid of a GPU run was a device mismatch
    from diffusers import DDIMScheduler

    from diffusers_stages.training.loop import build_task
    from diffusers_stages.training.tasks.text_to_image import TextToImageTask
    from tests.fake_cuda import fake_cuda

    sd, data = source
    args = script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                              "caption", *TINY, "--output_dir", str(tmp_path / "o")])  # fmt: skip
    task = build_task(TextToImageTask, args)
    task.read_records(args)
    networks = task.build_networks(4, 8, None)
    with fake_cuda():
        networks = {name: network.to("cuda") for name, network in networks.items()}
        task.text_encoder.to("cuda")  # as `encode_captions` leaves it after a step
        pipe = task.pipeline(networks, DDIMScheduler(), None)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(["a cat"], height=16, width=16, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize(
    "component, saved_as",
    [
        ("unet", "bin"),
        ("vae", "bin"),
        ("text_encoder", "bin"),
        ("unet", "fp16 variant"),
        ("experts", "bin"),
        ("unet", "shards without their index"),
    ],
)
def test_a_source_without_safetensors_weights_is_refused_with_the_arguments(
    script, source, tiny_sd_components, tmp_path, capsys, component, saved_as
):
    # the source's networks are read from plain safetensors only (`use_safetensors=True`): a pipeline saved with
    # `safe_serialization=False` (pickle .bin files) or as a variant only was diffusers' OSError ("no file named
    # diffusion_pytorch_model.safetensors") after the output folder was made and the data were read
    sd, data = source
    args = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    if component == "experts":  # a routed source: the experts' folders hold the weights
        pipe = StableDiffusionPipeline(**tiny_sd_components)
        pipe.unet = ExpertRoutingModel([pipe.unet, pipe.unet], stage_boundaries=(500,))
        pipe.save_pretrained(sd, safe_serialization=False)
        args += ["--method", "experts"]
        folder = os.path.join(sd, "unet", "expert_0")
    else:
        folder = os.path.join(sd, component)
        module = tiny_sd_components[component]
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(folder, name))
        if component == "text_encoder":  # (transformers 5 saves safetensors only: the .bin of older versions)
            torch.save(module.state_dict(), os.path.join(folder, "pytorch_model.bin"))
        elif saved_as == "bin":
            module.save_pretrained(folder, safe_serialization=False)
        elif saved_as == "fp16 variant":
            module.save_pretrained(folder, variant="fp16")
        else:  # diffusers loads shards by their index only
            module.save_pretrained(folder, max_shard_size="50KB")
            os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
    with pytest.raises(SystemExit):
        script.parse_args(args)
    error = capsys.readouterr().err
    where = os.path.relpath(folder, sd)
    assert f"`--pretrained_model_name_or_path` {sd!r}: its {where}/ holds no plain safetensors weights" in error, error
    assert not os.path.exists(tmp_path / "o")


def test_the_resolution_needs_only_the_vae_factor(script, source, tmp_path, capsys):
    # a UNet2DConditionModel, and the staged decoders, take latents of any size (the up-sampling sizes are forwarded),
    # as diffusers' train_text_to_image.py trains them; `--resolution` was refused unless divisible by the VAE's
    # factor times the U-Net's (64 for Stable Diffusion: 520 was refused, "try 512"). Tiny VAE: x2, tiny U-Net: x2
    sd, data = source
    base = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--max_train_steps", "1"]  # fmt: skip
    out = str(tmp_path / "o")
    _run(script, [*base, "--resolution", "18", "--output_dir", out])  # 9 x 9 latents
    assert type(StableDiffusionPipeline.from_pretrained(out).unet) is MultiStageUNet2DConditionModel
    with pytest.raises(SystemExit):  # the VAE's factor still holds
        script.parse_args([*base, "--resolution", "17", "--output_dir", str(tmp_path / "p")])
    assert "`--resolution` 17 must be divisible by the model's total down-sampling factor 2" in capsys.readouterr().err


def test_an_sdxl_source_is_refused_with_the_arguments(script, source, tiny_sdxl_components, tmp_path, capsys):
    # the README: SDXL's second text encoder and size conditioning are not trained here (diffusers has a script of
    # its own for it, train_text_to_image_sdxl.py); refused by name before anything is written
    from diffusers import StableDiffusionXLPipeline

    _, data = source
    sdxl = str(tmp_path / "sdxl")
    StableDiffusionXLPipeline(**tiny_sdxl_components).save_pretrained(sdxl)
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", sdxl, "--train_data_dir", data, *TINY,
                           "--output_dir", str(tmp_path / "o")])  # fmt: skip
    error = capsys.readouterr().err
    assert (
        f"`--pretrained_model_name_or_path` {sdxl!r} is a StableDiffusionXLPipeline, not a StableDiffusionPipeline"
        in error
    )
    assert not os.path.exists(tmp_path / "o")


def test_the_help_describes_text_to_image_data_and_options(script, monkeypatch, capsys):
    # `--help` gave the shared parser's texts: `--train_data_dir` "Folder of images (sub-folders = classes)", where
    # this script reads an image folder with a metadata.jsonl of captions, and `--class_dropout_prob` a "null-label
    # rate" for captions replaced by the empty one
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sub-folders = classes" not in text and "Null-label rate" not in text
    assert "--train_data_dir TRAIN_DATA_DIR An image folder with a metadata.jsonl" in text
    assert "--class_dropout_prob CLASS_DROPOUT_PROB Rate of captions replaced by the empty one" in text
    assert "--prediction_type {epsilon,v_prediction,sample} Default: the source scheduler's" in text


@pytest.mark.parametrize("staged", [False, True])
def test_sigma_boundary_units_are_refused_by_name(script, source, tiny_sd_components, tmp_path, capsys, staged):
    # a staged source trained with `--boundary_units sigma` given, ignored without a word; with a plain source the
    # error blamed "the source's stages" and named no option
    sd, data = source
    argv = ["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column", "caption", *TINY,
            "--max_train_steps", "1", "--boundary_units", "sigma", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    if staged:
        pipe = StableDiffusionPipeline(**tiny_sd_components)
        pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, (300, 600))
        pipe.save_pretrained(sd)
    else:
        argv += ["--stage_boundaries", "1.0"]
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert "`--boundary_units` sigma is refused" in capsys.readouterr().err


def test_a_routed_source_of_unconditional_experts_is_refused_with_the_arguments(
    script, source, tiny_sd_components, tmp_path, capsys
):
    # an ExpertRoutingModel of UNet2DModel experts in a Stable Diffusion folder was loaded and trained: torch's
    # TypeError "unexpected keyword argument 'encoder_hidden_states'" at the first step, its output folder made
    from diffusers import UNet2DModel

    sd, data = source
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    shape = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)  # fmt: skip
    pipe.unet = ExpertRoutingModel([UNet2DModel(**shape), UNet2DModel(**shape)], stage_boundaries=(500,))
    pipe.save_pretrained(sd)
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                           "caption", *TINY, "--method", "experts", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    error = capsys.readouterr().err
    assert f"`--pretrained_model_name_or_path` {sd!r} holds an ExpertRoutingModel of UNet2DModel experts" in error
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("index", ["with unet", "without unet"])
@pytest.mark.parametrize("defect", ["class", "conditioning", "weights"])
def test_every_check_reads_a_routed_source_s_experts_alike(
    script, source, tiny_sd_components, tiny_cond_unet, tmp_path, capsys, defect, index
):
    # the experts' folders were read from `expert_classes` three times with three fallbacks, and the safetensors
    # check reached them only through the `unet` entry of model_index.json, which the unet's loading never reads: a
    # source whose index lacked it trained its experts from files that check had not seen. One reading now, so the
    # last expert's defect is refused by each check, the index with or without its unet entry
    sd, data = source
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    last = tiny_cond_unet(0, class_embed_type="timestep") if defect == "conditioning" else pipe.unet
    pipe.unet = ExpertRoutingModel([pipe.unet, pipe.unet, last], stage_boundaries=(300, 600))
    pipe.save_pretrained(sd)
    folder = os.path.join(sd, "unet", "expert_2")
    if defect == "weights":
        os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        torch.save(last.state_dict(), os.path.join(folder, "diffusion_pytorch_model.bin"))
    if index == "without unet":
        _rewrite_json(os.path.join(sd, "model_index.json"), lambda c: {k: v for k, v in c.items() if k != "unet"})
    if defect == "class":
        unconditional = ["diffusers", "UNet2DModel"]
        _rewrite_json(
            os.path.join(sd, "unet", "config.json"),
            lambda c: {**c, "expert_classes": [*c["expert_classes"][:2], unconditional]},
        )
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                           "caption", *TINY, "--method", "experts", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    error = capsys.readouterr().err
    expected = {
        "class": f"{sd!r} holds an ExpertRoutingModel of UNet2DModel experts",
        "conditioning": f"{sd!r}: its unet/expert_2/config.json has `class_embed_type` 'timestep'",
        "weights": f"{sd!r}: its unet/expert_2/ holds no plain safetensors weights",
    }[defect]
    assert expected in error, error
    assert not os.path.exists(tmp_path / "o")


def _rewrite_json(path: str, edit) -> None:
    """Replace the JSON object in file ``path`` with ``edit(object)``."""
    with open(path, encoding="utf-8") as f:
        config = edit(json.load(f))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"stage_boundaries": 500}, "stage_boundaries"),
        ({"expert_classes": []}, "holds an ExpertRoutingModel without experts"),
    ],
    ids=["stage-list-a-number", "no-experts"],
)
def test_a_routed_source_with_a_malformed_stage_or_expert_list_is_refused_by_name(
    script, source, tiny_sd_components, tmp_path, capsys, change, named
):
    # the safetensors check counted the expert folders from `stage_boundaries` as read from the file: a number there
    # was a TypeError (a traceback) rather than the usage error naming the source's config; an empty `expert_classes`
    # gave the checks no expert folder to read (the safetensors check read expert_0 anyway)
    sd, data = source
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    pipe.unet = ExpertRoutingModel([pipe.unet, pipe.unet], stage_boundaries=(500,))
    pipe.save_pretrained(sd)
    _rewrite_json(os.path.join(sd, "unet", "config.json"), lambda config: {**config, **change})
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                           "caption", *TINY, "--method", "experts", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, needs",
    [
        ({"num_class_embeds": 4}, "`num_class_embeds` 4"),
        ({"class_embed_type": "timestep"}, "`class_embed_type` 'timestep'"),
        (dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
         "`addition_embed_type` 'text_time'"),
    ],
)  # fmt: skip
def test_a_unet_that_needs_more_than_the_captions_is_refused_with_the_arguments(
    script, source, tiny_sd_components, tiny_cond_unet, tmp_path, capsys, overrides, needs
):
    # class labels or SDXL's added conditioning, which neither the captions nor StableDiffusionPipeline give: was the
    # U-Net's own error at the first step ("class_labels should be provided ..."), the output folder made
    sd, data = source
    StableDiffusionPipeline(**{**tiny_sd_components, "unet": tiny_cond_unet(0, **overrides)}).save_pretrained(sd)
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                           "caption", *TINY, "--output_dir", str(tmp_path / "o")])  # fmt: skip
    error = capsys.readouterr().err
    assert f"`--pretrained_model_name_or_path` {sd!r}: its unet/config.json has {needs}" in error, error
    assert not os.path.exists(tmp_path / "o")


def test_the_sample_grid_samples_its_prompts_in_chunks_of_eval_batch_size(script, source, tmp_path):
    # every prompt of the grid was sampled (and decoded) in one StableDiffusionPipeline call: at 512 px, GBs during
    # training. `--eval_batch_size` splits the prompts, one generator per image, and the grid stays the same
    from diffusers import DDIMScheduler

    from diffusers_stages.training.loop import build_task
    from diffusers_stages.training.state import sample_grid
    from diffusers_stages.training.tasks.text_to_image import TextToImageTask

    sd, data = source
    grids = {}
    for size in ("1", "2", "3"):
        args = script.parse_args(["--pretrained_model_name_or_path", sd, "--train_data_dir", data, "--caption_column",
                                  "caption", *TINY, "--num_sample_images", "3", "--eval_batch_size", size,
                                  "--validation_prompts", "a cat", "a dog", "--output_dir", str(tmp_path / "o")])  # fmt: skip
        task = build_task(TextToImageTask, args)
        task.read_records(args)
        torch.manual_seed(0)
        pipe = task.pipeline(task.build_networks(4, 2, None), DDIMScheduler(), None)
        calls = []
        _record_prompts(pipe, calls)
        _, grids[size] = sample_grid(pipe, args, 0, task.sample_inputs(args.num_sample_images))
        assert [prompt for call in calls for prompt in call] == ["a cat", "a dog", "a cat"]
        assert max(len(call) for call in calls) == int(size)
    assert grids["1"].shape == (3, 16, 16, 3)
    for size in ("2", "3"):  # the same noise; the same images up to the float rounding of batched kernels
        assert np.allclose(grids["1"], grids[size], rtol=0, atol=1e-5), size


def _record_prompts(pipe, calls: list) -> None:
    """Make ``pipe`` append the prompts of each of its calls to ``calls``."""
    original = type(pipe).__call__

    def call(self, *args, **kwargs):
        calls.append(kwargs["prompt"])
        return original(self, *args, **kwargs)

    pipe.__class__ = type("Recording", (type(pipe),), {"__call__": call})
