"""FLOP accounting with `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions, forward and backward)."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn()`` once and return ``(flops, result)``: every FLOP of its matmuls and convolutions, backward included.

    Example:

    ```py
    >>> import torch
    >>> flops, _ = count_flops(lambda: torch.ones(4, 8) @ torch.ones(8, 2))
    >>> flops  # 2 * 4 * 8 * 2
    128

    ```
    """
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def sampling_flops_per_image(pipeline, num_inference_steps: int, class_labels: list[int] | None = None) -> int:
    """FLOPs of generating one image with ``pipeline`` (its whole denoising loop, ``batch_size=1``, no guidance)."""
    flops, _ = count_flops(
        lambda: pipeline(batch_size=1, num_inference_steps=num_inference_steps, class_labels=class_labels,
                         generator=None, output_type="pt")
    )
    return flops
