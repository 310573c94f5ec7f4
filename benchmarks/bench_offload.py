"""Peak accelerator memory and sampling time of stage-aware offload (`enable_stage_offload`), against the pipeline
held on the accelerator and against diffusers' `enable_model_cpu_offload`.

The pipeline is `bench_experts.py`'s MEME setup: 4 experts of different sizes (wider near the data) on uniform
intervals (IU-Nets). Each mode is measured on its own, one after the other: the peak is `torch.cuda.max_memory_allocated` over
one sampling run (weights, activations and moves included) above what was allocated before the mode was set up;
the time is the median of ``--repeats`` runs after that one. Each mode is then printed as ratios to the resident
pipeline's peak and time. On CPU (``--device cpu``) only the stage offload runs,
with the CPU as its execution device (a smoke run: no memory is reported and the moves cost nothing).

    python benchmarks/bench_offload.py --device cuda [--steps 50] [--batch_size 16] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch
from diffusers import DDIMScheduler

from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline, TimestepPartition
from diffusers_stages.models import build_meme_experts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.bench_experts import CHANNELS, MEME_WIDTHS, SIZE, params
from benchmarks.measure import _synchronize, default_device, device_option, positive_int

MODES = ("resident", "model_cpu_offload", "stage_offload", "stage_offload_no_prefetch")


def meme_pipeline() -> ExpertRoutingPipeline:
    """`bench_experts.py`'s four MEME experts (iU-Nets, clean expert widest) on uniform intervals, on the CPU."""
    torch.manual_seed(0)
    shape = {"sample_size": SIZE, "in_channels": CHANNELS, "layers_per_block": 2, "norm_num_groups": 16}
    experts = build_meme_experts(num_experts=4, block_out_channels=MEME_WIDTHS, **shape)
    model = ExpertRoutingModel([e.eval() for e in experts], stage_boundaries=TimestepPartition.uniform(4).boundaries)
    return ExpertRoutingPipeline(experts=model, scheduler=DDIMScheduler())


def set_mode(pipe: ExpertRoutingPipeline, mode: str, device: torch.device) -> None:
    if mode == "resident":
        pipe.to(device)
    elif mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_stage_offload(device=device, prefetch=mode == "stage_offload")


def measure(pipe: ExpertRoutingPipeline, mode: str, args: argparse.Namespace) -> tuple[float | None, float]:
    """``(peak MiB above the start, or None off CUDA; median seconds)`` of sampling with ``mode``."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    set_mode(pipe, mode, device)
    run = {"batch_size": args.batch_size, "num_inference_steps": args.steps, "output_type": "latent"}
    pipe(generator=torch.manual_seed(0), **run)  # warm-up run: the peak
    peak = (torch.cuda.max_memory_allocated(device) - start) / 2**20 if cuda else None
    times = []
    for _ in range(args.repeats):
        _synchronize(device)
        begin = time.perf_counter()
        pipe(generator=torch.manual_seed(0), **run)
        _synchronize(device)
        times.append(time.perf_counter() - begin)
    return peak, statistics.median(times)


def ratios_to_resident(results: dict[str, tuple[float | None, float]]) -> list[str]:
    """Each mode's peak memory and median time over the resident pipeline's, measured in the same run (none where
    the resident pipeline was not measured: a CPU run)."""
    if "resident" not in results:
        return []
    base_peak, base_seconds = results["resident"]

    def memory(peak: float | None) -> str:  # only CUDA reports a peak (an MPS or XPU run has none)
        return "n/a (CUDA only)" if peak is None or base_peak is None else f"{peak / base_peak:.3f}"

    return [
        f"{mode} / resident: peak memory {memory(peak)}, time {seconds / base_seconds:.3f}"
        for mode, (peak, seconds) in results.items()
        if mode != "resident"
    ]


def main(argv: list[str] | None = None) -> dict[str, tuple[float | None, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_option, default=default_device())
    parser.add_argument("--steps", type=positive_int, default=50)
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source = meme_pipeline()
    experts = source.experts.experts
    print(f"4 experts: {params(experts):.2f} M parameters, the largest {max(params([e]) for e in experts):.2f} M")
    modes = MODES if torch.device(args.device).type != "cpu" else ("stage_offload", "stage_offload_no_prefetch")
    results = {}
    for mode in modes:
        pipe = ExpertRoutingPipeline(**copy.deepcopy(source.components))
        pipe.set_progress_bar_config(disable=True)
        peak, seconds = measure(pipe, mode, args)
        results[mode] = (peak, seconds)
        memory = f"peak {peak:.1f} MiB" if peak is not None else "peak n/a (CUDA only)"
        print(f"{mode}: {memory}, median {seconds:.3f} s per run of {args.steps} steps, batch {args.batch_size}")
        del pipe
        gc.collect()
    for line in ratios_to_resident(results):
        print(line)
    return results


if __name__ == "__main__":
    main()
