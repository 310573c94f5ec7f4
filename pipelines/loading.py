"""Loading a saved pipeline folder as the package's own classes, without executing any file from the folder.

A saved folder names its pipeline and components in `model_index.json` and carries tiny re-export ``.py`` files, so
that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works for users who choose to trust it.
Loading through the package's classes (`MultiStagePipeline.from_pretrained(folder)`, ...) never reads those files:
every name in `model_index.json` is checked against an allow-list (the package's own classes, and diffusers' and
transformers' classes by their exported names), each component is loaded by the class the package resolved itself,
and the pipeline is built from them. Folder and file names read from the folder are treated as hostile input.
"""

from __future__ import annotations

import inspect
import json
import os
import traceback
import types
from collections.abc import Mapping
from typing import Any

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    _add_variant,
    is_transformers_version,
)
from diffusers.utils.deprecation_utils import _maybe_remap_transformers_class

from ..hub import is_missing_local_path
from ..models.loading import (
    DOWNLOAD_KWARGS,
    NAME,
    check_dtype,
    check_folder_files,
    check_name,
    component_folder,
    download_weights,
    is_config_class,
    load_checked,
    load_scheduler,
    load_strictly,
    read_json,
    realign_storage,
    reexport_source,
)

# options of diffusers' `DiffusionPipeline.from_pretrained` these loaders do not implement, with their defaults: taken
# at the default (wrappers pass them along), a `ValueError` naming them otherwise
UNSUPPORTED_OPTIONS = {
    "proxies": None,
    "custom_revision": None,
    "provider": None,
    "sess_options": None,
    "provider_options": None,
    "max_memory": None,
    "offload_folder": None,
    "offload_state_dict": None,
    "use_onnx": None,
    "load_connected_pipeline": False,
    "quantization_config": None,
    "use_flashpack": False,
    "dduf_file": None,
}
# passed on to each model
MODEL_KWARGS = ("torch_dtype", "variant", "use_safetensors", "low_cpu_mem_usage", "disable_mmap", "device_map")


def package_classes() -> dict[str, type]:
    """The allow-list: every pipeline and model class the package exports, and its schedulers, by name."""
    from .. import models, pipelines, schedulers

    found = {}
    for namespace in (models, pipelines):
        for name in namespace.__all__:
            obj = getattr(namespace, name)
            if isinstance(obj, type) and issubclass(obj, (ModelMixin, diffusers.DiffusionPipeline)):
                found[name] = obj
    for name, obj in vars(schedulers).items():  # the scheduler classes defined in `diffusers_stages.schedulers`
        if isinstance(obj, type) and issubclass(obj, SchedulerMixin) and obj.__module__ == schedulers.__name__:
            found[name] = obj
    return found


def resolve_component_class(name: str, entry: Any) -> type | None:
    """The class a ``[library, class]`` component entry names, from the allow-list only (``None`` for ``[null,
    null]``); anything else is a `ValueError` that names the entry."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is None and entry[1] is None:
        return None
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
        raise ValueError(f"`model_index.json` entry {name!r} must be [library, class], got {entry!r}.")
    library, class_name = entry
    check_name(class_name, f"class of component {name!r}")
    check_name(library, f"library of component {name!r}", dotted=True)
    if library.split(".")[0] == "diffusers_stages":
        cls = package_classes().get(class_name)
        if cls is None or library not in (cls.__module__, "diffusers_stages"):
            raise ValueError(
                f"Component {name!r} names {library}.{class_name}, which is not one of diffusers-stages' classes "
                f"({sorted(package_classes())})."
            )
        return cls
    if library in ("diffusers", "transformers"):
        # a class transformers 5 removed, renamed as diffusers' loader does (SD 1.x's CLIPFeatureExtractor)
        if library == "transformers":
            class_name = _maybe_remap_transformers_class(class_name) or class_name
        cls = getattr(diffusers if library == "diffusers" else _transformers(), class_name, None)
        # (diffusers' classes built from a config: not its base classes `ModelMixin`, `SchedulerMixin`)
        loadable = is_config_class if library == "diffusers" else _is_subclass
        if loadable(cls, _loadable_bases()):
            return cls
        raise ValueError(f"Component {name!r} names {library}.{class_name}, which is not a loadable {library} class.")
    raise ValueError(
        f"Component {name!r} comes from {library!r}, which is neither diffusers, transformers nor diffusers-stages: "
        "if you trust the folder's code, load it with `DiffusionPipeline.from_pretrained(folder, "
        "trust_remote_code=True)`."
    )


def pipeline_module_class(entry: Any) -> type | None:
    """The class a ``[module, class]`` entry names from one of diffusers' own pipeline modules (Stable Diffusion 1.x's
    ``["stable_diffusion", "StableDiffusionSafetyChecker"]``), as diffusers' loader resolves it; `None` for any other
    entry. Nothing but diffusers' own pipeline modules is imported."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
        return None
    if not all(NAME.fullmatch(x) for x in entry):
        return None
    module = getattr(diffusers.pipelines, entry[0], None)
    if not (isinstance(module, types.ModuleType) and module.__name__.startswith("diffusers.pipelines.")):
        return None
    cls = getattr(module, entry[1], None)
    return cls if isinstance(cls, type) else None


