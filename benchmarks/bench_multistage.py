"""Cost of a multi-stage, multi-decoder U-Net against the plain `UNet2DModel` with the same encoder.

Everything is measured in one run and printed as ratios to the baseline measured in that same run:

1. FLOPs of one sampling run (DDIM) and of one training step on a mixed-timestep batch (forward + backward), counted
   by `torch.utils.flop_counter.FlopCounterMode`, for three tailored decoders (the paper's 192/128/16 around 128,
   scaled to the encoder width) against the baseline's single full decoder.
2. Median wall time of a sampling run.
3. Routing overhead: with identical decoders (`MultiStageUNet2DModel.from_unet`), the forward's extra CPU time over
   the source `UNet2DModel` (median of paired per-round differences), routed from the timestep (no `stage_index`)
   and with `stage_index`, for 2, 3, 4, 8 and 16 decoders (`--decoder_counts`; a per-call cost that grew with the
   number of decoders would show here), at batch 1 and at batch 16; a copy of the U-Net measured the same way gives
   the noise floor.
4. Mixed batches (small model: 16x16, widths (32, 64), identical decoders, one thread unless ``--threads``): a batch spread evenly over
   the stages against the same batch in one stage, decoded stage by stage and fused (`enable_fused_decoders`), at 2,
   3, 8 and 16 stages and batch 4 and 16 (wall and process CPU time), a training step at 8 stages, batch 16, and
   a wider model (widths (64, 128, 128), 32x32) at 4 stages, batch 16.
5. Loading: the peak resident memory that `from_pretrained` adds, against the parameters' size (in a subprocess).
6. Per-step pipeline overhead: `MultiStagePipeline` with identical decoders against `DDIMPipeline` (small model;
   paired CPU-time differences, with a second `DDIMPipeline` as the null control).
7. `compile_stages` with inductor: the time of compiling every stage (warm-up), and the steady-state forward time
   against the eager model.

    python benchmarks/bench_multistage.py --threads 1   # CPU, a few minutes
    python benchmarks/bench_multistage.py --quick    # fewer repeats, for a smoke run
    python benchmarks/bench_multistage.py --sections mixed load pipeline compile  # some sections only
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel, TimestepPartition
from diffusers_stages.planning.sizing import scaled_widths, width_multiple
from diffusers_stages.timestep_sampling import stratified_timesteps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.measure import count_flops, default_device, device_option, interleaved_medians, positive_int

SECTIONS = ("flops", "sampling", "overhead", "mixed", "load", "pipeline", "compile")
SMALL = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=8,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--width", type=positive_int, default=64, help="encoder base width (the paper's CIFAR model: 128)"
    )
    parser.add_argument("--resolution", type=positive_int, default=32)
    parser.add_argument("--steps", type=positive_int, default=20, help="DDIM steps of a sampling run")
    parser.add_argument("--train_batch", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=15, help="timed repetitions (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="3 repeats and 5 steps")
    parser.add_argument("--device", type=device_option, default=default_device())
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--decoder_counts",
        type=positive_int,
        nargs="+",
        default=[2, 3, 4, 8, 16],
        help="identical decoders, batch-1 sweep",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    args = parser.parse_args(argv)
    if args.quick:  # defaults only: the options given with it keep their values
        parser.set_defaults(repeats=3, steps=5)
        args = parser.parse_args(argv)
    kwargs = encoder_kwargs(args.width, args.resolution)
    multiple, down = width_multiple(kwargs), 2 ** (len(kwargs["block_out_channels"]) - 1)
    if args.width % multiple:  # the encoder's group norms and attention heads
        parser.error(f"--width must be a multiple of {multiple}, got {args.width}")
    if args.resolution % down:  # every down-sampling halves it; the up path must meet the same sizes
        parser.error(f"--resolution must be a multiple of {down}, got {args.resolution}")
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
    """The paper's CIFAR-10 decoders (192 / 128 / 16 around an encoder of 128), scaled to `width`: each width rounded
    to a positive multiple of what the decoders' norms and attention heads need (`width_multiple`)."""
    kwargs = encoder_kwargs(width, 32)  # the resolution plays no part
    multiple = width_multiple(kwargs)
    return tuple(scaled_widths(kwargs["block_out_channels"], f, multiple) for f in (1.5, 1.0, 0.125))


