"""`python -m diffusers_stages.plan`: image folder or `datasets` dataset in, boundaries, JSON, PNG and config out."""

import json
import shutil
import subprocess
import sys

import matplotlib.figure
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from sklearn.datasets import load_digits

from diffusers_stages import MultiStageUNet2DModel, TimestepPartition
from diffusers_stages.conventions import vae_to_model_latents
from diffusers_stages.plan import run
from diffusers_stages.planning import load_images, plan_stages
from diffusers_stages.planning.budget import expected_flops, widths_for_budget
from tests.conftest import tiny_vae

FAST = ["--num_levels", "30", "--num_samples", "16", "--resolution", "8", "--num_channels", "1"]


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    for i, image in enumerate(load_digits().images[:120]):
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return folder


def test_image_folder_to_boundaries_plot_and_model_config(digit_folder, tmp_path, capsys, tiny_unet_kwargs):
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(dict(tiny_unet_kwargs, in_channels=1, out_channels=1)))
    plot, output_config = tmp_path / "plan.png", tmp_path / "planned" / "config.json"
    result = run(
        [
            "--train_data_dir",
            str(digit_folder),
            *FAST,
            "--output_plot",
            str(plot),
            "--model_config",
            str(model_config),
            "--output_config",
            str(output_config),
        ]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == result  # the last line is JSON a script can parse
    assert "stage 0: [0, " in printed[1] and result["method"] == "optimal_denoiser"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    planned = json.loads(output_config.read_text())
    assert planned["_class_name"] == "MultiStageUNet2DModel"  # what it holds, so training reads it as planned
    model = MultiStageUNet2DModel.from_config(planned)
    assert list(model.partition.boundaries) == result["stage_boundaries"]
    assert [list(w) for w in model.config.decoder_block_out_channels] == result["decoder_block_out_channels"]


def test_heuristic_widths_give_every_attention_layer_a_head(digit_folder, tmp_path, tiny_unet_kwargs):
    # widths were multiples of norm_num_groups alone: with groups 4 and heads 8 channels wide the narrow decoder got
    # width 4, no head, and the planned config was refused as if `--model_config` were broken
    model_config, output_config = tmp_path / "config.json", tmp_path / "planned.json"
    shape = dict(tiny_unet_kwargs, in_channels=1, out_channels=1, attention_head_dim=8)
    model_config.write_text(json.dumps(shape))
    common = ["--train_data_dir", str(digit_folder), *FAST, "--model_config", str(model_config)]
    result = run([*common, "--output_config", str(output_config)])
    assert all(w % 8 == 0 for widths in result["decoder_block_out_channels"] for w in widths)
    MultiStageUNet2DModel.from_config(json.loads(output_config.read_text()))  # builds
    model_config.write_text(
        json.dumps(dict(shape, down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2))
    )
    assert min(w for widths in run(common)["decoder_block_out_channels"] for w in widths) == 4  # no attention


def test_folder_and_saved_dataset_load_the_same_images(digit_folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    from_folder = load_images(train_data_dir=str(digit_folder), resolution=8, num_channels=1)
    assert from_folder.shape == (120, 1, 8, 8) and from_folder.min() >= -1 and from_folder.max() <= 1
    images = [Image.open(digit_folder / f"{i:04d}.png") for i in range(120)]
    datasets.Dataset.from_dict({"img": images}).save_to_disk(str(tmp_path / "ds"))
    from_dataset = load_images(dataset=str(tmp_path / "ds"), image_column="img", resolution=8, num_channels=1)
    assert torch.equal(from_folder, from_dataset)
    with pytest.raises(ValueError, match="`image_column` 'image' is not a column"):
        load_images(dataset=str(tmp_path / "ds"), resolution=8)
    # the image folder's refusals hold for a dataset's images too (a floating-point image was read as all black)
    float_images = [Image.fromarray(np.full((8, 8), v, dtype=np.float32)) for v in (0.2, 0.8)]
    datasets.Dataset.from_dict({"image": float_images}).save_to_disk(str(tmp_path / "float"))
    with pytest.raises(ValueError, match="`dataset` holds a floating-point image \\(mode 'F'\\).*row 0"):
        load_images(dataset=str(tmp_path / "float"), resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images found"):
        load_images(train_data_dir=str(tmp_path / "empty"), resolution=8)


def test_errors_found_reading_the_data_name_the_commands_options(digit_folder, tmp_path):
    # they named the planning API's arguments (`image_column`, `split`, `train_data_dir`), not the options to change
    datasets = pytest.importorskip("datasets")
    images = [Image.open(digit_folder / f"{i:04d}.png") for i in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"img": images})}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="`--image_column` 'image' is not a column of the dataset"):
        run(["--dataset", str(tmp_path / "ds"), *FAST])
    with pytest.raises(ValueError, match="`--split` 'test' is not in the dataset"):
        run(["--dataset", str(tmp_path / "ds"), "--image_column", "img", "--split", "test", *FAST])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images found in `--train_data_dir` "):
        run(["--train_data_dir", str(tmp_path / "empty"), *FAST])


