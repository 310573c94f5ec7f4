"""Tiny pipelines of the package's three kinds, shared by the pipeline tests."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DModel

from diffusers_stages import (
    DualBackbonePipeline,
    ExpertRoutingModel,
    ExpertRoutingPipeline,
    MultiStagePipeline,
    MultiStageUNet2DConditionModel,
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


# the text-to-image adapters' tests (LoRA, IP-Adapter): a tiny SD pipeline against the same one with a staged or
# expert-routing unet
SD_BOUNDARIES = (350, 700)  # three stages; 3 DDIM steps (999, 666, 333) visit all three


@pytest.fixture
def source_and_staged(tiny_sd_components):
    """``(source_pipe, staged_pipe)``: the tiny SD pipeline, and the same one with the staged warm start as unet."""
    source = StableDiffusionPipeline(**tiny_sd_components)
    staged = StableDiffusionPipeline(**dict(tiny_sd_components, unet=copy.deepcopy(source.unet)))
    staged.unet = MultiStageUNet2DConditionModel.from_unet(staged.unet, stage_boundaries=SD_BOUNDARIES)
    return source, staged


@pytest.fixture
def source_and_routed(tiny_sd_components):
    """``(source_pipe, routed_pipe)``: the tiny SD pipeline, and the same one whose unet routes to two copies of it."""
    source = StableDiffusionPipeline(**tiny_sd_components)
    experts = [copy.deepcopy(source.unet) for _ in range(2)]
    routed = StableDiffusionPipeline(**dict(tiny_sd_components, unet=copy.deepcopy(source.unet)))
    routed.unet = ExpertRoutingModel(experts, stage_boundaries=(500,))
    return source, routed
