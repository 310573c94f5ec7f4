"""Checkpoint folders (latest complete one, pruning, leftovers of killed runs) and the Hub push: file selection and
model card, offline."""

import argparse
import contextlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline, MultiStagePipeline
from diffusers_stages.training import LocalHubApi, push_output_folder
from diffusers_stages.training.checkpointing import (
    COMPLETE_MARKER,
    SOURCE_FILE,
    check_same_sharding,
    check_same_source_files,
    check_sharded_resume,
    checkpoint_folders,
    prune_checkpoints,
    publish_checkpoint,
    publish_pipeline,
    remove_leftovers,
    resolve_resume_checkpoint,
    skipped_checkpoints,
    source_identity,
)
from diffusers_stages.training.hub import (
    assembled_experts_card_text,
    model_card_text,
    pipeline_usage,
    stage_table,
    write_model_card,
)
from diffusers_stages.training.state import sample_grid
from tests.conftest import TINY_UNET, corrupt_weights


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def _checkpoint(root, step: int, complete: bool = True) -> str:
    """A ``checkpoint-<step>`` folder with a weights file, and its completeness marker unless ``complete`` is False."""
    folder = os.path.join(root, f"checkpoint-{step}")
    _touch(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    if complete:
        _touch(os.path.join(folder, COMPLETE_MARKER))
    return folder


def _names(root) -> list[str]:
    return sorted(os.listdir(root))


def _main_process(save_state) -> SimpleNamespace:
    """A stand-in for the main process's `Accelerator` in `save_checkpoint`, writing its state with ``save_state``."""
    return SimpleNamespace(
        is_main_process=True, num_processes=1, wait_for_everyone=lambda: None, save_state=save_state
    )


def _kill_while_deleting(monkeypatch, name: str) -> None:
    """Make `shutil.rmtree` of a folder called ``name`` raise `KeyboardInterrupt`, the stand-in for a kill while it
    is being deleted (undo with ``monkeypatch.undo()``)."""
    import shutil

    rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if os.path.basename(str(path)) == name:
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)


def test_latest_and_pruning(tmp_path):
    for step in (10, 2, 100):
        _checkpoint(tmp_path, step)
    assert resolve_resume_checkpoint(str(tmp_path), "latest").endswith("checkpoint-100")
    assert resolve_resume_checkpoint(str(tmp_path), "checkpoint-2").endswith("checkpoint-2")
    prune_checkpoints(str(tmp_path), total_limit=2)  # run after a save: keep the newest two
    assert [os.path.basename(f) for f in checkpoint_folders(str(tmp_path))] == ["checkpoint-10", "checkpoint-100"]
    assert resolve_resume_checkpoint(str(tmp_path / "none"), "latest") is None
    with pytest.raises(ValueError, match="`--resume_from_checkpoint` 'checkpoint-7' is not a checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-7")


def test_names_that_are_no_checkpoint_folders_are_left_alone(tmp_path):
    # a file named like a checkpoint was pruned with `shutil.rmtree` (NotADirectoryError after the save); a step in
    # other digits than 0-9 (`int` reads "checkpoint-\u0661" as step 1) or with a leading zero was a second step 1
    _checkpoint(tmp_path, 1)
    _touch(os.path.join(tmp_path, "checkpoint-0"))
    for name in ("checkpoint-\u0661", "checkpoint-01"):
        os.rename(_checkpoint(tmp_path, 2), os.path.join(tmp_path, name))
    assert [os.path.basename(f) for f in checkpoint_folders(str(tmp_path))] == ["checkpoint-1"]
    prune_checkpoints(str(tmp_path), total_limit=1)
    assert _names(tmp_path) == ["checkpoint-0", "checkpoint-01", "checkpoint-1", "checkpoint-\u0661"]
    assert resolve_resume_checkpoint(str(tmp_path), "latest").endswith("checkpoint-1")


def test_a_checkpoint_name_is_one_of_the_output_dir(tmp_path, monkeypatch):
    # a bare name was looked up in the current folder first, as diffusers' scripts never do: run from another run's
    # folder, `--resume_from_checkpoint checkpoint-2` resumed that run's checkpoint
    out, other = tmp_path / "out", tmp_path / "other"
    _checkpoint(out, 2)
    _checkpoint(other, 2)
    monkeypatch.chdir(other)
    assert resolve_resume_checkpoint(str(out), "checkpoint-2") == os.path.join(str(out), "checkpoint-2")
    assert resolve_resume_checkpoint(str(out), "./checkpoint-2") == "./checkpoint-2"  # a path: that folder
    assert resolve_resume_checkpoint(str(tmp_path / "new"), "checkpoint-2") == "checkpoint-2"  # none in out: here


@pytest.mark.parametrize("given", ["", " "])
def test_an_empty_checkpoint_name_is_named_as_given(tmp_path, given):
    # '' (an unset shell variable) was taken as the output folder itself: "must name a `checkpoint-<step>` folder,
    # got '<output_dir>/'", a value the user never gave
    _checkpoint(tmp_path, 2)
    with pytest.raises(ValueError, match=f"`--resume_from_checkpoint` {given!r} names no checkpoint"):
        resolve_resume_checkpoint(str(tmp_path), given)


def test_the_noise_schedule_check_takes_a_config_of_another_diffusers_version(tmp_path):
    import json

    from diffusers import DDPMScheduler

    from diffusers_stages.training.checkpointing import NOISE_SCHEDULER_FOLDER, _check_same_noise_schedule

    DDPMScheduler().save_pretrained(tmp_path / NOISE_SCHEDULER_FOLDER)
    file = tmp_path / NOISE_SCHEDULER_FOLDER / "scheduler_config.json"
    config = json.loads(file.read_text())
    del config["rescale_betas_zero_snr"]  # an older version's: without a key, which takes its default
    file.write_text(json.dumps({**config, "retired_option": 1}))  # a key this version does not know
    _check_same_noise_schedule(DDPMScheduler(), str(tmp_path))
    with pytest.raises(ValueError, match=r"another noise schedule \(`prediction_type` 'epsilon' there, 'v_prediction"):
        _check_same_noise_schedule(DDPMScheduler(prediction_type="v_prediction"), str(tmp_path))


@pytest.mark.parametrize(
    "key, value", [("num_train_timesteps", "x"), ("num_train_timesteps", -3), ("beta_schedule", "nope"), (None, None)]
)
def test_a_noise_schedule_of_a_tampered_checkpoint_is_named(tmp_path, key, value):
    # the checkpoint is hostile input: a value the scheduler cannot take was a TypeError, NotImplementedError or
    # RuntimeError from inside it, and a config linking out of the checkpoint was read
    import json

    from diffusers import DDPMScheduler

    from diffusers_stages.training.checkpointing import NOISE_SCHEDULER_FOLDER, _check_same_noise_schedule

    DDPMScheduler().save_pretrained(tmp_path / "run" / NOISE_SCHEDULER_FOLDER)
    file = tmp_path / "run" / NOISE_SCHEDULER_FOLDER / "scheduler_config.json"
    if key is None:  # the config linked to a file outside the checkpoint
        file.rename(tmp_path / "elsewhere.json")
        file.symlink_to(tmp_path / "elsewhere.json")
    else:
        file.write_text(json.dumps({**json.loads(file.read_text()), key: value}))
    with pytest.raises(ValueError, match="outside the folder" if key is None else "scheduler_config.json"):
        _check_same_noise_schedule(DDPMScheduler(), str(tmp_path / "run"))