def test_module_entry_point_runs_for_an_edm_schedule():
    command = [sys.executable, "-m", "diffusers_stages.plan", "--method", "snr", "--edm", "--num_stages", "4"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["boundary_units"] == "sigma" and len(result["stage_boundaries"]) == 3
    if shutil.which("diffusers-stages-plan"):  # the console script of setup.py, once installed
        out = subprocess.run(
            [shutil.which("diffusers-stages-plan"), *command[3:]], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0 and json.loads(out.stdout.strip().splitlines()[-1]) == result


def test_bad_command_lines_are_refused(digit_folder, capsys):
    with pytest.raises(SystemExit) as exit_info:  # was "Give exactly one of `train_data_dir` and `dataset`", status 1
        run(FAST)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "give `--train_data_dir DIR` or `--dataset NAME`" in err, err
    with pytest.raises(SystemExit):
        run(["--method", "snr", "--output_config", "x.json"])  # needs --model_config


@pytest.mark.parametrize(
    "options, named",
    [
        (["--sigma_max", "10"], "--sigma_min, --sigma_max and --rho"),  # shape only the --edm schedule
        (["--rho", "3", "--scheduler_config", "x.json"], "--sigma_min, --sigma_max and --rho"),
        (["--model_path", "model"], "--model_path"),  # read by --method gradient only
        (["--split", "test"], "--image_column and --split"),  # of a --dataset, not of an image folder
    ],
)
def test_options_the_command_would_ignore_are_refused(digit_folder, capsys, options, named):
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", str(digit_folder), *FAST, *options])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_a_bad_image_file_is_named_before_planning(digit_folder, tmp_path, kind):
    folder = tmp_path / "images"
    shutil.copytree(digit_folder, folder)
    bad = folder / "0007.png"
    if kind == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.write_text("not an image\n")
    with pytest.raises(ValueError, match="`--train_data_dir` holds a file that is not a readable image") as error:
        run(["--train_data_dir", str(folder), *FAST])
    assert repr(str(bad)) in str(error.value)


@pytest.mark.parametrize("count", [1, 3])
def test_a_folder_of_one_image_or_of_copies_is_refused_by_its_cause(digit_folder, tmp_path, count):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(count):
        shutil.copy(digit_folder / "0000.png", folder / f"{i}.png")
    held = "1 image" if count == 1 else f"{count} images, all identical"
    # a model of the images' channels, whose widths are never planned: the images are refused first
    (tmp_path / "config.json").write_text('{"in_channels": 1, "out_channels": 1}')
    for method in (
        ["--method", "optimal_denoiser"],
        ["--method", "snr", "--model_config", str(tmp_path / "config.json")],
    ):
        with pytest.raises(ValueError, match=f"`--train_data_dir` holds {held}: planning needs at least 2 different"):
            run(["--train_data_dir", str(folder), *FAST, *method])


def test_a_budget_plans_the_decoder_widths_of_the_written_config(digit_folder, tmp_path, capsys, tiny_unet_kwargs):
    config = dict(tiny_unet_kwargs, in_channels=1, out_channels=1)
    model_config, output_config = tmp_path / "config.json", tmp_path / "planned" / "config.json"
    model_config.write_text(json.dumps(config))
    budget = 1.5 * expected_flops(config, TimestepPartition([300, 600]), [(8, 16)] * 3, 10, DDPMScheduler())
    common = ["--train_data_dir", str(digit_folder), *FAST, "--model_config", str(model_config)]
    result = run(
        [*common, "--budget", str(budget), "--num_inference_steps", "10", "--output_config", str(output_config)]
    )
    assert result["expected_flops"] <= budget and result["budget"] == budget
    model = MultiStageUNet2DModel.from_config(json.loads(output_config.read_text()))
    assert [list(w) for w in model.config.decoder_block_out_channels] == result["decoder_block_out_channels"]
    assert result["decoder_block_out_channels"][0] > result["decoder_block_out_channels"][2]  # data end: widest
    # refused before any image is read (a missing folder would be refused otherwise), by option name
    missing = ["--train_data_dir", str(tmp_path / "no-such-folder"), *common[2:]]
    for paid in (["--num_inference_steps", "10"], []):
        with pytest.raises(SystemExit) as exit_info:
            run([*missing, "--budget", "1000", *paid])
        err = capsys.readouterr().err
        assert (
            exit_info.value.code == 2 and "`--budget`=1000 FLOPs is below what the smallest allowed widths cost" in err
        )
        assert "scales" not in err and "raise --budget or plan a narrower --model_config" in err  # no such option
    with pytest.raises(SystemExit):
        run([*common, "--num_inference_steps", "10"])  # what a budget pays for, without a budget


@pytest.mark.parametrize(
    "config, match",
    [
        ({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}, "is a DDPMScheduler config"),  # was a KeyError
        ({"_class_name": "UNet2DConditionModel"}, "is a UNet2DConditionModel config"),  # was written, did not load
        ({"block_out_channels": [8, 16], "norm_num_groups": 32}, "does not build a UNet2DModel: ValueError"),
    ],
)
def test_a_model_config_no_planned_model_can_be_built_from_is_refused_before_any_image_is_read(
    tmp_path, capsys, config, match
):
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(config))
    missing = str(tmp_path / "no-such-folder")  # never read: the config is checked first
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", missing, *FAST, "--model_config", str(model_config), "--output_config", "x.json"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"`--model_config` {str(model_config)!r}" in err and match in err


def test_outputs_are_replaced_whole_or_left_as_they_were(digit_folder, tmp_path, monkeypatch, tiny_unet_kwargs):
    model_config, output_config, plot = tmp_path / "config.json", tmp_path / "planned.json", tmp_path / "plan.png"
    model_config.write_text(json.dumps(dict(tiny_unet_kwargs, in_channels=1, out_channels=1)))
    output_config.write_text("earlier plan")
    plot.write_text("earlier plot")

    def half_written(obj, f, **kwargs):  # the write stops half-way (a full disk, Ctrl-C)
        f.write("{")
        raise OSError("No space left on device")

    def half_saved(figure, path, **kwargs):
        half_written(None, open(path, "w"))

    common = ["--train_data_dir", str(digit_folder), *FAST, "--model_config", str(model_config)]
    for patched, name, replacement, output in (
        (json, "dump", half_written, ["--output_config", str(output_config)]),
        (matplotlib.figure.Figure, "savefig", half_saved, ["--output_plot", str(plot)]),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(patched, name, replacement)
            with pytest.raises(OSError):
                run([*common, *output])
        assert output_config.read_text() == "earlier plan" and plot.read_text() == "earlier plot"
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "config.json",
            "plan.png",
            "planned.json",
        ]  # no half file
    output_config.write_text("earlier plan")
    # a planned config that would not load is refused before anything is written (3 stages, 2 decoder block types;
    # a usage error before any image is read, as `test_per_stage_up_blocks_for_another_number_of_stages_...` checks)
    config = dict(tiny_unet_kwargs, in_channels=1, out_channels=1, stage_boundaries=[500])
    model_config.write_text(json.dumps({**config, "_class_name": "MultiStageUNet2DModel",
                                        "decoder_up_block_types": [config["up_block_types"]] * 2}))  # fmt: skip
    with pytest.raises(SystemExit):
        run([*common, "--output_config", str(output_config)])
    assert output_config.read_text() == "earlier plan"


@pytest.mark.parametrize(
    "config, cause",
    [
        ({"_class_name": "DDPMScheduler", "beta_schedule": "bogus"}, "NotImplementedError"),  # were tracebacks
        ({"_class_name": "DDPMScheduler", "trained_betas": "abc"}, "TypeError"),
    ],
)
def test_a_scheduler_config_that_builds_no_scheduler_is_refused_by_name(tmp_path, capsys, config, cause):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:  # a usage error, before any image is read
        run(["--method", "uniform", "--num_levels", "10", "--scheduler_config", str(tmp_path)])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and "`--scheduler_config`" in err
        and f"does not build a DDPMScheduler: {cause}" in err
    )


