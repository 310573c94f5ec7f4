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


def test_the_loss_log_keeps_no_float64_where_the_device_has_none(monkeypatch):
    # the sums were float64 on the training device, and each loss was cast to float64 there: Apple's MPS has none
    import diffusers_stages.training.state as state

    monkeypatch.setattr(state, "exact_float", lambda device: torch.float32)  # what `exact_float` gives on MPS
    log = LossLog(num_stages=2, names=["unet"], device=torch.device("cpu"))
    cast = []
    original = torch.Tensor.double
    monkeypatch.setattr(torch.Tensor, "double", lambda self, *a, **k: cast.append(self) or original(self, *a, **k))
    log.add(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([1.0, 3.0], dtype=torch.bfloat16))
    assert log.sums.dtype == torch.float32 and not cast
    assert log.reduce(Accelerator(cpu=True)) == pytest.approx({"loss": 2.0, "loss/stage_0": 1.0, "loss/stage_1": 3.0})
