"""`--overwrite_output_dir` starts a run over, but deletes the former run's checkpoints only once the new run has a
complete checkpoint of its own (or its final outputs): killed before that, the former run is still resumable."""

import os

import pytest

from diffusers_stages.training.checkpointing import COMPLETE_MARKER, FINISHED_MARKER


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("multistage")


def _checkpoints(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if "checkpoint" in name)


def test_the_former_checkpoints_stay_until_the_new_run_has_one(examples, script, image_folder, tmp_path):
    out = str(tmp_path / "run")
    args = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--checkpointing_steps", "2"]
    examples.train(script, [*args, "--max_train_steps", "4"])  # the former run: checkpoints 2 and 4 (finished)
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]

    # killed while its first checkpoint was being written: the former ones were all deleted at its start
    again = [*args, "--max_train_steps", "6", "--overwrite_output_dir"]
    result = examples.run_subprocess([examples.RUNNER, "--kill-before-rename", examples.SCRIPTS["multistage"], *again])
    assert result.returncode == -9, result.stderr[-2000:]
    assert _checkpoints(out) == [".checkpoint-2.partial", "checkpoint-2", "checkpoint-4"]
    assert os.path.isfile(os.path.join(out, "checkpoint-4", COMPLETE_MARKER))

    # once the new run's checkpoint-2 is complete, the former checkpoint-4 (which `latest` would take) is gone
    result = examples.run_subprocess(
        [examples.RUNNER, "--kill-after-checkpoint", examples.SCRIPTS["multistage"], *again]
    )
    assert result.returncode == -9, result.stderr[-2000:]
    assert _checkpoints(out) == ["checkpoint-2"]
    examples.train(script, [*again[:-1], "--resume_from_checkpoint", "latest"])
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert os.path.isfile(os.path.join(out, "checkpoint-6", FINISHED_MARKER))


def test_a_new_run_without_checkpoints_removes_the_former_ones_when_it_finishes(
    examples, script, image_folder, tmp_path
):
    out = str(tmp_path / "run")
    args = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--max_train_steps", "2"]
    examples.train(script, [*args, "--checkpointing_steps", "1"])
    examples.train(script, [*args, "--checkpointing_steps", "100", "--overwrite_output_dir"])
    assert _checkpoints(out) == []  # the former run's, which `latest` would resume over the new outputs
