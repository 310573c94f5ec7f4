"""Fine-tuning a saved pipeline folder (`--pretrained_model_name_or_path`), as the training scripts share it: its
configs are read before any weights (nothing in it is run), and its noise schedule, VAE and architecture are kept,
so the arguments and data that contradict them are refused by name."""

from __future__ import annotations

import argparse
import json
import os
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin

from ...conventions import num_data_classes
from ...hub import is_missing_local_path
from ...models.checks import sample_size_is
from ...models.loading import (
    PLAIN_WEIGHT_FILES,
    check_folder_files,
    check_subfolder,
    config_misfit,
    plain_weight_headers,
)
from ...partition import TimestepPartition
from ...pipelines.loading import package_classes, resolve_pipeline_class
from ...schedulers import check_scheduler_units, is_edm_scheduler
from ..args import refuse_given_options
from .base import TrainingTask, noise_schedulers

OPTION = "`--pretrained_model_name_or_path`"


@dataclass
class PipelineSource:
    """What fine-tuning reads from a saved pipeline folder (or Hub repository) before any weights load: its
    `model_index.json`, the configs of its denoisers by folder (``unet``, ``experts/expert_0``, ``shallow``, ...),
    its scheduler's config, and the class of its VAE (None when it has none)."""

    path: str
    index: dict  # its model_index.json
    configs: dict[str, dict]
    scheduler_config: dict
    vae_class: str | None
    classes: dict[str, type[ModelMixin]] = field(default_factory=dict)  # of the models read (`read_model`), by folder

    @classmethod
    def read_pipeline(cls, path: str, pipeline: str, folders: Sequence[str]) -> PipelineSource:
        """Read the `model_index.json`, the ``folders``' configs and the scheduler config of a ``pipeline`` folder;
        anything else is a ValueError naming `--pretrained_model_name_or_path`."""
        if is_missing_local_path(path):
            article = "an" if pipeline[0] in "AEIOU" else "a"
            raise ValueError(
                f"{OPTION} {path!r} is not {article} {pipeline} folder: no such folder (nor a Hub repository id, "
                "'namespace/name'); check the path of the saved pipeline folder (the one that holds model_index.json)."
            )
        try:
            index = _load_config(DiffusionPipeline, path)
            # the package's allow-list, as `from_pretrained` reads it (nothing named is imported)
            resolve_pipeline_class(package_classes()[pipeline], index.get("_class_name"))
            configs = {folder: _load_config(UNet2DModel, path, folder) for folder in folders}
            scheduler_config = _load_config(DDPMScheduler, path, "scheduler")
        except (OSError, ValueError) as error:
            parts = ", ".join(["model_index.json", *(f"{folder}/" for folder in (*folders, "scheduler"))])
            article = "an" if pipeline[0] in "AEIOU" else "a"
            raise ValueError(
                f"{OPTION} {path!r} is not {article} {pipeline} folder or Hub repository ({parts}): {error}"
                f"{_model_folder_hint(path)}"
            ) from None
        vae = index.get("vae")  # [library, class], or [None, None] (or none) for a pixel-space pipeline
        vae = [None, None] if vae is None else vae
        if not (
            isinstance(vae, list) and len(vae) == 2 and (vae == [None, None] or all(isinstance(x, str) for x in vae))
        ):
            raise ValueError(
                f"{OPTION} {path!r}: the `vae` entry of its model_index.json must be [library, class] (or [null, "
                f"null]), got {vae!r}."
            )
        return cls(path, index, configs, scheduler_config, vae[1] if vae[0] is not None else None)

    def partition(self, folder: str) -> TimestepPartition:
        """The stages that the config of ``folder`` holds (``stage_boundaries``, ``boundary_units``,
        ``num_train_timesteps``); a bad value is a ValueError naming the option and the file."""
        try:
            return TimestepPartition.from_config(self.configs[folder])
        except ValueError as error:
            raise ValueError(f"{OPTION} {self.path!r}: its {folder}/config.json: {error}") from None

    def read_model(self, folder: str, classes: Mapping[str, type[ModelMixin]], advice: str = "") -> type[ModelMixin]:
        """Read the config of the denoiser in ``folder`` (if not read yet) and return its class, which must be one of
        ``classes`` (by ``_class_name``, read from a folder: anything; nothing it names is imported)."""
        if folder not in self.configs:
            try:
                self.configs[folder] = _load_config(UNet2DModel, self.path, folder)
            except (OSError, ValueError) as error:
                raise ValueError(f"{OPTION} {self.path!r}: no model config read from its {folder}/: {error}") from None
        name = self.configs[folder].get("_class_name")
        if not isinstance(name, str) or name not in classes:  # (a list is no dict key)
            raise ValueError(
                f"{OPTION} {self.path!r} holds a {name!r} (`_class_name`) as its {folder}, not one of "
                f"{sorted(classes)}{advice}."
            )
        self.classes[folder] = classes[name]
        return classes[name]

    def check_builds(self, folder: str) -> None:
        """Build the model of ``folder`` (read by `read_model`) from its config without weights (as diffusers loads
        one, `init_empty_weights`): a value its class cannot take, or (a local folder) a weight file's tensor of
        another shape (its header read, `first_shape_mismatch`), is a ValueError naming the option and the file
        before the run loads its data, not an error from inside the model (or the strict loading) once it has."""
        model_class = self.classes[folder]
        local = os.path.join(self.path, folder)  # (a Hub repository's weights are its loader's)
        held = plain_weight_headers(local) if os.path.isdir(local) else {}  # headers only
        misfit = config_misfit(lambda: model_class.from_config(self.configs[folder]), held)
        if misfit is not None and not misfit.builds:
            raise ValueError(
                f"{OPTION} {self.path!r}: its {folder}/config.json does not build a {model_class.__name__}: "
                f"{misfit.reason}"
            )
        if misfit is not None:
            raise ValueError(
                f"{OPTION} {self.path!r}: the weights in its {folder}/ do not fit its config.json: {misfit.reason}"
            )

    def check_weights(self, folder: str) -> None:
        """Refuse a local source whose ``folder`` holds no weights that loading without a variant reads (a folder
        saved with ``variant="fp16"`` only), when the arguments are checked; a Hub repository is its loader's."""
        local = os.path.join(self.path, folder)
        if not os.path.isdir(local) or any(os.path.isfile(os.path.join(local, name)) for name in PLAIN_WEIGHT_FILES):
            return
        found = sorted(name for name in os.listdir(local) if name.startswith("diffusion_pytorch_model."))
        raise ValueError(
            f"{OPTION} {self.path!r}: its {folder}/ holds no weights to load without a variant, only {found} (one of "
            f"{list(PLAIN_WEIGHT_FILES)} is needed): fine-tuning loads a folder's plain weights, so save a copy without "
            "`variant=` (`pipe.save_pretrained(folder)`) and fine-tune that."
        )

    def config_downsampling(self, folder: str, levels_key: str = "block_out_channels") -> int:
        """The down-sampling factor of the model in ``folder``: its patch side (a U-ViT), else one halving per
        resolution level (an entry of ``levels_key``), refused by name where the config does not give it."""
        config = self.configs[folder]
        if "patch_size" in config and levels_key not in config:
            size = config["patch_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(
                    f"{OPTION} {self.path!r}: `patch_size` of its {folder}'s config.json must be a positive integer, "
                    f"got {size!r}."
                )
            return size
        levels = config.get(levels_key)
        if not isinstance(levels, list) or not levels:
            raise ValueError(
                f"{OPTION} {self.path!r}: `{levels_key}` of its {folder}'s config.json must be a list, one entry per "
                f"resolution level, got {levels!r}."
            )
        return 2 ** (len(levels) - 1)