def test_an_output_over_an_input_or_another_output_is_refused_before_any_image_is_read(tmp_path, capsys):
    model_config = tmp_path / "config.json"
    model_config.write_text('{"in_channels": 1, "out_channels": 1}')  # a model of FAST's gray images
    common = ["--train_data_dir", str(tmp_path / "no-such-folder"), *FAST, "--model_config", str(model_config)]
    for outputs, named in (
        (["--output_plot", str(model_config)], "`--output_plot`"),  # the PNG would replace the source config
        (["--output_config", "same", "--output_plot", "same"], "`--output_plot`"),  # the PNG would replace the plan
    ):
        with pytest.raises(SystemExit) as exit_info:
            run([*common, *outputs])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and named in err and "give another path" in err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--method", "ilp", "--alpha", "0.8"], "--alpha is read by --method optimal_denoiser only, not ilp"),
        (
            ["--method", "gradient", "--alpha", "0.8"],
            "--alpha is read by --method optimal_denoiser only, not gradient",
        ),
        (["--method", "snr", "--eta", "0.2"], "--eta is read by --method optimal_denoiser and ilp only, not snr"),
        (["--method", "uniform", "--eta", "0.2"], "--eta is read by --method optimal_denoiser and ilp only, not unif"),
    ],
)
def test_a_threshold_the_method_does_not_read_is_a_usage_error(tmp_path, capsys, options, message):
    # the plan was that of the method's own rule, the threshold given ignored without a word
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", str(tmp_path), *FAST, *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_per_stage_up_blocks_for_another_number_of_stages_are_refused_before_any_image_is_read(
    tmp_path, capsys, tiny_unet_kwargs
):
    # a MultiStageUNet2DModel config whose `decoder_up_block_types` name 2 decoders, planned for 3 stages: the
    # planned config could never build, and was refused only after every image was read and planned on
    ups = [["AttnUpBlock2D", "UpBlock2D"], ["UpBlock2D", "UpBlock2D"]]
    config = dict(tiny_unet_kwargs, in_channels=1, out_channels=1, _class_name="MultiStageUNet2DModel",
                  stage_boundaries=[500.0], decoder_up_block_types=ups)  # fmt: skip
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(config))
    missing = str(tmp_path / "no-such-folder")  # never read: the options are checked first
    for output in ([], ["--output_config", str(tmp_path / "planned.json")]):
        with pytest.raises(SystemExit) as exit_info:
            run(
                ["--train_data_dir", missing, *FAST, "--model_config", str(model_config), "--num_stages", "3", *output]
            )
        assert exit_info.value.code == 2
        assert "sets `decoder_up_block_types` for 2 stages, but `--num_stages` is 3" in capsys.readouterr().err


