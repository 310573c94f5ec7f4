"""Command-line arguments shared by the training scripts, and the checks that run before any training starts."""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from collections.abc import Sequence

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..cli import HelpFormatter, check_seed, refuse_pipeline_folder
from ..partition import TimestepPartition
from ..planning.data import check_dataset_name, is_inside
from ..timestep_sampling import STAGE_SAMPLING
from .checkpointing import checkpoint_folders
from .data import class_folders

# the options of the EMA `--use_ema` keeps (refused without it: they would be ignored)
EMA_OPTIONS = ("ema_inv_gamma", "ema_power", "ema_max_decay")

# the learning-rate schedules `get_scheduler` builds from the loop's arguments alone
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")

# the beta schedules of `DDPMScheduler` (DDIM, which samples the grids of a new model, has all but "sigmoid")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

UNET_CONFIG_KEYS = (
    "block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
    "norm_num_groups", "dropout",
)  # fmt: skip
# the U-Net shape of a model built from the arguments, for each shape option not given: the options themselves default
# to None, so that a value typed can be told from no value and refused where a source (`--model_config`, a pretrained
# model) gives the shape instead of being dropped in silence
UNET_SHAPE_DEFAULTS = {
    "block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "attention_head_dim": 8, "norm_num_groups": 32,
    "dropout": 0.0,
}  # fmt: skip
# every option of the U-Net shape (the block types have no default at all: attention in the last two resolutions)
UNET_SHAPE_OPTIONS = (*UNET_SHAPE_DEFAULTS, "down_block_types", "up_block_types")


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class BoundaryList(argparse.Action):
    """`--stage_boundaries 442 631` (space-separated, as every command of the package takes it); the former comma form
    `442,631` still parses, with a deprecation warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        if any("," in value for value in values):
            warnings.warn(
                f"`{option_string} {' '.join(values)}`: comma-separated boundaries are deprecated, give them "
                f"space-separated (`{option_string} {' '.join(v for v in ' '.join(values).replace(',', ' ').split())}`).",
                FutureWarning,
                stacklevel=2,
            )
        try:
            boundaries = tuple(x for value in values for x in float_list(value))
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentError(self, str(error)) from None
        setattr(namespace, self.dest, boundaries)


class RenamedOption(argparse._StoreAction):
    """Store under the option's first (current) name; a later option string is a deprecated alias that warns."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string is not None and option_string != self.option_strings[0]:
            warnings.warn(
                f"`{option_string}` is deprecated and will be removed in diffusers-stages 0.2: use "
                f"`{self.option_strings[0]}`.",
                FutureWarning,
                stacklevel=2,
            )
        setattr(namespace, self.dest, values)


# `--eval_batch_size`'s default: the default `--num_sample_images` grid in one pipeline call, as before the option
EVAL_BATCH_SIZE = 16

# options of diffusers' train_unconditional.py / train_text_to_image.py that these scripts do not take: refused by name
# with what takes their place (argparse's bare "unrecognized arguments" said neither)
DIFFUSERS_ONLY_OPTIONS = {
    "save_images_epochs": "sample grids are drawn every `--save_images_steps` optimisation steps",
    "validation_epochs": "sample grids are drawn every `--save_images_steps` optimisation steps",
    "ddpm_num_inference_steps": "the sample grids are sampled with DDIM in `--num_inference_steps` steps",
    "input_perturbation": "the model sees the noise it is scored on (no input perturbation)",
    "use_8bit_adam": "the loop trains with torch's AdamW",
    "revision": "download that revision first (`hf download REPO --revision REV --local-dir DIR`) and pass the folder",
    "variant": "pass a folder whose weights are the variant's",
    "non_ema_revision": "pass the folder of the weights to fine-tune",
    "offload_ema": "the EMA weights stay on the training device",
    "foreach_ema": "the EMA updates with diffusers' default implementation",
    "dream_training": "the loop trains with the plain denoising loss (no DREAM)",
    "dream_detail_preservation": "the loop trains with the plain denoising loss (no DREAM)",
    "image_interpolation_mode": "images are resized with bilinear interpolation",
    "preserve_input_precision": "images are read as 8-bit RGB",
    # train_text_to_image_lora.py's: the staged U-Nets load diffusers' LoRA files (README, Text-to-image)
    "rank": "this script trains the networks' own weights, not a LoRA; train a LoRA of the source U-Net with diffusers' "
    "train_text_to_image_lora.py and load it into the staged pipeline with `pipe.load_lora_weights`",
}


class DiffusersOnlyOption(argparse.Action):
    """An option of diffusers' training scripts that this script does not take (`DIFFUSERS_ONLY_OPTIONS`): a usage
    error naming it and what to do instead. Hidden from `--help`, and never in the parsed arguments."""

    def __init__(self, option_strings, dest, instead: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            f"`{option_string}` (an option of diffusers' training scripts) is not taken by this script: "
            f"{self.instead}. Drop it."
        )


def add_stage_boundaries_argument(
    parser, help: str = "Inner stage boundaries (at least one), e.g. `442 631`.", **kwargs
):
    """Add `--stage_boundaries` with the one syntax of the package's commands (see `BoundaryList`)."""
    return parser.add_argument("--stage_boundaries", nargs="+", action=BoundaryList, help=help, **kwargs)


