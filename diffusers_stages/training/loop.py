"""The one training loop of the three training scripts (multi-stage, experts, dual backbone), on Accelerate.

It runs unchanged on one CPU, one GPU, or several GPUs/machines (`accelerate launch`, DDP): every network is
forwarded exactly once per step, with samples of every stage it owns, so DDP needs no `find_unused_parameters`.
The randomness of a step (timesteps, noise, label dropout, VAE posterior draws, the networks' dropout) comes from
generators seeded by ``(seed, process, micro-step)``, and the data order and augmentation from ``(seed, epoch,
index)``, so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import is_tensorboard_available
from tqdm.auto import tqdm

from ..conventions import latent_statistics_error, null_class_label, num_data_classes
from ..models.loading import (
    SAMPLING_OPTIONS,
    config_misfit,
    load_strictly,
    plain_weight_headers,
)
from ..pipelines.pipeline_staged import checked_id2label
from .args import EMA_OPTIONS, check_args, check_lr_schedule, refuse_changed_options, tracker_config
from .checkpointing import (
    check_resume_arguments,
    check_same_class_names,
    check_same_optimizer_settings,
    check_same_process_count,
    check_same_sharding,
    check_same_source_files,
    check_sharded_resume,
    checkpoint_folders,
    checkpoint_step,
    discard_checkpoints,
    finished_step,
    mark_finished,
    optimizer_settings,
    publish_pipeline,
    register_checkpoint_hooks,
    remove_leftovers,
    resolve_resume_checkpoint,
    save_checkpoint,
    skipped_checkpoints,
    source_identity,
)
from .data import (
    EpochShuffleSampler,
    ImageRecords,
    TrainingImages,
    encode_latent_cache,
    first_shuffled,
    hf_dataset_records,
    image_folder_records,
)
from .hub import (
    LocalHubApi,
    assembled_experts_card_text,
    base_model,
    create_hub_repo,
    model_card_text,
    push_output_folder,
)
from .sharding import check_sharded_run, check_sharding_launched, gathered_networks, is_sharded
from .state import LossLog, RunState, sample_grid, save_samples
from .tasks import TrainingTask, noise_schedulers
from .tasks.pretrained import check_source_folder

logger = get_logger(__name__)


def vae_shape(args: argparse.Namespace, task: TrainingTask | None = None) -> tuple[int, int]:
    """``(channels, down-sampling factor)`` of the training samples: the latents of the task's VAE (`--vae_path`),
    read from its config only, or RGB pixels ``(3, 1)``."""
    path, subfolder = (args.vae_path, args.vae_subfolder) if task is None else (task.vae_path, task.vae_subfolder)
    if path is None:
        return 3, 1
    try:
        config = AutoencoderKL.load_config(path, subfolder=subfolder)
    except (OSError, ValueError) as error:
        pipeline = subfolder is None and os.path.isfile(os.path.join(path, "model_index.json"))
        hint = ""
        if pipeline and os.path.isfile(os.path.join(path, "vae", "config.json")):
            hint = " It is a pipeline folder: add `--vae_subfolder vae` (its VAE's folder)."
        elif pipeline:  # a pixel-space pipeline (no `vae/`): the subfolder hint would lead to a missing folder
            hint = (
                " It is a pipeline folder with no AutoencoderKL `vae` (no vae/config.json): give an AutoencoderKL "
                "folder (or a pipeline that has one, with `--vae_subfolder vae`), or leave out `--vae_path` to "
                "train in pixel space."
            )
        raise ValueError(f"`--vae_path` {path!r} is not an AutoencoderKL folder: {error}{hint}") from None
    class_name = config.get("_class_name", "AutoencoderKL")  # training draws from AutoencoderKL's posterior only
    if class_name != "AutoencoderKL":
        raise ValueError(
            f"`--vae_path` {path!r} holds a {class_name!s}, not an AutoencoderKL: training encodes images with an "
            "AutoencoderKL's posterior (`latent_dist`) only; give an AutoencoderKL folder (or subfolder)."
        )
    channels, levels = config.get("latent_channels"), config.get("block_out_channels")
    blocks = config.get("down_block_types", levels)
    if not (type(channels) is int and channels > 0 and isinstance(levels, list) and levels):
        raise ValueError(
            f"`--vae_path` {path!r}: its config.json must give `latent_channels` (a positive integer) and "
            f"`block_out_channels` (a list of one width per level), got {channels!r} and {levels!r}."
        )
    if not isinstance(blocks, list) or len(blocks) != len(levels):  # the factor counts levels: one block each
        raise ValueError(
            f"`--vae_path` {path!r}: its config.json gives {len(levels)} `block_out_channels` for "
            f"{len(blocks) if isinstance(blocks, list) else blocks!r} `down_block_types`: one width per block."
        )
    statistics = latent_statistics_error(config, channels)  # the latents' scaling (`vae_to_model_latents`)
    if statistics is not None:
        raise ValueError(f"`--vae_path` {path!r}: in its config.json, {statistics}.")
    return channels, 2 ** (len(levels) - 1)


def latent_space(task: TrainingTask) -> dict:
    """The data space of ``task``'s run, as its checkpoints record it (resuming checks it is the same):
    ``{"vae_path", "vae_subfolder", "vae"}``, ``"vae"`` None in pixel space, else the options of the VAE's config
    that set its latents (every AutoencoderKL constructor option, a missing one at its default, but the
    `SAMPLING_OPTIONS`: another tiling size or decoding precision is the same latent space)."""
    if task.vae_path is None:
        return {"vae_path": None, "vae_subfolder": None, "vae": None}
    config = AutoencoderKL.load_config(task.vae_path, subfolder=task.vae_subfolder)  # read by `vae_shape` first
    parameters = inspect.signature(AutoencoderKL.__init__).parameters
    options = {
        name: config.get(name, parameter.default)
        for name, parameter in parameters.items()
        if parameter.default is not inspect.Parameter.empty and name not in SAMPLING_OPTIONS
    }
    return {"vae_path": task.vae_path, "vae_subfolder": task.vae_subfolder, "vae": json.loads(json.dumps(options))}


def step_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """The generator of one micro-step on one process: a pure function of the three, so resuming needs no state.

    The global generators, which the networks' own randomness draws from (dropout), are seeded from the three as well
    (another seed than the returned generator's): a sample grid or a data-loader iterator drawing from them between
    two steps, or a run resumed from a checkpoint saved before such a draw, changes no dropout mask."""
    state = np.random.SeedSequence([seed, process_index, micro_step]).generate_state(4, dtype=np.uint32)
    torch.manual_seed(int(state[2]) << 32 | int(state[3]))
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def parse_and_check(
    parser: argparse.ArgumentParser, task_class: type[TrainingTask], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse a script's arguments and run every check that needs no training; a problem exits with a usage error.

    The task built for the checks is kept: `build_task` hands it to the training run of the same arguments."""
    global _checked
    args = parser.parse_args(argv)
    try:
        task = task_class(args)
        if not task.uses_labels:  # (a default of the script's own: text-to-image's is 0)
            refuse_changed_options(parser, args, ("class_dropout_prob",), "a run without `--class_conditional`",
                                   "it trains unconditional, without labels to drop")  # fmt: skip
        if not args.use_ema:  # (diffusers' scripts ignore them: a decay typed without `--use_ema` kept no EMA)
            refuse_changed_options(parser, args, EMA_OPTIONS, "a run without `--use_ema`",
                                   "it keeps no EMA of the weights (add `--use_ema` to keep one)")  # fmt: skip
        check_args(args, task.partition, task.downsampling * vae_shape(args, task)[1], task.vae_path)
        check_sampling_steps(args, task)
        check_networks(args, task)
    except ValueError as error:
        parser.error(str(error))
    _checked = (args, dict(vars(args)), task)
    return args


_checked: tuple[argparse.Namespace, dict, TrainingTask] | None = None  # the last checked arguments and their task


def check_sampling_steps(args: argparse.Namespace, task: TrainingTask) -> None:
    """`--num_inference_steps` must be a step count the sampling scheduler takes (DDIM: at most the training
    schedule's length), refused before training rather than at the first sample grid."""
    _, sampling_scheduler = noise_schedulers(args, task.scheduler_config)
    try:
        sampling_scheduler.set_timesteps(args.num_inference_steps)
    except ValueError as error:
        raise ValueError(
            f"`--num_inference_steps` {args.num_inference_steps} cannot sample the sample grids with "
            f"{type(sampling_scheduler).__name__}: {error}"
        ) from None


# the class embeddings the network check builds with when the data gives labels (read later): 2 classes + the null
PLACEHOLDER_CLASS_EMBEDS = 3


def check_networks(args: argparse.Namespace, task: TrainingTask) -> None:
    """`TrainingTask.check_networks` for samples of the arguments' shape (channels and size, after the VAE), before
    the data is read (its class count is not known yet: `PLACEHOLDER_CLASS_EMBEDS`), and the VAE: it must encode
    RGB images, what training reads, and its weights must fit its config (`check_vae_weights`)."""
    in_channels, vae_factor = vae_shape(args, task)
    num_class_embeds = PLACEHOLDER_CLASS_EMBEDS if task.uses_labels else None
    task.check_networks(in_channels, args.resolution // vae_factor, num_class_embeds)
    given = "`--vae_path`" if args.vae_path is not None else "`--pretrained_model_name_or_path`"  # or a source's own
    if task.vae_path is not None:
        image_channels = AutoencoderKL.load_config(task.vae_path, subfolder=task.vae_subfolder).get("in_channels", 3)
        if image_channels != 3:
            where = f" ({task.vae_subfolder}/)" if task.vae_subfolder else ""
            raise ValueError(
                f"{given} {task.vae_path!r}{where} encodes {image_channels}-channel images (its `in_channels`), but training "
                "reads RGB images (3 channels): give a VAE of RGB images."
            )
    check_vae_weights(task.vae_path, task.vae_subfolder, given)


def check_vae_weights(path: str | None, subfolder: str | None, option: str) -> None:
    """Refuse a local VAE folder (``path``, in ``subfolder``) whose files its loader refuses (`check_source_folder`:
    a link out of it, a weight index that is no JSON object of file names) or whose weight files hold a tensor of
    another shape than the AutoencoderKL its config builds (the safetensors of another width, say), reading their
    headers only (`first_shape_mismatch`): the strict loading (`_load_vae`) refuses it only once the data are read.
    A `ValueError` naming ``option`` (where the VAE came from) and the file or tensor; a Hub repository is its
    loader's."""
    folder = None if path is None else os.path.join(path, subfolder or "")
    if folder is None or not os.path.isdir(folder):
        return
    where = f"the weights in its {subfolder}/ do not" if subfolder else "its weights do not"
    try:
        check_source_folder(path, subfolder)
    except ValueError as error:
        raise ValueError(f"{option} {path!r}: {error}") from None
    held = plain_weight_headers(folder)  # headers only
    misfit = config_misfit(
        lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder=subfolder)), held
    )
    if misfit is not None and not misfit.builds:
        raise ValueError(
            f"{option} {path!r}: {where} load, as its config.json builds no AutoencoderKL: {misfit.reason}"
        )
    if misfit is not None:
        raise ValueError(f"{option} {path!r}: {where} fit its config.json: {misfit.reason}")


