"""The one training loop of the three training scripts (multi-stage, experts, dual backbone), on Accelerate.

It runs unchanged on one CPU, one GPU, or several GPUs/machines (`accelerate launch`, DDP): every network is
forwarded exactly once per step, with samples of every stage it owns, so DDP needs no `find_unused_parameters`.
The randomness of a step (timesteps, noise, label dropout, VAE posterior draws) comes from a generator seeded by
``(seed, process, micro-step)``, and the data order and augmentation from ``(seed, epoch, index)``, so a run
resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import is_tensorboard_available, make_image_grid
from tqdm.auto import tqdm

from .args import check_args
from .checkpointing import (
    checkpoint_folders,
    checkpoint_step,
    discard_checkpoint,
    is_complete,
    is_finished,
    mark_finished,
    register_checkpoint_hooks,
    remove_leftovers,
    resolve_resume_checkpoint,
    save_checkpoint,
    skipped_checkpoints,
)
from .data import EpochShuffleSampler, TrainingImages, encode_latent_cache, hf_dataset_records, image_folder_records
from .hub import LocalHubApi, push_output_folder
from .loss import diffusion_loss
from .tasks import TrainingTask, noise_schedulers

logger = get_logger(__name__)


def vae_shape(args: argparse.Namespace) -> tuple[int, int]:
    """``(channels, down-sampling factor)`` of the training samples: `--vae_path`'s latents, read from its config
    only, or RGB pixels ``(3, 1)``."""
    if args.vae_path is None:
        return 3, 1
    try:
        config = AutoencoderKL.load_config(args.vae_path, subfolder=args.vae_subfolder)
    except (OSError, ValueError) as error:
        raise ValueError(f"`--vae_path` {args.vae_path!r} is not an AutoencoderKL folder: {error}") from None
    return config["latent_channels"], 2 ** (len(config["block_out_channels"]) - 1)


def step_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """The generator of one micro-step on one process: a pure function of the three, so resuming needs no state."""
    state = np.random.SeedSequence([seed, process_index, micro_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_grid(pipeline, args: argparse.Namespace, num_classes: int) -> tuple:
    """``(PIL grid, images as NHWC array)`` of ``--num_sample_images`` samples, seeded by ``--seed``."""
    count = args.num_sample_images
    labels = [i % num_classes for i in range(count)] if num_classes else None
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        batch_size=count, generator=torch.Generator().manual_seed(args.seed), num_inference_steps=args.num_inference_steps,
        output_type="np", class_labels=labels,
    ).images  # fmt: skip
    cols = max(c for c in range(1, math.isqrt(count) + 1) if count % c == 0)
    pil = pipeline.numpy_to_pil(images)
    return make_image_grid(pil, rows=cols, cols=count // cols), images


def parse_and_check(parser: argparse.ArgumentParser, task_class: type[TrainingTask], argv=None) -> argparse.Namespace:
    """Parse a script's arguments and run every check that needs no training; a problem exits with a usage error."""
    args = parser.parse_args(argv)
    try:
        task = task_class(args)  # a pretrained source's VAE becomes `--vae_path` here, before `vae_shape` reads it
        check_args(args, task.partition, task.downsampling * vae_shape(args)[1])
    except ValueError as error:
        parser.error(str(error))
    return args