def build_parser(
    description: str, stage_boundaries_default: str = "the script's own split", staged: bool = True
) -> argparse.ArgumentParser:
    """The arguments every training script takes (data, optimisation, checkpoints, logging, Hub, U-Net shape);
    ``stage_boundaries_default`` says what the script trains without `--stage_boundaries` (its `--help`);
    ``staged=False`` (a script whose networks all train on every timestep) says in `--help` that it refuses
    `--stage_shares` and `--stage_sampling`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Folder of images (sub-folders = classes). Every file is decoded once before training: one that is not a "
        "readable image (truncated, or not an image) stops the run, named.",
    )
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A `datasets` dataset name or local path (a `save_to_disk` folder too).",
    )
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--label_column", type=str, default="label")
    data.add_argument("--cache_dir", type=str, default=None, help="Cache folder of `datasets`.")
    data.add_argument("--resolution", type=int, default=64, help="Training images are resized and cropped to this.")
    data.add_argument("--center_crop", action="store_true", help="Centre crop (default: random crop).")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    data.add_argument("--class_conditional", action="store_true", help="Labels from sub-folders / `--label_column`.")
    data.add_argument(
        "--class_dropout_prob", type=float, default=0.1, help="Null-label rate (classifier-free guidance)."
    )
    data.add_argument(
        "--max_train_samples", type=int, default=None,
        help="Train on the first N images after a shuffle seeded with `--seed` (as diffusers' train_text_to_image.py).",
    )  # fmt: skip
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--vae_path", type=str, default=None, help="AutoencoderKL folder: train in its latent space.")
    data.add_argument("--vae_subfolder", type=str, default=None, help="e.g. `vae` inside a pipeline folder.")
    data.add_argument("--cache_latents", action="store_true", help="Encode the data set once instead of every step.")

    model = parser.add_argument_group("model and noise schedule")
    model.add_argument(
        "--model_config", "--model_config_name_or_path", dest="model_config", type=str, default=None,
        help="The model's config.json, or a folder holding one (it gives the whole shape: the shape options below "
        "are refused with it).",
    )  # fmt: skip
    scratch = "(when building from scratch; a source model or `--model_config` gives its own)"
    model.add_argument("--block_out_channels", type=int_list, default=None,
                       help=f"e.g. 64,128,128. Default: 128,256,256,256 {scratch}.")  # fmt: skip
    model.add_argument("--layers_per_block", type=int, default=None, help=f"Default: 2 {scratch}.")
    model.add_argument(
        "--down_block_types", type=str, nargs="+", default=None, help="Default: attention in the last two."
    )
    model.add_argument(
        "--up_block_types", type=str, nargs="+", default=None, help="Default: mirror of the down blocks."
    )
    model.add_argument("--attention_head_dim", type=int, default=None, help=f"Default: 8 {scratch}.")
    model.add_argument("--norm_num_groups", type=int, default=None, help=f"Default: 32 {scratch}.")
    model.add_argument("--dropout", type=float, default=None, help=f"Default: 0.0 {scratch}.")
    add_stage_boundaries_argument(
        model, help=f"Inner stage boundaries (at least one), e.g. `442 631`. Default: {stage_boundaries_default}.",
        default=None,
    )  # fmt: skip
    model.add_argument("--boundary_units", choices=("timestep", "sigma"), default="timestep",
                       help="`sigma` trains an EDM-style model (EDMEulerScheduler, Karras et al. 2022).")  # fmt: skip
    refused = "Refused by this script: its networks train on every timestep of every batch."
    model.add_argument(
        "--stage_shares", type=float_list, default=None,
        help="Share of each batch per stage (clean first)." if staged else refused,
    )  # fmt: skip
    model.add_argument("--stage_sampling", choices=STAGE_SAMPLING, default="mixed",
                       help="mixed: every stage in every batch (a batch smaller than the stage count: each sample's stage drawn at random by its share); per_batch: one stage per batch (the authors' EDM code); "
                       "per_rank: one stage per process (their LDM code)." if staged else refused)  # fmt: skip
    model.add_argument("--num_train_timesteps", "--ddpm_num_steps", type=int, default=1000, action=RenamedOption,
                       help="Length of the training noise schedule (DDPM steps; also EDM's scheduler config). "
                       "`--ddpm_num_steps` (diffusers' train_unconditional.py name) is a deprecated alias.")  # fmt: skip
    model.add_argument("--ddpm_beta_schedule", type=str, default="linear", choices=BETA_SCHEDULES)
    model.add_argument(
        "--prediction_type", choices=("epsilon", "v_prediction", "sample"), default="epsilon",
        help="The loss target, saved as the scheduler's. `sample`: the plain mean squared error to the clean sample "
        "(diffusers' train_unconditional.py weights it by the SNR alpha_t / (1 - alpha_t)).",
    )  # fmt: skip
    model.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (DDPM-style).")
    model.add_argument("--noise_offset", type=float, default=0.0,
                       help="Offset noise: add this x N(0, 1) per sample and channel to the noise (as diffusers' "
                       "train_text_to_image.py; DDPM-style).")  # fmt: skip

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--output_dir", type=str, default="stages-model")
    optim.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="Start a new run in an `--output_dir` that holds checkpoints (refused without it or "
        "`--resume_from_checkpoint`): the former run's checkpoints are deleted once this run has a complete checkpoint "
        "of its own (or its final outputs).",
    )  # fmt: skip
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--train_batch_size", type=int, default=16, help="Per device.")
    optim.add_argument("--num_epochs", "--num_train_epochs", type=int, default=100,
                       help="`--num_train_epochs`: diffusers' train_text_to_image.py name.")  # fmt: skip
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides `--num_epochs`.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--gradient_checkpointing", action="store_true")
    optim.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Needs a GPU and `xformers`."
    )
    optim.add_argument(
        "--allow_tf32", action="store_true",
        help="Allow TF32 matrix products on Ampere and later GPUs (as diffusers' train_text_to_image.py; no effect on "
        "CPU).",
    )  # fmt: skip
    optim.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
        help="Default: accelerate config. fp16 needs a GPU; bf16 runs on CPU too.",
    )  # fmt: skip
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--scale_lr", action="store_true",
                       help="Multiply `--learning_rate` by the gradient accumulation steps, the per-device batch size "
                       "and the process count (as diffusers' train_text_to_image.py).")  # fmt: skip
    optim.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS,
                       help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup")  # fmt: skip
    optim.add_argument("--lr_warmup_steps", type=int, default=500)
    optim.add_argument("--adam_beta1", type=float, default=0.95)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-6)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument(
        "--use_ema", action="store_true",
        help="Keep an exponential moving average of the weights (`--ema_*`, as diffusers' train_unconditional.py), "
        "saved in the checkpoints and as the final pipeline's weights; the sample grids are drawn with it.",
    )  # fmt: skip
    optim.add_argument("--ema_inv_gamma", type=float, default=1.0, help="With `--use_ema`.")
    optim.add_argument("--ema_power", type=float, default=3 / 4, help="With `--use_ema`.")
    optim.add_argument("--ema_max_decay", type=float, default=0.9999, help="With `--use_ema`.")

    outputs = parser.add_argument_group("checkpoints, logs, samples, Hub")
    outputs.add_argument(
        "--checkpointing_steps", type=int, default=500,
        help="Save a checkpoint (`checkpoint-<step>/`: the networks, their EMA, the optimizer, learning-rate schedule "
        "and random states) every N optimisation steps, to resume from with `--resume_from_checkpoint`.",
    )  # fmt: skip
    outputs.add_argument(
        "--checkpoints_total_limit", type=int, default=None,
        help="Keep at most this many complete checkpoints: the older ones are deleted once a new one is complete "
        "(default: all are kept).",
    )  # fmt: skip
    outputs.add_argument(
        "--resume_from_checkpoint", type=str, default=None,
        help="`latest`, a checkpoint of `--output_dir` by name (`checkpoint-500`), or a checkpoint folder's path.",
    )  # fmt: skip
    outputs.add_argument("--logger", "--report_to", choices=("tensorboard", "wandb", "none"), default="tensorboard",
                         help="`wandb` needs the `wandb` package (`pip install wandb`). `--report_to`: diffusers' "
                         "train_text_to_image.py name.")  # fmt: skip
    outputs.add_argument("--logging_dir", type=str, default="logs", help="Inside `--output_dir`.")
    outputs.add_argument(
        "--tracker_project_name",
        type=str,
        default=None,
        help="The trackers' project. Default: the `--output_dir` name.",
    )
    outputs.add_argument(
        "--save_images_steps", type=int, default=1000, help="Sample grid every N steps (and at the end)."
    )
    outputs.add_argument(
        "--save_model_epochs", type=int, default=None, help="Also save the pipeline every N epochs (and at the end)."
    )
    outputs.add_argument("--num_sample_images", type=int, default=16, help="Images in each sample grid.")
    outputs.add_argument(
        "--eval_batch_size", type=int, default=EVAL_BATCH_SIZE,
        help="Sample the grids' images in pipeline calls of at most this many (the sampling and the VAE decode of "
        "a call need memory in proportion; lower it for large images). Each image has its own generator, seeded "
        "with `--seed` + its index, so the grid does not depend on it. Unlike diffusers' train_unconditional.py, it "
        "is not the number of images: that is `--num_sample_images`.",
    )  # fmt: skip
    outputs.add_argument("--num_inference_steps", type=int, default=50, help="Sampling steps for the sample grids.")
    outputs.add_argument(
        "--push_to_hub", action="store_true",
        help="Upload the trained pipeline (and each `--save_model_epochs` save) with a model card to the Hub "
        "repository `--hub_model_id`, without checkpoints, logs and the sample history.",
    )  # fmt: skip
    outputs.add_argument(
        "--hub_model_id", type=str, default=None,
        help="The repository of `--push_to_hub`: `name` (under your user) or `namespace/name`. Default: named after "
        "`--output_dir` (its folder name).",
    )  # fmt: skip
    outputs.add_argument("--hub_token", type=str, default=None, help="Default: the token of `hf auth login`.")
    outputs.add_argument("--hub_private_repo", action="store_true", default=None,
                         help="Default: the namespace's default (public unless your organisation's is private).")  # fmt: skip
    outputs.add_argument("--hub_local_dir", type=str, default=None,
                         help="With `--push_to_hub`: push into <dir>/<repository> (`--hub_model_id`, else named after `--output_dir`) with the "
                         "Hub's file selection instead of uploading.")  # fmt: skip
    outputs.add_argument("--local_rank", type=int, default=-1,
                         help="Taken as diffusers' scripts take it: `accelerate launch` gives each process its rank.")  # fmt: skip
    for name, instead in DIFFUSERS_ONLY_OPTIONS.items():
        parser.add_argument(f"--{name}", action=DiffusersOnlyOption, instead=instead)
    return parser


def default_block_types(num_blocks: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down/up block types as in diffusers' `train_unconditional.py`: attention in the last two resolutions."""
    down = tuple("AttnDownBlock2D" if i >= max(1, num_blocks - 2) else "DownBlock2D" for i in range(num_blocks))
    up = tuple(t.replace("Down", "Up") for t in reversed(down))
    return down, up


