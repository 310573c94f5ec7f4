"""Checkpoint folders (latest, pruning) and the Hub push: file selection and model card, offline."""

import os

import huggingface_hub.constants
import pytest

from diffusers_stages.training import LocalHubApi, push_output_folder
from diffusers_stages.training.checkpointing import checkpoint_folders, prune_checkpoints, resolve_resume_checkpoint


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def test_latest_and_pruning(tmp_path):
    for step in (10, 2, 100):
        os.makedirs(tmp_path / f"checkpoint-{step}")
    assert resolve_resume_checkpoint(str(tmp_path), "latest").endswith("checkpoint-100")
    assert resolve_resume_checkpoint(str(tmp_path), "checkpoint-2").endswith("checkpoint-2")
    prune_checkpoints(str(tmp_path), total_limit=2)  # room for one more: keep the newest one
    assert [os.path.basename(f) for f in checkpoint_folders(str(tmp_path))] == ["checkpoint-100"]
    assert resolve_resume_checkpoint(str(tmp_path / "none"), "latest") is None
    with pytest.raises(ValueError, match="`--resume_from_checkpoint` 'checkpoint-7' is not a checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-7")


def test_push_selects_files_like_the_hub_and_writes_a_card(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    for name in ("model_index.json", "unet/config.json", "sample_grid.png", "checkpoint-5/optimizer.bin",
                 "logs/run/events.out", "samples/step_000005.png"):  # fmt: skip
        _touch(str(out / name))
    push_output_folder(
        str(out), "me/model", "My *description*.", ["multi-stage"], api=LocalHubApi(str(tmp_path / "hub"))
    )
    pushed = tmp_path / "hub" / "me" / "model"
    files = sorted(os.path.relpath(os.path.join(r, f), pushed) for r, _, fs in os.walk(pushed) for f in fs)
    assert files == ["README.md", "model_index.json", "sample_grid.png", "unet/config.json"]
    card = (pushed / "README.md").read_text()
    assert "My *description*." in card and "multi-stage" in card and "library_name: diffusers" in card
