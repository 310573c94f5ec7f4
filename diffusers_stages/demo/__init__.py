"""`diffusers-stages demo`: the package's main job end to end, on data that ships with scikit-learn (no download).

1. Loads sklearn's 8x8 digits, writes the training split as an image folder (one sub-folder per class) and trains
   the metric's classifier (FD-classifier, `diffusers_stages.evaluation`).
2. Plans three stages with the optimal-denoiser algorithm (`plan_stages`) and sizes the decoders.
3. Trains, with the package's Accelerate loop and each method's own task (as `examples/*/train_*.py` do), a
   `UNet2DModel` baseline (its training FLOPs are the budget B), a `MultiStageUNet2DModel` on B, the shallow half
   of a dual backbone on B/4 (the baseline is its deep half) and two routed experts on B/2.
4. Samples every pipeline with one scheduler (ancestral DDPM, 20 steps) and seed, scores it and times it.
5. Writes the pipelines (`from_pretrained` folders), a labelled sample grid per method, a quality-vs-time plot and
   `REPORT.md` into the output folder, and prints the table.

```bash
diffusers-stages demo                      # about 2-5 minutes on 2 CPU cores
diffusers-stages demo --quick              # a smoke run in well under a minute
```
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from ..cli import check_seed, existing_ancestor, is_writable_folder

SIZES = {
    # steps: the baseline's training steps (every other method gets its FLOPs); eval: images scored per method
    "default": {"steps": 240, "batch_size": 32, "learning_rate": 2e-3, "num_inference_steps": 20,
                "num_eval_images": 200, "classifier_steps": 200, "plan_images": 1437, "plan_samples": 16},
    "quick": {"steps": 3, "batch_size": 16, "learning_rate": 2e-3, "num_inference_steps": 3, "num_eval_images": 40,
              "classifier_steps": 20, "plan_images": 200, "plan_samples": 2},
}  # fmt: skip
NUM_EXPERTS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="diffusers-stages demo",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--output_dir", default=None, help="A new or empty folder. Default: ./diffusers-stages-demo-<time>-<pid>."
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Training budget B: the baseline's steps (240; 3 with --quick), in FLOPs the multi-stage U-Net's; "
        "the shallow backbone gets B/4, the experts B/2.",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu. Default: cuda when available, else cpu.")
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of training, planning and sampling, in [0, 2**32). Default: 0."
    )
    parser.add_argument("--quick", action="store_true", help="Tiny budgets: a smoke run in well under a minute.")
    parser.add_argument("--num_threads", type=int, default=1,
                        help="CPU threads of torch, at most the machine's CPU cores. The demo's models are tiny, so "
                        "more threads gain little, while on a busy machine they can be many times slower (threads "
                        "waiting for each other); one thread also gives the same numbers on every machine. "
                        "Default: 1.")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags with a ValueError naming the flag; fills in the defaults that depend on the machine."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"`--steps` must be a positive integer, got {args.steps}.")
    if args.num_threads < 1:
        raise ValueError(f"`--num_threads` must be a positive integer, got {args.num_threads}.")
    cores = os.cpu_count() or 1
    if args.num_threads > cores:  # torch starts them all: far past the cores, thread creation fails (a crash)
        raise ValueError(f"`--num_threads` must be at most the {cores} CPU cores here, got {args.num_threads}.")
    check_seed(args.seed)  # what the training loop accepts, checked before any work
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"`--device` must be 'cpu' or 'cuda', got {args.device!r}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda`: no CUDA device is available here; use `--device cpu`.")
    if args.output_dir is None:  # the process id: runs started in the same second each get their own folder
        stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        args.output_dir = os.path.abspath(f"diffusers-stages-demo-{stamp}")
    if not args.output_dir:
        raise ValueError("`--output_dir` must name a folder, got ''.")
    if os.path.exists(args.output_dir) and (not os.path.isdir(args.output_dir) or os.listdir(args.output_dir)):
        raise ValueError(f"`--output_dir` {args.output_dir!r} exists and is not an empty folder: give a new one.")
    if os.path.isdir(args.output_dir):  # empty: the demo writes only inside it
        if not os.access(args.output_dir, os.W_OK):
            raise ValueError(f"`--output_dir` {args.output_dir!r} cannot be written: it is not a writable folder.")
        return
    parent = existing_ancestor(args.output_dir)  # the folders the demo will create: it must take them
    if not is_writable_folder(parent):
        raise ValueError(f"`--output_dir` {args.output_dir!r} cannot be created: {parent!r} is not a writable folder.")


def settings_of(args: argparse.Namespace) -> dict:
    """The run's sizes: the preset (`--quick` or default) with `--steps` and `--seed` applied."""
    settings = dict(SIZES["quick" if args.quick else "default"], seed=args.seed, num_classes=10)
    if args.steps is not None:
        settings["steps"] = args.steps
    return settings


def header_lines(args: argparse.Namespace, settings: dict, minutes: float) -> list[str]:
    """How the report was made: command, machine, date, data, budgets, metric."""
    cores = os.cpu_count()
    machine = f"{platform.machine()}, {cores} CPU cores" if args.device == "cpu" else torch.cuda.get_device_name()
    command = (
        f"`diffusers-stages demo{' --quick' if args.quick else ''} --steps {settings['steps']} --seed {args.seed}` on "
        f"{datetime.date.today().isoformat()}, {machine} ({args.device}, {args.num_threads} torch thread(s)), "
        f"{minutes:.1f} min end to end."
    )
    data = (
        f"Data: scikit-learn digits (8x8, 1,437 training images, class-conditional). Every method trains with the "
        f"package's Accelerate loop; B = the training FLOPs of {settings['steps']} baseline steps (batch "
        f"{settings['batch_size']}, lr {settings['learning_rate']:g}, EMA) and samples with ancestral DDPM, "
        f"{settings['num_inference_steps']} steps, seed {args.seed}, {settings['num_eval_images']} images (balanced "
        "classes). FD-classifier: Frechet distance on the features of a small CNN trained on the training images "
        "(not FID; comparable only within this report). Accuracy: that classifier on the class-conditional samples. "
        "Timing depends on the machine and its load; every other number is the same for the same seed on CPU."
    )
    return [command, "", data]


def main(argv: list[str] | None = None) -> int:
    """Run the demo (``argv`` default: ``sys.argv[1:]``); exit status 0 on success."""
    from .run import run_demo

    args = parse_args(argv)
    start = time.perf_counter()
    run_demo(args, settings_of(args), start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
