"""Accelerate checkpoints whose model weights are `save_pretrained` folders (safetensors), and resuming from them.

A checkpoint is written into a hidden temporary folder, completed with a marker file written last, and only then
renamed to ``checkpoint-<step>``; older checkpoints are pruned after that. A kill at any moment therefore leaves the
last complete checkpoint in place, and the leftovers (hidden folders) are removed by the next run.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.utils.constants import FSDP_MODEL_NAME
from diffusers.training_utils import EMAModel

from ..models.loading import check_folder_files, check_name, component_folder, load_scheduler, load_strictly, read_json
from ..partition import TimestepPartition
from .sharding import gathered_networks, plain_class

# the step as the loop writes it: ASCII digits without a leading zero (`\d` and `int` would take "checkpoint-01" and
# other scripts' digits for a second folder of the same step)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(0|[1-9][0-9]*)$")
COMPLETE_MARKER = "checkpoint_complete.json"  # written last, before the checkpoint gets its name
# what a `checkpoint-<step>` folder without the marker is: a save writes a hidden folder and names it only once it is
# marked complete, so an interrupted save leaves no such folder (the next run removes the hidden one)
UNMARKED = (
    f"no {COMPLETE_MARKER}, which these scripts write last, before a checkpoint gets its name: another program wrote "
    "it (diffusers' own training scripts, for one, whose checkpoints do not resume here), or a diffusers-stages "
    "version that did not mark checkpoints, or it was copied in part"
)
# in the run's last checkpoint (its last step's, or an earlier one where that step has none) once the run's final
# outputs are written, holding their step: resuming it to that step has nothing left to do
FINISHED_MARKER = "training_finished.json"
NOISE_SCHEDULER_FOLDER = "noise_scheduler"  # the training scheduler's config: resuming checks the schedule is the same
PARTITION_FILE = "stage_partition.json"  # the stages the networks train on: resuming checks they are the same
SOURCE_FILE = "pretrained_source.json"  # the folder fine-tuned, if any: resuming checks the run fine-tunes one too
LATENT_SPACE_FILE = "latent_space.json"  # the VAE whose latents the networks train on: resuming checks it is the same
CLASS_NAMES_FILE = "class_names.json"  # the classes of the labels trained on: resuming checks they are the same
LEFTOVER_PATTERN = re.compile(r"^\.checkpoint-\d+\.(partial|deleted)$")
# the final pipeline is written into PIPELINE_PARTIAL, renamed to PIPELINE_NEW once complete (from then on the swap
# is finished, by the next run if this one is killed), and swapped in entry by entry, the old entries kept in
# PIPELINE_OLD until every new one is in place
PIPELINE_PARTIAL, PIPELINE_NEW, PIPELINE_OLD = ".pipeline.partial", ".pipeline.new", ".pipeline.old"


def checkpoint_folders(output_dir: str) -> list[str]:
    """The ``checkpoint-<step>`` folders in ``output_dir``, oldest first (complete or not); a file of such a name is
    none (never resumed from nor pruned)."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def is_complete(folder: str) -> bool:
    """Whether ``folder`` is a checkpoint whose writing finished (its completeness marker exists)."""
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def checkpoint_step(folder: str) -> int:
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(folder)))
    if match is None:
        raise ValueError(f"`--resume_from_checkpoint` must name a `checkpoint-<step>` folder, got {folder!r}.")
    return int(match.group(1))


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """``"latest"`` -> the newest *complete* checkpoint in ``output_dir`` (None when there is no checkpoint yet), a
    name -> that checkpoint of ``output_dir``, a path -> that path. A checkpoint without its completeness marker
    (``UNMARKED``) is never resumed from: ``"latest"`` skips it, an explicit path to it is a `ValueError`, as is
    ``"latest"`` when no checkpoint is complete."""
    if resume_from_checkpoint is None:
        return None
    if not resume_from_checkpoint.strip():  # (an unset shell variable): not the output folder itself
        raise ValueError(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r} names no checkpoint: give `latest`, a checkpoint "
            "of `--output_dir` by name (`checkpoint-500`) or a checkpoint folder's path, or leave the option out."
        )
    folders = checkpoint_folders(output_dir)
    complete = [folder for folder in folders if is_complete(folder)]
    if resume_from_checkpoint == "latest":
        if folders and not complete:
            raise ValueError(
                f"`--resume_from_checkpoint latest`: no checkpoint in {output_dir!r} is complete ({_names(folders)}: "
                f"{UNMARKED}). Start again without `--resume_from_checkpoint`, with `--overwrite_output_dir`."
            )
        return _check_marked_step(complete[-1]) if complete else None
    # a bare name is a checkpoint of `output_dir` (as in diffusers' scripts), else of the current folder; a path is
    # that folder, else one inside `output_dir`
    path, inside = resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isdir(path) or (os.path.basename(path) == path and os.path.isdir(inside)):
        path = inside
    if not os.path.isdir(path):
        raise ValueError(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is not a checkpoint folder (complete checkpoints "
            f"in {output_dir!r}: {_names(complete) or 'none'})."
        )
    checkpoint_step(path)
    if not is_complete(path):
        raise ValueError(
            f"`--resume_from_checkpoint` {path!r} is incomplete ({UNMARKED}). Complete checkpoints in "
            f"{output_dir!r}: {_names(complete) or 'none'}."
        )
    return _check_marked_step(path)


def _marked(checkpoint: str, key: str, marker: str = COMPLETE_MARKER) -> int | None:
    """The integer ``checkpoint``'s ``marker`` (its completeness marker, or `FINISHED_MARKER`) records as ``key``
    (``step``, ``num_processes``); None where it records none (a marker written by hand or by an older version, not
    JSON, or not an object)."""
    try:
        with open(os.path.join(checkpoint, marker), encoding="utf-8") as f:
            value = json.load(f).get(key)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_marked_step(checkpoint: str) -> str:
    """``checkpoint``, whose name must give the step its completeness marker records (the step resumed from is read
    from the name: a checkpoint renamed or linked under another step's name is refused). A marker that records no
    step (written by hand, or by an older version) is not checked."""
    marked, step = _marked(checkpoint, "step"), checkpoint_step(checkpoint)
    if marked is not None and marked != step:
        raise ValueError(
            f"`--resume_from_checkpoint`: {checkpoint!r} holds the state of step {marked} (its {COMPLETE_MARKER}), "
            f"not of step {step}: it was renamed or linked under another step's name. Give it back its name "
            f"`checkpoint-{marked}`, or resume from another checkpoint."
        )
    return checkpoint


def check_same_sharding(checkpoint: str, sharded: bool) -> None:
    """Refuse to resume a sharded (FSDP) run's checkpoint without FSDP, or the other way round: Accelerate writes an
    FSDP run's model and optimizer as its shards (``pytorch_model_fsdp*``), which only an FSDP run reads, and an
    unsharded run's optimizer as one file, which an FSDP run does not read."""
    written_sharded = any(name.startswith(FSDP_MODEL_NAME) for name in os.listdir(checkpoint))
    if written_sharded and not sharded:
        raise ValueError(
            f"`--resume_from_checkpoint` {checkpoint!r} was written by a sharded (FSDP) run: its model and optimizer "
            "states are Accelerate's shards, which only an FSDP run reads. Resume it with the launch that wrote it "
            "(`accelerate launch --config_file examples/accelerate_configs/fsdp.yaml ...`)."
        )
    if sharded and not written_sharded:
        raise ValueError(
            f"`--resume_from_checkpoint` {checkpoint!r} was written by an unsharded run, which an FSDP run cannot "
            "resume (its optimizer state is not sharded): resume it without the FSDP config."
        )


def check_same_process_count(checkpoint: str, num_processes: int) -> None:
    """Refuse to resume ``checkpoint`` on another number of processes than the run that wrote it (its completeness
    marker records it; one that does not, written by an older version, is not checked): Accelerate steps the
    learning-rate schedule once per process at each optimisation step, so the schedule it holds is that count times
    its step along, and the data each process has seen are that run's share."""
    written = _marked(checkpoint, "num_processes")
    if written is not None and written != num_processes:
        plural = "process" if written == 1 else "processes"
        raise ValueError(
            f"`--resume_from_checkpoint` {checkpoint!r} was written by a run of {written} {plural}, resumed on "
            f"{num_processes}: its learning-rate schedule and data position count {written} {plural} (Accelerate "
            f"steps the schedule once per process), so it would go on at another point of the schedule. Resume it "
            f"on {written} {plural} (`accelerate launch --num_processes {written} ...`), or train into a new "
            "`--output_dir`."
        )


def skipped_checkpoints(resume_path: str) -> list[str]:
    """The incomplete checkpoints newer than ``resume_path`` beside it (which ``"latest"`` passed over)."""
    step = checkpoint_step(resume_path)
    folders = checkpoint_folders(os.path.dirname(resume_path))
    return [folder for folder in folders if checkpoint_step(folder) > step and not is_complete(folder)]


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None, replaced: list[str] | None = None
) -> str:
    """`accelerator.save_state` as ``output_dir/checkpoint-<step>``, all or nothing, then prune to ``total_limit``.

    Every process writes into the temporary ``.checkpoint-<step>.partial``; once all have, the main process writes
    the completeness marker, renames the folder into place and only then deletes the oldest checkpoints.

    ``replaced`` are a former run's checkpoints (`--overwrite_output_dir`), deleted with this first checkpoint of the
    new run: those of later steps (which ``latest`` would take) hidden once it is complete and deleted once it is in
    place, the others once it is in place, so that a kill at any moment leaves ``latest`` one run's checkpoint, and
    never removes this one (a kill while deleting them leaves it named).
    """
    replaced = replaced or []
    path = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)  # left by a run killed at this very step
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)
    except BaseException:  # (a full disk, say): as `publish_pipeline`, no partial folder is left behind
        if accelerator.is_main_process:
            _remove(partial, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # the later ones hidden before this one is named, deleted after: a kill while deleting them keeps this one
        later = [folder for folder in replaced if checkpoint_step(folder) > step]
        hidden = [_hide_checkpoint(folder) for folder in later if os.path.isdir(folder) or os.path.islink(folder)]
        publish_checkpoint(partial, path, step, accelerator.num_processes)
        for folder in hidden:
            _remove(folder)
        discard_checkpoints([folder for folder in replaced if checkpoint_step(folder) < step])
        prune_checkpoints(output_dir, total_limit, saved_step=step)
    accelerator.wait_for_everyone()
    return path


def publish_checkpoint(partial: str, path: str, step: int, num_processes: int = 1) -> None:
    """Mark ``partial`` complete (the marker is its last file, holding the step and the ``num_processes`` that wrote
    it: `check_same_process_count`) and rename it to ``path``, replacing a folder there (or a link, unlinked). A file
    of that name is no checkpoint: a `ValueError` names it, and it is left as it is."""
    if os.path.lexists(path) and not os.path.islink(path) and not os.path.isdir(path):
        raise ValueError(
            f"Cannot save checkpoint {path!r}: a file of that name is in the output folder and is no checkpoint "
            "folder (it was not deleted). Move it away, then resume with `--resume_from_checkpoint latest`."
        )
    with open(os.path.join(partial, COMPLETE_MARKER), "w", encoding="utf-8") as f:
        json.dump({"step": step, "num_processes": num_processes}, f)
    # one of the same step (an older run's, or an interrupted one): ours replaces it. It is hidden, ours renamed into
    # place, and only then is it deleted: a kill while deleting it leaves ours under its name, not as a leftover
    replaced = _hide_checkpoint(path) if os.path.lexists(path) else None
    os.rename(partial, path)
    if replaced is not None:
        _remove(replaced)


def prune_checkpoints(output_dir: str, total_limit: int | None, saved_step: int | None = None) -> None:
    """Keep the newest ``total_limit`` complete checkpoints: delete the older ones, and the incomplete ones older
    than the newest complete checkpoint (run after saving one, never before).

    ``saved_step`` is the step of the checkpoint just saved: it is the newest of the run, kept whatever lies beyond
    it (later checkpoints of a run resumed from an earlier one, left as they are until this run replaces them)."""
    if total_limit is None:
        return
    folders = checkpoint_folders(output_dir)
    if saved_step is not None:
        folders = [folder for folder in folders if checkpoint_step(folder) <= saved_step]
    keep = [folder for folder in folders if is_complete(folder)][-total_limit:]
    if not keep:
        return
    newest = checkpoint_step(keep[-1])
    for folder in folders:
        if folder not in keep and checkpoint_step(folder) < newest:
            discard_checkpoint(folder)


def remove_leftovers(output_dir: str) -> list[str]:
    """Delete the hidden folders a killed run left in ``output_dir`` (an unfinished checkpoint, one being deleted, an
    unfinished final pipeline), after finishing the swap of a complete final pipeline (`publish_pipeline`) that a
    kill interrupted; returns their names."""
    if not os.path.isdir(output_dir):
        return []
    if _is_folder(os.path.join(output_dir, PIPELINE_NEW)):
        _swap_in_pipeline(output_dir)
    leftovers = (PIPELINE_PARTIAL, PIPELINE_NEW, PIPELINE_OLD)
    names = sorted(name for name in os.listdir(output_dir) if LEFTOVER_PATTERN.match(name) or name in leftovers)
    for name in names:
        _remove(os.path.join(output_dir, name), ignore_errors=True)
    return names


def publish_pipeline(output_dir: str, write: Callable[[str], None]) -> None:
    """Have ``write(folder)`` save the trained pipeline (``save_pretrained``), all or nothing, into ``output_dir``:
    into the hidden ``PIPELINE_PARTIAL`` folder first, then swapped in. Only the entries the new save holds are
    replaced (checkpoints, logs and samples beside them stay), and the previous save's are deleted only once every
    new one is in place. A failure while writing leaves the previous save as it was (the partial folder deleted; a
    kill leaves it for `remove_leftovers`). The swap moves the top-level files (``model_index.json``, which marks a
    pipeline folder) out first and in last, so that a kill during the swap never leaves a mix of the two saves that
    loads as a pipeline; the next run's `remove_leftovers` finishes it."""
    partial, new = os.path.join(output_dir, PIPELINE_PARTIAL), os.path.join(output_dir, PIPELINE_NEW)
    if _is_folder(new):  # a complete save a killed run did not finish swapping in: finish it first
        _swap_in_pipeline(output_dir)
    _remove(partial, ignore_errors=True)  # left by a run killed while writing
    os.makedirs(partial)
    try:
        write(partial)
    except BaseException:
        _remove(partial, ignore_errors=True)
        raise
    os.rename(partial, new)  # complete: from here on the swap is finished, by this run or the next
    _swap_in_pipeline(output_dir)


def _swap_in_pipeline(output_dir: str) -> None:
    """Move the entries of ``PIPELINE_NEW`` into ``output_dir``, the ones they replace into ``PIPELINE_OLD``, then
    delete both folders. Idempotent: an entry still in ``PIPELINE_NEW`` has not replaced its namesake yet, so a
    swap that a kill interrupted is finished by running this again."""
    new, old = os.path.join(output_dir, PIPELINE_NEW), os.path.join(output_dir, PIPELINE_OLD)
    if os.path.lexists(old) and not _is_folder(old):  # a link (or file) in its place is removed, never followed
        _remove_entry(old)
    os.makedirs(old, exist_ok=True)
    entries = sorted(os.listdir(new), key=lambda name: (os.path.isdir(os.path.join(new, name)), name))  # files first
    for name in entries:  # out: the previous save's files first, its folders after
        target = os.path.join(output_dir, name)
        if os.path.lexists(target):
            _remove_entry(os.path.join(old, name))
            os.rename(target, os.path.join(old, name))
    for name in reversed(entries):  # in: folders first, files (model_index.json) last
        os.rename(os.path.join(new, name), os.path.join(output_dir, name))
    _remove(new, ignore_errors=True)
    _remove(old, ignore_errors=True)


def _is_folder(path: str) -> bool:
    """Whether ``path`` is a folder of its own, not a link to one (a link is never followed into)."""
    return os.path.isdir(path) and not os.path.islink(path)


def _remove_entry(path: str) -> None:
    """Delete the file, link or folder ``path`` if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def mark_finished(output_dir: str, step: int, last: str | None = None) -> None:
    """Record that the final outputs in ``output_dir`` are those of step ``step``: in ``last``, the run's last
    checkpoint (of that step, or the one the run trained its last steps from), if it is a complete checkpoint of
    ``output_dir``, and in no other (their outputs were replaced, so resuming one of them writes its outputs again)."""
    own = last is not None and is_complete(last)
    own = own and os.path.samefile(os.path.dirname(os.path.abspath(last)), output_dir)
    for folder in checkpoint_folders(output_dir):
        if not (own and os.path.samefile(folder, last)) and is_finished(folder):
            os.remove(os.path.join(folder, FINISHED_MARKER))
    if own:  # resuming from it to ``step`` has nothing left to do
        with open(os.path.join(last, FINISHED_MARKER), "w", encoding="utf-8") as f:
            json.dump({"step": step}, f)


def is_finished(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, FINISHED_MARKER))


def finished_step(checkpoint: str) -> int | None:
    """The step of the final outputs written after ``checkpoint`` (`mark_finished`), None where there are none; a
    marker that records no step (an earlier version's, or one written by hand) is that of the checkpoint's own step."""
    if not is_finished(checkpoint):
        return None
    step = _marked(checkpoint, "step", FINISHED_MARKER)
    return checkpoint_step(checkpoint) if step is None else step


def discard_checkpoint(folder: str) -> None:
    """Delete a checkpoint folder without ever leaving a half-deleted one under its name: hide it, then delete. A
    link named like a checkpoint (one moved to another disk) is removed as a link: what it points to is left."""
    _remove(_hide_checkpoint(folder))


def _hide_checkpoint(folder: str) -> str:
    """Rename the checkpoint ``folder`` (or a link) to its hidden ``.checkpoint-<step>.deleted`` name, which
    `remove_leftovers` deletes if it is not deleted now; returns that name."""
    hidden = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.deleted")
    _remove(hidden, ignore_errors=True)
    os.rename(folder, hidden)
    return hidden


def _remove(path: str, ignore_errors: bool = False) -> None:
    """Delete the folder ``path``; a link is unlinked, never followed (`shutil.rmtree` refuses links)."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.lexists(path) or not ignore_errors:
        shutil.rmtree(path, ignore_errors=ignore_errors)


def discard_checkpoints(folders: list[str]) -> None:
    """`discard_checkpoint` each of ``folders`` that still exists."""
    for folder in folders:
        if os.path.isdir(folder) or os.path.islink(folder):
            discard_checkpoint(folder)


def _network_folder(checkpoint: str, name: str) -> str:
    """``checkpoint/name``, which must exist (a missing local folder would send `from_pretrained` to the Hub) and be
    a real folder of the checkpoint (`component_folder`: a link leading out of it is refused, as its
    ``noise_scheduler`` is: the weights would be another folder's)."""
    if not os.path.isdir(os.path.join(checkpoint, name)):
        raise ValueError(
            f"Checkpoint {checkpoint!r} has no {name!r} folder: it was written by a run with other networks or "
            "options (e.g. without `--use_ema`), or was damaged after it was written."
        )
    return component_folder(checkpoint, name)


def _names(folders: list[str]) -> str:
    return ", ".join(os.path.basename(folder) for folder in folders)


def _check_same_networks(names: list[str], input_dir: str) -> None:
    """Refuse to resume from a checkpoint of other networks (a `--backbones both` checkpoint resumed with `--backbones
    deep`, another `--expert_index`), naming both, rather than fail in torch's optimizer on its parameter groups."""
    saved = sorted(
        entry for entry in os.listdir(input_dir)
        if not entry.endswith("_ema") and os.path.isfile(os.path.join(input_dir, entry, "config.json"))
    )  # fmt: skip
    if saved != sorted(names):
        raise ValueError(
            f"Checkpoint {input_dir!r} holds the networks {saved}, but this run trains {sorted(names)}: resume it with "
            "the options that wrote it (e.g. the same `--backbones` or `--expert_index`), or start a new run."
        )


def _check_no_unused_ema(emas: dict[str, EMAModel], input_dir: str) -> None:
    """Refuse to resume a checkpoint's EMA weights into a run that keeps none (`--use_ema` left out): they would be
    dropped, and the final pipeline saved with the raw weights (the other way round, a missing EMA folder is refused
    as it is read)."""
    unused = sorted(
        entry for entry in os.listdir(input_dir)
        if entry.endswith("_ema") and entry[: -len("_ema")] not in emas
        and os.path.isfile(os.path.join(input_dir, entry, "config.json"))
    )  # fmt: skip
    if unused:
        raise ValueError(
            f"Checkpoint {input_dir!r} holds the EMA weights {unused}, which this run would drop: resume it with "
            "`--use_ema` (and the `--ema_*` options of the run that wrote it), or start a new run."
        )


def _differences(now: Mapping, then: Mapping, keys: Iterable[str]) -> str:
    """What differs between this run's values (``now``) and those a checkpoint holds (``then``) among ``keys``, in
    key order, said as every resume check says it: "`key` THEN there, NOW now", joined by "; "; empty where nothing
    does (a key missing on one side is None there)."""
    differ = sorted(k for k in keys if now.get(k) != then.get(k))
    return "; ".join(f"`{k}` {then.get(k)!r} there, {now.get(k)!r} now" for k in differ)


def _check_same_config(model, loaded, name: str, input_dir: str) -> None:
    """Refuse to resume ``model`` from a checkpoint of another configuration (other model arguments than the run that
    wrote it), naming the values, rather than fail on the first mismatched tensor shape."""
    now, then = (json.loads(m.to_json_string()) for m in (model, loaded))
    values = _differences(now, then, [k for k in now.keys() | then.keys() if not k.startswith("_")])
    if values:
        raise ValueError(
            f"`--resume_from_checkpoint` {input_dir!r} holds a `{name}` of another configuration ({values}): resume "
            "with the model arguments of the run that wrote it, or train into a new `--output_dir`."
        )


def _check_same_noise_schedule(noise_scheduler, input_dir: str) -> None:
    """Refuse to resume training with another noise schedule (`--prediction_type`, `--ddpm_beta_schedule`,
    `--num_train_timesteps`) than the run that wrote ``input_dir``, which holds its training scheduler's config as
    ``NOISE_SCHEDULER_FOLDER`` (a checkpoint written before it did is not checked). A config the scheduler cannot
    take, or one linking out of the checkpoint (hostile input), is a `ValueError` naming it."""
    if not os.path.isdir(os.path.join(input_dir, NOISE_SCHEDULER_FOLDER)):
        return
    folder = component_folder(input_dir, NOISE_SCHEDULER_FOLDER)
    # built from the saved config, so that the keys of another diffusers version count as their defaults (a key
    # missing there) or not at all (one this version does not know)
    loaded = load_scheduler(type(noise_scheduler), folder, f"`--resume_from_checkpoint` {input_dir!r}")
    now, then = (json.loads(s.to_json_string()) for s in (noise_scheduler, loaded))
    values = _differences(now, then, [k for k in now if not k.startswith("_")])
    if values:
        raise ValueError(
            f"`--resume_from_checkpoint` {input_dir!r} was written with another noise schedule ({values}): resume with "
            "the arguments of the run that wrote it (`--prediction_type`, `--ddpm_beta_schedule`, "
            "`--num_train_timesteps`), or train into a new `--output_dir`."
        )


def _check_same_partition(partition: TimestepPartition, input_dir: str) -> None:
    """Refuse to resume training on other stages (`--stage_boundaries`, `--boundary_units`, the expert count) than
    the run that wrote ``input_dir``, which holds them as ``PARTITION_FILE``: an expert's own config holds no
    boundaries, so its weights would go on training on another interval (a checkpoint written before it did is not
    checked)."""
    path = os.path.join(input_dir, PARTITION_FILE)
    if not os.path.isfile(path):
        return
    now, then = partition.to_config(), read_json(path, PARTITION_FILE)
    values = _differences(now, then, now)
    if values:
        raise ValueError(
            f"`--resume_from_checkpoint` {input_dir!r} was written with other stages ({values}): resume with the "
            "arguments of the run that wrote it (`--stage_boundaries`, `--boundary_units`, `--num_experts`), or train "
            "into a new `--output_dir`."
        )


def _check_same_source(source: str | None, input_dir: str) -> None:
    """Refuse to resume a fine-tuning run (`--pretrained_model_name_or_path`, saved as ``SOURCE_FILE``) without a
    source, or a run from the arguments with one: what the source gives besides the weights (a dual-backbone switch,
    the VAE, the noise schedule) would be the arguments' defaults, or the other way round (a checkpoint written before
    it was saved is not checked)."""
    path = os.path.join(input_dir, SOURCE_FILE)
    if not os.path.isfile(path):
        return
    then = read_json(path, SOURCE_FILE).get("pretrained_model_name_or_path")
    if (then is None) == (source is None):
        return
    if then is not None:
        raise ValueError(
            f"`--resume_from_checkpoint` {input_dir!r} was written by a run fine-tuning {then!r}: resume with "
            f"`--pretrained_model_name_or_path {then}` again (the noise schedule, VAE and switch are that folder's), "
            "or train into a new `--output_dir`."
        )
    raise ValueError(
        f"`--resume_from_checkpoint` {input_dir!r} was written by a run that trained its networks from the arguments: "
        f"resume without `--pretrained_model_name_or_path` {source!r}, or train into a new `--output_dir`."
    )


SAMPLE_BLOCK = 1 << 16  # a large file's fingerprint reads its head and this many bytes at SAMPLE_COUNT places
SAMPLE_COUNT = 32


def _fingerprint(path: str) -> dict:
    """``{"size", "sampled_sha256"}`` of the file ``path``: the SHA-256 of all of it when small, else of its head (a
    safetensors file's whole header: names, dtypes, shapes) and of ``SAMPLE_COUNT`` blocks spread over the rest, so
    that a source of several GB is read a few MB (weights of the same shapes saved over it differ in every block)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCK * (SAMPLE_COUNT + 2):
            digest.update(f.read())
        else:
            head = SAMPLE_BLOCK
            if path.endswith(".safetensors"):
                head = max(head, min(size, 8 + int.from_bytes(f.read(8), "little")))
                f.seek(0)
            digest.update(f.read(head))
            for i in range(SAMPLE_COUNT + 1):
                f.seek(head + max(size - head - SAMPLE_BLOCK, 0) * i // SAMPLE_COUNT)
                digest.update(f.read(SAMPLE_BLOCK))
    return {"size": size, "sampled_sha256": digest.hexdigest()}


# a file saved into a source folder after its run started that fine-tuning does not read (it loads no variant): a
# variant's weights (`diffusion_pytorch_model.fp16.safetensors`, or its shards) or a Markdown note
UNREAD_ADDED = re.compile(r"^(.*/)?([^/.]+\.[^/.]+\.(safetensors|bin)|[^/]+\.md)$")


def source_identity(source: str | None) -> dict[str, dict] | None:
    """The identity record of a local fine-tuning source folder, which its run's checkpoints hold (resuming checks
    the source is the same, `check_same_source_files`): the fingerprint (`_fingerprint`) of its ``model_index.json``
    and of every file in the folders of the components it names, by path (``unet/config.json``, ...). Other files
    (a run's checkpoints, logs and sample grids, when the source is a training run's output folder) are not part of
    it. None without a source, or for a Hub repository (its files are its loader's). A component name that is no
    plain name (``..``, ``/``: hostile input) or whose folder, or a file in it or its sub-folders, leads out of the
    source is a `ValueError`."""
    if source is None or not os.path.isfile(os.path.join(source, "model_index.json")):
        return None
    index = read_json(os.path.join(source, "model_index.json"), "model_index.json")
    record = {"model_index.json": _fingerprint(os.path.join(source, "model_index.json"))}
    for name, entry in sorted(index.items()):
        if name.startswith("_") or not isinstance(entry, list):
            continue
        check_name(name, "component folder name")  # hostile input: no `..`, `/` or absolute path
        folder = os.path.join(source, name)
        if not os.path.isdir(folder):
            continue
        folder = component_folder(source, name)  # a real folder inside the source (no link leading out)
        for root, dirs, files in os.walk(folder):  # (links to folders are not walked into)
            check_folder_files(root)  # a sub-folder's files too (expert_0/): no link out of it is read
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(f for f in files if not f.startswith(".")):
                path = os.path.join(root, file)
                if os.path.isfile(path):
                    record[os.path.relpath(path, source).replace(os.sep, "/")] = _fingerprint(path)
    return record


def check_same_source_files(input_dir: str, source: str | None, identity: dict[str, dict] | None = None) -> str | None:
    """Refuse to resume a fine-tuning run on a source folder whose files are not those the run that wrote
    ``input_dir`` fine-tuned (its ``SOURCE_FILE`` holds their `source_identity`): weights or configs saved over it, a
    file added (but a variant's weights or a note, `UNREAD_ADDED`) or removed; the `ValueError` names the first. The
    source may have moved (``source`` another path to the same files). Returns a warning where the checkpoint holds no
    record to check (one written before it was saved), else None. ``identity``: `source_identity` of ``source`` when
    the caller has it (not read again)."""
    path = os.path.join(input_dir, SOURCE_FILE)
    if source is None or not os.path.isfile(path):
        return None
    saved = read_json(path, SOURCE_FILE)
    if "source_files" not in saved:
        return (
            f"`--resume_from_checkpoint` {input_dir!r} holds no record of its source's files (written by an older "
            f"version): this run cannot check that `--pretrained_model_name_or_path` {source!r} is the folder it "
            "fine-tuned. Resuming on it as it is now."
        )
    then, now = saved["source_files"], source_identity(source) if identity is None else identity
    if isinstance(then, dict) and isinstance(now, dict):  # files added that loading does not read: not compared
        now = {name: entry for name, entry in now.items() if name in then or not UNREAD_ADDED.match(name)}
    if then == now:
        return None
    if not isinstance(then, dict) or not isinstance(now, dict):
        changed = "its files could not be compared (one of the two is no local pipeline folder)"
    else:
        name = next(n for n in sorted({*then, *now}) if then.get(n) != now.get(n))
        how = "was added" if name not in then else "was removed" if name not in now else "has changed"
        changed = f"its {name} {how} since"
    raise ValueError(
        f"`--resume_from_checkpoint` {input_dir!r} was written by a run fine-tuning {saved.get('pretrained_model_name_or_path')!r}, "
        f"but `--pretrained_model_name_or_path` {source!r} is not that folder as it was: {changed}. Resume with the "
        "source the run fine-tuned (put its files back), or fine-tune this one in a new `--output_dir`."
    )


def _check_same_latent_space(latent_space: dict, input_dir: str) -> None:
    """Refuse to resume in another data space than the run that wrote ``input_dir`` (``LATENT_SPACE_FILE``): pixels
    or the latents of another VAE (`--vae_path`; its options that set the latents, `scaling_factor`,
    `shift_factor`, `latents_mean`, ... compared: the weights are not), whose networks would go on training on
    samples of another scale and be saved with the new VAE (a checkpoint written before it was saved is not
    checked). ``latent_space`` is this run's: ``{"vae_path", "vae_subfolder", "vae"}``, ``"vae"`` the VAE's latent
    options or None in pixel space."""
    path = os.path.join(input_dir, LATENT_SPACE_FILE)
    if not os.path.isfile(path):
        return
    then = read_json(path, LATENT_SPACE_FILE)
    now_options, then_options = latent_space.get("vae"), then.get("vae")
    if now_options == then_options:
        return

    def space(record: dict) -> str:
        if record.get("vae") is None:
            return "pixel space"
        where = repr(record.get("vae_path")) + (
            f" ({record['vae_subfolder']}/)" if record.get("vae_subfolder") else ""
        )
        return f"the latent space of {where}"

    subfolder = f" --vae_subfolder {then['vae_subfolder']}" if then.get("vae_subfolder") else ""
    fix = (
        f"resume with `--vae_path {then.get('vae_path')}{subfolder}`"
        if then_options
        else "resume without `--vae_path`"
    )
    if now_options is None or then_options is None:
        raise ValueError(
            f"`--resume_from_checkpoint` {input_dir!r} was written by a run in {space(then)}, but it is resumed in "
            f"{space(latent_space)}: {fix} (the VAE its networks trained with), or train into a new `--output_dir`."
        )
    values = _differences(now_options, then_options, {*now_options, *then_options})
    raise ValueError(
        f"`--resume_from_checkpoint` {input_dir!r} was written by a run in {space(then)}, but it is resumed in the "
        f"latent space of another VAE ({values}): {fix} (the VAE its networks trained with), or train into a new "
        "`--output_dir`."
    )


def check_same_class_names(input_dir: str, id2label: dict[str, str] | None) -> None:
    """Refuse to resume on other classes (``id2label``: class index -> name, the training data's class sub-folders or
    label names, None without `--class_conditional`) than the run that wrote ``input_dir``, which holds them as
    ``CLASS_NAMES_FILE``: a class folder renamed, added in the middle or replaced shifts the indices, and the networks
    would go on training each class index on another class's images (a checkpoint written before it was saved is not
    checked)."""
    path = os.path.join(input_dir, CLASS_NAMES_FILE)
    if not os.path.isfile(path):
        return
    then = read_json(path, CLASS_NAMES_FILE).get("id2label")
    if then == id2label:
        return
    if isinstance(then, dict) and isinstance(id2label, dict):
        key = next(
            (k for k in sorted({*then, *id2label}, key=lambda k: (len(k), k)) if then.get(k) != id2label.get(k)), None
        )
        differ = f"class {key}: {then.get(key)!r} there, {id2label.get(key)!r} now"
    else:
        differ = f"{then!r} there, {id2label!r} now"
    raise ValueError(
        f"`--resume_from_checkpoint` {input_dir!r} was written by a run on other classes ({differ}): its networks "
        "learned each class index on that run's class, so resume with that run's training data (its class "
        "sub-folders, or `--label_column` names), or train into a new `--output_dir`."
    )


def optimizer_settings(optimizer) -> dict:
    """The options an optimizer's state holds besides its moments, by option (of its first parameter group: the
    loop's one AdamW has one): `--learning_rate` (as scaled by `--scale_lr`, the learning-rate schedule's base) and
    the `--adam_*` values; `check_same_optimizer_settings` compares them."""
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    return {
        "--learning_rate": group.get("initial_lr", group["lr"]), "--adam_beta1": beta1, "--adam_beta2": beta2,
        "--adam_epsilon": group["eps"], "--adam_weight_decay": group["weight_decay"],
    }  # fmt: skip


def check_same_optimizer_settings(now: dict, then: dict, input_dir: str) -> None:
    """Refuse to resume from ``input_dir`` with other optimizer settings (``now``: `optimizer_settings` before the
    checkpoint loads, ``then``: after): Accelerate's load replaces the optimizer's and the learning-rate schedule's
    learning rate and Adam settings with the checkpoint's, so the run would go on with those in silence."""
    values = _differences(now, then, now)
    if values:
        raise ValueError(
            f"`--resume_from_checkpoint` {input_dir!r} was written with other optimizer settings ({values}): its "
            "optimizer and learning-rate states would replace them in silence. Resume with the `--learning_rate`, "
            "`--scale_lr` (and process count) and `--adam_*` of the run that wrote it, or train into a new "
            "`--output_dir`."
        )


def check_resume_arguments(
    input_dir: str, noise_scheduler, source: str | None = None, latent_space: dict | None = None
) -> None:
    """The checks of resuming from ``input_dir`` that need no network: the fine-tuning source (``source``:
    `--pretrained_model_name_or_path`, or None), the noise schedule and the data space (``latent_space``: pixels or
    a VAE's latents, see `_check_same_latent_space`; None: not checked) of the run that wrote it. The load hook of
    `register_checkpoint_hooks` runs them; the loop runs them first, before any data is read. A file of the
    checkpoint that links out of it (its records, Accelerate's optimizer and random states) is refused first
    (`check_folder_files`): another folder's state would be resumed; so is a pickle that would run code
    (`refuse_code_in_pickles`)."""
    check_folder_files(input_dir)
    refuse_code_in_pickles(input_dir)
    _check_same_source(source, input_dir)  # first: a source omitted changes the noise schedule too
    if noise_scheduler is not None:
        _check_same_noise_schedule(noise_scheduler, input_dir)
    if latent_space is not None:
        _check_same_latent_space(latent_space, input_dir)


def refuse_code_in_pickles(input_dir: str) -> None:
    """A `ValueError` naming each ``.pkl`` file of the checkpoint ``input_dir`` that does not load weights-only
    (tensors, numbers, numpy arrays: what Accelerate's random states hold). Accelerate releases this package allows
    (``accelerate>=1.0``) read ``random_states_<process>.pkl`` with ``weights_only=False`` before 2025's, so a
    hostile checkpoint's file would run code of its choice on resume; one that loads weights-only calls no function
    but the allowed ones under either reader."""
    numpy_core = getattr(np, "_core", None) or np.core
    # what Accelerate's random states hold besides tensors and numbers: numpy's state array (its dtype classes and the
    # byte encoding of pickle protocol 2), as Accelerate allows them in its own weights-only reads today
    allowed = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), codecs.encode]
    for name in sorted(f for f in os.listdir(input_dir) if f.endswith(".pkl")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(os.path.join(input_dir, name), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (an UnpicklingError, or any damage: refused before Accelerate reads it)
            raise ValueError(
                f"{name!r} in {input_dir} does not load weights-only ({type(error).__name__}): it could run code "
                "when Accelerate reads it, so this checkpoint is refused. Resume from a checkpoint your own run "
                "wrote, or delete the file to resume without its random states."
            ) from None


def check_sharded_resume(
    input_dir: str, networks: dict, noise_scheduler, partition: TimestepPartition, source: str | None = None
) -> None:
    """The load hook's checks of `register_checkpoint_hooks` for a sharded (FSDP) run, to call before
    `accelerator.load_state`: Accelerate loads an FSDP run's shards before the hook runs (and hands it no model), so
    a checkpoint of other model arguments would load (the same shapes) or fail on a tensor (other shapes).
    ``networks`` are the run's networks by name; their configs are compared with the checkpoint's, read only."""
    check_resume_arguments(input_dir, noise_scheduler, source)
    _check_same_networks(list(networks), input_dir)
    for name, network in networks.items():
        cls = plain_class(network)  # as saved (FSDP2's subclass writes no `auto_map`)
        with init_empty_weights():  # both configs with this version's defaults, and no weights
            now = cls.from_config(network.config)
            saved = cls.from_config(cls.load_config(_network_folder(input_dir, name)))
        _check_same_config(now, saved, name, input_dir)
    _check_same_partition(partition, input_dir)


# the EMA's settings (`decay` is `--ema_max_decay`, `power` `--ema_power`, `inv_gamma` `--ema_inv_gamma`), which
# resuming keeps: the saved EMA's must be the same
EMA_SETTINGS = ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
WARMUP_SETTINGS = ("use_ema_warmup", "inv_gamma", "power")  # EMAModel's warmup schedule


def _load_ema(ema: EMAModel, folder: str) -> None:
    """Resume ``ema`` from its `EMAModel.save_pretrained` ``folder`` as strictly as the networks resume: missing,
    unexpected, mis-shaped or non-float weights (which `EMAModel.from_pretrained` loads leniently through diffusers),
    an EMA of another configuration or parameter shapes than ``ema``'s model, and one kept with other settings
    (`EMA_SETTINGS`, which diffusers' `load_state_dict` would take over in silence), are a `ValueError` naming
    ``folder``; ``ema`` is left as it was."""
    loaded = load_strictly(ema.model_cls, folder)  # none left random, ignored or cast
    now = json.loads(json.dumps(dict(ema.model_config), default=str))
    then = json.loads(loaded.to_json_string())
    values = _differences(now, then, [k for k in now if not k.startswith("_")])
    shapes = [tuple(p.shape) for p in loaded.parameters()]
    if values or shapes != [tuple(p.shape) for p in ema.shadow_params]:
        values = values or "other parameter shapes"
        raise ValueError(
            f"The EMA weights at {folder} do not match the model being trained ({values}): resume with the model "
            "arguments of the run that wrote the checkpoint, or train into a new `--output_dir`."
        )
    saved = read_json(os.path.join(folder, "config.json"), "config.json")  # also the EMA's state (decay, step, ...)
    state = {k: saved[k] for k in ema.state_dict() if k != "shadow_params" and k in saved}
    # the settings the run gives (`--ema_*`, and the loop's own): the checkpoint's would replace them in silence. A
    # run without the warmup (text-to-image's, as diffusers') sets none of its settings: it resumes with the schedule
    # the checkpoint was kept with (an earlier version's text-to-image checkpoints warmed up)
    compared = EMA_SETTINGS if ema.use_ema_warmup else [k for k in EMA_SETTINGS if k not in WARMUP_SETTINGS]
    settings = {k: getattr(ema, k) for k in compared}
    values = _differences(settings, {k: state.get(k, v) for k, v in settings.items()}, compared)
    options = "`--ema_max_decay`, `--ema_power` and `--ema_inv_gamma`" if ema.use_ema_warmup else "`--ema_max_decay`"
    if values:
        raise ValueError(
            f"The EMA at {folder} was kept with other settings ({values}): resume with the "
            f"{options} of the run that wrote the checkpoint, or train into a new `--output_dir`."
        )
    state["shadow_params"] = [p.detach().clone() for p in loaded.parameters()]
    try:  # on a copy first: `EMAModel.load_state_dict` sets each value before checking it
        copy.copy(ema).load_state_dict(state)
    except ValueError as error:
        raise ValueError(f"The EMA state in {os.path.join(folder, 'config.json')} is not valid: {error}") from None
    ema.load_state_dict(state)


def register_checkpoint_hooks(
    accelerator: Accelerator,
    names: list[str],
    emas: dict[str, EMAModel],
    noise_scheduler=None,
    partition: TimestepPartition | None = None,
    source: str | None = None,
    latent_space: dict | None = None,
    id2label: dict[str, str] | None = None,
    source_files: dict[str, dict] | None = None,
) -> None:
    """Make `accelerator.save_state` / `load_state` write and read each network as ``<dir>/<name>`` and its EMA as
    ``<dir>/<name>_ema`` (`save_pretrained` folders), instead of anonymous state dicts. A sharded (FSDP) network is
    gathered and written the same way; it is resumed from Accelerate's shards, which its checkpoint holds too.

    ``noise_scheduler`` (the training scheduler) is saved as ``<dir>/noise_scheduler``: resuming with another noise
    schedule is refused, naming the values, before any state loads. ``partition`` (the stages the networks train on)
    is saved as ``<dir>/stage_partition.json``: resuming on other stages is refused, naming the values. ``source``
    (`--pretrained_model_name_or_path` of a fine-tuning run, or None) is saved as ``<dir>/pretrained_source.json``:
    resuming a fine-tuning run without a source, or a run from the arguments with one, is refused; ``source_files``
    (its `source_identity`, taken as the run started) is saved with it: resuming on other files is refused
    (`check_same_source_files`). ``latent_space``
    (the data space, `_check_same_latent_space`) is saved as ``<dir>/latent_space.json``: resuming in pixel space or
    in another VAE's latent space is refused, naming the values. ``id2label`` (the classes of the labels trained on,
    or None) is saved as ``<dir>/class_names.json``: resuming on other classes is refused (`check_same_class_names`)."""

    def save_hook(models, weights, output_dir):
        networks = gathered_networks(accelerator, names, models)  # sharded (FSDP): every process joins the gathering
        if accelerator.is_main_process:
            for name, network in networks.items():
                network.save_pretrained(os.path.join(output_dir, name))
            for name, ema in emas.items():
                ema.save_pretrained(os.path.join(output_dir, f"{name}_ema"))
            if noise_scheduler is not None:
                noise_scheduler.save_pretrained(os.path.join(output_dir, NOISE_SCHEDULER_FOLDER))
            if partition is not None:
                with open(os.path.join(output_dir, PARTITION_FILE), "w", encoding="utf-8") as f:
                    json.dump(partition.to_config(), f)
            with open(os.path.join(output_dir, SOURCE_FILE), "w", encoding="utf-8") as f:
                json.dump({"pretrained_model_name_or_path": source, "source_files": source_files}, f)
            if latent_space is not None:
                with open(os.path.join(output_dir, LATENT_SPACE_FILE), "w", encoding="utf-8") as f:
                    json.dump(latent_space, f)
            with open(os.path.join(output_dir, CLASS_NAMES_FILE), "w", encoding="utf-8") as f:
                json.dump({"id2label": id2label}, f)
        weights.clear()  # the folders above hold the weights; accelerate must not save them again

    def load_hook(models, input_dir):
        check_resume_arguments(input_dir, noise_scheduler, source, latent_space)
        check_same_class_names(input_dir, id2label)
        _check_same_networks(names, input_dir)
        _check_no_unused_ema(emas, input_dir)
        # (sharded: `models` is empty, Accelerate has loaded its shards, checked by `check_sharded_resume` first)
        for name, model in zip(names, models):
            model = accelerator.unwrap_model(model)
            loaded = load_strictly(type(model), _network_folder(input_dir, name))  # none left random or cast
            _check_same_config(model, loaded, name, input_dir)
            model.load_state_dict(loaded.state_dict())
            del loaded
        if partition is not None:  # after the networks' own configs, which name a staged model's boundaries
            _check_same_partition(partition, input_dir)
        for name, ema in emas.items():
            _load_ema(ema, _network_folder(input_dir, f"{name}_ema"))
            ema.to(accelerator.device)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
