"""Text-to-image fine-tuning of a Stable Diffusion pipeline's U-Net, staged (one shared encoder, one decoder per stage)
or as experts (one `UNet2DConditionModel` per stage), with the VAE and the text encoder frozen.

The captions ride on the loop's label indices: image ``i``'s label is ``i``, the loss encodes caption ``i`` with the
frozen text encoder, and the null label (index ``len(images)``, used by `--class_dropout_prob`) is the empty caption.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from functools import partial

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin

from ...conventions import paper_boundaries
from ...loss import diffusion_loss
from ...models.expert_routing import ExpertRoutingModel, expert_folder
from ...models.loading import component_folder, load_strictly, refuse_without_plain_safetensors
from ...models.unet_multistage_condition import MultiStageUNet2DConditionModel
from ...partition import TimestepPartition
from ...pipelines.loading import check_tokenizer, load_transformers_components
from ...planning.data import is_inside, open_image_file
from ..args import partition_from_args
from ..data import ImageRecords, dataset_image, folder_image, load_train_split
from ..hub import shared_name
from .base import Draw, TrainingTask, shares_text
from .pretrained import _load_config, check_source_folder

METHODS = ("multistage", "experts")
SOURCE_UNETS = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "MultiStageUNet2DConditionModel": MultiStageUNet2DConditionModel,
    "ExpertRoutingModel": ExpertRoutingModel,
}
# the experts of a routed source that take the captions' hidden states (`encoder_hidden_states`)
TEXT_CONDITIONAL_EXPERTS = ("UNet2DConditionModel", "MultiStageUNet2DConditionModel")
# the shared parser's options for a model built from scratch, which the source pipeline gives here (unset by default)
SOURCE_OPTIONS = ("vae_path", "vae_subfolder", "model_config", "block_out_channels", "layers_per_block",
                  "down_block_types", "up_block_types", "attention_head_dim", "norm_num_groups", "dropout")  # fmt: skip


def caption_variants(value, where: str, caption_column: str) -> list[str]:
    """The captions of one image: a string, or a non-empty list of strings, of which diffusers'
    `train_text_to_image.py` trains on one at random each time (see `TextToImageTask.encode_captions`)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        f"`--caption_column` {caption_column!r}: {where} has the caption {value!r}, which is neither a string nor a "
        "list of strings; give each image a caption (or a list of captions)."
    )


def captioned_folder(folder: str, caption_column: str) -> tuple[list[str], list[list[str]]]:
    """``(image paths, captions)`` (each image's list of captions) of an image folder with a ``metadata.jsonl`` (one ``{"file_name": ...,
    "<caption_column>": ...}`` per line, the `datasets` image-folder convention); every image is decoded once here."""
    index = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(index):
        raise ValueError(
            f"`--train_data_dir` must hold a metadata.jsonl (one `file_name` and `{caption_column}` per line), got "
            f"{folder!r}."
        )
    paths, captions = [], []
    with open(index, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"`--train_data_dir`: {index} line {number} is not JSON ({error}).") from None
            if not isinstance(entry, dict) or "file_name" not in entry or caption_column not in entry:
                raise ValueError(
                    f"`--caption_column` {caption_column!r}: {index} line {number} must have `file_name` and "
                    f"`{caption_column}`, got {line.strip()!r}."
                )
            # a file of the folder: a relative path that stays in it (no absolute path, `..` or link out of it)
            name = entry["file_name"]
            path = os.path.join(folder, name) if isinstance(name, str) and name else ""
            if not path or os.path.isabs(name) or not is_inside(path, folder):
                raise ValueError(
                    f"`--train_data_dir`: {index} line {number} has `file_name` {name!r}, which is not a file of "
                    f"{folder!r} (a path relative to it that stays inside it)."
                )
            paths.append(path)
            captions.append(caption_variants(entry[caption_column], f"{index} line {number}", caption_column))
    if not paths:
        raise ValueError(f"`--train_data_dir` {folder!r}: its metadata.jsonl lists no images.")
    for path in paths:  # decode every file once before training starts: a bad one stops the run, named
        open_image_file(path, "--train_data_dir").close()
    return paths, captions


