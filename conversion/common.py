"""What every conversion script shares: its command-line contract, all-or-nothing output folders, strict key
checks, and the `--verify` report.

Every script has ``parse_args(argv=None)`` and ``main(args)``; ``main`` writes into a temporary folder beside the
output and renames it into place only when everything succeeded, so a failure never leaves a partial folder. A run
killed mid-way (even between the two renames of an ``--overwrite``) is undone by the next run, or the next script
that reads the folder: the previous output is put back and the hidden temporary folders are deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffusers_stages.cli import HelpFormatter, existing_ancestor, is_writable_folder
from diffusers_stages.models.loading import (
    StrictLoadingMixin,
    TensorBudget,
    _is_float_dtype,
    _tensor_dtypes,
    read_json,
    refuse_without_plain_safetensors,
)

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): every leftover folder counts as abandoned
    fcntl = None


def build_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every script takes: ``--output_path``, ``--overwrite`` and ``--verify``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--output_path",
        required=True,
        type=output_path_value,
        help="Folder to write. It must not exist (see --overwrite).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace --output_path if it exists (only once the conversion worked).",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Run the source and the converted model on the same tiny input and print the largest difference; "
        "fail (and write nothing) if it exceeds --tolerance.",
    )
    parser.add_argument(
        "--tolerance", type=tolerance_value, default=1e-4, help="Largest difference --verify accepts (a number >= 0)."
    )
    return parser


def output_path_value(text: str) -> str:
    """``--output_path``: not empty (an unset shell variable would name the current directory, which --overwrite
    replaces)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}")
    return text


def tolerance_value(text: str) -> float:
    """``--tolerance``: a number >= 0 (a negative or NaN one would fail every ``--verify``, after the conversion)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def folder_value(text: str) -> str:
    """An input folder option (``--original_repo``): an existing folder, checked when the arguments are parsed (a
    mistyped one was only found at the end of the conversion)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"must be a folder, got {text!r}")
    return text


INPUT_OPTIONS = ("source", "sources", "checkpoint", "original_config", "vae", "original_repo")  # what scripts read


def input_paths(args: argparse.Namespace) -> dict[str, str]:
    """The local files and folders a script reads, by option (``{"--source": path, ...}``; ``--sources`` numbered)."""
    found = {}
    for option in INPUT_OPTIONS:
        values = getattr(args, option, None)
        values = values if isinstance(values, (list, tuple)) else [values]
        for i, value in enumerate(values):
            if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
                found[f"--{option}" + (f" #{i + 1}" if len(values) > 1 else "")] = os.fspath(value)
    return found


def check_output_path(output_path: str | os.PathLike, inputs: dict[str, str]) -> None:
    """Refuse an ``output_path`` that is one of the ``inputs`` (see `input_paths`), inside one, or holds one: writing
    (or, with ``--overwrite``, replacing) it would destroy what the conversion reads."""
    output = os.path.realpath(output_path)
    for option, path in inputs.items():
        source = os.path.realpath(path)
        if output == source or os.path.commonpath([output, source]) in (output, source):
            raise ValueError(
                f"`--output_path` {output_path} is, holds or lies inside `{option}` {path}: choose a folder apart "
                "from the conversion's inputs (--overwrite would delete them)."
            )