def load_transformers_components(
    path: str | os.PathLike,
    index: dict,
    pipeline_class: type,
    names: tuple[str, ...] | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> dict:
    """The components of the diffusers pipeline folder or Hub repository ``path`` (``index``: its `model_index.json`)
    that are transformers models (text encoders, Stable Diffusion 1.x's safety checker), of ``names`` (default: all),
    loaded strictly from safetensors in ``dtype`` (`None`: transformers' default) with `load_strictly`: diffusers'
    pipeline loader leaves them to transformers, which initialises a missing weight at random and casts integer
    weights silently."""
    from transformers import PreTrainedModel

    # transformers 4.56 renamed `torch_dtype` `dtype` (before, `dtype=` reaches the model's constructor: a TypeError)
    dtype_option = "dtype" if is_transformers_version(">=", "4.56.0") else "torch_dtype"
    options = {"use_safetensors": True, **({} if dtype is None else {dtype_option: dtype})}
    models = {}
    for name in pipeline_class._get_signature_keys(pipeline_class)[0]:
        entry = index.get(name)
        if names is not None and name not in names:
            continue
        cls = pipeline_module_class(entry)
        if cls is None and isinstance(entry, (list, tuple)) and entry[:1] == ["transformers"]:
            cls = resolve_component_class(name, entry)
        if cls is not None and issubclass(cls, PreTrainedModel):
            check_component_type(pipeline_class, name, cls)
            models[name] = load_strictly(cls, path, name, **options)
    return models


def check_tokenizer(tokenizer, text_encoder, where: str) -> None:
    """Refuse a loaded ``tokenizer`` that cannot encode prompts for ``text_encoder``, which transformers loads without a
    word: from a folder without its vocabulary files (or none at all), a tokenizer of its special tokens only (every
    prompt encoded as end-of-text tokens); without ``tokenizer_config.json``, one that pads to transformers' default
    ``model_max_length`` (about 1e30: an OverflowError at the first prompt). ``where`` names it in the error
    (``"`--source` 'sd': its tokenizer"``)."""
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(
            f"{where} holds no vocabulary ({len(tokenizer)} tokens, all special: {tokenizer.all_special_tokens}): its "
            "folder is missing or lacks its vocabulary files (tokenizer.json, or vocab.json and merges.txt). Save the "
            "tokenizer into it again (`tokenizer.save_pretrained`)."
        )
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if isinstance(positions, int) and tokenizer.model_max_length > positions:
        raise ValueError(
            f"{where} pads text to `model_max_length` {tokenizer.model_max_length}, more than the {positions} "
            "positions of its text encoder (`max_position_embeddings`): its tokenizer_config.json is missing or gives "
            f"no `model_max_length`. Set it to {positions} there."
        )


def _is_subclass(cls: object, bases: tuple[type, ...]) -> bool:
    return isinstance(cls, type) and issubclass(cls, bases)


def _transformers():
    import transformers

    return transformers


def _loadable_bases() -> tuple[type, ...]:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.image_processing_utils import ImageProcessingMixin

    return (ModelMixin, SchedulerMixin, ConfigMixin, PreTrainedModel, PreTrainedTokenizerBase, ImageProcessingMixin)


def resolve_pipeline_class(cls: type, class_entry: Any) -> type:
    """The pipeline class `model_index.json` names (``"Class"`` or ``["file", "Class"]``), checked against the
    allow-list and against the class ``from_pretrained`` was called on; a folder naming that class itself (a user's
    subclass of a package pipeline, as diffusers loads ``MyDDIM.from_pretrained(folder)``) is loaded as it, which
    imports nothing from the folder."""
    if (
        isinstance(class_entry, (list, tuple))
        and len(class_entry) == 2
        and all(isinstance(x, str) for x in class_entry)
    ):
        check_name(class_entry[0], "`_class_name` file")
        class_name = class_entry[1]
    elif isinstance(class_entry, str):
        class_name = class_entry
    else:
        raise ValueError(f"`_class_name` in `model_index.json` must be a class name, got {class_entry!r}.")
    check_name(class_name, "`_class_name`")
    if class_name == cls.__name__ and issubclass(cls, diffusers.DiffusionPipeline):
        return cls  # the caller's own class, already imported
    pipeline_class = package_classes().get(class_name)
    if pipeline_class is None or not issubclass(pipeline_class, diffusers.DiffusionPipeline):
        raise ValueError(
            f"`_class_name` {class_name!r} is not one of diffusers-stages' pipelines; load the folder with its own "
            "pipeline class."
        )
    if not issubclass(pipeline_class, cls):
        raise ValueError(
            f"The folder holds a {class_name}, not a {cls.__name__}: load it with {class_name}.from_pretrained."
        )
    return pipeline_class


def check_component_type(pipeline_class: type, name: str, component_class: type | None) -> None:
    """Refuse a component whose class does not fit the pipeline's signature (a plain `UNet2DModel` as a
    multi-stage ``unet`` would load with random decoders)."""
    expected = pipeline_class._get_signature_types().get(name, (inspect.Signature.empty,))
    types = tuple(t for t in expected if isinstance(t, type) and t is not type(None))
    if component_class is None or not types or inspect.Signature.empty in expected:
        return
    if not issubclass(component_class, types):
        raise ValueError(
            f"Component {name!r} of this folder is a {component_class.__name__}, but {pipeline_class.__name__} needs "
            f"{' or '.join(t.__name__ for t in types)}."
        )


def load_component(folder: str, name: str, component_class: type, kwargs: dict) -> Any:
    """One component through its own class's `from_pretrained`, with the model options that apply to it."""
    check_name(name, "component folder name")
    if not os.path.lexists(os.path.join(folder, name)):  # (renamed or deleted: named as such, not as a bad folder)
        folders = sorted(f for f in os.listdir(folder) if os.path.isdir(os.path.join(folder, f)))
        raise ValueError(
            f"`model_index.json` of {folder} names the component {name!r} ({component_class.__name__}), but the folder "
            f"has no {name}/ folder (its folders: {folders}): restore it under that name, or pass the component to "
            f"`from_pretrained` (`{name}=...`)."
        )
    path = component_folder(folder, name)
    if issubclass(component_class, SchedulerMixin):
        return load_scheduler(component_class, path, f"Component {name!r}")
    if not _is_model(component_class):
        return component_class.from_pretrained(path)
    options = {k: kwargs[k] for k in MODEL_KWARGS if kwargs.get(k) is not None}
    dtype = options.get("torch_dtype")
    if isinstance(dtype, dict):
        options["torch_dtype"] = dtype.get(name, dtype.get("default"))
        if options["torch_dtype"] is None:
            options.pop("torch_dtype")
    if "variant" in options and not _has_variant(path, options["variant"]):
        options.pop("variant")  # as diffusers: a component without files of this variant loads its default files
    if issubclass(component_class, ModelMixin) and component_class.__module__.split(".")[0] == "diffusers":
        # diffusers' own models, as strictly as the package's: missing or unexpected keys are an error (diffusers
        # only warns, and leaves the missing weights on the `meta` device)
        # (and shards against their index; diffusers casts integer weights silently)
        model = load_checked(component_class.from_pretrained, component_class.__name__, path, options)[0]
    else:
        model = component_class.from_pretrained(path, **options)
    realign_storage(model)  # bit-identical outputs after a reload: same seed, same images
    return model


def _is_model(component_class: type) -> bool:
    from transformers import PreTrainedModel

    return issubclass(component_class, (ModelMixin, PreTrainedModel))


def check_variant(folder: str, index: dict, variant: str | None) -> None:
    """As diffusers: a ``variant`` that no component folder of the saved pipeline has files of is a `ValueError`
    (a component without them loads its default files, but a pipeline with none would load only default weights)."""
    if variant is None:
        return
    names = [name for name in index if not name.startswith("_") and isinstance(name, str) and NAME.fullmatch(name)]
    folders = [os.path.join(folder, name) for name in names if os.path.isdir(os.path.join(folder, name))]
    if not any(_has_variant(path, variant) for path in folders):
        raise ValueError(
            f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are "
            f"available in {folder}."
        )


def _has_variant(path: str, variant: str) -> bool:
    """Whether any weight file under ``path`` (expert sub-folders included) is of ``variant``."""
    for _, _, files in os.walk(path):
        if any(f".{variant}." in f for f in files):
            return True
    return False


def check_device_map(cls: type, kwargs: dict) -> str | None:
    """The pipeline's ``device_map`` as diffusers takes it: one device (``"cpu"``, or the accelerator diffusers
    found) that every model loaded from the folder is put on; `None` without one. diffusers' ``"balanced"``
    (components spread over several accelerators) and anything else are a `ValueError`, and so is
    ``low_cpu_mem_usage=False`` with a device map (as in diffusers)."""
    from diffusers.pipelines.pipeline_utils import SUPPORTED_DEVICE_MAP

    device_map = kwargs.get("device_map")
    if device_map is None:
        return None
    devices = list(
        dict.fromkeys(d for d in SUPPORTED_DEVICE_MAP if d != "balanced")
    )  # "cpu" twice without an accelerator
    if not isinstance(device_map, str) or device_map not in devices:
        raise ValueError(
            f"`device_map` of {cls.__name__}.from_pretrained must be one of {devices} (every model on that device), "
            f"got {device_map!r}; to spread the components over devices use `enable_model_cpu_offload()`."
        )
    if kwargs.get("low_cpu_mem_usage") is False:
        raise ValueError(
            f"You cannot set `low_cpu_mem_usage` to False while using device_map={device_map} for loading and "
            "dispatching the pipeline's models."
        )
    return device_map


def check_dtype_components(pipeline_class: type, dtype: Any, name: str) -> None:
    """A `ValueError` where ``dtype`` (the ``name`` option of ``pipeline_class.from_pretrained``) is a per-component
    dict naming a component the pipeline lacks: diffusers ignores such a name and loads that model as float32."""
    if not isinstance(dtype, dict):
        return
    expected = pipeline_class._get_signature_keys(pipeline_class)[0]
    unknown = sorted(set(dtype) - set(expected) - {"default"})
    if unknown:
        raise ValueError(
            f"`{name}` names components {pipeline_class.__name__} does not have: {unknown} (its components: "
            f"{sorted(expected)}, or 'default')."
        )


def check_trusted_load_dtypes(cls: type | None, kwargs: dict) -> None:
    """The package's checks of ``dtype``/``torch_dtype`` (`check_dtype`, and `check_dtype_components` against
    pipeline class ``cls`` unless it is `None`) for a load that diffusers' own loader makes (``trust_remote_code=True``),
    which would load a string such as ``"float16"``, or a dict naming a component the pipeline lacks, as float32
    silently."""
    for name in ("dtype", "torch_dtype"):
        check_dtype(kwargs.get(name), name)
        if cls is not None:
            check_dtype_components(cls, kwargs.get(name), name)


def trusted_variant_error(error: IndexError, cls_name: str, variant: str | None) -> ValueError | None:
    """The `ValueError` for diffusers' `IndexError` in a ``trust_remote_code=True`` load of ``variant``: its variant
    lookup (`_identify_model_variants`) reads every entry of a component folder as a file name with a dot, and fails on
    a folder of sub-folders (an `ExpertRoutingModel`'s ``expert_0/``, ...). None for any other `IndexError`."""
    frames = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    if variant is None or "_identify_model_variants" not in frames:
        return None
    return ValueError(
        f"`variant`={variant!r} cannot be loaded with `trust_remote_code=True`: diffusers' own loader reads every entry "
        "of a component folder as a file name with a dot (`_identify_model_variants`), and fails on the sub-folders "
        "of a component that holds several models (an ExpertRoutingModel's `expert_0/`, ...). Load it with "
        f"`{cls_name}.from_pretrained(folder, variant={variant!r})` without `trust_remote_code` (no file of the "
        "folder is run), or save it without a variant."
    )


def _model_folder_hint(folder: str) -> str:
    """For a local model folder (a ``config.json``) given where a pipeline folder is asked: the pipeline folder it
    belongs to, else the model class whose ``from_pretrained`` loads it (its config's ``_class_name``, only read)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return ""
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.isfile(os.path.join(parent, "model_index.json")):
        shown = os.path.normpath(os.path.join(folder, os.pardir))
        return f" It is the {os.path.basename(os.path.abspath(folder))}/ model folder of the pipeline folder {shown!r}: load that."
    try:
        name = read_json(config_path, "config.json").get("_class_name")
    except ValueError:
        name = None
    loader = (
        f"`{name}.from_pretrained({folder!r})`" if isinstance(name, str) and name.isidentifier() else "its model class"
    )
    return f" It is a model folder: load it with {loader}."


def load_pipeline(cls: type, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
    """Build ``cls`` (or the package pipeline subclass the folder names) from a saved folder or Hub repository."""
    if kwargs.get("custom_pipeline") is not None:
        raise ValueError(
            f"`custom_pipeline` is not supported by {cls.__name__}.from_pretrained, got {kwargs['custom_pipeline']!r}."
        )
    for key, default in UNSUPPORTED_OPTIONS.items():
        if key in kwargs and kwargs.pop(key) not in (default, None):
            raise ValueError(f"`{key}` is not supported by {cls.__name__}.from_pretrained (only its default).")
    device_map = check_device_map(cls, kwargs)
    dtype_name = "dtype" if kwargs.get("dtype") is not None else "torch_dtype"  # the name the caller used
    if kwargs.get("dtype") is not None:  # diffusers 0.42's name; `torch_dtype` is the deprecated one
        if kwargs.get("torch_dtype") is not None:
            raise ValueError("You have passed both `dtype` and `torch_dtype`. Please only pass `dtype`.")
        kwargs["torch_dtype"] = kwargs.pop("dtype")
    kwargs.pop("dtype", None)
    check_dtype(kwargs.get("torch_dtype"), dtype_name)
    folder = str(pretrained_model_name_or_path)
    from_hub = not os.path.isdir(folder)
    if is_missing_local_path(folder):
        raise ValueError(
            f"{folder!r} is not a folder (nor a Hub repository id, 'namespace/name'): check the path of the saved "
            "pipeline folder (the one that holds model_index.json)."
        )
    if from_hub:
        folder = download_weights(folder, **{k: kwargs.pop(k) for k in DOWNLOAD_KWARGS if k in kwargs})
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        # offline (`local_files_only`, `HF_HUB_OFFLINE`) the cache holds only what earlier loads fetched
        partly = f" in the Hub cache ({folder}), or only part of it is there: load it once online" if from_hub else ""
        hint = "" if from_hub else _model_folder_hint(folder)
        raise ValueError(
            f"{pretrained_model_name_or_path} has no `model_index.json`: it is not a saved pipeline{partly}.{hint}"
        )
    check_folder_files(folder)
    index = read_json(index_path, "model_index.json")
    pipeline_class = resolve_pipeline_class(cls, index.get("_class_name"))
    check_variant(folder, index, kwargs.get("variant"))

    # 1. every component: passed by the caller, or loaded by the class the allow-list gives for its entry
    expected, optional = pipeline_class._get_signature_keys(pipeline_class)
    check_dtype_components(pipeline_class, kwargs.get("torch_dtype"), dtype_name)
    init_kwargs, loaded = {}, set()  # the components built from the folder (the others were passed)
    for name in expected:
        if name in kwargs:
            init_kwargs[name] = kwargs.pop(name)
            continue
        if name not in index:
            if name in pipeline_class._optional_components:
                continue
            raise ValueError(f"`model_index.json` of {pretrained_model_name_or_path} has no {name!r} component.")
        component_class = resolve_component_class(name, index[name])
        if component_class is None and name not in pipeline_class._optional_components:
            raise ValueError(
                f"`model_index.json` of {pretrained_model_name_or_path} saves the component {name!r} as null, but "
                f"{pipeline_class.__name__} needs it: pass `{name}=...` to `from_pretrained`."
            )
        check_component_type(pipeline_class, name, component_class)
        init_kwargs[name] = None if component_class is None else load_component(folder, name, component_class, kwargs)
        loaded.add(name)
    unknown = sorted(k for k in index if not k.startswith("_") and k not in expected and k not in optional)
    if unknown:
        raise ValueError(f"`model_index.json` names components {pipeline_class.__name__} does not have: {unknown}.")

    # 2. saved settings (e.g. the dual backbone's switch), then the caller's
    for name in optional:
        if name in kwargs:
            init_kwargs[name] = kwargs.pop(name)
        elif name in index:
            init_kwargs[name] = index[name]
    leftover = sorted(k for k in kwargs if k not in MODEL_KWARGS and k not in DOWNLOAD_KWARGS)
    if leftover:
        raise ValueError(f"{cls.__name__}.from_pretrained got unexpected keyword arguments {leftover}.")
    if "scheduler" in init_kwargs and "scheduler" not in loaded:
        check_replacing_scheduler(folder, index, init_kwargs["scheduler"])
    pipeline = pipeline_class(**init_kwargs)
    pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
    if device_map is not None:
        pipeline.hf_device_map = device_map  # as diffusers: `pipe.to(...)` then asks for `reset_device_map()` first
    return pipeline


def check_replacing_scheduler(folder: str, index: Mapping[str, Any], scheduler: object) -> None:
    """Refuse a ``scheduler`` passed to `from_pretrained` that is flow-matching where the folder's saved scheduler (the
    one its model was saved with, which says what the model predicts) is DDPM-style, or the reverse
    (`diffusers_stages.schedulers.is_flow_matching_scheduler`): it would sample garbage images. Another DDPM-style
    prediction type (``v_prediction`` for ``epsilon``) is taken, as diffusers' ``from_pretrained`` takes any
    scheduler passed; a folder whose scheduler cannot be read is not compared (the passed one replaces it)."""
    from ..schedulers import is_flow_matching_scheduler, scheduler_prediction_type

    if not isinstance(scheduler, SchedulerMixin):
        return
    try:  # (a folder without scheduler/, or a refused one: nothing to compare, the passed scheduler replaces it)
        saved_folder = component_folder(folder, "scheduler")
        saved_class = resolve_component_class("scheduler", index.get("scheduler"))
        if saved_class is None or not issubclass(saved_class, SchedulerMixin):
            return
        saved = load_scheduler(saved_class, saved_folder, "Component 'scheduler'")
        saved_type = scheduler_prediction_type(saved)
    except ValueError:
        return
    if is_flow_matching_scheduler(saved) == is_flow_matching_scheduler(scheduler):
        return
    name, saved_name = type(scheduler).__name__, type(saved).__name__
    kind, saved_kind = (
        ("a flow-matching", "a DDPM-style")
        if is_flow_matching_scheduler(scheduler)
        else ("a DDPM-style", "a flow-matching")
    )
    raise ValueError(
        f"`scheduler` {name} (prediction_type={scheduler_prediction_type(scheduler)!r}) is {kind} scheduler, but "
        f"{folder} was saved with {saved_kind} {saved_name} (prediction_type={saved_type!r}), the scheduler its model "
        f"samples with: pass a scheduler of that kind, e.g. `{saved_name}.from_config(...)` of the saved config."
    )


def write_reexport_files(save_directory: str | os.PathLike, pipeline_class: type) -> None:
    """Name the pipeline in `model_index.json` as ``[file, class]`` and write the tiny re-export files that let
    diffusers resolve the package's classes from a plain folder or a Hub repository (diffusers issue 6563)."""
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    module_file = pipeline_class.__module__.rsplit(".", 1)[-1]
    index["_class_name"] = [module_file, pipeline_class.__name__]
    with open(os.path.join(save_directory, f"{module_file}.py"), "w", encoding="utf-8") as f:
        f.write(reexport_source(pipeline_class.__module__, pipeline_class.__name__))
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        library, class_name = value
        if library.split(".")[0] == "diffusers_stages" and os.path.isdir(os.path.join(save_directory, name)):
            with open(os.path.join(save_directory, name, f"{library}.py"), "w", encoding="utf-8") as f:
                f.write(reexport_source(library, class_name))
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def remove_stale_weight_indexes(
    save_directory: str | os.PathLike, safe_serialization: bool, variant: str | None
) -> None:
    """After a save into ``save_directory``: remove each weight index of that save's format and ``variant`` that sits
    beside the single weight file the save just wrote and names shards that are gone. diffusers' `save_pretrained`
    deletes a previous sharded save's shards when it writes one file, but keeps their index (diffusers issue 14719),
    which loading then follows to the missing shards (a `FileNotFoundError`)."""
    single = _add_variant(SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME, variant)
    index_name = _add_variant(SAFE_WEIGHTS_INDEX_NAME if safe_serialization else WEIGHTS_INDEX_NAME, variant)
    for root, _, files in os.walk(save_directory):
        if index_name not in files or single not in files:
            continue
        path = os.path.join(root, index_name)
        try:
            with open(path, encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
            complete = all(os.path.isfile(os.path.join(root, shard)) for shard in shards)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not an index this save can judge: left as it is
        if not complete:
            os.remove(path)