def test_a_model_path_of_another_size_than_the_resolution_is_refused_before_any_image_is_read(
    tmp_path, capsys, tiny_unet_kwargs
):
    # the gradient baseline measured an 8-pixel model on 16-pixel images (and a 9-pixel resolution, which its
    # down-sampling does not divide, was a RuntimeError traceback from its skip connections), after every image was read
    UNet2DModel(**dict(tiny_unet_kwargs, in_channels=1, out_channels=1)).save_pretrained(tmp_path / "model")
    missing = str(tmp_path / "no-such-folder")  # never read: the options are checked first
    for resolution in ("16", "9"):
        with pytest.raises(SystemExit) as exit_info:
            run(["--train_data_dir", missing, *FAST, "--resolution", resolution, "--method", "gradient",
                 "--model_path", str(tmp_path / "model")])  # fmt: skip
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert (
            f"is for samples of size 8, but `--resolution` {resolution} gives samples of size {resolution}: give `--resolution 8`"
            in err
        )


@pytest.mark.parametrize("method", ["optimal_denoiser", "ilp", "gradient"])
def test_more_stages_than_noise_levels_is_a_usage_error_before_any_image_is_read(tmp_path, capsys, method):
    # refused by the planning functions only once every image was read, naming `num_stages` and `num_levels`
    missing = str(tmp_path / "no-such-folder")  # never read: the options are checked first
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", missing, *FAST, "--num_stages", "40", "--method", method])  # FAST: 30 levels
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "`--num_stages`=40 exceeds the 30 noise levels of the planning grid; raise `--num_levels`." in err


def test_a_batch_size_with_a_sampling_budget_is_a_usage_error_before_any_image_is_read(tmp_path, capsys):
    # --batch_size is the training batch a budget without --num_inference_steps pays for: with it the budget is the
    # sampling FLOPs per image, and the batch was ignored (it is refused by plan_stages, after every image was read)
    model_config = tmp_path / "config.json"
    model_config.write_text("{}")
    missing = str(tmp_path / "no-such-folder")  # never read: the options are checked first
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", missing, *FAST, "--model_config", str(model_config), "--budget", "1e9",
             "--num_inference_steps", "10", "--batch_size", "4"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--batch_size is the training batch a budget without --num_inference_steps pays for" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "option, value", [("--budget", "nan"), ("--budget", "-1"), ("--num_inference_steps", "0"), ("--batch_size", "-2")]
)
def test_bad_budget_options_are_refused_by_name_before_any_image_is_read(tmp_path, capsys, option, value):
    model_config = tmp_path / "config.json"
    model_config.write_text("{}")
    budget = [] if option == "--budget" else ["--budget", "1e9"]
    missing = str(tmp_path / "no-such-folder")  # never read: the options are checked first
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", missing, *FAST, "--model_config", str(model_config), *budget, option, value])
    assert exit_info.value.code == 2
    assert f"`{option}` must be a positive" in capsys.readouterr().err


