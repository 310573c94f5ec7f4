"""What only an accelerator can show about the three pipelines, in one run of a few minutes (issue 16's GPU items).

1. Synchronisations: a staged model's forward with ``stage_index`` reads no tensor value on the host, so on CUDA it
   must run under `torch.cuda.set_sync_debug_mode("error")`; the routed forward (no ``stage_index``) reads the
   timesteps' range and the stage counts, and the number of synchronisations it makes is reported, with the lines
   that made them (a synchronising ``stage_index`` forward names its line too).
2. Precision: `MultiStagePipeline` (a warm-started 3-stage U-Net), `ExpertRoutingPipeline` (4 MEME iU-Net experts)
   and `DualBackbonePipeline` (a DuoDiff U-ViT pair) sampled in float32, float16 and bfloat16 from one seed: whether
   every image is finite, the largest difference to float32, and the median time of a run.
3. Compilation: each pipeline's networks compiled (`compile_stages()` for the staged models, `torch.compile` for the
   U-ViTs), the first run's time (compiling included), the compiled run's median time against the eager one, and
   the graphs compiled in the first run and in a second one (which must compile none).
4. Fused decoders on the device: `enable_fused_decoders()` lays the staged U-Net's decoders out as one stack per
   parameter name; a mixed batch (every stage present) decoded in one fused pass against stage by stage, whether the
   pass read the stack as a view (no copy), and whether a safetensors round trip (`save_model`/`load_model`, which
   refuse tensors that share storage, as accelerate's `save_state` drops them) keeps every decoder's weights.

Every row is printed as a Markdown table and written to ``--output_dir/gpu_checks.json`` (``{"header": ..., "results":
[...]}``, the header the command, date, machine and versions) as soon as its section ends,
so that a run stopped by a time limit keeps what it finished: sections 1, 2 and 4 run first, then section 3 one
pipeline at a time. A section that fails is one row with its error, and the sections after it still run. The last
line names the checks that failed (a section's error, a synchronising ``stage_index`` forward, images that are not
finite, a stack copied or weights lost by the fused decoders, a second compiled run that compiled), and the exit
status is then 1.

    python benchmarks/gpu_checks.py --device cuda --output_dir benchmarks/results/gpu
    python benchmarks/gpu_checks.py --device cpu --quick     # a smoke run: tiny models, `eager` compile backend

`benchmarks/gpu_session.sh` runs this script and the GPU runs of the other benchmarks in one command.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging

from diffusers_stages import (
    DualBackbonePipeline,
    ExpertRoutingModel,
    ExpertRoutingPipeline,
    MultiStagePipeline,
    MultiStageUNet2DModel,
    TimestepPartition,
)
from diffusers_stages.models import build_meme_experts
from diffusers_stages.models.uvit import UViT2DModel, dual_uvit_configs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.measure import _synchronize, default_device, device_option, output_folder, positive_int, write_json
from benchmarks.run_evidence import machine, versions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's warning under set_sync_debug_mode("warn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", type=device_option, default=default_device())
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 steps, `eager` compile backend")
    parser.add_argument("--steps", type=positive_int, default=20, help="DDIM steps of a sampling run")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs (medians are reported)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; --quick: eager)")
    parser.add_argument(
        "--output_dir", type=output_folder, default=None, help="where gpu_checks.json goes (default: nowhere)"
    )
    args = parser.parse_args(argv)
    if args.quick:  # defaults only: the options given with it keep their values
        parser.set_defaults(steps=2, batch_size=2, repeats=1)
        args = parser.parse_args(argv)
    args.command = "python benchmarks/gpu_checks.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.backend = args.backend or ("eager" if args.quick else "inductor")
    if args.backend not in torch.compiler.list_backends(exclude_tags=()):
        parser.error(
            f"--backend must be a torch.compile backend {torch.compiler.list_backends()}, got {args.backend!r}"
        )
    return args


def build_pipelines(quick: bool) -> dict[str, object]:
    """The three pipelines, float32 on the CPU: small models (32x32 RGB; 8x8 with ``quick``), untrained weights
    (what is measured does not depend on them)."""
    size, width, heads = (8, 16, 2) if quick else (32, 64, 4)
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=size, block_out_channels=(width, 2 * width), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    experts = build_meme_experts(
        num_experts=4, block_out_channels=[(width, 2 * width)] * 2 + [(width // 2, width)] * 2, sample_size=size,
        in_channels=3, layers_per_block=1, norm_num_groups=8,
    )  # fmt: skip
    configs = dual_uvit_configs(3, 7, hidden_size=8 * heads, patch_size=2, num_attention_heads=heads, sample_size=size)
    return {
        "MultiStagePipeline": MultiStagePipeline(
            unet=MultiStageUNet2DModel.from_unet(unet), scheduler=DDIMScheduler()
        ),
        "ExpertRoutingPipeline": ExpertRoutingPipeline(
            experts=ExpertRoutingModel(experts, stage_boundaries=TimestepPartition.uniform(4).boundaries),
            scheduler=DDIMScheduler(),
        ),
        "DualBackbonePipeline": DualBackbonePipeline(
            shallow=UViT2DModel(**configs["shallow"]), deep=UViT2DModel(**configs["deep"]), scheduler=DDIMScheduler()
        ),
    }


def networks(pipe) -> list[torch.nn.Module]:
    """The denoisers of a pipeline: its staged model, or the two backbones of a dual-backbone pipeline."""
    if isinstance(pipe, DualBackbonePipeline):
        return [pipe.shallow, pipe.deep]
    return [pipe.unet if isinstance(pipe, MultiStagePipeline) else pipe.experts]


def sample(pipe, args: argparse.Namespace) -> tuple[np.ndarray, float]:
    """One sampling run from seed 0: the images (float32 array) and the seconds it took."""
    generator = torch.Generator(args.device).manual_seed(0)
    _synchronize(torch.device(args.device))
    start = time.perf_counter()
    images = pipe(batch_size=args.batch_size, num_inference_steps=args.steps, generator=generator, output_type="pt")
    _synchronize(torch.device(args.device))
    return images.images.float().cpu().numpy(), time.perf_counter() - start


def median_time(pipe, args: argparse.Namespace) -> float:
    return statistics.median(sample(pipe, args)[1] for _ in range(args.repeats))


def synchronisations(pipes: dict, args: argparse.Namespace) -> list[dict]:
    """Section 1 (CUDA only): the ``stage_index`` forward under sync-debug mode "error", and the routed forward's
    synchronisations counted under "warn"."""
    if torch.device(args.device).type != "cuda":
        return [{"section": "sync", "check": "skipped: set_sync_debug_mode needs CUDA", "result": None}]
    rows = []
    for name in ("MultiStagePipeline", "ExpertRoutingPipeline"):
        (model,) = networks(pipes[name])
        model.to(args.device)
        size = pipes[name].stage_denoiser(0)[0].config.sample_size  # the size the pipeline samples by default
        x = torch.randn(args.batch_size, 3, size, size, device=args.device)
        t = torch.full((args.batch_size,), 10, device=args.device)
        with torch.no_grad():
            model(x, t)  # warm-up: lazy initialisations may synchronise
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x, t, stage_index=0)
                result = "no synchronisation"
            except RuntimeError as error:
                if SYNC_WARNING not in str(error):
                    raise  # another failure: the section's error row, not a synchronisation
                frame = _outside_torch(traceback.extract_tb(error.__traceback__))[-1]
                result = f"synchronised at {_place(frame.filename, frame.lineno)}: {error}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model(x, t)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        rows.append({"section": "sync", "check": f"{name}: forward with stage_index", "result": result})
        syncs = [w for w in caught if SYNC_WARNING in str(w.message)]  # not other warnings of the call
        places = collections.Counter(_place(w.filename, w.lineno) for w in syncs)  # the lines that called them
        rows.append(
            {
                "section": "sync",
                "check": f"{name}: routed forward, synchronisations",
                "result": len(syncs),
                "where": ", ".join(f"{place} x{n}" for place, n in places.items()),
            }
        )
        model.to("cpu")
    return rows


def _outside_torch(frames: list) -> list:
    """The frames of a traceback outside torch's own files (the code that called the synchronising op), else all."""
    torch_dir = os.path.dirname(torch.__file__)
    return [f for f in frames if not f.filename.startswith(torch_dir)] or frames


