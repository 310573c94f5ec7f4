"""Sampling cost of expert routing, measured against its baseline in the same run.

1. Dual backbone (DuoDiff): a shallow U-Net of about a quarter of the deep one's FLOPs runs the first
   ``--switch_step_fraction`` of the steps, the deep one the rest; baseline: the deep model alone.
2. MEME: 4 iU-Net experts of different sizes (wider near the data, attention-heavy near the noise) on uniform
   intervals; baseline: one large U-Net.
3. At the sizes of an evidence preset (``--evidence_preset``, the models `benchmarks/run_evidence.py` trains and times):
   its 4 MEME iU-Net experts vs its large U-Net, and DuoDiff's U-ViT pair (depth 3 and 13, the preset's early-exit
   width) vs the deep U-ViT alone; class-conditional, the preset's timing batch and steps.

FLOPs of a whole sampling run are counted with `torch.utils.flop_counter.FlopCounterMode`; wall time and CPU time
(this process's, which other jobs on a shared machine do not inflate) are medians of ``--repeats`` interleaved runs
after a warm-up. Every run uses the package's one sampling loop and the same scheduler and seed. Untrained weights:
cost does not depend on them.

    python benchmarks/bench_experts.py [--device cuda] [--steps 10] [--batch_size 4] [--repeats 5] [--threads 1]
        [--evidence_preset default|quick|gpu|none] [--timing_batch N] [--evidence_steps N]

``--timing_batch`` and ``--evidence_steps`` override section 3's batch and steps, so that the GPU preset's wider
models can be timed on a CPU (``--evidence_preset gpu --timing_batch 8 --evidence_steps 10``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_stages import (
    DualBackbonePipeline,
    ExpertRoutingModel,
    ExpertRoutingPipeline,
    TimestepPartition,
    UViT2DModel,
)
from diffusers_stages.models import build_meme_experts
from diffusers_stages.models.uvit import dual_uvit_configs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.evidence.comparisons import meme_expert_models, unet_config
from benchmarks.evidence.data import NUM_CLASSES
from benchmarks.evidence.presets import PRESETS
from benchmarks.evidence.sampling import balanced_labels, sampling_scheduler
from benchmarks.measure import (
    count_flops,
    device_option,
    interleaved_medians,
    non_negative_int,
    open_fraction,
    positive_int,
)

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


def compare(baseline, pipe, args, **run) -> tuple[tuple[int, float, float], tuple[int, float, float]]:
    """(FLOPs, median wall seconds, median CPU seconds) of one sampling run of each; the timed runs alternate, so that
    a busy machine slows both alike. ``run`` overrides the call's arguments (batch, steps, class labels)."""
    run = {"batch_size": args.batch_size, "num_inference_steps": args.steps, "output_type": "latent", **run}
    runs = {}
    for name, p in (("baseline", baseline), ("ours", pipe)):
        p.set_progress_bar_config(disable=True)
        runs[name] = lambda p=p: p(generator=torch.manual_seed(0), **run)
    flops = {name: count_flops(fn)[0] for name, fn in runs.items()}
    wall = interleaved_medians(runs, args.repeats, args.device)  # after one warm-up run each
    cpu = interleaved_medians(runs, args.repeats, args.device, clock=time.process_time)
    return tuple((flops[name], wall[name], cpu[name]) for name in ("baseline", "ours"))


def params(models) -> float:
    return sum(p.numel() for m in models for p in m.parameters()) / 1e6


def report(name: str, baseline: tuple[int, float, float], ours: tuple[int, float, float], extra: str = "") -> None:
    flops, wall, cpu = (o / b for o, b in zip(ours, baseline))
    print(
        f"{name}: FLOPs {ours[0] / 1e9:.2f} G vs {baseline[0] / 1e9:.2f} G (ratio {flops:.3f}); "
        f"median wall time {ours[1]:.3f} s vs {baseline[1]:.3f} s (ratio {wall:.3f}, speed-up {1 / wall:.2f}x, "
        f"{wall / flops:.2f}x the FLOPs ratio); median CPU time {ours[2]:.3f} s vs {baseline[2]:.3f} s (ratio "
        f"{cpu:.3f}, {cpu / flops:.2f}x the FLOPs ratio){extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_option, default="cpu")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--batch_size", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--switch_step_fraction", type=open_fraction, default=0.4, help="share of the steps the shallow model runs"
    )
    parser.add_argument(
        "--early_exit_steps", type=non_negative_int, default=0, help="train the early-exit baseline this long"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (1 is steadier on a shared machine)"
    )
    parser.add_argument(
        "--evidence_preset", default="default", choices=[*PRESETS, "none"], help="section 3's sizes ('none': skip)"
    )
    parser.add_argument(
        "--timing_batch", type=positive_int, default=None, help="section 3's batch (default: the preset's)"
    )
    parser.add_argument(
        "--evidence_steps", type=positive_int, default=None, help="section 3's DDIM steps (default: the preset's)"
    )
    args = parser.parse_args()
    for option in ("timing_batch", "evidence_steps"):
        if args.evidence_preset == "none" and getattr(args, option) is not None:
            parser.error(f"--{option} sets section 3, which --evidence_preset none skips")
    for option in ("steps", "evidence_steps"):  # the dual backbone's step-fraction switch needs a step on each side
        if getattr(args, option) == 1:
            parser.error(f"--{option} must be at least 2 (the dual backbone switches models between steps), got 1")
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

    # 3. the same comparisons at the sizes of an evidence preset
    if args.evidence_preset != "none":
        evidence_sizes(args, PRESETS[args.evidence_preset])

    # 3. optional: AdaDiff-style early exit trained on sklearn digits, and its exit depth over a sampling run
    if args.early_exit_steps:
        early_exit_profile(args)


