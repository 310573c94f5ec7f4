"""The demo's steps, in order (see the package docstring); each prints what it does and shows a progress bar."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..evaluation import Evaluator, train_classifier
from ..pipelines import DualBackbonePipeline, ExpertRoutingPipeline, MultiStagePipeline
from ..planning import NoiseSchedule, plan_stages, stage_difficulty, suggest_decoder_widths
from ..training.checkpointing import publish_pipeline
from . import NUM_EXPERTS, header_lines
from .methods import UNET_SHAPE, assemble_dual_backbone, methods, train_method, write_image_folder, write_unet_config
from .report import Row, markdown_table, sampling_scheduler, save_grid, save_plot, score, write_report

NUM_STAGES = 3


def say(start: float, text: str) -> None:
    print(f"[demo {time.perf_counter() - start:6.1f}s] {text}", flush=True)


def load_digits_split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sklearn's 1,797 digits as 8-bit images (pixel values 0..16 -> 0..255), split 80/20 by a fixed permutation:
    ``{"train": (images, labels), "test": (images, labels)}``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    cut = int(0.8 * len(order))
    return {
        name: (images[index], digits.target[index]) for name, index in (("train", order[:cut]), ("test", order[cut:]))
    }


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """8-bit images ``(N, H, W)`` as the models see them: ``(N, 1, H, W)`` in ``[-1, 1]``."""
    return torch.from_numpy(images).float()[:, None] / 127.5 - 1.0


def balanced_indices(labels: np.ndarray, count: int, num_classes: int = 10) -> np.ndarray:
    """Indices of the first ``count // num_classes`` images of each class: a class-balanced subset of ``count``
    images, as the methods' samples are (FD-classifier depends on the sample count: the floor is scored on as many)."""
    per_class = count // num_classes
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
    if any(len(c) < per_class for c in chosen):
        raise ValueError(f"`count` {count}: the held-out split has fewer than {per_class} images of some class.")
    return np.sort(np.concatenate(chosen))


def prepare(args: argparse.Namespace, settings: dict, start: float) -> tuple[str, Evaluator, dict, torch.Tensor]:
    """Step 1: the image folder, the metric and its floor (held-out real digits)."""
    split = load_digits_split()
    images, labels = split["train"]
    say(start, f"[1/5] sklearn digits: {len(images)} training and {len(split['test'][0])} held-out 8x8 images")
    os.makedirs(args.output_dir, exist_ok=True)
    data_dir = write_image_folder(images, labels, os.path.join(args.output_dir, "training_images"))
    train_images = as_tensor(images)
    say(start, "      training the metric's classifier (FD-classifier: Frechet distance on its features)")
    classifier = train_classifier(
        train_images, torch.from_numpy(labels).long(), seed=0, max_steps=settings["classifier_steps"],
        progress_bar=True,
    )  # fmt: skip
    evaluator = Evaluator(classifier, train_images)
    test_images, test_labels = split["test"]
    index = balanced_indices(test_labels, settings["num_eval_images"])  # as many as each method's samples
    floor = evaluator.score(as_tensor(test_images[index]), torch.from_numpy(test_labels[index]).long())
    floor["count"] = len(index)
    say(start, f"      held-out real digits score FD-classifier {floor['fd']:.2f}, accuracy {floor['accuracy']:.3f}")
    return data_dir, evaluator, floor, train_images


def plan(train_images: torch.Tensor, settings: dict, start: float) -> tuple[list[float], tuple]:
    """Step 2: stage boundaries (optimal-denoiser method) and decoder widths for the multi-stage U-Net."""
    say(start, f"[2/5] planning {NUM_STAGES} stages with the optimal-denoiser algorithm (Zhang et al., Algorithm 1)")
    generator = torch.Generator().manual_seed(settings["seed"])
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 100)
    subset = train_images[torch.randperm(len(train_images), generator=generator)[: settings["plan_images"]]]
    found = plan_stages(
        subset, schedule, NUM_STAGES, num_samples=settings["plan_samples"], generator=generator,
        device="cpu", progress_bar=True,
    )  # fmt: skip
    boundaries = [float(b) for b in found.partition.boundaries]
    difficulty = stage_difficulty(subset, schedule, found.partition)
    widths = suggest_decoder_widths(UNET_SHAPE["block_out_channels"], difficulty, UNET_SHAPE["norm_num_groups"])
    say(start, f"      stage boundaries (training timesteps, of 1000): {[round(b) for b in boundaries]}")
    say(start, f"      decoder widths, clean stage first: {[list(w) for w in widths]} (encoder "
               f"{list(UNET_SHAPE['block_out_channels'])})")  # fmt: skip
    return boundaries, widths


