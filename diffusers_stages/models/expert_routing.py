"""Expert routing: independent denoisers, one per stage of the noise schedule (MEME, Lee et al., AAAI 2024;
DuoDiff's dual backbone is the two-expert case).

The experts share nothing but their input/output contract: each may be a `UNet2DModel`, a `UNet2DConditionModel`,
a `DiTTransformer2DModel` or one of this package's models, of any size. The container saves as one folder that
holds its own `config.json` (the partition and each expert's ``[module, class]``) and one sub-folder per expert
(``expert_0/``, ...) written by that expert's own `save_pretrained`, so every expert is a plain diffusers folder.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from typing import ClassVar

import diffusers
import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.unet import _LOW_CPU_MEM_USAGE_DEFAULT
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import AttentionProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from ..conventions import class_embedding_count
from ..hub import PackageCardPushMixin, pop_push_kwargs, push_saved_folder
from ..partition import TimestepPartition
from .checks import check_savable
from .ip_adapter import (
    blocks_with_attentions,
    check_image_embeds,
    check_ip_adapter_fits,
    check_ip_adapter_state_dicts,
    with_source_layer_names,
)
from .loading import (
    DOWNLOAD_KWARGS,
    check_folder_files,
    check_model_dtype,
    check_name,
    check_subfolder,
    component_folder,
    download_weights,
    is_config_class,
    load_checked,
    realign_storage,
    refuse_other_model_class,
)
from .lora import check_lora_fits, fetch_lora, require_peft
from .staged import StagedModelMixin

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
CONTRACT_KEYS = ("in_channels", "out_channels", "sample_size", "num_class_embeds")  # experts must agree on these
# what a diffusers text-to-image pipeline builds once for every expert (prompt embeddings, SDXL added conditions)
CONDITIONING_KEYS = (
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "time_cond_proj_dim",
    "encoder_hid_dim",
)
# config keys diffusers' pipelines read from `pipe.unet` (StableDiffusionPipeline, StableDiffusionXLPipeline)
PIPELINE_KEYS = ("in_channels", "out_channels", "sample_size", "time_cond_proj_dim", "addition_time_embed_dim")
TRUSTED_LIBRARIES = ("diffusers", "diffusers_stages")
# where a trusted library exports its model classes: the package's own `models` exports some the top level does not
TRUSTED_EXPORTS = {"diffusers": ("diffusers",), "diffusers_stages": ("diffusers_stages", "diffusers_stages.models")}
# what a saved container's `config.json` must hold besides its `_class_name`
CONTAINER_CONFIG = ("expert_classes", "stage_boundaries", "boundary_units", "num_train_timesteps", "prediction_type")


def expert_folder(index: int) -> str:
    """Name of expert ``index``'s sub-folder inside a saved `ExpertRoutingModel`."""
    return f"expert_{index}"


def class_entry(model: nn.Module) -> list[str]:
    """``[module, class]`` as diffusers writes it in `model_index.json` (``"diffusers"`` for diffusers' own classes)."""
    cls = type(model)
    if cls.__module__.split(".")[0] == "diffusers" and getattr(diffusers, cls.__name__, None) is cls:
        return ["diffusers", cls.__name__]
    return [cls.__module__, cls.__name__]


def import_class(entry: Sequence[str], loaded_modules: bool = True) -> type:
    """The `ModelMixin` class named by a ``[module, class]`` entry: a class diffusers or this package (or its
    ``models`` package) exports, or (with ``loaded_modules``) one of a module the caller has already imported. No
    module a config names is imported (one such as ``diffusers_stages.demo.__main__`` would run on import), so
    nothing runs that the user has not chosen to run. Without ``loaded_modules`` any other entry is a `ValueError`
    naming it."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
        raise ValueError(f"Expert class entry must be [module, class], got {entry!r}.")
    module_name, class_name = entry
    check_name(module_name, "expert module", dotted=True)
    check_name(class_name, "expert class")
    library = module_name.split(".")[0]
    exports = [importlib.import_module(name) for name in TRUSTED_EXPORTS.get(library, ())]
    cls = next((getattr(m, class_name) for m in exports if isinstance(getattr(m, class_name, None), type)), None)
    if not (isinstance(cls, type) and module_name in (library, cls.__module__)):  # not the library's export
        if not loaded_modules:
            raise ValueError(
                f"Expert class {class_name} of module {module_name!r} is not a class diffusers or diffusers_stages "
                "exports."
            )
        if module_name not in sys.modules:
            raise ValueError(
                f"Expert class {class_name} lives in module {module_name!r}, which is not loaded and is not the "
                f"module of a class diffusers or diffusers_stages exports: `import {module_name}` before loading "
                "(only if you trust it), so that its class can be found."
            )
        cls = getattr(sys.modules[module_name], class_name, None)
    if not is_config_class(cls, ModelMixin):  # a model class, not a base class such as ModelMixin itself
        raise ValueError(f"Expert class entry {list(entry)} does not name a diffusers ModelMixin class.")
    return cls


def expert_config(expert: ModelMixin) -> dict | None:
    """``expert``'s config as its `config.json` holds it, without diffusers' private entries (``_class_name``,
    ``_diffusers_version``, ...) and ``auto_map``: what its class's `from_config` builds the same architecture from;
    `None` for a config that does not serialise (such an expert cannot be saved either, but it may still run)."""
    try:
        config = json.loads(expert.to_json_string())
    except (TypeError, ValueError):
        return None
    return {key: value for key, value in config.items() if not key.startswith("_") and key != "auto_map"}


def resolve_prediction_type(prediction_type: str | Sequence[str], experts: Sequence[nn.Module | None]) -> str:
    """The one prediction type of a set of experts: given once, or once per expert, or in an expert's config."""
    if not isinstance(prediction_type, (str, list, tuple)) or not all(
        isinstance(kind, str) for kind in ([prediction_type] if isinstance(prediction_type, str) else prediction_type)
    ):
        raise ValueError(
            f"`prediction_type` must be one of {PREDICTION_TYPES} or one per expert, got {prediction_type!r}."
        )
    given = [prediction_type] if isinstance(prediction_type, str) else list(prediction_type)
    if not isinstance(prediction_type, str) and len(given) != len(experts):
        raise ValueError(f"`prediction_type` must be one string or one per expert ({len(experts)}), got {given}.")
    declared = {
        i: e.config.prediction_type
        for i, e in enumerate(experts)
        if e is not None and getattr(getattr(e, "config", None), "prediction_type", None) is not None
    }
    types = set(given) | set(declared.values())
    if len(types) != 1:  # each type with where it comes from, so that the odd expert is named
        sources = (
            [f"`prediction_type`={prediction_type!r}"]
            if isinstance(prediction_type, str)
            else [f"expert {i}: {kind!r}" for i, kind in enumerate(given)]
        )
        sources += [f"expert {i}'s config: {kind!r}" for i, kind in declared.items()]
        raise ValueError(
            f"All experts must predict the same target (multistep solvers mix their outputs), got "
            f"{', '.join(sources)}: retrain or convert the odd expert."
        )
    (kind,) = types
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {kind!r}.")
    return kind