def read_model_config(args: argparse.Namespace) -> dict | None:
    """The config of `--model_config` (a config.json, or a folder holding one), None when not given."""
    path = args.model_config
    if path is None:
        return None
    refuse_pipeline_folder(path, "--model_config")
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"`--model_config` must be a model config.json or a folder holding one, got {path!r}: {error}"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"`--model_config` {file!r} must hold a JSON object (a model config), got a {type(config).__name__}."
        )
    return config


def refuse_given_options(args: argparse.Namespace, names: Sequence[str], source: str, reason: str) -> None:
    """A `ValueError` for the first option of ``names`` given (not None) where ``source`` (an option and its value)
    decides instead: ``reason`` says why it would be ignored."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"`--{name}` {shown} cannot be combined with {source}: {reason}. Drop `--{name}`.")


# the options a run that trains nothing (`--assemble_experts`) uses: its output, the sample grid and the Hub push
ASSEMBLY_OPTIONS = (
    "assemble_experts", "output_dir", "seed", "num_sample_images", "eval_batch_size", "num_inference_steps", "push_to_hub",
    "hub_model_id", "hub_token", "hub_private_repo", "hub_local_dir", "logger", "local_rank",
)  # fmt: skip


def refuse_unused_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, used: Sequence[str], source: str, reason: str
) -> None:
    """A `ValueError` for the first option of ``parser`` outside ``used`` whose value in ``args`` is not its default
    (typed, so meant) where ``source`` decides that it is not used: ``reason`` says why."""
    refuse_changed_options(parser, args, [name for name in vars(args) if name not in used], source, reason)


def refuse_changed_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str], source: str, reason: str
) -> None:
    """A `ValueError` for the first option of ``names`` whose value in ``args`` is not its default in ``parser``
    (an option with a default cannot tell a typed default from none; another value was typed, so meant) where
    ``source`` does not read it: ``reason`` says why."""
    for name in names:
        value = getattr(args, name, None)
        if value != parser.get_default(name):
            shown = list(value) if isinstance(value, tuple) else value
            shown = repr(shown) if isinstance(shown, str) else shown
            raise ValueError(f"`--{name}` {shown} is not used by {source}: {reason}. Drop `--{name}`.")


def scratch_shape(args: argparse.Namespace) -> dict:
    """The U-Net shape options of a model built from the arguments: each given value, else its default
    (``UNET_SHAPE_DEFAULTS``)."""
    return {name: default if getattr(args, name, None) is None else getattr(args, name)
            for name, default in UNET_SHAPE_DEFAULTS.items()}  # fmt: skip


def tracker_config(args: argparse.Namespace) -> dict:
    """The arguments as the trackers log them (TensorBoard's hparams, wandb's config): plain values, without the
    `--hub_token` secret. A model built from the arguments logs the U-Net shape it was built with (an option not
    given is None: its ``UNET_SHAPE_DEFAULTS`` value); where a source gives the shape (`--model_config`, a pretrained
    model, U-ViT backbones) the options stay as given."""
    values = dict(vars(args))
    values.pop("hub_token", None)  # a secret: never in the logs (nor on wandb's servers)
    from_source = args.model_config is not None or getattr(args, "pretrained_model_name_or_path", None) is not None
    if not from_source and getattr(args, "backbone", "unet") == "unet":
        values.update(scratch_shape(args))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def unet_shape_kwargs(args: argparse.Namespace) -> dict:
    """The U-Net shape arguments (from `--model_config` when given, else from the command line and
    ``UNET_SHAPE_DEFAULTS``); a saved model's loader entries (``_class_name``, ``auto_map``) are not constructor
    arguments. A shape option given with `--model_config` is a ValueError: the config gives the whole shape."""
    if args.model_config is not None:
        source = f"`--model_config` {args.model_config!r}"
        refuse_given_options(
            args, UNET_SHAPE_OPTIONS, source, "the model's whole shape is that config's (edit it instead)"
        )
        return {k: v for k, v in read_model_config(args).items() if not k.startswith("_") and k != "auto_map"}
    shape = scratch_shape(args)
    down, up = default_block_types(len(shape["block_out_channels"]))
    return {
        "block_out_channels": tuple(shape["block_out_channels"]),
        "layers_per_block": shape["layers_per_block"],
        "down_block_types": tuple(args.down_block_types or down),
        "up_block_types": tuple(args.up_block_types or up),
        "attention_head_dim": shape["attention_head_dim"],
        "norm_num_groups": shape["norm_num_groups"],
        "dropout": shape["dropout"],
    }


def partition_from_args(args: argparse.Namespace, default: TimestepPartition) -> TimestepPartition:
    """The stage partition of `--stage_boundaries` / `--boundary_units` (``default`` when none is given)."""
    if args.stage_boundaries is None:
        if args.boundary_units != default.units:
            raise ValueError(f"`--boundary_units {args.boundary_units}` needs `--stage_boundaries` in those units.")
        return default
    if not args.stage_boundaries:  # `--stage_boundaries ''` (or ','): no inner boundary would mean a single stage
        raise ValueError(
            f"`--stage_boundaries` {list(args.stage_boundaries)} gives no boundary, which would train a single-stage "
            "model: a staged model needs at least one inner boundary (e.g. `--stage_boundaries 442 631`), or omit "
            "the argument for the default split. To train one plain U-Net, use diffusers' "
            "examples/unconditional_image_generation/train_unconditional.py."
        )
    try:
        return TimestepPartition(list(args.stage_boundaries), args.num_train_timesteps, args.boundary_units)
    except ValueError as error:
        raise ValueError(
            f"`--stage_boundaries` {list(args.stage_boundaries)} is not a valid stage split: {error}"
        ) from None


def check_args(
    args: argparse.Namespace, partition: TimestepPartition, downsampling: int, vae_path: str | None = None
) -> None:
    """Every check that needs no data and no model weights; raises ValueError naming the argument. ``vae_path`` is
    a VAE the task trains with besides `--vae_path` (a fine-tuned pipeline's own)."""
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("Give exactly one of `--train_data_dir` (a folder of images) and `--dataset_name`.")
    check_dataset_name(args.dataset_name, "--dataset_name")
    if args.dataset_name == "imagefolder":
        raise ValueError(
            "`--dataset_name imagefolder` would read whatever images sit in the current folder: give the folder "
            "with `--train_data_dir` instead."
        )
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"`--train_data_dir` must be an existing folder of images, got {args.train_data_dir!r}.")
    check_dataset_options(args)
    if args.train_data_dir is not None and getattr(args, "class_conditional", False):
        class_folders(args.train_data_dir)  # a folder without class sub-folders, found before the run starts
    check_positive_options(
        args,
        ("resolution", "train_batch_size", "num_epochs", "gradient_accumulation_steps", "checkpointing_steps",
         "save_images_steps", "num_sample_images", "eval_batch_size", "num_inference_steps", "num_train_timesteps", "layers_per_block",
         "attention_head_dim", "norm_num_groups", "max_train_steps", "checkpoints_total_limit", "save_model_epochs", "max_train_samples"),
    )  # fmt: skip
    check_eval_batch_size(args)
    if args.dataloader_num_workers < 0:
        raise ValueError(
            f"`--dataloader_num_workers` must be a non-negative integer, got {args.dataloader_num_workers}."
        )
    check_output_dir(args)
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f"`--class_dropout_prob` must be in [0, 1), got {args.class_dropout_prob}.")
    if args.resolution % downsampling:
        raise ValueError(
            f"`--resolution` {args.resolution} must be divisible by the model's total down-sampling factor "
            f"{downsampling} (U-Net down blocks or U-ViT patch size, x VAE); try {max(downsampling, args.resolution // downsampling * downsampling)}."
        )
    if args.stage_shares is not None and (
        len(args.stage_shares) != partition.num_stages
        or not all(math.isfinite(s) and s >= 0 for s in args.stage_shares)
        or not sum(args.stage_shares)
    ):
        raise ValueError(
            f"`--stage_shares` needs {partition.num_stages} non-negative values (finite, one per stage, clean stage "
            f"first) with a positive sum, got {list(args.stage_shares)}."
        )
    if args.vae_subfolder is not None and args.vae_path is None:  # else pixel space (or a source's own VAE)
        raise ValueError(
            f"`--vae_subfolder` {args.vae_subfolder!r} is a folder inside `--vae_path`: give `--vae_path` too."
        )
    if args.cache_latents and (vae_path or args.vae_path) is None:
        raise ValueError("`--cache_latents` caches VAE latents: give `--vae_path` too.")
    if args.cache_latents and not args.center_crop:
        raise ValueError("`--cache_latents` encodes each image once, so it needs `--center_crop` (no random crops).")
    if args.boundary_units == "sigma" and (
        args.snr_gamma is not None or args.prediction_type == "sample" or args.noise_offset
    ):
        raise ValueError(
            "EDM-style training (`--boundary_units sigma`) takes neither `--snr_gamma`, `--noise_offset` nor "
            "`--prediction_type sample`."
        )
    check_hub_options(args)
    check_optimisation_numbers(args)
    check_device_options(args)


