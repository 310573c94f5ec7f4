from .pipeline_multistage import MultiStagePipeline
from .pipeline_staged import StagedDiffusionPipeline

__all__ = ["MultiStagePipeline", "StagedDiffusionPipeline"]
