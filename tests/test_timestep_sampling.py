import pytest
import torch

from diffusers_stages import TimestepPartition
from diffusers_stages.timestep_sampling import (
    soft_assignment_timesteps,
    stage_counts,
    stage_mass,
    stratified_timesteps,
)


def test_every_stage_in_every_batch_and_timesteps_inside_their_stage():
    partition = TimestepPartition([442, 631])
    for seed in range(20):
        t, stages = stratified_timesteps(partition, 4, generator=torch.manual_seed(seed))
        assert set(stages.tolist()) == {0, 1, 2}
        assert t.dtype == torch.long and bool((t >= 0).all()) and bool((t < 1000).all())
        assert partition.stage_index(t).tolist() == stages.tolist()


def test_default_shares_keep_timesteps_uniform_overall():
    partition = TimestepPartition([442, 631])
    t, _ = stratified_timesteps(partition, 20000, generator=torch.manual_seed(0))
    histogram = torch.histc(t.float(), bins=10, min=0, max=1000) / t.numel()
    assert torch.allclose(histogram, torch.full((10,), 0.1), atol=0.01)
    assert stage_mass(partition) == pytest.approx([0.442, 0.189, 0.369])


def test_custom_shares_and_sigma_units():
    partition = TimestepPartition([2.5103, 7.6577], units="sigma")
    t, stages = stratified_timesteps(partition, 300, stage_shares=[1, 1, 1], generator=torch.manual_seed(0))
    assert torch.bincount(stages).tolist() == [100, 100, 100]
    assert partition.stage_index(t).tolist() == stages.tolist()
    assert stage_counts(10, [0.5, 0.5, 0.0]) == [5, 5, 0]
    with pytest.raises(ValueError, match="`stage_shares`"):
        stratified_timesteps(partition, 8, stage_shares=[1, 1])


def test_soft_assignment_probabilities():
    partition = TimestepPartition.uniform(4)
    for expert, p in enumerate((0.8, 0.4, 0.2, 0.1)):
        t = soft_assignment_timesteps(partition, expert, 20000, generator=torch.manual_seed(expert))
        own = (partition.stage_index(t) == expert).float().mean().item()
        assert abs(own - p) < 0.015
    hard = soft_assignment_timesteps(partition, 2, 1000, own_interval_probability=1.0)
    assert bool((partition.stage_index(hard) == 2).all())
    with pytest.raises(ValueError, match="`own_interval_probability`"):
        soft_assignment_timesteps(TimestepPartition([500]), 0, 8)
    with pytest.raises(ValueError, match="`expert_index`"):
        soft_assignment_timesteps(partition, 4, 8)
