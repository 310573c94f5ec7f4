"""Accelerate checkpoints whose model weights are `save_pretrained` folders (safetensors), and resuming from them."""

from __future__ import annotations

import os
import re
import shutil

from accelerate import Accelerator
from diffusers.training_utils import EMAModel

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(output_dir: str) -> list[str]:
    """The ``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def checkpoint_step(folder: str) -> int:
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(folder)))
    if match is None:
        raise ValueError(f"`--resume_from_checkpoint` must name a `checkpoint-<step>` folder, got {folder!r}.")
    return int(match.group(1))


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """``"latest"`` -> the newest checkpoint in ``output_dir`` (None when there is none yet), a path -> that path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        folders = checkpoint_folders(output_dir)
        return folders[-1] if folders else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isdir(path):
        raise ValueError(f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is not a checkpoint folder.")
    checkpoint_step(path)
    return path


def prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
    """Delete the oldest checkpoints so that saving one more keeps at most ``total_limit``."""
    if total_limit is None:
        return
    folders = checkpoint_folders(output_dir)
    for folder in folders[: max(0, len(folders) - total_limit + 1)]:
        shutil.rmtree(folder)


def register_checkpoint_hooks(accelerator: Accelerator, names: list[str], emas: dict[str, EMAModel]) -> None:
    """Make `accelerator.save_state` / `load_state` write and read each network as ``<dir>/<name>`` and its EMA as
    ``<dir>/<name>_ema`` (`save_pretrained` folders), instead of anonymous state dicts."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for name, model in zip(names, models):
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, name))
            for name, ema in emas.items():
                ema.save_pretrained(os.path.join(output_dir, f"{name}_ema"))
        weights.clear()  # the folders above hold the weights; accelerate must not save them again

    def load_hook(models, input_dir):
        for name, model in zip(names, models):
            model = accelerator.unwrap_model(model)
            loaded = type(model).from_pretrained(os.path.join(input_dir, name))
            model.load_state_dict(loaded.state_dict())
            del loaded
        for name, ema in emas.items():
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, f"{name}_ema"), ema.model_cls)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
