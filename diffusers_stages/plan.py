"""Command line for stage planning: ``python -m diffusers_stages.plan`` (or ``diffusers-stages-plan``).

Points Zhang et al.'s optimal-denoiser clustering (or a baseline) at an image folder or a `datasets` dataset and a
noise schedule, prints the stage boundaries (the last line of stdout is JSON), saves a PNG of the similarity curves
with the boundaries marked, and can write the boundaries and decoder widths into a model config: heuristic widths, or,
with ``--budget``, widths chosen to fit a FLOP budget (here the sampling FLOPs per image of 50 DDPM steps)::

    python -m diffusers_stages.plan --train_data_dir ./images --resolution 32 --num_stages 3 \\
        --output_plot plan.png --model_config unet/config.json --output_config planned/config.json \\
        [--budget 2.5e11 --num_inference_steps 50]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys

import torch
from tqdm.auto import tqdm

from .cli import (
    HelpFormatter,
    check_input_file,
    check_model_folder,
    check_output_file,
    check_png_path,
    check_seed,
    load_saved_folder,
    refuse_empty_folder,
    write_atomically,
)
from .models.checks import check_device, check_positive_integers, renamed_arguments, sample_size_is
from .planning import (
    METHODS,
    NoiseSchedule,
    load_images,
    partition_to_model_config,
    plan_stages,
    plot_plan,
    stage_difficulty,
    suggest_decoder_widths,
)
from .planning.budget import ARCHITECTURES, check_budget, check_budget_config, check_budget_covers_cheapest_widths
from .planning.data import check_dataset_name
from .planning.optimal_denoiser import check_planning_data
from .planning.sizing import config_value
from .planning.stage_plan import _check_num_stages, _check_unit_interval
from .schedulers import is_edm_scheduler, model_call_timesteps

PLANNING_INTEGERS = ("resolution", "num_samples", "chunk_size", "max_images")  # checked before loading
# `load_images`' arguments that are options of the same names
DATA_OPTIONS = ("train_data_dir", "dataset", "resolution", "num_channels", "image_column", "split", "max_images")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )  # prog: the command that ran it
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--train_data_dir",
        help="A folder of training images (searched recursively; files not ending in an image extension such as "
        ".png or .jpg are skipped). Every image file is decoded before planning: one that is not a readable image "
        "(truncated, or not an image) is an error naming it; at least 2 different images. Any size, 8- or 16-bit levels: each is "
        "converted to --num_channels, resized and centre-cropped to --resolution. Not read by --method uniform, snr "
        "and snr_clustering unless --model_config is given (the decoder widths are measured on the images).",
    )
    source.add_argument("--dataset", help="A `datasets` dataset: a `save_to_disk` folder, or a name for load_dataset.")
    parser.add_argument("--image_column", default="image", help="The image column of --dataset.")
    parser.add_argument("--split", default="train", help="The split of --dataset.")
    parser.add_argument("--resolution", type=int, default=32, help="Side of the square images planned on.")
    parser.add_argument(
        "--num_channels",
        type=int,
        default=3,
        choices=(1, 3),
        help="1 (grayscale) or 3 (RGB). The training scripts read every image as RGB: plan with 3 for them (1 plans "
        "for a grayscale model trained otherwise, e.g. from Python).",
    )
    parser.add_argument("--max_images", type=int, default=None, help="Plan on the first N images (default: all).")
    parser.add_argument(
        "--vae_path",
        default=None,
        help="An AutoencoderKL folder (the training scripts' --vae_path): plan on the images' latents, drawn from its "
        "posterior and scaled as the latent model sees them (`conventions.vae_to_model_latents`), not on pixels. "
        "--eta is then in latent units.",
    )
    parser.add_argument("--vae_subfolder", default=None, help="The subfolder of --vae_path holding the VAE (`vae`).")
    parser.add_argument("--num_stages", type=int, default=3, help="Number of stages (>= 2).")
    parser.add_argument(
        "--method",
        default="optimal_denoiser",
        choices=METHODS,
        help="optimal_denoiser (Zhang et al., Algorithm 1), ilp (the authors' integer program), or a baseline.",
    )
    parser.add_argument("--alpha", type=float, default=0.9, help="Mean-similarity threshold in (0, 1].")
    parser.add_argument("--eta", type=float, default=0.1, help="Pixel tolerance in (0, 1].")
    parser.add_argument("--num_samples", type=int, default=128, help="Monte Carlo draws K.")
    parser.add_argument("--num_levels", type=int, default=100, help="Noise levels on the planning grid.")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--scheduler_config", help="A diffusers scheduler config (file or folder). Default: DDPM.")
    schedule.add_argument("--edm", action="store_true", help="An EDM/Karras sigma schedule (boundaries in sigma).")
    parser.add_argument("--sigma_min", type=float, default=0.002, help="--edm: the smallest sigma.")
    parser.add_argument("--sigma_max", type=float, default=80.0, help="--edm: the largest sigma.")
    parser.add_argument("--rho", type=float, default=7.0, help="--edm: Karras et al.'s rho (> 0).")
    parser.add_argument(
        "--model_path",
        help="A trained model folder (diffusers or diffusers-stages; of a pipeline, its model's folder such as "
        "`unet/`), for --method gradient. A class-conditional model is measured with its unconditional label.",
    )
    parser.add_argument(
        "--model_config",
        help="A model config.json (a UNet2DModel's or a MultiStageUNet2DModel's): its decoder widths are planned "
        "(heuristic, or within --budget) and printed, and the plan is written into it (see --output_config).",
    )
    parser.add_argument(
        "--output_config",
        help="Where to write the planned MultiStageUNet2DModel config.json (its folders are created): "
        "`MultiStageUNet2DModel.from_config` takes it, and so does `train_multistage.py --model_config`.",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="A FLOP budget (needs --model_config): choose the decoder widths so that the expected cost stays within "
        "it, the largest decoders where the stages are hardest, instead of the fixed width heuristic. The cost is the "
        "sampling FLOPs per image of --num_inference_steps steps of the scheduler, or without it the training FLOPs "
        "(forward and backward) of one step of --batch_size images. It counts the denoiser only: with --vae_path, "
        "the VAE's encoding and decoding are not counted (each training batch is encoded, each sample decoded once).",
    )
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default="multistage",
        help="What --budget sizes: multistage (one decoder per stage on the shared encoder of --model_config, written "
        "into --output_config) or experts (one whole UNet2DModel of --model_config per stage, MEME-style: each "
        "expert's block widths, printed as the `examples/experts/train_experts.py` arguments that train them).",
    )
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Sampling steps the budget pays for.")
    parser.add_argument(
        "--batch_size", type=int, default=1, help="Training batch the budget pays for (without --num_inference_steps)."
    )
    parser.add_argument(
        "--output_plot", default=None, help="Where to write a PNG of the curves with the boundaries marked."
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the Monte Carlo draws, in [0, 2**32): same seed, same plan."
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--chunk_size", type=int, default=1024, help="Training images per streamed chunk.")
    args = parser.parse_args(argv)
    if args.output_config and not args.model_config:
        parser.error("--output_config needs --model_config (the config to write the plan into).")
    if args.budget is not None and not args.model_config:
        parser.error("--budget needs --model_config (the model whose decoder widths are planned).")
    if args.architecture == "experts" and args.budget is None:
        parser.error("--architecture experts sizes the experts for a --budget: give --budget (and --model_config).")
    if args.architecture == "experts" and args.output_config:
        parser.error(
            "--output_config writes a MultiStageUNet2DModel config; experts keep --model_config's and take the planned "
            "widths as `train_experts.py --expert_block_out_channels` (printed): drop --output_config."
        )
    if (args.num_inference_steps is not None or args.batch_size != 1) and args.budget is None:
        parser.error("--num_inference_steps and --batch_size say what --budget pays for: give --budget too.")
    if args.num_inference_steps is not None and args.batch_size != 1:
        parser.error(
            f"--batch_size is the training batch a budget without --num_inference_steps pays for; with "
            f"--num_inference_steps {args.num_inference_steps} the budget is the sampling FLOPs per image: drop one."
        )
    # options the command would otherwise ignore
    if not args.edm and any(
        getattr(args, name) != parser.get_default(name) for name in ("sigma_min", "sigma_max", "rho")
    ):
        parser.error(
            "--sigma_min, --sigma_max and --rho shape the --edm schedule: give --edm too (the default DDPM schedule "
            "and a --scheduler_config have their own noise levels)."
        )
    if args.alpha != parser.get_default("alpha") and args.method != "optimal_denoiser":
        parser.error(f"--alpha is read by --method optimal_denoiser only, not {args.method}: drop it.")
    if args.eta != parser.get_default("eta") and args.method not in ("optimal_denoiser", "ilp"):
        parser.error(f"--eta is read by --method optimal_denoiser and ilp only, not {args.method}: drop it.")
    if args.model_path is not None and args.method != "gradient":
        parser.error(f"--model_path is read by --method gradient only, not {args.method}: drop it or use gradient.")
    if args.vae_path and args.method in ("uniform", "snr", "snr_clustering") and not args.model_config:
        parser.error(
            f"--vae_path is read with the training images only, which --method {args.method} without --model_config "
            "does not read: drop it."
        )
    if args.train_data_dir and any(
        getattr(args, name) != parser.get_default(name) for name in ("image_column", "split")
    ):
        parser.error("--image_column and --split choose what is read of a --dataset, not of --train_data_dir.")
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before any image is loaded, a device this machine lacks, a bad budget (or one below what the cheapest
    widths cost) or step count (one the sampling scheduler cannot run too), and input or output paths that cannot be
    used (a `ValueError` naming the option and the value)."""
    if args.device is not None:
        check_device(args.device, "--device")
    if args.budget is not None:
        check_budget(args.budget, "--budget")
    # the planning functions check these too, but only once every image is loaded
    if args.num_stages < 2:
        raise ValueError(f"`--num_stages` must be an integer >= 2, got {args.num_stages}.")
    check_seed(args.seed)
    check_dataset_name(args.dataset, "--dataset")
    check_positive_integers(
        ("--max_images",), **{f"--{option}": getattr(args, option) for option in PLANNING_INTEGERS}
    )
    for option in ("alpha", "eta"):
        _check_unit_interval(f"--{option}", getattr(args, option))
    check_positive_integers(
        **{f"--{option}": getattr(args, option) for option in ("num_inference_steps", "batch_size")
           if getattr(args, option) is not None}
    )  # fmt: skip
    check_input_file(args.model_config, "--model_config", json_object=True)
    config = None  # the --model_config file's contents, read once for the checks below
    if args.model_config is not None:
        with open(args.model_config, encoding="utf-8") as f:
            config = json.load(f)
        _check_model_config(args.model_config, config, args.architecture)
        ups = config.get("decoder_up_block_types")  # per stage: the plan's stages must match them
        if ups is not None and len(ups) != args.num_stages and args.budget is None:  # a budget refuses any (below)
            raise ValueError(
                f"`--model_config` {args.model_config!r} sets `decoder_up_block_types` for {len(ups)} stages, but "
                f"`--num_stages` is {args.num_stages}: the planned config would not build. Plan {len(ups)} stages, or "
                "give a config without per-stage up blocks."
            )
    if args.budget is not None:  # a config whose widths a budget cannot plan
        check_budget_config(config, "--model_config")
    training_experts = args.architecture == "experts" and args.num_inference_steps is None
    if training_experts and args.batch_size < args.num_stages:  # the printed `--train_batch_size` would be refused
        raise ValueError(
            f"`--batch_size` {args.batch_size} is fewer than the {args.num_stages} experts (`--num_stages`): "
            "`train_experts.py` trains every expert at every step, so the batch a training budget pays for (its "
            f"`--train_batch_size`) must hold at least {args.num_stages} images."
        )
    if args.scheduler_config is not None:
        check_input_file(_scheduler_config_file(args.scheduler_config), "--scheduler_config", json_object=True)
    _check_schedule_options(args)
    if args.budget is not None and args.num_inference_steps is not None:  # steps the sampling scheduler can run
        model_call_timesteps(_schedule(args)[1], args.num_inference_steps)
    if args.model_path is not None:
        check_model_folder(args.model_path, "--model_path")
    _check_vae(args)
    if args.budget is not None:  # below what the cheapest widths cost, whatever the images and stages (the
        # config and the VAE checked first: a config of the wrong size would count other FLOPs)
        try:
            check_budget_covers_cheapest_widths(
                args.budget, config, args.num_inference_steps, _schedule(args)[1], args.batch_size,
                args.architecture, name="--budget",
            )  # fmt: skip
        except ValueError as error:
            raise renamed_arguments(error, {"model_config": "--model_config"}) from None
    check_output_file(args.output_plot, "--output_plot")
    check_png_path(args.output_plot, "--output_plot")
    check_output_file(args.output_config, "--output_config")
    files = {  # the input files and the outputs: none may be written over another
        "--model_config": args.model_config,
        "--scheduler_config": args.scheduler_config and _scheduler_config_file(args.scheduler_config),
        "--model_path": args.model_path and os.path.join(args.model_path, "config.json"),
        "--output_config": args.output_config,
    }
    for option, path in (("--output_config", args.output_config), ("--output_plot", args.output_plot)):
        for other, other_path in files.items():
            if path and other != option and other_path and os.path.realpath(path) == os.path.realpath(other_path):
                raise ValueError(
                    f"`{option}` {path!r} is the `{other}` file: writing there would replace it; give another path."
                )
    if _reads_images(args):  # checked last: the options above are refused first, whatever the data
        if args.train_data_dir is None and args.dataset is None:
            raise ValueError(
                f"`--method {args.method}`{' with `--model_config`' if args.model_config else ''} plans on the "
                "training images: give `--train_data_dir DIR` or `--dataset NAME`."
            )
        if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
            raise ValueError(f"`--train_data_dir` {args.train_data_dir!r} is not a folder.")