def paired_medians(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median times of several functions timed in interleaved rounds, so that drift hits all of them alike. As this
    script has always measured: one warm-up round, then an untimed call of a function right before each timed one."""
    return interleaved_medians(fns, repeats, device, warmup=1, warmup_before_each=1)


def host_clock(device: str) -> tuple:
    """This process's CPU time on CPU (steadier on a shared machine than wall time); wall time on an accelerator,
    whose work the host's CPU time does not count."""
    return (time.process_time, "CPU time") if torch.device(device).type == "cpu" else (time.perf_counter, "wall time")


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
    print(f"device {device} ({torch.get_num_threads()} threads)")
    if {"flops", "sampling"} & set(args.sections):
        print_rows(tailored_costs(args, baseline, kwargs))
    if "overhead" in args.sections:
        print_rows(routing_overhead(args, baseline))
    small = UNet2DModel(**SMALL).to(device).eval()
    if "mixed" in args.sections:
        print_rows(mixed_batches(args, small))
    if "load" in args.sections:
        print_rows(load_peak(small))
    if "pipeline" in args.sections:
        print_rows(pipeline_overhead(args, small))
    if "compile" in args.sections:
        print_rows(compiled_stages(args, small))


def print_rows(rows: list[tuple]) -> None:
    """One section's table, printed when the section ends: a run stopped later keeps it."""
    print("\n| measure | baseline | multi-stage | ratio |\n|---|---|---|---|")
    for name, base, staged, unit in rows:
        print(f"| {name} | {base:.3f} {unit} | {staged:.3f} {unit} | {staged / base:.3f} |")


def tailored_costs(args, baseline, kwargs) -> list[tuple]:
    """Sections 1 and 2: FLOPs and sampling wall time of the paper's tailored decoders against the baseline."""
    device, rows = args.device, []
    tailored = (
        MultiStageUNet2DModel(**kwargs, decoder_block_out_channels=tailored_widths(args.width)).to(device).eval()
    )
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(
        f"{args.resolution}px, encoder widths {kwargs['block_out_channels']}, DDIM {args.steps} steps; baseline "
        f"UNet2DModel {params(baseline):.2f}M params; multi-stage {params(tailored):.2f}M "
        f"(decoders {tailored_widths(args.width)})"
    )
    base_pipe = DDIMPipeline(unet=baseline, scheduler=DDIMScheduler())
    staged_pipe = MultiStagePipeline(unet=tailored, scheduler=DDIMScheduler())
    for pipe in (base_pipe, staged_pipe):
        pipe.set_progress_bar_config(disable=True)
    sample_base = lambda: base_pipe(batch_size=1, num_inference_steps=args.steps, output_type="np")  # noqa: E731
    sample_staged = lambda: staged_pipe(batch_size=1, num_inference_steps=args.steps, output_type="np")  # noqa: E731
    if "flops" in args.sections:
        (flops_base, _), (flops_staged, _) = count_flops(sample_base), count_flops(sample_staged)
        rows.append(("sampling FLOPs / run", flops_base / 1e9, flops_staged / 1e9, "GFLOP"))
        clean = torch.randn(args.train_batch, 3, args.resolution, args.resolution, device=device)
        timesteps, _ = stratified_timesteps(tailored.partition, args.train_batch, generator=torch.manual_seed(0))
        timesteps = timesteps.to(device)
        baseline.train(), tailored.train()
        train_base, _ = count_flops(lambda: training_step(baseline, clean, timesteps))
        train_staged, _ = count_flops(lambda: training_step(tailored, clean, timesteps))
        rows.append(
            (f"training FLOPs / step (batch {args.train_batch})", train_base / 1e9, train_staged / 1e9, "GFLOP")
        )
        baseline.eval(), tailored.eval()
    if "sampling" in args.sections:
        times = paired_medians({"base": sample_base, "staged": sample_staged}, args.repeats, device)
        rows.append(("sampling run wall time (median)", times["base"] * 1e3, times["staged"] * 1e3, "ms"))
    return rows


def routing_overhead(args, baseline) -> list[tuple]:
    """Section 3: identical decoders against the source U-Net, routed and with ``stage_index``, and a copy of the
    U-Net as a null control (its overhead is this machine's noise floor). Each overhead is the median of paired
    per-round differences of this process's CPU time from the U-Net's (`interleaved_medians(baseline=...)`), which
    resolves differences far below the spread of the times themselves."""
    device, rows = args.device, []
    clock, unit = host_clock(device)
    t = torch.tensor(500, device=device)
    control = UNet2DModel.from_config(baseline.config).to(device).eval()
    control.load_state_dict(baseline.state_dict())
    runs = [(1, count) for count in args.decoder_counts] + [(16, count) for count in args.decoder_counts]
    for batch, count in runs:
        x = torch.randn(batch, 3, args.resolution, args.resolution, device=device)
        boundaries = TimestepPartition.uniform(count).boundaries
        staged = MultiStageUNet2DModel.from_unet(baseline, stage_boundaries=boundaries).to(device).eval()
        fns = {
            "unet": lambda x=x: baseline(x, t),
            "copy": lambda x=x: control(x, t),
            "routed": lambda x=x, staged=staged: staged(x, t),
            "stage_index": lambda x=x, staged=staged, s=count // 2: staged(x, t, stage_index=s),  # t's stage
        }
        with torch.inference_mode():
            base = interleaved_medians({"unet": fns["unet"]}, 5, device, clock=clock)["unet"]
            extra = interleaved_medians(fns, args.repeats * 2, device, warmup=2, clock=clock, baseline="unet")
        name = f"forward, batch {batch}, {count} identical decoders"
        for path, label in (("routed", "routed from timestep"), ("stage_index", "stage_index given")):
            rows.append((f"{name}, {label} ({unit})", base * 1e3, (base + extra[path]) * 1e3, "ms"))
        rows.append(
            (f"{name}: null control, a copy of the U-Net ({unit})", base * 1e3, (base + extra["copy"]) * 1e3, "ms")
        )
    return rows


MIXED_CASES = ((2, 4), (3, 4), (8, 4), (16, 4), (2, 16), (3, 16), (8, 16), (16, 16))  # (stages, batch)


def mixed_batches(args, small) -> list[tuple]:
    """Section 4: a batch spread evenly over the stages (sample i in stage i mod stages) against the same batch in
    one stage (baseline column), decoded stage by stage and fused (`enable_fused_decoders`, any padding), on one
    thread (``--threads`` when given): the median wall time and this process's median CPU time (steadier on a shared machine), inference; one
    training step (forward and backward) at 8 stages and batch 16; at 8 stages and batch 16 (inference and the
    training step), the fused pass also with its parameters copied into a stack in every forward (without
    `stack_decoder_storage`'s layout); and a wider model at 4 stages and batch 16."""
    device, rows, threads = args.device, [], torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)  # one thread unless --threads says otherwise
    for count, batch in MIXED_CASES:
        models, fns, counts = mixed_case(small, count, batch, device, copied_stack=(count, batch) == (8, 16))
        name = f"mixed batch, {count} stages, batch {batch} ({'/'.join(str(n) for n in counts)})"
        with torch.inference_mode():
            rows += mixed_rows(name, fns(), args.repeats * 2, device)
        if (count, batch) == (8, 16):
            for model in models:
                model.train()
            rows += mixed_rows(f"{name}, training step", fns(training_step), args.repeats, device)
    # a wider model, where grouped convolutions cost more than the per-decoder calls they save
    wide = UNet2DModel(**encoder_kwargs(64, 32))
    _, fns, counts = mixed_case(wide, 4, 16, device)
    size, widths = wide.config.sample_size, tuple(wide.config.block_out_channels)
    name = f"mixed batch, widths {widths} at {size}x{size}, 4 stages, batch 16 ({'/'.join(str(n) for n in counts)})"
    with torch.inference_mode():
        rows += mixed_rows(name, fns(), args.repeats, device)
    torch.set_num_threads(threads)
    return rows