def train(args: argparse.Namespace, task: TrainingTask) -> str:
    """Train ``task``'s networks as ``args`` says; returns the output folder (a `save_pretrained` pipeline)."""
    # 1. every check that needs no training: arguments, data source, VAE config, data vs. networks, output folder
    in_channels, vae_factor = vae_shape(args)
    check_args(args, task.partition, task.downsampling * vae_factor)
    if args.train_data_dir is not None:
        records = image_folder_records(args.train_data_dir, args.class_conditional)
    else:
        records = hf_dataset_records(
            args.dataset_name, args.class_conditional, args.dataset_config_name, args.image_column, args.label_column,
            args.cache_dir,
        )  # fmt: skip
    num_class_embeds = records.num_classes + 1 if args.class_conditional else None  # last index = null label
    task.check_data(in_channels, args.resolution // vae_factor, num_class_embeds)
    existing = checkpoint_folders(args.output_dir)
    if existing and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise ValueError(
            f"`--output_dir` {args.output_dir!r} already holds checkpoints ({os.path.basename(existing[-1])}): pass "
            "`--resume_from_checkpoint latest` to continue, or `--overwrite_output_dir` to start again."
        )
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)

    # 2. accelerator, logging, seeds (the same initial weights on every process)
    log_with = None
    if args.logger == "tensorboard":
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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(
            f"{launched} processes were launched but Accelerate runs {accelerator.num_processes}: on CPU, launch with "
            "`ACCELERATE_USE_CPU=true` set (e.g. `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...`)."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.logger == "tensorboard" and log_with is None:
        logger.warning("TensorBoard is not installed: training without logs (`pip install tensorboard`).")
    if accelerator.is_main_process:
        for name in remove_leftovers(args.output_dir):
            logger.info(f"Removed {name}, left in {args.output_dir} by a run killed while saving a checkpoint.")
        if existing and args.overwrite_output_dir and resume_path is None:
            for folder in existing:
                discard_checkpoint(folder)
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    # 3. data: images, or VAE latents (encoded every step, or once up front)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae = None
    if args.vae_path is not None:
        vae = AutoencoderKL.from_pretrained(args.vae_path, subfolder=args.vae_subfolder).to(
            accelerator.device, weight_dtype
        )
        vae.requires_grad_(False)
        vae.eval()
    if args.cache_latents:
        dataset = encode_latent_cache(records, vae, args.resolution, args.random_flip, args.seed)
    else:
        dataset = TrainingImages(records, args.resolution, args.center_crop, args.random_flip, args.seed)
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=sampler, num_workers=args.dataloader_num_workers
    )

    # 4. networks, EMA, optimizer, learning-rate schedule
    networks = task.build_networks(in_channels, args.resolution // vae_factor, num_class_embeds)
    names = list(networks)
    emas = {}
    for name, network in networks.items():
        if args.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        if args.use_ema:
            emas[name] = EMAModel(
                network.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                power=args.ema_power, model_cls=type(network), model_config=network.config,
            )  # fmt: skip
            emas[name].to(accelerator.device)
    parameters = [p for network in networks.values() for p in network.parameters()]
    optimizer = torch.optim.AdamW(
        parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )  # fmt: skip
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )  # fmt: skip

    # 5. prepare, checkpoint hooks (save_pretrained folders), resume
    *models, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *networks.values(), optimizer, train_dataloader, lr_scheduler
    )
    register_checkpoint_hooks(accelerator, names, emas)
    noise_scheduler, sampling_scheduler = noise_schedulers(args, task.scheduler_config)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_path is not None:
        skipped = [os.path.basename(folder) for folder in skipped_checkpoints(resume_path)]
        accelerator.print(f"Resuming from {resume_path}" + (f" ({', '.join(skipped)}: incomplete)" if skipped else ""))
        global_step = checkpoint_step(resume_path)
        if global_step >= max_train_steps and is_finished(resume_path):
            accelerator.print(
                f"Training is already complete: {resume_path} is step {global_step} of `--max_train_steps` "
                f"{max_train_steps} and its final outputs are written in {args.output_dir}. Nothing to do."
            )
            return args.output_dir
        accelerator.load_state(resume_path)
        first_epoch, done = divmod(global_step, steps_per_epoch)
        skip_batches = done * args.gradient_accumulation_steps
        if global_step >= max_train_steps:  # killed before its final outputs: write them, train no further step
            accelerator.print(f"Training is complete at {resume_path}: writing its final outputs only.")
            first_epoch = num_epochs
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint in {args.output_dir!r} yet: starting a new run.")
    if accelerator.is_main_process:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(os.path.basename(os.path.normpath(args.output_dir)), config=config)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** {task.method}: {len(dataset)} examples, {num_epochs} epochs, batch {args.train_batch_size} per "
        f"device ({total_batch} in total), {max_train_steps} optimisation steps *****"
    )
    progress_bar = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    progress_bar.set_description("Steps")
    num_stages, num_networks = task.partition.num_stages, len(models)
    sums = torch.zeros(2, num_stages + num_networks, dtype=torch.float64, device=accelerator.device)
    scale = vae.config.scaling_factor if vae is not None else 1.0
    shift = (getattr(vae.config, "shift_factor", None) or 0.0) if vae is not None else 0.0

    # 6. training loop
    for epoch in range(first_epoch, num_epochs):
        for network in models:
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
            with accelerator.accumulate(*models):
                # 6a. clean samples: images, or latents z = (E(x) - shift) * scale
                if "latent_parameters" in batch:
                    posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(weight_dtype))
                    clean = (posterior.sample(generator) - shift) * scale
                elif vae is not None:
                    with torch.no_grad():
                        posterior = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
                    clean = (posterior.sample(generator) - shift) * scale
                else:
                    clean = batch["pixel_values"]
                clean = clean.float()
                batch_size = clean.shape[0]
                labels = None
                if args.class_conditional:
                    labels = batch["labels"].clone()
                    drop = torch.rand(batch_size, generator=generator) < args.class_dropout_prob
                    labels[drop.to(labels.device)] = num_class_embeds - 1  # classifier-free guidance: null label

                # 6b. the task's plan: which sample goes to which network at which noise level
                draw = task.draw(batch_size, generator)
                noise = torch.randn((len(draw.rows), *clean.shape[1:]), generator=generator).to(clean.device)
                losses = torch.zeros(len(draw.rows), device=clean.device)
                for k, network in enumerate(models):
                    sel = (draw.network == k).nonzero().squeeze(1)
                    if sel.numel() == 0:
                        continue
                    rows = draw.rows[sel].to(clean.device)
                    part = diffusion_loss(
                        network, noise_scheduler, clean[rows], draw.timesteps[sel].to(clean.device), noise=noise[sel],
                        class_labels=None if labels is None else labels[rows], snr_gamma=args.snr_gamma,
                    )  # fmt: skip
                    losses = losses.index_put((sel.to(clean.device),), part)
                loss = losses.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # 6c. per-stage and per-network loss sums, reduced over processes at logging time
            groups = torch.cat([task.partition.stage_index(draw.timesteps), num_stages + draw.network]).to(sums.device)
            detached = losses.detach().double()
            sums[0].index_add_(0, groups, torch.cat([detached, detached]))
            sums[1].index_add_(0, groups, torch.ones_like(groups, dtype=torch.float64))
            if not accelerator.sync_gradients:
                continue

            # 6d. an optimisation step is done: EMA, logs, checkpoint, sample grid
            for name, network in zip(names, models):
                if name in emas:
                    emas[name].step(network.parameters())
            global_step += 1
            progress_bar.update(1)
            totals = accelerator.reduce(sums.clone(), reduction="sum")
            mean = (totals[0] / totals[1].clamp(min=1)).tolist()
            loss_mean = totals[0, :num_stages].sum().item() / max(totals[1, :num_stages].sum().item(), 1)
            logs = {"loss": loss_mean, "lr": lr_scheduler.get_last_lr()[0]}
            logs.update({f"loss/stage_{s}": mean[s] for s in range(num_stages) if totals[1, s] > 0})
            logs.update({f"loss/{names[k]}": mean[num_stages + k] for k in range(num_networks) if num_networks > 1})
            if emas:
                logs["ema_decay"] = next(iter(emas.values())).cur_decay_value
            sums.zero_()
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                path = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                logger.info(f"Saved state to {path}")
            if global_step % args.save_images_steps == 0 and global_step < max_train_steps:
                _save_samples(
                    accelerator, task, models, names, emas, sampling_scheduler, vae, args, records, global_step
                )
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break

    # 7. the trained pipeline (EMA weights), its last sample grid, the model card and the upload
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = {name: accelerator.unwrap_model(model) for name, model in zip(names, models)}
        for name, ema in emas.items():
            ema.copy_to(trained[name].parameters())
        task.save(trained, sampling_scheduler, vae, args.output_dir)
        grid_path = _save_samples(
            accelerator, task, models, names, {}, sampling_scheduler, vae, args, records, global_step
        )
        if grid_path is not None:
            shutil.copyfile(grid_path, os.path.join(args.output_dir, "sample_grid.png"))
        if args.push_to_hub:
            api = LocalHubApi(args.hub_local_dir) if args.hub_local_dir else None
            description = model_card_text(args, task, max_train_steps, grid_path is not None)
            push_output_folder(args.output_dir, args.hub_model_id, description, task.tags, api=api,
                               token=args.hub_token, private=args.hub_private_repo)  # fmt: skip
        last = os.path.join(args.output_dir, f"checkpoint-{global_step}")
        if is_complete(last):  # resuming from it has nothing left to do
            mark_finished(last)
    accelerator.end_training()
    return args.output_dir


