"""FLOP accounting with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention, forward and backward)."""

from __future__ import annotations

import torch

from ..measure import count_flops  # also imported from here by the package's modules and tests


def sampling_flops_per_image(
    pipeline, num_inference_steps: int, class_labels: list[int] | None = None, seed: int = 0
) -> float:
    """FLOPs per image of generating ``class_labels`` (one image each; one unconditional image when `None`) in one
    batch with ``pipeline`` (its whole denoising loop, no guidance), from the noise of ``seed``: an early-exit model's
    FLOPs depend on the noise and differ between images, so every count draws the same noise and the mean is taken
    over the batch whose wall time is reported beside it."""
    batch_size = len(class_labels) if class_labels is not None else 1
    flops, _ = count_flops(
        lambda: pipeline(
            batch_size=batch_size,
            num_inference_steps=num_inference_steps,
            class_labels=class_labels,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        )
    )
    return flops / batch_size
