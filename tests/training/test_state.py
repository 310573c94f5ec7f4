"""The training run's state: the loss log."""

import pytest
import torch
from accelerate import Accelerator

from diffusers_stages.training.state import LossLog


def test_the_loss_log_reads_its_sums_in_one_copy_and_means_them_per_stage_and_network(host_reads):
    # reading each value on its own (`.item()`, `if tensor > 0` per stage) waited for an accelerator once per value
    log = LossLog(num_stages=3, names=["shallow", "deep"], device=torch.device("cpu"))
    log.add(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 1]), torch.tensor([1.0, 3.0, 5.0]))
    accelerator = Accelerator(cpu=True)
    logs = {}
    assert host_reads(lambda: logs.update(log.reduce(accelerator))) == 0
    assert logs == pytest.approx({"loss": 3.0, "loss/stage_0": 2.0, "loss/stage_2": 5.0, "loss/shallow": 1.0,
                                  "loss/deep": 4.0})  # fmt: skip
    assert "loss/stage_1" not in logs  # no sample of stage 1 since the last log
    assert log.sums.abs().sum() == 0  # the sums start again
    assert log.reduce(accelerator)["loss"] == 0.0  # nothing since: no division by zero
