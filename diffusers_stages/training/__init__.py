"""Training utilities shared by the `examples/*/train_*.py` scripts: the loss, data, checkpoints and the loop."""

from .args import build_parser, float_list, int_list
from .hub import LocalHubApi, push_output_folder
from .loop import build_task, parse_and_check, train
from .loss import diffusion_loss
from .tasks import DualBackboneTask, EarlyExitTask, ExpertTask, MultiStageTask, TrainingTask, assemble_expert_runs

__all__ = [
    "DualBackboneTask",
    "EarlyExitTask",
    "ExpertTask",
    "LocalHubApi",
    "MultiStageTask",
    "TrainingTask",
    "assemble_expert_runs",
    "build_parser",
    "build_task",
    "diffusion_loss",
    "float_list",
    "int_list",
    "parse_and_check",
    "push_output_folder",
    "train",
]