def evidence_sizes(args, preset) -> None:
    """MEME and DuoDiff at an evidence preset's sizes (32x32x1 for Fashion-MNIST, 8x8x1 for digits), class-conditional,
    timed as `run_evidence.py` times them: its timing batch of balanced labels, its number of DDIM steps."""
    size = 8 if preset.dataset == "digits" else 32
    labels = balanced_labels(args.timing_batch or preset.timing_batch)
    run = {
        "batch_size": 1,
        "class_labels": labels,
        "num_inference_steps": args.evidence_steps or preset.num_inference_steps,
    }
    print(f"evidence preset {preset.name!r}: {size}x{size}x1, batch {len(labels)}, {run['num_inference_steps']} steps")

    # 3a. 4 MEME iU-Net experts (half the large model's widths) vs the large U-Net
    torch.manual_seed(preset.seed)
    large = UNet2DModel(**unet_config(preset, size, preset.block_out_channels)).to(args.device).eval()
    experts = [e.to(args.device).eval() for e in meme_expert_models(preset, size)]
    meme = ExpertRoutingModel(experts, stage_boundaries=TimestepPartition.uniform(4).boundaries)
    baseline, ours = compare(
        ExpertRoutingPipeline(single(large), sampling_scheduler()),
        ExpertRoutingPipeline(meme, sampling_scheduler()),
        args,
        **run,
    )
    report(
        f"4 MEME iU-Net experts {tuple(experts[0].config.block_out_channels)} ({params(experts):.2f} M in all) vs one "
        f"large U-Net {preset.block_out_channels} ({params([large]):.2f} M)",
        baseline,
        ours,
    )

    # 3b. DuoDiff's U-ViT pair (depth 3 then 13) vs the deep U-ViT alone
    configs = dual_uvit_configs(
        3, 13, hidden_size=preset.early_exit_hidden_size, patch_size=2, num_attention_heads=4, sample_size=size,
        in_channels=1, num_class_embeds=NUM_CLASSES + 1,
    )  # fmt: skip
    shallow, deep = (UViT2DModel(**configs[k]).to(args.device).eval() for k in ("shallow", "deep"))
    dual = DualBackbonePipeline(
        shallow=shallow, deep=deep, scheduler=sampling_scheduler(), switch_step_fraction=args.switch_step_fraction
    )
    shallow_steps = sum(e == 1 for _, e in dual.expert_schedule(run["num_inference_steps"]))
    baseline, ours = compare(ExpertRoutingPipeline(single(deep), sampling_scheduler()), dual, args, **run)
    report(
        f"U-ViT dual backbone (depth 3 on {shallow_steps}/{run['num_inference_steps']} steps, then 13; width "
        f"{preset.early_exit_hidden_size}) vs the deep U-ViT alone",
        baseline,
        ours,
    )


def _example_script(path: str):
    """An `examples/<path>` training script as a module (its `parse_args` and `main`)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("example_script", os.path.join(root, "examples", path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def early_exit_profile(args) -> None:
    """Train the early-exit U-ViT on digits through the package's training loop (`EarlyExitTask`, as
    `train_dual_backbone.py --backbone early_exit` does), then print each exit's error and uncertainty by timestep and
    the exit layer of every step of a 20-step DDIM run (the "phase transition" DuoDiff builds on)."""
    import tempfile

    import numpy as np
    from diffusers import DDPMScheduler
    from sklearn.datasets import load_digits

    from diffusers_stages.demo.methods import write_image_folder
    from diffusers_stages.pipelines import ExpertRoutingPipeline, record_exit_profile

    digits = load_digits()
    script = _example_script("dual_backbone/train_dual_backbone.py")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_folder((digits.images * 255 / 16).round().astype(np.uint8), digits.target, f"{tmp}/data")
        run = script.parse_args(
            ["--train_data_dir", folder, "--resolution", "8", "--output_dir", f"{tmp}/run", "--train_batch_size", "128",
             "--max_train_steps", str(args.early_exit_steps), "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
             "--logger", "none", "--save_images_steps", "100000", "--checkpointing_steps", "100000",
             "--backbone", "early_exit", "--deep_depth", "7", "--uvit_hidden_size", "64",
             "--uvit_num_attention_heads", "4", "--uvit_patch_size", "2"]
        )  # fmt: skip
        model = ExpertRoutingPipeline.from_pretrained(script.main(run)).experts.expert(0).eval()
    print(f"early exit: 7-block U-ViT trained {args.early_exit_steps} steps on digits through the training loop")
    data = torch.from_numpy(digits.images).float()[:, None] / 8 - 1  # 0..16 -> [-1, 1]
    data = data.expand(-1, model.config.in_channels, -1, -1)  # the loop reads the grey images as RGB
    noise_scheduler = DDPMScheduler()
    with torch.no_grad():
        for level in (50, 200, 400, 600, 800, 950):
            clean, t = data[:256], torch.full((256,), level)
            noise = torch.randn(clean.shape)
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