def test_an_output_over_the_scheduler_or_model_path_config_is_refused_before_any_image_is_read(tmp_path, capsys):
    # only `--model_config` was guarded: the plot or the plan replaced the `--scheduler_config` (a file, or the
    # folder's scheduler_config.json) or the `--model_path` model's config.json
    scheduler = tmp_path / "scheduler"
    scheduler.mkdir()
    (scheduler / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"in_channels": 1}))  # the images of FAST
    common = ["--train_data_dir", str(tmp_path / "no-such-folder"), *FAST]
    for inputs, outputs, named in (
        (["--scheduler_config", str(scheduler)], ["--output_plot", str(scheduler / "scheduler_config.json")],
         "`--output_plot`"),
        (["--scheduler_config", str(scheduler / "scheduler_config.json")],
         ["--output_plot", str(scheduler / "scheduler_config.json")], "`--output_plot`"),
        (["--method", "gradient", "--model_path", str(model)], ["--output_plot", str(model / "config.json")],
         "`--output_plot`"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            run([*common, *inputs, *outputs])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and named in err and "give another path" in err, err
    assert json.loads((scheduler / "scheduler_config.json").read_text()) == {"_class_name": "DDPMScheduler"}


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--num_stages", "1", "`--num_stages` must be an integer >= 2, got 1"),
        ("--num_samples", "0", "`--num_samples` must be a positive integer"),
        ("--chunk_size", "0", "`--chunk_size` must be a positive integer"),
        ("--max_images", "0", "`--max_images` must be a positive integer"),
        ("--resolution", "0", "`--resolution` must be a positive integer"),
        ("--alpha", "1.5", "`--alpha` must be in (0, 1], got 1.5"),
        ("--eta", "0", "`--eta` must be in (0, 1], got 0.0"),
    ],
)
def test_bad_planning_options_are_usage_errors_before_any_image_is_read(tmp_path, capsys, option, value, message):
    # these were refused by the planning functions, after every image was loaded, with exit status 1 and the
    # Python argument's name (`num_stages`)
    missing = str(tmp_path / "no-such-folder")  # never read: the options are checked first
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", missing, *FAST, option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("paid", [["--num_inference_steps", "4"], []], ids=["sampling", "training"])
def test_a_latent_budget_says_it_counts_the_denoiser_only(digit_folder, tmp_path, capsys, tiny_unet_kwargs, paid):
    # with --vae_path the budget paid for the latent denoiser's FLOPs, not the VAE's encoding (each training batch)
    # or decoding (each sample), and neither the report nor --help said so
    tiny_vae().save_pretrained(tmp_path / "vae")
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(dict(tiny_unet_kwargs, in_channels=4, out_channels=4)))  # 8 px latents
    fast = [*FAST[:4], "--resolution", "16", "--num_channels", "3", "--max_images", "40", "--method", "snr"]
    result = run(["--train_data_dir", str(digit_folder), *fast, "--vae_path", str(tmp_path / "vae"),
                  "--model_config", str(model_config), "--budget", "1e12", *paid])  # fmt: skip
    printed = capsys.readouterr().out
    assert result["expected_flops"] <= 1e12
    assert "the budget counts the denoiser's FLOPs only: the `--vae_path` VAE's" in printed
    pixels = tmp_path / "pixels.json"
    pixels.write_text(json.dumps(dict(tiny_unet_kwargs, in_channels=1, out_channels=1)))
    run(["--train_data_dir", str(digit_folder), *FAST, "--model_config", str(pixels), "--budget", "1e12", *paid])
    assert "VAE" not in capsys.readouterr().out  # a pixel model: the denoiser is the whole cost
    with pytest.raises(SystemExit):
        run(["--help"])
    assert "the VAE's encoding and decoding are not counted" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "options, message",
    [
        (["--num_levels", "2"], "`--num_levels` must be an integer >= 3, got 2"),
        (["--num_levels", "-5"], "`--num_levels` must be an integer >= 3, got -5"),
        (["--num_levels", "1001"], "`--num_levels` must be at most the 1000 training timesteps of the schedule"),
        (["--edm", "--sigma_min", "-1"], "`--sigma_min` -1.0 and `--sigma_max` 80.0"),
        (["--edm", "--sigma_min", "nan"], "`--sigma_min` nan and `--sigma_max` 80.0"),
        (["--edm", "--sigma_max", "inf"], "`--sigma_min` 0.002 and `--sigma_max` inf"),
        (["--edm", "--sigma_max", "0.001"], "`--sigma_min` 0.002 and `--sigma_max` 0.001"),
        (["--edm", "--rho", "0"], "`--rho` must be a positive finite number, got 0.0"),
        (["--edm", "--rho", "nan"], "`--rho` must be a positive finite number, got nan"),
    ],
)
def test_bad_schedule_options_are_usage_errors_naming_the_option(tmp_path, capsys, options, message):
    # these were refused after parsing, with exit status 1 and the Python argument's name (`num_levels`, `rho`)
    missing = str(tmp_path / "no-such-folder")  # never read: the options are checked first
    fast = ["--num_samples", "16", "--resolution", "8", "--num_channels", "1"]
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", missing, *fast, *options])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err