def _place(filename: str, lineno: int) -> str:
    """``folder/file.py:line``: enough to find a line of the package, diffusers or torch."""
    return f"{os.path.join(*filename.split(os.sep)[-2:])}:{lineno}"


def precisions(pipes: dict, args: argparse.Namespace) -> list[dict]:
    """Section 2: each pipeline in float32, float16 and bfloat16 from one seed."""
    rows = []
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        reference = None
        try:
            for dtype_name, dtype in DTYPES.items():
                pipe.to(args.device, dtype)
                images, _ = sample(pipe, args)
                reference = images if reference is None else reference
                rows.append(
                    {
                        "section": "precision",
                        "check": f"{name}, {dtype_name}",
                        "finite": bool(np.isfinite(images).all()),
                        "max_abs_diff_to_float32": float(np.abs(images - reference).max()),
                        "median_seconds": median_time(pipe, args),
                    }
                )
        finally:  # also after a failed run: the later sections measure these pipelines in float32
            pipe.to("cpu", torch.float32)
    return rows


def compilation(pipes: dict, args: argparse.Namespace) -> list[dict]:
    """Section 3: each pipeline's networks compiled, against eager, with the graphs each run compiled."""
    from torch._dynamo.utils import counters

    rows = []
    for name, pipe in pipes.items():
        pipe.to(args.device, torch.float32)
        eager, _ = sample(pipe, args)
        eager_time = median_time(pipe, args)
        for network in networks(pipe):
            if hasattr(network, "compile_stages"):
                network.compile_stages(backend=args.backend)
            else:
                network.compile(backend=args.backend)
        graphs = counters["stats"]["unique_graphs"]
        compiled, first_time = sample(pipe, args)  # compiles every region it reaches
        first_graphs = counters["stats"]["unique_graphs"] - graphs
        sample(pipe, args)
        again = counters["stats"]["unique_graphs"] - graphs - first_graphs
        rows.append(
            {
                "section": "compile",
                "check": f"{name} ({args.backend})",
                "first_run_seconds": first_time,
                "graphs_first_run": first_graphs,
                "graphs_second_run": again,
                "compiled_over_eager_time": median_time(pipe, args) / eager_time,
                "max_abs_diff_to_eager": float(np.abs(compiled - eager).max()),
            }
        )
        pipe.to("cpu")
    return rows


