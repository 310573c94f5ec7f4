"""`diffusers-stages`: one command with subcommands; the older entry points still work."""

import json
import os
import re
import subprocess
import sys

import pytest

from diffusers_stages import cli
from diffusers_stages.plan import main as plan_main
from tests.conftest import corrupt_weights

BIN = os.path.dirname(sys.executable)


def test_help_lists_every_subcommand_and_conversion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("demo", "plan", "switch", "convert", *cli.CONVERSIONS):
        assert name in text
    assert "optimal-denoiser" in text and "dual-backbone switch" in text  # what each is for
    assert "equal FLOPs" not in text and "B/4" in text  # the demo's methods train on shares of one budget B
    # the text-to-image conversions the README documents (a Stable Diffusion folder in, one staged stage out)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert "Stable Diffusion" in lines["unet_to_multistage"] and "UNet2DConditionModel" in lines["multistage_to_unet"]


def test_version_names_the_package_and_what_it_runs_on(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"diffusers-stages {version('diffusers-stages')} ")
    assert f"diffusers {version('diffusers')}" in out and f"torch {version('torch')}" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_plan_subcommand_runs_the_plan_command(capsys):
    argv = ["--method", "snr_clustering", "--num_levels", "50"]
    assert plan_main(argv) == 0
    direct = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["plan", *argv]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == direct
    assert json.loads(direct)["method"] == "snr_clustering"


@pytest.mark.parametrize(("command", "option"), [("switch", "--tolerance"), ("plan", "--num_stages")])
def test_subcommand_help_is_the_module_help(capsys, command, option):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: diffusers-stages {command}") and option in text
    assert sys.argv[0] != f"diffusers-stages {command}"  # the program name is restored


def test_convert_names_its_scripts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert"])
    assert exit_info.value.code == 2
    assert "unet_to_multistage" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "unet_to_experts"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "unet_to_multistage", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: diffusers-stages convert unet_to_multistage")