def _model_folder_hint(path: str) -> str:
    """A hint for a local model folder (a ``config.json``, no ``model_index.json``) given where a pipeline folder is
    asked: the pipeline folder above it (within two levels), else that it is a model folder. Only the names in
    the JSON files are read (nothing is imported); anything else gives no hint."""
    if not os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "model_index.json")):
        return ""
    folder = os.path.abspath(path)
    for levels in (1, 2):
        parent = os.path.dirname(folder) if levels == 1 else os.path.dirname(os.path.dirname(folder))
        if os.path.isfile(os.path.join(parent, "model_index.json")):
            inner = os.path.relpath(folder, parent).replace(os.sep, "/")
            shown = os.path.normpath(os.path.join(path, *[os.pardir] * levels))
            return f" It is the {inner}/ model folder of the pipeline folder {shown!r}: pass that folder."
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as file:
            name = json.load(file).get("_class_name")
    except (OSError, ValueError, AttributeError):
        name = None
    model = name if isinstance(name, str) and name.isidentifier() else "model"
    return (
        f" It holds a {model} (config.json), a model folder, not a pipeline folder: pass the folder a training run "
        "saved (or a pipeline's `save_pretrained`), which holds model_index.json beside its model and scheduler/."
    )


def _load_config(config_class: type[ConfigMixin], path: str, subfolder: str | None = None) -> dict:
    """``config_class``'s config file (``model_index.json``, ``config.json``, ...) of ``path`` (in ``subfolder``),
    which must hold a JSON object (read from a folder: anything). A local folder's files are checked first
    (`check_source_folder`)."""
    check_source_folder(path, subfolder)
    config = config_class.load_config(path, subfolder=subfolder)
    if not isinstance(config, dict):
        file = "/".join([*([subfolder] if subfolder else []), config_class.config_name])
        raise ValueError(f"its {file} must hold a JSON object, got {type(config).__name__}.")
    return config


