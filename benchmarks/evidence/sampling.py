"""Sampling through the package's pipelines: images for the metric, wall time per image, FLOPs per image."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from diffusers import DDIMScheduler

from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline

from ..measure import interleaved_times
from .data import NUM_CLASSES


def sampling_scheduler() -> DDIMScheduler:
    """DDIM (Song et al. 2021, eq. 12, eta = 0) on the DDPM training schedule, first step at ``t = T - 1``."""
    return DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", clip_sample=True)


def single_model_pipeline(model: torch.nn.Module) -> ExpertRoutingPipeline:
    """A plain model behind the same sampling loop as every other method: a one-stage expert routing pipeline."""
    pipeline = ExpertRoutingPipeline(
        experts=ExpertRoutingModel([model], stage_boundaries=()), scheduler=sampling_scheduler()
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def balanced_labels(num_images: int) -> torch.Tensor:
    """Class labels ``0, 1, ..., 9, 0, 1, ...``: every class equally often."""
    return torch.arange(num_images) % NUM_CLASSES


@torch.no_grad()
def generate(pipeline, num_images: int, num_inference_steps: int, seed: int, batch_size: int = 500):
    """``num_images`` class-conditional samples in ``[-1, 1]`` and their labels (same seed, same images)."""
    labels = balanced_labels(num_images)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for chunk in labels.split(batch_size):
        out = pipeline(
            class_labels=chunk, num_inference_steps=num_inference_steps, generator=generator, output_type="pt"
        ).images
        chunks.append(out.cpu() * 2 - 1)  # the pipeline returns [0, 1]
    return torch.cat(chunks), labels


@torch.no_grad()
def seconds_per_image(
    pipelines: Mapping[str, object], num_inference_steps: int, batch_size: int, repeats: int
) -> dict[str, list[float]]:
    """Wall time per image of each pipeline in each of its ``repeats`` timed runs (their median is the time reported;
    their spread shows a load that hit some of them only); runs are interleaved (A, B, C, A, B, C, ...) so that
    machine load drifts hit every pipeline alike, after one warm-up run each. The pipelines must be on one device."""
    labels = balanced_labels(batch_size)

    def run(pipeline):
        seeds = itertools.count()  # a pipeline's k-th run (the warm-up is run 0) samples from seed k
        return lambda: pipeline(
            class_labels=labels,
            num_inference_steps=num_inference_steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(next(seeds)),
        )

    device = next((pipeline.device for pipeline in pipelines.values()), "cpu")  # all on one device
    seconds = interleaved_times({name: run(pipeline) for name, pipeline in pipelines.items()}, repeats, device)
    return {name: [value / batch_size for value in values] for name, values in seconds.items()}