@contextlib.contextmanager
def staged_output(
    output_path: str | os.PathLike, overwrite: bool = False, inputs: dict[str, str] | None = None
) -> Iterator[str]:
    """Yield a temporary folder next to ``output_path``; move it to ``output_path`` only if the block succeeds.
    ``inputs`` (`input_paths` of the script's arguments) must lie apart from ``output_path``.

    Example:

    ```py
    >>> import os, tempfile
    >>> from diffusers_stages.conversion.common import staged_output
    >>> out = os.path.join(tempfile.mkdtemp(), "converted")
    >>> try:
    ...     with staged_output(out) as tmp:
    ...         open(os.path.join(tmp, "half.txt"), "w").close()
    ...         raise RuntimeError("conversion failed")
    ... except RuntimeError:
    ...     pass
    >>> os.path.exists(out), os.listdir(os.path.dirname(out))  # nothing left behind
    (False, [])

    ```
    """
    output_path = os.path.abspath(os.fspath(output_path))
    check_output_path(output_path, inputs or {})
    recover_output(output_path)
    if os.path.lexists(output_path) and not os.path.isdir(output_path):  # --overwrite replaces an output folder only
        raise ValueError(
            f"`--output_path` {output_path} exists and is not a folder: choose a folder to write (the conversion writes "
            "one, as diffusers' save_pretrained)."
        )
    if os.path.exists(output_path) and not overwrite:
        raise ValueError(f"`--output_path` {output_path} already exists: choose another folder or pass --overwrite.")
    parent = existing_ancestor(output_path)  # the missing folders below it are created
    if not is_writable_folder(parent):
        raise ValueError(f"`--output_path` {output_path} cannot be created: {parent} is not a writable folder.")
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    locks = []  # our hidden folders stay locked while we live: a concurrent run's recovery leaves them alone
    succeeded = False
    try:
        tmp = _hidden_folder(output_path, "partial", locks)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a normal folder once in place, not mkdtemp's private one
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # success: swap the new folder in, the old one (if any, with --overwrite) out
        old = None
        if os.path.exists(output_path):
            old = _retire(output_path, locks)
        os.rename(tmp, output_path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        succeeded = True
    finally:
        for lock in locks:
            os.close(lock)
        created = os.path.dirname(output_path)
        while not succeeded and created != parent:  # a failure leaves none of the folders made above the output
            with contextlib.suppress(OSError):  # (one another run filled meanwhile stays)
                os.rmdir(created)
            created = os.path.dirname(created)


def recover_output(output_path: str | os.PathLike) -> None:
    """Undo what a killed conversion left beside ``output_path``: if it died between moving the previous output
    aside and moving the new one in, put the previous one back; delete its hidden temporary folders (skipping those
    of a conversion still running)."""
    output_path = os.path.abspath(os.fspath(output_path))
    parent, name = os.path.split(output_path)
    if not os.path.isdir(parent):
        return
    pattern = re.compile(rf"^\.{re.escape(name)}\.(partial|old)-[a-z0-9_]{{8}}$")  # mkdtemp's names
    found = [
        (os.path.join(parent, entry), m.group(1))
        for entry in sorted(os.listdir(parent))
        if (m := pattern.match(entry))
    ]
    abandoned, locks = {}, []
    try:
        for folder, kind in found:
            lock = _lock(folder)
            if lock is not None:
                locks.append(lock)
            if lock is not None or fcntl is None:  # not locked by a conversion still running
                abandoned[folder] = kind
        previous = [os.path.join(f, "previous") for f, kind in abandoned.items() if kind == "old"]
        previous = [p for p in previous if os.path.isdir(p)]
        if previous and not os.path.exists(output_path):
            os.rename(max(previous, key=lambda p: os.path.getmtime(os.path.dirname(p))), output_path)
            print(f"restored {output_path}: a conversion was killed while replacing it")
        for folder in abandoned:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        for lock in locks:
            os.close(lock)


def source_folder(path: str, option: str = "--source") -> str:
    """``path`` (given as ``option``) checked to be a folder, after recovering an interrupted ``--overwrite`` of it."""
    recover_output(path)
    if not os.path.isdir(path):
        raise ValueError(f"`{option}` must be a folder, got {path!r}.")
    return path


def _hidden_folder(output_path: str, kind: str, locks: list[int]) -> str:
    """A new folder ``.<name>.<kind>-XXXXXXXX`` beside ``output_path``, locked (its lock appended to ``locks``)."""
    parent, name = os.path.split(output_path)
    folder = tempfile.mkdtemp(prefix=f".{name}.{kind}-", dir=parent)
    lock = _lock(folder)
    if lock is not None:
        locks.append(lock)
    return folder


def _retire(output_path: str, locks: list[int]) -> str:
    """Move the existing ``output_path`` aside, as ``previous`` in a new locked hidden folder; returns that folder."""
    old = _hidden_folder(output_path, "old", locks)
    os.rename(output_path, os.path.join(old, "previous"))
    return old


def _lock(folder: str) -> int | None:
    """An exclusive advisory lock on ``folder``, held until the returned descriptor is closed (a killed process
    releases it); None when another process holds it, it cannot be opened or locks are not supported."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


def check_keys(expected: Iterable[str], found: Iterable[str], source: str) -> None:
    """Raise a `ValueError` naming the missing and unexpected keys of ``source``, if any."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not have the weights its architecture needs: {len(missing)} missing "
            f"(first: {missing[:8]}), {len(unexpected)} unexpected (first: {unexpected[:8]}). Is it the checkpoint "
            "of another model or configuration, or truncated?"
        )