def test_convert_reports_errors_like_the_script(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "multistage_to_unet", "--source", str(tmp_path / "missing"), "--output_path",
                  str(tmp_path / "out"), "--stage", "0"])  # fmt: skip
    assert "error:" in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command",
    [
        [os.path.join(BIN, "diffusers-stages"), "--help"],
        [os.path.join(BIN, "diffusers-stages-plan"), "--help"],
        [os.path.join(BIN, "diffusers-stages-switch"), "--help"],
    ],
    ids=["diffusers-stages", "diffusers-stages-plan", "diffusers-stages-switch"],
)
def test_console_scripts_and_aliases(command):
    if not os.path.isfile(command[0]):
        pytest.skip(f"{command[0]} is not installed (run `pip install -e .`)")
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line naming the option and the value, exit status 2 (usage) or 1, never a traceback
def _error(argv: list[str], capsys) -> tuple[int, str]:
    """Run ``diffusers-stages argv`` expecting a refusal: its exit status and its one-line message."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    code = exit_info.value.code
    if isinstance(code, str):  # `sys.exit(message)`: the message goes to stderr, the status is 1
        return 1, code
    return code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def probe_files(tmp_path_factory):
    """Folders and files that the commands must refuse: an empty folder, one with no image, a text file, a
    non-object JSON file and a saved tiny dual-backbone pipeline."""
    root = tmp_path_factory.mktemp("probe")
    (root / "empty").mkdir()
    (root / "text_only").mkdir()
    (root / "text_only" / "notes.txt").write_text("no image here\n")
    (root / "file.txt").write_text("a file, not a folder\n")
    (root / "list.json").write_text("[1, 2]\n")
    (root / "unet.json").write_text('{"_class_name": "UNet2DModel"}\n')
    return root


PLAN_ERRORS = [
    (["--train_data_dir", "{root}/missing"], 2, "`--train_data_dir` '{root}/missing' is not a folder"),
    (["--train_data_dir", "{root}/empty"], 1, "No images found in `--train_data_dir` '{root}/empty'"),
    (["--train_data_dir", "{root}/text_only"], 1, "No images found in `--train_data_dir` '{root}/text_only'"),
    (["--train_data_dir", "{root}/empty", "--max_images", "-1"], 2, "`--max_images` must be a positive integer"),
    (["--train_data_dir", "{root}/empty", "--max_images", "0"], 2, "`--max_images` must be a positive integer"),
    (["--train_data_dir", "{root}/empty", "--resolution", "0"], 2, "`--resolution` must be a positive integer, got 0"),
    (["--method", "snr", "--num_stages", "1"], 2, "`--num_stages` must be an integer >= 2, got 1"),
    (["--method", "snr", "--num_levels", "0"], 2, "`--num_levels` must be an integer >= 3, got 0"),
    (["--method", "snr", "--edm", "--rho", "0"], 2, "`--rho` must be a positive finite number, got 0.0"),
    (["--method", "snr", "--edm", "--rho", "nan"], 2, "`--rho` must be a positive finite number, got nan"),
    (["--method", "snr", "--edm", "--sigma_max", "inf"], 2, "`--sigma_max` inf"),
    (["--method", "snr", "--device", "bogus"], 2, "`--device` must be a torch device such as 'cpu' or 'cuda', got "),
    (["--method", "snr", "--scheduler_config", "{root}/missing.json"], 2, "`--scheduler_config` '{root}/missing"),
    (["--method", "snr", "--scheduler_config", "{root}/empty"], 2, "`--scheduler_config` '{root}/empty/scheduler_co"),
    (
        ["--method", "snr", "--scheduler_config", "{root}/unet.json"],
        2,
        "`--scheduler_config` '{root}/unet.json' names ",
    ),
    (["--method", "snr", "--model_config", "{root}/missing.json"], 2, "`--model_config` '{root}/missing.json' is not"),
    (["--method", "snr", "--model_config", "{root}/file.txt"], 2, "`--model_config` '{root}/file.txt' cannot be rea"),
    (
        ["--method", "snr", "--model_config", "{root}/list.json"],
        2,
        "`--model_config` '{root}/list.json' holds JSON bu",
    ),
    (["--method", "gradient", "--model_path", "{root}/empty"], 2, "`--model_path` '{root}/empty/config.json' is not"),
    (
        ["--method", "snr", "--model_config", "{root}/unet.json", "--output_config", "{root}/unet.json"],
        2,
        "`--output_config` '{root}/unet.json' is the `--model_config` file",
    ),
    (["--method", "snr", "--output_plot", "{root}/empty"], 2, "`--output_plot` '{root}/empty' is a folder"),
    (["--method", "snr", "--output_plot", "{root}/file.txt/plan.png"], 2, "`--output_plot` '{root}/file.txt/plan.pn"),
    # a path ending in a separator names a folder, even one not there yet (the plan was computed, then writing failed)
    (["--method", "snr", "--output_plot", "{root}/new/"], 2, "`--output_plot` '{root}/new/' is a folder"),
    # was torch's "Overflow when unpacking long long", once the images were read
    (["--method", "snr", "--seed", str(2**64)], 2, f"`--seed` must be in [0, 2**32), got {2**64}"),
]


@pytest.mark.parametrize("argv, status, message", PLAN_ERRORS)
def test_plan_refuses_bad_input_in_one_line(probe_files, capsys, argv, status, message):
    argv = [a.format(root=probe_files) for a in argv]
    got_status, line = _error(["plan", *argv], capsys)
    assert got_status == status and message.format(root=probe_files) in line
    assert "Traceback" not in line


SWITCH_ERRORS = [
    ([], "Give `--pipeline DIR`, or all of `--shallow DIR --deep DIR --scheduler DIR`"),
    (["--pipeline", "{root}/missing"], "`--pipeline` '{root}/missing' is not a saved pipeline folder"),
    (["--pipeline", "{root}/empty", "--tolerance", "inf"], "`--tolerance` must be a non-negative number, got inf"),
    (["--pipeline", "{root}/empty", "--num_images", "-5"], "`--num_images` must be an integer >= 1, got -5"),
    (["--pipeline", "{root}/empty", "--plot", "{root}/empty"], "`--plot` '{root}/empty' is a folder"),
    (["--shallow", "{root}/empty", "--deep", "{root}/empty", "--scheduler", "{root}/empty"], "`--shallow` '{root}/e"),
]


@pytest.mark.parametrize("argv, message", SWITCH_ERRORS)
def test_switch_refuses_bad_input_in_one_line(probe_files, capsys, argv, message):
    argv = [a.format(root=probe_files) for a in argv]
    status, line = _error(["switch", *argv], capsys)
    assert status == 1 and message.format(root=probe_files) in line


def test_switch_takes_the_two_models_and_the_scheduler_as_folders(tiny_unet_kwargs, tmp_path, capsys):
    from diffusers import DDPMScheduler, UNet2DModel

    shape = {**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1}
    UNet2DModel(**shape).save_pretrained(tmp_path / "shallow")
    UNet2DModel(**shape).save_pretrained(tmp_path / "deep")
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    folders = [f"--{name}={tmp_path / name}" for name in ("shallow", "deep", "scheduler")]
    plot = tmp_path / "plots" / "switch"  # no extension, in a folder still to create: written there, as a PNG
    argv = ["switch", *folders, "--num_images", "4", "--num_levels", "3", "--plot", str(plot)]
    assert cli.main(argv) == 0
    assert f"plot: {plot}\n" in capsys.readouterr().out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="`--scheduler` '.*deep/scheduler_config.json' is not a file"):
        cli.main(["switch", *folders[:2], f"--scheduler={tmp_path / 'deep'}", "--plot", str(plot)])
    (tmp_path / "deep" / "scheduler_config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(SystemExit, match="`--scheduler` .*: `_class_name` 'UNet2DModel' of .* is not a diffusers sch"):
        cli.main(["switch", *folders[:2], f"--scheduler={tmp_path / 'deep'}", "--plot", str(plot)])


@pytest.mark.parametrize("corruption", ["missing", "integers", "link"])
def test_a_saved_model_folder_loads_strictly(tiny_unet_kwargs, tmp_path, corruption):
    # diffusers' own classes, as the package's: no weight left on `meta`, none cast from integers, none from elsewhere
    from diffusers import UNet2DModel

    folder = tmp_path / "unet"
    UNet2DModel(**tiny_unet_kwargs).save_pretrained(folder)
    key = corrupt_weights(folder / "diffusion_pytorch_model.safetensors", corruption)
    with pytest.raises(ValueError, match="outside" if corruption == "link" else key):
        cli.load_saved_folder(str(folder), "--shallow")


@pytest.mark.parametrize("name, scheduler", [("ModelMixin", False), ("SchedulerMixin", True)])
def test_a_saved_folder_naming_a_base_class_is_named_not_a_crash(tmp_path, name, scheduler):
    config = tmp_path / ("scheduler_config.json" if scheduler else "config.json")
    config.write_text(json.dumps({"_class_name": name}))
    with pytest.raises(ValueError, match=f"`--shallow` .*_class_name.*{name}"):
        cli.load_saved_folder(str(tmp_path), "--shallow", scheduler=scheduler)


def test_a_scheduler_folder_whose_config_does_not_build_is_named(tmp_path):
    from diffusers import DDPMScheduler

    DDPMScheduler().save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_train_timesteps": -5}))
    with pytest.raises(ValueError, match="`--scheduler` .*scheduler_config.json.*DDPMScheduler"):
        cli.load_saved_folder(str(tmp_path), "--scheduler", scheduler=True)


def test_the_readme_command_line_section_names_every_conversion():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split("### Command line", 1)[1].split("\n## ", 1)[0]
    for name in cli.CONVERSIONS:
        assert name in section, name


@pytest.mark.parametrize("command", ["plan", "switch"])
def test_every_option_of_the_commands_has_a_help_text(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    lines = capsys.readouterr().out.split("options:")[1].splitlines()
    for line, following in zip(lines, [*lines[1:], ""]):
        bare = line.startswith("  -") and "  " not in line.strip()  # the option alone, its help (if any) below
        if bare:
            assert following.startswith(" " * 10), line  # help lines are indented past the options


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["plan", "--help"], ["--alpha ALPHA Mean-similarity threshold in (0, 1]. (default: 0.9)", "(default: 128)"]),
        (["switch", "--help"], ["(default: switch.png)", "(default: digits)", "(default: 0.05)"]),
        (["convert", "unet_to_multistage", "--help"], ["(default: 0.0001)"]),
    ],
)
def test_command_help_shows_the_defaults(capsys, argv, shown):
    """`--help` gives each option's default (the switch command writes `switch.png` unless told otherwise), never
    `(default: None)`, and a description's example commands as written."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(default in text for default in shown) and "(default: None)" not in text


