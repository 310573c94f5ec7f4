"""Stage-division methods: Zhang et al.'s optimal-denoiser clustering (Algorithm 1) and its baselines.

Every method returns a [`StagePlan`]: a [`TimestepPartition`] in the schedule's own units, plus the curves it was
derived from (for plotting and inspection). The methods live in `clustering` (Algorithm 1), `ilp` (the authors'
integer program) and `baselines`; `stage_plan` holds what they share. Every name stays importable from here.
"""

from .baselines import (
    gradient_affinity,
    gradient_plan,
    interval_clustering,
    snr_clustering_plan,
    snr_plan,
    uniform_plan,
)
from .clustering import boundaries_from_similarity, optimal_denoiser_plan
from .ilp import ilp_boundaries, ilp_plan
from .stage_plan import AUTHORS_ETA, METHODS, StagePlan

__all__ = [
    "AUTHORS_ETA",
    "METHODS",
    "StagePlan",
    "boundaries_from_similarity",
    "gradient_affinity",
    "gradient_plan",
    "ilp_boundaries",
    "ilp_plan",
    "interval_clustering",
    "optimal_denoiser_plan",
    "snr_clustering_plan",
    "snr_plan",
    "uniform_plan",
]
