"""Strict checkpoint loading: a checkpoint that disagrees with its config is an error, never random weights."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from diffusers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    _add_variant,
)

from ..hub import SaveThenPushMixin

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # ASCII only: no unicode look-alikes of the package's names
# copies of the q/k/v projections that `fuse_qkv_projections` adds and `save_pretrained` then writes: rebuilt from
# `to_q`/`to_k`/`to_v` by the next fusion, so a folder saved fused loads (as diffusers loads it) without them
FUSED_PROJECTIONS = (".to_qkv.", ".to_kv.", ".to_added_qkv.")
# an IP-Adapter's weights (`load_ip_adapter`: the image projection, each attention processor's `to_k_ip`/`to_v_ip`),
# which `save_pretrained` writes without the config entry that builds them: diffusers loads such a folder without them
IP_ADAPTER_WEIGHTS = ("encoder_hid_proj.image_projection_layers.", ".processor.to_k_ip.", ".processor.to_v_ip.")
# a weight index: `diffusion_pytorch_model.safetensors.index.json`, and a variant's, which diffusers names
# `diffusion_pytorch_model.safetensors.index.fp16.json` (`.bin` alike)
WEIGHT_INDEX = re.compile(r".+\.index(\.[^./]+)?\.json")
# the weight files a model folder is loaded from without `variant=`, in the order diffusers looks for them
PLAIN_WEIGHT_FILES = (SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# the files a network folder is read from as plain safetensors (no pickled `.bin`, no variant): diffusers' and
# transformers' names, a sharded checkpoint by its index (shards without one do not load)
PLAIN_SAFETENSORS_FILES = (
    SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, "model.safetensors", "model.safetensors.index.json",
)  # fmt: skip
CONFIG_FILES = ("config.json", "scheduler_config.json")  # a model's and a scheduler's: JSON objects (`read_json`)


class StrictLoadingMixin(SaveThenPushMixin):
    """Make `from_pretrained` refuse checkpoints with missing, unexpected or mis-shaped weights (and, through
    `SaveThenPushMixin`, make `save_pretrained(..., push_to_hub=True)` save the folder before pushing it).

    diffusers only *warns* about such keys and leaves missing weights freshly initialised (or on the ``meta``
    device). For a model whose parameter set follows from its config (the number of stages, the decoder widths),
    that silently yields a broken model, so here it raises a `ValueError` that names the keys.
    """

    # how a folder of another model class (its config's ``_class_name``) becomes this class: `other_class_error`
    _plain_class_conversions: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        check_model_dtype(kwargs)
        if kwargs.get("ignore_mismatched_sizes"):
            raise ValueError("`ignore_mismatched_sizes=True` is not supported: it would leave random weights behind.")
        path, subfolder = pretrained_model_name_or_path, kwargs.get("subfolder")
        config_file = os.path.join(str(path), subfolder or "", "config.json")
        if os.path.isfile(config_file):  # a local folder: a model of another class is named before anything is built
            check_subfolder(path, subfolder)  # (the folder's files are checked before any is read)
            check_folder_files(os.path.dirname(config_file))
            refuse_other_model_class(cls, read_json(config_file, "config.json"), path, subfolder)
        elif subfolder is None and os.path.isfile(os.path.join(str(path), "model_index.json")):
            refuse_pipeline_folder(cls, path)
        try:
            model, info = load_checked(super().from_pretrained, cls.__name__, path, kwargs)
        except (TypeError, ValueError) as error:
            if not os.path.isdir(str(path)):  # a Hub repository: its config is in the cache by now
                refuse_other_model_class(cls, _cached_config(cls, path, kwargs), path, subfolder, cause=error)
            raise
        realign_storage(model)
        return (model, info) if wants_info else model


class NotAModelFolderError(ValueError, OSError):
    """A pipeline folder given where a model folder is asked: a `ValueError` (bad input, named) that is also the
    `OSError` diffusers raised there ("no file named config.json"), so code that catches that keeps working."""


def refuse_pipeline_folder(cls: type, path: str | os.PathLike) -> None:
    """A `NotAModelFolderError` (a `ValueError`) for a local pipeline folder (``model_index.json``, no ``config.json``) given where a model
    folder is asked: it names the ``subfolder=`` to pass, the folder of a ``cls`` model where its ``config.json``
    names one, else every model folder. (diffusers' error said only that no config.json was found.)"""
    folders = sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name, "config.json")))
    own = []
    for name in folders:
        try:
            config = read_json(os.path.join(path, name, "config.json"), "config.json")
        except ValueError:
            continue
        if config.get("_class_name") == cls.__name__:
            own.append(name)
    calls = ", ".join(
        f"`{cls.__name__}.from_pretrained({str(path)!r}, subfolder={name!r})`" for name in own or folders
    )
    advice = f": load its model with {calls}" if calls else ", and it holds no model folder"
    raise NotAModelFolderError(f"{str(path)!r} is a pipeline folder (model_index.json), not a model folder{advice}.")


def _cached_config(cls: type, repo_id: str | os.PathLike | None, kwargs: dict) -> dict | None:
    """The config of Hub repository ``repo_id`` (with ``kwargs``' subfolder) from the cache, without any download;
    `None` where it is not there."""
    where = {k: kwargs[k] for k in ("cache_dir", "revision", "subfolder") if kwargs.get(k) is not None}
    try:
        return cls.load_config(str(repo_id), local_files_only=True, **where)
    except (OSError, ValueError):
        return None


