import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler, HeunDiscreteScheduler

from diffusers_stages import StageRouter, TimestepPartition
from diffusers_stages.routing import dispatch_by_stage


def test_router_follows_the_noise_level():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    router = StageRouter(TimestepPartition([442, 631]), scheduler)
    stages = [router(t) for t in scheduler.timesteps]
    expected = [0 if t < 442 else 1 if t < 631 else 2 for t in scheduler.timesteps.tolist()]
    assert stages == expected


def test_heun_pair_is_never_split():
    scheduler = HeunDiscreteScheduler()
    scheduler.set_timesteps(6)
    router = StageRouter(TimestepPartition([500]), scheduler)
    sample = torch.zeros(1, 1, 2, 2)
    pairs = []
    for t in scheduler.timesteps:
        first_order = scheduler.state_in_first_order
        pairs.append((first_order, float(t), router(t)))
        sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample
    for (_first, _t0, s0), (second_first, t1, s1) in zip(pairs, pairs[1:]):
        if not second_first:  # a corrector call belongs to the predictor before it
            assert s1 == s0
        else:
            assert s1 == (0 if t1 < 500 else 1)
    # the boundary falls inside a pair somewhere: the corrector there is below 500 but stays in stage 1
    assert any(not f and t < 500 and s == 1 for f, t, s in pairs)


def test_scheduler_and_partition_units_must_agree():
    with pytest.raises(ValueError, match="`scheduler` EDMEulerScheduler"):
        StageRouter(TimestepPartition([500]), EDMEulerScheduler())
    with pytest.raises(ValueError, match="'sigma' units"):
        StageRouter(TimestepPartition([2.5], units="sigma"), DDIMScheduler())
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        StageRouter(TimestepPartition([100]), DDIMScheduler(num_train_timesteps=500))


@pytest.mark.parametrize(
    ("stage_index", "message"),
    [
        (True, "an integer, got True"),
        (1.0, "an integer, got 1.0"),
        (torch.tensor(1), r"an integer, got tensor\(1\)"),
        (2, r"in \[0, 2\), got 2"),
        (-1, r"in \[0, 2\), got -1"),
    ],
)
def test_dispatch_refuses_a_bad_stage_index(stage_index, message):
    with pytest.raises(ValueError, match=f"`stage_index` must be {message}"):
        dispatch_by_stage(TimestepPartition([500]), torch.tensor([10]), stage_index, lambda stage, rows: stage)
    assert dispatch_by_stage(TimestepPartition([500]), torch.tensor([10]), 1, lambda stage, rows: stage) == 1
