from .class_context import ClassContextEmbedding
from .early_exit import EarlyExitUViT2DModel
from .expert_routing import ExpertRoutingModel
from .iunet import IUNet2DModel
from .meme import build_meme_experts, meme_expert_configs
from .unet_multistage import MultiStageUNet2DModel, StageDecoder
from .unet_multistage_condition import MultiStageUNet2DConditionModel
from .unet_multistage_ddpmpp import MultiStageDDPMppUNet2DModel
from .uvit import UViT2DModel

__all__ = [
    "ClassContextEmbedding",
    "EarlyExitUViT2DModel",
    "ExpertRoutingModel",
    "IUNet2DModel",
    "MultiStageDDPMppUNet2DModel",
    "MultiStageUNet2DConditionModel",
    "MultiStageUNet2DModel",
    "StageDecoder",
    "UViT2DModel",
    "build_meme_experts",
    "meme_expert_configs",
]