PIPELINES = {"unet2d": ExpertRoutingPipeline, "multistage": MultiStagePipeline, "dual_backbone": DualBackbonePipeline,
             "experts": ExpertRoutingPipeline}  # fmt: skip


def train_all(args, settings, data_dir, boundaries, widths, start) -> list[tuple]:
    """Step 3: every method through the package's training loop, on its share of the budget B (see `methods`)."""
    config = write_unet_config(os.path.join(args.output_dir, "training_images", "unet_config.json"))
    trained, budget = [], None
    for i, method in enumerate(methods(boundaries, widths, NUM_EXPERTS, config)):
        say(start, f"[3/5] training {method.name} ({i + 1}/4): {method.summary}")
        steps, flops, folder = train_method(method, data_dir, args.output_dir, budget, settings)
        say(start, f"      {steps} steps, {flops / 1e12:.3f} training TFLOPs, saved to {folder}")
        if budget is None:
            budget, baseline_folder = flops, folder  # the baseline (first) sets B
        elif method.folder == "dual_backbone":
            assemble_dual_backbone(folder, baseline_folder)
            flops += budget  # its deep U-Net is the baseline: B more
            say(start, f"      with the baseline as its deep U-Net: {flops / 1e12:.3f} training TFLOPs in all")
        trained.append((method, steps, flops, folder))
    return trained


def evaluate_all(args, settings, trained, evaluator, start) -> list[Row]:
    """Step 4: reload each saved pipeline, give it the shared sampling scheduler (saved with it), sample, score,
    time, and draw its grid."""
    rows = []
    for method, steps, flops, folder in trained:
        say(start, f"[4/5] sampling {method.name}: {settings['num_eval_images']} images, DDPM "
                   f"{settings['num_inference_steps']} steps, seed {settings['seed']}")  # fmt: skip
        pipeline = PIPELINES[method.folder].from_pretrained(folder)
        pipeline.scheduler = sampling_scheduler(pipeline.scheduler.config)
        # what `from_pretrained(folder)` gives now samples exactly as here; all or nothing: a failure leaves the
        # training's save as it was
        publish_pipeline(folder, pipeline.save_pretrained)
        pipeline.to(args.device)
        result, images = score(pipeline, evaluator, settings)
        params = sum(p.numel() for m in pipeline.components.values() if isinstance(m, torch.nn.Module)
                     for p in m.parameters())  # fmt: skip
        rows.append(Row(method.name, method.summary, params, steps, flops / 1e12, result["fd"], result["accuracy"],
                        result["seconds"] * 1e3, result["flops"] / 1e6, method.folder))  # fmt: skip
        save_grid(images, os.path.join(args.output_dir, f"grid_{method.folder}.png"),
                  f"{method.name}: FD-classifier {result['fd']:.1f}, accuracy {result['accuracy']:.2f}")  # fmt: skip
        say(start, f"      FD-classifier {result['fd']:.2f}, accuracy {result['accuracy']:.3f}, "
                   f"{result['seconds'] * 1e3:.2f} ms/image")  # fmt: skip
    return rows


def run_demo(args: argparse.Namespace, settings: dict, start: float) -> list[Row]:
    """The whole demo; returns the report's rows."""
    torch.set_num_threads(args.num_threads)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the training loop's Accelerator: CPU even where CUDA exists
    data_dir, evaluator, floor, train_images = prepare(args, settings, start)
    boundaries, widths = plan(train_images, settings, start)
    trained = train_all(args, settings, data_dir, boundaries, widths, start)
    rows = evaluate_all(args, settings, trained, evaluator, start)
    say(start, "[5/5] writing the plot and REPORT.md")
    save_plot(rows, floor, os.path.join(args.output_dir, "quality_vs_time.png"))
    table = markdown_table(rows, floor)
    minutes = (time.perf_counter() - start) / 60
    write_report(args.output_dir, header_lines(args, settings, minutes), rows, floor, table)
    print("\n" + table + "\n")
    say(start, f"done in {minutes:.1f} min. Everything is in {os.path.abspath(args.output_dir)}")
    return rows
