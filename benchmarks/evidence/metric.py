"""The quality metric: "FD-classifier", the library's Frechet distance on the features of a small classifier trained
on the data (`diffusers_stages.evaluation`), here trained once per data set and seed and cached as safetensors.

Scores are comparable only within one data set and one sample count: they are not FID.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from diffusers_stages.evaluation import Evaluator, FeatureClassifier
from diffusers_stages.evaluation import train_classifier as train_on_images

from .data import NUM_CLASSES, load_images

__all__ = ["Evaluator", "FeatureClassifier", "real_image_floor", "train_classifier"]


def train_classifier(
    dataset: str,
    cache_dir: str,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 128,
    max_steps: int = 1000,
    width: int = 16,
) -> FeatureClassifier:
    """Train the feature classifier on ``dataset``'s training split of ``seed`` (the split the benchmark scores
    against, so that its test images stay held out), or load it from ``cache_dir``. The cache is keyed on the
    settings, the classifier's architecture and the training images and labels themselves (a changed data file or
    another split never reuses a stale classifier)."""
    images, labels = load_images(dataset, "train", seed=seed)
    settings = {
        "dataset": dataset,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "max_steps": max_steps,
        "width": width,
        "architecture": repr(
            FeatureClassifier(images.shape[-1], images.shape[1], width=width, num_classes=NUM_CLASSES)
        ),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for tensor in (images, labels):
        digest.update(tensor.contiguous().numpy().tobytes())
    key = digest.hexdigest()[:12]
    os.makedirs(cache_dir, exist_ok=True)
    return train_on_images(
        images, labels, seed=seed, epochs=epochs, batch_size=batch_size, max_steps=max_steps, width=width,
        num_classes=NUM_CLASSES, cache_path=os.path.join(cache_dir, f"classifier-{dataset}-{key}.safetensors"),
    )  # fmt: skip


def real_image_floor(
    evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor, count: int, seed: int = 0, draws: int = 4
) -> dict:
    """The metric's floor at ``count`` samples (the generated sets' count: the Frechet distance falls with it, about
    as 1 / count): held-out real ``images`` scored as a generated set, classes in turn as the generated labels.

    With fewer than ``count`` held-out images, the distance is extrapolated linearly in 1 / n to ``count`` from the
    whole set and ``draws`` seeded subsets of 1/2 and 3/4 of it (as FID-infinity, Chong & Forsyth, CVPR 2020), and
    the accuracy is the whole set's. Returns ``fd``, ``accuracy``, ``count``, ``held_out`` (images available) and
    ``extrapolated``."""
    held_out = len(images)
    if held_out >= count:
        rank = torch.empty_like(labels)  # each image's place within its class
        for label in labels.unique():
            members = torch.nonzero(labels == label)[:, 0]
            rank[members] = torch.arange(len(members))
        index = torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)[:count]  # classes in turn
        score = evaluator.score(images[index], labels[index])
        return {**score, "count": count, "held_out": held_out, "extrapolated": False}
    whole = evaluator.score(images, labels)
    generator = torch.Generator().manual_seed(seed)
    sizes, fds = [held_out], [whole["fd"]]
    for size in (held_out // 2, 3 * held_out // 4):
        for _ in range(draws):
            sizes.append(size)
            fds.append(evaluator.score(images[torch.randperm(held_out, generator=generator)[:size]])["fd"])
    inverse = torch.tensor(sizes, dtype=torch.float64).reciprocal()
    design = torch.stack([torch.ones_like(inverse), inverse], dim=1)
    intercept, slope = torch.linalg.lstsq(design, torch.tensor(fds, dtype=torch.float64)[:, None]).solution[:, 0]
    fd = float(intercept + slope / count)
    return {"fd": fd, "accuracy": whole["accuracy"], "count": count, "held_out": held_out, "extrapolated": True}