def _check_schedule_options(args: argparse.Namespace) -> None:
    """Refuse a ``--num_levels`` the planning grid cannot have (or fewer than ``--num_stages``) and ``--edm`` sigmas
    or ``rho`` that give no Karras schedule, by option name, then build the grid (a scheduler it cannot be built from
    is refused too)."""
    if args.num_levels < 3:
        raise ValueError(f"`--num_levels` must be an integer >= 3, got {args.num_levels}.")
    try:  # more stages than grid levels: the planning functions' check, before any image is read
        _check_num_stages(args.num_stages, args.num_levels)
    except ValueError as error:
        raise renamed_arguments(error, {"num_stages": "--num_stages", "num_levels": "--num_levels"}) from None
    if args.edm:
        if not 0 < args.sigma_min < args.sigma_max or not math.isfinite(args.sigma_max):
            raise ValueError(
                f"`--sigma_min` {args.sigma_min} and `--sigma_max` {args.sigma_max} must satisfy 0 < `--sigma_min` < "
                "`--sigma_max` < inf."
            )
        if not (math.isfinite(args.rho) and args.rho > 0):
            raise ValueError(f"`--rho` must be a positive finite number, got {args.rho}.")
    else:
        scheduler = _schedule_scheduler(args)
        alphas_cumprod = None if is_edm_scheduler(scheduler) else getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is not None and args.num_levels > len(alphas_cumprod):
            raise ValueError(
                f"`--num_levels` must be at most the {len(alphas_cumprod)} training timesteps of the schedule, got "
                f"{args.num_levels}."
            )
    _schedule(args)  # anything else it cannot be built from