def build_task(task_class: type[TrainingTask], args: argparse.Namespace) -> TrainingTask:
    """The ``task_class`` task of ``args``: the one `parse_and_check` built for them when they are unchanged since,
    else a new one."""
    if _checked is not None:
        checked_args, values, task = _checked
        if checked_args is args and values == vars(args) and type(task) is task_class:
            return task
    return task_class(args)


def train(args: argparse.Namespace, task: TrainingTask) -> str:
    """Train ``task``'s networks as ``args`` says; returns the output folder (a `save_pretrained` pipeline)."""
    # 1. every check that needs no training: arguments, output folder, data source, data vs. networks
    in_channels, vae_factor = vae_shape(args, task)
    check_args(args, task.partition, task.downsampling * vae_factor, task.vae_path)
    check_sampling_steps(args, task)
    check_networks(args, task)
    existing, resume_path = _check_output_dir(args)
    source = getattr(args, "pretrained_model_name_or_path", None)  # a fine-tuning run's, checked on resuming
    if resume_path is not None:  # the checkpoint's source and noise schedule: before the data are read
        check_resume_arguments(
            resume_path, noise_schedulers(args, task.scheduler_config)[0], source, latent_space(task)
        )
    source_files = source_identity(source)  # the folder as this run fine-tunes it, saved in its checkpoints
    resume_warnings = [] if resume_path is None else [check_same_source_files(resume_path, source, source_files)]
    records = task.read_records(args)
    if records is None:
        records = _read_records(args)
    if args.max_train_samples is not None:
        records = first_shuffled(records, args.max_train_samples, args.seed)
    num_class_embeds = records.num_classes + 1 if task.uses_labels else None  # last index = null label
    if args.class_conditional:  # saved as the pipeline's `id2label`: names that cannot be saved stop the run now
        task.class_names = list(records.class_names)
        try:
            checked_id2label(task.id2label, records.num_classes)
        except ValueError as error:
            raise ValueError(
                f"The training data's class names {task.class_names} cannot be saved as the pipeline's class names: "
                f"{error} Rename the class folders (or the dataset's label names)."
            ) from None
    if resume_path is not None:  # the class indices the checkpoint's networks learned must mean the same classes
        check_same_class_names(resume_path, task.id2label)
    task.check_data(in_channels, args.resolution // vae_factor, num_class_embeds)

    # 2. accelerator, logging, output folder, seeds (the same initial weights on every process)
    accelerator = _accelerator(args, task)
    # the Hub repository: created by the main process, whose answer (or error) stops every process before anything
    # is written; `name` becomes `<user>/name`
    hub_repo_id = create_hub_repo(args, accelerator) if args.push_to_hub else None
    for warning in [*filter(None, resume_warnings), *task.data_warnings()]:  # (the logger needs the accelerator)
        logger.warning(warning)
    replaced = _prepare_output_dir(accelerator, args, existing, resume_path)
    set_seed(args.seed)
    if args.allow_tf32:  # as diffusers' train_text_to_image.py
        torch.backends.cuda.matmul.allow_tf32 = True

    # 3. data: images, or VAE latents (encoded every step, or once up front)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae = _load_vae(task, accelerator.device, weight_dtype)
    if args.cache_latents:
        dataset = encode_latent_cache(records, vae, args.resolution, args.random_flip, args.seed)
    else:
        dataset = TrainingImages(records, args.resolution, args.center_crop, args.random_flip, args.seed)
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=sampler, num_workers=args.dataloader_num_workers
    )

    # 4. networks, EMA, optimizer, learning-rate schedule; prepared, with save_pretrained checkpoint hooks
    networks = task.build_networks(in_channels, args.resolution // vae_factor, num_class_embeds)
    check_sharded_run(accelerator, args, list(networks), task.decoders)
    emas, optimizer, lr_scheduler, max_train_steps = _optimisation(
        args, networks, accelerator, len(train_dataloader), task.ema_warmup
    )
    *models, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *networks.values(), optimizer, train_dataloader, lr_scheduler
    )
    noise_scheduler, sampling_scheduler = noise_schedulers(args, task.scheduler_config)
    register_checkpoint_hooks(
        accelerator,
        list(networks),
        emas,
        noise_scheduler,
        task.partition,
        source,
        latent_space(task),
        task.id2label,
        source_files,
    )
    state = RunState(
        accelerator, args, task, list(networks), models, emas, optimizer, lr_scheduler, noise_scheduler,
        sampling_scheduler, vae, weight_dtype, records.num_classes if task.uses_labels else 0, max_train_steps,
        replaced, hub_repo_id,
    )  # fmt: skip

    # 5. resume, trackers
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    start = _resume(state, resume_path, steps_per_epoch)
    if start is None:
        return args.output_dir
    if accelerator.is_main_process:
        config = tracker_config(args)  # no `--hub_token`; the U-Net shape used
        project = args.tracker_project_name or os.path.basename(os.path.normpath(args.output_dir))
        accelerator.init_trackers(project, config=config)
    logger.info(
        f"***** {task.method}: {len(dataset)} examples, {math.ceil(max_train_steps / steps_per_epoch)} epochs, batch "
        f"{args.train_batch_size} per device ({args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps} "
        f"in total), {max_train_steps} optimisation steps *****"
    )

    # 6. training loop, then the trained pipeline, its sample grid, the model card and the upload
    global_step = _train_epochs(state, train_dataloader, sampler, start, steps_per_epoch)
    _finish(state, global_step)
    return args.output_dir


