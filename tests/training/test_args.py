"""Argument checks shared by the training scripts."""

import pytest

from diffusers_stages.partition import TimestepPartition
from diffusers_stages.training.args import build_parser, partition_from_args


@pytest.mark.parametrize("text", ["", ",", " , "])
def test_stage_boundaries_without_a_boundary_are_refused(text):
    args = build_parser("").parse_args(["--stage_boundaries", text])
    assert args.stage_boundaries == ()
    with pytest.raises(ValueError, match="`--stage_boundaries` \\[\\] gives no boundary.*train_unconditional.py"):
        partition_from_args(args, TimestepPartition([442, 631]))


def test_stage_boundaries_given_or_defaulted():
    default = TimestepPartition([442, 631])
    assert partition_from_args(build_parser("").parse_args([]), default) is default
    given = partition_from_args(build_parser("").parse_args(["--stage_boundaries", "300"]), default)
    assert given == TimestepPartition([300])


@pytest.mark.parametrize("script_name", ["multistage", "experts"])
def test_train_scripts_refuse_an_empty_stage_split_before_training(script_name, tmp_path, capsys):
    from tests.examples.conftest import TINY, load_script

    script, out = load_script(script_name), tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(
            [*TINY, "--train_data_dir", str(tmp_path), "--output_dir", str(out), "--stage_boundaries", ""]
        )
    assert exit_info.value.code == 2 and "`--stage_boundaries` [] gives no boundary" in capsys.readouterr().err
    assert not out.exists()