def save_assembled_experts(args: argparse.Namespace) -> str:
    """`--assemble_experts`: one `ExpertRoutingPipeline` from one-expert-per-run folders, with a grid and a push."""
    from .tasks import assemble_expert_runs

    pipeline = assemble_expert_runs(args.assemble_experts)
    os.makedirs(args.output_dir, exist_ok=True)
    pipeline.save_pretrained(args.output_dir)
    num_classes = (pipeline.experts.experts[0].config.num_class_embeds or 1) - 1
    grid, _ = sample_grid(pipeline, args, num_classes)
    grid.save(os.path.join(args.output_dir, "sample_grid.png"))
    if args.push_to_hub:
        description = (
            "Independent denoisers, one per interval of the noise schedule (MEME, Lee et al., AAAI 2024), each "
            f"trained in its own run and assembled from {len(args.assemble_experts)} runs.\n\n"
            f"Stage boundaries: {list(pipeline.experts.partition.boundaries)} ({pipeline.experts.partition.units})."
        )
        api = LocalHubApi(args.hub_local_dir) if args.hub_local_dir else None
        push_output_folder(args.output_dir, args.hub_model_id, description, ["multi-expert", "meme"], api=api,
                           token=args.hub_token, private=args.hub_private_repo)  # fmt: skip
    return args.output_dir