def _read_records(args: argparse.Namespace) -> ImageRecords:
    """The training images of `--train_data_dir` or `--dataset_name` (labels included)."""
    if args.train_data_dir is not None:
        return image_folder_records(args.train_data_dir, args.class_conditional)
    return hf_dataset_records(
        args.dataset_name, args.class_conditional, args.dataset_config_name, args.image_column, args.label_column,
        args.cache_dir,
    )  # fmt: skip


def _check_output_dir(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """``(checkpoint folders in --output_dir, the checkpoint to resume from or None)``; refuses to train over
    checkpoints unless told to resume or overwrite."""
    existing = checkpoint_folders(args.output_dir)
    if existing and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise ValueError(
            f"`--output_dir` {args.output_dir!r} already holds checkpoints ({os.path.basename(existing[-1])}): pass "
            "`--resume_from_checkpoint latest` to continue, or `--overwrite_output_dir` to start again."
        )
    return existing, resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)


def _accelerator(args: argparse.Namespace, task: TrainingTask) -> Accelerator:
    """The run's Accelerator (mixed precision, accumulation, trackers, DDP), checked against the launcher."""
    log_with = None
    if args.logger == "wandb":
        log_with = "wandb"  # `check_args` made sure it is installed
    elif args.logger == "tensorboard":
        log_with = "tensorboard" if is_tensorboard_available() else None
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=task.find_unused_parameters)],
    )
    check_sharding_launched(accelerator)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(
            f"{launched} processes were launched but Accelerate runs {accelerator.num_processes}: on CPU, launch with "
            "`ACCELERATE_USE_CPU=true` set (e.g. `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...`)."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.logger == "tensorboard" and log_with is None:
        logger.warning("TensorBoard is not installed: training without logs (`pip install tensorboard`).")
    return accelerator


def _prepare_output_dir(
    accelerator: Accelerator, args: argparse.Namespace, existing: list[str], resume_path
) -> list[str]:
    """Remove what a killed run left half-written; returns the checkpoints `--overwrite_output_dir` starts over from,
    deleted only once this run has a complete checkpoint (`save_checkpoint`) or its final outputs."""
    if accelerator.is_main_process:
        for name in remove_leftovers(args.output_dir):
            logger.info(
                f"Removed {name}, left in {args.output_dir} by a run killed while saving a checkpoint or the pipeline."
            )
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    return list(existing) if args.overwrite_output_dir and resume_path is None else []


def _discard_replaced(state: RunState) -> None:
    """Delete the former run's checkpoints (`--overwrite_output_dir`) that this run's first checkpoint did not
    (it saved none): its final outputs are written."""
    if state.accelerator.is_main_process:
        discard_checkpoints(state.replaced_checkpoints)
    state.replaced_checkpoints = []


def _load_vae(task: TrainingTask, device: torch.device, dtype: torch.dtype) -> AutoencoderKL | None:
    """The frozen VAE of latent training (None in pixel space), in ``dtype``; under float16 a VAE whose config has
    ``force_upcast`` (SDXL's overflows in float16) stays in float32, as diffusers' SDXL training script keeps it."""
    if task.vae_path is None:
        return None
    vae = load_strictly(AutoencoderKL, task.vae_path, task.vae_subfolder)  # no weight left random
    if dtype == torch.float16 and vae.config.force_upcast:
        dtype = torch.float32
    vae.to(device, dtype)
    vae.requires_grad_(False)
    return vae.eval()


def _saved_vae(state: RunState, on_device: bool = False) -> AutoencoderKL | None:
    """The VAE a saved pipeline holds: the task's VAE as its folder gives it, not the training copy cast to the
    mixed-precision dtype (saved, that copy is the VAE's weights rounded to bf16/fp16, which the pipeline decodes with);
    on the host for a save during training (no second VAE on a busy accelerator), on the training copy's device with
    ``on_device`` (the final grid decodes the networks' latents with it)."""
    if state.vae is None or state.vae.dtype == torch.float32:
        return state.vae
    device = state.vae.device if on_device else "cpu"
    return load_strictly(AutoencoderKL, state.task.vae_path, state.task.vae_subfolder).to(device).eval()


def _optimisation(
    args: argparse.Namespace,
    networks: dict[str, ModelMixin],
    accelerator: Accelerator,
    num_batches: int,
    ema_warmup: bool = True,
):
    """``(EMAs, AdamW, learning-rate schedule, optimisation steps)`` of ``networks`` (``num_batches`` per epoch);
    ``ema_warmup``: the task's EMA decay schedule (`TrainingTask.ema_warmup`)."""
    emas = {}
    for name, network in networks.items():
        if args.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            network.enable_xformers_memory_efficient_attention()
        if args.use_ema:
            # (without the warmup, `--ema_inv_gamma` / `--ema_power` are unset: EMAModel's defaults, never used)
            warmup = {"inv_gamma": args.ema_inv_gamma, "power": args.ema_power} if ema_warmup else {}
            emas[name] = EMAModel(
                network.parameters(), decay=args.ema_max_decay, use_ema_warmup=ema_warmup, **warmup,
                model_cls=type(network), model_config=network.config,
            )  # fmt: skip
            emas[name].to(accelerator.device)
    parameters = [p for network in networks.values() for p in network.parameters()]
    learning_rate = args.learning_rate
    if args.scale_lr:  # as diffusers' train_text_to_image.py: by the samples of one optimisation step
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        parameters, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )  # fmt: skip
    batches_per_process = math.ceil(num_batches / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    check_lr_schedule(args, max_train_steps, accelerator.num_processes)  # (`--num_epochs`: the steps known now)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    return emas, optimizer, lr_scheduler, max_train_steps


def _resume(state: RunState, resume_path: str | None, steps_per_epoch: int) -> tuple[int, int, int] | None:
    """``(global step, first epoch, batches to skip in it)`` after loading ``resume_path``; None when the run it
    belongs to is finished (nothing to do)."""
    accelerator, args, max_train_steps = state.accelerator, state.args, state.max_train_steps
    if resume_path is None:
        if args.resume_from_checkpoint is not None:
            accelerator.print(f"No checkpoint in {args.output_dir!r} yet: starting a new run.")
        return 0, 0, 0
    skipped = [os.path.basename(folder) for folder in skipped_checkpoints(resume_path)]
    accelerator.print(f"Resuming from {resume_path}" + (f" ({', '.join(skipped)}: incomplete)" if skipped else ""))
    global_step = checkpoint_step(resume_path)
    # finished: the final outputs are in the folder of the checkpoint, so only resuming into that folder has nothing
    # left to do (another run's checkpoint resumed into a new `--output_dir` writes its outputs there)
    own = os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), args.output_dir)
    finished = finished_step(resume_path)  # the step of the final outputs written after it, if any
    if own and finished is not None and finished == max(global_step, max_train_steps):
        outputs = "its final outputs" if finished == global_step else f"the final outputs of step {finished}"
        accelerator.print(
            f"Training is already complete: {resume_path} is step {global_step} of `--max_train_steps` "
            f"{max_train_steps} and {outputs} are written in {args.output_dir}. Nothing to do."
        )
        return None
    if own:
        state.last_checkpoint = resume_path
    check_same_sharding(resume_path, is_sharded(accelerator))
    check_same_process_count(resume_path, accelerator.num_processes)
    if is_sharded(accelerator):  # Accelerate loads the shards before the load hook's checks
        source = getattr(args, "pretrained_model_name_or_path", None)
        check_sharded_resume(resume_path, state.unwrapped(), state.noise_scheduler, state.task.partition, source)
    settings = optimizer_settings(state.optimizer)  # the run's: the load puts the checkpoint's in their place
    accelerator.load_state(resume_path)
    check_same_optimizer_settings(settings, optimizer_settings(state.optimizer), resume_path)
    first_epoch, done = divmod(global_step, steps_per_epoch)
    if global_step >= max_train_steps:  # killed before its final outputs: write them, train no further step
        accelerator.print(f"Training is complete at {resume_path}: writing its final outputs only.")
        first_epoch = math.ceil(max_train_steps / steps_per_epoch)
    return global_step, first_epoch, done * args.gradient_accumulation_steps


