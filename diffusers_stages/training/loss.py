"""The denoising loss lives in `diffusers_stages.loss` (the switch recommender and the evidence benchmark use it
outside training too); this module keeps the training package's import path."""

from ..loss import diffusion_loss

__all__ = ["diffusion_loss"]