def refuse_other_model_class(
    cls: type,
    config: object,
    path: str | os.PathLike | None,
    subfolder: str | None = None,
    cause: BaseException | None = None,
) -> None:
    """A `ValueError` where ``config`` (a saved folder's `config.json`) is that of another model class that diffusers
    or this package exports (its ``_class_name``; a base class of ``cls`` is fine, as diffusers loads one): it names
    that class and what to call instead, ``cls``'s conversion of it where ``cls._plain_class_conversions`` has one
    (``MultiStageUNet2DModel.from_unet(UNet2DModel.from_pretrained(...))``), else that class's own `from_pretrained`.
    Other configs pass. Nothing a config names is imported."""
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    from .. import models as package_models

    name = config.get("_class_name") if isinstance(config, dict) else None
    if name == cls.__name__:
        return
    other = exported_class(name, ModelMixin, [diffusers, package_models])
    if other is None or other in cls.__mro__:
        return
    args = repr(str(path)) + (f", subfolder={subfolder!r}" if subfolder else "")
    conversions = getattr(cls, "_plain_class_conversions", {})
    template = conversions.get(name, conversions.get("*", "load it with `{name}.from_pretrained({args})`"))
    where = repr(str(path)) + (f" (subfolder {subfolder!r})" if subfolder else "")
    raise ValueError(
        f"{where} holds a model of class {name} (`_class_name` of its config.json), not of class {cls.__name__}: "
        f"{template.format(cls=cls.__name__, name=name, args=args)}."
    ) from cause


def _cached_snapshot(repo_id: str | os.PathLike, kwargs: dict) -> str | None:
    """The local snapshot folder (with ``kwargs``' subfolder) of Hub repository ``repo_id`` that `from_pretrained`
    (called with ``kwargs``) has just loaded from, found in the cache without any download; `None`, with a warning
    that the integer-weights and link checks were skipped, where the cache does not say (a cache laid out by other
    tools)."""
    from huggingface_hub import snapshot_download

    where = {k: kwargs[k] for k in ("cache_dir", "revision") if kwargs.get(k) is not None}
    try:
        snapshot = snapshot_download(str(repo_id), local_files_only=True, **where)
    except (OSError, ValueError) as error:  # huggingface_hub's LocalEntryNotFoundError is both
        warnings.warn(
            f"The weights of {repo_id!r} were loaded, but its snapshot was not found in the Hub cache ({error}), so "
            "they were not checked for floating-point weights stored as integers (which diffusers casts silently) "
            "nor for files that link out of the repository's cache.",
            stacklevel=4,  # the caller of `from_pretrained`
        )
        return None
    folder = os.path.join(snapshot, kwargs.get("subfolder") or "")
    return folder if os.path.isdir(folder) else None


def check_dtype(dtype: Any, name: str, per_component: bool = True) -> None:
    """``dtype`` as the loaders take it: None, a `torch.dtype`, or (a pipeline's, ``per_component``) a
    ``{component or "default": torch.dtype}`` dict. diffusers only warns about anything else (transformers' spelling
    ``"float16"``) and loads it as float32."""
    values = list(dtype.values()) if per_component and isinstance(dtype, dict) else [dtype]
    if dtype is not None and not all(isinstance(value, torch.dtype) for value in values):
        raise ValueError(
            f"`{name}` must be a torch.dtype (torch.float16, ...)"
            + (" or a dict of them by component name and 'default'" if per_component else "")
            + f", got {dtype!r}."
        )


def check_model_dtype(kwargs: dict) -> None:
    """`check_dtype` of a model's ``from_pretrained`` options ``dtype`` and ``torch_dtype`` (one torch.dtype each)."""
    for name in ("dtype", "torch_dtype"):
        check_dtype(kwargs.get(name), name, per_component=False)


def refuse_mismatched_keys(info: dict, path: str | os.PathLike | None, class_name: str) -> None:
    """The strict key check: a `ValueError` naming the first missing, unexpected or mismatched keys of a
    `from_pretrained` loading ``info`` (fused projection copies and a loaded IP-Adapter's weights, see
    ``FUSED_PROJECTIONS`` and ``IP_ADAPTER_WEIGHTS``, are not unexpected: diffusers loads without them and names them
    in a warning)."""
    info = dict(info)
    ignored = FUSED_PROJECTIONS + IP_ADAPTER_WEIGHTS
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys", []) if not any(p in str(k) for p in ignored)]
    problems = {k: sorted(map(str, v))[:10] for k, v in info.items() if k.endswith("_keys") and v}
    if problems:
        raise ValueError(
            f"The checkpoint at {path} does not match its config for {class_name} (first keys shown): {problems}. "
            "Was `config.json` edited, or the weights saved from another configuration?"
        )


def check_weight_files(model: torch.nn.Module, folder: str | os.PathLike, read_pickles: bool = False) -> None:
    """The checks of the weight files ``model`` was just loaded from (``folder``) that diffusers' own loading info
    cannot give: `refuse_inconsistent_shards` and `refuse_non_float_weights`; ``.bin`` files only where the load read
    them (``read_pickles``: `reads_pickles`)."""
    refuse_inconsistent_shards(folder, read_pickles)
    refuse_non_float_weights(model, folder, read_pickles)


