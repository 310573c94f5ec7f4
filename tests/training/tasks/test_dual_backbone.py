"""The dual-backbone training task (DuoDiff): what its model card says about the switch matches the pipeline."""

import torch
from diffusers import EDMEulerScheduler, UNet2DModel

from diffusers_stages import DualBackbonePipeline
from diffusers_stages.pipelines.pipeline_dual_backbone import checked_switch
from diffusers_stages.training import DualBackboneTask, build_parser
from tests.conftest import SMALL_UNET


def _task(backbones: str = "both") -> DualBackboneTask:
    args = build_parser("train_dual_backbone.py").parse_args(
        ["--block_out_channels", "8,16", "--layers_per_block", "1", "--norm_num_groups", "4"]
    )
    vars(args).update(backbones=backbones, shallow_block_out_channels=None, shallow_layers_per_block=1,
                      switch_step_fraction=None, switch_timestep=None)  # fmt: skip
    return DualBackboneTask(args)


def test_the_description_of_a_sigma_switch_hands_the_switch_sigma_itself_to_the_deep_network():
    # a fine-tuned source may carry `switch_sigma`: the pipeline runs the deep network at sigma <= switch_sigma
    task = _task()
    task.switch = checked_switch({"switch_sigma": 2.0})
    pipe = DualBackbonePipeline(shallow=UNet2DModel(**SMALL_UNET), deep=UNet2DModel(**SMALL_UNET),
                                scheduler=EDMEulerScheduler(), switch_sigma=2.0)  # fmt: skip
    assert pipe.partition.stage_for_noise_level(torch.tensor([2.0])).item() == 0  # 0: the deep network
    description = task.description()
    assert "sigma > 2" in description and "sigma >= 2" not in description


def test_the_method_logged_and_on_the_card_names_the_backbones_the_run_trains():
    # a `--backbones shallow` run logged "***** dual backbone (shallow + deep): ..." and its model card called it a
    # dual-backbone model, where it trained the shallow network alone
    assert _task().method == "dual backbone (shallow + deep)"
    assert _task("shallow").method == "dual backbone, shallow network only"
    assert _task("deep").method == "dual backbone, deep network only"
