from .unet_multistage import MultiStageUNet2DModel, StageDecoder

__all__ = ["MultiStageUNet2DModel", "StageDecoder"]
