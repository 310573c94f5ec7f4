"""Every conversion script runs as `python -m diffusers_stages.conversion.<name>` and as `python conversion/<name>.py`,
explains each argument in `--help`, and turns a bad input into a one-line error with exit status 1."""

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [
    "unet_to_multistage",
    "multistage_to_unet",
    "original_multistage",
    "original_multistage_edm",
    "original_multistage_ncsnpp",
    "pipelines_to_experts",
]


def run(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_explains_every_argument(name, capsys):
    module = importlib.import_module(f"diffusers_stages.conversion.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for argument in ("--output_path", "--overwrite", "--verify", "--tolerance"):
        assert argument in text
    assert f"python -m diffusers_stages.conversion.{name}" in text  # the usage example


def test_runs_as_a_module():
    result = run("-m", "diffusers_stages.conversion.pipelines_to_experts", "--help")
    assert result.returncode == 0 and "--switch_step_fraction" in result.stdout, result.stderr


def test_script_path_and_error_message(tmp_path):
    result = run(
        "conversion/multistage_to_unet.py",
        "--source",
        str(tmp_path / "none"),
        "--stage",
        "0",
        "--output_path",
        str(tmp_path / "out"),
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: `--source` must be a folder")
    assert not (tmp_path / "out").exists()
