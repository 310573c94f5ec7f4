"""What a training run holds once prepared, and what it writes besides checkpoints: loss logs and sample grids."""

from __future__ import annotations

import argparse
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, SchedulerMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.training_utils import EMAModel
from diffusers.utils import is_tensorboard_available
from PIL import Image

from ..partition import exact_float
from .sharding import is_sharded
from .tasks import TrainingTask

logger = get_logger(__name__)

GRID_TILE_SIZE = 64  # smaller samples (8x8 digits) are upscaled to this, nearest-neighbour, so the grid shows them
MAX_GRID_ASPECT = 3  # a wider exact grid layout (a prime count's single row) is made near-square, with blank cells


@dataclass
class RunState:
    """Everything a training run holds once prepared: the steps, the logs, the sample grids and the saves read it."""

    accelerator: Accelerator
    args: argparse.Namespace
    task: TrainingTask
    names: list[str]  # one per network, in the order of `models`
    models: list[torch.nn.Module]  # the prepared (possibly DDP-wrapped) networks
    emas: dict[str, EMAModel]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    noise_scheduler: SchedulerMixin  # training
    sampling_scheduler: SchedulerMixin
    vae: AutoencoderKL | None
    weight_dtype: torch.dtype
    num_classes: int  # classes of the data, 0 when unconditional (the null label is index `num_classes`)
    max_train_steps: int
    replaced_checkpoints: list[str] = field(default_factory=list)  # `--overwrite_output_dir`: the former run's
    hub_repo_id: str | None = None  # `--push_to_hub`: the repository created, with the namespace the Hub gave it
    said_no_grid: bool = False  # a run whose networks do not sample alone says so once, at its first grid
    # the run's last checkpoint in `--output_dir` (saved, or resumed from): its final outputs are marked finished there
    last_checkpoint: str | None = None

    def unwrapped(self) -> dict[str, ModelMixin]:
        return {name: self.accelerator.unwrap_model(model) for name, model in zip(self.names, self.models)}

    @contextmanager
    def ema_weights(self, use_ema: bool = True):
        """The networks with their EMA weights swapped in (when `--use_ema` and ``use_ema``), restored after."""
        networks, emas = self.unwrapped(), self.emas if use_ema else {}
        for name, ema in emas.items():
            ema.store(networks[name].parameters())
            ema.copy_to(networks[name].parameters())
        try:
            yield networks
        finally:
            for name, ema in emas.items():
                ema.restore(networks[name].parameters())


@contextmanager
def eval_mode(networks: dict[str, torch.nn.Module]):
    """The networks in evaluation mode (no dropout), as a saved pipeline samples; their training modes restored after."""
    modes = {name: network.training for name, network in networks.items()}
    for network in networks.values():
        network.eval()
    try:
        yield networks
    finally:
        for name, network in networks.items():
            network.train(modes[name])


class LossLog:
    """The loss sums of each stage and each network since the last optimisation step, reduced over processes when
    logged: ``loss`` (all stages), ``loss/stage_<s>`` and, with several networks, ``loss/<network>`` (each only where
    it had samples since)."""

    def __init__(self, num_stages: int, names: list[str], device: torch.device):
        self.num_stages, self.names = num_stages, names
        # float64 where the device has it (Apple's MPS has none)
        self.sums = torch.zeros(2, num_stages + len(names), dtype=exact_float(device), device=device)

    def add(self, stages: torch.Tensor, networks: torch.Tensor, losses: torch.Tensor) -> None:
        groups = torch.cat([stages, self.num_stages + networks]).to(self.sums.device)
        detached = losses.detach().to(self.sums.device, self.sums.dtype)
        self.sums[0].index_add_(0, groups, torch.cat([detached, detached]))
        self.sums[1].index_add_(0, groups, torch.ones_like(groups, dtype=self.sums.dtype))

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """The means since the last call, over every process; the sums start again from zero."""
        num_stages, num_networks = self.num_stages, len(self.names)
        # one copy to the host (reading each value on its own would wait for an accelerator once per value)
        sums, counts = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        mean = [total / max(count, 1) for total, count in zip(sums, counts)]
        logs = {"loss": sum(sums[:num_stages]) / max(sum(counts[:num_stages]), 1)}
        logs.update({f"loss/stage_{s}": mean[s] for s in range(num_stages) if counts[s] > 0})
        if num_networks > 1:  # (a network without samples since the last call, like a stage, logs no loss, not 0)
            logs.update({f"loss/{name}": mean[num_stages + k] for k, name in enumerate(self.names)
                         if counts[num_stages + k] > 0})  # fmt: skip
        self.sums.zero_()
        return logs


def sample_generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    """The generators of the sample grid's images ``start`` to ``stop - 1``: image ``i``'s is seeded with
    ``seed + i`` (diffusers' idiom for reproducible batches), so an image does not depend on the chunk it is sampled
    in. One image of a grid is drawn again with ``generator=torch.Generator().manual_seed(seed + i)`` and its inputs."""
    return [torch.Generator().manual_seed(seed + i) for i in range(start, stop)]


def _chunk_inputs(inputs: dict, count: int, start: int, stop: int) -> dict:
    """The pipeline inputs of the grid's images ``start`` to ``stop - 1``: ``batch_size`` the chunk's size, and every
    per-image list (class labels, prompts: ``count`` entries) sliced; other values as given."""
    chunk = {}
    for key, value in inputs.items():
        if key == "batch_size":
            value = stop - start
        elif isinstance(value, (list, tuple)) and len(value) == count:
            value = list(value[start:stop])
        chunk[key] = value
    return chunk


