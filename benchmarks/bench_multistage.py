"""Cost of a multi-stage, multi-decoder U-Net against the plain `UNet2DModel` with the same encoder.

Everything is measured in one run and printed as ratios to the baseline measured in that same run:

1. FLOPs of one sampling run (DDIM) and of one training step on a mixed-timestep batch (forward + backward), counted
   by `torch.utils.flop_counter.FlopCounterMode`, for three tailored decoders (the paper's 192/128/16 around 128,
   scaled to the encoder width) against the baseline's single full decoder.
2. Median wall time of a sampling run.
3. Routing overhead: with identical decoders (`MultiStageUNet2DModel.from_unet`), the median forward time against the
   source `UNet2DModel`, routed from the timestep (no `stage_index`) and with `stage_index`: at batch 1 for 2, 3, 4,
   8 and 16 decoders (`--decoder_counts`; a per-call cost that grew with the number of decoders would show here),
   and at batch 16 for 3 decoders.

    python benchmarks/bench_multistage.py --threads 1   # CPU, a few minutes
    python benchmarks/bench_multistage.py --quick    # fewer repeats, for a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel, TimestepPartition
from diffusers_stages.timestep_sampling import stratified_timesteps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.measure import count_flops, interleaved_medians


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="encoder base width (the paper's CIFAR model: 128)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of a sampling run")
    parser.add_argument("--train_batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="3 repeats and 5 steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--decoder_counts", type=int, nargs="+", default=[2, 3, 4, 8, 16], help="identical decoders, batch-1 sweep"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 3, 5
    return args


def encoder_kwargs(width: int, resolution: int) -> dict:
    return dict(
        sample_size=resolution,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def tailored_widths(width: int) -> tuple[tuple[int, ...], ...]:
    """The paper's CIFAR-10 decoders (192 / 128 / 16 around an encoder of 128), scaled to `width`."""
    return tuple((round(width * f), 2 * round(width * f), 2 * round(width * f)) for f in (1.5, 1.0, 0.125))


def paired_medians(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median times of several functions timed in interleaved rounds, so that drift hits all of them alike. As this
    script has always measured: one warm-up round, then an untimed call of a function right before each timed one."""
    return interleaved_medians(fns, repeats, device, warmup=1, warmup_before_each=1)


def training_step(model, clean, timesteps, **kwargs):
    noise = torch.randn_like(clean)
    model(clean + noise, timesteps, **kwargs).sample.square().mean().backward()  # cost of an eps-MSE step
    model.zero_grad(set_to_none=True)


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    kwargs = encoder_kwargs(args.width, args.resolution)
    baseline = UNet2DModel(**kwargs).to(device).eval()
    tailored = (
        MultiStageUNet2DModel(**kwargs, decoder_block_out_channels=tailored_widths(args.width)).to(device).eval()
    )
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(
        f"device {device} ({torch.get_num_threads()} threads), {args.resolution}px, encoder widths {kwargs['block_out_channels']}, DDIM {args.steps} steps"
    )
    print(
        f"baseline UNet2DModel {params(baseline):.2f}M params; multi-stage {params(tailored):.2f}M "
        f"(decoders {tailored_widths(args.width)})"
    )
    rows = []

    # 1. FLOPs: one sampling run (batch 1) and one training step on a stratified mixed batch
    base_pipe = DDIMPipeline(unet=baseline, scheduler=DDIMScheduler())
    staged_pipe = MultiStagePipeline(unet=tailored, scheduler=DDIMScheduler())
    for pipe in (base_pipe, staged_pipe):
        pipe.set_progress_bar_config(disable=True)
    sample_base = lambda: base_pipe(batch_size=1, num_inference_steps=args.steps, output_type="np")  # noqa: E731
    sample_staged = lambda: staged_pipe(batch_size=1, num_inference_steps=args.steps, output_type="np")  # noqa: E731
    (flops_base, _), (flops_staged, _) = count_flops(sample_base), count_flops(sample_staged)
    rows.append(("sampling FLOPs / run", flops_base / 1e9, flops_staged / 1e9, "GFLOP"))

    clean = torch.randn(args.train_batch, 3, args.resolution, args.resolution, device=device)
    timesteps, _ = stratified_timesteps(tailored.partition, args.train_batch, generator=torch.manual_seed(0))
    timesteps = timesteps.to(device)
    baseline.train(), tailored.train()
    train_base, _ = count_flops(lambda: training_step(baseline, clean, timesteps))
    train_staged, _ = count_flops(lambda: training_step(tailored, clean, timesteps))
    rows.append((f"training FLOPs / step (batch {args.train_batch})", train_base / 1e9, train_staged / 1e9, "GFLOP"))
    baseline.eval(), tailored.eval()

    # 2. wall time of a sampling run
    times = paired_medians({"base": sample_base, "staged": sample_staged}, args.repeats, device)
    rows.append(("sampling run wall time (median)", times["base"] * 1e3, times["staged"] * 1e3, "ms"))

    # 3. routing overhead with identical decoders: batch 1 for each decoder count, batch 16 for three decoders
    t = torch.tensor(500, device=device)
    runs = [(1, count) for count in args.decoder_counts] + [(16, tailored.num_stages)]
    for batch, count in runs:
        x = torch.randn(batch, 3, args.resolution, args.resolution, device=device)
        boundaries = TimestepPartition.uniform(count).boundaries
        staged = MultiStageUNet2DModel.from_unet(baseline, stage_boundaries=boundaries).eval()
        with torch.inference_mode():
            times = paired_medians(
                {
                    "unet": lambda x=x: baseline(x, t),
                    "routed": lambda x=x, staged=staged: staged(x, t),
                    "stage_index": lambda x=x, staged=staged, s=count // 2: staged(x, t, stage_index=s),  # t's stage
                },
                args.repeats * 2,
                device,
            )
        name = f"forward, batch {batch}, {count} identical decoders"
        rows.append((f"{name}, routed from timestep", times["unet"] * 1e3, times["routed"] * 1e3, "ms"))
        rows.append((f"{name}, stage_index given", times["unet"] * 1e3, times["stage_index"] * 1e3, "ms"))

    print("\n| measure | UNet2DModel | multi-stage | ratio |\n|---|---|---|---|")
    for name, base, staged, unit in rows:
        print(f"| {name} | {base:.3f} {unit} | {staged:.3f} {unit} | {staged / base:.3f} |")


if __name__ == "__main__":
    main(parse_args())