def reads_pickles(folder: str | os.PathLike, variant: str | None = None, use_safetensors: bool | None = None) -> bool:
    """Whether `from_pretrained` of ``folder`` (with ``variant`` and ``use_safetensors``) reads pickled ``.bin``
    weights: asked for (``use_safetensors=False``), or the first of the files diffusers looks for that the folder
    holds (`weight_file_names`, then without the variant, as diffusers falls back) is one; without any of them (a
    transformers model's ``model.safetensors`` / ``pytorch_model.bin``), when the folder holds no safetensors. The
    checks read no other ``.bin``: a pickle planted beside the safetensors that were loaded is never unpickled."""
    if use_safetensors is not None:
        return not use_safetensors
    names = set(os.listdir(folder))
    for candidate in dict.fromkeys((variant, None)):
        found = [name for name in weight_file_names(candidate) if name in names]
        if found:
            return ".bin" in found[0]
    return not any(name.endswith(".safetensors") for name in names)


def refuse_inconsistent_shards(folder: str | os.PathLike, read_pickles: bool = False) -> None:
    """A `ValueError` naming the shard and the keys where a sharded checkpoint of ``folder`` (each weight index,
    ``*.index.json`` or a variant's ``*.index.<variant>.json``, and the shards it names) holds other tensors than
    its index maps to each shard.

    diffusers takes a sharded checkpoint's keys from its index, not from the shards, so its missing and unexpected
    keys (`refuse_mismatched_keys`) cannot see a tensor missing from its shard (left on the ``meta`` device, or as
    uninitialised memory) or one the index does not list (ignored). Reads the safetensors headers only (``.bin``
    shards are memory-mapped onto the ``meta`` device with ``weights_only=True``, and only with ``read_pickles``: the
    load read them); a shard that is not there is left to diffusers, which names it."""
    for index_name in sorted(f for f in os.listdir(folder) if WEIGHT_INDEX.fullmatch(f)):
        if ".bin" in index_name and not read_pickles:  # a pickled checkpoint's index the load did not read
            continue
        weight_map = read_json(os.path.join(folder, index_name), index_name).get("weight_map")
        if not isinstance(weight_map, dict):  # named by `check_folder_files`
            continue
        listed: dict[str, set[str]] = {}
        for key, shard in weight_map.items():
            listed.setdefault(str(shard), set()).add(key)
        for shard, keys in sorted(listed.items()):
            path = os.path.join(folder, shard)
            if os.path.basename(shard) != shard or not os.path.isfile(path):
                continue
            if not shard.endswith(".safetensors") and not read_pickles:  # (never unpickled unless loaded)
                continue
            names = _tensor_names(path)
            if names is None:  # a `.bin` diffusers cannot have loaded either
                continue
            held = set(names)
            missing, unexpected = sorted(keys - held), sorted(held - keys)
            if missing or unexpected:
                raise ValueError(
                    f"The sharded checkpoint in {folder} does not match its index {index_name}: {shard} lacks "
                    f"{len(missing)} weights the index maps to it (first: {missing[:10]}) and holds {len(unexpected)} "
                    f"it does not list (first: {unexpected[:10]}). Is a shard corrupted or from another save?"
                )


