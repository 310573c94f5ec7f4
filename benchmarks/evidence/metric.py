"""The quality metric: "FD-classifier", the library's Frechet distance on the features of a small classifier trained
on the data (`diffusers_stages.evaluation`), here trained once per data set and seed and cached as safetensors.

Scores are comparable only within one data set and one sample count: they are not FID.
"""

from __future__ import annotations

import hashlib
import json
import os

from diffusers_stages.evaluation import Evaluator, FeatureClassifier
from diffusers_stages.evaluation import train_classifier as train_on_images

from .data import NUM_CLASSES, load_images

__all__ = ["Evaluator", "FeatureClassifier", "train_classifier"]


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