def fused_decoders(pipes: dict, args: argparse.Namespace) -> list[dict]:
    """Section 4: the staged U-Net's fused decoders on the device (layout, results, state dict)."""
    from safetensors.torch import load_model, save_model

    from diffusers_stages.models import decoders

    source = networks(pipes["MultiStagePipeline"])[0]
    model = MultiStageUNet2DModel.from_config(source.config)  # an uncompiled copy: compiled decoders do not fuse
    model.load_state_dict(source.state_dict())
    model.to(args.device)
    count = model.partition.num_stages
    size = model.config.sample_size
    x = torch.randn(2 * count, model.config.in_channels, size, size, device=args.device)
    edges = [0, *model.partition.boundaries]
    t = torch.tensor([edges[i % count] + 1 for i in range(2 * count)], device=args.device)  # every stage, twice
    with torch.no_grad():
        per_stage = model(x, t).sample
        model.enable_fused_decoders()
        fused = model(x, t).sample
    _, tensors = decoders._fusable(list(model.decoders))
    views = sum(decoders._consecutive_rows(stage_tensors) for stage_tensors in zip(*tensors))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        try:
            save_model(model, path)
            reloaded = MultiStageUNet2DModel.from_config(model.config).to(args.device)
            load_model(reloaded, path)
            state = model.state_dict()
            saved = f"{sum(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())} of {len(state)} equal"
        except Exception as error:  # reported, not raised: the other rows still count
            saved = f"failed: {type(error).__name__}: {error}"
    return [
        {
            "section": "fused",
            "check": "fused vs per-stage mixed batch, max abs diff",
            "result": float((fused - per_stage).abs().max()),
        },
        {
            "section": "fused",
            "check": "parameter stacks the fused pass reads as views",
            "result": f"{views} of {len(tensors[0])}",
        },
        {"section": "fused", "check": "safetensors save_model/load_model round trip", "result": saved},
    ]


