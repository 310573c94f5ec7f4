"""Stage planning: find the stage boundaries (and suggest decoder sizes) from a data set and a noise schedule.

```py
plan = plan_stages(images, DDPMScheduler(), num_stages=3)        # Zhang et al., Algorithm 1
config = partition_to_model_config(unet_config, plan.partition)  # -> MultiStageUNet2DModel.from_config(config)
plan = plan_stages(images, DDPMScheduler(), 3, budget=flops, model_config=unet_config, num_inference_steps=50)
config = partition_to_model_config(unet_config, plan.partition, plan.decoder_block_out_channels)  # within budget
```

Command: ``python -m diffusers_stages.plan --train_data_dir DIR --resolution 32 --output_plot plan.png``.
"""

from .api import plan_stages
from .budget import BudgetPlan, expected_flops, widths_for_budget
from .data import load_images
from .methods import (
    AUTHORS_ETA,
    METHODS,
    StagePlan,
    boundaries_from_similarity,
    gradient_plan,
    ilp_boundaries,
    ilp_plan,
    interval_clustering,
    optimal_denoiser_plan,
    snr_clustering_plan,
    snr_plan,
    uniform_plan,
)
from .optimal_denoiser import optimal_denoiser_mean, optimal_predictions, pixel_agreement
from .plot import plot_plan
from .schedule import NoiseSchedule
from .sizing import partition_to_model_config, stage_difficulty, suggest_decoder_widths

__all__ = [
    "AUTHORS_ETA",
    "BudgetPlan",
    "METHODS",
    "NoiseSchedule",
    "StagePlan",
    "boundaries_from_similarity",
    "expected_flops",
    "gradient_plan",
    "ilp_boundaries",
    "ilp_plan",
    "interval_clustering",
    "load_images",
    "optimal_denoiser_mean",
    "optimal_denoiser_plan",
    "optimal_predictions",
    "partition_to_model_config",
    "pixel_agreement",
    "plan_stages",
    "plot_plan",
    "snr_clustering_plan",
    "snr_plan",
    "stage_difficulty",
    "suggest_decoder_widths",
    "uniform_plan",
    "widths_for_budget",
]
