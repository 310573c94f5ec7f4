"""Time and peak memory of stage planning (optimal-denoiser clustering) on 10,000 Fashion-MNIST images (28x28).

Set-up: Debian's `dataset-fashion-mnist` (install it yourself, `apt-get install dataset-fashion-mnist`: the benchmark
installs nothing), or scikit-learn's bundled 8x8 digits with ``--dataset digits``. The baseline, measured in the same
run, is the same computation without streaming: the softmax over the whole training set in one chunk
(``chunk_size = N``), as a direct implementation would hold it. Wall times are medians of ``--repeats`` runs. Peak
memory is the process's peak RSS (VmHWM, reset once the data are loaded; torch allocates outside `tracemalloc`)
above the RSS with the data loaded, each configuration in a fresh process. A last streamed run on the whole
training split (60,000 images) shows that memory does not grow with N^2. CUDA runs also print
`torch.cuda.max_memory_allocated`.

    python benchmarks/bench_planning.py [--num_images 10000] [--repeats 3] [--large 60000] [--plot plan.png]

``--compare`` instead compares the two boundary rules on the same data and similarity: the thresholded rule of
Algorithm 1 (``method="optimal_denoiser"``) and the integer program of the authors' code (``method="ilp"``), at the
package's default pixel tolerance (``eta=0.1``) and at the authors' (``4/256`` on ``[-1, 1]`` data), on the authors'
21-level grid and on the package's 100 levels:

    python benchmarks/bench_planning.py --dataset digits --compare

``--plot`` draws the curves of Algorithm 1 with its threshold ``alpha`` and the running means it is compared with.

``--budget_fd`` compares decoder widths at one sampling budget, the baseline `UNet2DModel`'s FLOPs per image of the
preset's DDIM steps: the widths `plan_stages(..., budget=...)` chooses, the paper's CIFAR-10 ratios (x1.5 / x1 /
x0.125 of the encoder, scaled as large as the budget allows) and uniform decoders (the encoder's widths: exactly the
budget). Every model is trained on the same training FLOPs as the baseline with the evidence harness
(`benchmarks/evidence`, planned boundaries, stage-stratified batches) and scored by FD-classifier:

    python benchmarks/bench_planning.py --budget_fd [--preset quick] [--budget_steps 120] [--num_eval_samples 500]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from diffusers import DDPMScheduler

from diffusers_stages.cli import write_atomically
from diffusers_stages.planning import NoiseSchedule, plan_stages, plot_plan, stage_difficulty
from diffusers_stages.planning.budget import expected_flops, widths_for_budget
from diffusers_stages.planning.methods import AUTHORS_ETA
from diffusers_stages.planning.sizing import scaled_widths

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.evidence.presets import PRESETS  # noqa: E402
from benchmarks.measure import _synchronize, default_device, device_option, non_negative_int, output_file, positive_int  # noqa: E402

FASHION_TRAIN = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def load_data(dataset: str, num_images: int) -> torch.Tensor:
    """The first ``num_images`` training images of ``dataset`` in ``[-1, 1]``."""
    if dataset == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing to download

        return torch.tensor(load_digits().images[:num_images], dtype=torch.float32)[:, None] / 8 - 1
    return fashion_mnist(num_images)


def fashion_mnist(num_images: int) -> torch.Tensor:
    """The first ``num_images`` training images as ``(N, 1, 28, 28)`` in ``[-1, 1]`` (idx3 format)."""
    if not os.path.exists(FASHION_TRAIN):
        raise SystemExit(
            f"{FASHION_TRAIN} is missing: install Debian's dataset-fashion-mnist (`apt-get install "
            "dataset-fashion-mnist`), or run with --dataset digits."
        )
    with gzip.open(FASHION_TRAIN, "rb") as f:
        header = f.read(16)
        count, rows, cols = (int.from_bytes(header[i : i + 4], "big") for i in (4, 8, 12))
        count = min(count, num_images)
        images = np.frombuffer(f.read(count * rows * cols), dtype=np.uint8).reshape(count, 1, rows, cols)
    return torch.from_numpy(images.astype(np.float32)) / 127.5 - 1


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # kB


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in MiB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _status_mib("VmRSS:")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM:")


def measure(num_images: int, chunk_size: int, args: argparse.Namespace) -> dict:
    """Plan ``--repeats`` times (seeds 0, 1, ...) in this process; wall times and peak memory above the data."""
    device = torch.device(args.device)  # the one planned on: `cuda:1` is not the current device
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), args.num_levels)
    data = load_data(args.dataset, num_images)
    num_images = len(data)  # fewer where the data set holds fewer (digits: 1,797)
    loaded = reset_peak_rss()
    times, fractions = [], []
    for seed in range(args.repeats):
        _synchronize(device)
        start = time.perf_counter()
        plan = plan_stages(
            data,
            schedule,
            3,
            num_samples=args.num_samples,
            chunk_size=chunk_size or num_images,
            device=args.device,
            generator=torch.Generator().manual_seed(seed),
        )
        _synchronize(device)
        times.append(time.perf_counter() - start)
        fractions.append([round(f, 4) for f in plan.fractions])
    if args.plot:  # atomically, as the plan command writes it: a run stopped while saving leaves no half file
        title = f"{args.dataset}, {num_images} images: optimal-denoiser clustering"
        write_atomically(args.plot, lambda path: plot_plan(plan, path, title=title))
    return {
        "num_images": num_images,
        "chunk_size": chunk_size or num_images,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_rss_above_data_mib": peak_rss_mib() - loaded,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "fractions": fractions,
    }


def compare_rules(args: argparse.Namespace) -> dict:
    """Boundaries (fractions of T) of the thresholded rule and of the integer program on the same data and draws."""
    data = load_data(args.dataset, args.num_images)
    print(f"{args.dataset}, {len(data)} images, K={args.num_samples} draws: boundaries as fractions of T")
    results = {}
    for num_levels in (21, args.num_levels):
        schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), num_levels)
        for eta_name, eta in (("0.1 (package default)", 0.1), ("4/256 (authors)", AUTHORS_ETA)):
            for method in ("optimal_denoiser", "ilp"):
                start = time.perf_counter()
                try:
                    plan = plan_stages(
                        data,
                        schedule,
                        3,
                        method=method,
                        eta=eta,
                        num_samples=args.num_samples,
                        device=args.device,
                        generator=torch.Generator().manual_seed(0),
                    )
                    found = [round(f, 4) for f in plan.fractions]
                except ValueError as error:  # the thresholded rule can leave no room for 3 stages
                    found = f"no plan: {str(error)[:60]}"
                seconds = time.perf_counter() - start
                results[f"{num_levels} levels, eta {eta_name}, {method}"] = found
                print(f"{num_levels:4d} levels  eta {eta_name:22s} {method:17s} {found}  ({seconds:.1f} s)")
    return results


def paper_widths_at_budget(config: dict, partition, budget: float, steps: int, scheduler) -> tuple:
    """The paper's decoder ratios (x1.5, x1, x0.125 of the encoder) times the largest factor (in steps of 1/16)
    whose expected sampling FLOPs stay within ``budget``."""
    block, groups = config["block_out_channels"], config["norm_num_groups"]
    for factor in np.arange(2.0, 0.0, -1 / 16):
        widths = [scaled_widths(block, ratio * factor, groups) for ratio in (1.5, 1.0, 0.125)]
        if expected_flops(config, partition, widths, steps, scheduler) <= budget:
            return tuple(widths)
    raise ValueError(f"No multiple of the paper's ratios fits {budget:.4g} FLOPs.")


def compare_widths_at_budget(args: argparse.Namespace) -> dict:
    """Planned vs the paper's ratios vs uniform decoders at the baseline's sampling FLOPs, FD-classifier of each."""
    from benchmarks.evidence import comparisons as C
    from benchmarks.evidence.presets import get_preset
    from benchmarks.evidence.sampling import sampling_scheduler
    from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel
    from diffusers_stages.timestep_sampling import stratified_timesteps

    overrides = (("budget_steps", args.budget_steps), ("num_eval_samples", args.num_eval_samples))
    p = get_preset(args.preset, **{k: v for k, v in overrides if v is not None})
    ctx = C.Context(p, torch.device(args.device), os.path.expanduser("~/.cache/diffusers-stages/evidence"))
    # 1. the baseline, trained on the whole training budget B, and how much FD moves with the sampling seed alone
    baseline = ctx.unet(p.block_out_channels)
    baseline.load_state_dict(ctx.train(baseline, C.uniform_timesteps(), ctx.budget)[-1].state_dict)
    pipe = C.single_model_pipeline(baseline.eval())
    rows = {"UNet2DModel": {"fd": ctx.score(pipe)["fd"], "fd_other_seed": ctx.score(pipe, seed_offset=1)["fd"]}}
    # 2. the sampling budget: the baseline's FLOPs per image; boundaries and difficulty from the planner
    partition, origin = C.plan_partition(ctx)
    config, scheduler, steps = ctx.unet_config(p.block_out_channels), sampling_scheduler(), p.num_inference_steps
    budget = expected_flops(config, partition, [p.block_out_channels] * 3, steps, scheduler)
    subset = ctx.images[
        torch.randperm(len(ctx.images), generator=torch.Generator().manual_seed(p.seed))[: p.plan_max_images]
    ]
    difficulty = stage_difficulty(subset, NoiseSchedule.from_scheduler(DDPMScheduler(), 100), partition)
    ctx.log(
        f"[budget] {budget / 1e6:.2f} MFLOPs per image ({steps} steps); boundaries {partition.boundaries} ({origin}); difficulty {difficulty}"
    )
    variants = {
        "planned for the budget": widths_for_budget(config, partition, difficulty, budget, steps, scheduler).widths,
        "paper's ratios": paper_widths_at_budget(config, partition, budget, steps, scheduler),
        "uniform": (tuple(p.block_out_channels),) * 3,
    }
    # 3. each variant trained on the baseline's training FLOPs, then scored
    for name, widths in variants.items():
        model = MultiStageUNet2DModel(**config, **partition.to_config(), decoder_block_out_channels=widths)
        (snap,) = ctx.train(model, lambda n, g: stratified_timesteps(partition, n, generator=g)[0], ctx.budget)
        model.load_state_dict(snap.state_dict)
        pipe = MultiStagePipeline(unet=model.eval(), scheduler=sampling_scheduler())
        pipe.set_progress_bar_config(disable=True)
        flops = expected_flops(config, partition, widths, steps, scheduler)
        rows[name] = {
            "widths": [list(w) for w in widths],
            "sampling_flops_vs_budget": flops / budget,
            "train_steps": snap.steps,
            "fd": ctx.score(pipe)["fd"],
        }
        ctx.log(f"[budget] {name}: {rows[name]}")
    return {
        "preset": p.name,
        "budget_flops_per_image": budget,
        "boundaries": list(partition.boundaries),
        "difficulty": difficulty,
        "reference_fd": ctx.reference["fd"],
        "rows": rows,
    }


def levels_option(text: str) -> int:
    """An argparse ``type``: a number of noise levels the planner takes (`NoiseSchedule.from_scheduler`'s check, on
    the DDPM schedule planned on here), else a usage error."""
    value = positive_int(text)
    try:
        NoiseSchedule.from_scheduler(DDPMScheduler(), value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=positive_int, default=10_000)
    parser.add_argument("--num_samples", type=positive_int, default=128)
    parser.add_argument("--num_levels", type=levels_option, default=100)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--large", type=non_negative_int, default=60_000, help="One more streamed run on this many images (0: skip)."
    )
    parser.add_argument("--device", type=device_option, default=default_device())
    parser.add_argument("--plot", type=output_file, default=None, help="Where to write a PNG of the plan's curves.")
    parser.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true", help="Compare the two boundary rules (see above).")
    mode.add_argument("--budget_fd", action="store_true", help="Widths at the baseline's FLOPs, by FD (see above).")
    parser.add_argument(
        "--preset", default=None, choices=sorted(PRESETS), help="The evidence preset of --budget_fd (default: quick)."
    )
    for name in ("--budget_steps", "--num_eval_samples"):  # --budget_fd: override the preset's training and samples
        parser.add_argument(name, type=positive_int, default=None)
    parser.add_argument("--worker", nargs=2, type=int, metavar=("NUM_IMAGES", "CHUNK_SIZE"), help=argparse.SUPPRESS)
    return parser


# what --compare and --budget_fd read besides --device (the timing run reads every option but --budget_fd's)
MODE_OPTIONS = {
    "compare": ("dataset", "num_images", "num_samples", "num_levels"),
    "budget_fd": ("preset", "budget_steps", "num_eval_samples"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with those of --budget_fd refused without it, and those --compare or --budget_fd do not read
    refused with it (the mode would ignore them)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    on_command_line = build_parser()
    for action in on_command_line._actions:
        action.default = argparse.SUPPRESS  # only the options given are parsed into the namespace
    given_options = set(vars(on_command_line.parse_args(argv)))
    for mode, read in MODE_OPTIONS.items():
        ignored = sorted(given_options - {"device", mode, *read}) if getattr(args, mode) else []
        if ignored:
            parser.error(f"{', '.join('--' + name for name in ignored)} is not used with --{mode}.")
    given = [
        name
        for name in ("preset", "budget_steps", "num_eval_samples")
        if getattr(args, name) != parser.get_default(name)
    ]
    if given and not args.budget_fd:
        parser.error(
            f"{', '.join('--' + name for name in given)} set what --budget_fd measures: give --budget_fd too."
        )
    args.preset = args.preset or "quick"  # None until here: a --preset given without --budget_fd is seen
    return args


def main() -> None:
    args = parse_args()
    if args.worker:  # one configuration in a fresh process, so that its peak RSS is its own
        print(json.dumps(measure(*args.worker, args)))
        return
    if args.budget_fd:
        result = compare_widths_at_budget(args)
        print("\n".join(f"{name:>24}: FD-classifier {row['fd']:.2f}  {row}" for name, row in result["rows"].items()))
        print(json.dumps(result))
        return
    if args.compare:
        print(json.dumps(compare_rules(args)))
        return

    def in_subprocess(num_images: int, chunk_size: int, repeats: int, plot: str | None = None) -> dict:
        command = [
            sys.executable,
            __file__,
            "--worker",
            str(num_images),
            str(chunk_size),
            "--repeats",
            str(repeats),
            "--num_samples",
            str(args.num_samples),
            "--num_levels",
            str(args.num_levels),
            "--device",
            args.device,
            "--dataset",
            args.dataset,
        ]
        command += ["--plot", plot] if plot else []
        # only the row is read: the worker's errors go to the terminal
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(
                f"The worker planning {num_images} images failed (exit status {result.returncode}): see above."
            )
        return json.loads(result.stdout)

    load_data(args.dataset, 1)  # a missing data set: what to install, before any worker starts
    print(
        f"{args.dataset}, device {args.device}, {torch.get_num_threads()} threads, K={args.num_samples} draws, "
        f"{args.num_levels} levels; peak RSS is measured above the RSS with the data loaded, one process per row"
    )
    rows = {
        "streamed (chunks of 1024)": in_subprocess(args.num_images, 1024, args.repeats, args.plot),
        "baseline: one chunk of N": in_subprocess(args.num_images, 0, args.repeats),
    }
    if args.large:
        rows[f"streamed, {args.large} images"] = in_subprocess(args.large, 1024, 1)
    for name, row in rows.items():
        cuda = f", CUDA peak {row['cuda_peak_mib']:.0f} MiB" if row["cuda_peak_mib"] is not None else ""
        times = [round(t, 2) for t in row["times_s"]]
        print(
            f"{name:>28}: N={row['num_images']}, median {row['median_s']:7.2f} s {times}, "
            f"peak RSS +{row['peak_rss_above_data_mib']:.0f} MiB{cuda}; boundaries (fraction of T) {row['fractions']}"
        )
    streamed, direct = rows["streamed (chunks of 1024)"], rows["baseline: one chunk of N"]
    n, large = streamed["num_images"], rows[f"streamed, {args.large} images"]["num_images"] if args.large else 0
    spread = np.ptp(np.array(streamed["fractions"]), axis=0).max()
    print(
        f"streamed / baseline: wall time {streamed['median_s'] / direct['median_s']:.2f}x, peak memory "
        f"{streamed['peak_rss_above_data_mib'] / direct['peak_rss_above_data_mib']:.2f}x; same boundaries: "
        f"{streamed['fractions'] == direct['fractions']}; spread over {args.repeats} seeds {spread:.4f} of T; "
        f"an N x N float64 matrix: {n**2 * 8 / 2**20:.0f} MiB at N={n}"
        + (f", {large**2 * 8 / 2**30:.1f} GiB at N={large}" if args.large else "")
    )
    if args.plot:
        print("plot:", args.plot)
    print(json.dumps({"device": args.device, **rows}))


if __name__ == "__main__":
    main()