@pytest.mark.parametrize("name", ["plan.pdf", "plan.jpg", "plan.SVG"])
def test_an_output_plot_named_for_another_format_is_refused(tmp_path, capsys, name):
    # the plot is a PNG: `--output_plot plan.pdf` wrote PNG bytes into plan.pdf, a file no PDF viewer opens
    path = tmp_path / name
    with pytest.raises(SystemExit) as exit_info:
        run(["--method", "snr", "--num_levels", "20", "--output_plot", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"`--output_plot` {str(path)!r}" in err and ".png" in err, err
    assert not path.exists()
    run(["--method", "snr", "--num_levels", "20", "--output_plot", str(tmp_path / "plan.PNG")])  # any case
    assert (tmp_path / "plan.PNG").read_bytes()[:4] == b"\x89PNG"


def test_a_train_data_dir_that_is_not_a_folder_is_a_usage_error_naming_the_option(tmp_path, capsys):
    # was "error: `train_data_dir` '...' is not a folder." with exit status 1, the Python argument's name
    (tmp_path / "file.png").write_bytes(b"not a folder")
    for path in (tmp_path / "missing", tmp_path / "file.png"):
        with pytest.raises(SystemExit) as exit_info:
            run(["--train_data_dir", str(path), *FAST])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"`--train_data_dir` {str(path)!r} is not a folder" in err, err
    run(["--train_data_dir", str(tmp_path / "missing"), "--method", "snr", "--num_levels", "20"])  # not read by snr


def test_the_gradient_baseline_plans_with_a_class_conditional_model(digit_folder, tmp_path, tiny_unet_kwargs):
    # a `--class_conditional` training run's model failed with "class_labels should be provided when doing class
    # conditioning", after every image was loaded
    from diffusers import UNet2DModel

    UNet2DModel(**{**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1, "num_class_embeds": 11}).save_pretrained(
        tmp_path / "unet"
    )
    result = run(["--train_data_dir", str(digit_folder), *FAST, "--method", "gradient", "--model_path",
                  str(tmp_path / "unet")])  # fmt: skip
    assert result["method"] == "gradient" and len(result["stage_boundaries"]) == 2


def test_printed_sigma_stages_hold_their_upper_boundary(capsys):
    # sigma stages route as the authors' EDM code, (b_{s-1}, b_s] (a sigma on a boundary goes to the cleaner stage),
    # but the command printed every stage as [low, high), the timestep convention
    result = run(["--method", "snr", "--edm", "--num_stages", "3", "--num_levels", "20"])
    low, high = (f"{b:.6g}" for b in result["stage_boundaries"])
    lines = capsys.readouterr().out.splitlines()
    assert [f"  stage 0: (0, {low}]", f"  stage 1: ({low}, {high}]", f"  stage 2: ({high}, inf)"] == lines[1:4]
    run(["--method", "snr", "--num_stages", "2", "--num_levels", "20"])
    assert "  stage 0: [0, " in capsys.readouterr().out  # timesteps: [b_{s-1}, b_s)


def test_the_json_line_holds_the_keys_the_readme_lists(digit_folder, tmp_path, tiny_unet_kwargs):
    plan_keys = ["method", "stage_boundaries", "num_train_timesteps", "boundary_units", "fractions"]
    assert list(run(["--method", "snr", "--num_levels", "20"])) == plan_keys
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(dict(tiny_unet_kwargs, in_channels=1, out_channels=1)))
    common = ["--train_data_dir", str(digit_folder), *FAST, "--method", "snr", "--model_config", str(model_config)]
    widths = ["stage_difficulty", "decoder_block_out_channels"]
    assert list(run(common)) == [*plan_keys, *widths]
    budget = ["expected_flops", "budget", "stage_flops", "stage_calls"]
    assert set(run([*common, "--budget", "1e9"])) == {*plan_keys, *widths, *budget}


def test_vae_path_plans_on_the_scaled_latents_training_sees(digit_folder, tmp_path, capsys):
    # the command had no --vae_path: a latent run was planned on pixels, with boundaries for another data space
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.25)  # the model sees (E(x) - shift) * scaling
    vae.save_pretrained(tmp_path / "repo" / "vae")
    fast = [*FAST[:-2], "--num_channels", "3", "--seed", "3"]  # RGB images: what the VAE encodes
    result = run(["--train_data_dir", str(digit_folder), *fast, "--max_images", "60", "--vae_path",
                  str(tmp_path / "repo"), "--vae_subfolder", "vae"])  # fmt: skip
    assert "60 training latents of shape (4, 4, 4)" in capsys.readouterr().err
    images = load_images(str(digit_folder), resolution=8, num_channels=3, max_images=60)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    latents = vae_to_model_latents(vae, posterior.sample(torch.Generator().manual_seed(3)))
    expected = plan_stages(latents, DDPMScheduler(), 3, num_samples=16, num_levels=30, generator=torch.manual_seed(3))
    assert result == expected.to_dict()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--vae_subfolder", "vae"], "`--vae_subfolder` 'vae' is a folder inside `--vae_path`: give `--vae_path`"),
        (["--vae_path", "VAE", "--num_channels", "1"], "`--num_channels` 1 does not fit `--vae_path`"),
        # a side the VAE cannot halve: planned on latents of the images cut short (9 px -> 4), where training refuses it
        (
            ["--vae_path", "VAE", "--num_channels", "3", "--resolution", "9"],
            "`--resolution` 9 must be a multiple of the down-sampling factor 2 of `--vae_path` 'VAE'",
        ),
        (["--vae_path", "MODEL"], "holds a UNet2DModel, not an AutoencoderKL"),
        (["--vae_path", "VAE", "--method", "snr"], "--vae_path is read with the training images only"),
        (["--vae_path", "VAE", "--model_config", "PIXELS"], "takes 3-channel samples, but `--vae_path`"),
        # a pixel model's gradients on latents: was refused after every image was read and encoded, saying to give
        # the `--vae_path` that was given
        (["--vae_path", "VAE", "--method", "gradient", "--model_path", "MODEL"], "`--model_path` 'MODEL' takes 3-"),
        # a latent model's gradients on pixels: was refused after every image was read, by `gradient_plan`
        (
            ["--method", "gradient", "--model_path", "LATENT"],
            "`--model_path` 'LATENT' takes 4-channel samples, but "
            "`--num_channels` 3 gives 3-channel images: give the `--vae_path` it was trained with",
        ),
    ],
)
def test_bad_vae_options_are_usage_errors_before_any_image_is_read(tmp_path, capsys, options, message):
    tiny_vae().save_config(tmp_path / "vae")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "latent").mkdir()
    (tmp_path / "latent" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 4}))
    blocks = {"down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    pixels = {"block_out_channels": [8, 16], "norm_num_groups": 4, **blocks}  # in_channels 3: RGB pixels
    (tmp_path / "pixels.json").write_text(json.dumps(pixels))
    paths = {"VAE": tmp_path / "vae", "MODEL": tmp_path / "model", "PIXELS": tmp_path / "pixels.json"}
    paths["LATENT"] = tmp_path / "latent"
    options = [str(paths[o]) if o in paths else o for o in options]
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", str(tmp_path / "no-such-folder"), *FAST[:-2], *options])
    for name in ("MODEL", "LATENT", "VAE"):
        message = message.replace(f"'{name}'", repr(str(paths[name])))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_vae_whose_weights_do_not_fit_its_config_is_refused_before_any_image_is_read(tmp_path, capsys):
    # the VAE loads strictly (`_vae_latents`) only once every image is read: its weight headers are read against the
    # AutoencoderKL of its config when the options are checked, as the training scripts check them
    from diffusers import AutoencoderKL

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    AutoencoderKL.from_config({**vae.config, "block_out_channels": [8, 16]}).save_pretrained(tmp_path / "wide")
    (tmp_path / "wide" / "diffusion_pytorch_model.safetensors").replace(
        tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", str(tmp_path / "no-such-folder"), *FAST[:-2], "--vae_path", str(tmp_path / "vae")])
    message = f"`--vae_path` {str(tmp_path / 'vae')!r}: its weights do not fit its config.json: decoder.conv_in.bias"
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--num_channels", "3"], "takes 1-channel samples, but `--num_channels` 3 gives 3-channel images: give "
                                  "`--num_channels 1`"),
        (["--resolution", "16"], "is for samples of size 8, but `--resolution` 16 gives samples of size 16: give "
                                 "`--resolution 8`"),
        (["--resolution", "4", "--vae_path", "VAE", "--num_channels", "3"], "is for samples of size 8, but "
         "`--resolution` 4 gives samples of size 2: give `--resolution 16`"),
    ],
)  # fmt: skip
def test_a_model_config_for_other_samples_than_those_planned_on_is_refused(
    tmp_path, capsys, tiny_unet_kwargs, options, message
):
    # the widths of a 1-channel 8-pixel config were planned on 3-channel or 16-pixel images (a budget's FLOPs counted
    # at 8 pixels), and the config then trained at --resolution 16 (or in RGB) was not the model planned
    tiny_vae().save_config(tmp_path / "vae")  # 4 latent channels, down-sampling by 4 (two levels: by 2)
    config = dict(tiny_unet_kwargs, in_channels=1, out_channels=1)
    if "VAE" in options:
        config["in_channels"] = config["out_channels"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    options = [str(tmp_path / "vae") if o == "VAE" else o for o in options]
    for budget in ([], ["--budget", "1e9"]):
        with pytest.raises(SystemExit) as exit_info:  # before any image is read
            run(["--train_data_dir", str(tmp_path / "missing"), *FAST, "--model_config", str(tmp_path / "config.json"),
                 *options, *budget])  # fmt: skip
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"`--model_config` {str(tmp_path / 'config.json')!r}" in err
        assert message in err


def test_a_step_count_the_sampling_scheduler_cannot_run_is_refused_before_any_image_is_read(
    tmp_path, capsys, tiny_unet_kwargs
):
    # PNDM's Runge-Kutta warm-up needs 4 steps: the budget's step count was refused only after every image was loaded
    # and the stages planned
    from diffusers import PNDMScheduler

    PNDMScheduler().save_config(tmp_path / "pndm")
    (tmp_path / "config.json").write_text(json.dumps(dict(tiny_unet_kwargs, in_channels=1, out_channels=1)))
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", str(tmp_path / "missing"), *FAST, "--model_config", str(tmp_path / "config.json"),
             "--budget", "1e9", "--num_inference_steps", "2", "--scheduler_config", str(tmp_path / "pndm")])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs `num_inference_steps` of at least 4, got 2" in err