def test_a_pipeline_folder_given_for_a_model_names_its_model_folders(tmp_path, capsys):
    """A training run writes a pipeline folder; `--model_path` (plan) and `--shallow`/`--deep` (switch) read one model
    of it: given the pipeline's folder, the error names the folders to give instead, not a missing config.json."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from tests.conftest import TINY_UNET

    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["--method", "gradient", "--model_path", str(tmp_path / "pipe")])
    assert exit_info.value.code == 2
    assert f"is a pipeline folder: give the folder of one of its models ({tmp_path / 'pipe' / 'unet'})" in " ".join(
        capsys.readouterr().err.split()
    )
    with pytest.raises(ValueError, match="is a pipeline folder: give the folder of one of its models"):
        cli.load_saved_folder(str(tmp_path / "pipe"), "--shallow")


def test_help_shows_the_default_of_an_option_without_a_help_text():
    """argparse shows a default only beside a help text: `--learning_rate` and `--checkpointing_steps` (a checkpoint
    every 500 steps unless told) showed none."""
    import argparse

    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--path", default=None)
    text = " ".join(parser.format_help().split())
    assert "--learning_rate LEARNING_RATE Default: 0.0001." in text and "--seed SEED Default: 0." in text
    assert "--flag --path PATH" in text  # nothing to show: no default, or a flag that is off


def test_a_model_or_pipeline_folder_given_for_a_config_file_names_the_file_to_give(tmp_path, capsys):
    """`plan --model_config my-multistage/unet` (the training scripts' `--model_config` takes such a folder) said only
    "is not a file"; the error now names the config.json to give."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from tests.conftest import TINY_UNET

    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    unet, pipe = tmp_path / "pipe" / "unet", tmp_path / "pipe"
    status, line = _error(["plan", "--method", "snr", "--model_config", str(unet)], capsys)
    assert status == 2 and f"is a folder: give its config.json ({unet / 'config.json'})" in line
    status, line = _error(["plan", "--method", "snr", "--model_config", str(pipe)], capsys)
    assert (
        status == 2
        and f"is a pipeline folder: give the config.json of one of its models ({unet / 'config.json'})" in line
    )


def test_a_train_command_points_to_the_training_scripts(capsys):
    """`diffusers-stages train` (a natural guess, next to `demo`, `plan`, `switch` and `convert`) listed the commands
    only, not that training runs through `accelerate launch examples/<method>/train_*.py`."""
    status, line = _error(["train"], capsys)
    assert status == 2 and "invalid choice: 'train'" in line
    assert "accelerate launch examples/multistage/train_multistage.py" in line


def test_a_run_folder_given_for_a_model_or_scheduler_names_the_sub_folder(tmp_path):
    """`switch --scheduler RUN` or `--shallow RUN` with a one-backbone run's folder (`shallow/`, `scheduler/`) said only
    that RUN/scheduler_config.json (RUN/config.json) is not a file; the error now names the sub-folder to give."""
    from diffusers import DDPMScheduler, UNet2DModel

    from tests.conftest import TINY_UNET

    run = tmp_path / "run"
    UNet2DModel(**TINY_UNET).save_pretrained(run / "shallow")
    DDPMScheduler().save_pretrained(run / "scheduler")
    with pytest.raises(ValueError, match=f"its sub-folder {re.escape(str(run / 'scheduler'))} holds one: give it"):
        cli.load_saved_folder(str(run), "--scheduler", scheduler=True)
    with pytest.raises(ValueError, match=f"its sub-folder {re.escape(str(run / 'shallow'))} holds one: give it"):
        cli.load_saved_folder(str(run), "--shallow")
