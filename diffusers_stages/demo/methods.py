"""The demo's methods, each trained by the package's own Accelerate loop (`diffusers_stages.training.train`) with the
arguments of its example script (`examples/*/train_*.py`), on the digits written out as an image folder.

Budgets are training FLOPs (forward and backward of one training step, measured with `FlopCounterMode`), in units of
B = the baseline's ``steps`` steps: the multi-stage U-Net gets B (the equal-compute comparison); the dual backbone
reuses the baseline as its deep U-Net and trains only its shallow one (B/4, `--backbones shallow`); the experts get
B/2 together. Each method runs as many steps as fit its budget.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

from ..evaluation import count_flops
from ..loss import diffusion_loss
from ..models.expert_routing import expert_folder
from ..pipelines import DualBackbonePipeline
from ..pipelines.pipeline_dual_backbone import DEFAULT_SWITCH_STEP_FRACTION
from ..timestep_sampling import MEME_OWN_INTERVAL_PROBABILITIES  # expert n trains on its own interval with p_n
from ..training import DualBackboneTask, ExpertTask, MultiStageTask, TrainingTask, build_parser, train
from ..training.args import default_block_types
from ..training.checkpointing import publish_pipeline
from ..training.tasks import noise_schedulers

# the shared U-Net shape: two resolution levels (8x8 and 4x4), self-attention at 4x4
UNET_SHAPE = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8}
# the demo's shallow backbone: half the baseline's width, one layer per block (DuoDiff's shallow U-ViT keeps the
# deep one's width and has fewer blocks: 3 of 13)
SHALLOW_WIDTHS = (16, 32)
EXPERT_WIDTHS = (16, 32)  # the demo's MEME experts: half the baseline's width each


@dataclass
class Method:
    """One row of the report: a name, the task (the training script's method) and its script arguments."""

    name: str
    folder: str
    task_class: type[TrainingTask]
    task_args: dict = field(default_factory=dict)
    summary: str = ""
    budget: float = 1.0  # training FLOPs in units of B (the baseline's)


def methods(boundaries: list[float], decoder_widths: tuple, num_experts: int, config_path: str) -> list[Method]:
    """The four methods: the baseline first (it sets the FLOP budget)."""
    expert_args = {"expert_index": None, "expert_attention_shares": None, "assemble_experts": None}
    return [
        Method(
            "UNet2DModel", "unet2d", ExpertTask,
            {**expert_args, "num_experts": 1, "assignment": "hard", "own_interval_probability": None,
             "expert_block_out_channels": None, "model_config": config_path,
             **dict.fromkeys(UNET_SHAPE)},  # the config gives the shape (the same UNET_SHAPE)
            "one U-Net for every step (the baseline)",
        ),
        Method(
            "MultiStageUNet2DModel", "multistage", MultiStageTask,
            {"stage_boundaries": tuple(boundaries), "decoder_block_out_channels": decoder_widths},
            f"shared encoder, decoders {'/'.join(str(w[0]) for w in decoder_widths)} wide for t in "
            f"{_intervals(boundaries)}",
        ),
        Method(
            "DualBackbonePipeline", "dual_backbone", DualBackboneTask,
            {"backbones": "shallow", "shallow_block_out_channels": SHALLOW_WIDTHS, "shallow_layers_per_block": 1,
             "switch_step_fraction": DEFAULT_SWITCH_STEP_FRACTION, "switch_timestep": None},
            f"a shallow {SHALLOW_WIDTHS[0]}-wide U-Net (trained on B/4) runs the first {DEFAULT_SWITCH_STEP_FRACTION:.0%} of "
            "the steps, the baseline U-Net the rest",
            0.25,
        ),
        Method(
            "ExpertRoutingPipeline", "experts", ExpertTask,
            {**expert_args, "num_experts": num_experts, "assignment": "soft",
             "own_interval_probability": MEME_OWN_INTERVAL_PROBABILITIES[:num_experts],
             "expert_block_out_channels": (EXPERT_WIDTHS,) * num_experts},
            f"{num_experts} MEME experts ({EXPERT_WIDTHS[0]} wide) on uniform intervals, soft assignment "
            f"{MEME_OWN_INTERVAL_PROBABILITIES[:num_experts]}, trained on B/2 together",
            0.5,
        ),
    ]  # fmt: skip


def _intervals(boundaries: list[float]) -> str:
    edges = [0, *[round(b) for b in boundaries], 1000]
    return ", ".join(f"[{lo}, {hi})" for lo, hi in itertools.pairwise(edges))


def write_image_folder(images: np.ndarray, labels: np.ndarray, folder: str) -> str:
    """Write 8-bit grey images as ``folder/<label>/<index>.png`` (one sub-folder per class, as `--class_conditional`
    reads them) and return ``folder``."""
    for index, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
        Image.fromarray(image, mode="L").save(os.path.join(folder, str(label), f"{index:04d}.png"))
    return folder


def write_unet_config(path: str) -> str:
    """The baseline's `--model_config` (a `UNet2DModel` shape; the loop adds sizes, channels and classes)."""
    down, up = default_block_types(len(UNET_SHAPE["block_out_channels"]))
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**UNET_SHAPE, "down_block_types": down, "up_block_types": up, "dropout": 0.0}, f, indent=2)
    return path


