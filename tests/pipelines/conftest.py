"""Tiny pipelines of the package's three kinds, shared by the pipeline tests."""

import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_stages import (
    DualBackbonePipeline,
    ExpertRoutingModel,
    ExpertRoutingPipeline,
    MultiStagePipeline,
    MultiStageUNet2DModel,
)
from tests.conftest import TINY_UNET

KINDS = ("multistage", "experts", "dual_backbone")


def tiny_pipeline(kind: str, scheduler=None, num_class_embeds: int | None = None, **dual_switch):
    """A tiny pipeline of ``kind`` (3 classes + the null label when ``num_class_embeds=4``), DDIM by default; the
    dual backbone gets ``dual_switch``, or its default switch when none is given."""
    torch.manual_seed(0)
    shape = {**TINY_UNET, "num_class_embeds": num_class_embeds}
    scheduler = scheduler or DDIMScheduler()
    if kind == "multistage":
        unet = MultiStageUNet2DModel(**shape, stage_boundaries=(442, 631)).eval()
        pipe = MultiStagePipeline(unet=unet, scheduler=scheduler)
    elif kind == "experts":
        experts = ExpertRoutingModel([UNet2DModel(**shape).eval() for _ in range(2)], stage_boundaries=(500,))
        pipe = ExpertRoutingPipeline(experts=experts, scheduler=scheduler)
    else:
        shallow, deep = UNet2DModel(**shape).eval(), UNet2DModel(**shape).eval()
        pipe = DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=scheduler, **dual_switch)
    pipe.set_progress_bar_config(disable=True)
    return pipe