def check_eval_batch_size(args: argparse.Namespace) -> None:
    """Refuse an `--eval_batch_size` given above `--num_sample_images` (a value other than its default was typed, so
    meant): in diffusers' train_unconditional.py it is the number of images sampled, here the grid's images are
    `--num_sample_images` and it only splits them into pipeline calls, so such a run would draw fewer images than
    asked for."""
    if args.eval_batch_size != EVAL_BATCH_SIZE and args.eval_batch_size > args.num_sample_images:
        raise ValueError(
            f"`--eval_batch_size` {args.eval_batch_size} is more than the {args.num_sample_images} images of a sample "
            "grid (`--num_sample_images`): it is the number of images sampled per pipeline call, not the number of "
            f"images (as in diffusers' train_unconditional.py). Give `--num_sample_images {args.eval_batch_size}` "
            f"for a grid of {args.eval_batch_size} images, or an `--eval_batch_size` of at most "
            f"{args.num_sample_images}."
        )


# the options of a `--dataset_name` dataset, with their defaults (a value other than the default was typed, so meant)
DATASET_OPTIONS = {"dataset_config_name": None, "image_column": "image", "label_column": "label"}


def check_dataset_options(args: argparse.Namespace) -> None:
    """Refuse the dataset options a run does not read, given another value than their default: `--label_column`
    without `--class_conditional` (the run would train unconditional), and the options of a `--dataset_name`
    dataset with `--train_data_dir` (a folder of images: class sub-folders, no columns nor configurations)."""
    label_column = getattr(args, "label_column", DATASET_OPTIONS["label_column"])
    if label_column != DATASET_OPTIONS["label_column"] and not getattr(args, "class_conditional", False):
        raise ValueError(
            f"`--label_column` {label_column!r} is not used without `--class_conditional`: the run reads no class "
            "labels. Drop `--label_column`, or add `--class_conditional` to train on them (where the script does)."
        )
    if args.train_data_dir is None:
        return
    for name, default in DATASET_OPTIONS.items():
        value = getattr(args, name, default)
        if value != default:
            raise ValueError(
                f"`--{name}` {value!r} is not used with `--train_data_dir`, a folder of images (class sub-folders "
                f"as labels): it is an option of `--dataset_name` datasets. Drop `--{name}`."
            )