def check_shapes(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a `ValueError` naming the tensors of ``state_dict`` whose shapes differ from ``expected``."""
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k])}" for k, v in state_dict.items() if v.shape != expected[k]]
    if wrong:
        raise ValueError(f"{source} has {len(wrong)} tensors of the wrong shape (first: {wrong[:5]}).")


def check_dtypes(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a `ValueError` naming the tensors of ``state_dict`` that are not real floating point where ``model``'s
    are (`load_state_dict` would silently cast an integer, boolean or complex checkpoint into the weights)."""
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    wrong = [f"{k}: {v.dtype}" for k, v in state_dict.items() if k in floating and not v.is_floating_point()]
    if wrong:
        raise ValueError(f"{source} has {len(wrong)} weights that are not floating point (first: {wrong[:5]}).")


def build_for_checkpoint(build: Callable[[], torch.nn.Module], state_dict: dict[str, torch.Tensor], source: str):
    """``build()`` (the converted model, from a config file: hostile input), after building it on the ``meta`` device
    (no memory) stopped by `TensorBudget` once it makes far more tensors than the checkpoint ``state_dict`` holds: a
    `ValueError` naming ``source`` where it does, or has far more parameters than the checkpoint holds weights. A
    width or block count edited in the config would otherwise be allocated (gigabytes) or built for ever before the
    strict key check (`load_converted`) names the mismatch."""
    held = sum(tensor.numel() for tensor in state_dict.values())
    try:
        with torch.device("meta"), TensorBudget(len(state_dict)):
            size = sum(parameter.numel() for parameter in build().parameters())
    except TensorBudget.Exceeded as error:
        raise ValueError(f"{source} does not fit the config: {error}") from None
    if size > 2 * held + 2**20:  # (the converted model has the checkpoint's weights, a few buffers aside)
        raise ValueError(
            f"{source} does not fit the config: the config builds {size} parameters, the checkpoint holds {held} "
            "weights. Is a width or block count of the config edited, or the checkpoint another model's?"
        )
    return build()


def load_converted(model: torch.nn.Module, converted: dict[str, torch.Tensor], source: str) -> None:
    """Load renamed weights into ``model`` after checking that they are exactly its keys and shapes."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, converted, source)
    check_shapes(expected, converted, source)
    check_dtypes(model, converted, source)
    model.load_state_dict(converted, strict=True)


def load_strict(model_class: type, path: str, subfolder: str | None = None):
    """``model_class.from_pretrained`` from safetensors only, failing on missing, unexpected or mis-shaped keys."""
    # a folder of another class (a UNet2DConditionModel read as a UNet2DModel, say) is named as such, before diffusers
    # builds the wrong model from its config and fails on an option it lacks, or on every key
    where = os.path.join(path, subfolder or "")
    config_path = os.path.join(where, "config.json")
    if os.path.isfile(config_path):
        saved_class = read_json(config_path, "config.json").get("_class_name")
        if saved_class not in (None, model_class.__name__):
            raise ValueError(f"{where} holds a {saved_class}, not the {model_class.__name__} expected here.")
        check_plain_safetensors(where, model_class)
    strict_class = model_class
    if not issubclass(model_class, StrictLoadingMixin):
        strict_class = type(
            model_class.__name__, (StrictLoadingMixin, model_class), {"__module__": model_class.__module__}
        )
    try:
        model = strict_class.from_pretrained(path, subfolder=subfolder, use_safetensors=True)
    except OSError as error:
        models = []  # e.g. a one-backbone training run (`shallow/`, `scheduler/`): its model folders
        if os.path.isdir(where) and not os.path.exists(config_path):
            models = sorted(os.path.join(where, name) for name in os.listdir(where)
                            if os.path.isfile(os.path.join(where, name, "config.json")))  # fmt: skip
        hint = f" It holds model folders: give one of them ({', '.join(models)})." if models else ""
        raise ValueError(
            f"Cannot load a {model_class.__name__} from {where} (safetensors only): {error}{hint}"
        ) from error
    model.__class__ = model_class  # the plain class again, so it saves and registers as itself
    return model.eval()


def check_plain_safetensors(folder: str, model_class: type) -> None:
    """Refuse a model ``folder`` without plain safetensors weights (only a pickled ``.bin``, a variant's
    ``.fp16.safetensors`` or shards without their index), naming the weight files it holds (diffusers' error named
    only the file it looked for): `refuse_without_plain_safetensors`, with what the conversions need."""
    refuse_without_plain_safetensors(
        folder,
        folder,
        "the conversions read plain safetensors only, never a pickled `.bin`, and no variant. Load the pipeline (or "
        f"{model_class.__name__}) once where you trust it (`from_pretrained(folder, variant=...)`), "
        "`save_pretrained(copy)` without a variant, and convert the copy.",
    )


# the weight files a component folder loads by default (no variant's `.fp16.safetensors`), sharded or not
DEFAULT_WEIGHT_FILE = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors")
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def with_appended_class(model):
    """A copy of the class-conditional ``model`` (``num_class_embeds`` N, a diffusers-style config) with N + 1 class
    embeddings, the new last one (the package's unconditional label) zero in a class table, never trained; a class
    embedding without a table (diffusers' ``"timestep"`` type) takes the new index as it is."""
    classes = model.config.num_class_embeds
    appended = type(model).from_config(model.config, num_class_embeds=classes + 1).to(model.device, model.dtype)
    state_dict = model.state_dict()
    if isinstance(model.class_embedding, torch.nn.Embedding):
        weight = state_dict["class_embedding.weight"]
        state_dict["class_embedding.weight"] = torch.cat([weight, torch.zeros_like(weight[:1])])
    appended.load_state_dict(state_dict, strict=True)
    return appended.eval()


def stored_dtype(folder: str | os.PathLike | None) -> torch.dtype | None:
    """The floating-point dtype ``folder``'s default weight files store (read from their headers), or None when it
    has none or several (or is None)."""
    if folder is None or not os.path.isdir(folder):
        return None
    dtypes = set()
    for name in sorted(os.listdir(folder)):
        if DEFAULT_WEIGHT_FILE.fullmatch(name):
            stored = _tensor_dtypes(os.path.join(folder, name)) or {}  # (None: a file safetensors cannot read)
            dtypes |= {d for d in stored.values() if _is_float_dtype(d)}
    return SAFETENSORS_DTYPES.get(dtypes.pop()) if len(dtypes) == 1 else None


def save_in_stored_dtypes(pipeline, folder: str, sources: Iterable[tuple[object, str | os.PathLike]]) -> None:
    """``pipeline.save_pretrained(folder)``, each model of ``sources`` (``(model, source folder)`` pairs) stored in the
    dtype its source folder stores (a float16 source stays float16, not twice its size), though the conversion
    loaded it, and `--verify` compares it, in float32. The models are cast back afterwards."""
    restore = []
    for module, source in sources:
        dtype = stored_dtype(source)
        if isinstance(module, torch.nn.Module) and dtype is not None and dtype != module.dtype:
            restore.append((module, module.dtype))
            cast(module, dtype)
    try:
        pipeline.save_pretrained(folder)
    finally:
        for module, dtype in restore:
            cast(module, dtype)


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` cast to ``dtype`` in place (when it is not already), without diffusers' `ModelMixin.to` warning
    that "modules that should be kept in float32: []" make casting "inconsistent" (it warns on every dtype, also
    for models that keep no module in float32, as the conversions' models)."""
    return module if module.dtype == dtype else torch.nn.Module.to(module, dtype)


EXPORT_HINT = (
    "Export a PyTorch checkpoint once with `safetensors.torch.save_file({k: v.contiguous() for k, v in "
    "state_dict.items()}, path)` in an environment where you trust it."
)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` state dict (the only checkpoint format the scripts read)."""
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise ValueError(f"`--checkpoint` must be an existing .safetensors file, got {path!r}. {EXPORT_HINT}")
    try:
        return load_file(path)
    except SafetensorError as error:  # a renamed pickle (.ckpt, .pth) or a truncated file: never unpickled
        raise ValueError(
            f"`--checkpoint` {path} is not a safetensors file ({error}): a PyTorch checkpoint renamed, or a "
            f"truncated copy? {EXPORT_HINT}"
        ) from None


def stage_interval_boundaries(
    intervals, stage_num: int, decoders: int, decoder_option: str, reaches_end: Callable[[float], bool], span: str
) -> list[float]:
    """The inner boundaries of the authors' ``stage_interval`` (``[[[low, high]], ...]``, one interval per stage),
    checked against ``stage_num`` and the number of ``decoders`` (option ``decoder_option``) and to be contiguous from
    0 to an upper end ``reaches_end`` accepts (``span`` says which, for the error)."""
    if len(intervals) != stage_num or decoders != stage_num:
        raise ValueError(
            f"`stage_num`={stage_num} disagrees with `stage_interval` ({len(intervals)} stages) or "
            f"`{decoder_option}` ({decoders} decoders)."
        )
    try:
        edges = [[float(v) for v in stage[0]] for stage in intervals if len(stage) == 1]
    except (TypeError, ValueError, IndexError):
        edges = []
    contiguous = 0 < len(edges) == len(intervals) and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    if not contiguous or edges[0][0] != 0 or not reaches_end(edges[-1][1]):
        raise ValueError(
            f"`stage_interval`={intervals} does not convert: each stage must be one interval, the intervals "
            f"contiguous from {span}, as a TimestepPartition's stages are."
        )
    return [edge[0] for edge in edges[1:]]


def check_option_kinds(options: dict, defaults: dict, source: str, prefix: str = "", kinds_only: bool = False) -> None:
    """Refuse an option of ``options`` that is not of its default's kind in ``defaults``: a list where the default is
    a list, a number where it is a number (a config of the wrong type was a TypeError from inside the conversion).
    ``prefix`` names the option's section (``model.``) in the message; with ``kinds_only`` the values of
    ``defaults`` only stand for their kind (no default is named)."""
    for option, default in defaults.items():
        value = options.get(option, default)
        if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
            kind = "list"
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and not _is_number(value):
            kind = "number"
        else:
            continue
        named = "" if kinds_only else f" like its default {default!r}"
        raise ValueError(f"{source}: `{prefix}{option}`={value!r} must be a {kind}{named}.")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def take(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Remove and return ``key``; a checkpoint without it is refused by name."""
    if key not in state_dict:
        raise ValueError(
            f"The checkpoint lacks {key!r}, which its config's architecture has: is it truncated, or from another "
            "configuration?"
        )
    return state_dict.pop(key)


@contextlib.contextmanager
def rearranging(key: str, value: torch.Tensor) -> Iterator[None]:
    """Around the reshapes, splits and transpositions of checkpoint tensor ``key``: a shape they cannot take is a
    `ValueError` naming the tensor, not a torch error from inside the rename."""
    try:
        yield
    except (RuntimeError, IndexError) as error:
        raise ValueError(
            f"The checkpoint's {key!r} of shape {tuple(value.shape)} does not have its layer's layout ({error}): is it "
            "from another architecture or configuration?"
        ) from None


def move_layer(
    state_dict: dict[str, torch.Tensor], source: str, target: str, out: dict, optional: bool = False
) -> None:
    """Move layer ``source``'s ``weight`` and ``bias`` out of ``state_dict`` into ``out`` as layer ``target``'s
    (a missing one is refused by name, unless ``optional``: then the layer may be absent or have no bias)."""
    for param in ("weight", "bias"):
        if not optional or f"{source}.{param}" in state_dict:
            out[f"{target}.{param}"] = take(state_dict, f"{source}.{param}")


def check_consumed(state_dict: dict[str, torch.Tensor]) -> None:
    """After a rename table has taken every key it knows, refuse a checkpoint with keys left over."""
    if state_dict:
        raise ValueError(
            f"The checkpoint has {len(state_dict)} keys the original architecture does not: {sorted(state_dict)[:8]}."
        )


def probe_timesteps(partition) -> list[float]:
    """One model timestep inside each stage of ``partition`` (the middle of its interval), for `--verify`."""
    probes = []
    for low, high in partition.intervals():
        if partition.units == "timestep":
            probes.append(float(int((low + high) / 2)))
            continue
        # EDM conditioning c_noise = ln(sigma) / 4 at the geometric middle (twice the last finite edge)
        sigma = (low * high) ** 0.5 if 0 < low and high < math.inf else 2 * low if low > 0 else min(high / 2, 1.0)
        probes.append(math.log(sigma) / 4)
    return probes


def probe_tensor(partition, t: float) -> torch.Tensor:
    """A `probe_timesteps` probe as a sampling loop gives it to the model: an integer timestep in timestep units (a
    learned time embedding is an `nn.Embedding`, which takes no float), a float otherwise."""
    return torch.tensor(int(t) if partition.units == "timestep" else t)


def probe_class_labels(model: torch.nn.Module, batch: int) -> torch.Tensor | None:
    """Class labels of ``batch`` samples that ``model``'s class embedding takes, for `--verify` (`None` without one):
    indices ``0, 1, ...`` into a ``num_class_embeds`` table (or embedded as timesteps), or random vectors of the width
    of a ``"projection"``/``"simple_projection"`` embedding's input or, for ``"identity"``, of the time embedding."""
    if getattr(model, "class_embedding", None) is None:
        return None
    kind = model.config.get("class_embed_type")
    if kind in ("projection", "simple_projection"):
        width = model.config.projection_class_embeddings_input_dim
    elif kind == "identity":
        width = model.time_embedding.linear_2.out_features
    else:
        return torch.arange(batch) % (model.config.get("num_class_embeds") or batch)
    return torch.randn(batch, width, generator=torch.manual_seed(2))


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``|a - b|``: equal values (the same inf, NaN in both at one place, a source that gives NaN itself)
    differ by 0, a NaN in one only by inf (a NaN difference would be skipped by `max` in `report_verification`)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, 0.0, (a - b).abs().nan_to_num(nan=math.inf)).max().item()


def report_verification(differences: dict[str, float], tolerance: float) -> None:
    """Print each comparison's largest absolute difference; raise if any exceeds ``tolerance``."""
    for name, difference in differences.items():
        print(f"verify: {name}: max |source - converted| = {difference:.3e}")
    worst = max(differences.values(), key=lambda d: math.inf if math.isnan(d) else d)  # a NaN counts, wherever it is
    if not worst <= tolerance:
        raise ValueError(f"--verify failed: largest difference {worst:.3e} exceeds --tolerance {tolerance:g}.")


def verify_reload(converted, reloaded, tolerance: float, class_embedders: tuple | None = None) -> None:
    """`--verify` without the original code: the reloaded model against the converted one, once in every stage;
    a cross-attention model attends to its class context (``class_embedders``: the converted and reloaded ones)."""
    config = converted.config
    x = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=torch.manual_seed(0))
    labels = torch.zeros(1, dtype=torch.long)
    before_kwargs = {"class_labels": labels if config.num_class_embeds else None}
    after_kwargs = dict(before_kwargs)
    if class_embedders is not None:
        before_kwargs["encoder_hidden_states"] = class_embedders[0](labels)
        after_kwargs["encoder_hidden_states"] = class_embedders[1](labels)
    differences = {}
    with torch.no_grad():
        for stage, t in enumerate(probe_timesteps(converted.partition)):
            before, after = converted(x, t, **before_kwargs).sample, reloaded(x, t, **after_kwargs).sample
            differences[f"stage {stage}: reloaded vs converted (no --original_repo)"] = max_difference(before, after)
    report_verification(differences, tolerance)


def write_and_verify(
    args: argparse.Namespace,
    model,
    scheduler,
    folder: str,
    verify_original: Callable[[object], None],
    vae=None,
    class_embedder=None,
):
    """Write the converted ``model`` (and ``class_embedder``, for a cross-attention U-Net conditioned on classes) as a
    `MultiStagePipeline` in ``folder``, reload it strictly, and with `--verify` compare it with the original network
    (``verify_original(pipeline)``, with `--original_repo`) or with the model before saving (without). Returns the
    reloaded pipeline."""
    from diffusers_stages.pipelines import MultiStagePipeline

    MultiStagePipeline(unet=model.eval(), scheduler=scheduler, vae=vae, class_embedder=class_embedder).save_pretrained(
        folder
    )
    pipeline = MultiStagePipeline.from_pretrained(folder)
    if args.verify and args.original_repo:
        verify_original(pipeline)
    elif args.verify:
        embedders = None if class_embedder is None else (class_embedder, pipeline.class_embedder)
        verify_reload(model, pipeline.unet, args.tolerance, embedders)
    return pipeline


def run(main: Callable[[argparse.Namespace], object], parse_args: Callable, argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: a `ValueError` becomes a one-line error message and exit status 1."""
    try:
        main(parse_args(argv))
    except ValueError as error:
        sys.exit(f"error: {error}")