def _tensor_headers(path: str) -> dict[str, tuple[str | torch.dtype, list[int]]] | None:
    """The tensors a weight file holds, by name, with their dtypes (safetensors' names, ``"F32"``, ``"I64"``, ...; a
    torch dtype for a ``.bin``) and shapes, read without loading any data: safetensors headers, or a ``.bin``
    unpickled with ``weights_only=True`` onto the ``meta`` device. `None` for a ``.bin`` that torch's weights-only
    unpickler refuses, or a ``.safetensors`` file safetensors cannot read: diffusers, which reads them the same way,
    cannot have loaded it (a planted or broken file never runs, nor stops the weights that were loaded)."""
    import pickle

    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, "pt") as weights:
                return {
                    k: (weights.get_slice(k).get_dtype(), weights.get_slice(k).get_shape()) for k in weights.keys()
                }
        except SafetensorError:
            return None
    try:
        try:
            state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except RuntimeError:  # a `.bin` of torch's legacy (not zip) format cannot be memory-mapped
            state = torch.load(path, map_location="meta", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        return None
    if not isinstance(state, dict):
        return {}
    return {str(k): (v.dtype, list(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _tensor_dtypes(path: str) -> dict[str, str | torch.dtype] | None:
    """The dtypes of the tensors a weight file holds, by name (see `_tensor_headers`; `None` for an unreadable file)."""
    headers = _tensor_headers(path)
    return None if headers is None else {k: dtype for k, (dtype, _) in headers.items()}


def _tensor_names(path: str) -> list[str] | None:
    """The tensor names a weight file holds (see `_tensor_headers`; `None` for an unreadable file)."""
    dtypes = _tensor_dtypes(path)
    return None if dtypes is None else list(dtypes)


def weight_file_names(variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The weight files (an index, or one file) a model folder is loaded from with ``variant`` and
    ``use_safetensors``, in the order diffusers looks for them: safetensors only with ``use_safetensors=True``,
    ``.bin`` only with ``False``, both (safetensors first) by default; `PLAIN_WEIGHT_FILES` without either."""
    if use_safetensors is None:
        names = PLAIN_WEIGHT_FILES
    elif use_safetensors:
        names = (SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME)
    else:
        names = (WEIGHTS_INDEX_NAME, WEIGHTS_NAME)
    return [_add_variant(name, variant) for name in names]


def refuse_without_plain_safetensors(folder: str | os.PathLike, where: str, advice: str) -> None:
    """A `ValueError` where the network ``folder`` holds none of `PLAIN_SAFETENSORS_FILES` (only a pickled ``.bin``,
    a variant's ``.fp16.safetensors``, shards without their index, or nothing: a folder that is not there): it says
    ``where`` (how the caller names the folder) holds no plain safetensors weights, which weight files it holds
    instead, and ``advice`` (what to do). Nothing is read but the folder's listing."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if any(name in PLAIN_SAFETENSORS_FILES for name in names):
        return
    held = [name for name in names if name.endswith((".safetensors", ".bin", ".json")) and name != "config.json"]
    raise ValueError(
        f"{where} holds no plain safetensors weights (one of {list(PLAIN_SAFETENSORS_FILES)}), only {held}: {advice}"
    )


def plain_weight_headers(
    folder: str | os.PathLike, variant: str | None = None, use_safetensors: bool | None = None
) -> dict[str, tuple[str | torch.dtype, list[int]]]:
    """The tensors (dtype, shape) that the weight files ``folder`` loads from (without a variant, or with
    ``variant`` and ``use_safetensors`` as `from_pretrained` takes them: `weight_file_names`) hold: the shards of its
    index, or its one file, read by `_tensor_headers` (headers only); empty when no file can be read."""
    candidates = weight_file_names(variant, use_safetensors)
    found = [n for n in candidates if os.path.isfile(os.path.join(folder, n))][:1]
    if found and found[0].endswith(".json"):  # the shards its index lists (a name leading elsewhere: the loader's)
        weight_map = read_json(os.path.join(folder, found[0]), found[0]).get("weight_map")
        shards = weight_map.values() if isinstance(weight_map, dict) else []
        found = sorted({s for s in shards if isinstance(s, str) and os.path.basename(s) == s})
    held = {}
    for name in found:
        if os.path.isfile(os.path.join(folder, name)):
            held.update(_tensor_headers(os.path.join(folder, name)) or {})
    return held


def first_shape_mismatch(
    model: torch.nn.Module, held: Mapping[str, tuple[str | torch.dtype, list[int]]]
) -> str | None:
    """The first tensor (by name) that a folder's weight files hold (``held``: their headers, `plain_weight_headers`)
    with another shape than ``model`` (built from the folder's config, on the ``meta`` device) has, said as "NAME has
    shape [...] there, [...] in the CLASS it builds"; None when every tensor both have fits, or no file could be
    read. Missing and unexpected tensors are left to the strict loading (diffusers renames some old ones as it
    loads)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(shapes.keys() & held.keys()):
        if list(held[key][1]) != shapes[key]:
            return f"{key} has shape {list(held[key][1])} there, {shapes[key]} in the {type(model).__name__} it builds"
    return None


def _is_float_dtype(dtype: str | torch.dtype) -> bool:
    return dtype.is_floating_point if isinstance(dtype, torch.dtype) else dtype.startswith(("F", "BF"))


BIN_WEIGHTS_PREFIX = "diffusion_pytorch_model"  # diffusers' `.bin` weight files (and their shards, variants)


def refuse_non_float_weights(model: torch.nn.Module, folder: str | os.PathLike, read_pickles: bool = False) -> None:
    """A `ValueError` naming the tensors of ``folder``'s weight files (safetensors, and, with ``read_pickles``: the
    load read them, diffusers' ``.bin`` files saved with ``safe_serialization=False``) that are stored as integers,
    booleans or complex numbers where ``model`` has floating-point weights (diffusers casts them silently: a corrupted
    checkpoint would load as truncated weights). Reads no tensor data (see `_tensor_dtypes`)."""
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    names = sorted(
        f
        for f in os.listdir(folder)
        if f.endswith(".safetensors") or (read_pickles and f.endswith(".bin") and f.startswith(BIN_WEIGHTS_PREFIX))
    )
    for name in names:
        dtypes = {k: d for k, d in (_tensor_dtypes(os.path.join(folder, name)) or {}).items() if k in floating}
        wrong = [f"{k}: {dtype}" for k, dtype in sorted(dtypes.items()) if not _is_float_dtype(dtype)]
        if wrong:
            raise ValueError(
                f"{name} in {folder} stores {len(wrong)} floating-point weights of {type(model).__name__} as another "
                f"type (first: {wrong[:5]}): is it corrupted?"
            )


def realign_storage(module: torch.nn.Module, alignment: int = 64) -> None:
    """Give every parameter and buffer that the loader left at an unaligned address storage of its own.

    Tensors that safetensors hands over can sit at any byte offset; CPU kernels pick different vectorised paths for
    unaligned data, which changes float rounding. Copying them to fresh (aligned) storage makes a reloaded model
    reproduce the saved model's outputs bit for bit, so the same seed gives the same images after a reload.

    The tensors are copied one at a time, and the pages of a tensor read from a memory-mapped safetensors file are
    handed back to the file right after its copy (nothing writes them: a later read would map them again), so that
    memory peaks at the parameters plus one tensor, not at twice the parameters.
    """
    mapped = _safetensors_mappings()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
                source = tensor.data
                tensor.data = source.clone()
                _release_pages(source, mapped)


MADV_DONTNEED = 4  # Linux's madvise advice: drop these pages (a file mapping's are read again from the file)


def _safetensors_mappings() -> list[tuple[int, int]]:
    """The address ranges where this process maps safetensors files (Linux's /proc/self/maps; none elsewhere): the
    only memory whose pages `_release_pages` may drop."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _release_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the resident pages that lie wholly under ``tensor``'s data if it sits in one of the file mappings
    ``mapped`` (the pages a neighbouring tensor shares are kept); a no-op otherwise."""
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in mapped):
        return
    import ctypes
    import mmap

    first, last = start + (-start) % mmap.PAGESIZE, end - end % mmap.PAGESIZE
    if last <= first:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def load_checked(load, class_name: str, path: str | os.PathLike | None, kwargs: dict) -> tuple:
    """``load(path, output_loading_info=True, **kwargs)`` (a `from_pretrained`) with the strict checks: for a local
    folder, a subfolder that leads out of it and files that do are refused before loading; after it, files of the Hub
    snapshot it was loaded from that link out of the repository's cache, missing, unexpected or mis-shaped weights,
    and floating-point weights stored as integers (read from the folder, or from the snapshot), are a `ValueError`
    naming them. Returns ``(model, loading info)``."""
    subfolder, name_or_path = kwargs.get("subfolder"), path
    folder = os.path.join(str(path), subfolder or "")
    if subfolder and os.path.isdir(str(path)):
        # a local folder's subfolder is loaded as a folder of its own: diffusers reads the folder's own weight file
        # before the subfolder's, and its config and weights when the subfolder is not there
        if not os.path.isdir(folder):
            raise ValueError(f"`subfolder` {subfolder!r} is not a folder of {path}: name one that is there.")
        check_subfolder(path, subfolder)
        path, kwargs = folder, {k: v for k, v in kwargs.items() if k != "subfolder"}
    if os.path.isdir(folder):
        from diffusers.models.modeling_utils import ModelMixin

        check_folder_files(folder)
        if (
            "config" not in kwargs
            and not os.path.isfile(os.path.join(folder, "config.json"))
            and not is_config_class(getattr(load, "__self__", None), ModelMixin)
        ):  # transformers 5 builds its default config for such a folder (diffusers raises its OSError, kept)
            raise ValueError(
                f"{folder} holds no config.json, which {class_name} is built from: save the model into it again "
                "(`save_pretrained`)."
            )
        refuse_config_of_other_sizes(
            getattr(load, "__self__", None), folder, class_name, kwargs.get("variant"), kwargs.get("use_safetensors")
        )
    try:
        model, info = load(path, output_loading_info=True, **kwargs)
    except (RuntimeError, ValueError) as error:
        # torch's "size mismatch", transformers 4's "... shape ...", transformers 5's "You set
        # `ignore_mismatched_sizes` to `False` ... look at the above report" (its load report names the weights)
        if any(text in str(error) for text in ("size mismatch", "shape", "ignore_mismatched_sizes")):
            raise ValueError(
                f"The checkpoint at {path} does not match its config for {class_name}: {error}"
            ) from error
        raise
    refuse_mismatched_keys(info, path, class_name)
    if path is not name_or_path and hasattr(model, "register_to_config"):  # (not a transformers model)
        model.register_to_config(_name_or_path=name_or_path)  # what diffusers records: the folder, not its subfolder
    if not os.path.isdir(folder):  # a Hub repository: the snapshot folder diffusers has just read
        folder = _cached_snapshot(path, kwargs)
        if folder is not None:  # its files may link to the repository's own blobs only
            check_folder_files(folder)
    if folder is not None:
        check_weight_files(model, folder, reads_pickles(folder, kwargs.get("variant"), kwargs.get("use_safetensors")))
    return model, info


def refuse_config_of_other_sizes(
    model_class: object,
    folder: str | os.PathLike,
    class_name: str,
    variant: str | None = None,
    use_safetensors: bool | None = None,
) -> None:
    """Before a diffusers model class (``model_class``, named ``class_name``; any other value is left alone) is
    loaded from the local ``folder``: build it from the folder's ``config.json`` on the ``meta`` device (no memory)
    and refuse, with the `ValueError` the strict loading gives a mis-shaped or missing weight, a tensor of another
    shape than the weight files the load reads hold (those of ``variant`` and ``use_safetensors``: `weight_file_names`;
    `first_shape_mismatch`, headers only), or weights the files lack of more than ``LACKING_BYTES`` and than the files' own size. diffusers builds the model in memory before it reads a weight,
    so a config edited to huge sizes (``block_out_channels: [65536, 65536]``, ``num_class_embeds: 2**26``) would
    otherwise be allocated (gigabytes) before being found not to fit. A config its class cannot build is left to the
    loader, which names it."""
    from diffusers.models.modeling_utils import ModelMixin

    config_file = os.path.join(str(folder), "config.json")
    if not (is_config_class(model_class, ModelMixin) and os.path.isfile(config_file)):
        return
    held = plain_weight_headers(folder, variant, use_safetensors)  # the files the load reads (`variant=`, ...)
    if not held:  # no weight files to measure the config by: the loader's
        return
    try:
        with torch.device("meta"), TensorBudget(len(held)):
            model = model_class.from_config(read_json(config_file, "config.json"))
    except TensorBudget.Exceeded as error:
        raise ValueError(f"The checkpoint at {folder} does not match its config for {class_name}: {error}") from None
    except CONFIG_VALUE_ERRORS:
        return
    mismatch = first_shape_mismatch(model, held)
    lacking = {k: v for k, v in model.state_dict().items() if k not in held}
    size = sum(v.numel() * v.element_size() for v in lacking.values())
    if mismatch is None and size > max(LACKING_BYTES, _bytes_on_disk(folder)):
        largest = sorted(lacking, key=lambda k: lacking[k].numel(), reverse=True)[:5]
        mismatch = (
            f"it builds {size / 2**30:.1f} GiB of weights its weight files lack (largest: {largest}), more than "
            "the folder's weight files hold"
        )
    if mismatch is not None:
        raise ValueError(f"The checkpoint at {folder} does not match its config for {class_name}: {mismatch}.")


class ConfigMisfit(NamedTuple):
    """What `config_misfit` found: ``builds`` is False where the config is one its class cannot take (``reason``:
    the class's error, ``"TypeError: ..."``), True where the model it builds does not fit the weight files
    (``reason``: a sentence naming the tensor, or saying that it builds far more tensors than they hold)."""

    builds: bool
    reason: str


def config_misfit(
    build: Callable[[], torch.nn.Module], held: Mapping[str, tuple[str | torch.dtype, list[int]]]
) -> ConfigMisfit | None:
    """Build a folder's model from its config without weights, as diffusers loads one (``build``, such as
    ``lambda: cls.from_config(config)``, run under accelerate's ``init_empty_weights``), stopped once it makes far
    more tensors than the folder's weight files hold (``held``: their headers, `plain_weight_headers`; no limit
    where none could be read: `TensorBudget`), and compare it with them (`first_shape_mismatch`): `None` where it
    fits, else the `ConfigMisfit` for the caller's `ValueError`. Reads no weight, allocates no memory for one."""
    from accelerate import init_empty_weights

    budget = TensorBudget(len(held)) if held else contextlib.nullcontext()
    try:
        with init_empty_weights(), budget:  # (a config edited to countless layers: named, not built)
            model = build()
    except TensorBudget.Exceeded as error:
        return ConfigMisfit(True, str(error))
    except CONFIG_VALUE_ERRORS as error:
        return ConfigMisfit(False, f"{type(error).__name__}: {error}")
    mismatch = first_shape_mismatch(model, held)
    return None if mismatch is None else ConfigMisfit(True, f"{mismatch}.")


class TensorBudget(torch.overrides.TorchFunctionMode):
    """Stop a model's construction (a `TensorBudget.Exceeded`) once it has made far more tensors (`torch.empty`,
    what every layer's weights are made with) than its weight files hold (``num_tensors``): a config edited to
    countless layers (``layers_per_block: 10**9``) would otherwise build for ever, even on the ``meta`` device."""

    class Exceeded(Exception):
        pass

    def __init__(self, num_tensors: int):
        super().__init__()
        self.num_tensors, self.made = num_tensors, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.empty:
            self.made += 1
            if self.made > 2 * self.num_tensors + 1000:
                raise self.Exceeded(
                    f"it builds more tensors than {self.made - 1}, far more than the {self.num_tensors} its weight "
                    "files hold (a size in its config.json such as `layers_per_block` edited?)."
                )
        return func(*args, **(kwargs or {}))


# the most memory of weights that a model's weight files lack (renamed keys of an old checkpoint, which diffusers
# converts) that `refuse_config_of_other_sizes` lets the loader allocate before the strict loading names them
LACKING_BYTES = 2**30


def _bytes_on_disk(folder: str | os.PathLike) -> int:
    """The size of the weight files in ``folder``."""
    return sum(e.stat().st_size for e in os.scandir(folder) if e.name.endswith((".safetensors", ".bin")))


def load_strictly(model_class: type, path: str | os.PathLike, subfolder: str | None = None, **kwargs):
    """``model_class.from_pretrained(path, subfolder=subfolder, **kwargs)``, as strict for diffusers' and
    transformers' own classes (a text encoder) as for the package's (which are strict themselves, by the same checks):
    a `ValueError` naming the keys if the checkpoint has missing or unexpected weights, which diffusers would leave on
    the ``meta`` device and transformers initialise at random, and naming the file if one links out of a local folder
    or stores non-float weights (which both would cast silently)."""
    if model_class.__module__.split(".")[0] not in ("diffusers", "transformers"):
        return model_class.from_pretrained(path, subfolder=subfolder, **kwargs)
    return load_checked(model_class.from_pretrained, model_class.__name__, path, {"subfolder": subfolder, **kwargs})[0]


# what a scheduler or model raises from inside for a config value it cannot take (a string step count, an unknown
# schedule or block type)
CONFIG_VALUE_ERRORS = (ValueError, TypeError, KeyError, IndexError, NotImplementedError, RuntimeError)


def load_scheduler(scheduler_class: type, path: str | os.PathLike, what: str):
    """``scheduler_class.from_pretrained(path)`` (a folder holding ``scheduler_config.json``; ``what`` names it, an
    option or a component), with a value the scheduler cannot take (a negative or a string step count, an unknown
    beta schedule) a `ValueError` naming ``what`` and the file, not an error from inside the scheduler. A local
    folder's files are checked first (`check_folder_files`: no link out of it)."""
    if os.path.isdir(path):
        check_folder_files(path)
    try:
        return scheduler_class.from_pretrained(path)
    except CONFIG_VALUE_ERRORS as error:
        raise ValueError(
            f"{what}: {os.path.join(str(path), 'scheduler_config.json')!r} does not build a "
            f"{scheduler_class.__name__}: {type(error).__name__}: {error}"
        ) from error


def constructor_options(cls: type, config: Mapping) -> dict:
    """The entries of ``config`` that ``cls``'s constructor takes: a key diffusers ignored when it built a model (a
    folder saved by another diffusers version keeps it in ``model.config``) and private ``_`` keys are no part of
    its architecture."""
    arguments = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in arguments and not k.startswith("_")}


# VAE options that change how it is run, not its latents: the same weights saved with another tiling size or decoding
# precision are one latent space (the first source's VAE, whose options the pipeline keeps, is used)
SAMPLING_OPTIONS = ("sample_size", "force_upcast")


def check_same_vae(vae, other, path: str) -> None:
    """Refuse ``other`` (the VAE of source ``path``) unless it is ``vae``: the same class, options (a
    ``scaling_factor`` too: it sets the latents' scale; not `SAMPLING_OPTIONS`) and weights (or their float16/bfloat16 copy)."""
    options = [
        k
        for k, v in constructor_options(type(vae), vae.config).items()
        if k not in SAMPLING_OPTIONS and v != other.config.get(k)
    ]
    first, second = vae.state_dict(), other.state_dict()
    same_weights = first.keys() == second.keys() and all(_same_weights(first[k], second[k]) for k in first)
    if type(vae) is not type(other) or options or not same_weights:
        raise ValueError(
            f"{path} has another VAE than the first latent source ({sorted(options) or 'its class or weights'} "
            "differ): experts must share one latent space."
        )


def _same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor, or the same one saved at half precision (a `--mixed_precision fp16|bf16` run saves the VAE it
    encoded with in that dtype; it loads as float32): equal once both are rounded to that precision."""
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() and b.is_floating_point() and a.shape == b.shape):
        return False
    a, b = a.float(), b.float()
    if any(torch.equal(a.to(d), b.to(d)) for d in (torch.float16, torch.bfloat16)):
        return True
    # a float16 copy and a bfloat16 copy (runs of each precision): neither rounds to the other, but both round the
    # same weights, so they lie within their two rounding errors of each other
    for half, brain in ((a, b), (b, a)):
        if torch.equal(half, half.half().float()) and torch.equal(brain, brain.bfloat16().float()):
            return bool(((half - brain).abs() <= _half_ulp(half, 11, 2.0**-24) + _half_ulp(brain, 8, 0.0)).all())
    return False


def _half_ulp(x: torch.Tensor, precision: int, subnormal_ulp: float) -> torch.Tensor:
    """Half the spacing of a floating-point format of ``precision`` significand bits around ``x`` (the larger one at
    a power of two; at least half of ``subnormal_ulp``): the most that rounding to it moved a value."""
    _, exponent = torch.frexp(x)
    spacing = torch.where(x == 0, subnormal_ulp, torch.exp2(exponent.float() - precision))  # frexp(0): exponent 0
    return torch.clamp(spacing, min=subnormal_ulp) / 2


def read_json(path: str, argument: str) -> dict:
    """The JSON object in file ``path`` (given as ``argument``: a command-line option, or the file's role such as
    ``model_index.json``), or a `ValueError` that says why not."""
    if not os.path.isfile(path):
        raise ValueError(f"`{argument}` must be an existing JSON file, got {path!r}.")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{argument}` {path} is not JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"`{argument}` {path} must hold a JSON object.")
    return config


def exported_class(name: object, base: type, libraries: Sequence[object]) -> type | None:
    """The class that the first of ``libraries`` (imported modules, such as ``diffusers``) exporting one as ``name``
    exports, if it is a subclass of ``base`` built from a config (see `is_config_class`); `None` for any other name
    or value. This is how a config's ``_class_name`` is read: an attribute of a library already imported, never a
    module imported by name."""
    if not isinstance(name, str):
        return None
    for library in libraries:
        cls = getattr(library, name, None)
        if is_config_class(cls, base):
            return cls
    return None


def is_config_class(cls: object, base: type | tuple[type, ...]) -> bool:
    """Whether ``cls`` is a subclass of ``base`` that diffusers builds from a config (a `ConfigMixin`): diffusers
    also exports its base classes (``ModelMixin``, ``SchedulerMixin``), which a folder may name but which have no
    config to load (an `AttributeError` deep inside `from_pretrained`)."""
    from diffusers.configuration_utils import ConfigMixin

    return isinstance(cls, type) and issubclass(cls, base) and issubclass(cls, ConfigMixin)


def check_name(value: object, what: str, dotted: bool = False) -> str:
    """``value`` if it is a plain ASCII identifier (dotted module path when ``dotted``); a `ValueError` naming
    ``what`` otherwise. Every class, module and folder name read from a saved folder goes through here, so that no
    name can carry code, a path (``..``, ``/``) or a look-alike of one of the package's names."""
    parts = value.split(".") if dotted and isinstance(value, str) else [value]
    if not all(isinstance(part, str) and NAME.fullmatch(part) for part in parts):
        raise ValueError(
            f"{what} must be a plain {'module path' if dotted else 'name'} (ASCII identifier), got {value!r}."
        )
    return value


def check_folder_files(folder: str | os.PathLike) -> None:
    """Refuse a saved model folder whose files lead out of it or that `from_pretrained` would misread: a `ValueError`
    naming the file for a symbolic link to a file outside the folder (a Hub cache snapshot's links to its own blobs
    are fine; sub-folders are checked by `component_folder`), a `config.json` or `scheduler_config.json` that is not
    a JSON object, or a weight index (``*.index.json``, a variant's ``*.index.<variant>.json``) whose ``weight_map``
    is not an object of plain file names in the folder."""
    roots = _allowed_roots(folder)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        target = os.path.realpath(entry.path)
        inside = any(target.startswith(os.path.join(root, "")) for root in roots)
        if entry.is_symlink() and not entry.is_dir() and not inside:
            raise ValueError(f"{entry.name!r} in {folder} links to {target!r}, outside the folder: refused.")
        if entry.name in CONFIG_FILES and entry.is_file():
            read_json(entry.path, entry.name)
        elif WEIGHT_INDEX.fullmatch(entry.name) and entry.is_file():
            weight_map = read_json(entry.path, entry.name).get("weight_map")
            names = weight_map.values() if isinstance(weight_map, dict) else [weight_map]
            if not all(isinstance(n, str) and n not in ("", ".", "..") and os.path.basename(n) == n for n in names):
                raise ValueError(
                    f"The `weight_map` of {entry.name} in {folder} must map each weight to a file name in the folder, "
                    f"got {weight_map!r}."
                )


def _allowed_roots(folder: str | os.PathLike) -> list[str]:
    """Where the files of ``folder`` may lead: the folder itself and, for a folder inside a Hub cache snapshot
    (``.../snapshots/<revision>/...``), the repository's ``blobs`` folder that huggingface_hub links to."""
    real = os.path.realpath(folder)
    roots, parts = [real], real.split(os.sep)
    if "snapshots" in parts[1:-1]:
        last = len(parts) - 1 - parts[::-1].index("snapshots")
        if parts[last - 1].startswith(("models--", "datasets--", "spaces--")):
            roots.append(os.sep.join([*parts[:last], "blobs"]))
    return roots


def check_subfolder(root: str | os.PathLike, subfolder: str | None) -> None:
    """Refuse a ``subfolder`` of the local folder ``root`` that leads out of it (a symbolic link to another folder,
    ``..``, an absolute path): a `ValueError` naming it, as the files read from there would be another folder's."""
    if not subfolder:
        return
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root, subfolder))
    if not target.startswith(os.path.join(real_root, "")):
        raise ValueError(
            f"`subfolder` {subfolder!r} of {root} leads to {target!r}, outside the folder: refused (load that folder "
            "itself if you trust it)."
        )


def component_folder(root: str | os.PathLike, name: str) -> str:
    """The sub-folder ``name`` of a saved folder, refused unless it is a real directory inside ``root`` (a symbolic
    link that leads elsewhere is refused too) whose files pass `check_folder_files`."""
    check_name(name, "component folder name")
    path = os.path.join(root, name)
    inside = os.path.realpath(path).startswith(os.path.join(os.path.realpath(root), ""))
    if not os.path.isdir(path) or not inside:
        raise ValueError(f"Component folder {name!r} must be a directory inside {root}, got {path!r}.")
    check_folder_files(path)
    return path


REEXPORT_HEADER = (
    "# Written by diffusers-stages so that diffusers finds this class; needs diffusers-stages installed.\n"
    "# It is not on a package index: install it with `pip install .` in a clone of its repository.\n"
)


def reexport_source(module: str, class_name: str) -> str:
    """The tiny ``.py`` file a saved folder carries so that diffusers' remote-code loaders (used only with
    ``trust_remote_code=True``) find one of the package's classes: it imports the installed class, nothing else."""
    return f"{REEXPORT_HEADER}from {module} import {class_name}  # noqa: F401\n"


DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")
WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.md")  # configs and weights, never code


def download_weights(
    repo_id: str, prefixes: Sequence[str] = ("",), files: Sequence[str] = (), **download_kwargs
) -> str:
    """Fetch configs and weights (never a code file) under each of ``prefixes`` (``"unet/"``, ...) and the exact
    ``files`` of a Hub repository; the local snapshot folder. `.bin` weights are fetched only for a repository saved
    with ``safe_serialization=False`` (no safetensors), and are read with ``weights_only=True``."""
    from huggingface_hub import snapshot_download

    patterns = [*files, *(f"{prefix}{pattern}" for prefix in prefixes for pattern in WEIGHT_PATTERNS)]
    folder = snapshot_download(repo_id, allow_patterns=patterns, **download_kwargs)
    # under each prefix only: the snapshot also holds whatever else of the repository was fetched before
    bare = [prefix for prefix in prefixes if not _holds_safetensors(os.path.join(folder, prefix))]
    if bare:
        patterns += [f"{prefix}*.bin" for prefix in bare]
        folder = snapshot_download(repo_id, allow_patterns=patterns, **download_kwargs)
    return folder


def _holds_safetensors(folder: str) -> bool:
    return any(name.endswith(".safetensors") for _, _, names in os.walk(folder) for name in names)