def check_assembly_args(args: argparse.Namespace) -> None:
    """The checks of a run that trains nothing (`--assemble_experts`): the output folder, the sample grid and the
    Hub options; raises ValueError naming the argument."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # as `accelerate launch` / torchrun set it
    if processes > 1:  # each process would assemble, sample and push into the same folder and repository
        raise ValueError(
            f"`--assemble_experts` runs on one process (it trains nothing), but this one was launched on {processes}: "
            "run it with `python` (or `accelerate launch --num_processes 1`)."
        )
    check_output_dir(args)
    check_not_a_run_folder(args.output_dir)
    check_positive_options(args, ("num_sample_images", "eval_batch_size", "num_inference_steps"))
    check_eval_batch_size(args)
    check_hub_options(args)


def check_not_a_run_folder(output_dir: str) -> None:
    """Refuse to write the assembled pipeline into a training run's folder (its `expert_run.json`, or checkpoints),
    among the run's files: such a folder is then refused as a run to assemble (`assembly_base`: it holds both), and
    the run, resumed, saves over the pipeline. A saved pipeline's folder (overwritten), an empty or a new one is fine."""
    from .tasks.experts import EXPERT_RUN_FILE  # (the tasks import this module)

    checkpoints = checkpoint_folders(output_dir)
    if os.path.isfile(os.path.join(output_dir, EXPERT_RUN_FILE)):
        found = f"{EXPERT_RUN_FILE}, an `--expert_index` run's record"
    elif checkpoints:
        found = f"checkpoints: {os.path.basename(checkpoints[-1])}"
    else:
        return
    raise ValueError(
        f"`--output_dir` {output_dir!r} is the folder of a training run (it holds {found}): the assembled pipeline "
        "would be written among the run's files. Give the assembled pipeline a folder of its own."
    )