def mixed_case(unet: UNet2DModel, count: int, batch: int, device: str, copied_stack: bool = False) -> tuple:
    """``(models, fns, counts)``: ``models`` a per-stage and a fused copy of ``unet`` with ``count`` uniform stages,
    ``fns(step)`` the callables that run ``step(model, x, t)`` (default: a forward) on one input batch with its
    timesteps all in one stage ("single") and spread evenly, sample i in stage i mod ``count`` ("per_stage",
    "fused"; with ``copied_stack`` also "fused, stack copied": the fused pass with its decoders' parameters copied into a
    stack in every forward, as before `stack_decoder_storage` laid them out), and the samples per stage of the spread
    batch."""
    partition = TimestepPartition.uniform(count)
    staged, fused = (
        MultiStageUNet2DModel.from_unet(unet, stage_boundaries=partition.boundaries).to(device).eval()
        for _ in range(2)
    )
    fused.enable_fused_decoders(max_padding=float("inf"))
    # a deep copy gives every tensor storage of its own: the fused pass then copies the parameters into a stack
    fused_copied = copy.deepcopy(fused) if copied_stack else None
    edges = [0, *partition.boundaries]
    mixed = torch.tensor([edges[i % count] + 1 for i in range(batch)], device=device)
    single = torch.full((batch,), edges[count // 2] + 1, device=device)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device)
    counts = [n for n in torch.bincount(partition.stage_for_timestep(mixed.cpu())).tolist() if n]

    def fns(step=lambda model, x, t: model(x, t)) -> dict:
        return {
            "single": lambda: step(staged, x, single),
            "per_stage": lambda: step(staged, x, mixed),
            "fused": lambda: step(fused, x, mixed),
            **({"fused, stack copied": lambda: step(fused_copied, x, mixed)} if copied_stack else {}),
        }

    return [model for model in (staged, fused, fused_copied) if model is not None], fns, counts


def mixed_rows(name: str, fns: dict, repeats: int, device: str) -> list[tuple]:
    """Per-stage and fused against one stage: median wall time, then median process CPU time (interleaved)."""
    rows = []
    for clock, unit in ((time.perf_counter, "ms"), (time.process_time, "ms CPU")):
        times = interleaved_medians(fns, repeats, device, warmup=1, warmup_before_each=1, clock=clock)
        for path in (path for path in fns if path != "single"):
            rows.append((f"{name}: {path} vs one stage", times["single"] * 1e3, times[path] * 1e3, unit))
    return rows


LOAD_PEAK = """
import resource, sys
from diffusers_stages import MultiStageUNet2DModel
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = MultiStageUNet2DModel.from_pretrained(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def load_peak(small) -> list[tuple]:
    """Section 5: the peak resident memory `from_pretrained` adds, against the parameters (Linux; a subprocess)."""
    if not sys.platform.startswith("linux"):
        return []
    wide = UNet2DModel(**{**SMALL, "block_out_channels": (256, 512)})  # ~0.3 GB of parameters with 3 decoders
    staged = MultiStageUNet2DModel.from_unet(wide)
    with tempfile.TemporaryDirectory() as folder:
        staged.save_pretrained(folder)
        # -P: not the working directory's `diffusers_stages` (the checkout's folder shadows an installed package)
        command = [sys.executable, "-P", "-c", LOAD_PEAK, folder]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    peak, params = (float(v) for v in result.stdout.split()[-2:])
    return [("load: peak memory added vs parameter bytes", params / 2**20, peak / 2**20, "MiB")]


def pipeline_overhead(args, small) -> list[tuple]:
    """Section 6: time per denoising step of `MultiStagePipeline` (3 identical decoders) against `DDIMPipeline`, and
    of a second `DDIMPipeline` over a copy of the U-Net (null control); paired differences of CPU time as in
    section 3."""
    control = UNet2DModel.from_config(small.config).to(args.device).eval()
    control.load_state_dict(small.state_dict())
    staged = MultiStageUNet2DModel.from_unet(small).to(args.device).eval()
    pipes = {
        "base": DDIMPipeline(unet=small, scheduler=DDIMScheduler()),
        "copy": DDIMPipeline(unet=control, scheduler=DDIMScheduler()),
        "staged": MultiStagePipeline(unet=staged, scheduler=DDIMScheduler()),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    fns = {
        name: (lambda pipe=pipe: pipe(batch_size=1, num_inference_steps=args.steps, output_type="np"))
        for name, pipe in pipes.items()
    }
    clock, unit = host_clock(args.device)
    base = interleaved_medians({"base": fns["base"]}, 3, args.device, clock=clock)["base"] / args.steps
    extra = interleaved_medians(fns, args.repeats * 2, args.device, warmup=1, clock=clock, baseline="base")
    name = f"pipeline time per step (small model, batch 1, {unit})"
    return [
        (name, base * 1e3, (base + extra["staged"] / args.steps) * 1e3, "ms"),
        (
            f"{name}: null control, DDIMPipeline over a copy",
            base * 1e3,
            (base + extra["copy"] / args.steps) * 1e3,
            "ms",
        ),
    ]


def compiled_stages(args, small) -> list[tuple]:
    """Section 7: `compile_stages()` (inductor) on the small model with 3 identical decoders: compile time of the
    warm-up (every stage), and steady-state forward time against eager (baseline column: eager)."""
    device = args.device
    eager = MultiStageUNet2DModel.from_unet(small).to(device).eval()
    compiled = MultiStageUNet2DModel.from_unet(small).to(device).eval()
    x = torch.randn(4, 3, 16, 16, device=device)
    t = torch.tensor([10, 500, 900, 900], device=device)
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled.compile_stages(warmup={"sample": x, "timestep": t}, backend="inductor")
    with torch.no_grad():
        compiled(x, t)  # the mixed batch's sizes
    seconds = time.perf_counter() - start
    print(f"compile_stages (inductor) warm-up of {compiled.num_stages} stages + one mixed batch: {seconds:.1f} s")
    with torch.inference_mode():
        times = paired_medians(
            {"eager": lambda: eager(x, t, stage_index=1), "compiled": lambda: compiled(x, t, stage_index=1)},
            args.repeats * 2,
            device,
        )
    return [
        ("compile_stages (inductor) forward, batch 4, one stage", times["eager"] * 1e3, times["compiled"] * 1e3, "ms")
    ]


if __name__ == "__main__":
    main(parse_args())