def _check_vae(args: argparse.Namespace) -> None:
    """Refuse a ``--vae_subfolder`` without ``--vae_path``, a ``--vae_path`` that is not an AutoencoderKL folder
    or whose weights do not fit its config (the training scripts' checks, on its config and weight headers), a
    ``--resolution`` it does not divide,
    ``--num_channels`` other than the images it encodes, and a ``--model_config`` or ``--model_path`` model that
    does not take its latents."""
    if args.vae_subfolder is not None and args.vae_path is None:
        raise ValueError(
            f"`--vae_subfolder` {args.vae_subfolder!r} is a folder inside `--vae_path`: give `--vae_path` too."
        )
    if args.vae_path is None:
        _check_pixel_model(args)
        _check_model_config_size(args, args.resolution)
        return
    refuse_empty_folder(args.vae_path, "--vae_path")
    from diffusers import AutoencoderKL

    from .training.loop import check_vae_weights, vae_shape

    latent_channels, factor = vae_shape(args)  # an AutoencoderKL config, else a ValueError naming --vae_path
    check_vae_weights(args.vae_path, args.vae_subfolder, "`--vae_path`")  # its weight headers fit that config
    if args.resolution % factor:  # its latents would drop the images' last rows and columns; training refuses it
        raise ValueError(
            f"`--resolution` {args.resolution} must be a multiple of the down-sampling factor {factor} of "
            f"`--vae_path` {args.vae_path!r} (the training scripts refuse it too): try "
            f"{max(factor, args.resolution // factor * factor)}."
        )
    _check_model_config_size(args, args.resolution // factor, factor)
    in_channels = AutoencoderKL.load_config(args.vae_path, subfolder=args.vae_subfolder).get("in_channels", 3)
    if args.num_channels != in_channels:
        raise ValueError(
            f"`--num_channels` {args.num_channels} does not fit `--vae_path` {args.vae_path!r}, which encodes "
            f"{in_channels}-channel images: give `--num_channels {in_channels}`."
        )
    models = {"--model_config": args.model_config}
    if args.model_path is not None:
        models["--model_path"] = os.path.join(args.model_path, "config.json")
    for option, path in models.items():  # a latent model: it takes the VAE's latents
        if path is None:
            continue
        model_channels = _config_channels(path)
        if model_channels != latent_channels:
            given = args.model_path if option == "--model_path" else path
            raise ValueError(
                f"`{option}` {given!r} takes {model_channels}-channel samples, but `--vae_path` {args.vae_path!r} "
                f"gives {latent_channels}-channel latents: give the latent model, or the VAE it trains with."
            )


def _check_pixel_model(args: argparse.Namespace) -> None:
    """Without ``--vae_path``: refuse a ``--model_path`` model that does not take ``--num_channels`` images (a latent
    model, say), before any image is read (`gradient_plan` would refuse it after all were read), and a
    ``--model_config`` model either (its widths would be planned on other data than it takes)."""
    models = {"--model_path": args.model_path and os.path.join(args.model_path, "config.json")}
    models["--model_config"] = args.model_config
    for option, path in models.items():
        if path is None:
            continue
        model_channels = _config_channels(path)
        if model_channels != args.num_channels:
            latent = model_channels not in (1, 3)
            what = "the `--vae_path` it was trained with" if latent else f"`--num_channels {model_channels}`"
            given = args.model_path if option == "--model_path" else path
            raise ValueError(
                f"`{option}` {given!r} takes {model_channels}-channel samples, but `--num_channels` "
                f"{args.num_channels} gives {args.num_channels}-channel images: give {what}."
            )


def _check_model_config_size(args: argparse.Namespace, side: int, factor: int = 1) -> None:
    """Refuse a ``--model_config`` or ``--model_path`` model whose ``sample_size`` (when it gives one) is not that of
    the samples planned on, ``side`` (``--resolution``, divided by the VAE's down-sampling ``factor``): a budget's
    FLOPs are counted at its size, the training scripts train at ``--resolution``, and the gradient baseline would
    measure a trained model where it never trained."""
    models = {"--model_config": (args.model_config, args.model_config)}
    if args.model_path is not None:
        models["--model_path"] = (args.model_path, os.path.join(args.model_path, "config.json"))
    for option, (given, path) in models.items():
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            size = json.load(f).get("sample_size")
        if size is not None and not sample_size_is(size, side):
            fix = f"`--resolution {size * factor}`" if type(size) is int and size > 0 else "a model of that size"
            raise ValueError(
                f"`{option}` {given!r} is for samples of size {size}, but `--resolution` {args.resolution} gives "
                f"samples of size {side}: give {fix}."
            )


def _config_channels(path: str) -> int:
    """The channels of the samples the model of the config file ``path`` takes (UNet2DModel's default 3)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("in_channels", 3)


# the configs a plan sizes: the multi-stage U-Net's shared encoder, or the U-Net every expert is
PLANNED_FROM = {"multistage": ("UNet2DModel", "MultiStageUNet2DModel"), "experts": ("UNet2DModel",)}


def _check_model_config(path: str, config: dict, architecture: str = "multistage") -> None:
    """Refuse a ``--model_config`` (``config``, read from ``path``) that is not a config of `PLANNED_FROM`
    ``[architecture]`` or does not build one (built on the ``meta`` device: no memory): the planned model would not
    load."""
    import diffusers

    import diffusers_stages

    name = config.get("_class_name", "UNet2DModel")  # a config without a class name: read as a UNet2DModel's
    if name not in PLANNED_FROM[architecture]:
        what = (
            "each expert is a UNet2DModel of that config (`train_experts.py --model_config`)"
            if architecture == "experts"
            else f"the plan is written into a config of one of {', '.join(PLANNED_FROM[architecture])} (their "
            "stages share its encoder)"
        )
        raise ValueError(f"`--model_config` {path!r} is a {name} config: {what}.")
    error = _build_error(getattr(diffusers_stages if name.startswith("MultiStage") else diffusers, name), config)
    if error is not None:
        raise ValueError(f"`--model_config` {path!r} does not build a {name}: {error}")


def _check_planned_config(planned: dict) -> None:
    """Refuse to write a planned config that `MultiStageUNet2DModel.from_config` would not take (built on the
    ``meta`` device)."""
    from .models.unet_multistage import MultiStageUNet2DModel

    error = _build_error(MultiStageUNet2DModel, planned)
    if error is not None:
        raise ValueError(
            f"The planned config does not build a MultiStageUNet2DModel ({error}); it was not written. Fix "
            "`--model_config`."
        )


def _build_error(model_class: type, config: dict) -> str | None:
    """Why ``model_class.from_config(config)`` fails (``"ErrorType: message"``), built on the ``meta`` device (no
    memory); None when it builds."""
    try:
        with torch.device("meta"):
            model_class.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _write_json(config: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def _scheduler_config_file(path: str) -> str:
    """A scheduler config given as a file or as a folder holding ``scheduler_config.json``."""
    return os.path.join(path, "scheduler_config.json") if os.path.isdir(path) else path


def _scheduler_from_config(path: str):
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from .models.loading import exported_class

    path = _scheduler_config_file(path)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    name = config.get("_class_name")
    scheduler_class = exported_class(name, SchedulerMixin, (diffusers,))
    if scheduler_class is None:
        raise ValueError(f"`--scheduler_config` {path!r} names no diffusers scheduler (_class_name {name!r}).")
    try:
        return scheduler_class.from_config(config)
    except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as error:  # a value it cannot take
        raise ValueError(
            f"`--scheduler_config` {path!r} does not build a {name}: {type(error).__name__}: {error}"
        ) from None


def _schedule(args: argparse.Namespace) -> tuple[NoiseSchedule, object]:
    """The planning grid (its units are the boundaries' units) and the scheduler whose sampling steps a budget
    counts."""
    if args.edm:
        from diffusers import EDMEulerScheduler

        schedule = NoiseSchedule.edm(args.sigma_min, args.sigma_max, args.rho, args.num_levels)  # checks them first
        return schedule, EDMEulerScheduler(sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho)
    scheduler = _schedule_scheduler(args)
    return NoiseSchedule.from_scheduler(scheduler, args.num_levels), scheduler


def _schedule_scheduler(args: argparse.Namespace):
    """The scheduler of a schedule that is not ``--edm``: ``--scheduler_config``'s, else DDPM's default."""
    if args.scheduler_config:
        return _scheduler_from_config(args.scheduler_config)
    from diffusers import DDPMScheduler

    return DDPMScheduler()


def _reads_images(args: argparse.Namespace) -> bool:
    """Whether the command reads the training images: not for a schedule-only baseline without a model config."""
    return args.method not in ("uniform", "snr", "snr_clustering") or bool(args.model_config)


def _training_images(args: argparse.Namespace) -> torch.Tensor | None:
    """The training images, checked; None when nothing needs them (a schedule-only baseline, no model config)."""
    if not _reads_images(args):
        return None
    try:
        data = load_images(
            args.train_data_dir,
            args.dataset,
            args.resolution,
            args.num_channels,
            args.image_column,
            args.split,
            args.max_images,
            progress_bar=True,
        )
    except ValueError as error:  # it names its arguments: here they are the command's options of the same names
        raise renamed_arguments(error, {name: f"--{name}" for name in DATA_OPTIONS}) from None
    source = "--train_data_dir" if args.train_data_dir else "--dataset"
    check_planning_data(data, source)  # before any planning (and any encoding)
    if args.vae_path is not None:
        data = _vae_latents(args, data)
        check_planning_data(data, f"the `--vae_path` latents of {source}")
    kind = "latents" if args.vae_path is not None else "images"
    print(f"{data.shape[0]} training {kind} of shape {tuple(data.shape[1:])}", file=sys.stderr)
    return data


def _vae_latents(args: argparse.Namespace, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The latents a latent run trains on: drawn from ``--vae_path``'s posterior (seeded by ``--seed``) and scaled as
    the model sees them, ``(E(x) - shift) * scaling`` (`conventions.encode_model_latents`, as the training loop)."""
    from diffusers import AutoencoderKL

    from .conventions import encode_model_latents
    from .models.loading import load_strictly

    vae = load_strictly(AutoencoderKL, args.vae_path, args.vae_subfolder).eval()  # no weight left random
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae.to(device, torch.float32)
    generator = torch.Generator(device).manual_seed(args.seed)
    progress = functools.partial(tqdm, desc="encoding latents")
    return encode_model_latents(vae, images, generator, batch_size, progress).cpu()


def _decoder_widths(args, plan, config: dict, data: torch.Tensor, schedule: NoiseSchedule, scheduler, result: dict):
    """The widths planned for ``--budget``, else the heuristic ones (written into ``result``), printed with how to
    train them on the noise schedule planned on (``scheduler``'s)."""
    if plan.budget is not None:
        paid = (
            f"{args.num_inference_steps} sampling steps"
            if args.num_inference_steps
            else f"training step of {args.batch_size} images (train with `--train_batch_size {args.batch_size}`)"
        )
        sized = "expert" if args.architecture == "experts" else "decoder"
        print(
            f"  {sized} widths for a budget of {args.budget:.4g} FLOPs per {paid} (clean stage first): "
            f"{[list(w) for w in plan.budget.widths]}, expected {plan.budget.expected_flops:.4g} FLOPs"
        )
        if args.vae_path is not None:
            print(
                "  the budget counts the denoiser's FLOPs only: the `--vae_path` VAE's encoding (of each training "
                "batch) and decoding (of each sample) are not counted."
            )
        widths = plan.budget.widths
    else:
        difficulty = stage_difficulty(data, schedule, plan.partition)
        widths = suggest_decoder_widths(config_value(config, "block_out_channels"), difficulty, config=config)
        result["stage_difficulty"] = [round(d, 4) for d in difficulty]
        result["decoder_block_out_channels"] = [list(w) for w in widths]
        print(f"  heuristic decoder widths (clean stage first): {result['decoder_block_out_channels']}")
    schedule_options, unmatched = _training_schedule(scheduler, plan.partition)
    if args.architecture == "experts":
        command = shlex.join([*_expert_arguments(args, plan), *schedule_options])
        print(f"  train them with the data options: examples/experts/train_experts.py {command}")
    elif schedule_options:  # the planned config holds the stages, not the noise schedule
        print(f"  train the planned model with `{shlex.join(schedule_options)}` (the schedule planned on)")
    if unmatched:
        print(f"  note: {unmatched}")
    return widths


def _expert_arguments(args: argparse.Namespace, plan) -> list[str]:
    """The `train_experts.py` arguments that train the experts of a budget ``plan`` (with the data options); for a
    training budget also the batch it pays for: `--batch_size` images, each trained by the expert of its interval
    (`--assignment hard`: the batch stratified by the stages' mass, as `stage_calls` counts it; soft assignment
    splits it equally over the experts)."""
    partition = plan.partition
    units = ["--boundary_units", "sigma"] if partition.units == "sigma" else [
        "--num_train_timesteps", str(partition.num_train_timesteps)]  # fmt: skip
    paid = [] if args.num_inference_steps is not None else [
        "--train_batch_size", str(args.batch_size), "--assignment", "hard"]  # fmt: skip
    return [
        "--model_config", args.model_config,
        "--stage_boundaries", *(str(float(b)) for b in partition.boundaries), *units,
        "--expert_block_out_channels", *(",".join(map(str, w)) for w in plan.budget.widths), *paid,
    ]  # fmt: skip


def _training_schedule(scheduler, partition) -> tuple[list[str], str | None]:
    """The training scripts' options that give a run the noise schedule planned on (``scheduler``'s), and what their
    options cannot give (a note to print, or None): they train DDPM-style schedules of `--ddpm_beta_schedule` and
    `--num_train_timesteps`, and EDM's with `EDMEulerScheduler`'s default sigma range."""
    from diffusers import DDPMScheduler, EDMEulerScheduler

    from .schedulers import training_schedule_differences
    from .training.args import BETA_SCHEDULES

    if partition.units == "sigma":
        default = EDMEulerScheduler().config
        differs = [f"{k}={scheduler.config.get(k)!r}" for k in ("sigma_min", "sigma_max", "rho")
                   if scheduler.config.get(k, default[k]) != default[k]]  # fmt: skip
        note = (
            f"the plan's EDM schedule has {', '.join(differs)}; the training scripts train and sample with "
            f"EDMEulerScheduler's defaults ({', '.join(f'{k}={default[k]!r}' for k in ('sigma_min', 'sigma_max', 'rho'))}), "
            "so its sampling steps fall elsewhere than the budget counted."
        )
        return [], note if differs else None
    beta = scheduler.config.get("beta_schedule", "linear")
    options = ["--ddpm_beta_schedule", beta] if beta in BETA_SCHEDULES and beta != "linear" else []
    trained = DDPMScheduler(  # what the scripts train with these options (the prediction type is theirs to choose)
        num_train_timesteps=partition.num_train_timesteps, beta_schedule=beta if beta in BETA_SCHEDULES else "linear"
    )
    differs = [
        k for k in training_schedule_differences(trained, scheduler) if k not in ("prediction_type", "sigma_data")
    ]
    if not differs:
        return options, None
    return options, (
        f"the training scripts' noise schedule (`--ddpm_beta_schedule` with its default beta range, "
        f"`--num_train_timesteps`) is not the one planned on (--scheduler_config differs in {', '.join(differs)}): "
        "the stages' intervals would hold other noise levels than planned."
    )


def run(argv: list[str] | None = None) -> dict:
    """Run the command on ``argv`` (default: ``sys.argv``); returns what the JSON line holds. Bad input raises a
    `ValueError` (the command line, [`main`], prints it as one line)."""
    return plan_command(parse_args(argv))


def plan_command(args: argparse.Namespace) -> dict:
    """The command on parsed arguments; returns what the JSON line holds."""
    # 1. the noise schedule, the training images and the model config
    schedule, scheduler = _schedule(args)
    data = _training_images(args)
    config = None
    if args.model_config:
        with open(args.model_config, encoding="utf-8") as f:
            config = json.load(f)

    # 2. plan (and, with a budget, the decoder widths)
    budget = {}
    if args.budget is not None:
        budget = dict(budget=args.budget, model_config=config, num_inference_steps=args.num_inference_steps)
        budget.update(batch_size=args.batch_size, architecture=args.architecture)
        if args.num_inference_steps is not None:  # the scheduler whose sampling steps the budget counts
            budget.update(sampling_scheduler=scheduler)
    plan = plan_stages(
        data,
        schedule,
        args.num_stages,
        args.method,
        args.alpha,
        args.eta,
        args.num_samples,
        args.num_levels,
        torch.Generator().manual_seed(args.seed),
        load_saved_folder(args.model_path, "--model_path") if args.model_path is not None else None,
        args.chunk_size,
        args.device,
        progress_bar=True,
        **budget,
    )
    result = plan.to_dict()
    unit = "timestep" if schedule.units == "timestep" else "sigma"
    print(f"{args.method}: {plan.partition.num_stages} stages, boundaries in {unit} units")
    for s in range(plan.partition.num_stages):  # (b_{s-1}, b_s] in sigma units: as in the EDM code
        print(f"  stage {s}: {plan.partition.interval_text(s, '.6g')}")

    # 3. decoder widths and the model config
    if config is not None:
        widths = _decoder_widths(args, plan, config, data, schedule, scheduler, result)
        if args.output_config:
            planned = {
                **partition_to_model_config(config, plan.partition, widths),
                "_class_name": "MultiStageUNet2DModel",
            }
            _check_planned_config(planned)
            write_atomically(args.output_config, lambda path: _write_json(planned, path))
            print(f"  model config written to {args.output_config}")
    if args.output_plot:
        print(f"  plot written to {write_atomically(args.output_plot, lambda path: plot_plan(plan, path))}")
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``diffusers-stages-plan``): bad input is one line on stderr and exit status 1 (2
    for a usage error), not a traceback."""
    from diffusers_stages.conversion.common import run as run_command

    run_command(plan_command, parse_args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