def test_latest_skips_incomplete_checkpoints_and_names_them(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, complete=False)  # killed while being written
    latest = resolve_resume_checkpoint(str(tmp_path), "latest")
    assert os.path.basename(latest) == "checkpoint-2"
    assert [os.path.basename(f) for f in skipped_checkpoints(latest)] == ["checkpoint-4"]
    with pytest.raises(
        ValueError, match=r"'.*checkpoint-4' is incomplete \(no checkpoint_complete.json.*checkpoint-2"
    ):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-4")
    with pytest.raises(ValueError, match=r"'checkpoint-6' is not a checkpoint folder \(complete checkpoints in .*: "):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-6")
    os.remove(os.path.join(tmp_path, "checkpoint-2", COMPLETE_MARKER))
    with pytest.raises(
        ValueError, match=r"no checkpoint in .* is complete \(checkpoint-2, checkpoint-4: no checkpoint_complete"
    ):
        resolve_resume_checkpoint(str(tmp_path), "latest")


def test_a_checkpoint_without_the_marker_is_not_said_to_be_interrupted(tmp_path):
    # the save writes a hidden folder and names it `checkpoint-<step>` only once marked complete, so a checkpoint
    # without the marker was written by another program (diffusers' own training scripts write none), not left by
    # an interrupted save, which both messages said it was
    folder = tmp_path / "checkpoint-10"
    for name in ("unet/diffusion_pytorch_model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        _touch(str(folder / name))  # as diffusers' train_unconditional.py leaves it
    for given in ("latest", "checkpoint-10"):
        with pytest.raises(ValueError) as error:
            resolve_resume_checkpoint(str(tmp_path), given)
        assert "interrupted while being written" not in str(error.value)
        assert "diffusers' own training scripts" in str(error.value) and "checkpoint-10" in str(error.value)


def test_pruning_keeps_complete_checkpoints_and_newer_incomplete_ones(tmp_path):
    for step, complete in ((2, True), (4, False), (6, True), (8, True), (10, False)):
        _checkpoint(tmp_path, step, complete)
    prune_checkpoints(str(tmp_path), total_limit=1)
    assert _names(tmp_path) == ["checkpoint-10", "checkpoint-8"]  # 10 is replaced when step 10 is saved again
    prune_checkpoints(str(tmp_path), total_limit=None)
    assert _names(tmp_path) == ["checkpoint-10", "checkpoint-8"]


def test_publish_replaces_a_folder_of_the_same_step_and_leftovers_are_removed(tmp_path):
    _checkpoint(tmp_path, 4, complete=False)
    partial = tmp_path / ".checkpoint-4.partial"
    _touch(str(partial / "optimizer.bin"))
    publish_checkpoint(str(partial), str(tmp_path / "checkpoint-4"), 4)
    assert _names(tmp_path) == ["checkpoint-4"]
    assert _names(tmp_path / "checkpoint-4") == [COMPLETE_MARKER, "optimizer.bin"]
    for name in (".checkpoint-6.partial", ".checkpoint-2.deleted", ".unrelated"):
        _touch(str(tmp_path / name / "file"))
    assert remove_leftovers(str(tmp_path)) == [".checkpoint-2.deleted", ".checkpoint-6.partial"]
    assert _names(tmp_path) == [".unrelated", "checkpoint-4"]
    assert remove_leftovers(str(tmp_path / "none")) == []


def test_a_kill_while_the_replaced_checkpoint_of_the_same_step_is_deleted_keeps_the_new_one(tmp_path, monkeypatch):
    # a checkpoint replacing one of the same step (the former run's, `--overwrite_output_dir`, or one beside a resume
    # from another folder) was renamed into place only after the old folder was deleted: a kill while deleting it
    # left the new checkpoint hidden, and the next run removed it as a leftover, with no checkpoint left at all
    _checkpoint(tmp_path, 4)  # complete: the only checkpoint of the folder
    partial = tmp_path / ".checkpoint-4.partial"
    _touch(str(partial / "optimizer.bin"))
    _kill_while_deleting(monkeypatch, ".checkpoint-4.deleted")
    with pytest.raises(KeyboardInterrupt):
        publish_checkpoint(str(partial), str(tmp_path / "checkpoint-4"), 4)
    monkeypatch.undo()
    remove_leftovers(str(tmp_path))  # the next run
    assert _names(tmp_path) == ["checkpoint-4"]
    assert _names(tmp_path / "checkpoint-4") == [COMPLETE_MARKER, "optimizer.bin"]  # the new one


def _pipeline_save(version: str):
    """A stand-in for a pipeline's `save_pretrained`: an index file and two component folders, tagged ``version``."""

    def write(folder):
        for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"):
            _touch(os.path.join(folder, name))
            with open(os.path.join(folder, name), "w") as f:
                f.write(version)

    return write


def _saved(root) -> dict:
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name)) as f:
                files[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return files


def test_the_final_pipeline_replaces_the_previous_one_all_or_nothing(tmp_path, monkeypatch):
    out = str(tmp_path)
    _checkpoint(out, 2)
    _touch(os.path.join(out, "logs", "events"))
    publish_pipeline(out, _pipeline_save("old"))
    old = _saved(out)
    assert old["unet/config.json"] == "old" and "checkpoint-2/checkpoint_complete.json" in old

    def fail_midway(folder):
        _pipeline_save("new")(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a failed write: the previous save, as it was
        publish_pipeline(out, fail_midway)
    assert _saved(out) == old and sorted(os.listdir(out)) == ["checkpoint-2", "logs", "model_index.json",
                                                              "scheduler", "unet"]  # fmt: skip
    os.makedirs(os.path.join(out, ".pipeline.partial", "unet"))  # a kill while writing: removed by the next run
    assert remove_leftovers(out) == [".pipeline.partial"] and _saved(out) == old

    renames, rename = [], os.rename

    def killed_after_three_renames(source, target):
        if len(renames) == 3:
            raise KeyboardInterrupt  # as a kill midway through the swap
        renames.append(target)
        rename(source, target)

    monkeypatch.setattr(os, "rename", killed_after_three_renames)
    with pytest.raises(KeyboardInterrupt):
        publish_pipeline(out, _pipeline_save("new"))
    monkeypatch.undo()
    assert "model_index.json" not in os.listdir(out)  # a half-swapped folder does not load as a pipeline
    assert remove_leftovers(out) == []  # the next run finishes the swap
    new = {k: "new" if v == "old" else v for k, v in old.items()}
    assert _saved(out) == new and not [name for name in os.listdir(out) if name.startswith(".")]
    publish_pipeline(out, _pipeline_save("newer"))  # and a complete swap in one go
    assert _saved(out) == {k: "newer" if v == "new" else v for k, v in new.items()}


def test_push_selects_files_like_the_hub_and_writes_a_card(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    for name in ("model_index.json", "unet/config.json", "sample_grid.png", "checkpoint-5/optimizer.bin",
                 "logs/run/events.out", "samples/step_000005.png",
                 ".git/config", ".cache/huggingface/upload/x"):  # fmt: skip
        _touch(str(out / name))  # `.git` and `.cache/huggingface`: never uploaded by `HfApi.upload_folder`
    push_output_folder(
        str(out), "me/model", "My *description*.", ["multi-stage"], api=LocalHubApi(str(tmp_path / "hub")),
        class_conditional=False,
    )  # fmt: skip
    pushed = tmp_path / "hub" / "me" / "model"
    files = sorted(os.path.relpath(os.path.join(r, f), pushed) for r, _, fs in os.walk(pushed) for f in fs)
    assert files == ["README.md", "model_index.json", "sample_grid.png", "unet/config.json"]
    card = (pushed / "README.md").read_text()
    assert "My *description*." in card and "multi-stage" in card and "library_name: diffusers" in card
    assert "- unconditional-image-generation" in card and "class-conditional" not in card


def test_a_failed_upload_names_the_repository_and_the_upload_command(tmp_path, monkeypatch):
    # the end of a training run: the upload's own error (an HTTP 401, a network error) was all the run said, with no
    # word that the output folder is complete nor of which files to leave out when uploading it by hand
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    _touch(str(out / "model_index.json"))

    class Api(LocalHubApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError("Connection reset by peer")

    with pytest.raises(OSError) as caught:
        push_output_folder(str(out), "me/model", "card", [], api=Api(str(tmp_path / "hub")), class_conditional=False)
    message = str(caught.value)
    assert "'me/model' failed (ConnectionError: Connection reset by peer)" in message and "README.md" in message
    command = re.search(r"`(hf upload [^`]*)`", message).group(1).split()
    assert command[2:4] == ["me/model", str(out)]
    excluded = [command[i + 1].strip("'") for i, word in enumerate(command) if word == "--exclude"]
    assert excluded == ["checkpoint-*", ".checkpoint-*", "logs/*", "samples/*", ".pipeline.partial/*", ".pipeline.new/*",
                        ".pipeline.old/*", "*.pkl", "*.bin"]  # fmt: skip
    assert os.path.isfile(out / "README.md")  # the card is written: the folder is ready to upload


def _card_args(**overrides) -> argparse.Namespace:
    values = dict(hub_model_id="me/model", train_data_dir="data/digits", dataset_name=None, resolution=8,
                  class_conditional=True, boundary_units="timestep", num_train_timesteps=1000, ddpm_beta_schedule="linear",
                  prediction_type="epsilon", train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-4, scale_lr=False,
                  lr_scheduler="constant", lr_warmup_steps=0, mixed_precision=None, use_ema=False, seed=0,
                  num_sample_images=4, num_inference_steps=3, assemble_experts=["run0", "run1"])  # fmt: skip
    return argparse.Namespace(**{**values, **overrides})


def _readme_python(card: str) -> str:
    return card.split("```python\n")[1].split("```")[0]


@pytest.mark.parametrize("class_conditional", [True, False])
def test_training_card_tags_installs_and_samples(tmp_path, monkeypatch, class_conditional):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task = SimpleNamespace(
        vae_path=None, method="multi-stage multi-decoder U-Net", description=lambda: "Stages.", scheduler_config=None,
        usage=lambda repo_id: pipeline_usage("StagedDiffusionPipeline", repo_id, class_conditional),
    )  # fmt: skip
    args = _card_args(class_conditional=class_conditional)
    text = model_card_text(args, task, steps=3, has_grid=True, mixed_precision="no")
    card = open(write_model_card(str(tmp_path), text, ["multi-stage"], class_conditional=class_conditional)).read()
    tag = "class-conditional-image-generation" if class_conditional else "unconditional-image-generation"
    assert f"- {tag}" in card and card.count("image-generation") == (1 if class_conditional else 2)  # + pipeline_tag
    assert "not on a package index" in card and "`pip install .`" in card and "pypi.org" not in card
    call = "pipe(class_labels=[0])" if class_conditional else "pipe(batch_size=1)"
    assert call in _readme_python(card) and "![samples](sample_grid.png)" in card


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("golden retriever", "pipe(class_labels=pipe.get_label_ids(['golden retriever']))"),
        ("it's", 'pipe(class_labels=pipe.get_label_ids(["it\'s"]))'),  # quoted as Python quotes it
        ("a```b", "pipe(class_labels=[0])"),  # would close the card's code block: the index instead
        ("a\nb", "pipe(class_labels=[0])"),
        (None, "pipe(class_labels=[0])"),
    ],
)
def test_a_card_samples_the_first_class_by_its_name(name, call):
    lines = pipeline_usage("StagedDiffusionPipeline", "me/model", True, name)
    assert lines[-1] == f"image = {call}.images[0]"


@pytest.mark.parametrize(("given", "used"), [(None, "bf16"), ("fp16", "fp16"), (None, "no")])
def test_training_card_reports_the_mixed_precision_accelerate_used(given, used):
    # the card showed `--mixed_precision` (None: "no") even where an `accelerate config` file set bf16
    task = SimpleNamespace(
        vae_path=None, method="multi-stage", description=lambda: "Stages.", scheduler_config=None,
        usage=lambda repo_id: "",
    )  # fmt: skip
    text = model_card_text(_card_args(mixed_precision=given), task, steps=3, has_grid=False, mixed_precision=used)
    assert f"- mixed precision: {used}, EMA: no" in text


def test_the_card_is_this_runs_whatever_card_the_hub_holds(tmp_path, monkeypatch):
    # the card was the Hub repository's own README when it had one (a re-push kept the former run's settings, and a
    # `--hub_local_dir` push read a stranger's card from the network), with this run's description dropped
    from huggingface_hub import ModelCard

    def hub_card(*args, **kwargs):
        return ModelCard("---\nlicense: mit\n---\n# A former run's card\n")

    monkeypatch.setattr(ModelCard, "load", hub_card)
    card = open(write_model_card(str(tmp_path), "This run.", ["meme"], class_conditional=True)).read()
    assert "This run." in card and "former run" not in card and card.count("- meme") == 1


def test_text_to_image_card_has_no_image_generation_tag(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = write_model_card(str(tmp_path), "A card.", ["text-to-image"], class_conditional=False)
    card = open(path).read()
    assert "- text-to-image" in card and "image-generation" not in card


def test_assembled_experts_card_has_usage_settings_and_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    experts = [UNet2DModel(**TINY_UNET, num_class_embeds=4, class_embed_type=None) for _ in range(2)]
    pipe = ExpertRoutingPipeline(ExpertRoutingModel(experts, stage_boundaries=[500]), DDIMScheduler())
    text = assembled_experts_card_text(_card_args(), pipe, has_grid=True)
    card = open(write_model_card(str(tmp_path), text, ["meme"], class_conditional=True)).read()
    for part in ("MEME", "| 0 | [0, 500) |", "| 1 | [500, 1000) |", "## Settings", "`UNet2DModel`", "3 classes",
                 "`DDIMScheduler`, 1000 training steps, prediction type `epsilon`", "4 samples, 3 steps, seed 0 + the image's index",
                 "- class-conditional-image-generation", "![samples](sample_grid.png)"):  # fmt: skip
        assert part in card, part
    usage = _readme_python(card)
    assert 'ExpertRoutingPipeline.from_pretrained("me/model")' in usage and "class_labels=[0]" in usage


def test_sample_grid_upscales_small_samples_without_blur(tiny_multistage):
    pipe = MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler())
    args = argparse.Namespace(num_sample_images=4, eval_batch_size=16, seed=0, num_inference_steps=2)
    grid, images = sample_grid(pipe, args, num_classes=0)
    assert images.shape == (4, 8, 8, 3) and grid.size == (128, 128)  # 2 x 2 samples of 8 px, each drawn 64 px wide
    tile = np.asarray(grid)[:64, :64]
    assert (tile == np.kron(np.rint(images[0] * 255), np.ones((8, 8, 1)))).all()  # 8 x 8 blocks, one per pixel


def test_a_checkpoint_saved_after_resuming_from_an_older_one_is_kept(tmp_path):
    # resumed from checkpoint-2 while the output folder holds the later checkpoint-5 of the run resumed over: the
    # pruning counted checkpoint-5 as the newest and deleted checkpoint-3 as soon as it was written, leaving no
    # checkpoint of this run to resume from
    from diffusers_stages.training.checkpointing import is_complete, save_checkpoint

    for step in (2, 5):
        _checkpoint(tmp_path, step)
    with fresh_accelerator() as accelerator:
        path = save_checkpoint(accelerator, str(tmp_path), 3, total_limit=1)
    assert _names(tmp_path) == ["checkpoint-3", "checkpoint-5"] and is_complete(path)


def test_a_checkpoint_save_that_fails_leaves_no_partial_folder(tmp_path):
    # a save that raised (a full disk, say) left its `.checkpoint-<step>.partial` folder, as large as a checkpoint,
    # until the next run: the final pipeline's save removes its partial folder when the writing fails
    from diffusers_stages.training.checkpointing import is_complete, save_checkpoint

    def save_state(folder):
        _touch(os.path.join(folder, "optimizer.bin"))
        raise OSError(28, "No space left on device")

    accelerator = _main_process(save_state)
    kept = _checkpoint(tmp_path, 2)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(accelerator, str(tmp_path), 4, total_limit=1)
    assert _names(tmp_path) == ["checkpoint-2"] and is_complete(kept)


def test_a_kill_while_the_former_runs_later_checkpoints_are_deleted_keeps_the_new_one(tmp_path, monkeypatch):
    # `--overwrite_output_dir`: the former run's checkpoints of later steps (which `latest` would take) were deleted
    # before the new run's first checkpoint, written and complete, got its name: a kill while deleting them left it
    # hidden, the next run removed it as a leftover, and `latest` resumed the former run's earlier checkpoint
    from diffusers_stages.training.checkpointing import save_checkpoint

    replaced = [_checkpoint(tmp_path, 2), _checkpoint(tmp_path, 6)]  # the former run's
    accelerator = _main_process(lambda folder: _touch(os.path.join(folder, "optimizer.bin")))
    _kill_while_deleting(monkeypatch, ".checkpoint-6.deleted")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(tmp_path), 4, total_limit=None, replaced=replaced)
    monkeypatch.undo()
    remove_leftovers(str(tmp_path))  # the next run
    latest = resolve_resume_checkpoint(str(tmp_path), "latest")
    assert os.path.basename(latest) == "checkpoint-4" and _names(latest) == [COMPLETE_MARKER, "optimizer.bin"]


def test_push_leaves_out_the_logs_of_a_custom_logging_dir(tmp_path, monkeypatch):
    # `--logging_dir tb`: its TensorBoard files were uploaded (only `logs/*` was left out)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    for name in ("model_index.json", "tb/run/events.out", "nested/tb/events.out", ".checkpoint-4.partial/x.json"):
        _touch(str(out / name))
    for logging_dir, kept in (("tb", "nested/tb/events.out"), ("nested/tb", "tb/run/events.out")):
        push_output_folder(
            str(out), "me/model", "card", [], api=LocalHubApi(str(tmp_path / logging_dir.replace("/", "_"))),
            class_conditional=False, logging_dir=logging_dir,
        )  # fmt: skip
        pushed = tmp_path / logging_dir.replace("/", "_") / "me" / "model"
        files = sorted(os.path.relpath(os.path.join(r, f), pushed) for r, _, fs in os.walk(pushed) for f in fs)
        assert files == sorted(["README.md", kept, "model_index.json"])


@pytest.mark.parametrize("repo_id", ["../outside", "me/../../outside", "ABSOLUTE"])
def test_a_hub_model_id_that_is_no_repository_name_is_refused_before_training(tmp_path, repo_id):
    # `--hub_local_dir`: was joined to the folder as it was, writing the upload wherever it led
    from diffusers_stages.training.hub import create_hub_repo

    repo_id = str(tmp_path / "outside") if repo_id == "ABSOLUTE" else repo_id

    args = argparse.Namespace(hub_model_id=repo_id, hub_local_dir=str(tmp_path / "hub"), hub_private_repo=False,
                              hub_token=None)  # fmt: skip
    with pytest.raises(ValueError, match=r"`--hub_model_id` .* is not a Hub repository name"):
        create_hub_repo(args)
    assert not (tmp_path / "outside").exists()


def test_a_linked_checkpoint_is_pruned_as_a_link_and_its_target_is_kept(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "other-disk"
    target = _checkpoint(elsewhere, 2)  # a checkpoint moved to another disk, linked back under its name
    os.makedirs(run)
    os.symlink(target, run / "checkpoint-2")
    _checkpoint(run, 4)
    os.symlink(target, run / "checkpoint-6")  # a link of a later step, replaced when step 6 is published
    partial = run / ".checkpoint-6.partial"
    _touch(str(partial / "optimizer.bin"))
    publish_checkpoint(str(partial), str(run / "checkpoint-6"), 6)
    assert not os.path.islink(run / "checkpoint-6") and _names(run / "checkpoint-6") == [
        COMPLETE_MARKER,
        "optimizer.bin",
    ]
    prune_checkpoints(str(run), total_limit=1)
    assert _names(run) == ["checkpoint-6"]
    assert _names(target) == [COMPLETE_MARKER, "unet"]  # what the links pointed to is untouched
    os.symlink(target, run / ".checkpoint-8.partial")  # leftovers that are links: unlinked, not followed
    assert remove_leftovers(str(run)) == [".checkpoint-8.partial"]
    assert _names(run) == ["checkpoint-6"] and _names(target) == [COMPLETE_MARKER, "unet"]


def test_push_refuses_a_file_that_links_out_of_the_output_folder(tmp_path, monkeypatch):
    # `HfApi.upload_folder` follows links: the file a link leads to (a token, a key) would be published
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out, secret = tmp_path / "out", tmp_path / "secret"
    _touch(str(out / "model_index.json"))
    secret.write_text("hf_token")
    os.symlink(secret, out / "notes.txt")
    os.symlink(tmp_path, out / "checkpoint-5")  # a linked checkpoint is left out of the push, as its files
    _touch(str(out / "logs" / "run" / "x"))
    os.symlink(secret, out / "logs" / "run" / "linked")  # left out too
    with pytest.raises(ValueError, match="'notes.txt'.*outside"):
        push_output_folder(
            str(out), "me/model", "card", [], api=LocalHubApi(str(tmp_path / "hub")), class_conditional=False
        )
    assert not (tmp_path / "hub" / "me" / "model" / "notes.txt").exists()
    os.remove(out / "notes.txt")
    push_output_folder(
        str(out), "me/model", "card", [], api=LocalHubApi(str(tmp_path / "hub")), class_conditional=False
    )
    assert sorted(os.listdir(tmp_path / "hub" / "me" / "model")) == ["README.md", "model_index.json"]


@contextlib.contextmanager
def fresh_accelerator():
    """An `Accelerator(cpu=True)` with a state of its own: Accelerate's state is a singleton, reset before and after
    so that no test sees another's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield Accelerator(cpu=True)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _ema_run(accelerator, use_ema: bool = True, **ema_options):
    """A tiny `UNet2DModel` prepared by ``accelerator`` with the checkpoint hooks, and its `EMAModel` (of
    ``ema_options``; kept by the hooks where ``use_ema``): (prepared model, EMA)."""
    from diffusers.training_utils import EMAModel

    from diffusers_stages.training.checkpointing import register_checkpoint_hooks

    network = UNet2DModel(**TINY_UNET)
    ema = EMAModel(network.parameters(), model_cls=UNet2DModel, model_config=network.config, **ema_options)
    model = accelerator.prepare(network)
    register_checkpoint_hooks(accelerator, ["unet"], {"unet": ema} if use_ema else {})
    return model, ema


@pytest.mark.parametrize("corruption", ["integers", "link"])
def test_resuming_reads_a_checkpoint_network_strictly(tmp_path, corruption):
    # a diffusers network (UNet2DModel) of a checkpoint was read leniently: integer weights resumed cast
    from diffusers import UNet2DModel

    from diffusers_stages.training.checkpointing import register_checkpoint_hooks

    with fresh_accelerator() as accelerator:
        model = accelerator.prepare(UNet2DModel(**TINY_UNET))
        register_checkpoint_hooks(accelerator, ["unet"], {})
        accelerator.save_state(str(tmp_path / "checkpoint-1"))
        weights = tmp_path / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors"
        key = corrupt_weights(weights, corruption, outside=tmp_path)
        with pytest.raises(ValueError, match="outside" if corruption == "link" else key):
            accelerator.load_state(str(tmp_path / "checkpoint-1"))
        assert model is not None


@pytest.mark.parametrize("corruption", ["missing", "unexpected", "integers", "other_config", "decay"])
def test_resuming_reads_a_checkpoint_ema_strictly(tmp_path, corruption):
    # `EMAModel.from_pretrained` loaded through diffusers leniently: missing weights were left random, and an EMA of
    # another configuration replaced the shadow parameters whatever their shapes
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file, save_file

    with fresh_accelerator() as accelerator:
        model, ema = _ema_run(accelerator)
        checkpoint = tmp_path / "checkpoint-1"
        ema.optimization_step = 7
        accelerator.save_state(str(checkpoint))
        folder = checkpoint / "unet_ema"
        ema.optimization_step = 0
        accelerator.load_state(str(checkpoint))  # intact: resumes, the EMA's own state too
        assert ema.optimization_step == 7
        weights = folder / "diffusion_pytorch_model.safetensors"
        if corruption == "unexpected":
            save_file({**load_file(weights), "extra.weight": torch.zeros(2)}, weights)
        elif corruption == "decay":  # the EMA's own state, out of range
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "decay": 2.0}))
        elif corruption == "other_config":  # a complete EMA folder, of a wider network
            other = UNet2DModel(**{**TINY_UNET, "block_out_channels": (8, 32)})
            EMAModel(other.parameters(), model_cls=UNet2DModel, model_config=other.config).save_pretrained(folder)
        else:
            corrupt_weights(weights, corruption, outside=tmp_path)
        shadow, decay = [p.clone() for p in ema.shadow_params], ema.decay
        with pytest.raises(ValueError, match=re.escape(str(folder))):
            accelerator.load_state(str(checkpoint))
        assert all(torch.equal(a, b) for a, b in zip(shadow, ema.shadow_params, strict=True))  # left as it was
        assert ema.decay == decay
        assert model is not None


@pytest.mark.parametrize("folder", ["unet", "unet_ema"])
def test_resuming_refuses_a_network_folder_that_links_out_of_the_checkpoint(tmp_path, folder):
    # a checkpoint is read as hostile input, its noise_scheduler/ refused as a link out of it, but its network and EMA
    # folders were read wherever a link named like them led (weights from another folder resumed without a word)
    with fresh_accelerator() as accelerator:
        model, _ = _ema_run(accelerator)
        checkpoint = tmp_path / "checkpoint-1"
        accelerator.save_state(str(checkpoint))
        shutil.move(checkpoint / folder, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", checkpoint / folder)
        with pytest.raises(ValueError, match=f"{folder}.*inside"):
            accelerator.load_state(str(checkpoint))
        assert model is not None


@pytest.mark.parametrize("file", ["optimizer.bin", "class_names.json", "pretrained_source.json"])
def test_resuming_refuses_a_state_file_that_links_out_of_the_checkpoint(tmp_path, file):
    # the checkpoint's own state files (Accelerate's optimizer and random states, the run's records) were read
    # wherever a link named like them led, another run's state resumed (or named in an error) without a word

    from diffusers_stages.training.checkpointing import register_checkpoint_hooks

    with fresh_accelerator() as accelerator:
        network = UNet2DModel(**TINY_UNET)
        model, optimizer = accelerator.prepare(network, torch.optim.AdamW(network.parameters()))
        register_checkpoint_hooks(accelerator, ["unet"], {})
        checkpoint = tmp_path / "checkpoint-1"
        accelerator.save_state(str(checkpoint))
        shutil.move(checkpoint / file, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", checkpoint / file)
        with pytest.raises(ValueError, match=f"{re.escape(repr(file))} in .* links to .*outside the folder"):
            accelerator.load_state(str(checkpoint))
        assert model is not None and optimizer is not None


def test_resuming_a_run_with_ema_without_it_is_refused(tmp_path):
    # the EMA weights of the checkpoint were dropped in silence (the final pipeline then held the raw weights), while
    # the other way round (`--use_ema` on a checkpoint without them) is refused
    checkpoint = str(tmp_path / "checkpoint-1")
    with fresh_accelerator() as accelerator:
        _ema_run(accelerator)
        accelerator.save_state(checkpoint)
    with fresh_accelerator() as accelerator:
        _ema_run(accelerator, use_ema=False)
        with pytest.raises(ValueError, match=r"holds the EMA weights \['unet_ema'\].*`--use_ema`"):
            accelerator.load_state(checkpoint)


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"decay": 0.999}, "`decay` 0.9999 there, 0.999 now"),
        ({"power": 2 / 3}, "`power` 0.75 there, 0.6666666666666666 now"),
        ({"inv_gamma": 2.0}, "`inv_gamma` 1.0 there, 2.0 now"),
    ],
)
def test_resuming_an_ema_with_other_settings_is_refused(tmp_path, changed, message):
    # the checkpoint's EMA state replaced the run's `--ema_max_decay`, `--ema_power` and `--ema_inv_gamma` in silence
    # (as diffusers' `EMAModel.load_state_dict` does): a run resumed to change its decay kept the old one
    checkpoint = str(tmp_path / "checkpoint-1")
    settings = {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75}
    with fresh_accelerator() as accelerator:
        _ema_run(accelerator, **settings)
        accelerator.save_state(checkpoint)
    with fresh_accelerator() as accelerator:
        _, ema = _ema_run(accelerator, **{**settings, **changed})
        with pytest.raises(ValueError) as error:
            accelerator.load_state(checkpoint)
        assert message in str(error.value) and "`--ema_max_decay`, `--ema_power` and `--ema_inv_gamma`" in str(
            error.value
        )
        assert (ema.decay, ema.power, ema.inv_gamma) == tuple(
            {**settings, **changed}[k] for k in ("decay", "power", "inv_gamma")
        )


def test_a_text_to_image_ema_resumes_a_checkpoint_of_the_earlier_warmup_schedule(tmp_path):
    # the text-to-image script's EMA now decays as diffusers' train_text_to_image.py (no warmup); its checkpoints of
    # earlier versions (warmup, power 0.75) were refused with a message naming `--ema_power`/`--ema_inv_gamma`, which
    # that script refuses: such a checkpoint could not be resumed at all. A run without warmup sets neither, so it
    # resumes with the checkpoint's schedule; its `--ema_max_decay` is still compared
    checkpoint = str(tmp_path / "checkpoint-1")
    with fresh_accelerator() as accelerator:
        _ema_run(accelerator, decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)  # the earlier schedule
        accelerator.save_state(checkpoint)
    with fresh_accelerator() as accelerator:
        _, ema = _ema_run(accelerator, decay=0.9999)
        accelerator.load_state(checkpoint)
        assert (ema.use_ema_warmup, ema.power) == (True, 0.75)  # the schedule the checkpoint was kept with
    with fresh_accelerator() as accelerator:
        _ema_run(accelerator, decay=0.999)
        with pytest.raises(ValueError, match=r"`decay` 0.9999 there, 0.999 now\): resume with the `--ema_max_d"):
            accelerator.load_state(checkpoint)


def test_a_file_named_like_the_checkpoint_being_saved_is_named_and_kept(tmp_path):
    # was renamed to a hidden leftover name, then rmtree raised NotADirectoryError
    (tmp_path / "checkpoint-4").write_text("notes")
    partial = tmp_path / ".checkpoint-4.partial"
    _touch(str(partial / "optimizer.bin"))
    with pytest.raises(ValueError, match=r"checkpoint-4'.*a file of that name.*not deleted"):
        publish_checkpoint(str(partial), str(tmp_path / "checkpoint-4"), 4)
    assert (tmp_path / "checkpoint-4").read_text() == "notes"


def test_pipeline_swap_folders_that_are_links_are_removed_never_followed(tmp_path):
    # a `.pipeline.new` or `.pipeline.old` linking elsewhere: the swap moved the target's entries in, or deleted and
    # moved files inside the target
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "model_index.json").write_text("theirs")
    os.symlink(elsewhere, out / ".pipeline.new")
    assert remove_leftovers(str(out)) == [".pipeline.new"]
    assert os.listdir(out) == [] and (elsewhere / "model_index.json").read_text() == "theirs"
    _pipeline_save("old")(str(out))  # a previous save, whose files the swap moves aside
    os.symlink(elsewhere, out / ".pipeline.old")
    publish_pipeline(str(out), _pipeline_save("new"))
    assert (elsewhere / "model_index.json").read_text() == "theirs" and os.listdir(elsewhere) == ["model_index.json"]
    assert _saved(str(out))["model_index.json"] == "new" and not os.path.lexists(out / ".pipeline.old")


@pytest.mark.parametrize(("scheduler", "warmup"), [("constant", None), ("cosine", "500 warm-up steps")])
def test_the_card_gives_warm_up_steps_only_for_a_schedule_that_warms_up(scheduler, warmup):
    # text-to-image defaults to diffusers' --lr_warmup_steps 500 under the constant schedule, which ignores it: the
    # card said "constant, 500 warm-up steps" of a run that never warmed up
    task = SimpleNamespace(
        vae_path=None, method="multi-stage", description=lambda: "Stages.", scheduler_config=None,
        usage=lambda repo_id: "",
    )  # fmt: skip
    args = _card_args(lr_scheduler=scheduler, lr_warmup_steps=500)
    text = model_card_text(args, task, steps=3, has_grid=False, mixed_precision="no")
    assert f"({scheduler}{f', {warmup}' if warmup else ''})" in text and ("warm-up" in text) == bool(warmup)


def test_a_checkpoint_resumes_only_as_sharded_as_the_run_that_wrote_it(tmp_path):
    # Accelerate reads an FSDP run's model and optimizer from its shards, an unsharded run's optimizer from one file:
    # either the other way round was a FileNotFoundError naming the file it looked for
    unsharded, sharded = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4)
    _touch(os.path.join(unsharded, "optimizer.bin"))
    for shards in ("pytorch_model_fsdp_0", "optimizer_0"):
        _touch(os.path.join(sharded, shards, "__0_0.distcp"))
    check_same_sharding(unsharded, sharded=False)
    check_same_sharding(sharded, sharded=True)
    with pytest.raises(ValueError, match="'.*checkpoint-4' was written by a sharded \\(FSDP\\) run"):
        check_same_sharding(sharded, sharded=False)
    with pytest.raises(ValueError, match="'.*checkpoint-2' was written by an unsharded run.*without the FSDP config"):
        check_same_sharding(unsharded, sharded=True)


def test_a_sharded_resume_checks_the_networks_config_before_accelerate_loads_its_shards(tmp_path):
    # Accelerate loads an FSDP run's shards before the load hook, where an unsharded run's network config is checked
    # (and the hook gets no model): a run with other model arguments of the same shapes (`--dropout`) resumed
    # silently, other shapes failed on the first tensor
    from diffusers import DDPMScheduler

    from diffusers_stages import MultiStageUNet2DModel, TimestepPartition

    partition = TimestepPartition([442, 631])
    MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(442, 631)).save_pretrained(tmp_path / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "noise_scheduler")
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type("FSDPMultiStageUNet2DModel", (FSDPModule, MultiStageUNet2DModel), {})  # as FSDP2 makes it
    sharded_class.__module__ = FSDPModule.__module__
    with torch.device("meta"):  # the checks read configs only
        same = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(442, 631))
        other = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(442, 631), dropout=0.1)
    same.__class__ = sharded_class
    check_sharded_resume(str(tmp_path), {"unet": same}, DDPMScheduler(), partition)
    with pytest.raises(ValueError, match="holds a `unet` of another configuration \\(`dropout` 0.0 there, 0.1 now\\)"):
        check_sharded_resume(str(tmp_path), {"unet": other}, DDPMScheduler(), partition)
    with pytest.raises(ValueError, match="another noise schedule"):
        check_sharded_resume(str(tmp_path), {"unet": same}, DDPMScheduler(prediction_type="v_prediction"), partition)


def test_a_checkpoint_whose_folder_name_is_not_its_step_is_refused(tmp_path):
    # the step resumed from is read from the folder name: a checkpoint renamed (or linked) under another step's name
    # resumed its optimizer and schedule at their own step but counted steps, data and checkpoints from the name's
    checkpoint = _checkpoint(tmp_path, 2)
    with open(os.path.join(checkpoint, COMPLETE_MARKER), "w", encoding="utf-8") as f:
        json.dump({"step": 2}, f)
    assert resolve_resume_checkpoint(str(tmp_path), "latest") == checkpoint
    os.rename(checkpoint, tmp_path / "checkpoint-5")
    for name in ("latest", "checkpoint-5"):
        with pytest.raises(ValueError, match=r"'.*checkpoint-5' holds the state of step 2 .* `checkpoint-2`"):
            resolve_resume_checkpoint(str(tmp_path), name)


def test_a_card_names_local_sources_by_their_folder_name_never_their_path(tmp_path, monkeypatch):
    # the card is published: it said "latent space of `/home/<user>/<project>/vae`" and "from the ExpertRoutingPipeline
    # `/home/<user>/...`" (a path on the training machine, which loads nothing for the card's reader); a Hub
    # repository id is kept as it is
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    local = tmp_path / "private" / "my-vae"
    local.mkdir(parents=True)
    task = SimpleNamespace(
        vae_path=str(local), method="multi-stage", description=lambda: "Stages.", scheduler_config=None,
        usage=lambda repo_id: [],
    )  # fmt: skip
    text = model_card_text(_card_args(), task, steps=3, has_grid=False, mixed_precision="no")
    assert "latent space of `my-vae`" in text and str(tmp_path) not in text
    text = model_card_text(_card_args(train_data_dir=None, dataset_name=str(local)), task, steps=3, has_grid=False,
                           mixed_precision="no")  # fmt: skip
    assert "- data: my-vae, 8x8" in text and str(tmp_path) not in text  # a local `--dataset_name` folder
    task.vae_path = "stabilityai/sd-vae-ft-mse"
    text = model_card_text(_card_args(train_data_dir=None, dataset_name="me/data"), task, steps=3, has_grid=False,
                           mixed_precision="no")  # fmt: skip
    assert "latent space of `stabilityai/sd-vae-ft-mse`" in text and "- data: me/data, 8x8" in text
    experts = [UNet2DModel(**TINY_UNET) for _ in range(2)]
    pipe = ExpertRoutingPipeline(ExpertRoutingModel(experts, stage_boundaries=[500]), DDIMScheduler())
    text = assembled_experts_card_text(_card_args(), pipe, has_grid=False, base=str(local) + os.sep)
    assert "from the ExpertRoutingPipeline `my-vae`" in text and str(tmp_path) not in text


def test_a_card_names_the_hub_model_it_was_fine_tuned_from_in_its_metadata(tmp_path, monkeypatch):
    # the card's metadata had no `base_model` (diffusers' training scripts write it), so the Hub listed a fine-tuned
    # model as a model of its own; a local source is no Hub model: named in the text only (`shared_name`)
    import yaml

    from diffusers_stages.training.hub import base_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "local-source").mkdir()
    assert base_model("me/source") == "me/source" and base_model(None) is None
    assert base_model(str(tmp_path / "local-source")) is None and base_model("../x") is None
    monkeypatch.chdir(tmp_path)
    assert base_model("local-source") is None  # a folder here, though its name could be a repository's
    for source, expected in (("me/source", {"base_model": "me/source"}), (str(tmp_path / "local-source"), {})):
        out = tmp_path / "out"
        _touch(str(out / "model_index.json"))
        push_output_folder(str(out), "me/model", "A card.", [], api=LocalHubApi(str(tmp_path / "hub")),
                           class_conditional=False, base_model=base_model(source))  # fmt: skip
        card = (tmp_path / "hub" / "me" / "model" / "README.md").read_text()
        metadata = yaml.safe_load(card.split("---")[1])
        assert {k: v for k, v in metadata.items() if k == "base_model"} == expected
        assert metadata["library_name"] == "diffusers" and str(tmp_path) not in card


def test_the_cards_stage_table_writes_each_interval_in_its_units():
    # sigma stages are (b_{s-1}, b_s]: the card wrote [b_{s-1}, b_s), the timestep convention
    from diffusers_stages import TimestepPartition

    assert stage_table(TimestepPartition([2.5], units="sigma")).splitlines()[2:] == [
        "| 0 | (0, 2.5] |",
        "| 1 | (2.5, inf) |",
    ]
    assert stage_table(TimestepPartition([500])).splitlines()[2:] == ["| 0 | [0, 500) |", "| 1 | [500, 1000) |"]


@pytest.mark.parametrize("kind", ["config", "shapes"])
def test_the_ema_of_another_model_is_refused_naming_what_differs(tmp_path, kind):
    """`_load_ema` refuses an EMA folder saved for another model: its config's differing options by name (as the
    other resume checks say them, "`key` THEN there, NOW now"), or "other parameter shapes" where the configs agree
    but the EMA's parameters do not (a `_`-private key is no difference); ``ema`` is left as it was."""
    from diffusers.training_utils import EMAModel

    from diffusers_stages.training.checkpointing import _load_ema

    def ema_of(model):
        return EMAModel(model.parameters(), model_cls=UNet2DModel, model_config=model.config)

    torch.manual_seed(0)
    saved = UNet2DModel(**TINY_UNET)
    ema_of(saved).save_pretrained(str(tmp_path / "ema"))
    now = UNet2DModel(**TINY_UNET, dropout=0.1)
    ema = ema_of(now)
    if kind == "shapes":  # the config of the saved model, the parameters of another
        ema = EMAModel(now.parameters(), model_cls=UNet2DModel, model_config=saved.config)
        ema.shadow_params = ema.shadow_params[:-1]
    before = [p.clone() for p in ema.shadow_params]
    message = "`dropout` 0.0 there, 0.1 now" if kind == "config" else "other parameter shapes"
    with pytest.raises(
        ValueError, match=rf"The EMA weights at .*ema do not match the model being trained \({message}\)"
    ):
        _load_ema(ema, str(tmp_path / "ema"))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow_params))