def learned_time_embedding_steps(model: nn.Module | None) -> int | None:
    """The training timesteps of ``model``'s learned time embedding (`UNet2DModel`'s ``time_embedding_type="learned"``:
    one row per timestep); None for another time embedding. Another schedule's timesteps would read the rows of other
    noise levels, or fail inside the embedding beyond its rows."""
    config = getattr(model, "config", None)
    if getattr(config, "time_embedding_type", None) != "learned":
        return None
    return getattr(config, "num_train_timesteps", None)


def _check_contract(experts: Sequence[nn.Module | None]) -> None:
    """Experts replace one another mid-trajectory: their inputs, outputs and labels must agree."""
    for key in CONTRACT_KEYS + CONDITIONING_KEYS:
        values = {i: _config_value(e.config, key) for i, e in enumerate(experts) if e is not None and key in e.config}
        if len(set(values.values())) > 1:
            raise ValueError(f"Experts disagree on `{key}` (expert: value): {values}; they must be interchangeable.")
    counts = class_embedding_counts(dict(enumerate(experts)))
    if len(set(counts.values())) > 1:
        raise ValueError(
            "Experts disagree on their class embeddings (the classes and the unconditional label: `num_class_embeds`, "
            f"a DiT's `num_embeds_ada_norm` + 1; None: not class-conditional), expert: count {counts}; they must be "
            "interchangeable."
        )


def class_embedding_counts(networks: dict) -> dict:
    """Name -> class embeddings, the unconditional label included (`conventions.class_embedding_count`: a U-Net's
    ``num_class_embeds``, a DiT's classes + 1; None for an unconditional network), of the networks (None: not loaded)
    that have a config: what networks that replace one another mid-trajectory must agree on, whatever their classes'
    config keys."""
    return {
        name: class_embedding_count(network.config)
        for name, network in networks.items()
        if network is not None and getattr(network, "config", None) is not None
    }


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _config_value(config, key: str):
    """``config[key]`` as the expert uses it: ``out_channels=None`` (U-ViT, DiT) means ``in_channels``."""
    value = config[key]
    if key == "out_channels" and value is None:
        value = config.get("in_channels")
    return _hashable(value)


def _has_ip_adapter(expert: nn.Module | None) -> bool:
    """Whether ``expert`` has an IP-Adapter loaded (its image projection, as `load_ip_adapter` sets it)."""
    kind = getattr(getattr(expert, "config", None), "encoder_hid_dim_type", None)  # an attribute, as diffusers sets it
    return getattr(expert, "encoder_hid_proj", None) is not None and kind == "ip_image_proj"


def check_rows(value: object, batch: int, name: str) -> None:
    """A `ValueError` naming ``name`` (``name['key']``, ``name[i]`` inside dicts, lists and tuples) where a tensor of
    ``value`` has neither one row nor one per sample: the routing splits only per-sample tensors, so it would hand
    such a tensor whole to every expert of a mixed batch (an attention mask of 2 rows for 3 samples then ran)."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_rows(item, batch, f"{name}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_rows(item, batch, f"{name}[{i}]")
    elif torch.is_tensor(value) and value.ndim > 0 and value.shape[0] not in (1, batch):
        raise ValueError(
            f"`{name}` must have one row or one per sample ({batch}), got shape {tuple(value.shape)}: each row "
            "goes with its sample to that sample's expert."
        )


def pipeline_config(experts: Sequence[nn.Module | None]) -> dict:
    """The `PIPELINE_KEYS` the loaded experts declare (they agree on them), so that a diffusers pipeline reads
    ``pipe.unet.config.in_channels``, ``...sample_size``, ``...time_cond_proj_dim`` from the container."""
    declared = {}
    for expert in reversed([e for e in experts if e is not None and hasattr(e, "config")]):
        declared.update({key: _config_value(expert.config, key) for key in PIPELINE_KEYS if key in expert.config})
    return declared


def expert_pattern(index: int, pattern: str) -> str:
    """Expert ``index``'s layerwise-casting skip ``pattern`` (a regular expression searched in its module names) as a
    pattern of the container's module names: it matches only inside ``experts.{index}.``, and one anchored with ``^``
    at the expert's root is anchored there."""
    prefix = rf"^experts\.{index}\."
    return prefix + (pattern[1:] if pattern.startswith("^") else f".*(?:{pattern})")


def _positional_hidden_states(expert: nn.Module, class_labels, expert_kwargs: dict) -> tuple:
    """``(class_labels, expert_kwargs)`` as ``expert`` takes them. A `UNet2DConditionModel` takes
    ``encoder_hidden_states`` third, where this container takes ``class_labels``: a call ``model(x, t, text)`` gives
    the text as ``class_labels`` and no ``encoder_hidden_states``, which such an expert cannot run without, so it is
    passed on as ``encoder_hidden_states``."""
    parameters = list(inspect.signature(expert.forward).parameters)
    takes_text_third = len(parameters) > 2 and parameters[2] == "encoder_hidden_states"
    if takes_text_third and class_labels is not None and "encoder_hidden_states" not in expert_kwargs:
        return None, {**expert_kwargs, "encoder_hidden_states": class_labels}
    return class_labels, expert_kwargs


@functools.cache
def _timestep_by_name(forward: Callable) -> bool:
    """Whether a model class's ``forward`` takes ``timestep``, but not second (read once per class: no per-call cost)."""
    parameters = list(inspect.signature(forward).parameters)  # (self, sample, ...)
    return len(parameters) > 2 and parameters[2] != "timestep" and "timestep" in parameters


def call_denoiser(model: nn.Module, sample: torch.Tensor, timestep, **kwargs):
    """``model(sample, timestep, **kwargs)``, with ``timestep`` passed by name where ``model``'s forward takes another
    argument second (diffusers' legacy `Transformer2DModel`, a DiT built in code, takes ``encoder_hidden_states``
    there), as `DiTPipeline` passes it; positionally otherwise, as diffusers' U-Net pipelines do. Decided by the
    class's ``forward`` (a ``torch.compile``'d model's original one; hooks that wrap ``forward`` keep its arguments)."""
    if _timestep_by_name(type(getattr(model, "_orig_mod", model)).forward):
        return model(sample, timestep=timestep, **kwargs)
    return model(sample, timestep, **kwargs)


