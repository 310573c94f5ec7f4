"""What differs between the training methods: the networks, how each batch is spread over them, their loss, and the
pipeline they are saved as (one module per method). Everything else is the one loop in `loop.py`."""

from ...conventions import PAPER_BOUNDARIES  # said once, in conventions.py
from .base import SCRIPT_KEYS, Draw, TrainingTask, noise_schedulers
from .dual_backbone import DEFAULT_SWITCH_STEP_FRACTION, DualBackboneTask
from .early_exit import EarlyExitTask
from .experts import EXPERT_CLASSES, EXPERT_RUN_FILE, ExpertTask, assemble_expert_runs
from .multistage import (
    PRETRAINED_UNETS,
    REFUSED_WITH_PRETRAINED,
    MultiStageTask,
    PretrainedSource,
)

__all__ = [
    "DEFAULT_SWITCH_STEP_FRACTION",
    "EXPERT_CLASSES",
    "EXPERT_RUN_FILE",
    "PAPER_BOUNDARIES",
    "PRETRAINED_UNETS",
    "REFUSED_WITH_PRETRAINED",
    "SCRIPT_KEYS",
    "Draw",
    "DualBackboneTask",
    "EarlyExitTask",
    "ExpertTask",
    "MultiStageTask",
    "PretrainedSource",
    "TrainingTask",
    "assemble_expert_runs",
    "noise_schedulers",
]
