"""Evidence benchmark: train, sample and score the three methods against their baselines, on real data, offline.

    python benchmarks/run_evidence.py --quick            # sklearn digits 8x8, < 10 min on 2 CPU cores
    python benchmarks/run_evidence.py                    # Fashion-MNIST 32x32, < 1 hour on 2 CPU cores
    python benchmarks/run_evidence.py --preset gpu       # Fashion-MNIST, larger models and budgets, one GPU

Writes ``<output_dir>/<preset>/RESULTS.md`` (table and verdicts), ``results.json`` and two PNG plots, and refreshes
the index ``<output_dir>/RESULTS.md``. ``--output_dir`` defaults to a new temporary folder; the committed results were
written with ``--output_dir benchmarks/results``. results.json is saved after every comparison; a run of some
comparisons (``--comparisons 3``, to finish a stopped run) keeps the folder's rows of the others when they were saved
with the same settings, code versions and machine (all recorded in its header).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import diffusers_stages  # noqa: F401  # the installed package, before the root's folder of that name could shadow it

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.evidence import comparisons as C
from benchmarks.evidence.presets import PRESETS, get_preset
from benchmarks.evidence.report import unreliable_timings, write_markdown, write_plots
from benchmarks.measure import (
    default_device,
    device_option,
    integer_at_least,
    output_folder,
    positive_int,
    write_json,
    write_text,
)

COMPARISONS = ("1", "2", "3")
CACHE_DIR = os.path.expanduser("~/.cache/diffusers-stages/evidence")  # the metric's classifier


def sample_count(text: str) -> int:
    """An argparse ``type``: the samples per score, an integer >= 2 (a Frechet distance needs two), else a usage
    error naming the option (it failed in the metric's floor, as a ValueError about `images`)."""
    return integer_at_least(text, 2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="(default: default)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument(
        "--comparisons", default=None, help=f"which comparisons to run, e.g. '1,3' (default: {','.join(COMPARISONS)})"
    )
    parser.add_argument(
        "--output_dir",
        type=output_folder,
        default=None,
        help="where results go (default: a new temporary folder, printed at the end; pass benchmarks/results to "
        "refresh the committed results)",
    )
    parser.add_argument(
        "--cache_dir",
        type=output_folder,
        default=None,
        help=f"where the metric's classifier is cached (default: {CACHE_DIR})",
    )
    parser.add_argument(
        "--device", type=device_option, default=None, help=f"(default: {default_device()}, this machine's)"
    )
    parser.add_argument(
        "--budget_steps", type=positive_int, default=None, help="override the preset's budget (baseline steps)"
    )
    parser.add_argument(
        "--num_eval_samples", type=sample_count, default=None, help="override the preset's sample count (>= 2)"
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="rewrite RESULTS.md and the plots from the preset's saved results.json, without running",
    )
    args = parser.parse_args(argv)
    if args.report_only:  # the saved run's settings are reported: an option of a run would be ignored
        for option in ("comparisons", "cache_dir", "device", "budget_steps", "num_eval_samples"):
            if getattr(args, option) is not None:
                parser.error(f"--{option} is not used with --report_only (the saved results are reported as run)")
    args.comparisons = ",".join(COMPARISONS) if args.comparisons is None else args.comparisons
    args.cache_dir = CACHE_DIR if args.cache_dir is None else args.cache_dir
    args.device = default_device() if args.device is None else args.device
    chosen = tuple(c.strip() for c in args.comparisons.split(",") if c.strip())
    if not chosen or any(c not in COMPARISONS for c in chosen) or len(set(chosen)) < len(chosen):
        parser.error(
            f"--comparisons must be a comma-separated subset of {','.join(COMPARISONS)}, each once, got "
            f"{args.comparisons!r}"
        )
    args.comparisons = chosen
    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"--quick is --preset quick, got --preset {args.preset}")
    args.preset = "quick" if args.quick else args.preset or "default"
    if args.report_only:
        if args.output_dir is None:
            parser.error("--report_only needs --output_dir (the folder holding <preset>/results.json)")
        saved = os.path.join(args.output_dir, args.preset, "results.json")
        if not os.path.isfile(saved):
            parser.error(
                f"--report_only needs --output_dir with the preset's results, got {args.output_dir!r}: no {saved}"
            )
    return args