def _train_epochs(state: RunState, train_dataloader, sampler, start: tuple[int, int, int], steps_per_epoch) -> int:
    """Train from ``start`` = (global step, epoch, batches to skip) to `--max_train_steps`; returns the last step."""
    accelerator, args = state.accelerator, state.args
    global_step, first_epoch, skip_batches = start
    progress_bar = tqdm(
        total=state.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process
    )
    progress_bar.set_description("Steps")
    losses_log = LossLog(state.task.partition.num_stages, state.names, accelerator.device)
    for epoch in range(first_epoch, math.ceil(state.max_train_steps / steps_per_epoch)):
        for network in state.models:
            network.train()
        loader = train_dataloader
        offset = skip_batches if epoch == first_epoch else 0
        if offset:
            loader = accelerator.skip_first_batches(train_dataloader, offset)
        loader.set_epoch(epoch)  # the sampler's permutation and the augmentation keys of this epoch
        sampler.set_epoch(epoch)
        for step, batch in enumerate(loader):
            generator = step_generator(
                args.seed, accelerator.process_index, epoch * len(train_dataloader) + offset + step
            )
            with accelerator.accumulate(*state.models):
                draw, losses = _train_step(state, batch, generator)
            losses_log.add(state.task.partition.stage_for_noise_level(draw.timesteps), draw.network, losses)
            if not accelerator.sync_gradients:
                continue
            # an optimisation step is done: EMA, logs, checkpoint, sample grid
            global_step += 1
            _after_step(state, losses_log, global_step, progress_bar)
            if global_step >= state.max_train_steps:
                break
        if global_step >= state.max_train_steps:
            break
        if args.save_model_epochs and (epoch + 1) % args.save_model_epochs == 0 and accelerator.is_main_process:
            with state.ema_weights() as networks:
                publish_pipeline(
                    args.output_dir,
                    lambda folder: state.task.save(networks, state.sampling_scheduler, _saved_vae(state), folder),
                )  # all or nothing: the previous save stays complete until this one is
            logger.info(f"Saved the pipeline of epoch {epoch + 1} to {args.output_dir}")
            if args.push_to_hub:  # as diffusers' train_unconditional.py: each saved pipeline is pushed
                try:
                    _push(state, global_step, False, f"Epoch {epoch + 1}")
                except OSError as error:  # the network: training goes on, the final push uploads everything
                    logger.warning(f"{error} Training goes on; the push at the end of training sends this save too.")
    return global_step