def test_a_model_config_that_leaves_out_block_out_channels_plans_the_default_widths(digit_folder, tmp_path):
    # a config relying on diffusers' default `block_out_channels` (224, 448, 672, 896) failed after planning with
    # "KeyError: 'block_out_channels'" (heuristic widths and budget alike)
    model_config, output_config = tmp_path / "config.json", tmp_path / "planned.json"
    model_config.write_text(json.dumps({"sample_size": 8, "in_channels": 1, "out_channels": 1}))
    common = ["--train_data_dir", str(digit_folder), *FAST, "--method", "snr", "--model_config", str(model_config)]
    result = run([*common, "--output_config", str(output_config)])
    assert len(result["decoder_block_out_channels"][0]) == 4  # one width per level of the default encoder
    MultiStageUNet2DModel.from_config(json.loads(output_config.read_text()))  # builds
    config = json.loads(model_config.read_text())
    plan = widths_for_budget(config, TimestepPartition([300, 600]), [0.9, 0.4, 0.1], 1e12, 2, DDPMScheduler(),
                             scales=(0.125, 0.25))  # fmt: skip
    assert plan.widths[0] == (64, 128, 160, 224)  # the default encoder (224, 448, 672, 896) x 0.25, groups of 32


@pytest.mark.parametrize(
    "config, extra, match",
    [
        ({"in_channels": 1}, [], "--architecture experts sizes the experts for a --budget"),
        ({"in_channels": 1}, ["--budget", "1e9", "--output_config", "x.json"], "experts keep --model_config's"),
        ({"_class_name": "MultiStageUNet2DModel", "in_channels": 1}, ["--budget", "1e9"],
         "each expert is a UNet2DModel of that config"),
        # a training budget of fewer images than experts: the printed `--train_batch_size` would be refused, as
        # train_experts.py trains every expert at every step
        ({"in_channels": 1, "sample_size": 8}, ["--budget", "1e9"],
         "`--batch_size` 1 is fewer than the 3 experts (`--num_stages`)"),
        ({"in_channels": 1, "sample_size": 8}, ["--budget", "1e9", "--batch_size", "2"],
         "`--batch_size` 2 is fewer than the 3 experts (`--num_stages`)"),
    ],
)  # fmt: skip
def test_an_experts_plan_it_cannot_make_is_refused_before_any_image_is_read(tmp_path, capsys, config, extra, match):
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(config))
    missing = str(tmp_path / "no-such-folder")  # never read: the options are checked first
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", missing, *FAST, "--model_config", str(model_config), "--architecture", "experts",
             *extra])  # fmt: skip
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_a_training_budget_says_the_batch_it_paid_for(digit_folder, tmp_path, capsys, tiny_unet_kwargs):
    # the widths fit the training FLOPs of one step of `--batch_size` images: training at another batch costs
    # another amount per step, and the command did not say which batch to train with
    config = dict(tiny_unet_kwargs, in_channels=1, out_channels=1)
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(config))
    result = run(["--train_data_dir", str(digit_folder), *FAST, "--model_config", str(model_config), "--budget",
                  "1e12", "--batch_size", "4"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "per training step of 4 images (train with `--train_batch_size 4`)" in printed
    assert result["expected_flops"] <= 1e12


@pytest.mark.parametrize(
    "schedule, option, note",
    [
        ([], None, None),  # DDPM's linear schedule: the script's default
        (["--scheduler_config", "{dir}/scaled.json"], "--ddpm_beta_schedule scaled_linear", None),
        (["--scheduler_config", "{dir}/range.json"], None, "is not the one planned on"),  # a beta range it cannot take
        (["--edm"], None, None),
        (["--edm", "--sigma_max", "40"], None, "the plan's EDM schedule has sigma_max=40.0"),
    ],
)
def test_an_experts_plan_gives_the_noise_schedule_it_was_planned_on(
    digit_folder, tmp_path, capsys, tiny_unet_kwargs, schedule, option, note
):
    # the printed arguments trained the script's default schedule (DDPM linear) whatever the plan's was
    (tmp_path / "scaled.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear"})
    )
    (tmp_path / "range.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "beta_end": 0.03}))
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(dict(tiny_unet_kwargs, in_channels=1, out_channels=1)))
    run(["--train_data_dir", str(digit_folder), *FAST, "--model_config", str(model_config), "--budget", "1e12",
         "--num_inference_steps", "4", "--architecture", "experts", *(a.format(dir=tmp_path) for a in schedule)])  # fmt: skip
    printed = capsys.readouterr().out
    (command,) = [line for line in printed.splitlines() if "train_experts.py " in line]
    assert ("--ddpm_beta_schedule" in command) == (option is not None) and (option or "") in command
    notes = [line for line in printed.splitlines() if line.strip().startswith("note:")]
    assert notes == [] if note is None else (len(notes) == 1 and note in notes[0])