def machine(device: torch.device) -> str:
    """The machine and the device the run used (not the GPU of a machine that has one, for a `--device cpu` run)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    return f"{platform.machine()} {name}, torch {torch.__version__}"


def versions() -> dict[str, str]:
    """The code that measured: the package (and its git commit when run from a checkout; not whether the checkout
    has local changes, which a run writing into ``benchmarks/results`` makes itself) and the libraries whose kernels,
    samplers and metric the numbers depend on."""
    import diffusers
    import torchmetrics

    package = diffusers_stages.__version__
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:  # no git, or not a checkout: the package's version alone
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            package += f" ({commit.stdout.strip()})"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "diffusers_stages": package,
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "torchmetrics": torchmetrics.__version__,
    }


def run(args) -> dict:
    start = time.perf_counter()
    overrides = {
        k: v
        for k, v in (("budget_steps", args.budget_steps), ("num_eval_samples", args.num_eval_samples))
        if v is not None
    }
    preset = get_preset(args.preset, **overrides)
    torch.manual_seed(preset.seed)
    ctx = C.Context(preset, torch.device(args.device), args.cache_dir)
    if args.output_dir is None:  # never into the checkout unless asked
        args.output_dir = tempfile.mkdtemp(prefix="diffusers-stages-evidence-")
    out_dir = os.path.join(args.output_dir, preset.name)
    os.makedirs(out_dir, exist_ok=True)
    print(f"writing results to {out_dir}")

    measured_by = {"machine": machine(ctx.device), "versions": versions()}  # kept rows must match these too
    kept, kept_from = saved_rows(out_dir, preset, args.comparisons, measured_by)

    def save(results):  # after every comparison, so that an interrupted run keeps what it measured
        header = {
            "command": "python benchmarks/run_evidence.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            **measured_by,
            "preset": preset.to_dict(),
            "reference": ctx.reference,
            "budget_flops": ctx.budget,
            "fd_seed_spread": ctx.fd_seed_spread,
            "wall_minutes": (time.perf_counter() - start) / 60,
            **({"kept": kept_from} if kept else {}),
        }
        rows = sorted(kept + [r.to_dict() for r in results], key=lambda r: r["comparison"])  # stable: in order
        write_json(os.path.join(out_dir, "results.json"), {"header": header, "results": rows})

    results = C.train_baseline(ctx)
    baseline = results[-1]
    if "1" not in args.comparisons:  # the baseline's snapshot rows belong to comparison 1's table only
        results = []
    steps = {
        "1": lambda: C.compare_multistage(ctx, baseline),
        "2": lambda: C.compare_experts(ctx, baseline),
        "3": lambda: C.compare_dual_backbone(ctx, baseline),
    }
    for comparison in args.comparisons:
        results += steps[comparison]()
        save(results)
    return write_outputs(args.output_dir, preset.name)


def saved_rows(
    out_dir: str, preset, comparisons: tuple[str, ...], measured_by: dict | None = None
) -> tuple[list[dict], str]:
    """The rows of the comparisons not run now from the folder's results.json, when it was written with the same
    settings, and by the same code on the same machine (the header's entries ``measured_by``) (a run stopped during
    comparison 3 is finished with ``--comparisons 3``), and where they came from; none otherwise (rows of other
    settings, code or machines are not comparable)."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        return [], ""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        same = saved["header"]["preset"] == json.loads(json.dumps(preset.to_dict()))  # tuples saved as lists
        same = same and all(saved["header"].get(key) == value for key, value in (measured_by or {}).items())
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"not keeping anything of {path}, which cannot be read: {type(error).__name__}: {error}")
        return [], ""
    if not same:
        return [], ""
    rows = [row for row in saved["results"] if row["comparison"] not in comparisons]
    done = sorted({row["comparison"] for row in rows})
    if rows:
        print(f"keeping comparison(s) {', '.join(done)} of {path} (same settings)")
    label = f"comparison {', '.join(done)} kept from `{saved['header']['command']}` on {saved['header']['date']}"
    return rows, label


def write_outputs(output_dir: str, preset_name: str) -> dict:
    """RESULTS.md and the plots of one preset from its results.json, and the index of all presets."""
    out_dir = os.path.join(output_dir, preset_name)
    with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
        saved = json.load(f)
    header, rows = saved["header"], saved["results"]
    write_plots(out_dir, rows, header["reference"]["fd"], header["fd_seed_spread"])
    write_markdown(os.path.join(out_dir, "RESULTS.md"), header, rows, header["fd_seed_spread"])
    write_index(output_dir)
    print(open(os.path.join(out_dir, "RESULTS.md"), encoding="utf-8").read())
    warning = unreliable_timings(rows)  # last, where it is seen
    if warning:
        print(f"warning: {warning}")
    return saved


def write_index(output_dir: str) -> None:
    """``RESULTS.md`` at the top of the results folder: one link per preset that has results."""
    lines = [
        "# Evidence benchmark results",
        "",
        "Each preset's table, verdicts and plots, written by `benchmarks/run_evidence.py`:",
        "",
    ]
    for name in sorted(PRESETS):
        path = os.path.join(output_dir, name, "results.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                header = json.load(f)["header"]
            lines.append(
                f"- [{name}]({name}/RESULTS.md): `{header['command']}`, {header['date']}, {header['machine']}"
            )
    write_text(os.path.join(output_dir, "RESULTS.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.report_only:
        write_outputs(arguments.output_dir, arguments.preset)
    else:
        run(arguments)