def run_header(args: argparse.Namespace) -> dict:
    """What the results file records besides its rows, as `run_evidence.py`'s results.json does: the command, the
    date, the machine and device, and the versions of the code that measured."""
    return {
        "command": args.command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(torch.device(args.device)),
        "versions": versions(),
    }


def report(rows: list[dict], output_dir: str | None, all_rows: list[dict], header: dict) -> None:
    """Print ``rows`` as a Markdown table and rewrite ``output_dir/gpu_checks.json`` with ``header`` (`run_header`)
    and every row so far (``{"header": ..., "results": [...]}``)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        print("| " + " | ".join(cells) + " |")
    all_rows += rows
    if output_dir is not None:
        # atomically: a run stopped by its time limit while writing keeps the rows written before
        write_json(os.path.join(output_dir, "gpu_checks.json"), {"header": header, "results": all_rows})


def sections(pipes: dict, args: argparse.Namespace):
    """``(name, run)`` of each section in the order they run: the quick ones first, then compilation (minutes with
    inductor) one pipeline at a time, so that a run stopped by a time limit keeps every row it finished."""
    yield "sync", lambda: synchronisations(pipes, args)
    yield "precision", lambda: precisions(pipes, args)
    yield "fused", lambda: fused_decoders(pipes, args)
    for name in pipes:
        yield f"compile {name}", lambda name=name: compilation({name: pipes[name]}, args)


def failed_checks(rows: list[dict]) -> list[str]:
    """The checks among ``rows`` that failed, by name: a section that raised, a ``stage_index`` forward that
    synchronised, images that are not finite, fused decoders that did not read every stack as a view or lost
    weights in the safetensors round trip, and a second compiled run that compiled again. The measured figures
    (differences, times, the routed forward's synchronisations) are reported, not judged."""
    failed = []
    for row in rows:
        check, result = row.get("check", ""), row.get("result")
        if "error" in row:
            failed.append(f"{row['section']} ({row['error']})")
        elif check.endswith("forward with stage_index") and str(result).startswith("synchronised"):
            failed.append(check)
        elif row.get("finite") is False or row.get("graphs_second_run", 0) > 0:
            failed.append(check)
        elif check.startswith(("parameter stacks", "safetensors")):
            count, _, total = str(result).removesuffix(" equal").partition(" of ")
            if count != total:
                failed.append(check)
    return failed


def main(args: argparse.Namespace) -> list[dict]:
    """Every section's rows; a section that raises is one row with its ``error`` (its traceback on stderr), and
    the sections after it still run. The last line names the checks that failed (`failed_checks`)."""
    diffusers_logging.set_verbosity_error()  # not diffusers' warning on every `.to(dtype)`
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.steps} DDIM steps, batch {args.batch_size}")
    pipes, all_rows, header = build_pipelines(args.quick), [], run_header(args)
    for section, run in sections(pipes, args):
        try:
            rows = run()
        except Exception as error:  # reported, not raised: one device run must still measure what it can
            traceback.print_exc()
            rows = [{"section": section, "check": "failed", "error": f"{type(error).__name__}: {error}"}]
        report(rows, args.output_dir, all_rows, header)
    print(f"\nfailed checks: {'; '.join(failed_checks(all_rows)) or 'none'}")
    return all_rows


if __name__ == "__main__":
    sys.exit(1 if failed_checks(main(parse_args())) else 0)
