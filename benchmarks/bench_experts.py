"""Sampling cost of expert routing, measured against its baseline in the same run.

1. Dual backbone (DuoDiff): a shallow U-Net of about a quarter of the deep one's FLOPs runs the first
   ``--switch_step_fraction`` of the steps, the deep one the rest; baseline: the deep model alone.
2. MEME: 4 experts of different sizes (wider near the data, attention-heavy near the noise) on uniform intervals;
   baseline: one large U-Net.

FLOPs of a whole sampling run are counted with `torch.utils.flop_counter.FlopCounterMode`; wall time is the median of
``--repeats`` runs after a warm-up. Every run uses the package's one sampling loop and the same scheduler and seed.
Untrained weights: cost does not depend on them.

    python benchmarks/bench_experts.py [--device cuda] [--steps 10] [--batch_size 4] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_stages import DualBackbonePipeline, ExpertRoutingModel, ExpertRoutingPipeline, TimestepPartition
from diffusers_stages.models import build_meme_experts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.measure import count_flops, interleaved_medians

SIZE, CHANNELS = 32, 3
DEEP = {
    "block_out_channels": (64, 128, 128),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}
SHALLOW = {
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}
MEME_WIDTHS = [(64, 96, 96), (48, 96, 96), (32, 64, 64), (32, 64, 64)]  # clean expert first


def unet(**kwargs) -> UNet2DModel:
    return UNet2DModel(sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, norm_num_groups=16, **kwargs)


def single(model: UNet2DModel) -> ExpertRoutingModel:
    return ExpertRoutingModel([model], stage_boundaries=())


def compare(baseline, pipe, args) -> tuple[tuple[int, float], tuple[int, float]]:
    """(FLOPs, median seconds) of one sampling run of each; the timed runs alternate, so that a busy machine slows
    both alike."""
    run = {"batch_size": args.batch_size, "num_inference_steps": args.steps, "output_type": "latent"}
    runs = {}
    for name, p in (("baseline", baseline), ("ours", pipe)):
        p.set_progress_bar_config(disable=True)
        runs[name] = lambda p=p: p(generator=torch.manual_seed(0), **run)
    flops = {name: count_flops(fn)[0] for name, fn in runs.items()}
    times = interleaved_medians(runs, args.repeats, args.device)  # after one warm-up run each
    return (flops["baseline"], times["baseline"]), (flops["ours"], times["ours"])


def params(models) -> float:
    return sum(p.numel() for m in models for p in m.parameters()) / 1e6


def report(name: str, baseline: tuple[int, float], ours: tuple[int, float], extra: str = "") -> None:
    print(
        f"{name}: FLOPs {ours[0] / 1e9:.2f} G vs {baseline[0] / 1e9:.2f} G (ratio {ours[0] / baseline[0]:.3f}); "
        f"median time {ours[1]:.3f} s vs {baseline[1]:.3f} s (ratio {ours[1] / baseline[1]:.3f}, "
        f"speed-up {baseline[1] / ours[1]:.2f}x){extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--switch_step_fraction", type=float, default=0.4)
    parser.add_argument("--early_exit_steps", type=int, default=0, help="train the early-exit baseline this long")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"device {args.device} ({torch.get_num_threads()} threads), {args.steps} DDIM steps, batch {args.batch_size}, {SIZE}x{SIZE}x{CHANNELS}, "
        f"median of {args.repeats}"
    )

    # 1. dual backbone vs the deep model alone
    deep, shallow = unet(**DEEP).to(args.device).eval(), unet(**SHALLOW).to(args.device).eval()
    x = torch.randn(1, CHANNELS, SIZE, SIZE, device=args.device)
    with torch.no_grad():
        (deep_flops, _), (shallow_flops, _) = count_flops(lambda: deep(x, 500)), count_flops(lambda: shallow(x, 500))
    call_ratio = shallow_flops / deep_flops
    print(
        f"deep {params([deep]):.2f} M params, shallow {params([shallow]):.2f} M; shallow/deep FLOPs per call "
        f"{call_ratio:.3f}"
    )
    dual = DualBackbonePipeline(
        shallow=shallow, deep=deep, scheduler=DDIMScheduler(), switch_step_fraction=args.switch_step_fraction
    )
    shallow_steps = sum(e == 1 for _, e in dual.expert_schedule(args.steps))
    expected = (shallow_steps * call_ratio + args.steps - shallow_steps) / args.steps
    baseline, ours = compare(ExpertRoutingPipeline(single(deep), DDIMScheduler()), dual, args)
    report(
        f"dual backbone (shallow on {shallow_steps}/{args.steps} steps) vs deep only",
        baseline,
        ours,
        f"; expected FLOPs ratio {expected:.3f}",
    )

    # 2. four MEME experts of different sizes vs one large model
    large = unet(**DEEP).to(args.device).eval()
    experts = [
        e.to(args.device).eval()
        for e in build_meme_experts(
            num_experts=4,
            sample_size=SIZE,
            in_channels=CHANNELS,
            block_out_channels=MEME_WIDTHS,
            layers_per_block=2,
            norm_num_groups=16,
        )
    ]
    meme = ExpertRoutingModel(experts, stage_boundaries=TimestepPartition.uniform(4).boundaries)
    print(
        f"large {params([large]):.2f} M params; MEME experts "
        + ", ".join(f"{params([e]):.2f}" for e in experts)
        + f" M ({params(experts):.2f} M in all)"
    )
    baseline, ours = compare(
        ExpertRoutingPipeline(single(large), DDIMScheduler()), ExpertRoutingPipeline(meme, DDIMScheduler()), args
    )
    report("4 MEME experts vs one large model", baseline, ours)

    # 3. optional: AdaDiff-style early exit trained on sklearn digits, and its exit depth over a sampling run
    if args.early_exit_steps:
        early_exit_profile(args)


def early_exit_profile(args) -> None:
    """Train the early-exit U-ViT on digits, then print each exit's error and uncertainty by timestep and the exit
    layer of every step of a 20-step DDIM run (the "phase transition" DuoDiff builds on)."""
    from diffusers import DDPMScheduler
    from sklearn.datasets import load_digits

    from diffusers_stages.models.early_exit import EarlyExitUViT2DModel, early_exit_loss, record_exit_profile

    torch.manual_seed(0)
    data = torch.from_numpy(load_digits().images).float()[:, None] / 8 - 1  # 0..16 -> [-1, 1]
    model = EarlyExitUViT2DModel(sample_size=8, in_channels=1, hidden_size=64, num_layers=7, num_attention_heads=4)
    noise_scheduler, optimizer = DDPMScheduler(), torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(args.early_exit_steps):
        clean = data[torch.randint(0, len(data), (128,))]
        t, noise = torch.randint(0, 1000, (128,)), torch.randn_like(clean)
        loss = early_exit_loss(model, noise_scheduler.add_noise(clean, noise, t), t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"early exit: 7-block U-ViT trained {args.early_exit_steps} steps on digits, final loss {loss.item():.4f}")
    with torch.no_grad():
        for level in (50, 200, 400, 600, 800, 950):
            clean, noise, t = data[:256], torch.randn(256, 1, 8, 8), torch.full((256,), level)
            predictions, uncertainties = model(noise_scheduler.add_noise(clean, noise, t), t, return_all_exits=True)
            errors = " ".join(f"{(p - noise).pow(2).mean():.3f}" for p in predictions)
            print(
                f"  t={level}: eps-MSE per exit {errors}; mean uncertainty per exit "
                + " ".join(f"{u.mean():.3f}" for u in uncertainties)
            )
    for threshold in (0.2, 0.3, 0.4):
        profile = record_exit_profile(model, DDIMScheduler(), 20, threshold, 16, torch.manual_seed(0))
        print(f"  threshold {threshold}: exit layer per step (noisy -> clean) {[layer for _, layer in profile]}")


if __name__ == "__main__":
    main()