def script_args(data_dir: str, output_dir: str, steps: int, settings: dict, task_args: dict) -> argparse.Namespace:
    """The arguments of a training script run as
    ``train_*.py --train_data_dir DATA --resolution 8 --class_conditional ... --output_dir OUT``."""
    shape = UNET_SHAPE
    argv = [
        "--train_data_dir", data_dir, "--resolution", "8", "--class_conditional", "--output_dir", output_dir,
        "--block_out_channels", ",".join(map(str, shape["block_out_channels"])),
        "--layers_per_block", str(shape["layers_per_block"]), "--norm_num_groups", str(shape["norm_num_groups"]),
        "--attention_head_dim", str(shape["attention_head_dim"]), "--train_batch_size", str(settings["batch_size"]),
        "--max_train_steps", str(steps), "--learning_rate", str(settings["learning_rate"]),
        "--lr_warmup_steps", str(max(1, steps // 10)), "--use_ema", "--seed", str(settings["seed"]),
        "--logger", "none", "--checkpointing_steps", str(steps + 1), "--save_images_steps", str(steps + 1),
        "--num_sample_images", "10", "--num_inference_steps", str(settings["num_inference_steps"]),
    ]  # fmt: skip
    args = build_parser("diffusers-stages demo").parse_args(argv)
    vars(args).update(task_args)
    return args


def step_flops(task: TrainingTask, args: argparse.Namespace, num_classes: int) -> int:
    """FLOPs of one training step of ``task`` (forward and backward of every network on its share of a batch),
    measured on a draw of the task's own batch plan."""
    networks = task.build_networks(3, args.resolution, num_classes + 1)
    scheduler, _ = noise_schedulers(args)
    generator = torch.Generator().manual_seed(0)
    batch = args.train_batch_size
    draw = task.draw(batch, generator)
    clean = torch.zeros(batch, 3, args.resolution, args.resolution)
    labels = torch.zeros(batch, dtype=torch.long)

    def step():
        for k, network in enumerate(networks.values()):
            sel = (draw.network == k).nonzero().squeeze(1)
            rows = draw.rows[sel]
            loss = diffusion_loss(network, scheduler, clean[rows], draw.timesteps[sel], class_labels=labels[rows])
            loss.mean().backward()

    flops, _ = count_flops(step)
    return flops


def train_method(method: Method, data_dir: str, output_dir: str, budget: float | None, settings: dict):
    """Train ``method`` on the image folder with the package's loop; returns ``(steps, train FLOPs, folder)``.

    ``budget`` is B, the baseline's training FLOPs (``None`` for the baseline itself: ``settings["steps"]`` steps)."""
    folder = os.path.join(output_dir, method.folder)
    args = script_args(data_dir, folder, settings["steps"], settings, method.task_args)
    flops = step_flops(method.task_class(args), args, settings["num_classes"])
    steps = settings["steps"] if budget is None else max(1, round(method.budget * budget / flops))
    args = script_args(data_dir, folder, steps, settings, method.task_args)
    train(args, method.task_class(args))
    return steps, steps * flops, folder


def assemble_dual_backbone(folder: str, deep_folder: str) -> DualBackbonePipeline:
    """The example's recipe for one backbone per run: the shallow run's U-Net and a deep U-Net (here the baseline's)
    in one `DualBackbonePipeline`, saved into ``folder`` (all or nothing, as the training loop saves)."""
    pipeline = DualBackbonePipeline(
        shallow=UNet2DModel.from_pretrained(os.path.join(folder, "shallow")),
        deep=UNet2DModel.from_pretrained(os.path.join(deep_folder, "experts", expert_folder(0))),
        scheduler=DDIMScheduler.from_pretrained(os.path.join(folder, "scheduler")),
        switch_step_fraction=DEFAULT_SWITCH_STEP_FRACTION,
    )
    publish_pipeline(folder, pipeline.save_pretrained)
    return pipeline
