"""`diffusers-stages`: one command with subcommands; the older entry points still work."""

import json
import os
import subprocess
import sys

import pytest

from diffusers_stages import cli
from diffusers_stages.plan import main as plan_main

BIN = os.path.dirname(sys.executable)


def test_help_lists_every_subcommand_and_conversion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("demo", "plan", "switch", "convert", *cli.CONVERSIONS):
        assert name in text
    assert "optimal-denoiser" in text and "dual-backbone switch" in text  # what each is for


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


def test_subcommand_help_is_the_module_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["switch", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: diffusers-stages switch") and "--tolerance" in text
    assert sys.argv[0] != "diffusers-stages switch"  # the program name is restored


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