def _save_samples(accelerator, task, models, names, emas, scheduler, vae, args, records, step) -> str | None:
    """Sample a grid with the current (EMA) weights on the main process: ``samples/step_<N>.png`` and TensorBoard."""
    if not accelerator.is_main_process:
        return None
    trained = {name: accelerator.unwrap_model(model) for name, model in zip(names, models)}
    pipeline = task.pipeline(trained, scheduler, vae)
    if pipeline is None:
        return None
    for name, ema in emas.items():
        ema.store(trained[name].parameters())
        ema.copy_to(trained[name].parameters())
    try:
        grid, images = sample_grid(pipeline, args, records.num_classes if args.class_conditional else 0)
    finally:
        for name, ema in emas.items():
            ema.restore(trained[name].parameters())
    path = os.path.join(args.output_dir, "samples", f"step_{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    if args.logger == "tensorboard" and is_tensorboard_available():
        accelerator.get_tracker("tensorboard").writer.add_images("samples", images, step, dataformats="NHWC")
    return path


def model_card_text(args: argparse.Namespace, task: TrainingTask, steps: int, has_grid: bool) -> str:
    """The model card's description: the method, its stages, how it was trained, how to sample, a sample grid."""
    data = args.train_data_dir and os.path.basename(os.path.normpath(args.train_data_dir)) or args.dataset_name
    space = f"latent space of `{args.vae_path}`" if args.vae_path else "pixel space"
    lines = [
        f"# {args.hub_model_id}",
        "",
        (
            f"A **{task.method}** diffusion model trained with "
            "[diffusers-stages](https://pypi.org/project/diffusers-stages/) on the Accelerate training scripts."
        ),
        "",
        task.description(),
        "",
        "## Training settings",
        "",
        f"- data: {data}, {args.resolution}x{args.resolution}, {space}"
        + (", class-conditional (last class embedding = unconditional)" if args.class_conditional else ""),
        (
            f"- noise schedule: {'EDM (sigma)' if args.boundary_units == 'sigma' else f'DDPM, {args.ddpm_num_steps} steps, {args.ddpm_beta_schedule}'}"
            f", prediction type `{args.prediction_type}`"
        ),
        (
            f"- {steps} optimisation steps, batch {args.train_batch_size} per device x {args.gradient_accumulation_steps} "
            f"accumulation, AdamW lr {args.learning_rate:g} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)"
        ),
        f"- mixed precision: {args.mixed_precision or 'no'}, EMA: {'yes' if args.use_ema else 'no'}, seed {args.seed}",
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers_stages import StagedDiffusionPipeline  # needs diffusers-stages installed",
        "",
        f'pipe = StagedDiffusionPipeline.from_pretrained("{args.hub_model_id}")  # runs no code from the repository',
        f"image = pipe({'class_labels=[0]' if args.class_conditional else 'batch_size=1'}).images[0]",
        "```",
    ]
    if has_grid:
        lines += ["", "## Samples", "", "![samples](sample_grid.png)"]
    return "\n".join(lines)