def sample_grid(pipeline, args: argparse.Namespace, num_classes: int, inputs: dict | None = None) -> tuple:
    """``(PIL grid, images as NHWC array)`` of ``--num_sample_images`` samples; ``inputs`` are the pipeline's
    conditioning arguments for all of them (default: ``batch_size`` and the class labels ``0, 1, ...``, cycling over
    the ``num_classes`` classes), their per-image lists split with the images.

    The images are sampled in pipeline calls of at most ``--eval_batch_size`` images (the memory the sampling and the
    VAE decode need grows with it), each image with its own generator (`sample_generators`: ``--seed`` + its index), so
    the grid is the same whatever the chunk size. The grid's layout is `grid_shape`'s; samples under `GRID_TILE_SIZE`
    pixels are upscaled nearest-neighbour in it (the array keeps their own size)."""
    count, chunk_size = args.num_sample_images, args.eval_batch_size
    if inputs is None:
        inputs = {
            "batch_size": count,
            "class_labels": [i % num_classes for i in range(count)] if num_classes else None,
        }
    pipeline.set_progress_bar_config(disable=True)
    images = None  # filled chunk by chunk: no chunk's outputs are held once copied in
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        chunk = pipeline(
            **_chunk_inputs(inputs, count, start, stop), generator=sample_generators(args.seed, start, stop),
            num_inference_steps=args.num_inference_steps, output_type="np",
        ).images  # fmt: skip
        if images is None:
            images = np.empty((count, *chunk.shape[1:]), dtype=chunk.dtype)
        images[start:stop] = chunk
        del chunk
    pil = pipeline.numpy_to_pil(images)
    scale = math.ceil(GRID_TILE_SIZE / min(pil[0].size))
    if scale > 1:  # whole pixels, no blur: each sample pixel becomes a scale x scale block
        pil = [image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) for image in pil]
    rows, cols = grid_shape(count)
    width, height = pil[0].size
    grid = Image.new("RGB", (cols * width, rows * height))  # cells past the last image stay blank (black)
    for i, image in enumerate(pil):
        grid.paste(image, box=(i % cols * width, i // cols * height))
    return grid, images


def grid_shape(count: int) -> tuple[int, int]:
    """``(rows, columns)`` of a sample grid of ``count`` images, row by row: the most square exact layout (16: 4 x 4,
    10: 2 x 5) unless it is more than `MAX_GRID_ASPECT` times as wide as tall (a prime count: one row), then
    ``ceil(sqrt(count))`` columns with the last cells blank (7: 3 x 3, 17: 4 x 5)."""
    rows = max(r for r in range(1, math.isqrt(count) + 1) if count % r == 0)
    if count // rows <= MAX_GRID_ASPECT * rows:
        return rows, count // rows
    cols = math.isqrt(count - 1) + 1  # ceil(sqrt(count))
    return math.ceil(count / cols), cols


def save_samples(state: RunState, step: int, use_ema: bool = True) -> str | None:
    """Sample a grid with the current (EMA) weights on the main process: ``samples/step_<N>.png`` and the tracker."""
    accelerator, args = state.accelerator, state.args
    if not accelerator.is_main_process or is_sharded(accelerator):  # sharded: no process holds the whole network
        return None
    with state.ema_weights(use_ema) as networks, eval_mode(networks):  # sampled as the saved pipeline samples
        pipeline = state.task.pipeline(networks, state.sampling_scheduler, state.vae)
        if pipeline is None:
            if not state.said_no_grid:
                logger.info(
                    f"No sample grid (`--save_images_steps`, sample_grid.png): {state.task.no_sampler_reason()}."
                )
                state.said_no_grid = True
            return None
        inputs = state.task.sample_inputs(args.num_sample_images)
        grid, images = sample_grid(pipeline, args, state.num_classes, inputs)
    path = os.path.join(args.output_dir, "samples", f"step_{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    if args.logger == "tensorboard" and is_tensorboard_available():
        accelerator.get_tracker("tensorboard").writer.add_images("samples", images, step, dataformats="NHWC")
    elif args.logger == "wandb":
        import wandb

        captions = sample_captions(inputs, len(images), state.num_classes, state.task.class_names)
        samples = [wandb.Image(image, caption=caption) for image, caption in zip(images, captions)]
        accelerator.get_tracker("wandb").log({"samples": samples}, step=step)
    return path


def sample_captions(inputs: dict | None, count: int, num_classes: int, class_names: list[str]) -> list[str | None]:
    """The caption of each of a grid's ``count`` images, ``"<index>: <what it was sampled for>"`` (as diffusers'
    train_text_to_image.py captions its validation images on wandb): its prompt (``inputs``' ``prompt`` list), else
    its class (``i % num_classes``, named by ``class_names`` when the data's classes have names); None for an
    unconditional image."""
    if inputs is not None and isinstance(inputs.get("prompt"), list):
        return [f"{i}: {prompt}" for i, prompt in enumerate(inputs["prompt"])]
    if inputs is None and num_classes:
        names = class_names if len(class_names) == num_classes else [f"class {c}" for c in range(num_classes)]
        return [f"{i}: {names[i % num_classes]}" for i in range(count)]
    return [None] * count
