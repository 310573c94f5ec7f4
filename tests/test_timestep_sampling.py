import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffusers_stages import TimestepPartition
from diffusers_stages.timestep_sampling import (
    most_even_stage_counts,
    soft_assignment_timesteps,
    stage_counts,
    stage_mass,
    stage_sampled_timesteps,
    stratified_timesteps,
)


def test_every_stage_in_every_batch_and_timesteps_inside_their_stage():
    partition = TimestepPartition([442, 631])
    for seed in range(20):
        t, stages = stratified_timesteps(partition, 4, generator=torch.manual_seed(seed))
        assert set(stages.tolist()) == {0, 1, 2}
        assert t.dtype == torch.long and bool((t >= 0).all()) and bool((t < 1000).all())
        assert partition.stage_for_noise_level(t).tolist() == stages.tolist()


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
    assert partition.stage_for_noise_level(t).tolist() == stages.tolist()
    assert stage_counts(10, [0.5, 0.5, 0.0]) == [5, 5, 0]
    with pytest.raises(ValueError, match="`stage_shares`"):
        stratified_timesteps(partition, 8, stage_shares=[1, 1])
    for bad in (float("nan"), float("inf")):  # nan passed every comparison; inf made every other share 0
        with pytest.raises(ValueError, match="`stage_shares` must be finite and non-negative"):
            stratified_timesteps(partition, 8, stage_shares=[1, bad, 1])


def test_soft_assignment_probabilities():
    partition = TimestepPartition.uniform(4)
    for expert, p in enumerate((0.8, 0.4, 0.2, 0.1)):
        t = soft_assignment_timesteps(partition, expert, 20000, generator=torch.manual_seed(expert))
        own = (partition.stage_for_noise_level(t) == expert).float().mean().item()
        assert abs(own - p) < 0.015
    hard = soft_assignment_timesteps(partition, 2, 1000, own_interval_probability=1.0)
    assert bool((partition.stage_for_noise_level(hard) == 2).all())
    with pytest.raises(ValueError, match="`own_interval_probability`"):
        soft_assignment_timesteps(TimestepPartition([500]), 0, 8)
    with pytest.raises(ValueError, match="`expert_index`"):
        soft_assignment_timesteps(partition, 4, 8)


def test_soft_assignment_spreads_the_rest_evenly_over_the_other_timesteps_and_keeps_interval_edges():
    # MEME's soft assignment on integer timesteps: the expert's own interval [3, 6) (its edges 3 and 5 included, 6
    # not) with probability p, every other timestep equally likely otherwise (the other intervals by their mass)
    partition = TimestepPartition([3, 6], num_train_timesteps=10)
    t = soft_assignment_timesteps(partition, 1, 70000, own_interval_probability=0.5, generator=torch.manual_seed(0))
    share = torch.bincount(t, minlength=10).double() / len(t)
    own = torch.tensor([3, 4, 5])
    assert abs(share[own].sum().item() - 0.5) < 0.01 and (share[own] - 0.5 / 3).abs().max().item() < 0.01
    other = torch.tensor([0, 1, 2, 6, 7, 8, 9])
    assert (share[other] - 0.5 / 7).abs().max().item() < 0.006
    # sigma units: the other intervals by their mass under EDM's log-normal, each draw routed to its interval
    sigmas = TimestepPartition([0.5, 2.0], units="sigma")
    drawn = soft_assignment_timesteps(sigmas, 2, 40000, own_interval_probability=0.25, generator=torch.manual_seed(1))
    stages = torch.bincount(sigmas.stage_for_noise_level(drawn), minlength=3).double() / len(drawn)
    mass = stage_mass(sigmas)
    expected = [0.75 * mass[0] / (mass[0] + mass[1]), 0.75 * mass[1] / (mass[0] + mass[1]), 0.25]
    assert (stages - torch.tensor(expected, dtype=torch.float64)).abs().max().item() < 0.01