def check_hub_options(args: argparse.Namespace) -> None:
    """`--push_to_hub` has a repository to push to, `--hub_model_id`, `--hub_private_repo` and `--hub_local_dir` come
    with it, and `--hub_token` is kept off wandb."""
    if args.push_to_hub:
        hub_repo_name(args)  # `--hub_model_id`, else the output folder's name: a valid repository name
    else:  # else the run would push nothing, without a word
        if args.hub_model_id is not None:
            raise ValueError(
                f"`--hub_model_id` {args.hub_model_id!r} is the repository `--push_to_hub` pushes to, but "
                "`--push_to_hub` is not given: add `--push_to_hub`, or drop `--hub_model_id`."
            )
        if getattr(args, "hub_private_repo", None):
            raise ValueError(
                "`--hub_private_repo` makes the repository `--push_to_hub` creates private, but `--push_to_hub` is "
                "not given: add `--push_to_hub`, or drop `--hub_private_repo`."
            )
    local_dir = getattr(args, "hub_local_dir", None)
    if local_dir is not None and args.push_to_hub:
        # the local repository must lie outside the folder it receives: a later push would upload the earlier ones
        target = os.path.join(local_dir, hub_repo_name(args))
        here, there = (os.path.join(os.path.realpath(path), "") for path in (target, args.output_dir))
        if here.startswith(there) or there.startswith(here):
            raise ValueError(
                f"`--hub_local_dir` {local_dir!r} pushes into {target!r}, which overlaps `--output_dir` "
                f"{args.output_dir!r}: every push would copy the earlier ones (or the outputs onto themselves). Give "
                "`--hub_local_dir` a folder outside `--output_dir`."
            )
    if local_dir is not None and not args.push_to_hub:  # else nothing would be written there, without a word
        raise ValueError(
            f"`--hub_local_dir` {local_dir!r} is where `--push_to_hub` writes instead of uploading, but "
            "`--push_to_hub` is not given: add `--push_to_hub`, or drop `--hub_local_dir`."
        )
    if args.hub_token is not None and args.logger == "wandb":  # as diffusers' scripts refuse it
        raise ValueError(
            "`--hub_token` cannot be used with `--logger wandb` (`--report_to wandb`): wandb uploads the command "
            "line, token included. Log in with `hf auth login` and drop `--hub_token`, or log with TensorBoard."
        )