@pytest.mark.parametrize(
    ("tags", "class_conditional", "pipeline_tag"),
    [
        ([], False, "unconditional-image-generation"),
        (["text-to-image"], False, "text-to-image"),
        ([], True, None),  # the Hub has no class-conditional task: the tag only
    ],
)
def test_the_card_names_the_hub_task_of_the_model(tmp_path, monkeypatch, tags, class_conditional, pipeline_tag):
    # the card's metadata had no `pipeline_tag`, and the Hub cannot infer one for the package's pipeline classes: a
    # pushed unconditional (or text-to-image) model was missing from the Hub's task listing and filters
    import yaml

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    card = open(write_model_card(str(tmp_path), "A card.", tags, class_conditional=class_conditional)).read()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata.get("pipeline_tag") == pipeline_tag and metadata["library_name"] == "diffusers"


def test_push_leaves_out_the_temporary_folders_of_a_pipeline_save(tmp_path, monkeypatch):
    # `publish_pipeline` deletes its `.pipeline.old` (the previous save) with errors ignored: one left behind (a file
    # in use, a network disk) was uploaded with the new pipeline, a second copy of the weights in the repository
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors",
                 ".pipeline.old/unet/diffusion_pytorch_model.safetensors", ".pipeline.new/model_index.json",
                 ".pipeline.partial/unet/config.json"):  # fmt: skip
        _touch(str(out / name))
    push_output_folder(
        str(out), "me/model", "card", [], api=LocalHubApi(str(tmp_path / "hub")), class_conditional=False
    )
    pushed = tmp_path / "hub" / "me" / "model"
    files = sorted(os.path.relpath(os.path.join(r, f), pushed) for r, _, fs in os.walk(pushed) for f in fs)
    assert files == ["README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors"]