def test_soft_assignment_of_no_samples_and_bad_arguments():
    # an expert with no share of the batch (`--stage_shares 1,1,1,0`) draws nothing, not a RuntimeError
    assert soft_assignment_timesteps(TimestepPartition.uniform(4), 3, 0).shape == (0,)
    for kwargs, match in (
        ({"batch_size": -1}, "`batch_size` must be a non-negative integer, got -1"),
        ({"batch_size": "4"}, "`batch_size` must be a non-negative integer, got '4'"),
        ({"expert_index": 1.0}, r"`expert_index` must be in \[0, 4\), got 1.0"),
        ({"own_interval_probability": "0.5"}, r"`own_interval_probability` must be in \(0, 1\], got '0.5'"),
    ):
        with pytest.raises(ValueError, match=match):
            soft_assignment_timesteps(TimestepPartition.uniform(4), **{"expert_index": 0, "batch_size": 4, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# stage sampling schemes: mixed (default), per_batch (the authors' EDM code), per_rank (their LDM code)
def test_mixed_is_the_stratified_default():
    partition = TimestepPartition([442, 631])
    mixed = stage_sampled_timesteps(partition, 8, generator=torch.manual_seed(3))
    stratified = stratified_timesteps(partition, 8, generator=torch.manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(mixed, stratified))


@pytest.mark.parametrize("units", ["timestep", "sigma"])
def test_per_batch_draws_one_stage_per_batch_with_the_stage_mass(units):
    partition = TimestepPartition([442, 631]) if units == "timestep" else TimestepPartition([0.5, 2.0], units="sigma")
    generator = torch.manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(600):
        t, stages = stage_sampled_timesteps(partition, 5, "per_batch", generator=generator)
        assert len(set(stages.tolist())) == 1  # one stage for the whole batch
        assert partition.stage_for_noise_level(t).tolist() == stages.tolist()  # every noise level inside that stage
        counts[stages[0]] += 1
    # the stage is drawn with its mass under the training distribution (uniform t; EDM's log-normal sigma)
    assert torch.allclose(counts / counts.sum(), torch.tensor(stage_mass(partition)).float(), atol=0.06)
    # given shares are the stage probabilities; a zero share is never drawn
    for _ in range(50):
        _, stages = stage_sampled_timesteps(partition, 2, "per_batch", [1, 0, 1], generator=generator)
        assert int(stages[0]) != 1


def test_per_rank_gives_each_process_one_stage_in_equal_shares():
    partition = TimestepPartition([442, 631])
    seen = {}
    for rank in range(6):
        for seed in range(5):
            t, stages = stage_sampled_timesteps(partition, 4, "per_rank", None, torch.manual_seed(seed), rank, 6)
            assert stages.tolist() == [rank % 3] * 4 and partition.stage_for_noise_level(t).tolist() == stages.tolist()
            seen.setdefault(rank % 3, set()).update(t.tolist())
    assert sorted(seen) == [0, 1, 2] and max(seen[0]) < 442 <= min(seen[1])  # uniform integer t in each stage


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "per_sample"}, "`stage_sampling` must be one of"),
        ({"scheme": "per_rank", "num_processes": 2, "process_index": 0}, "multiple of 3, got process 0 of 2"),
        ({"scheme": "per_rank", "num_processes": 3, "process_index": 0, "stage_shares": [1, 1, 1]}, "per_rank"),
        ({"scheme": "per_batch", "stage_shares": [1, 1]}, "needs 3 non-negative values"),
        ({"scheme": "per_batch", "stage_shares": [0, 0, 0]}, "positive sum"),
    ],
)
def test_bad_stage_sampling_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stage_sampled_timesteps(TimestepPartition([442, 631]), 4, **kwargs)


WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from accelerate import Accelerator, PartialState
    from diffusers_stages import TimestepPartition
    from diffusers_stages.timestep_sampling import stage_sampled_timesteps

    Accelerator()  # as the training loop does, before any draw
    state = PartialState()  # what the training task reads, on each launched process
    t, stages = stage_sampled_timesteps(TimestepPartition([500]), 4, "per_rank", None, torch.manual_seed(0),
                                        state.process_index, state.num_processes)
    with open(f"{sys.argv[1]}/rank{state.process_index}.json", "w") as f:
        json.dump({"stages": stages.tolist(), "t": t.tolist(), "num_processes": state.num_processes}, f)
    """
)


@pytest.mark.slow  # two launched processes: about 50 s on 2 busy CPU cores
def test_per_rank_under_two_launched_processes(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["stages"] == [0] * 4 and ranks[1]["stages"] == [1] * 4  # rank % 2 stages
    assert max(ranks[0]["t"]) < 500 <= min(ranks[1]["t"])


@pytest.mark.parametrize("share", [float("nan"), float("inf")])
def test_per_batch_shares_that_are_not_finite_are_refused_by_name(share):
    # were handed to torch.multinomial, which raised a RuntimeError about its probability tensor
    with pytest.raises(ValueError, match="`stage_shares`.*finite"):
        stage_sampled_timesteps(TimestepPartition([442, 631]), 4, "per_batch", stage_shares=[share, 1, 1])


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, 4.0, True, "4", None])
@pytest.mark.parametrize("scheme", ["mixed", "per_batch", "per_rank"])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused_by_name(scheme, batch_size):
    # a float, a bool or a string raised a TypeError deep inside torch (randperm, randint) or at a comparison
    partition = TimestepPartition([442, 631])
    with pytest.raises(
        ValueError, match=rf"`batch_size` must be a positive integer, got {re.escape(repr(batch_size))}"
    ):
        stage_sampled_timesteps(partition, batch_size, scheme, process_index=0, num_processes=3)
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer"):
        stage_counts(batch_size, [1, 1, 1])
    if scheme == "mixed":
        with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer"):
            stratified_timesteps(partition, batch_size)
    t, stages = stratified_timesteps(partition, np.int64(4), generator=torch.manual_seed(0))  # numpy's ints work
    assert t.shape == stages.shape == (4,)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("p_std", 0.0, "`p_std` must be a finite number > 0, got 0.0"),
        ("p_std", -1.2, "`p_std` must be a finite number > 0, got -1.2"),
        ("p_std", float("nan"), "`p_std` must be a finite number > 0, got nan"),
        ("p_std", float("inf"), "`p_std` must be a finite number > 0, got inf"),
        ("p_std", "1.2", "`p_std` must be a finite number > 0, got '1.2'"),
        ("p_mean", float("nan"), "`p_mean` must be a finite number, got nan"),
        ("p_mean", float("-inf"), "`p_mean` must be a finite number, got -inf"),
    ],
)
def test_a_bad_log_normal_of_sigma_units_is_refused_by_name(name, value, match):
    # p_std=0 was a ZeroDivisionError, a negative or nan p_std or a nan p_mean a ValueError blaming `stage_shares`,
    # and p_std=inf drew sigma 0 and inf, outside every stage
    partition = TimestepPartition([0.5, 2.0], units="sigma")
    calls = [
        lambda **kw: stage_mass(partition, **kw),
        lambda **kw: stratified_timesteps(partition, 4, **kw),
        lambda **kw: stratified_timesteps(partition, 4, stage_shares=[1, 1, 1], **kw),
        lambda **kw: stage_sampled_timesteps(partition, 4, "per_batch", stage_shares=[1, 1, 1], **kw),
        lambda **kw: stage_sampled_timesteps(partition, 4, "per_rank", process_index=0, num_processes=3, **kw),
        lambda **kw: soft_assignment_timesteps(partition, 0, 4, own_interval_probability=0.5, **kw),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=re.escape(match)):
            call(**{name: value})
    # timestep units do not read the log-normal
    assert len(stratified_timesteps(TimestepPartition([442, 631]), 4, **{name: value})[0]) == 4


@pytest.mark.parametrize(("process_index", "num_processes"), [(0.5, 3), (True, 3), (0, 3.0), (0, True), ("0", 3)])
def test_per_rank_process_numbers_that_are_not_integers_are_refused_by_name(process_index, num_processes):
    # process 0.5 was a TypeError (a list index), process True trained stage 1 and 3.0 processes passed
    with pytest.raises(ValueError, match=rf"got process {re.escape(repr(process_index))} of {num_processes!r}"):
        stage_sampled_timesteps(TimestepPartition([442, 631]), 4, "per_rank", None, None, process_index, num_processes)
    _, stages = stage_sampled_timesteps(TimestepPartition([442, 631]), 2, "per_rank", None, None, np.int64(4), 6)
    assert stages.tolist() == [1, 1]


def test_the_most_even_split_is_one_stage_counts_draws_with_the_smallest_largest_count():
    # a tie between stages of different counts: stage_counts draws [1, 3] or [2, 2]
    drawn = {tuple(stage_counts(4, [1, 3], torch.manual_seed(seed))) for seed in range(40)}
    assert drawn == {(1, 3), (2, 2)} and most_even_stage_counts(4, [1, 3]) == [2, 2]
    assert most_even_stage_counts(64, stage_mass(TimestepPartition([442, 631]))) == [28, 13, 23]  # no tie
    assert sorted(most_even_stage_counts(4, [1, 1, 1])) == [1, 1, 2]
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        most_even_stage_counts(0, [1, 1])


def test_soft_assignment_takes_numpy_integers_as_the_other_samplers_do():
    # np.int64(1) was refused as "`expert_index` must be in [0, 4), got np.int64(1)", a value inside that range
    partition = TimestepPartition.uniform(4)
    t = soft_assignment_timesteps(partition, np.int64(1), np.int64(6), 1.0, generator=torch.manual_seed(0))
    assert t.shape == (6,) and partition.stage_for_noise_level(t).tolist() == [1] * 6
    for kwargs, match in (
        ({"expert_index": np.True_}, "`expert_index`"),
        ({"batch_size": np.float64(4)}, "`batch_size`"),
    ):
        with pytest.raises(ValueError, match=match):
            soft_assignment_timesteps(partition, **{"expert_index": 0, "batch_size": 4, **kwargs})


def test_a_sigma_draw_is_routed_to_its_own_stage_after_float32_rounding():
    # a draw of stage 1 next to its lower boundary 7.6577 rounded to the float32 7.65770006 (or to one of the three
    # above), whose c_noise the model routes to stage 0 (about 3 in 10**7 draws): the stage then lacked its sample,
    # which under DDP without unused parameters fails the step; draws now stay inside their stage, also where a
    # float32 log (CUDA's) rounds c_noise one ulp the other way. A stage 1e-6 wide makes such draws common.
    boundary = 7.6577
    partition = TimestepPartition([boundary, boundary * (1 + 1e-6)], units="sigma")
    t, stages = stage_sampled_timesteps(partition, 4000, "per_rank", process_index=1, num_processes=3)
    assert t.dtype == torch.float32 and stages.tolist() == [1] * 4000
    c_noise = 0.25 * torch.log(t)  # as the EDM schedulers precondition sigma
    for c in (c_noise, torch.nextafter(c_noise, torch.full_like(c_noise, -1)), torch.nextafter(c_noise, c_noise + 1)):
        assert set(partition.stage_for_timestep(c).tolist()) == {1}
    wide = TimestepPartition([boundary], units="sigma")
    t, stages = stratified_timesteps(wide, 2000, generator=torch.manual_seed(0))
    assert wide.stage_for_noise_level(t).tolist() == stages.tolist()
    with pytest.raises(ValueError, match=r"Stage 1 \(7.6577, 7.6577\] holds no float32 sigma"):
        stratified_timesteps(TimestepPartition([boundary, boundary * (1 + 1e-7)], units="sigma"), 3)


def test_soft_assignment_takes_a_numpy_own_interval_probability():
    # np.float32(0.5) passed the check (a real number in (0, 1]) and then failed with "TypeError: can't assign a
    # numpy.float32 to a torch.DoubleTensor"
    partition = TimestepPartition.uniform(4)
    for p in (np.float32(0.5), np.float64(0.5), np.int64(1)):
        drawn = soft_assignment_timesteps(partition, 1, 8, p, generator=torch.manual_seed(0))
        expected = soft_assignment_timesteps(partition, 1, 8, float(p), generator=torch.manual_seed(0))
        assert torch.equal(drawn, expected)


@pytest.mark.parametrize("shares", [["1", "1", "1"], [True, False, True], [1, None, 1], "111", 3])
@pytest.mark.parametrize("scheme", ["mixed", "per_batch"])
def test_stage_shares_that_are_not_numbers_are_refused_by_name(scheme, shares):
    # strings raised "TypeError: unsupported operand type(s) for +: 'int' and 'str'" (per_batch: "must be real
    # number, not str"), None a TypeError, and bools were taken as the shares 1 and 0
    with pytest.raises(ValueError, match=r"`stage_shares` must be a sequence of numbers \(one per stage\), got"):
        stage_sampled_timesteps(TimestepPartition([442, 631]), 4, scheme, stage_shares=shares)
    with pytest.raises(ValueError, match=r"`stage_shares` must be a sequence of numbers \(one per stage\), got"):
        stage_counts(4, shares)


def test_stage_shares_may_be_numpy_or_torch_numbers():
    partition = TimestepPartition([442, 631])
    expected = stratified_timesteps(partition, 8, [1.0, 2.0, 3.0], generator=torch.manual_seed(0))
    for shares in (np.array([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]), [np.int64(1), 2, np.float32(3)]):
        drawn = stratified_timesteps(partition, 8, shares, generator=torch.manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(drawn, expected))


def test_a_batch_smaller_than_the_stage_count_draws_its_stages_at_random_by_their_shares():
    # the remainder went to the largest fractional parts: a batch of 1 over the paper's shares trained stage 0 only,
    # and a batch of 2 over three equal shares never stage 2 where the random tie-break ... drew it last
    shares = [0.442, 0.189, 0.369]
    generator = torch.manual_seed(0)
    drawn = torch.tensor([stage_counts(1, shares, generator) for _ in range(4000)], dtype=torch.float64)
    assert (drawn.sum(1) == 1).all()
    assert torch.allclose(drawn.mean(0), torch.tensor(shares, dtype=torch.float64), atol=0.03)
    two = torch.tensor([stage_counts(2, [1, 1, 1], generator) for _ in range(3000)], dtype=torch.float64)
    assert (two.sum(1) == 2).all() and torch.allclose(
        two.mean(0), torch.full((3,), 2 / 3, dtype=torch.float64), atol=0.05
    )
    assert stage_counts(1, [0, 1, 1], generator)[0] == 0  # a zero share is never drawn
    # a batch of at least one sample per stage is split as before
    assert stage_counts(10, [0.5, 0.5, 0.0]) == [5, 5, 0]