class ExpertRoutingModel(StagedModelMixin, PackageCardPushMixin, ModelMixin, ConfigMixin, AttentionMixin):
    r"""
    A set of independent denoisers, one per stage of a [`TimestepPartition`] (stage 0 = cleanest), behind one
    denoiser interface.

    Parameters:
        experts (`list[ModelMixin | None]`):
            One denoiser per stage, clean stage first. Architectures and sizes may differ; inputs, outputs and
            class labels must agree. `None` marks an expert that is not loaded (see `from_pretrained`'s
            ``load_experts``); routing a sample to it raises a `ValueError`.
        stage_boundaries (`tuple[float]`):
            The ``len(experts) - 1`` inner boundaries, in ``boundary_units`` (see [`TimestepPartition`]).
        boundary_units (`str`, defaults to `"timestep"`): ``"timestep"`` or ``"sigma"`` (EDM-style experts).
        num_train_timesteps (`int`, defaults to 1000): length of the training schedule.
        prediction_type (`str` or `list[str]`, defaults to `"epsilon"`):
            What every expert predicts (``epsilon``, ``v_prediction``, ``sample`` or ``flow_prediction``); a list
            (one per expert) is accepted to check experts gathered from different pipelines, and must agree.
        expert_classes (`list[list[str]]`, *optional*):
            ``[module, class]`` of each expert; derived from ``experts`` when omitted, required for unloaded ones.
        expert_configs (`list[dict | None]`, *optional*):
            Each expert's config (what its class's `from_config` takes), kept in the container's config so that
            ``ExpertRoutingModel.from_config(model.config)`` builds fresh experts of the same architectures (as
            diffusers' `EMAModel` and training scripts call it); taken from the loaded experts, `None` for unloaded
            ones (whose `from_config` is then a `ValueError`, as their `save_pretrained` is).

    Example:

    ```py
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> from diffusers_stages.models import ExpertRoutingModel
    >>> def unet(width):
    ...     return UNet2DModel(sample_size=8, block_out_channels=(width, width), norm_num_groups=4,
    ...         layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    >>> model = ExpertRoutingModel([unet(16), unet(8)], stage_boundaries=(500,))  # a wide clean expert, a narrow noisy one
    >>> x = torch.randn(3, 3, 8, 8)
    >>> model(x, torch.tensor([10, 700, 20])).sample.shape  # samples 0 and 2 go to expert 0, sample 1 to expert 1
    torch.Size([3, 3, 8, 8])
    >>> torch.equal(model(x[1:2], 700).sample, model.experts[1](x[1:2], 700).sample)
    True

    ```
    """

    ignore_for_config = ("experts",)
    # a folder of one model: the container is built from experts (`refuse_other_model_class`)
    _plain_class_conversions: ClassVar[dict[str, str]] = {
        "*": "build a container of such experts with `{cls}([{name}.from_pretrained({args}), ...], stage_boundaries=...)`"
    }
    _supports_gradient_checkpointing = True  # each expert's own (see `_set_gradient_checkpointing`)
    _stage_networks = "experts"

    @register_to_config
    def __init__(
        self,
        experts: Sequence[ModelMixin | None],
        stage_boundaries: Sequence[float],
        boundary_units: str = "timestep",
        num_train_timesteps: int = 1000,
        prediction_type: str | Sequence[str] = "epsilon",
        expert_classes: Sequence[Sequence[str]] | None = None,
        expert_configs: Sequence[dict | None] | None = None,
    ):
        super().__init__()
        # 1. check the configuration and keep the partition: one expert per stage, interchangeable
        self.partition, experts = self._check_config(experts, stage_boundaries, num_train_timesteps, boundary_units)

        # 2. each expert's class (kept for unloaded experts) and the shared prediction type
        derived = [class_entry(e) if e is not None else None for e in experts]
        if expert_classes is None:
            if None in derived:
                raise ValueError("`expert_classes` must be given when some `experts` are None (not loaded).")
            expert_classes = derived
        expert_classes = [list(entry) for entry in expert_classes]
        if len(expert_classes) != len(experts) or any(d not in (None, c) for d, c in zip(derived, expert_classes)):
            raise ValueError(f"`expert_classes`={expert_classes} does not match the experts given: {derived}.")
        if expert_configs is None:
            expert_configs = [None] * len(experts)
        if not isinstance(expert_configs, (list, tuple)) or len(expert_configs) != len(experts):
            raise ValueError(
                f"`expert_configs` must be a list of one config (or None) per expert ({len(experts)}), got "
                f"{expert_configs!r}."
            )
        if any(c is not None and not isinstance(c, dict) for c in expert_configs):
            raise ValueError(f"`expert_configs` must hold dicts or None, got {expert_configs!r}.")
        # an unloaded expert's config is not kept: `from_config` (diffusers' `EMAModel.save_pretrained`) would build
        # it, and the fresh container's parameters would no longer line up with this one's
        expert_configs = [expert_config(e) if e is not None else None for e in experts]
        self.register_to_config(
            stage_boundaries=list(self.partition.boundaries),
            prediction_type=resolve_prediction_type(prediction_type, experts),
            expert_classes=expert_classes,
            expert_configs=expert_configs,
        )
        self.register_to_config(**pipeline_config(experts))
        self.experts = nn.ModuleList(experts)

    @classmethod
    def from_config(
        cls, config: dict | str | os.PathLike | None = None, return_unused_kwargs: bool = False, **kwargs
    ) -> ExpertRoutingModel | tuple[ExpertRoutingModel, dict]:
        r"""
        A fresh model of the architecture ``config`` describes (``model.config``, or `load_config` of a saved
        folder): each expert is built, with fresh weights, by its class's own ``from_config`` from the
        ``expert_configs`` entry, as diffusers' `ModelMixin.from_config` does for one model (diffusers' `EMAModel`
        and training scripts call ``from_config(model.config)``).

        Only the classes diffusers or diffusers_stages export are built from a config (nothing a config names is
        imported or run); another expert class, or a config without ``expert_configs`` (saved before they were
        kept), is a `ValueError`: build the experts and pass them as ``experts=[...]``, or load the saved folder
        with `from_pretrained`.

        Args:
            config (`dict`): the container's config (a path, as diffusers still accepts, is read with
                `load_config`).
            return_unused_kwargs (`bool`, defaults to `False`): also return the config entries and ``kwargs`` not
                used, as diffusers does.
            kwargs: ``experts`` (the experts to use instead of fresh ones) and config entries to override.
        """
        if config is None:
            raise ValueError("`config` must be the config of an ExpertRoutingModel (`model.config`), got None.")
        experts = kwargs.pop("experts", None)
        if not isinstance(config, dict):  # a path: diffusers' deprecated form, which `EMAModel.from_pretrained` uses
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
        if experts is None:
            experts = cls._fresh_experts(config)
        init_dict, unused_kwargs, hidden_dict = cls.extract_init_dict(config, **kwargs)
        model = cls(experts, **init_dict)
        if "_class_name" in hidden_dict:
            hidden_dict["_class_name"] = cls.__name__
        model.register_to_config(**hidden_dict)
        unused_kwargs = {**unused_kwargs, **hidden_dict}
        return (model, unused_kwargs) if return_unused_kwargs else model

    @staticmethod
    def _fresh_experts(config: dict) -> list[ModelMixin]:
        """Fresh experts (new weights) of the classes and configs ``config`` names; a `ValueError` that says what to
        call instead where it cannot (see `from_config`)."""
        entries, configs = config.get("expert_classes"), config.get("expert_configs")
        if not isinstance(entries, list):
            raise ValueError(f"`config` must hold `expert_classes`, a list of [module, class], got {entries!r}.")
        missing = (
            list(range(len(entries)))
            if not isinstance(configs, list) or len(configs) != len(entries)
            else [i for i, c in enumerate(configs) if not isinstance(c, dict)]
        )
        if missing:
            raise ValueError(
                f"`config` holds no `expert_configs` entry for experts {missing} (a config saved before they were "
                "kept, or with experts unloaded), so their architecture is unknown: load the saved folder with "
                "`ExpertRoutingModel.from_pretrained(folder)`, or build the experts and call "
                "`ExpertRoutingModel.from_config(config, experts=[...])`."
            )
        experts = []
        for i, (entry, expert_config_) in enumerate(zip(entries, configs)):
            try:
                expert_class = import_class(entry, loaded_modules=False)
            except ValueError as error:
                raise ValueError(
                    f"Expert {i} ({entry!r}) cannot be built from a config: {error} `from_config` builds only those "
                    "(it never imports or runs a class a config names); build that expert yourself and call "
                    "`ExpertRoutingModel.from_config(config, experts=[...])`."
                ) from error
            try:
                experts.append(expert_class.from_config(expert_config_))
            except (TypeError, ValueError) as error:
                raise ValueError(f"Expert {i}'s config does not build a {expert_class.__name__}: {error}") from error
        return experts

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        """As `StagedModelMixin`'s, without the pipeline entries the experts' configs give (`PIPELINE_KEYS`): they
        are derived from the experts, not constructor arguments."""
        config_dict = {key: value for key, value in config_dict.items() if key not in PIPELINE_KEYS}
        return super().extract_init_dict(config_dict, **kwargs)

    @staticmethod
    def _check_config(
        experts: Sequence[ModelMixin | None],
        stage_boundaries: Sequence[float],
        num_train_timesteps: int,
        boundary_units: str,
    ) -> tuple[TimestepPartition, list[ModelMixin | None]]:
        """Check the experts against the partition (a `ValueError` naming the argument); returns the partition and
        the experts as a list."""
        partition = TimestepPartition.from_config(
            stage_boundaries=stage_boundaries, num_train_timesteps=num_train_timesteps, boundary_units=boundary_units
        )
        experts = list(experts) if isinstance(experts, (list, tuple, nn.ModuleList)) else None
        if experts is None or len(experts) != partition.num_stages:
            count = "not a list" if experts is None else f"{len(experts)} experts"
            raise ValueError(
                f"`experts` must be a list with one denoiser per stage: `stage_boundaries`={tuple(stage_boundaries)} "
                f"gives {partition.num_stages} stages, got {count}."
            )
        for i, expert in enumerate(experts):
            if expert is not None and not isinstance(expert, ModelMixin):
                raise ValueError(f"Expert {i} must be a diffusers ModelMixin (or None), got {type(expert).__name__}.")
            steps = learned_time_embedding_steps(expert)
            if steps is not None and partition.units == "timestep" and steps != partition.num_train_timesteps:
                raise ValueError(
                    f"Expert {i} ({type(expert).__name__}) was built for num_train_timesteps={steps}, but the "
                    f"container routes a {partition.num_train_timesteps}-step schedule (`num_train_timesteps`): pass "
                    f"num_train_timesteps={steps} (and boundaries in its timesteps), or use experts of one schedule."
                )
        _check_contract(experts)
        return partition, experts

    @property
    def _no_split_modules(self) -> list[str]:
        """Every expert is one unit for `device_map` (whatever its class declares)."""
        return sorted({type(expert).__name__ for expert in self.experts if expert is not None})

    @property
    def _repeated_blocks(self) -> list[str]:
        """What diffusers' `compile_repeated_blocks` compiles: the blocks each loaded expert's class declares."""
        return sorted({block for e in self.experts if e is not None for block in getattr(e, "_repeated_blocks", ())})

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = torch.utils.checkpoint.checkpoint
    ) -> None:
        """Switch gradient checkpointing of every loaded expert through the expert's own switch; an expert whose
        class does not support it is a `ValueError` naming it."""
        for i in self.loaded_experts:
            expert = self.experts[i]
            if not expert._supports_gradient_checkpointing:
                if enable:
                    raise ValueError(f"Expert {i} ({type(expert).__name__}) does not support gradient checkpointing.")
                continue
            expert._set_gradient_checkpointing(enable, gradient_checkpointing_func)

    @property
    def _skip_layerwise_casting_patterns(self) -> list[str]:
        """What diffusers' `enable_layerwise_casting` must leave uncast: each loaded expert's own declaration (its
        class's ``_skip_layerwise_casting_patterns`` and ``_keep_in_fp32_modules``), scoped to that expert's modules
        (``experts.{i}.``; a pattern anchored at the expert's root, such as ``^proj_out$``, stays anchored there)."""
        patterns = []
        for i in self.loaded_experts:
            expert = self.experts[i]
            declared = [
                *(getattr(expert, "_skip_layerwise_casting_patterns", None) or ()),
                *(getattr(expert, "_keep_in_fp32_modules", None) or ()),
            ]
            patterns += [expert_pattern(i, pattern) for pattern in declared]
        return patterns

    def enable_layerwise_casting(
        self,
        storage_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype | None = None,
        skip_modules_pattern: tuple[str, ...] | None = None,
        skip_modules_classes: tuple[type[nn.Module], ...] | None = None,
        non_blocking: bool = False,
    ) -> None:
        r"""
        diffusers' layerwise casting (weights stored in ``storage_dtype``, each layer cast to ``compute_dtype`` for
        its call; see [`~diffusers.ModelMixin.enable_layerwise_casting`]). Without ``skip_modules_pattern`` each
        loaded expert is cast by its own `enable_layerwise_casting`, exactly as alone: diffusers' default patterns
        and the expert's own (``_skip_layerwise_casting_patterns``, ``_keep_in_fp32_modules``) apply to its module
        names. Patterns given name the container's modules (``experts.{i}....``), as on any diffusers model, and
        each expert's own declarations still hold. ``compute_dtype`` defaults to the container's dtype.
        """
        if compute_dtype is None:
            compute_dtype = self.dtype
        if skip_modules_pattern is not None:
            super().enable_layerwise_casting(
                storage_dtype, compute_dtype, skip_modules_pattern, skip_modules_classes, non_blocking
            )
            return
        for i in self.loaded_experts:
            self.experts[i].enable_layerwise_casting(
                storage_dtype, compute_dtype, skip_modules_classes=skip_modules_classes, non_blocking=non_blocking
            )

    def _loaded_experts_with(self, method: str, cannot: str) -> list[ModelMixin]:
        """The loaded experts, each with ``method``; a `ValueError` "Expert {i} ({class}) {cannot}" naming the first
        without it, before any expert is changed."""
        for i in self.loaded_experts:
            expert = self.experts[i]
            if not callable(getattr(expert, method, None)):
                raise ValueError(f"Expert {i} ({type(expert).__name__}) {cannot}.")
        return [self.experts[i] for i in self.loaded_experts]

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        r"""FreeU (https://huggingface.co/papers/2309.11497) in every loaded expert, by the expert's own
        ``enable_freeu`` (what `pipe.enable_freeu` calls on ``pipe.unet``): ``s1``/``s2`` filter the skip features,
        ``b1``/``b2`` scale the backbone features of its up path, as in
        [`~diffusers.UNet2DConditionModel.enable_freeu`]. An expert without FreeU (diffusers' `UNet2DModel`, and
        `MultiStageUNet2DModel` built on it, have none) is a `ValueError` naming it, before any expert is changed."""
        for expert in self._loaded_experts_with("enable_freeu", "does not support FreeU (no `enable_freeu`)"):
            expert.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        """Undo `enable_freeu`: each loaded expert's own ``disable_freeu``."""
        for i in self.loaded_experts:
            disable = getattr(self.experts[i], "disable_freeu", None)
            if callable(disable):
                disable()

    def fuse_qkv_projections(self) -> None:
        """`pipe.fuse_qkv_projections()`: each loaded expert fuses its q/k/v projections with its own
        ``fuse_qkv_projections`` (`AttentionMixin`'s version fuses only the newer attention classes, and the pipeline
        then sets a fused processor on the experts' unfused layers). An expert without one is a `ValueError`."""
        for expert in self._loaded_experts_with("fuse_qkv_projections", "cannot fuse its q/k/v projections"):
            expert.fuse_qkv_projections()

    def unfuse_qkv_projections(self) -> None:
        """Undo `fuse_qkv_projections`: each loaded expert's own ``unfuse_qkv_projections``."""
        for i in self.loaded_experts:
            unfuse = getattr(self.experts[i], "unfuse_qkv_projections", None)
            if callable(unfuse):
                unfuse()

    def set_attention_slice(self, slice_size: str | int | list[int] | None) -> None:
        """`pipe.enable_attention_slicing(slice_size)`: each loaded expert slices its attention by its own
        ``set_attention_slice`` (``"auto"``/``"max"`` worked out per expert, as diffusers' U-Nets do). An expert
        without one (diffusers' `UNet2DModel`) is left as it is, as diffusers' pipelines leave a component without
        one (`DDPMPipeline.enable_attention_slicing()` changes nothing)."""
        for i in self.loaded_experts:
            set_slice = getattr(self.experts[i], "set_attention_slice", None)
            if callable(set_slice):
                set_slice(slice_size)

    @property
    def loaded_experts(self) -> list[int]:
        """Indices of the experts held in memory."""
        return [i for i, e in enumerate(self.experts) if e is not None]

    @property
    def device(self) -> torch.device:
        """The loaded experts' device (as `ModelMixin.device`); a `ValueError` when no expert is loaded."""
        self._check_some_expert_loaded("device")
        return super().device

    @property
    def dtype(self) -> torch.dtype:
        """The loaded experts' dtype (as `ModelMixin.dtype`); a `ValueError` when no expert is loaded."""
        self._check_some_expert_loaded("dtype")
        return super().dtype

    def _check_some_expert_loaded(self, name: str) -> None:
        """A container of no loaded expert (``from_pretrained(..., load_experts=[])``) holds no tensor, so it has no
        ``name`` (device, dtype): say so, rather than diffusers' StopIteration or UnboundLocalError."""
        if not self.loaded_experts:
            raise ValueError(
                f"This ExpertRoutingModel has no `{name}`: no expert is loaded (it was loaded with `load_experts=[]`, "
                "or its experts are all None). Load the experts a run needs with "
                "`ExpertRoutingModel.from_pretrained(path, load_experts=[...])`, or set `model.experts[i]`."
            )

    def expert(self, stage: int) -> ModelMixin:
        """The denoiser of ``stage``; a `ValueError` that says how to load it if it is not loaded."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"`stage` must be in [0, {self.num_stages}), got {stage}.")
        if self.experts[stage] is None:
            raise ValueError(
                f"Expert {stage} (noise levels {self.partition.interval_text(stage)} in {self.partition.units!r} "
                "units) is not loaded, but this run needs it: load it with "
                f"`ExpertRoutingModel.from_pretrained(path, load_experts=[..., {stage}])` or set `model.experts[{stage}]`."
            )
        return self.experts[stage]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        stage_index: int | None = None,
        **expert_kwargs,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor`): noisy input `(batch, channels, height, width)`.
            timestep (`torch.Tensor` or `float` or `int`): one timestep, or one per sample (experts may differ).
            class_labels (`torch.Tensor`, *optional*): class labels for class-conditional experts.
            return_dict (`bool`, defaults to `True`): return a `UNet2DOutput` rather than a tuple.
            stage_index (`int`, *optional*): send the whole batch to this expert (no data-dependent routing).
            expert_kwargs: further arguments of the experts' forward (e.g. ``encoder_hidden_states``); tensors with
                one row per sample are split with the batch (a batch split over experts refuses one of neither one
                row nor one per sample; a whole batch hands it to its expert as is).

        ``sample`` must be a floating-point tensor with a batch dimension (of shape ``(batch, in_channels, height,
        width)`` when the experts declare ``in_channels``) and ``timestep`` one value or one per sample (a
        `ValueError` naming the argument otherwise); each expert checks the rest of its inputs. Finite timestep
        values are checked on the routed path only: with ``stage_index`` given no tensor value is read on the host.
        """
        # 1. one timestep per sample (DiT-style experts need one per sample; the routing reads them)
        timesteps = self.check_inputs(sample, timestep, stage_index, in_channels=self.config.get("in_channels"))
        # a 0-d tensor or a Python int: one per sample (a DiT takes tensors only; U-Nets make the same long tensor of
        # an int); a float stays as given, read by each expert's own rule (UNet2DModel truncates it)
        if (torch.is_tensor(timestep) and timestep.ndim == 0) or isinstance(timestep, numbers.Integral):
            timestep = timesteps
        elif torch.is_tensor(timestep):  # on the samples' device, as `timesteps` (a CPU tensor: copied there)
            timestep = timestep.to(timesteps.device)

        # 2. each expert only on its own samples (the whole batch, called exactly as alone, when one stage holds it;
        # a mixed batch has one timestep per sample, split with the rest)
        batch = sample.shape[0]
        if any(_has_ip_adapter(expert) for expert in self.experts):  # diffusers' own: "'NoneType' is not iterable"
            check_image_embeds(expert_kwargs.get("added_cond_kwargs"), batch)

        def run(stage: int, inputs: list) -> torch.Tensor:
            # a split batch only: a tensor of neither one row nor one per sample would reach each expert whole (a
            # whole batch goes to its expert as alone, which reads such rows by its own rules: diffusers'
            # `ip_adapter_masks` of one row per IP-Adapter)
            if inputs[0].shape[0] != batch:  # named as the expert takes them: `model(x, t, text)` gives text third
                labels, kwargs = _positional_hidden_states(self.expert(stage), class_labels, expert_kwargs)
                check_rows(labels, batch, "class_labels")
                for name, value in kwargs.items():
                    check_rows(value, batch, name)
            return self._call_expert(stage, *inputs)

        out = self.route(timesteps, stage_index, run, [sample, timestep, class_labels, expert_kwargs])
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

    def _call_expert(self, stage, sample, timestep, class_labels, expert_kwargs) -> torch.Tensor:
        expert = self.expert(stage)
        class_labels, expert_kwargs = _positional_hidden_states(expert, class_labels, expert_kwargs)
        out = call_denoiser(expert, sample, timestep, class_labels=class_labels, return_dict=False, **expert_kwargs)
        return out[0]

    # ------------------------------------------------------------------------------------------------------------
    # LoRA: what the pipelines' LoRA loader calls on `pipe.unet`, each expert's own (diffusers' `PeftAdapterMixin`)
    def _experts_with(self, method: str, action: str) -> list[ModelMixin]:
        """The experts, each with ``method`` (``load_lora_adapter``, ``_load_ip_adapter_weights``: what the
        pipelines' loaders call on `pipe.unet`); a `ValueError` naming an unloaded expert or one without it."""
        missing = [i for i, expert in enumerate(self.experts) if expert is None]
        if missing:
            raise ValueError(f"Experts {missing} are not loaded: load every expert before you {action}.")
        return self._loaded_experts_with(method, f"cannot {action}: it has no `{method}`")

    def _peft_experts(self, action: str) -> list[ModelMixin]:
        """The experts, each able to take LoRA adapters (see `_experts_with`)."""
        return self._experts_with("load_lora_adapter", action)

    def _lora_per_expert(self, state_dict: dict, prefix: str | None) -> list[dict]:
        """Each expert's share of a LoRA: its own keys (``experts.{i}.``, as this container saves them, the prefix
        kept), or the whole LoRA (one for the source U-Net) for every expert."""
        head = f"{prefix}." if prefix else ""
        own = [key for key in state_dict if key.startswith(f"{head}experts.")]
        if not own:
            return [state_dict] * self.num_stages
        if len(own) != sum(key.startswith(head) for key in state_dict):
            raise ValueError(
                f"The LoRA `state_dict` mixes keys of this container's experts (e.g. {own[0]!r}) with keys of one "
                "U-Net: it must be in one naming or the other."
            )
        common = {key: value for key, value in state_dict.items() if not key.startswith(head)}  # other components'
        shares = [dict(common) for _ in range(self.num_stages)]
        for key in own:
            index, _, rest = key[len(head) + len("experts.") :].partition(".")
            if not index.isdigit() or int(index) >= self.num_stages:
                raise ValueError(f"The LoRA key {key!r} names no expert of this model ({self.num_stages} experts).")
            shares[int(index)][head + rest] = state_dict[key]
        return shares

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        prefix: str | None = "transformer",
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Load a LoRA into every expert with the expert's own
        [`~diffusers.loaders.PeftAdapterMixin.load_lora_adapter`] (what `pipe.load_lora_weights` calls, with
        ``prefix="unet"``): a LoRA of one U-Net (the source the experts were made from) goes to every expert, one
        saved from this container (keys ``experts.{i}.``) to each expert its own part. Every expert gets the same
        adapter name. The LoRA is checked against every expert before any changes (an expert of other widths is a
        `ValueError` naming it and the shapes), and an expert that fails to load it leaves the others as they were.
        Files are read from safetensors only.

        Example:

        ```py
        >>> import copy, torch
        >>> from diffusers import UNet2DConditionModel
        >>> from peft import LoraConfig
        >>> from peft.utils import get_peft_model_state_dict
        >>> from diffusers_stages import ExpertRoutingModel
        >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
        ...     norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        >>> model = ExpertRoutingModel([copy.deepcopy(unet), copy.deepcopy(unet)], stage_boundaries=(500,))
        >>> unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v"]))
        >>> model.load_lora_adapter(get_peft_model_state_dict(unet), prefix=None, adapter_name="style")
        >>> [list(expert.peft_config) for expert in model.experts]
        [['style'], ['style']]

        ```
        """
        require_peft()
        from diffusers.utils.peft_utils import get_adapter_name

        experts = self._peft_experts("load a LoRA")
        state_dict = fetch_lora(pretrained_model_name_or_path_or_dict, kwargs)
        shares = self._lora_per_expert(state_dict, prefix)
        for i, (expert, share) in enumerate(zip(experts, shares)):
            if callable(getattr(expert, "_prepare_lora", None)):  # a staged expert renames the LoRA onto itself
                try:
                    expert._prepare_lora(share, prefix)
                except ValueError as error:
                    raise ValueError(f"Expert {i} ({type(expert).__name__}): {error}") from error
            else:
                check_lora_fits(expert, share, prefix, lambda name, i=i: f"expert {i}")
        kwargs["adapter_name"] = kwargs.get("adapter_name") or get_adapter_name(self)
        loaded = []
        try:
            for expert, share in zip(experts, shares):
                expert.load_lora_adapter(share, prefix=prefix, hotswap=hotswap, **kwargs)
                loaded.append(expert)
        except Exception:
            if not hotswap:
                for expert in loaded:
                    expert.delete_adapters(kwargs["adapter_name"])
            raise

    @property
    def peft_config(self) -> dict:
        """The LoRA adapters of the experts (each has the same ones): the first expert's ``peft_config``."""
        for expert in self.experts:
            if expert is not None and getattr(expert, "peft_config", None):
                return expert.peft_config
        raise AttributeError(f"{type(self).__name__} has no LoRA adapters loaded (no `peft_config`).")

    def _each_expert(self, method: str, *args, **kwargs) -> None:
        for expert in self._peft_experts(f"use `{method}`"):
            getattr(expert, method)(*args, **kwargs)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """[`~diffusers.loaders.PeftAdapterMixin.add_adapter`] on every expert (LoRA training), each its own copy."""
        self._each_expert("add_adapter", copy.deepcopy(adapter_config), adapter_name)

    def save_lora_adapter(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str = "default",
        upcast_before_saving: bool = False,
        safe_serialization: bool = True,
        weight_name: str | None = None,
    ) -> None:
        """[`~diffusers.loaders.PeftAdapterMixin.save_lora_adapter`]: every expert's adapter ``adapter_name`` in one
        file, keys ``experts.{i}.`` (each expert its own part), which `load_lora_adapter(folder, prefix=None)` gives
        back to each expert."""
        from diffusers.loaders.peft import PeftAdapterMixin

        require_peft()
        self._peft_experts("use `save_lora_adapter`")
        PeftAdapterMixin.save_lora_adapter(
            self, save_directory, adapter_name, upcast_before_saving, safe_serialization, weight_name
        )

    def set_adapters(
        self,
        adapter_names: list[str] | str,
        weights: float | dict | list[float] | list[dict] | list[None] | None = None,
    ) -> None:
        """[`~diffusers.loaders.PeftAdapterMixin.set_adapters`] on every expert (block-wise scales as each takes)."""
        self._each_expert("set_adapters", adapter_names, copy.deepcopy(weights))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` the active adapter(s) of every expert."""
        self._each_expert("set_adapter", adapter_name)

    def disable_adapters(self) -> None:
        """Disable every expert's adapters."""
        self._each_expert("disable_adapters")

    def enable_adapters(self) -> None:
        """Enable every expert's adapters."""
        self._each_expert("enable_adapters")

    def active_adapters(self) -> list[str]:
        """The active adapters (the first expert's; every expert has the same)."""
        return self._peft_experts("use `active_adapters`")[0].active_adapters()

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None):
        """Fuse the LoRA weights into every expert's layers (what `pipe.fuse_lora` calls)."""
        self._each_expert("fuse_lora", lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        """Undo `fuse_lora` in every expert."""
        self._each_expert("unfuse_lora")

    def unload_lora(self) -> None:
        """Remove every LoRA layer from every expert (what `pipe.unload_lora_weights` calls)."""
        self._each_expert("unload_lora")

    def disable_lora(self) -> None:
        """Disable the LoRA layers of every expert (what `pipe.disable_lora` calls)."""
        self._each_expert("disable_lora")

    def enable_lora(self) -> None:
        """Enable the LoRA layers of every expert (what `pipe.enable_lora` calls)."""
        self._each_expert("enable_lora")

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        """Delete the adapters ``adapter_names`` from every expert (what `pipe.delete_adapters` calls)."""
        self._each_expert("delete_adapters", adapter_names)

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Prepare every expert for LoRA hotswapping (what `pipe.enable_lora_hotswap` calls)."""
        self._each_expert("enable_lora_hotswap", target_rank=target_rank, check_compiled=check_compiled)

    # ------------------------------------------------------------------------------------------------------------
    # IP-Adapter: what diffusers' `IPAdapterMixin` calls on `pipe.unet`, each expert's own
    def _ip_adapter_experts(self) -> list[ModelMixin]:
        """The experts, each able to take an IP-Adapter (see `_experts_with`)."""
        return self._experts_with("_load_ip_adapter_weights", "load an IP-Adapter")

    def _load_ip_adapter_weights(
        self, state_dicts: list[dict] | dict, low_cpu_mem_usage: bool = _LOW_CPU_MEM_USAGE_DEFAULT
    ) -> None:
        r"""
        Load IP-Adapters made for the source U-Net into every expert, each with its own
        ``_load_ip_adapter_weights`` (what `pipe.load_ip_adapter` calls): every expert its own image projection and
        processors, so that each stage's samples take the image prompt as the source does. The IP-Adapters are
        checked against every expert before any changes (an expert of other widths is a `ValueError` naming it and
        the shapes).

        Example:

        ```py
        >>> import copy, torch
        >>> from diffusers import UNet2DConditionModel
        >>> from diffusers_stages import ExpertRoutingModel
        >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
        ...     norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        ...     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        >>> model = ExpertRoutingModel([copy.deepcopy(unet), copy.deepcopy(unet)], stage_boundaries=(500,))
        >>> widths = [unet.get_submodule(n[:-10]).to_k.weight.shape for n in unet.attn_processors if "attn2" in n]
        >>> adapter = {"image_proj": {"proj.weight": torch.randn(64, 12), "proj.bias": torch.zeros(64),
        ...     "norm.weight": torch.ones(16), "norm.bias": torch.zeros(16)},
        ...     "ip_adapter": {f"{2 * i + 1}.to_{p}_ip.weight": torch.randn(w) for i, w in enumerate(widths) for p in "kv"}}
        >>> model._load_ip_adapter_weights([adapter])
        >>> [expert.config.encoder_hid_dim_type for expert in model.experts]
        ['ip_image_proj', 'ip_image_proj']

        ```
        """
        experts = self._ip_adapter_experts()
        state_dicts = check_ip_adapter_state_dicts(state_dicts)
        for i, expert in enumerate(experts):
            try:
                if callable(getattr(expert, "_check_ip_adapter", None)):  # a staged expert: onto its decoders
                    expert._check_ip_adapter(state_dicts)
                else:
                    check_ip_adapter_fits(expert, state_dicts, lambda name: "the expert")
            except ValueError as error:
                raise ValueError(f"Expert {i} ({type(expert).__name__}): {error}") from error
        for expert in experts:
            expert._load_ip_adapter_weights(state_dicts, low_cpu_mem_usage=low_cpu_mem_usage)
        # as diffusers marks a U-Net with an IP-Adapter (an attribute of the config, not saved); `layers_per_block`
        # for diffusers' `set_ip_adapter_scale`, which reads it (with `down_blocks`/`up_blocks`) from `pipe.unet`
        self.config.encoder_hid_dim_type = "ip_image_proj"
        self.config.layers_per_block = getattr(experts[0].config, "layers_per_block", 1)

    def _load_ip_adapter_loras(self, state_dicts: list[dict]) -> dict:
        """The LoRAs of IP-Adapter FaceID state dicts in the source U-Net's names (the first expert's reading), which
        `pipe.load_lora_weights` then puts into every expert (see `load_lora_adapter`)."""
        return self._ip_adapter_experts()[0]._load_ip_adapter_loras(state_dicts)

    @property
    def encoder_hid_proj(self) -> nn.Module | None:
        """The first expert's image projection (`MultiIPAdapterImageProjection` with an IP-Adapter loaded), which
        the pipelines read to prepare the image embeddings; setting it to `None` (`pipe.unload_ip_adapter`) removes
        every expert's IP-Adapter projection, as diffusers does for one U-Net."""
        expert = next((e for e in self.experts if e is not None), None)
        return getattr(expert, "encoder_hid_proj", None)

    @encoder_hid_proj.setter
    def encoder_hid_proj(self, value: None) -> None:
        if value is not None:
            raise ValueError(
                f"`encoder_hid_proj` of an {type(self).__name__} can only be set to None (each expert holds its own), "
                f"got {type(value).__name__}."
            )
        for expert in self.experts:
            if expert is None or getattr(expert.config, "encoder_hid_dim_type", None) != "ip_image_proj":
                continue
            expert.encoder_hid_proj = None  # as diffusers' `unload_ip_adapter` does for one U-Net
            expert.config.encoder_hid_dim_type = None
            if getattr(expert, "text_encoder_hid_proj", None) is not None:
                expert.encoder_hid_proj = expert.text_encoder_hid_proj
                expert.text_encoder_hid_proj = None
                expert.config.encoder_hid_dim_type = "text_proj"

    @property
    def down_blocks(self) -> tuple:
        """No blocks of its own (each expert has its own): the experts' down blocks as diffusers'
        ``set_ip_adapter_scale`` reads a U-Net's for a block-wise (dict) scale, block ``i`` with ``attentions``
        where an expert's has them (see `blocks_with_attentions`)."""
        return blocks_with_attentions([e for e in self.experts if e is not None], "down_blocks")

    @property
    def up_blocks(self) -> tuple:
        """The experts' up blocks, as `down_blocks`."""
        return blocks_with_attentions([e for e in self.experts if e is not None], "up_blocks")

    @property
    def attn_processors(self) -> dict[str, AttentionProcessor]:
        """The attention processors by name, an expert's name (``experts.{e}.down_blocks...``) also starting with
        the source U-Net's (``down_blocks...``, see `SourceLayerName`): diffusers' ``set_ip_adapter_scale`` gives a
        block-wise (dict) scale to every expert's layers as to one U-Net's."""
        return with_source_layer_names(super().attn_processors)

    @property
    def add_embedding(self) -> nn.Module:
        """The SDXL added-condition embedding of the first loaded expert (experts agree on its input width), which
        `StableDiffusionXLPipeline` reads to check its ``time_ids``."""
        for expert in self.experts:
            if expert is not None and getattr(expert, "add_embedding", None) is not None:
                return expert.add_embedding
        raise AttributeError("No loaded expert has an `add_embedding` (SDXL added conditions).")

    # ------------------------------------------------------------------------------------------------------------
    # saving and loading: one folder, one plain diffusers sub-folder per expert
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Write the container's `config.json` and each expert's own `save_pretrained` folder (``expert_{i}/``).

        Weights are safetensors unless ``safe_serialization=False`` (``.bin`` files, read back with
        ``weights_only=True``; ``save_function`` and ``use_flashpack`` are passed on to each expert's: the arguments
        come in `ModelMixin.save_pretrained`'s order). With ``push_to_hub=True`` the folder is uploaded to ``repo_id``
        (default: the folder's name) once written; ``token``, ``private``, ``commit_message`` and ``create_pr`` are
        passed on as in diffusers, and a failed push is an `OSError` naming the repository.
        """
        missing = [i for i, e in enumerate(self.experts) if e is None]
        if missing:
            raise ValueError(f"Experts {missing} are not loaded: load every expert before `save_pretrained`.")
        check_savable(self, f"the {type(self).__name__}")
        push = pop_push_kwargs(kwargs, save_directory, push_to_hub)
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` must be a directory, got the file {save_directory}.")
        os.makedirs(save_directory, exist_ok=True)
        if is_main_process:
            # every expert is loaded now (set after a `load_experts` load too): the config describes each one
            self.register_to_config(expert_configs=[expert_config(e) for e in self.experts])
            self.save_config(save_directory)
        shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        for i, expert in enumerate(self.experts):
            path = os.path.join(save_directory, expert_folder(i))
            expert.save_pretrained(
                path,
                is_main_process=is_main_process,
                save_function=save_function,
                safe_serialization=safe_serialization,
                variant=variant,
                use_flashpack=use_flashpack,
                **shard,
            )
        if push_to_hub and is_main_process:
            push_saved_folder(self, save_directory, is_pipeline=False, **push)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        load_experts: Sequence[int] | None = None,
        subfolder: str | None = None,
        **kwargs,
    ) -> ExpertRoutingModel:
        r"""
        Load a folder written by [`~ExpertRoutingModel.save_pretrained`] (locally or from the Hub).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): the folder, or a Hub repository id.
            load_experts (`list[int]`, *optional*): load only these experts (the others stay `None`, and from the
                Hub are not even downloaded); all by default.
            subfolder (`str`, *optional*): the container's folder inside the repository, e.g. ``"experts"``.
            kwargs: the container's routing settings (``stage_boundaries``, ``boundary_units``,
                ``num_train_timesteps``, ``prediction_type``) replace the saved ones, as a config key passed to a
                diffusers model's `from_pretrained` does (checked as the constructor's); everything else is passed to
                every expert's own `from_pretrained` (``torch_dtype``, ``device_map``, ``variant``, ...);
                ``cache_dir``, ``token``, ``revision``, ``force_download`` and ``local_files_only`` are used for the
                download. A checkpoint that does not match its expert's config raises a `ValueError`.
                With ``output_loading_info=True`` it returns ``(model, info)``, ``info`` in diffusers' shape
                (``missing_keys``, ...) with the container's key names (``experts.{i}.``).
        """
        if load_experts is not None and not isinstance(load_experts, (list, tuple, range)):
            raise ValueError(f"`load_experts` must be a list of expert indices, got {load_experts!r}.")
        wants_info = kwargs.pop("output_loading_info", False)
        check_model_dtype(kwargs)
        for key in CONTAINER_CONFIG[:1] + ("expert_configs",):  # what the saved experts are, not a setting
            if key in kwargs:
                raise ValueError(
                    f"`{key}` cannot be passed to `{cls.__name__}.from_pretrained`: the folder's experts define it."
                )
        # the container's routing settings replace the saved ones (as a config key given to a diffusers model's
        # `from_pretrained`); they are the container's, not the experts'
        routing = {key: kwargs.pop(key) for key in CONTAINER_CONFIG[1:] if key in kwargs}
        download = {k: kwargs.pop(k) for k in DOWNLOAD_KWARGS if k in kwargs}
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if not os.path.isdir(folder):
            if os.path.exists(pretrained_model_name_or_path):  # a local path, not a Hub repository id
                raise OSError(
                    f"{folder} is not a folder: `pretrained_model_name_or_path` (with `subfolder`) must name the "
                    f"folder `{cls.__name__}.save_pretrained` wrote."
                )
            folder = _download(str(pretrained_model_name_or_path), subfolder, load_experts, download)
        else:
            check_subfolder(pretrained_model_name_or_path, subfolder)
        check_folder_files(folder)
        config = cls.load_config(folder)
        refuse_other_model_class(cls, config, pretrained_model_name_or_path, subfolder)
        if config.get("_class_name") != cls.__name__ or "expert_classes" not in config:
            raise ValueError(f"{folder} does not hold a saved {cls.__name__} (see its `config.json`).")
        missing = [key for key in CONTAINER_CONFIG if key not in config]
        if missing or not isinstance(config["expert_classes"], list):
            raise ValueError(
                f"`config.json` of {folder} must hold {list(CONTAINER_CONFIG)}, with `expert_classes` a list of "
                f"[module, class] entries: it lacks {missing}, `expert_classes` is {config['expert_classes']!r}."
            )
        entries = [list(entry) if isinstance(entry, (list, tuple)) else entry for entry in config["expert_classes"]]
        wanted = range(len(entries)) if load_experts is None else list(load_experts)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(entries) for i in wanted):
            raise ValueError(f"`load_experts` must hold expert indices in [0, {len(entries)}), got {load_experts}.")

        # each expert through its own class's `from_pretrained`, strictly: a checkpoint that disagrees is an error
        experts, infos = [None] * len(entries), {}
        for i in sorted(set(wanted)):
            path = component_folder(folder, expert_folder(i))
            expert_class = import_class(entries[i])
            try:
                # diffusers' own experts as strictly as the package's: keys, shards and integer weights
                expert, info = load_checked(expert_class.from_pretrained, expert_class.__name__, path, kwargs)
            except (RuntimeError, ValueError) as error:
                raise ValueError(
                    f"Expert {i} at {path} could not be loaded as {expert_class.__name__}: {error}"
                ) from error
            realign_storage(expert)  # bit-identical outputs after a reload
            if type(expert) is not expert_class:  # diffusers' legacy remapping: a `Transformer2DModel` DiT folder
                entries[i] = class_entry(expert)  # loads as a `DiTTransformer2DModel`, as `from_config` builds it
            experts[i], infos[i] = expert, info
        model = cls(
            experts,
            expert_classes=entries,
            expert_configs=config.get("expert_configs"),
            **{**{key: config[key] for key in CONTAINER_CONFIG[1:]}, **routing},
        )
        model.eval()
        return (model, _merged_loading_info(infos)) if wants_info else model