class TextToImageTask(TrainingTask):
    """Fine-tune the ``unet`` of a `StableDiffusionPipeline` folder on captioned images, as a
    `MultiStageUNet2DConditionModel` (`--method multistage`) or as an `ExpertRoutingModel` of
    `UNet2DConditionModel`s (`--method experts`); the result is a `StableDiffusionPipeline` folder again.

    A plain source ``unet`` is warm-started exactly (every decoder, or every expert, a copy of it) at
    `--stage_boundaries`; a staged or routed source keeps its stages."""

    tags = ("text-to-image", "stable-diffusion")
    ema_warmup = False  # diffusers' train_text_to_image.py EMA: decay (1 + step) / (10 + step), up to --ema_max_decay

    def __init__(self, args: argparse.Namespace):
        # the source's configs (no weights yet): the stages, the noise schedule and every check follow them
        self.source = args.pretrained_model_name_or_path
        try:
            index = self.source_index = _load_config(DiffusionPipeline, self.source)
            self.unet_config = _load_config(UNet2DConditionModel, self.source, "unet")
            self.scheduler_config = _load_config(DDPMScheduler, self.source, "scheduler")
        except (OSError, ValueError) as error:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {self.source!r} is not a Stable Diffusion pipeline folder or Hub "
                f"repository (model_index.json, unet/, scheduler/): {error}"
            ) from None
        if index.get("_class_name") != "StableDiffusionPipeline":
            raise ValueError(
                f"`--pretrained_model_name_or_path` {self.source!r} is a {index.get('_class_name')}, not a "
                "StableDiffusionPipeline (SDXL's extra text encoder and size conditioning are not trained here)."
            )
        absent = [name for name in ("vae", "text_encoder", "tokenizer") if not _saved(index.get(name))]
        if absent:  # a pipeline saved without them (`text_encoder=None`): nothing to encode captions or images with
            raise ValueError(
                f"`--pretrained_model_name_or_path` {self.source!r} holds no {', '.join(absent)} (model_index.json: "
                f"{', '.join(f'{n}={index.get(n)!r}' for n in absent)}): text-to-image training needs the source's "
                "VAE, text encoder and tokenizer."
            )
        for name in ("vae", "text_encoder", "tokenizer"):  # loaded with the networks, once the data are read
            try:
                check_source_folder(self.source, name)
            except ValueError as error:
                raise ValueError(f"`--pretrained_model_name_or_path` {self.source!r}: its {name}/: {error}") from None
        self.unet_class = self.unet_config.get("_class_name")
        if not isinstance(self.unet_class, str) or self.unet_class not in SOURCE_UNETS:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {self.source!r} holds a {self.unet_class} as its unet, not one of "
                f"{list(SOURCE_UNETS)}."
            )
        if self.unet_class == "ExpertRoutingModel":  # its experts are trained with the captions' hidden states
            names = [c[1] if isinstance(c, list) and len(c) == 2 else repr(c) for c in self._experts().values()]
            other = [name for name in names if name not in TEXT_CONDITIONAL_EXPERTS]
            if not names:  # (no expert folder for the other checks to read)
                raise ValueError(
                    f"`--pretrained_model_name_or_path` {self.source!r} holds an ExpertRoutingModel without experts "
                    "(`expert_classes` of its unet/config.json: []): save the routed unet again with its experts."
                )
            if other:
                raise ValueError(
                    f"`--pretrained_model_name_or_path` {self.source!r} holds an ExpertRoutingModel of {other[0]} "
                    f"experts (`expert_classes` of its unet/config.json: {names}): text-to-image training conditions "
                    f"every expert on the captions, so each must be one of {list(TEXT_CONDITIONAL_EXPERTS)}."
                )
        self._check_safetensors()
        self._check_conditioning()
        kept = {"MultiStageUNet2DConditionModel": "multistage", "ExpertRoutingModel": "experts"}.get(self.unet_class)
        if kept is not None and kept != args.method:
            raise ValueError(
                f"`--method {args.method}`: the source unet is a {self.unet_class}, which trains with `--method {kept}`."
            )
        if args.class_conditional or args.stage_sampling != "mixed":
            raise ValueError(
                "`--class_conditional` and `--stage_sampling` other than `mixed` are refused: the captions condition "
                "the model and every batch is stratified over the stages."
            )
        if args.train_data_dir is not None and args.image_column != "image":
            raise ValueError(
                f"`--image_column` {args.image_column!r} is refused with `--train_data_dir`: an image folder's images "
                "are its metadata.jsonl's `file_name` entries (the `image` column datasets' imagefolder reads). Drop "
                "`--image_column`, or give the data as a dataset with `--dataset_name`."
            )
        source_type = self.scheduler_config.get("prediction_type", "epsilon")
        if args.prediction_type is not None and args.prediction_type != source_type:
            raise ValueError(
                f"`--prediction_type` {args.prediction_type} disagrees with the source's scheduler ({source_type}): "
                "the prediction type is the model's, drop the argument or give the source's."
            )
        prompts = args.validation_prompts or []
        if len(prompts) > args.num_sample_images:  # the grid samples prompt i % len(prompts) for image i
            raise ValueError(
                f"`--validation_prompts` gives {len(prompts)} prompts, but the sample grids hold "
                f"`--num_sample_images` {args.num_sample_images} images: the last prompts would never be sampled. "
                f"Give `--num_sample_images` {len(prompts)} or more, or fewer prompts."
            )
        self._refuse_what_the_source_gives(args)
        for name in ("ema_inv_gamma", "ema_power"):  # the script leaves them unset: they shape a warmup it has not
            if getattr(args, name) is not None:
                raise ValueError(
                    f"`--{name}` {getattr(args, name)} is refused: it shapes train_unconditional.py's EMA warmup, while "
                    "this script's EMA decays as diffusers' train_text_to_image.py's, (1 + step) / (10 + step) up to "
                    "`--ema_max_decay`. Drop it."
                )
        self.method = {"multistage": "multi-stage multi-decoder U-Net", "experts": "multi-expert denoisers"}[
            args.method
        ]
        self.text_encoder = self.tokenizer = self._vae = None  # loaded with the networks
        self._saved_names: tuple[str, ...] = ()  # the source's other transformers models (its safety checker)
        self.captions: list[str] = []  # each image's first caption (the default sample prompts)
        self.caption_variants: list[list[str]] = []  # each image's captions, of which a step trains on one
        super().__init__(args)

    def _refuse_what_the_source_gives(self, args: argparse.Namespace) -> None:
        """The source pipeline gives the U-Net, the VAE and the noise schedule: the shared parser's options that
        would choose them are refused rather than ignored (the script leaves them unset), the schedule's unless they
        repeat the source's."""
        for name in SOURCE_OPTIONS:
            if getattr(args, name) is not None:
                raise ValueError(
                    f"`--{name}` {getattr(args, name)!r} is refused: fine-tuning keeps the U-Net, the VAE and the noise "
                    f"schedule of `--pretrained_model_name_or_path` {self.source!r}. Drop `--{name}`."
                )
        schedule = {
            "num_train_timesteps": self.scheduler_config.get("num_train_timesteps", 1000),
            "ddpm_beta_schedule": self.scheduler_config.get("beta_schedule", "linear"),
        }
        for name, value in schedule.items():
            if getattr(args, name) not in (None, value):
                raise ValueError(
                    f"`--{name}` {getattr(args, name)} disagrees with the scheduler of {self.source!r} ({value}): "
                    f"fine-tuning keeps the source's noise schedule; drop `--{name}`."
                )

    # what the loop reads before any weights load
    def training_vae(self, args):
        return self.source, "vae"

    def build_partition(self, args):
        if args.boundary_units != "timestep":  # (the shared parser's option: its default is "timestep")
            raise ValueError(
                f"`--boundary_units` {args.boundary_units} is refused: a Stable Diffusion U-Net is trained on the "
                "source's DDPM-style timesteps, and so are its stages split; drop `--boundary_units`."
            )
        steps = self.scheduler_config.get("num_train_timesteps", 1000)
        if self.unet_class != "UNet2DConditionModel":  # a staged or routed source keeps its stages
            if args.stage_boundaries is not None:
                raise ValueError(
                    f"`--stage_boundaries` is refused: the source unet is a {self.unet_class}, whose stages "
                    f"{self.unet_config['stage_boundaries']} are kept."
                )
            partition = TimestepPartition.from_config({"num_train_timesteps": steps, **self.unet_config})
        else:
            default = paper_boundaries("timestep", steps) if args.method == "multistage" else [steps // 2]
            args_steps = argparse.Namespace(**{**vars(args), "num_train_timesteps": steps})  # the source's schedule
            partition = partition_from_args(args_steps, TimestepPartition(default, steps))
        if partition.units != "timestep":
            raise ValueError(
                f"The source's stages are in {partition.units!r} units; Stable Diffusion's are timesteps."
            )
        if args.train_decoders_only and args.method != "multistage":
            raise ValueError(
                "`--train_decoders_only` freezes a staged model's shared encoder: it needs `--method multistage`."
            )
        self._every_network_every_step(
            args, partition.num_stages, "decoder" if args.method == "multistage" else "expert",
            separate=args.method != "multistage", option="`--stage_boundaries`, or the source's stages",
        )  # fmt: skip
        return partition

    @property
    def downsampling(self):
        """1: a `UNet2DConditionModel` (an expert) and the staged decoders take latents of any size, forwarding the
        up-sampling sizes, as diffusers' `train_text_to_image.py` trains them; only the VAE's factor divides
        `--resolution`."""
        return 1

    def _network_config(self) -> dict:
        """The config of one network: the staged model's, or the first expert's."""
        if self.unet_class != "ExpertRoutingModel":
            return self.unet_config
        return UNet2DConditionModel.load_config(self.source, subfolder=os.path.join("unet", expert_folder(0)))

    @property
    def uses_labels(self):
        return True  # label i = caption i

    def read_records(self, args):
        """The images and their captions (label ``i`` = caption ``i``; the null label is the empty caption)."""
        if args.train_data_dir is not None:
            paths, captions = captioned_folder(args.train_data_dir, args.caption_column)
            load = partial(folder_image, paths)  # picklable, for spawned dataloader workers
        else:
            columns = {"--image_column": args.image_column, "--caption_column": args.caption_column}
            dataset = load_train_split(args.dataset_name, args.dataset_config_name, args.cache_dir, columns)
            captions = [
                caption_variants(c, f"row {i}", args.caption_column)
                for i, c in enumerate(dataset[args.caption_column])
            ]
            load = partial(dataset_image, dataset, args.image_column)
        self.caption_variants, self.captions = captions, [variants[0] for variants in captions]
        return ImageRecords(load, len(captions), list(range(len(captions))), self.captions)

    def check_networks(self, in_channels, sample_size, num_class_embeds):
        """Nothing to build up front: the networks are the source pipeline's (`check_data` checks them)."""

    def check_data(self, in_channels, sample_size, num_class_embeds):
        config = self._network_config()
        if in_channels != config["in_channels"]:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {self.source!r}: its VAE gives {in_channels}-channel latents but "
                f"its unet takes {config['in_channels']} channels."
            )

    def model_latents(self, vae, latents):
        """``latents * scaling_factor``, as diffusers' ``train_text_to_image.py`` encodes and the saved
        `StableDiffusionPipeline` decodes (``latents / scaling_factor``: no ``shift_factor``, no ``latents_mean``)."""
        return latents * vae.config.scaling_factor

    # the networks, the frozen text encoder, the steps
    def build_networks(self, in_channels, sample_size, num_class_embeds):
        # 1. the frozen text encoder (the captions are tokenized batch by batch, in `encode_captions`)
        self._check_source_folders()
        pipe = StableDiffusionPipeline.from_pretrained(
            self.source, unet=self._strict_unet(), **self._strict_transformers(("text_encoder",), torch.float32),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, torch_dtype=torch.float32,
            use_safetensors=True,
        )  # fmt: skip
        # the source's other transformers models (its safety checker), saved with the result: checked now, not after
        # training, then released (about 1.2 GB for SD 1.5's, on every process) and loaded again at each save
        self._saved_names = tuple(n for n in self.source_index if n != "text_encoder")
        self._strict_transformers(self._saved_names)  # loaded strictly (the check), in the dtype they are stored in
        check_tokenizer(
            pipe.tokenizer, pipe.text_encoder, f"`--pretrained_model_name_or_path` {self.source!r}: its tokenizer"
        )
        self._check_text_width(pipe.text_encoder)
        self.text_encoder, self.tokenizer, self._vae = pipe.text_encoder.eval(), pipe.tokenizer, pipe.vae
        self.text_encoder.requires_grad_(False)

        # 2. the networks: kept (staged, routed source) or warm-started exactly from the plain unet
        unet, partition = pipe.unet, self.partition
        if self.args.method == "multistage":
            if self.unet_class == "UNet2DConditionModel":
                unet = MultiStageUNet2DConditionModel.from_unet(unet, partition.boundaries, num_train_timesteps=partition.num_train_timesteps)  # fmt: skip
            if self.args.train_decoders_only:
                unet.requires_grad_(False)
                unet.decoders.requires_grad_(True)
            return {"unet": unet.train()}
        experts = unet.experts if self.unet_class == "ExpertRoutingModel" else [
            copy.deepcopy(unet) for _ in range(partition.num_stages)
        ]  # fmt: skip
        return {expert_folder(i): expert.train() for i, expert in enumerate(experts)}

    def draw(self, batch_size, generator):
        # every batch stratified over the stages: each sample to its stage's decoder (or expert)
        timesteps, stages = self._stratified(batch_size, generator)
        network = torch.zeros_like(stages) if self.args.method == "multistage" else stages
        return Draw(torch.arange(batch_size), timesteps, network)

    @torch.no_grad()
    def encode_captions(self, labels: torch.Tensor) -> torch.Tensor:
        """The frozen text encoder's hidden states of the captions ``labels`` index (the null label: ``""``); of an
        image with several captions, one drawn at random (from the global generator, which the loop seeds at every
        step), as diffusers' `train_text_to_image.py` does; tokenized here, batch by batch, as there too."""
        captions = [self.caption_variants[i] if i < len(self.caption_variants) else [""] for i in labels.tolist()]
        chosen = [variants[0] for variants in captions]
        if any(len(variants) > 1 for variants in captions):  # no draw otherwise: such runs keep their random streams
            draws = torch.rand(len(captions)).tolist()
            chosen = [variants[min(int(u * len(variants)), len(variants) - 1)] for variants, u in zip(captions, draws)]
        token_ids = self.tokenizer(
            chosen, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        self.text_encoder.to(labels.device)
        return self.text_encoder(token_ids.to(labels.device))[0]

    def loss(self, network, noise_scheduler, clean, timesteps, noise, class_labels=None):
        text = self.encode_captions(class_labels)
        return diffusion_loss(
            network, noise_scheduler, clean, timesteps, noise=noise, model_kwargs={"encoder_hidden_states": text},
            snr_gamma=self.args.snr_gamma,
        )  # fmt: skip

    # sampling and saving
    def sample_inputs(self, count):
        prompts = self.args.validation_prompts or self.captions[:count]
        return {"prompt": [prompts[i % len(prompts)] for i in range(count)]}

    def _unet(self, networks: dict[str, ModelMixin]) -> ModelMixin:
        if self.args.method == "multistage":
            return networks["unet"]
        experts = [networks[expert_folder(i)] for i in range(self.partition.num_stages)]
        prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        return ExpertRoutingModel(experts, prediction_type=prediction_type, **self.partition.to_config())

    def _experts(self) -> dict[str, object]:
        """The experts of a routed source unet (an `ExpertRoutingModel`), by folder (``unet/expert_<i>``), each with
        its entry of the unet's `expert_classes` (``[library, class]``, read from a file: a value that is not a list
        is one entry, which `__init__` refuses by name); empty for another unet. Every check reads them here."""
        if self.unet_class != "ExpertRoutingModel":
            return {}
        classes = self.unet_config.get("expert_classes")
        classes = classes if isinstance(classes, list) else [classes]
        return {os.path.join("unet", expert_folder(i)): entry for i, entry in enumerate(classes)}

    def _check_conditioning(self) -> None:
        """Refuse a source whose U-Net (or an expert) needs more than the captions' hidden states: class labels
        (``num_class_embeds``, a ``class_embed_type``) or added conditioning (an ``addition_embed_type`` other than
        ``"text"``, e.g. SDXL's ``"text_time"``), which neither the training loss nor `StableDiffusionPipeline` give;
        the U-Net's own error would come at the first step, once the output folder is made."""
        configs = {"unet/config.json": self.unet_config}
        for folder in self._experts():
            try:
                configs[f"{folder}/config.json"] = _load_config(UNet2DConditionModel, self.source, folder)
            except (OSError, ValueError):  # (a missing or broken expert folder: the strict loading names it)
                continue
        for file, config in configs.items():
            needs = {
                key: config.get(key) for key in ("num_class_embeds", "class_embed_type") if config.get(key) is not None
            }
            if config.get("addition_embed_type") not in (None, "text"):
                needs["addition_embed_type"] = config.get("addition_embed_type")
            if needs:
                shown = ", ".join(f"`{key}` {value!r}" for key, value in needs.items())
                raise ValueError(
                    f"`--pretrained_model_name_or_path` {self.source!r}: its {file} has {shown}, so the U-Net needs "
                    "class labels or added conditioning (SDXL's size and pooled-text embeddings) besides the "
                    "captions, which neither this training nor `StableDiffusionPipeline` gives: fine-tune a Stable "
                    "Diffusion 1.x/2.x U-Net conditioned on text alone."
                )

    def _check_safetensors(self) -> None:
        """Refuse a local source whose networks (the unet or its experts, the VAE, the text encoder, a safety
        checker: every saved component whose folder holds a ``config.json``) have no plain safetensors weights: they
        are read from safetensors only, without a variant, and diffusers' loader would fail on such a folder only
        once the run has made its output folder and read the data. A Hub repository is its loader's."""
        if not os.path.isdir(self.source):
            return
        # the unet is loaded from unet/ whether or not the index names it; a routed one's experts' folders hold its
        # weights
        folders = list(self._experts()) if self.unet_class == "ExpertRoutingModel" else ["unet"]
        folders += [
            name
            for name, entry in self.source_index.items()
            if name.isidentifier()  # a component's name (read from a file: no path)
            and name != "unet"
            and not name.startswith("_")
            and _saved(entry)
            and os.path.isfile(os.path.join(self.source, name, "config.json"))
        ]
        for folder in folders:
            refuse_without_plain_safetensors(
                os.path.join(self.source, folder),
                f"`--pretrained_model_name_or_path` {self.source!r}: its {folder}/",
                "the source's networks are read from plain safetensors (no pickled `.bin`, no `variant=`). Save a "
                "copy once (`StableDiffusionPipeline.from_pretrained(source).save_pretrained(folder)`, with `import "
                "diffusers_stages` for a staged unet) and fine-tune that folder.",
            )

    def _check_source_folders(self) -> None:
        """Refuse a local source whose component folders (the tokenizer's too) hold a file linking out of them, or
        lead out of the source themselves: a `ValueError` naming it (diffusers and transformers follow such links)."""
        if not os.path.isdir(self.source):  # a Hub repository: a cache snapshot, checked as it is loaded
            return
        for component, entry in self.source_index.items():
            if (
                not component.startswith("_")
                and _saved(entry)
                and os.path.lexists(os.path.join(self.source, component))
            ):
                component_folder(self.source, component)

    def _check_text_width(self, text_encoder) -> None:
        """Refuse a text encoder whose hidden states are not as wide as the U-Net (or its first expert) attends to
        (``encoder_hid_dim`` where it projects them, else ``cross_attention_dim``): the first step's error otherwise,
        a matmul `RuntimeError` for experts, once the output folder is made."""
        config = self._network_config()
        takes = config.get("encoder_hid_dim") or config.get("cross_attention_dim")
        width = getattr(text_encoder.config, "hidden_size", None)
        if isinstance(takes, int) and isinstance(width, int) and width != takes:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {self.source!r}: its text encoder gives {width}-wide hidden states, "
                f"but its unet attends to {takes}-wide ones (`cross_attention_dim` / `encoder_hid_dim` of its "
                "config.json): the text encoder is not the one the U-Net was trained with. Give a pipeline whose "
                "text encoder and U-Net belong together."
            )

    def _strict_unet(self) -> ModelMixin:
        """The source's ``unet``, loaded strictly: diffusers only warns of a missing weight (left on the ``meta``
        device) and casts integer weights silently."""
        return load_strictly(SOURCE_UNETS[self.unet_class], self.source, "unet", use_safetensors=True)

    def _strict_transformers(self, names: tuple[str, ...], dtype: torch.dtype | None = None) -> dict:
        """The source's transformers models among ``names`` (the text encoder, the safety checker), loaded strictly
        (`load_transformers_components`) in ``dtype`` (`None`: as stored)."""
        return load_transformers_components(self.source, self.source_index, StableDiffusionPipeline, names, dtype)

    def pipeline(self, networks, scheduler, vae=None):
        # the fp32 VAE of the source (the training one may be in the mixed-precision dtype), with the text encoder on
        # the networks' device: the pipeline samples there
        unet = self._unet(networks)
        self._vae.to(unet.device)
        self.text_encoder.to(unet.device)
        return StableDiffusionPipeline(
            vae=self._vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip

    def save(self, networks, scheduler, vae, output_dir):
        # the source's own components (safety checker included, loaded strictly again, as diffusers' loader gives
        # it) with the trained unet and the sampling scheduler
        pipe = StableDiffusionPipeline.from_pretrained(
            self.source, unet=self._unet(networks), scheduler=scheduler, text_encoder=self.text_encoder,
            tokenizer=self.tokenizer, vae=self._vae, use_safetensors=True, **self._strict_transformers(self._saved_names),
        )  # fmt: skip
        pipe.save_pretrained(output_dir)

    def description(self):
        kind = (
            "a multi-stage multi-decoder U-Net (Zhang et al., CVPR 2024): one shared encoder, one decoder per stage"
            if self.args.method == "multistage"
            else "one `UNet2DConditionModel` expert per stage, routed by timestep (MEME, Lee et al., AAAI 2024)"
        )
        shares = "" if self.args.stage_shares is None else f" ({shares_text(self.args.stage_shares)})"
        return (
            f"Text-to-image: the U-Net of `{shared_name(self.source)}` fine-tuned as {kind}, every batch stratified over the "
            f"stages{shares}; VAE and text encoder frozen.\n\n" + self._stage_table()
        )

    def usage(self, repo_id):
        return [
            "import diffusers_stages  # registers the staged unet classes with diffusers' loaders",
            "from diffusers import StableDiffusionPipeline",
            "from huggingface_hub import snapshot_download",
            "",
            f'folder = snapshot_download("{repo_id}", allow_patterns=["*.json", "*.safetensors", "*.txt"])',
            "pipe = StableDiffusionPipeline.from_pretrained(folder)  # runs no code from the repository",
            'image = pipe("a photo of a cat").images[0]',
        ]


def _saved(entry: object) -> bool:
    """Whether a `model_index.json` entry names a saved component (``[library, class]``, not ``[null, null]``)."""
    return isinstance(entry, list) and len(entry) == 2 and None not in entry
