"""The demo's measurements and outputs: sampling with one scheduler and seed, FD-classifier, time and FLOPs per image,
a labelled sample grid per method, the quality-vs-time plot and the `REPORT.md` table."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw

from ..evaluation import Evaluator, count_flops
from ..training.checkpointing import publish_pipeline

NUM_CLASSES = 10
GRID_SCALE = 4  # 8x8 digits drawn as 32x32 (nearest neighbour)


@dataclass
class Row:
    """One method's line in the report."""

    method: str
    summary: str
    params: int
    train_steps: int
    train_tflops: float
    fd: float
    accuracy: float
    ms_per_image: float | None = None
    sampling_mflops: float | None = None
    folder: str = ""


def sampling_scheduler(config) -> DDPMScheduler:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) on a pipeline's training schedule, ``n`` evenly spaced
    steps from ``t = T - 1`` ("trailing"): every method samples with this one. At the demo's short training budgets
    it gives recognisable digits in 20 steps where deterministic DDIM still shows noise."""
    return DDPMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=True)


def _labels(num_images: int) -> torch.Tensor:
    return torch.arange(num_images) % NUM_CLASSES  # 0, 1, ..., 9, 0, 1, ...: every class equally often


@torch.no_grad()
def generate(pipeline, num_images: int, num_inference_steps: int, seed: int) -> tuple[torch.Tensor, float]:
    """``num_images`` class-conditional samples (grey, ``[-1, 1]``, on the CPU) and the wall time per image in
    seconds, after an untimed warm-up call."""
    pipeline(
        class_labels=[0, 1], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(seed)
    )
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize(pipeline.device)
    start = time.perf_counter()
    images = pipeline(
        class_labels=_labels(num_images), num_inference_steps=num_inference_steps, output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    ).images  # fmt: skip
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize(pipeline.device)
    seconds = (time.perf_counter() - start) / num_images
    return images.float().cpu().mean(1, keepdim=True) * 2 - 1, seconds  # RGB in [0, 1] -> grey in [-1, 1]


def sampling_flops(pipeline, num_inference_steps: int) -> int:
    """FLOPs of generating one image (the whole denoising loop)."""
    flops, _ = count_flops(
        lambda: pipeline(class_labels=[0], num_inference_steps=num_inference_steps, output_type="pt", generator=None)
    )
    return flops


def score(pipeline, evaluator: Evaluator, settings: dict) -> tuple[dict, torch.Tensor]:
    """Sample, time and score one pipeline: ``({"fd", "accuracy", "seconds", "flops"}, images)``."""
    steps = settings["num_inference_steps"]
    images, seconds = generate(pipeline, settings["num_eval_images"], steps, settings["seed"])
    pipeline.set_progress_bar_config(disable=True)
    result = evaluator.score(images, _labels(len(images)))
    result.update(seconds=seconds, flops=sampling_flops(pipeline, steps))
    pipeline.set_progress_bar_config(disable=False)
    return result, images


def save_grid(images: torch.Tensor, path: str, title: str, rows: int = 8) -> str:
    """A PNG of the first ``rows`` x 10 samples (column = class 0..9), upscaled, with a title and the class labels."""
    count = min(len(images), rows * NUM_CLASSES)
    rows = max(1, count // NUM_CLASSES)
    pixels = ((images[: rows * NUM_CLASSES, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    size = images.shape[-1] * GRID_SCALE
    pad, header = 2, 34
    canvas = Image.new("L", (NUM_CLASSES * (size + pad) + pad, header + rows * (size + pad) + pad), color=255)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title, fill=0)
    for col in range(NUM_CLASSES):
        draw.text((pad + col * (size + pad) + size // 2 - 3, header - 13), str(col), fill=0)
    for i, digit in enumerate(pixels):
        row, col = divmod(i, NUM_CLASSES)
        tile = Image.fromarray(digit.numpy(), mode="L").resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(tile, (pad + col * (size + pad), header + row * (size + pad)))
    canvas.save(path)
    return path


def save_plot(rows: list[Row], floor: dict, path: str) -> str:
    """Quality (FD-classifier) against sampling time per image, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, row in enumerate(rows):
        ax.scatter(row.ms_per_image, row.fd, s=60, color=f"C{i}", label=f"{row.method} ({row.params / 1e6:.2f}M)")
        ax.annotate(row.method, (row.ms_per_image, row.fd), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(floor["fd"], color="gray", ls="--", label=f"held-out real digits ({floor['fd']:.1f})")
    ax.set_xlabel("sampling time per image (ms)")
    ax.set_ylabel("FD-classifier (lower is better)")
    ax.set_yscale("log")
    ax.set_title("Quality vs sampling time (training budgets: REPORT.md)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(rows: list[Row], floor: dict) -> str:
    """The results table: one row per method, then the metric's floor (held-out real digits)."""
    lines = [
        (
            "| method | what | params | train steps | train TFLOPs | FD-classifier (lower is better) | accuracy "
            "| ms / image | sampling MFLOPs / image |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.summary} | {r.params / 1e6:.3f}M | {r.train_steps} | {r.train_tflops:.3f} "
            f"| {r.fd:.2f} | {r.accuracy:.3f} | {r.ms_per_image:.3f} | {r.sampling_mflops:.2f} |"
        )
    lines.append(
        f"| real digits | held-out test split ({floor['count']} images): the metric's floor | | | "
        f"| {floor['fd']:.2f} | {floor['accuracy']:.3f} | | |"
    )
    return "\n".join(lines)


def write_report(folder: str, header: list[str], rows: list[Row], floor: dict, table: str) -> None:
    """``REPORT.md`` (the table with how it was made) and ``report.json`` (every number), both or neither: written
    into a hidden folder, then moved into ``folder`` (`publish_pipeline`), so a failure leaves no partial report."""
    lines = ["# diffusers-stages demo", "", *header, "", table, "", "![quality vs time](quality_vs_time.png)", ""]
    lines += [f"![{r.method}](grid_{r.folder}.png)" for r in rows]

    def write(partial: str) -> None:
        with open(f"{partial}/REPORT.md", "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        with open(f"{partial}/report.json", "w", encoding="utf-8") as f:
            json.dump({"rows": [asdict(r) for r in rows], "real": floor}, f, indent=2)

    publish_pipeline(folder, write)
