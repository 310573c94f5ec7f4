from .pipeline_dual_backbone import DualBackbonePipeline
from .pipeline_expert_routing import ExpertRoutingPipeline, record_exit_profile
from .pipeline_multistage import MultiStagePipeline
from .pipeline_staged import StagedDiffusionPipeline

__all__ = [
    "DualBackbonePipeline",
    "ExpertRoutingPipeline",
    "MultiStagePipeline",
    "StagedDiffusionPipeline",
    "record_exit_profile",
]