def hub_repo_name(args: argparse.Namespace) -> str:
    """The repository `--push_to_hub` pushes to: `--hub_model_id`, else the output folder's name (as diffusers'
    training scripts take it); a `ValueError` when that is not a valid Hub repository name (an empty
    `--hub_model_id` too: it is not taken for "not given")."""
    given = args.hub_model_id is not None
    name = args.hub_model_id if given else os.path.basename(os.path.normpath(os.path.abspath(args.output_dir)))
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        where = (
            "`--hub_model_id`"
            if given
            else "`--push_to_hub` without `--hub_model_id` pushes to a repository named after `--output_dir`, but"
        )
        raise ValueError(
            f"{where} {name!r} is not a Hub repository name ({str(error).rstrip('.')}). Pass `--hub_model_id your-name/model-name`."
        ) from None
    return name


def check_positive_options(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Each ``--<name>`` of ``names`` a positive integer, or None (not given: left to a source model or a default);
    else a `ValueError` naming the option and the value."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {value}.")


def check_no_block_types(args: argparse.Namespace, networks: str) -> None:
    """Refuse `--down_block_types` / `--up_block_types` where ``networks`` (their description) are built without
    them: those options have no default, so a value given was meant, and ignoring it would train another model."""
    for name in ("down_block_types", "up_block_types"):
        value = getattr(args, name, None)
        if value is not None:
            raise ValueError(f"`--{name}` {list(value)} is not used by {networks}: drop it.")


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse an `--output_dir` that cannot be a folder (it, or a folder above it, is a file), that is the folder of
    the source pipeline a fine-tuning script reads (`--pretrained_model_name_or_path`: the result would be written
    over it), that is or holds the VAE the run reads (`--vae_path`, with `--vae_subfolder`: the same), or that lies
    inside the data folder (`--train_data_dir`, or a local `--dataset_name` folder): the run's
    samples and checkpoints would become training images of the next run."""
    if not args.output_dir:  # '' would be the current folder to the checks, and no folder to `os.makedirs`
        raise ValueError("`--output_dir` must name a folder, got ''.")
    parent = os.path.abspath(args.output_dir)
    while not os.path.lexists(parent):  # the nearest part of the path that exists (the root at worst)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(
            f"`--output_dir` {args.output_dir!r} must be a folder, but {parent!r} is not a folder (a file, or a link "
            "that leads nowhere)."
        )
    source = getattr(args, "pretrained_model_name_or_path", None)  # a fine-tuning script's source pipeline
    if (
        source is not None
        and os.path.isdir(source)
        and os.path.isdir(args.output_dir)
        and os.path.samefile(source, args.output_dir)
    ):
        raise ValueError(
            f"`--output_dir` {args.output_dir!r} is the folder of `--pretrained_model_name_or_path` {source!r}: the "
            "run's checkpoints and the fine-tuned pipeline would be written over the source it reads. Write the run "
            "to a folder of its own."
        )
    vae_path, vae_subfolder = getattr(args, "vae_path", None), getattr(args, "vae_subfolder", None)
    if vae_path is not None and os.path.isdir(vae_path):
        vae_folder = os.path.join(vae_path, vae_subfolder or "")
        if is_inside(vae_folder, args.output_dir) or os.path.realpath(vae_path) == os.path.realpath(args.output_dir):
            given = f"`--vae_path` {vae_path!r}" + (f" `--vae_subfolder` {vae_subfolder!r}" if vae_subfolder else "")
            raise ValueError(
                f"`--output_dir` {args.output_dir!r} is or holds the VAE the run reads ({given}): the run's "
                "checkpoints and its saved pipeline (its own vae/, unet/, scheduler/, model_index.json) would be "
                "written over that folder. Write the run to a folder of its own."
            )
    for name in ("train_data_dir", "dataset_name"):
        folder = getattr(args, name)
        if folder is not None and os.path.isdir(folder) and is_inside(args.output_dir, folder):
            raise ValueError(
                f"`--output_dir` {args.output_dir!r} lies inside `--{name}` {folder!r}: its sample grids and "
                "checkpoints would be read as training images. Write the run outside the data folder."
            )


def check_optimisation_numbers(args: argparse.Namespace) -> None:
    """The optimiser's, the schedule's and the loss's numbers, in their ranges (torch would refuse some only after
    the data and the model are loaded, without naming the argument, and silently accept the others)."""
    positive = ["learning_rate", "max_grad_norm", "ema_inv_gamma", "ema_power", "snr_gamma"]
    for name in [name for name in positive if getattr(args, name) is not None]:  # None: unset (refused where needed)
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise ValueError(f"`--{name}` must be a positive number, got {getattr(args, name)}.")
    ranges = {  # name: (low, high, high included), low always included
        "ema_max_decay": (0.0, 1.0, True),
        "dropout": (0.0, 1.0, False),
        "adam_beta1": (0.0, 1.0, False),
        "adam_beta2": (0.0, 1.0, False),
        "adam_weight_decay": (0.0, math.inf, False),
        "adam_epsilon": (0.0, math.inf, False),
        "noise_offset": (0.0, math.inf, False),
    }
    for name, (low, high, closed) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (low <= value <= high if closed else low <= value < high):  # None: unset
            raise ValueError(f"`--{name}` must be in [{low:g}, {high:g}{']' if closed else ')'}, got {value}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"`--lr_warmup_steps` must be a non-negative integer, got {args.lr_warmup_steps}.")
    check_lr_schedule(args, args.max_train_steps, int(os.environ.get("WORLD_SIZE", "1")))
    check_seed(args.seed)


# the learning rate diffusers' `get_scheduler` decays `polynomial` to (its `lr_end`, which the loop does not set)
POLYNOMIAL_LR_END = 1e-7


def check_lr_schedule(args: argparse.Namespace, max_train_steps: int | None, num_processes: int) -> None:
    """Refuse a `--lr_scheduler polynomial` that diffusers' `get_scheduler` cannot build or run: a learning rate (after
    `--scale_lr`, over ``num_processes``) not above its ``lr_end`` of 1e-7, or a warm-up that takes all of the
    ``max_train_steps`` (None: not known yet), where its decay divides by zero at the last step. A `ValueError`
    naming the options, before the first step rather than from inside the schedule."""
    if args.lr_scheduler != "polynomial":
        return
    learning_rate = args.learning_rate
    if args.scale_lr:  # as the loop scales it
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    if learning_rate <= POLYNOMIAL_LR_END:
        scaled = f" ({learning_rate:g} with `--scale_lr`)" if args.scale_lr else ""
        raise ValueError(
            f"`--learning_rate` {args.learning_rate:g}{scaled} is not above {POLYNOMIAL_LR_END:g}, the learning rate "
            "`--lr_scheduler polynomial` decays to: give a larger `--learning_rate`, or another `--lr_scheduler`."
        )
    if max_train_steps is not None and args.lr_warmup_steps == max_train_steps:
        given = "`--max_train_steps`" if args.max_train_steps is not None else "the training steps (`--num_epochs`)"
        raise ValueError(
            f"`--lr_warmup_steps` {args.lr_warmup_steps} takes all of {given} {max_train_steps}, which leaves "
            "`--lr_scheduler polynomial` no step to decay over: give fewer warm-up steps, or another `--lr_scheduler`."
        )


def check_device_options(args: argparse.Namespace) -> None:
    """The options that need a GPU or an optional package, or that the launcher sets otherwise (fp16, gradient
    accumulation): refused up front rather than failing, or training otherwise than said, mid-run."""
    from diffusers.utils import is_wandb_available, is_xformers_available

    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    on_gpu = torch.cuda.is_available() and not on_cpu
    # the precision Accelerate trains in: the option, else `accelerate launch --mixed_precision` or its config (on
    # CPU, Accelerate runs fp16 in fp32 without a word); fp16 runs on a CUDA GPU or Apple's MPS, as Accelerate's
    if args.mixed_precision is None and os.environ.get("ACCELERATE_MIXED_PRECISION") == "fp16":
        given = "`--mixed_precision fp16` (ACCELERATE_MIXED_PRECISION, set by `accelerate launch` or its config)"
    else:
        given = "`--mixed_precision fp16`" if args.mixed_precision == "fp16" else None
    if given is not None and not (on_gpu or (torch.backends.mps.is_available() and not on_cpu)):
        raise ValueError(
            f"{given} needs a CUDA GPU or Apple's MPS, and none is in use: train in fp32 (`--mixed_precision no`) "
            "or in bf16 (`--mixed_precision bf16`, which runs on CPU)."
        )
    # Accelerate accumulates over this many micro-batches when it is set (`accelerate launch
    # --gradient_accumulation_steps`, a DeepSpeed config), whatever the script passes: the script counts its steps
    # per epoch, the batches a resumed run skips, `--scale_lr` and the model card with its own option
    launched = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launched is not None and launched.strip() != str(args.gradient_accumulation_steps):
        raise ValueError(
            f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={launched} (set by `accelerate launch "
            "--gradient_accumulation_steps` or its config) would make Accelerate accumulate over other micro-batches "
            f"than `--gradient_accumulation_steps` {args.gradient_accumulation_steps}, with which the script counts "
            "its steps: pass the same number to the script, or launch without it."
        )
    if args.enable_xformers_memory_efficient_attention:
        if not on_gpu:
            raise ValueError("`--enable_xformers_memory_efficient_attention` needs a CUDA GPU, and none is in use.")
        if not is_xformers_available():
            raise ValueError(
                "`--enable_xformers_memory_efficient_attention` needs the `xformers` package: `pip install xformers`."
            )
    if args.logger == "wandb" and not is_wandb_available():
        raise ValueError("`--logger wandb` needs the `wandb` package: `pip install wandb` (or `--logger none`).")
