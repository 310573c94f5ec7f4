"""`benchmarks/bench_multistage.py`: the routing-overhead and pipeline sections run on a tiny U-Net and report the
method's time and the null control's next to the baseline's."""

import argparse
import os
import sys

import torch
from diffusers import UNet2DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import bench_multistage as bench  # noqa: E402
from tests.conftest import TINY_UNET  # noqa: E402


def test_overhead_and_pipeline_sections_report_the_method_and_the_null_control():
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET).eval()
    args = argparse.Namespace(device="cpu", resolution=8, repeats=1, steps=2, decoder_counts=[2])
    rows = bench.routing_overhead(args, unet) + bench.pipeline_overhead(args, unet)
    names = [name for name, *_ in rows]
    assert names == [
        "forward, batch 1, 2 identical decoders, routed from timestep (CPU time)",
        "forward, batch 1, 2 identical decoders, stage_index given (CPU time)",
        "forward, batch 1, 2 identical decoders: null control, a copy of the U-Net (CPU time)",
        "forward, batch 16, 2 identical decoders, routed from timestep (CPU time)",
        "forward, batch 16, 2 identical decoders, stage_index given (CPU time)",
        "forward, batch 16, 2 identical decoders: null control, a copy of the U-Net (CPU time)",
        "pipeline time per step (small model, batch 1, CPU time)",
        "pipeline time per step (small model, batch 1, CPU time): null control, DDIMPipeline over a copy",
    ]
    assert all(base > 0 and method > 0 for _, base, method, _ in rows)