def _merged_loading_info(infos: dict[int, dict]) -> dict[str, list]:
    """The experts' loading infos as one in diffusers' shape (``missing_keys``, ``unexpected_keys``,
    ``mismatched_keys``, ``error_msgs``): each key named as in the container's ``state_dict`` (``experts.{i}.``)."""
    merged: dict[str, list] = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    for i, info in sorted(infos.items()):
        for field, values in info.items():
            if field.endswith("_keys"):
                merged.setdefault(field, []).extend(_prefixed(f"experts.{i}.", value) for value in values)
            else:
                merged.setdefault(field, []).extend(values)
    return merged


def _prefixed(prefix: str, value):
    """``value`` (a key, or a ``(key, checkpoint shape, model shape)`` tuple of mismatched keys) under ``prefix``."""
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return (prefix + value[0], *value[1:])
    return prefix + str(value)


def _download(repo_id: str, subfolder: str | None, load_experts: Sequence[int] | None, download: dict) -> str:
    """Fetch the container's config and only the experts to be loaded (configs and weights, never code) from the
    Hub; the local folder."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    prefixes = [prefix] if load_experts is None else [f"{prefix}{expert_folder(i)}/" for i in load_experts]
    root = download_weights(repo_id, prefixes, files=[f"{prefix}config.json"], **download)
    check_subfolder(root, subfolder)  # `..` would lead out of the snapshot, to another folder of the cache
    return os.path.join(root, prefix)