@pytest.mark.parametrize(
    "budget", [[], ["--budget", "1e12", "--num_inference_steps", "4"]], ids=["heuristic", "budget"]
)
def test_a_multistage_plan_says_the_beta_schedule_to_train_with(
    digit_folder, tmp_path, capsys, tiny_unet_kwargs, budget
):
    scaled = tmp_path / "scaled.json"
    scaled.write_text(json.dumps({"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear"}))
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(dict(tiny_unet_kwargs, in_channels=1, out_channels=1)))
    run(["--train_data_dir", str(digit_folder), *FAST, "--model_config", str(model_config), *budget,
         "--scheduler_config", str(scaled)])  # fmt: skip
    assert "train the planned model with `--ddpm_beta_schedule scaled_linear`" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["", " "])
def test_an_empty_dataset_name_is_a_usage_error(name, capsys):
    # was an IndexError traceback out of `datasets.load_dataset`, after the other checks
    with pytest.raises(SystemExit) as exit_info:
        run(["--dataset", name, *FAST])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "`--dataset` must name a dataset" in err and repr(name) in err, err
    with pytest.raises(ValueError, match="`dataset` must name a dataset"):  # the library function too
        load_images(dataset=name, resolution=4, num_channels=1)


@pytest.mark.parametrize("option", ["--model_path", "--vae_path"])
def test_an_empty_folder_option_is_a_usage_error(
    option, digit_folder, tmp_path, monkeypatch, capsys, tiny_unet_kwargs
):
    # `--model_path ''` run from a model folder passed its check (it read ./config.json) and then planned without
    # the model, as if not given; `--vae_path ''` was looked up on the Hub
    UNet2DModel(**dict(tiny_unet_kwargs, in_channels=1, out_channels=1)).save_pretrained(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(["--train_data_dir", str(digit_folder), *FAST, "--method", "gradient", option, ""])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"`{option}` must name a folder, got ''" in err, err
