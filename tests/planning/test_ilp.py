"""The authors' integer program for the stage boundaries (`method="ilp"`), solved exactly as a longest path."""

import itertools

import pytest
import torch
from diffusers import DDPMScheduler
from sklearn.datasets import load_digits

from diffusers_stages.planning import NoiseSchedule, plan_stages
from diffusers_stages.planning.methods import AUTHORS_ETA, ilp_boundaries, ilp_plan


def objective(similarity: torch.Tensor, cuts: list[int]) -> float:
    """The authors' objective: the sum over stages of the mean pairwise similarity inside the stage."""
    edges = [0, *cuts, similarity.shape[0]]
    return sum(float(similarity[a:b, a:b].mean()) for a, b in itertools.pairwise(edges))


def brute_force(similarity: torch.Tensor, num_stages: int, min_levels: int) -> float:
    n = similarity.shape[0]
    best = -1.0
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        if min(b - a for a, b in itertools.pairwise([0, *cuts, n])) >= min_levels:
            best = max(best, objective(similarity, list(cuts)))
    return best


def test_block_similarity_is_split_at_its_blocks():
    groups = torch.tensor([0] * 5 + [1] * 3 + [2] * 7 + [3] * 4)
    noise = torch.rand(19, 19, generator=torch.manual_seed(0), dtype=torch.float64) * 0.1
    similarity = (groups[:, None] == groups[None]).double() * 0.9 + (noise + noise.T) / 2
    similarity.fill_diagonal_(1.0)
    assert ilp_boundaries(similarity, 4) == [5, 8, 15]


def test_a_grid_of_a_thousand_levels_is_split_at_its_blocks():
    # `num_levels=1000` is a grid plan_stages takes: the MILP over its (stage, interval) arcs ran for minutes (18 s at
    # 300 levels); the longest path through the same graph is exact in O(num_stages n^2)
    sizes = [180, 320, 90, 410]
    groups = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    noise = torch.rand(1000, 1000, generator=torch.manual_seed(0), dtype=torch.float64) * 0.1
    similarity = (groups[:, None] == groups[None]).double() * 0.9 + (noise + noise.T) / 2
    similarity.fill_diagonal_(1.0)
    assert ilp_boundaries(similarity, 4, min_levels=5) == [180, 500, 590]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("num_stages, min_levels", [(2, 1), (3, 1), (4, 1), (3, 3), (5, 2)])
def test_optimum_equals_exhaustive_search(num_stages, min_levels, ties):
    # a similarity that falls with the distance between levels, as the optimal denoiser's does, plus noise
    n = 11
    levels = torch.arange(n, dtype=torch.float64)
    noise = torch.rand(n, n, generator=torch.manual_seed(num_stages), dtype=torch.float64) * 0.3
    similarity = torch.exp(-(levels[:, None] - levels[None]).abs() / 3) * (1 - (noise + noise.T) / 2)
    if ties:  # few distinct values: many splits of the same score
        similarity = (similarity * 4).round() / 4
    similarity.fill_diagonal_(1.0)
    cuts = ilp_boundaries(similarity, num_stages, min_levels)
    assert cuts == ilp_boundaries(similarity, num_stages, min_levels)  # one of the optima, always the same
    assert len(cuts) == num_stages - 1 and cuts == sorted(set(cuts))
    assert min(b - a for a, b in itertools.pairwise([0, *cuts, n])) >= min_levels
    assert objective(similarity, cuts) == pytest.approx(brute_force(similarity, num_stages, min_levels), abs=1e-9)


def test_plan_on_digits_through_plan_stages():
    digits = torch.tensor(load_digits().images[:600], dtype=torch.float32)[:, None] / 8 - 1
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 21)  # the authors' grid size
    plans = [
        plan_stages(digits, schedule, 3, method="ilp", eta=AUTHORS_ETA, num_samples=16, generator=torch.manual_seed(0))
        for _ in range(2)
    ]
    assert plans[0].method == "ilp" and plans[0].partition.boundaries == plans[1].partition.boundaries
    # each boundary sits half-way between two grid levels, as the authors place it
    levels = schedule.levels.tolist()
    for boundary in plans[0].partition.boundaries:
        i = next(i for i, level in enumerate(levels) if level > boundary)
        assert boundary == round((levels[i - 1] + levels[i]) / 2)


@pytest.mark.parametrize(
    "similarity, num_stages, min_levels, match",
    [
        (torch.ones(4, 5), 2, 1, "square matrix"),
        (torch.ones(4, 4), 5, 1, "do not fit 4 levels"),
        (torch.ones(4, 4), 3, 2, "do not fit 4 levels"),
        (torch.ones(4, 4), 1, 1, "`num_stages` must be an integer >= 2, got 1"),
        # were "... stages of at least `min_levels`=0 levels do not fit 4 levels" and TypeErrors from torch
        (torch.ones(4, 4), 2, 0, "`min_levels` must be a positive integer, got 0"),
        (torch.ones(4, 4), 2, 1.5, "`min_levels` must be a positive integer, got 1.5"),
        (torch.ones(4, 4), 2, True, "`min_levels` must be a positive integer, got True"),
        (torch.ones(4, 4), 2.5, 1, "`num_stages` must be an integer >= 2, got 2.5"),
    ],
)
def test_bad_arguments_are_refused(similarity, num_stages, min_levels, match):
    with pytest.raises(ValueError, match=match):
        ilp_boundaries(similarity, num_stages, min_levels)


@pytest.mark.parametrize("min_levels, match", [(8, "do not fit 20 levels"), (0, "`min_levels` must be a positive")])
def test_ilp_plan_refuses_stages_that_cannot_fit_before_planning(monkeypatch, min_levels, match):
    # min_levels was checked by the program only, after the optimal denoiser had run over the whole grid
    import diffusers_stages.planning.clustering as clustering

    monkeypatch.setattr(clustering, "optimal_predictions", lambda *args, **kwargs: pytest.fail("planned first"))
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 20)
    with pytest.raises(ValueError, match=match):
        ilp_plan(torch.randn(8, 1, 4, 4), schedule, 3, min_levels=min_levels)


@pytest.mark.parametrize("eta", [1.0, 0.001])
def test_boundaries_between_consecutive_timesteps_keep_every_stage(eta):
    # with every training timestep on the grid, the half-way boundaries t + 0.5 were rounded half to even: a cut
    # after level 0 became the boundary 0, two adjacent cuts one boundary ("must be strictly increasing")
    data = torch.from_numpy(load_digits().images[:64]).float()[:, None] / 8 - 1
    scheduler = DDPMScheduler(num_train_timesteps=20)
    plan = plan_stages(
        data, scheduler, 4, "ilp", eta=eta, num_samples=8, num_levels=20, generator=torch.manual_seed(0)
    )
    stages = plan.partition.stage_for_noise_level(plan.levels)
    assert torch.bincount(stages, minlength=4).min() >= 1  # every stage holds a grid level, as the program chose
