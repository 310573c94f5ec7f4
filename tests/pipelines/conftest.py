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
from diffusers_stages.schedulers import is_edm_scheduler
from tests.conftest import TINY_UNET

KINDS = ("multistage", "experts", "dual_backbone")


def tiny_pipeline(kind: str, scheduler=None, num_class_embeds: int | None = None, **dual_switch):
    """A tiny pipeline of ``kind`` (3 classes + the null label when ``num_class_embeds=4``), DDIM by default; the
    dual backbone gets ``dual_switch``, or its default switch when none is given. With an EDM scheduler the
    boundaries are sigmas (multi-stage 1 and 10, experts 2)."""
    torch.manual_seed(0)
    shape = {**TINY_UNET, "num_class_embeds": num_class_embeds}
    scheduler = scheduler or DDIMScheduler()
    sigma = {"boundary_units": "sigma"} if is_edm_scheduler(scheduler) else {}
    if kind == "multistage":
        unet = MultiStageUNet2DModel(**shape, stage_boundaries=(1.0, 10.0) if sigma else (442, 631), **sigma).eval()
        pipe = MultiStagePipeline(unet=unet, scheduler=scheduler)
    elif kind == "experts":
        experts = [UNet2DModel(**shape).eval() for _ in range(2)]
        experts = ExpertRoutingModel(experts, stage_boundaries=(2.0,) if sigma else (500,), **sigma)
        pipe = ExpertRoutingPipeline(experts=experts, scheduler=scheduler)
    else:
        shallow, deep = UNet2DModel(**shape).eval(), UNet2DModel(**shape).eval()
        pipe = DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=scheduler, **dual_switch)
    pipe.set_progress_bar_config(disable=True)
    return pipe