def check_source_folder(path: str, subfolder: str | None = None) -> None:
    """Check the files of a local source folder ``path`` (in ``subfolder``) as the loaders check them
    (`check_subfolder`, `check_folder_files`): nothing is read through a link out of the folder, and its config and
    weight index files are JSON objects. A Hub repository, or a missing folder, is the loader's."""
    if os.path.isdir(path):
        check_subfolder(path, subfolder)
        folder = os.path.join(path, subfolder or "")
        if os.path.isdir(folder):  # (a missing one is the loader's error)
            check_folder_files(folder)


class FineTuningTask(TrainingTask):
    """A task that, given `--pretrained_model_name_or_path`, fine-tunes the networks of a saved pipeline folder
    (`source`) instead of building them from the arguments: the folder's noise schedule samples and trains, its VAE
    encodes the data (without `--vae_path`), and the data must fit its networks (`check_data`)."""

    source: PipelineSource | None = None

    def __init__(self, args: argparse.Namespace):
        # the source's configs (no weights yet) come first: the partition and every check follow them
        path = getattr(args, "pretrained_model_name_or_path", None)
        self.source = None if path is None else self.read_source(path)
        if self.source is not None:
            self.scheduler_config = self.source.scheduler_config
        super().__init__(args)

    def read_source(self, path: str) -> PipelineSource:
        """The source folder's configs, its denoisers' classes checked."""
        raise NotImplementedError

    def source_configs(self) -> dict[str, dict]:
        """The configs of the source's networks this run trains, by their folder (read by `build_partition`)."""
        raise NotImplementedError

    def training_vae(self, args: argparse.Namespace) -> tuple[str | None, str | None]:
        """Fine-tuning without `--vae_path`: the latent space of the source's own VAE (`--vae_path SOURCE
        --vae_subfolder vae`), as that is the space its networks denoise."""
        vae_class = None if self.source is None else self.source.vae_class
        if args.vae_path is not None or vae_class is None:
            return super().training_vae(args)
        if vae_class != "AutoencoderKL":
            raise ValueError(
                f"{OPTION} {self.source.path!r} holds a {vae_class} as its VAE, but training encodes images with an "
                "AutoencoderKL only: give one whose latents fit the model with `--vae_path`."
            )
        try:  # read from a folder: checked as the loader checks it, before the run starts
            name = _load_config(AutoencoderKL, self.source.path, "vae").get("_class_name")
        except (OSError, ValueError) as error:
            raise ValueError(f"{OPTION} {self.source.path!r}: its vae/: {error}") from None
        if name != vae_class:  # (as `--vae_path` would be refused, but naming the option given)
            raise ValueError(
                f"{OPTION} {self.source.path!r} holds a {name!r} in its vae/config.json (`_class_name`), not the "
                f"{vae_class} its model_index.json names: training encodes images with an AutoencoderKL only."
            )
        self.source.check_weights("vae")
        return self.source.path, "vae"

    def check_source_arguments(
        self,
        args: argparse.Namespace,
        partition: TimestepPartition,
        refused: Sequence[str],
        kept: str,
        model_classes: Sequence[type[ModelMixin]],
    ) -> None:
        """Refuse every argument that contradicts the source: the ``refused`` options (``kept`` says what the source
        gives instead), `--boundary_units` other than ``partition``'s, a noise schedule other than the source
        scheduler's, and `--gradient_checkpointing` where one of ``model_classes`` has none."""
        path = self.source.path
        reason = f"fine-tuning keeps the model of {path!r} ({kept}, its own architecture)"
        refuse_given_options(args, refused, OPTION, reason)
        if args.boundary_units != partition.units:
            raise ValueError(
                f"`--boundary_units` {args.boundary_units} disagrees with the model of {path!r}, whose stage "
                f"boundaries are in {partition.units!r} units: pass `--boundary_units {partition.units}`."
            )
        # the schedule arguments must repeat the source's rather than be read from it: argparse cannot tell a
        # default from a typed value, so a silent override could hide a value the user meant, while training with
        # the arguments' schedule would fine-tune on a noise schedule the model never saw; the error names the fix
        training, sampling = noise_schedulers(args, self.source.scheduler_config)
        expected = {
            "num_train_timesteps": training.config.num_train_timesteps,
            "prediction_type": training.config.prediction_type,
        }
        if not is_edm_scheduler(training):  # EDM has no beta schedule (nor does fresh EDM training read one)
            expected["ddpm_beta_schedule"] = training.config.beta_schedule
        for name, value in expected.items():
            if getattr(args, name) != value:
                raise ValueError(
                    f"`--{name}` {getattr(args, name)} disagrees with the scheduler of {path!r} ({value}): pass "
                    f"`--{name} {value}` (fine-tuning keeps the source's noise schedule)."
                )
        try:  # EDM scheduler <-> sigma stages, and the stages' step count = the scheduler's
            check_scheduler_units(sampling, partition)
        except ValueError as error:
            raise ValueError(f"{OPTION} {path!r}: {error}") from None
        unsupported = [cls.__name__ for cls in model_classes if not cls._supports_gradient_checkpointing]
        if args.gradient_checkpointing and unsupported:
            raise ValueError(
                f"`--gradient_checkpointing` is not supported by {unsupported[0]} (the model of {path!r}): drop it."
            )

    def check_networks(self, in_channels, sample_size, num_class_embeds):
        if self.source is None:
            super().check_networks(in_channels, sample_size, num_class_embeds)
            return
        for folder in self.source_configs():  # the networks this run loads build from their configs, and have weights
            self.source.check_builds(folder)
            self.source.check_weights(folder)
        # the samples' shape is the arguments' (`--resolution`, the VAE's latents): checked before any data is read;
        # the class count is the data's (`check_data`)
        for config in self.source_configs().values():
            self._check_shape(config, in_channels, sample_size)

    def check_data(self, in_channels, sample_size, num_class_embeds):
        if self.source is None:
            return
        for config in self.source_configs().values():
            self._check_shape(config, in_channels, sample_size)
            self._check_classes(config, num_class_embeds)

    def data_warnings(self):
        names = None if self.source is None or not self.args.class_conditional else self.source.index.get("id2label")
        if names is None or names == self.id2label:  # (transfer to other labels may be meant: said, not refused)
            return []
        shown = reprlib.repr(list(names.values()) if isinstance(names, dict) else names)
        return [
            f"{OPTION} {self.source.path!r} has the class names {shown} (`id2label` of its model_index.json), but the "
            f"training data's are {reprlib.repr(self.class_names)}: the data's class i fine-tunes the source's class "
            f"i, {self.saved_class_names()}."
        ]

    def saved_class_names(self) -> str:
        """What this run saves of the data's class names, for `data_warnings` (the end of its sentence)."""
        return "and the result is saved with the data's (the pipeline's `id2label`)"

    def _check_shape(self, config: dict, in_channels: int, sample_size: int) -> None:
        """Refuse samples of ``in_channels`` channels and side ``sample_size`` (RGB or the VAE's latents, at
        `--resolution`) that the source's network of ``config`` does not take, naming the argument to change."""
        path = self.source.path
        if in_channels != config.get("in_channels"):
            data = (
                f"`--vae_path` {self.vae_path!r} gives latents of {in_channels} channels"
                if self.vae_path is not None
                else f"the data are RGB images ({in_channels} channels; a latent model needs `--vae_path`)"
            )
            raise ValueError(
                f"{OPTION} {path!r} holds a model with in_channels={config.get('in_channels')}, but {data}."
            )
        size = config.get("sample_size")  # an int, [height, width], or None (a U-Net of any size)
        if size is not None and not sample_size_is(size, sample_size):
            sides = tuple(size if isinstance(size, (list, tuple)) else (size, size))
            factor = self.args.resolution // sample_size
            square = len(sides) == 2 and sides[0] == sides[1] and isinstance(sides[0], int)
            fix = f"pass `--resolution {sides[0] * factor}`" if square else "the data are square"
            raise ValueError(
                f"`--resolution` {self.args.resolution} gives {sample_size}x{sample_size} samples, but the model of "
                f"{path!r} has sample_size={size}: {fix}."
            )

    def _check_classes(self, config: dict, num_class_embeds: int | None) -> None:
        """Refuse data of ``num_class_embeds`` class embeddings (classes + 1, or None unlabelled) other than the
        source's network of ``config`` has."""
        path = self.source.path
        if num_class_embeds != config.get("num_class_embeds"):
            data = (
                f"{num_data_classes(num_class_embeds)} classes (+ the null label: num_class_embeds={num_class_embeds})"
                if num_class_embeds is not None
                else "no class labels (num_class_embeds=None)"
            )
            raise ValueError(
                f"`--class_conditional`: the data give {data}, but the model of {path!r} has "
                f"num_class_embeds={config.get('num_class_embeds')} (with `--class_conditional`, classes + 1)."
            )
