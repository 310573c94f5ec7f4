"""Training never loses its last good checkpoint: real runs of `train_multistage.py` killed (SIGKILL) at the
dangerous points of saving, then resumed with `--resume_from_checkpoint latest`; a finished run resumes to nothing."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_stages.training.checkpointing import COMPLETE_MARKER, FINISHED_MARKER, finished_step

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("multistage")


@pytest.fixture(scope="module")
def run_args(examples, image_folder):
    """4 steps with EMA, a checkpoint every 2, at most 1 kept: step 4 replaces checkpoint-2 by checkpoint-4."""
    return [*examples.TINY, "--train_data_dir", image_folder, "--use_ema", "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--save_images_steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def straight(examples, script, run_args, tmp_path_factory):
    """The uninterrupted run (read only: tests that resume it work on a copy)."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    examples.train(script, [*run_args, "--output_dir", out])
    return out


def _same_weights(a: str, b: str, sub: str) -> bool:
    x, y = load_file(os.path.join(a, sub, WEIGHTS)), load_file(os.path.join(b, sub, WEIGHTS))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _snapshot(folder: str) -> dict:
    """Every file under ``folder`` with its size and modification time."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            files[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_size, stat.st_mtime_ns)
    return files


def _resume(examples, script, args, out, capsys) -> str:
    capsys.readouterr()
    examples.train(script, [*args, "--output_dir", out, "--resume_from_checkpoint", "latest"])
    return capsys.readouterr().out


def test_kill_before_rename_keeps_the_last_checkpoint(examples, script, run_args, straight, tmp_path, capsys):
    out = str(tmp_path / "killed")
    command = [examples.RUNNER, "--kill-before-rename=2", examples.SCRIPTS["multistage"], *run_args,
               "--output_dir", out]  # fmt: skip
    result = examples.run_subprocess(command)
    assert result.returncode == -9, result.stderr[-2000:]
    # checkpoint-4 was fully written, but not yet renamed: checkpoint-2 (total limit 1) is still there, complete
    assert sorted(os.listdir(out)) == [".checkpoint-4.partial", "checkpoint-2", "samples"]
    assert os.path.isfile(os.path.join(out, "checkpoint-2", COMPLETE_MARKER))
    assert "Resuming from " + os.path.join(out, "checkpoint-2") in _resume(examples, script, run_args, out, capsys)
    assert sorted(f for f in os.listdir(out) if "checkpoint" in f) == ["checkpoint-4"]  # leftover gone, 2 pruned
    for sub in ("unet", "checkpoint-4/unet", "checkpoint-4/unet_ema"):
        assert _same_weights(straight, out, sub), sub


def test_a_run_killed_after_its_last_checkpoint_writes_its_outputs_without_training(
    examples, script, run_args, straight, tmp_path, capsys
):
    # the state a kill right after the last checkpoint leaves (`--kill-after-checkpoint=2`): that checkpoint, no
    # outputs yet; copied from the uninterrupted run, as a second killed subprocess would double this file's time
    out = str(tmp_path / "killed")
    os.makedirs(os.path.join(out, "samples"))
    shutil.copytree(os.path.join(straight, "checkpoint-4"), os.path.join(out, "checkpoint-4"))
    os.remove(os.path.join(out, "checkpoint-4", FINISHED_MARKER))
    shutil.copy(os.path.join(straight, "samples", "step_000002.png"), os.path.join(out, "samples"))
    printed = _resume(examples, script, run_args, out, capsys)
    assert (
        "Training is complete at " + os.path.join(out, "checkpoint-4") + ": writing its final outputs only" in printed
    )
    assert _same_weights(straight, out, "unet")
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_000002.png", "step_000004.png"]  # no step 5
    with (
        open(os.path.join(straight, "sample_grid.png"), "rb") as a,
        open(os.path.join(out, "sample_grid.png"), "rb") as b,
    ):
        assert a.read() == b.read()
    assert "Training is already complete" in _resume(examples, script, run_args, out, capsys)


def test_resuming_a_finished_run_does_nothing(examples, script, run_args, straight, tmp_path, capsys):
    out = str(tmp_path / "finished")
    shutil.copytree(straight, out)
    os.makedirs(os.path.join(out, "checkpoint-6"))  # as a kill while writing it left it before checkpoints were atomic
    before = _snapshot(out)
    printed = _resume(examples, script, run_args, out, capsys)
    assert "Resuming from " + os.path.join(out, "checkpoint-4") + " (checkpoint-6: incomplete)" in printed
    assert "Training is already complete: " + os.path.join(out, "checkpoint-4") + " is step 4" in printed
    assert _snapshot(out) == before  # no step trained, no sample grid, nothing rewritten


def test_a_finished_run_whose_last_step_has_no_checkpoint_resumes_to_nothing(
    examples, script, run_args, tmp_path, capsys
):
    # 3 steps, a checkpoint every 2: only a checkpoint of the last step was marked finished, so resuming the finished
    # run trained step 3 again from checkpoint-2 and wrote (and pushed) its outputs again
    out, three = str(tmp_path / "run"), [*run_args, "--max_train_steps", "3"]  # the last value given counts
    examples.train(script, [*three, "--output_dir", out])
    before = _snapshot(out)
    printed = _resume(examples, script, three, out, capsys)
    assert "Training is already complete: " + os.path.join(out, "checkpoint-2") + " is step 2" in printed
    assert _snapshot(out) == before  # no step trained, no sample grid, nothing rewritten
    printed = _resume(examples, script, [*three, "--max_train_steps", "4"], out, capsys)  # a longer run trains on
    assert "Resuming from " + os.path.join(out, "checkpoint-2") in printed and "already complete" not in printed
    assert sorted(name for name in os.listdir(out) if "checkpoint" in name) == ["checkpoint-4"]


def test_a_checkpoint_without_a_network_folder_is_a_clear_error(examples, script, run_args, straight, tmp_path):
    out = str(tmp_path / "damaged")
    shutil.copytree(os.path.join(straight, "checkpoint-4"), os.path.join(out, "checkpoint-4"))
    os.remove(os.path.join(out, "checkpoint-4", FINISHED_MARKER))
    shutil.rmtree(os.path.join(out, "checkpoint-4", "unet_ema"))  # not the Hub's "is not a valid model identifier"
    with pytest.raises(ValueError, match=r"Checkpoint '.*checkpoint-4' has no 'unet_ema' folder"):
        examples.train(script, [*run_args, "--output_dir", out, "--resume_from_checkpoint", "latest"])


def test_a_checkpoint_of_a_sharded_run_resumed_unsharded_is_a_clear_error(
    examples, script, run_args, straight, tmp_path
):
    # was a FileNotFoundError on optimizer.bin: an FSDP run writes its optimizer and model as Accelerate's shards
    out = str(tmp_path / "sharded")
    checkpoint = os.path.join(out, "checkpoint-4")
    shutil.copytree(os.path.join(straight, "checkpoint-4"), checkpoint)
    os.remove(os.path.join(checkpoint, FINISHED_MARKER))
    os.remove(os.path.join(checkpoint, "optimizer.bin"))
    for shards in ("pytorch_model_fsdp_0", "optimizer_0"):  # what an FSDP run writes (SHARDED_STATE_DICT)
        os.makedirs(os.path.join(checkpoint, shards))
    with pytest.raises(ValueError, match=r"'.*checkpoint-4' was written by a sharded \(FSDP\) run: .*fsdp\.yaml"):
        examples.train(script, [*run_args, "--output_dir", out, "--resume_from_checkpoint", "latest"])


def test_a_final_save_that_fails_midway_leaves_the_previous_complete_save(
    examples, script, run_args, straight, tmp_path, capsys, monkeypatch
):
    # the final `save_pretrained` wrote into --output_dir in place: a crash midway left a mix of new and old files
    # (here: new components without the re-export files) that looked like a complete pipeline
    from diffusers_stages.pipelines import pipeline_staged

    out = str(tmp_path / "resaved")
    shutil.copytree(straight, out)
    os.remove(os.path.join(out, "checkpoint-4", FINISHED_MARKER))  # resuming writes the final outputs again
    old = load_file(os.path.join(out, "unet", WEIGHTS))
    save_file({k: torch.zeros_like(v) for k, v in old.items()}, os.path.join(out, "unet", WEIGHTS))  # the old save

    def pipeline_files():
        return {k: v for k, v in _snapshot(out).items() if k.split(os.sep)[0] not in ("logs", "samples")}

    before = pipeline_files()

    def crash(*args, **kwargs):
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(pipeline_staged, "write_reexport_files", crash)  # after the components were written
    with pytest.raises(RuntimeError, match="killed while saving"):
        _resume(examples, script, run_args, out, capsys)
    assert pipeline_files() == before  # the previous save, complete; the checkpoints untouched
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary folder left
    monkeypatch.undo()
    _resume(examples, script, run_args, out, capsys)  # the new save replaces the old one, checkpoints and logs kept
    assert _same_weights(straight, out, "unet")
    assert sorted(os.listdir(out)) == sorted(os.listdir(straight))
    assert os.path.isfile(os.path.join(out, "checkpoint-4", FINISHED_MARKER))


def test_a_finished_checkpoint_of_another_folder_writes_its_outputs_into_the_output_dir(
    examples, script, run_args, straight, tmp_path, capsys
):
    # resuming the last (finished) checkpoint of another run into a new `--output_dir` said "its final outputs are
    # written in <new folder>" and wrote nothing there: that run's outputs are in its own folder
    out = str(tmp_path / "exported")
    capsys.readouterr()
    examples.train(
        script, [*run_args, "--output_dir", out, "--resume_from_checkpoint", os.path.join(straight, "checkpoint-4")]
    )
    assert "Training is complete at " in capsys.readouterr().out
    assert _same_weights(straight, out, "unet")
    assert os.path.isfile(os.path.join(straight, "checkpoint-4", FINISHED_MARKER))  # the other run left as it was


def test_a_checkpoint_whose_outputs_a_later_run_replaced_writes_them_again(
    examples, script, run_args, straight, tmp_path, capsys
):
    # checkpoint-4 kept its "finished" marker after a resumed run wrote step 5's outputs over its own: resuming it
    # to re-export step 4 said "its final outputs are written" and left step 5's
    out = str(tmp_path / "extended")
    shutil.copytree(straight, out)
    longer = [*run_args, "--max_train_steps", "5"]  # the last value given counts
    _resume(examples, script, longer, out, capsys)  # step 5: no checkpoint of its own
    assert not _same_weights(straight, out, "unet")
    assert finished_step(os.path.join(out, "checkpoint-4")) == 5  # the outputs written after it are step 5's
    capsys.readouterr()
    examples.train(script, [*run_args, "--output_dir", out, "--resume_from_checkpoint", "checkpoint-4"])
    assert "writing its final outputs only" in capsys.readouterr().out
    assert _same_weights(straight, out, "unet")
    assert os.path.isfile(os.path.join(out, "checkpoint-4", FINISHED_MARKER))


def _marked_processes(checkpoint: str) -> int | None:
    with open(os.path.join(checkpoint, COMPLETE_MARKER), encoding="utf-8") as f:
        return json.load(f).get("num_processes")


def test_a_checkpoint_of_another_process_count_is_refused(examples, script, run_args, straight, tmp_path):
    # Accelerate steps the learning-rate schedule once per process at each optimisation step: a run of 2 processes
    # resumed on 1 went on with its schedule twice as far along as its steps (1 resumed on 2: half), in silence
    assert _marked_processes(os.path.join(straight, "checkpoint-4")) == 1
    out = str(tmp_path / "two")
    checkpoint = os.path.join(out, "checkpoint-4")
    shutil.copytree(os.path.join(straight, "checkpoint-4"), checkpoint)
    os.remove(os.path.join(checkpoint, FINISHED_MARKER))
    with open(os.path.join(checkpoint, COMPLETE_MARKER), "w", encoding="utf-8") as f:
        json.dump({"step": 4, "num_processes": 2}, f)  # as a run of 2 processes marks it
    with pytest.raises(ValueError, match=r"'.*checkpoint-4' was written by a run of 2 processes, resumed on 1: "):
        examples.train(script, [*run_args, "--output_dir", out, "--resume_from_checkpoint", "latest"])


def test_a_one_process_checkpoint_resumed_on_two_processes_is_refused(examples, run_args, straight, tmp_path):
    # the 2-process run resumed the 1-process run's schedule at half its position (warm-up restarted): refused by
    # every process, which all stop with the message
    out = str(tmp_path / "one")
    shutil.copytree(os.path.join(straight, "checkpoint-4"), os.path.join(out, "checkpoint-4"))
    result = examples.run_subprocess(
        ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", examples.SCRIPTS["multistage"],
         *run_args, "--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps", "6"]
    )  # fmt: skip
    assert result.returncode != 0
    # (each process refuses it; the launcher may stop the other before it prints)
    assert "was written by a run of 1 process, resumed on 2: " in result.stderr, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["checkpoint-4"]  # nothing trained nor written
