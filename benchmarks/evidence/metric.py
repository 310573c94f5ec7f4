"""The quality metric: "FD-classifier", a Frechet distance on the features of a small classifier trained on the data.

Published FID needs InceptionV3 weights, which are not available offline, and Inception features are meaningless on
8x8 grey digits anyway. Here a small CNN is trained (seeded, once, cached as safetensors) on the training split; its
penultimate features feed torchmetrics' `FrechetInceptionDistance(feature=module)` (the same Frechet distance as
FID, Heusel et al. 2017, eq. 6, on other features). Its accuracy on class-conditional samples is the second number.
Scores are comparable only within one data set and one sample count: they are not FID.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .data import NUM_CLASSES, load_images


class FeatureClassifier(nn.Module):
    """A small CNN classifier; ``forward`` returns its penultimate features (what the Frechet distance compares).

    Example:

    ```py
    >>> import torch
    >>> net = FeatureClassifier(image_size=8)
    >>> net(torch.zeros(2, 1, 8, 8)).shape, net.logits(torch.zeros(2, 1, 8, 8)).shape
    (torch.Size([2, 64]), torch.Size([2, 10]))

    ```
    """

    def __init__(self, image_size: int, in_channels: int = 1, width: int = 32, num_features: int = 64):
        super().__init__()
        if image_size not in (8, 16, 32):
            raise ValueError(f"`image_size` must be 8, 16 or 32, got {image_size}.")
        layers, channels, size = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()], width, image_size
        while size > 4:  # halve the resolution down to 4x4, doubling the width
            layers += [nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.SiLU()]
            channels, size = 2 * channels, size // 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, num_features), nn.SiLU())
        self.head = nn.Linear(num_features, NUM_CLASSES)
        self.num_features = num_features  # read by torchmetrics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images))


def train_classifier(
    dataset: str, cache_dir: str, seed: int = 0, epochs: int = 30, batch_size: int = 128, max_steps: int = 1000,
    width: int = 16,
) -> FeatureClassifier:
    """Train the feature classifier on ``dataset``'s training split (seeded), or load it from ``cache_dir``."""
    images, labels = load_images(dataset, "train")
    settings = {"dataset": dataset, "seed": seed, "epochs": epochs, "batch_size": batch_size, "max_steps": max_steps,
                "width": width}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"classifier-{dataset}-{key}.safetensors")
    torch.manual_seed(seed)
    net = FeatureClassifier(images.shape[-1], width=width)
    if os.path.isfile(path):
        net.load_state_dict(load_file(path))
        return net.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = min(max_steps, epochs * (len(images) // batch_size))
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        batch = images[index]
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()  # small translations: features, not pixels
        loss = F.cross_entropy(net.logits(torch.roll(batch, shift, dims=(2, 3))), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    os.makedirs(cache_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return net.eval().requires_grad_(False)


class Evaluator:
    """FD-classifier and classifier accuracy of generated images against a data set's real images.

    Args:
        classifier: the trained [`FeatureClassifier`].
        real_images: reference images in ``[-1, 1]`` (the training split, as FID is usually taken).
    """

    def __init__(self, classifier: FeatureClassifier, real_images: torch.Tensor, batch_size: int = 1000):
        self.classifier = classifier
        self.batch_size = batch_size
        self.fd = FrechetInceptionDistance(feature=classifier, reset_real_features=False)
        for chunk in real_images.split(batch_size):
            self.fd.update(chunk, real=True)

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """``{"fd": ..., "accuracy": ...}`` for ``images`` in ``[-1, 1]`` (accuracy only when ``labels`` are given)."""
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"`images` must be a batch (N >= 2, C, H, W), got shape {tuple(images.shape)}.")
        self.fd.reset()  # forgets the generated features only (reset_real_features=False)
        correct = 0
        for i, chunk in enumerate(images.split(self.batch_size)):
            self.fd.update(chunk, real=False)
            if labels is not None:
                logits = self.classifier.logits(chunk)
                correct += int((logits.argmax(1) == labels[i * self.batch_size : i * self.batch_size + len(chunk)]).sum())
        result = {"fd": float(self.fd.compute())}
        if labels is not None:
            result["accuracy"] = correct / len(images)
        return result