def _push(state: RunState, steps: int, has_grid: bool, commit_message: str) -> None:
    """Push the output folder, with a model card for ``steps`` optimisation steps, to the run's Hub repository."""
    args = state.args
    api = LocalHubApi(args.hub_local_dir) if args.hub_local_dir else None
    description = model_card_text(args, state.task, steps, has_grid, mixed_precision=state.accelerator.mixed_precision,
                                  repo_id=state.hub_repo_id, num_processes=state.accelerator.num_processes)  # fmt: skip
    pushed = push_output_folder(args.output_dir, state.hub_repo_id, description, state.task.tags, api=api,
                                token=args.hub_token, class_conditional=args.class_conditional,
                                private=args.hub_private_repo, logging_dir=args.logging_dir,
                                commit_message=commit_message,
                                base_model=base_model(getattr(args, "pretrained_model_name_or_path", None)))  # fmt: skip
    logger.info(f"Pushed the outputs of {args.output_dir} to {pushed}")  # a commit URL, or `--hub_local_dir`'s folder


def _clean_samples(state: RunState, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """The batch's clean samples: images, or latents drawn from the VAE posterior and scaled as the task's pipeline
    decodes them (`TrainingTask.model_latents`: z = (E(x) - shift) * scale for the package's pipelines)."""
    vae = state.vae
    if "latent_parameters" in batch:
        posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(vae.dtype))
    elif vae is not None:
        with torch.no_grad():
            posterior = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist
    else:
        return batch["pixel_values"].float()
    return state.task.model_latents(vae, posterior.sample(generator)).float()


