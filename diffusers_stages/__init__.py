"""diffusers-stages: stage-wise diffusion models for diffusers.

Every component module is imported here, so that diffusers' `from_pretrained` finds the package's classes by the
module path stored in `model_index.json` (RESEARCH.md section 3).
"""

from .models import MultiStageUNet2DModel
from .partition import TimestepPartition
from .pipelines import MultiStagePipeline, StagedDiffusionPipeline
from .routing import StageRouter

__version__ = "0.1.0"

__all__ = [
    "MultiStagePipeline",
    "MultiStageUNet2DModel",
    "StageRouter",
    "StagedDiffusionPipeline",
    "TimestepPartition",
]
