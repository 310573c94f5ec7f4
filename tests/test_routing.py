import math
from collections import Counter

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler, HeunDiscreteScheduler, PNDMScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_stages import StageRouter, TimestepPartition
from diffusers_stages.routing import dispatch_by_stage, padded_order
from diffusers_stages.schedulers import model_call_timesteps, scheduler_units


def test_router_follows_the_noise_level():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    router = StageRouter(TimestepPartition([442, 631]), scheduler)
    stages = [router(t) for t in scheduler.timesteps]
    expected = [0 if t < 442 else 1 if t < 631 else 2 for t in scheduler.timesteps.tolist()]
    assert stages == expected


# every scheduler configuration a DDPM-, v- or EDM-style model samples with (DPMSolverSDE needs torchsde)
CONFIGURATIONS = [
    *[(name, {}) for name in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler")],
    *[(name, {}) for name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")],
    *[(name, {}) for name in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler")],
    *[(name, {}) for name in ("DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "SASolverScheduler")],
    *[(name, {}) for name in ("LCMScheduler", "TCDScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")],
    ("DPMSolverSDEScheduler", {}),
    *[("DPMSolverMultistepScheduler", {key: True}) for key in ("use_karras_sigmas", "use_lu_lambdas")],
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "zero", "algorithm_type": "sde-dpmsolver++"}),
    *[("DDIMScheduler", {"timestep_spacing": spacing}) for spacing in ("leading", "trailing", "linspace")],
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    *[(name, {"steps_offset": 1}) for name in ("DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler")],
    *[
        (name, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"})
        for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")
    ],
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),  # c_noise
    ("FlowMatchEulerDiscreteScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
]


@pytest.mark.parametrize(("name", "config"), CONFIGURATIONS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_every_scheduler_routes_each_call_by_its_noise_level(name, config):
    if name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde")
    scheduler = getattr(diffusers, name)(**config)
    sigma = scheduler_units(scheduler) == "sigma"
    boundaries = (1.0, 10.0) if sigma else (442, 631)  # by hand: a sigma stage is (b, b'], a timestep one [b, b')
    router = StageRouter(TimestepPartition(boundaries, units="sigma" if sigma else "timestep"), scheduler)
    stages = []
    for t, is_corrector in model_call_timesteps(scheduler, 7):
        level = math.exp(4 * t) if sigma else t  # c_noise = ln(sigma) / 4
        expected = stages[-1] if is_corrector else sum(level > b if sigma else level >= b for b in boundaries)
        stages.append(router(t, is_corrector))
        assert stages[-1] == expected, (t, stages)
    assert set(stages) == {0, 1, 2}  # 7 steps visit every stage


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


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_plms_first_pair_stays_together_in_a_loop_of_ones_own_as_in_the_pipelines(skip_prk_steps):
    # PLMS's first step (`PNDMScheduler(skip_prk_steps=True)`) calls the model twice, the second call averaged with the
    # first as Heun's corrector: the pipelines keep that pair in one stage (README, "Routing by noise level"), but
    # the router read `state_in_first_order` only, which PNDM has not, and in a loop of one's own split it (the call
    # at 750 in stage 1, its corrector at 500 in stage 0); the Runge-Kutta warm-up has no such pair
    scheduler = PNDMScheduler(skip_prk_steps=skip_prk_steps)
    partition = TimestepPartition([600])
    expected = []
    for t, is_corrector in model_call_timesteps(scheduler, 4):
        expected.append(expected[-1] if is_corrector else int(partition.stage_for_timestep(t)))
    scheduler.set_timesteps(4)
    router = StageRouter(partition, scheduler)
    sample, stages = torch.zeros(1, 1, 2, 2), []
    for t in scheduler.timesteps:
        stages.append(router(t))
        sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample
    assert stages == expected
    assert stages[:3] == ([1, 1, 0] if skip_prk_steps else [1, 1, 1])  # 750, 500 (its corrector), 500 / PRK's 750, 625


def test_scheduler_and_partition_units_must_agree():
    with pytest.raises(ValueError, match="`scheduler` EDMEulerScheduler"):
        StageRouter(TimestepPartition([500]), EDMEulerScheduler())
    with pytest.raises(ValueError, match="'sigma' units"):
        StageRouter(TimestepPartition([2.5], units="sigma"), DDIMScheduler())
    with pytest.raises(  # was: no scheduler name and no way out
        ValueError,
        match=r"`scheduler` DDIMScheduler has num_train_timesteps=500.*1000-step schedule: build it with "
        r"`DDIMScheduler.from_config\(scheduler.config, num_train_timesteps=1000\)`",
    ):
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
        dispatch_by_stage(TimestepPartition([500]), torch.tensor([10]), stage_index, lambda stage, x: stage, None)
    assert dispatch_by_stage(TimestepPartition([500]), torch.tensor([10]), 1, lambda stage, x: stage, None) == 1


class _OpCounts(TorchDispatchMode):
    """Counts the aten ops a call dispatches."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("num_stages", [2, 8, 16])
def test_a_mixed_batch_is_routed_with_one_sort_one_gather_and_one_scatter(num_stages):
    partition = TimestepPartition.uniform(num_stages)
    timesteps = torch.randperm(1000, generator=torch.manual_seed(0))[: 3 * num_stages]  # every stage, shuffled
    x, scale = torch.randn(len(timesteps), 4), {"rows": torch.arange(float(len(timesteps))), "k": 2.0}
    seen = []

    def run(stage, inputs):
        rows, cond = inputs
        seen.append((stage, rows.shape[0], rows._base is not None, cond["k"]))
        return rows * (stage + 1) + cond["rows"][:, None]

    with _OpCounts() as ops:
        out = dispatch_by_stage(partition, timesteps, None, run, [x, scale])
    stages = partition.stage_for_timestep(timesteps)
    assert torch.equal(out, x * (stages[:, None] + 1) + torch.arange(float(len(timesteps)))[:, None])
    counts = torch.bincount(stages, minlength=num_stages).tolist()
    # each stage once, on a view (a slice of the one gathered copy), in stage order; non-tensors passed unchanged
    assert seen == [(s, n, True, 2.0) for s, n in enumerate(counts) if n]
    # whatever the number of stages: one sort, one gather per input tensor, one scatter, no per-stage mask
    assert ops.counts["sort"] == 1 and ops.counts["index"] == 2 and ops.counts["index_put_"] == 1
    assert ops.counts["nonzero"] == 0 and ops.counts["eq"] == 0


def test_routing_reads_as_many_host_values_for_16_stages_as_for_2():
    reads = []
    timesteps = torch.randperm(1000, generator=torch.manual_seed(0))[:32]
    for num_stages in (2, 16):
        with _OpCounts() as ops:
            dispatch_by_stage(
                TimestepPartition.uniform(num_stages), timesteps, None, lambda s, x: x, timesteps.float()
            )
        reads.append(ops.counts["_local_scalar_dense"] + ops.counts["is_nonzero"])  # `.item()`, `bool(tensor)`
    assert reads[0] == reads[1] > 0


def test_list_inputs_are_handed_over():
    held = []
    inputs = [torch.arange(4.0), [torch.ones(4), torch.zeros(4)]]
    run = lambda stage, x: held.append(x) or x[0]  # noqa: E731
    dispatch_by_stage(TimestepPartition([500]), torch.tensor([1, 900, 2, 901]), None, run, inputs)
    assert inputs == [] and [len(x[1]) for x in held] == [2, 2]  # each stage got a list of its own
    one_stage = [torch.arange(2.0)]
    whole = dispatch_by_stage(TimestepPartition([500]), torch.tensor([1, 2]), None, lambda s, x: x[0], one_stage)
    assert whole is one_stage[0]  # one stage: the inputs themselves, no copy


def test_a_fused_pass_gets_every_stage_padded_to_one_count_slot_major():
    partition = TimestepPartition.uniform(4)
    timesteps = torch.tensor([900, 10, 20, 30, 950, 600])  # stages 3, 0, 0, 0, 3, 2; stage 1 holds no sample
    x = torch.arange(6.0)[:, None] * torch.ones(6, 2)
    offered, padded_inputs = [], []

    def fuse(counts):
        offered.append(counts)
        return lambda inputs: padded_inputs.append(inputs) or inputs[0] * 10  # one output row per input row

    with _OpCounts() as ops:
        out = dispatch_by_stage(partition, timesteps, None, lambda s, x: pytest.fail("per-stage path"), [x], fuse=fuse)
    assert offered == [[3, 0, 1, 2]]  # every stage's count
    # three slots (the largest count) of one sample of stages 0, 2 and 3 each; short stages repeat their last sample
    assert padded_inputs[0][0][:, 0].tolist() == [1, 5, 0, 2, 5, 4, 3, 5, 4]
    assert torch.equal(out, x * 10)  # the padding dropped, every row back in place
    assert ops.counts["sort"] == 1 and ops.counts["index"] == 3 and ops.counts["index_put_"] == 1


def test_fuse_is_asked_only_for_mixed_batches_and_may_decline():
    partition, asked = TimestepPartition([500]), []
    fuse = lambda counts: asked.append(counts)  # noqa: E731  (declines: returns None)
    run = lambda stage, x: x + 10 * stage  # noqa: E731
    mixed = dispatch_by_stage(partition, torch.tensor([900, 100, 600]), None, run, torch.arange(3.0), fuse=fuse)
    assert asked == [[1, 2]] and mixed.tolist() == [10.0, 1.0, 12.0]  # declined: the per-stage path ran
    dispatch_by_stage(partition, torch.tensor([900, 600]), None, run, torch.arange(2.0), fuse=fuse)
    dispatch_by_stage(partition, torch.tensor([900, 100]), 1, run, torch.arange(2.0), fuse=fuse)
    assert asked == [[1, 2]]  # one stage, or `stage_index`: never asked


def test_padded_order_of_uneven_and_empty_stages():
    rows, kept = padded_order([0, 2, 0, 1])  # slots of (stage 1, stage 3): (0, 2), (1, 2)
    assert rows.tolist() == [0, 2, 1, 2] and kept.tolist() == [0, 2, 1]
    rows, kept = padded_order([1, 1, 1])
    assert rows.tolist() == [0, 1, 2] and kept.tolist() == [0, 1, 2]  # even stages: no padding


def test_the_router_takes_a_call_timestep_expanded_over_the_batch():
    # a pipeline that hands the model `t.expand(batch)` (DiT's, Flux's) gave the router "RuntimeError: shape '[1]' is
    # invalid for input of size 2"; one model call's timesteps now route together, and timesteps of several stages,
    # or none, are refused by name
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    router = StageRouter(TimestepPartition([442, 631]), scheduler)
    for t in scheduler.timesteps:
        assert router(t.expand(3)) == router(t)
    assert router(torch.tensor([[500, 600]])) == 1
    with pytest.raises(
        ValueError, match=r"StageRouter picks one stage per model call, but `timestep` .* stages \[0, 2\]"
    ):
        router(torch.tensor([100, 900]))
    with pytest.raises(ValueError, match="`timestep` must hold at least one value, got tensor"):
        router(torch.tensor([]))


@pytest.mark.parametrize("partition", [[442, 631], None, "442"])
def test_the_router_names_a_partition_that_is_not_one(partition):
    # StageRouter([442, 631], scheduler) raised "AttributeError: 'list' object has no attribute 'units'"
    with pytest.raises(
        ValueError, match=r"`partition` must be a TimestepPartition \(e.g. TimestepPartition\(\[442, 631\]\)\), got"
    ):
        StageRouter(partition, DDIMScheduler())