def _source_folder(root, seed: int = 0) -> str:
    """A tiny local pipeline folder (a UNet2DModel and a scheduler) to fine-tune, its weights drawn with ``seed``."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(seed)
    folder = os.path.join(root, "source")
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


def _checkpoint_of(root, source: str | None, record: bool = True) -> str:
    """A complete checkpoint whose `pretrained_source.json` names ``source`` (with its identity record, or as a
    version that wrote none without ``record``)."""
    folder = _checkpoint(root, 1)
    entry = {"pretrained_model_name_or_path": source}
    if record:
        entry["source_files"] = source_identity(source)
    with open(os.path.join(folder, SOURCE_FILE), "w", encoding="utf-8") as f:
        json.dump(entry, f)
    return folder


def test_resuming_on_a_source_whose_weights_were_replaced_is_refused_naming_the_file(tmp_path):
    source = _source_folder(tmp_path / "a")
    checkpoint = _checkpoint_of(tmp_path / "run", source)
    assert check_same_source_files(checkpoint, source) is None  # the same folder
    moved = str(tmp_path / "moved")
    os.rename(source, moved)
    assert check_same_source_files(checkpoint, moved) is None  # the same files elsewhere
    # other weights of the same shapes (another fine-tune of the same model) saved over the source's
    other = _source_folder(tmp_path / "b", seed=1)
    os.replace(os.path.join(other, "unet", "diffusion_pytorch_model.safetensors"),
               os.path.join(moved, "unet", "diffusion_pytorch_model.safetensors"))  # fmt: skip
    with pytest.raises(ValueError) as error:
        check_same_source_files(checkpoint, moved)
    assert "`--resume_from_checkpoint`" in str(error.value)
    assert "unet/diffusion_pytorch_model.safetensors" in str(error.value)
    # a variant's weights or a README saved beside the record are not read: resuming goes on
    os.replace(os.path.join(moved, "unet", "diffusion_pytorch_model.safetensors"),
               os.path.join(moved, "unet", "diffusion_pytorch_model.fp16.safetensors"))  # fmt: skip
    other = _source_folder(tmp_path / "d")
    for name in ("diffusion_pytorch_model.safetensors", "README.md"):
        shutil.copyfile(os.path.join(other, "unet", "diffusion_pytorch_model.safetensors") if name != "README.md"
                        else os.path.join(other, "model_index.json"), os.path.join(moved, "unet", name))  # fmt: skip
    checkpoint = _checkpoint_of(tmp_path / "run3", moved)
    os.remove(os.path.join(moved, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(ValueError, match=re.escape("unet/diffusion_pytorch_model.fp16.safetensors was removed")):
        check_same_source_files(checkpoint, moved)  # (removed: named, though not read)
    checkpoint = _checkpoint_of(tmp_path / "run4", moved)
    shutil.copyfile(os.path.join(other, "model_index.json"), os.path.join(moved, "unet", "NOTES.md"))
    shutil.copyfile(os.path.join(other, "unet", "diffusion_pytorch_model.safetensors"),
                    os.path.join(moved, "unet", "diffusion_pytorch_model.bf16.safetensors"))  # fmt: skip
    assert check_same_source_files(checkpoint, moved) is None
    shutil.copyfile(os.path.join(other, "unet", "config.json"), os.path.join(moved, "unet", "extra_config.json"))
    with pytest.raises(ValueError, match=re.escape("unet/extra_config.json was added")):
        check_same_source_files(checkpoint, moved)
    # a config changed, or a component's file removed, is named too
    shutil_source = _source_folder(tmp_path / "c")
    checkpoint = _checkpoint_of(tmp_path / "run2", shutil_source)
    config = os.path.join(shutil_source, "scheduler", "scheduler_config.json")
    with open(config, encoding="utf-8") as f:
        values = json.load(f)
    with open(config, "w", encoding="utf-8") as f:
        json.dump({**values, "beta_end": 0.03}, f)
    with pytest.raises(ValueError, match=re.escape("scheduler/scheduler_config.json")):
        check_same_source_files(checkpoint, shutil_source)


def test_a_checkpoint_without_the_source_record_resumes_with_a_warning(tmp_path):
    source = _source_folder(tmp_path)
    checkpoint = _checkpoint_of(tmp_path / "run", source, record=False)
    warning = check_same_source_files(checkpoint, source)
    assert warning is not None and "cannot check" in warning and source in warning
    # a run from the arguments, or a checkpoint of a version that wrote no source at all, is not warned about
    assert check_same_source_files(_checkpoint_of(tmp_path / "scratch", None), None) is None
    assert check_same_source_files(_checkpoint(tmp_path / "old", 1), None) is None


def test_the_source_record_reads_large_files_in_samples(tmp_path):
    # a weight file of several GB is fingerprinted from its header and samples, not read whole
    big = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    os.makedirs(big.parent)
    with open(tmp_path / "model_index.json", "w", encoding="utf-8") as f:
        json.dump({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}, f)
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse
    record = source_identity(str(tmp_path))
    assert set(record) == {"model_index.json", "unet/diffusion_pytorch_model.safetensors"}
    assert record["unet/diffusion_pytorch_model.safetensors"]["size"] == 1 << 30


@pytest.mark.parametrize("fails", [False, True])
def test_only_the_main_process_creates_the_repository_and_every_process_learns_its_answer(
    tmp_path, monkeypatch, fails
):
    # every process of a multi-process run created the repository (diffusers' scripts create it on the main process
    # only); the others now wait for the main process's answer: its repository id, or its error, which stops them too
    from diffusers_stages.training import hub

    creates, sent = [], []

    def create_repo(repo_id, **kwargs):
        creates.append(repo_id)
        if fails:
            raise ConnectionError("the network is down")
        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def broadcast_object_list(objects, from_process=0):  # the main process's objects reach every process
        if not sent:
            sent.extend(objects)
        objects[:] = sent
        return objects

    monkeypatch.setattr(hub, "create_repo", create_repo)
    monkeypatch.setattr(hub, "broadcast_object_list", broadcast_object_list)
    args = argparse.Namespace(hub_model_id="tiny", hub_local_dir=None, hub_private_repo=None, hub_token=None)
    answers = []
    for index in range(2):  # the main process reaches the exchange first: the others wait there for it
        process = SimpleNamespace(is_main_process=index == 0, num_processes=2, process_index=index)
        try:
            answers.append(hub.create_hub_repo(args, process))
        except ValueError as error:
            answers.append(str(error))
    assert creates == ["tiny"]
    if fails:
        assert answers[0] == answers[1] and "cannot create the Hub repository `--hub_model_id` 'tiny'" in answers[0]
        assert "ConnectionError: the network is down" in answers[1]
    else:
        assert answers == ["me/tiny", "me/tiny"]
    if not fails:  # without an accelerator (`--assemble_experts`, one process) it creates the repository itself
        creates.clear()
        assert hub.create_hub_repo(args) == "me/tiny" and creates == ["tiny"]


@pytest.mark.parametrize("name", ["../outside", "/", "sub/dir"])
def test_the_source_record_reads_no_folder_a_component_name_leads_to_outside_the_source(tmp_path, name):
    # a model_index.json entry is hostile input: "../x" (or "/") made the record hash files outside the source
    # (the whole file system for "/") before any loader saw the name
    source = _source_folder(tmp_path / "a")
    outside = tmp_path / "a" / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the source's")
    os.makedirs(os.path.join(source, "sub", "dir"), exist_ok=True)
    with open(os.path.join(source, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    index[name] = ["diffusers", "UNet2DModel"]
    with open(os.path.join(source, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="component folder name"):
        source_identity(source)


def test_the_source_record_reads_no_file_a_link_in_a_component_sub_folder_leads_to_outside_the_source(tmp_path):
    # the component folder's own files are checked (component_folder), but the record walks its sub-folders too
    # (an expert container's expert_0/), and a link there to any file of the user's was read and hashed into every
    # checkpoint's record
    source = _source_folder(tmp_path / "a")
    secret = tmp_path / "secret.txt"
    secret.write_text("not the source's")
    os.makedirs(os.path.join(source, "unet", "notes"))
    os.symlink(secret, os.path.join(source, "unet", "notes", "linked.txt"))
    with pytest.raises(ValueError, match="'linked.txt' in .*notes links to .*outside the folder"):
        source_identity(source)


class _RunsCode:  # a pickle whose loading calls a function of its choice (here: makes a folder)
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_resuming_refuses_a_random_state_file_that_would_run_code(tmp_path):
    # Accelerate versions the package allows (accelerate>=1.0, up to the 1.6 line) read `random_states_*.pkl` with
    # `weights_only=False`: a hostile checkpoint's random-state file ran code of its choice on resume. The checks that
    # run before Accelerate reads a file now refuse a `.pkl` that does not load weights-only (Accelerate's own files
    # do: checked by resuming a real checkpoint first)
    import pickle

    from diffusers_stages.training.checkpointing import register_checkpoint_hooks

    with fresh_accelerator() as accelerator:
        network = UNet2DModel(**TINY_UNET)
        model, optimizer = accelerator.prepare(network, torch.optim.AdamW(network.parameters()))
        register_checkpoint_hooks(accelerator, ["unet"], {})
        checkpoint = tmp_path / "checkpoint-1"
        accelerator.save_state(str(checkpoint))
        accelerator.load_state(str(checkpoint))  # Accelerate's own random states load
        marker = tmp_path / "code-ran"
        with open(checkpoint / "random_states_0.pkl", "wb") as file:
            pickle.dump(_RunsCode(str(marker)), file)
        with pytest.raises(ValueError, match=r"'random_states_0.pkl' in .* does not load weights-only"):
            accelerator.load_state(str(checkpoint))
        assert not marker.exists()
        assert model is not None and optimizer is not None


def test_a_training_card_gives_the_process_count_and_the_total_batch():
    # the card said "batch 4 per device x 2 accumulation, AdamW lr 0.0001 x total batch" for a run on any number of
    # processes: the total batch, and with `--scale_lr` the learning rate trained with, could not be read from it
    task = SimpleNamespace(
        vae_path=None, method="multi-stage", description=lambda: "Stages.", scheduler_config=None,
        usage=lambda repo_id: "",
    )  # fmt: skip
    args = _card_args(gradient_accumulation_steps=2, scale_lr=True)
    text = model_card_text(args, task, steps=3, has_grid=False, mixed_precision="no", num_processes=2)
    assert "- 3 optimisation steps, batch 4 per device x 2 processes x 2 accumulation (16 per step), AdamW lr " in text
    assert "AdamW lr 0.0001 x 16 (`--scale_lr`) (constant)" in text
    text = model_card_text(_card_args(), task, steps=3, has_grid=False, mixed_precision="no")
    assert "batch 4 per device x 1 process x 1 accumulation (4 per step), AdamW lr 0.0001 (constant)" in text