def _train_step(state: RunState, batch: dict, generator: torch.Generator):
    """One micro-step: the task's draw, its loss per sample, backward, and (when gradients sync) the update.
    Returns ``(draw, per-sample losses)``."""
    args, task = state.args, state.task
    # 1. clean samples and (classifier-free guidance) labels, some dropped to the null label
    clean = _clean_samples(state, batch, generator)
    batch_size = clean.shape[0]
    labels = None
    if task.uses_labels:
        labels = batch["labels"].clone()
        drop = torch.rand(batch_size, generator=generator) < args.class_dropout_prob
        labels[drop.to(labels.device)] = null_class_label(state.num_classes + 1)

    # 2. the task's plan: which sample goes to which network at which noise level, and its loss there
    draw = task.draw(batch_size, generator)
    noise = torch.randn((len(draw.rows), *clean.shape[1:]), generator=generator)
    if args.noise_offset:  # offset noise, as diffusers' train_text_to_image.py: one shift per sample and channel
        noise += args.noise_offset * torch.randn((len(draw.rows), clean.shape[1], 1, 1), generator=generator)
    noise = noise.to(clean.device)
    losses = torch.zeros(len(draw.rows), device=clean.device)
    for k, network in enumerate(state.models):
        sel = (draw.network == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        rows = draw.rows[sel].to(clean.device)
        part = task.loss(
            network, state.noise_scheduler, clean[rows], draw.timesteps[sel].to(clean.device), noise[sel],
            None if labels is None else labels[rows],
        )  # fmt: skip
        losses = losses.index_put((sel.to(clean.device),), part)

    # 3. backward and update (Accelerate skips the update while accumulating)
    state.accelerator.backward(losses.mean())
    if state.accelerator.sync_gradients and args.max_grad_norm > 0:
        parameters = [p for group in state.optimizer.param_groups for p in group["params"]]
        state.accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad()
    return draw, losses


def _after_step(state: RunState, losses_log: LossLog, global_step: int, progress_bar) -> None:
    """After optimisation step ``global_step``: EMA update, logs, checkpoint, sample grid."""
    accelerator, args = state.accelerator, state.args
    for name, network in zip(state.names, state.models):
        if name in state.emas:
            state.emas[name].step(network.parameters())
    progress_bar.update(1)
    logs = losses_log.reduce(accelerator)
    logs["lr"] = state.lr_scheduler.get_last_lr()[0]
    if state.emas:
        logs["ema_decay"] = next(iter(state.emas.values())).cur_decay_value
    progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    accelerator.log(logs, step=global_step)
    if global_step % args.checkpointing_steps == 0:
        path = save_checkpoint(
            accelerator, args.output_dir, global_step, args.checkpoints_total_limit, state.replaced_checkpoints
        )
        state.replaced_checkpoints = []  # deleted by the save, once this checkpoint was complete
        state.last_checkpoint = path
        logger.info(f"Saved state to {path}")
    if global_step % args.save_images_steps == 0 and global_step < state.max_train_steps:
        save_samples(state, global_step)


def _finish(state: RunState, global_step: int) -> None:
    """The trained pipeline (EMA weights), its last sample grid, the model card and the upload."""
    accelerator, args, task = state.accelerator, state.args, state.task
    accelerator.wait_for_everyone()
    trained = gathered_networks(accelerator, state.names, state.models)  # sharded (FSDP): every process joins
    if accelerator.is_main_process:
        for name, ema in state.emas.items():
            ema.copy_to(trained[name].parameters())
        # training is over: saved and sampled as the pipeline folder holds it
        state.vae = _saved_vae(state, on_device=True)
        publish_pipeline(
            args.output_dir, lambda folder: task.save(trained, state.sampling_scheduler, state.vae, folder)
        )
        for model in state.models:  # the last grid as the saved pipeline samples: without Accelerate's autocast
            accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        grid_path = save_samples(state, global_step, use_ema=False)  # the EMA weights are the networks' now
        if grid_path is not None:
            shutil.copyfile(grid_path, os.path.join(args.output_dir, "sample_grid.png"))
        grid = " and its last sample grid (sample_grid.png)" if grid_path is not None else ""
        logger.info(f"Saved the trained model{grid} to {args.output_dir}")
        _discard_replaced(state)  # this run saved no checkpoint: its final outputs replace the former run's
        # before the push: a failed upload leaves a finished run
        mark_finished(args.output_dir, global_step, state.last_checkpoint)
        if args.push_to_hub:  # the step the weights are of: a checkpoint past `--max_train_steps` is written as it is
            _push(state, global_step, grid_path is not None, "End of training")
    accelerator.end_training()


def save_assembled_experts(args: argparse.Namespace) -> str:
    """`--assemble_experts`: one `ExpertRoutingPipeline` from one-expert-per-run folders (after the pipeline whose
    experts they replace, if one is first), with a grid and a push."""
    from .tasks.experts import assemble_expert_runs, assembly_base

    hub_repo_id = create_hub_repo(args) if args.push_to_hub else None  # before assembling, as a training run
    pipeline = assemble_expert_runs(args.assemble_experts)
    os.makedirs(args.output_dir, exist_ok=True)
    publish_pipeline(args.output_dir, pipeline.save_pretrained)  # all or nothing, as the training runs' saves
    num_classes = num_data_classes(pipeline.experts.experts[0].config.num_class_embeds)
    grid, _ = sample_grid(pipeline, args, num_classes)
    grid.save(os.path.join(args.output_dir, "sample_grid.png"))
    print(f"Saved the assembled ExpertRoutingPipeline and its sample grid (sample_grid.png) to {args.output_dir}")
    if args.push_to_hub:
        base = assembly_base(args.assemble_experts)
        description = assembled_experts_card_text(args, pipeline, has_grid=True, repo_id=hub_repo_id, base=base)
        api = LocalHubApi(args.hub_local_dir) if args.hub_local_dir else None
        pushed = push_output_folder(args.output_dir, hub_repo_id, description, ["multi-expert", "meme"], api=api,
                                    token=args.hub_token, class_conditional=num_classes > 0,
                                    private=args.hub_private_repo)  # fmt: skip
        print(f"Pushed the outputs of {args.output_dir} to {pushed}")  # (no Accelerate state here: no `logger`)
    return args.output_dir
