"""diffusers-stages: stage-wise diffusion models for diffusers.

Every component module is imported here, so that diffusers' `from_pretrained` finds the package's classes by the
module path stored in `model_index.json` (RESEARCH.md section 3).
"""

from .models import (
    ClassContextEmbedding,
    ExpertRoutingModel,
    IUNet2DModel,
    MultiStageDDPMppUNet2DModel,
    MultiStageUNet2DConditionModel,
    MultiStageUNet2DModel,
    UViT2DModel,
)
from .partition import TimestepPartition
from .pipelines import DualBackbonePipeline, ExpertRoutingPipeline, MultiStagePipeline, StagedDiffusionPipeline
from .planning import plan_stages
from .routing import StageRouter

__version__ = "0.1.0"

__all__ = [
    "ClassContextEmbedding",
    "DualBackbonePipeline",
    "ExpertRoutingModel",
    "ExpertRoutingPipeline",
    "IUNet2DModel",
    "MultiStageDDPMppUNet2DModel",
    "MultiStagePipeline",
    "MultiStageUNet2DConditionModel",
    "MultiStageUNet2DModel",
    "StageRouter",
    "StagedDiffusionPipeline",
    "TimestepPartition",
    "UViT2DModel",
    "plan_stages",
]
