"""FLOP accounting with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention, forward and backward)."""

from __future__ import annotations

import torch

from ..measure import count_flops  # also imported from here by the package's modules and tests


def sampling_flops_per_image(
    pipeline, num_inference_steps: int, class_labels: list[int] | None = None, seed: int = 0
) -> int:
    """FLOPs of generating one image with ``pipeline`` (its whole denoising loop, ``batch_size=1``, no guidance),
    from the noise of ``seed``: an early-exit model's FLOPs depend on the noise, so every count draws the same."""
    flops, _ = count_flops(
        lambda: pipeline(
            batch_size=1,
            num_inference_steps=num_inference_steps,
            class_labels=class_labels,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        )
    )
    return flops
