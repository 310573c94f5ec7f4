"""Decoder widths under a FLOP budget: counted costs, the exact optimum, the plan's config, experts, bad budgets."""

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, HeunDiscreteScheduler, PNDMScheduler, UNet2DModel
from sklearn.datasets import load_digits
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusers_stages import MultiStageUNet2DModel, TimestepPartition
from diffusers_stages.evaluation import count_flops
from diffusers_stages.planning import partition_to_model_config, plan_stages
from diffusers_stages.planning.budget import (
    candidate_widths,
    expected_flops,
    measure_stage_flops,
    stage_calls,
    widths_for_budget,
)
from diffusers_stages.timestep_sampling import stage_mass

PARTITION = TimestepPartition([442, 631])
SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@pytest.fixture
def gray_unet_kwargs(tiny_unet_kwargs) -> dict:
    return dict(tiny_unet_kwargs, in_channels=1, out_channels=1, num_class_embeds=3)  # attention, class labels


def _sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(timestep_spacing="trailing")


def _real_flops(model, stage_index=None, training=False) -> int:
    """FLOPs of one sample through ``model`` on the CPU, on real tensors (math attention, so that it is counted)."""
    sample, labels = torch.randn(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)
    kwargs = {} if stage_index is None else {"stage_index": stage_index}
    with sdpa_kernel(SDPBackend.MATH):
        if training:
            return count_flops(lambda: model(sample, torch.tensor([10]), labels, **kwargs).sample.sum().backward())[0]
        return count_flops(lambda: model(sample, torch.tensor([10]), labels, **kwargs))[0]


def test_stage_calls_count_the_schedulers_model_calls():
    # trailing DDIM, 10 steps: 999, 899, ..., 99; stage 0 is t < 442, stage 1 442 <= t < 631
    assert stage_calls(PARTITION, 10, _sampling_scheduler()) == [4.0, 2.0, 4.0]
    # Heun: 2 steps are 999 (predictor), then 0 as corrector of the first step (stays in stage 2), then 0 again
    assert stage_calls(PARTITION, 2, HeunDiscreteScheduler()) == [1.0, 0.0, 2.0]
    training = stage_calls(PARTITION, batch_size=64)
    assert training == pytest.approx([64 * m for m in stage_mass(PARTITION)]) and sum(training) == pytest.approx(64)


def test_counted_costs_equal_real_counts_on_real_models(gray_unet_kwargs):
    widths = [(4, 8), (8, 16), (12, 24)]
    calls, capacity = measure_stage_flops(gray_unet_kwargs, widths)
    train, _ = measure_stage_flops(gray_unet_kwargs, widths, training=True)
    torch.manual_seed(0)
    model = MultiStageUNet2DModel.from_config(partition_to_model_config(gray_unet_kwargs, PARTITION, widths))
    with sdpa_kernel(SDPBackend.MATH):
        encoder = count_flops(lambda: model.encode(torch.randn(1, 1, 8, 8), torch.tensor([10]), torch.zeros(1).long()))
    for s in range(3):
        assert calls[s] == _real_flops(model, s) and capacity[s] == calls[s] - encoder[0]
        assert train[s] == _real_flops(model, s, training=True)
    # decoders as wide as the encoder cost exactly the UNet2DModel: the baseline's budget is its own FLOPs
    unet = UNet2DModel(**gray_unet_kwargs)
    baseline = expected_flops(gray_unet_kwargs, PARTITION, [(8, 16)] * 3, 10, _sampling_scheduler())
    assert baseline == 10 * _real_flops(unet) > 0
    (expert,), _ = measure_stage_flops(gray_unet_kwargs, [(8, 16)], architecture="experts")
    assert expert == _real_flops(unet)


def test_costs_of_a_model_config_with_default_values(gray_unet_kwargs):
    # a model's config lists the arguments left at their defaults (`_use_default_values`), which from_config drops:
    # the candidate widths written over them must still be the ones counted
    widths = [(4, 8), (12, 24)]
    source = MultiStageUNet2DModel.from_config(gray_unet_kwargs)  # decoder widths at their default
    assert measure_stage_flops(source.config, widths) == measure_stage_flops(gray_unet_kwargs, widths)
    unet = UNet2DModel.from_config({"sample_size": 8})  # block_out_channels at their default
    plain = {k: v for k, v in unet.config.items() if k != "_use_default_values"}
    assert measure_stage_flops(unet.config, [(32, 32, 64, 64)], "experts") == measure_stage_flops(
        plain, [(32, 32, 64, 64)], "experts"
    )


def test_widths_are_the_exact_optimum_within_the_budget(gray_unet_kwargs):
    scheduler, difficulty = _sampling_scheduler(), [0.9, 0.4, 0.05]
    budget = expected_flops(gray_unet_kwargs, PARTITION, [(8, 16)] * 3, 10, scheduler)
    plan = widths_for_budget(gray_unet_kwargs, PARTITION, difficulty, budget, 10, scheduler, scales=SCALES)
    assert plan.expected_flops <= budget and plan.expected_flops == expected_flops(
        gray_unet_kwargs, PARTITION, plan.widths, 10, scheduler
    )
    # brute force over every assignment (in budget, harder stages no smaller): the solver's choice is the optimum
    candidates = candidate_widths((8, 16), 4, SCALES)
    flops, capacity = measure_stage_flops(gray_unet_kwargs, candidates)
    calls = stage_calls(PARTITION, 10, scheduler)

    def value(picks):
        return sum(n * d * math.log(capacity[k]) for n, d, k in zip(calls, difficulty, picks))

    feasible = [
        p
        for p in itertools.product(range(len(candidates)), repeat=3)
        if sum(calls[s] * flops[k] for s, k in enumerate(p)) <= budget
        and capacity[p[0]] >= capacity[p[1]] >= capacity[p[2]]
    ]
    best = max(feasible, key=value)
    assert value([candidates.index(w) for w in plan.widths]) == pytest.approx(value(best), abs=1e-12)
    # capacity goes where the difficulty is: the clean stage gets the widest decoder, the noisy one the narrowest
    assert plan.widths[0] > plan.widths[2] and plan.widths[0] >= plan.widths[1]
    assert plan.widths[0] > (8, 16) > plan.widths[2]
    # a larger budget never buys less capacity
    larger = widths_for_budget(gray_unet_kwargs, PARTITION, difficulty, 2 * budget, 10, scheduler, scales=SCALES)
    assert value([candidates.index(w) for w in larger.widths]) > value(best)


def test_the_widths_depend_on_the_difficulties_ratios_not_their_scale(gray_unet_kwargs):
    # the objective sum_s n_s d_s log(capacity) has the same optimum for d and k * d, but small difficulties were
    # outweighed by the solver's cheaper-choice tie-break (the widths shrank), and large ones made SciPy fail
    scheduler, difficulty = _sampling_scheduler(), [0.9, 0.4, 0.05]
    budget = expected_flops(gray_unet_kwargs, PARTITION, [(8, 16)] * 3, 10, scheduler)
    plan = widths_for_budget(gray_unet_kwargs, PARTITION, difficulty, budget, 10, scheduler, scales=SCALES)
    for k in (1e-6, 1e-12, 1e100, 1e300):
        scaled = [k * d for d in difficulty]
        assert widths_for_budget(gray_unet_kwargs, PARTITION, scaled, budget, 10, scheduler, scales=SCALES) == plan


def test_a_stage_no_model_call_reaches_takes_the_smallest_width_its_order_allows(gray_unet_kwargs):
    # Heun, 2 steps: no call falls in stage 1, whose width costs nothing; it took any width between its neighbours'
    scheduler = HeunDiscreteScheduler()
    assert stage_calls(PARTITION, 2, scheduler) == [1.0, 0.0, 2.0]
    budget = expected_flops(gray_unet_kwargs, PARTITION, [(8, 16)] * 3, 2, scheduler)
    for difficulty in ([0.9, 0.4, 0.05], [0.05, 0.4, 0.9]):
        plan = widths_for_budget(gray_unet_kwargs, PARTITION, difficulty, budget, 2, scheduler, scales=SCALES)
        easier = min(plan.widths[0], plan.widths[2], key=sum)  # stage 1 is harder than this one: no smaller
        assert plan.widths[1] == easier != max(plan.widths[0], plan.widths[2], key=sum)


def test_widths_stay_within_a_budget_of_a_large_model_even_a_few_flops_short(tiny_unet_kwargs):
    # the solver's budget row was loosened by 1e-12 of the budget (and HiGHS allows its own tolerance): a budget 1,000
    # FLOPs short of the widths' cost (of 1.86e15) bought them anyway, and expected_flops exceeded the budget
    config = dict(tiny_unet_kwargs, sample_size=1024, block_out_channels=(64, 128), norm_num_groups=32,
                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)  # fmt: skip
    scheduler = _sampling_scheduler()
    full = expected_flops(config, PARTITION, [(64, 128)] * 3, 50, scheduler)
    assert full > 1e15
    for short in (1, 1000):
        plan = widths_for_budget(config, PARTITION, [0.9, 0.4, 0.1], full - short, 50, scheduler, scales=(0.5, 1.0))
        assert plan.expected_flops <= plan.budget == full - short and plan.widths[0] == (64, 128) != plan.widths[2]


def test_training_budget_and_experts(gray_unet_kwargs):
    difficulty, few = [0.9, 0.4, 0.05], (0.5, 1.0, 1.5)
    unet = UNet2DModel(**gray_unet_kwargs)
    step = 16 * _real_flops(unet, training=True)  # one training step of the UNet2DModel on 16 images
    assert expected_flops(gray_unet_kwargs, PARTITION, [(8, 16)] * 3, batch_size=16) == pytest.approx(step)
    plan = widths_for_budget(gray_unet_kwargs, PARTITION, difficulty, 1.5 * step, batch_size=16, scales=few)
    assert step < plan.expected_flops <= 1.5 * step and plan.widths[0] > plan.widths[2]
    # experts: each stage's whole model is sized, at 1.5 times the UNet2DModel's 10 sampling steps
    scheduler, budget = _sampling_scheduler(), 15 * _real_flops(unet)
    experts = widths_for_budget(
        gray_unet_kwargs,
        PARTITION,
        difficulty,
        budget,
        10,
        scheduler,
        architecture="experts",
        scales=few,
    )
    calls = stage_calls(PARTITION, 10, scheduler)
    models = [UNet2DModel(**dict(gray_unet_kwargs, block_out_channels=w)) for w in experts.widths]
    real = sum(n * _real_flops(model) for n, model in zip(calls, models))
    assert real == experts.expected_flops <= budget and experts.widths[0] > experts.widths[2]


def test_plan_stages_with_a_budget_gives_a_config_that_trains_as_planned(gray_unet_kwargs):
    data = torch.tensor(load_digits().images[:300], dtype=torch.float32)[:, None] / 8 - 1
    scheduler = DDPMScheduler()
    budget = expected_flops(gray_unet_kwargs, PARTITION, [(8, 16)] * 3, 10, scheduler)  # the UNet's 10 DDPM steps
    plan = plan_stages(
        data, scheduler, 3, num_samples=16, num_levels=30, generator=torch.manual_seed(0),
        budget=budget, model_config=gray_unet_kwargs, num_inference_steps=10,
    )  # fmt: skip
    summary = plan.to_dict()
    assert summary["expected_flops"] <= budget and len(summary["decoder_block_out_channels"]) == 3
    assert summary["stage_difficulty"][0] > summary["stage_difficulty"][2]
    model = MultiStageUNet2DModel.from_config(
        partition_to_model_config(gray_unet_kwargs, plan.partition, plan.decoder_block_out_channels)
    )
    assert model.config.decoder_block_out_channels == [list(w) for w in plan.decoder_block_out_channels]
    calls = stage_calls(plan.partition, 10, scheduler)
    assert sum(n * _real_flops(model, s) for s, n in enumerate(calls)) == plan.budget.expected_flops
    # one training step through every decoder: all of them receive gradients
    t = torch.tensor([50, 500, 900])
    model(torch.randn(3, 1, 8, 8), t, torch.zeros(3).long()).sample.pow(2).mean().backward()
    assert all(d.conv_out.weight.grad.abs().sum() > 0 for d in model.decoders)


@pytest.mark.parametrize(
    "budget, kwargs, match",
    [
        (0.0, {}, "`budget` must be a positive number of FLOPs, got 0.0"),
        (float("nan"), {}, "`budget` must be a positive number of FLOPs, got nan"),
        (True, {}, "`budget` must be a positive number of FLOPs, got True"),
        (float("inf"), {}, "`budget` must be a positive number of FLOPs, got inf"),
        (-1e9, {}, "`budget` must be a positive number of FLOPs, got -1000000000.0"),
        (np.float32("nan"), {}, "`budget` must be a positive number of FLOPs, got np.float32\\(nan\\)"),
        (np.bool_(True), {}, "`budget` must be a positive number of FLOPs, got np.True_"),
        ("1e9", {}, "`budget` must be a positive number of FLOPs, got '1e9'"),
        pytest.param(10**400, {}, "`budget` must be a positive number of FLOPs, got 1000", id="no-float-holds-it"),
        (1e5, {}, "`budget`=1e\\+05 FLOPs is below what the smallest allowed widths cost"),
        (1e9, {"num_inference_steps": 0}, "`num_inference_steps` must be a positive integer, got 0"),
        (1e9, {"architecture": "dit"}, "`architecture` must be one of"),
        (1e9, {"difficulty": [0.0, 0.0, 0.0]}, "`difficulty` needs one finite value >= 0 per stage"),
        (1e9, {"scales": (0.5, -1.0)}, "`scales` must be positive numbers"),
        # each of these failed inside the width rounding or the solver, with an error that named no argument
        (1e9, {"scales": (0.5, float("inf"))}, "`scales` must be positive numbers, got \\[0.5, inf\\]"),
        (1e9, {"scales": 0.5}, "`scales` must be a sequence of numbers, got 0.5"),
        (1e9, {"scales": None}, "`scales` must be a sequence of numbers, got None"),
        (1e9, {"scales": "0.5"}, "`scales` must be a sequence of numbers, got '0.5'"),
        (1e9, {"scales": ("0.5",)}, "`scales` must be a sequence of numbers, got \\('0.5',\\)"),
        (1e9, {"scales": np.array([0.5, -1.0])}, "`scales` must be positive numbers, got \\[0.5, -1.0\\]"),
        (1e9, {"difficulty": [float("inf"), 0.4, 0.1]}, "`difficulty` needs one finite value >= 0 per stage"),
        (1e9, {"difficulty": None}, "`difficulty` must be a sequence of numbers, got None"),
        (1e9, {"difficulty": ["hard", 0.4, 0.1]}, "`difficulty` must be a sequence of numbers, got \\['hard'"),
    ],
)
def test_bad_budgets_are_refused(gray_unet_kwargs, budget, kwargs, match):
    kwargs = {"difficulty": [0.9, 0.4, 0.1], "num_inference_steps": 10, "scales": SCALES, **kwargs}
    with pytest.raises(ValueError, match=match):
        widths_for_budget(gray_unet_kwargs, PARTITION, budget=budget, scheduler=_sampling_scheduler(), **kwargs)


def test_arguments_of_the_wrong_kind_are_refused_by_name(gray_unet_kwargs):
    # each was an AttributeError or TypeError from deep inside ('str' object has no attribute 'config', ...)
    kwargs = {"difficulty": [0.9, 0.4, 0.1], "budget": 1e9, "num_inference_steps": 10, "scales": SCALES}
    scheduler = _sampling_scheduler()
    for call, match in (
        (lambda: widths_for_budget(gray_unet_kwargs, [442, 631], scheduler=scheduler, **kwargs),
         "`partition` must be a TimestepPartition, got list"),
        (lambda: widths_for_budget(gray_unet_kwargs, PARTITION, scheduler="ddim", **kwargs),
         "`scheduler` must be a diffusers scheduler, got str"),
        (lambda: widths_for_budget(None, PARTITION, scheduler=scheduler, **kwargs),
         "`model_config` must be a model config \\(a mapping\\) or a model, got NoneType"),
        (lambda: expected_flops([1, 2], PARTITION, [(8, 16)] * 3, 10, scheduler),
         "`model_config` must be a model config \\(a mapping\\) or a model, got list"),
        (lambda: stage_calls((442, 631), batch_size=4), "`partition` must be a TimestepPartition, got tuple"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            call()


def test_a_config_or_scales_no_model_can_be_built_at_is_refused_by_name(gray_unet_kwargs):
    # built on the meta device, such a model failed in torch with "Storage size calculation overflowed" (a
    # RuntimeError) or a TypeError from its shape, naming no argument
    kwargs = {
        "difficulty": [0.9, 0.4, 0.1],
        "budget": 1e9,
        "num_inference_steps": 10,
        "scheduler": _sampling_scheduler(),
    }
    for config, scales in ((dict(gray_unet_kwargs, sample_size=2**40), SCALES), (gray_unet_kwargs, (1e300,))):
        with pytest.raises(ValueError, match="(?i)`model_config` builds no model of the candidate widths .*overflow"):
            widths_for_budget(config, PARTITION, scales=scales, **kwargs)


def test_plan_stages_refuses_a_budget_it_cannot_plan_before_planning(gray_unet_kwargs):
    data = torch.randn(16, 1, 8, 8)
    with pytest.raises(ValueError, match="`budget` needs `model_config`"):
        plan_stages(data, DDPMScheduler(), budget=1e9)
    with pytest.raises(ValueError, match="`budget` needs `data`"):
        plan_stages(None, DDPMScheduler(), method="snr", budget=1e9, model_config=gray_unet_kwargs)
    with pytest.raises(ValueError, match="`budget` must be a positive number of FLOPs, got -1"):
        plan_stages(data, DDPMScheduler(), budget=-1, model_config=gray_unet_kwargs)
    # what the budget pays for is checked before planning too (a bad `num_samples` would otherwise be found first)
    for kwargs, match in (
        ({"num_inference_steps": 0}, "`num_inference_steps` must be a positive integer or None, got 0"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer, got 0"),
        # a step count the sampling scheduler cannot run (PNDM's warm-up needs 4) was found only after planning
        (
            {"num_inference_steps": 2, "sampling_scheduler": PNDMScheduler()},
            "needs `num_inference_steps` of at least 4",
        ),
        (
            {"num_inference_steps": 2, "sampling_scheduler": "ddim"},
            "`sampling_scheduler` must be a diffusers scheduler",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            plan_stages(data, DDPMScheduler(), num_samples=0, budget=1e9, model_config=gray_unet_kwargs, **kwargs)


def test_a_numpy_budget_plans_as_the_same_python_float(gray_unet_kwargs):
    """A numpy number (what arithmetic on counted FLOPs often gives) was refused as "not a positive number"."""
    kwargs = {"difficulty": [0.9, 0.4, 0.1], "num_inference_steps": 10, "scales": SCALES}
    budget = expected_flops(gray_unet_kwargs, PARTITION, [(8, 16)] * 3, 10, _sampling_scheduler())
    planned = [
        widths_for_budget(gray_unet_kwargs, PARTITION, budget=value, scheduler=_sampling_scheduler(), **kwargs)
        for value in (float(np.float32(budget)), np.float32(budget))
    ]
    assert planned[0] == planned[1] and type(planned[1].budget) is float


def test_budget_candidates_give_every_attention_layer_a_head():
    # the budget's candidate widths were multiples of norm_num_groups alone, as the heuristic's were
    from diffusers_stages.planning.sizing import width_multiple

    attn = {"norm_num_groups": 4, "attention_head_dim": 8, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"]}
    assert width_multiple(attn) == 8
    assert width_multiple(dict(attn, attention_head_dim=6)) == 12
    no_attention = dict(attn, down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2)
    assert width_multiple(no_attention) == 4  # no attention: no head (diffusers' default up blocks attend)
    assert width_multiple(dict(attn, attention_head_dim=None)) == 4  # one head as wide as the block
    # an expert is a whole UNet2DModel: its middle block attends too (`add_attention`, on by default), which a
    # multi-stage decoder leaves to the shared encoder; an expert 4 wide had no head (ZeroDivisionError in diffusers)
    assert width_multiple(no_attention, "experts") == 8 and width_multiple(no_attention) == 4
    assert width_multiple(dict(no_attention, add_attention=False), "experts") == 4
    experts = widths_for_budget(dict(no_attention, sample_size=8, block_out_channels=(8, 16)), TimestepPartition([500]),
                                [1.0, 0.1], 1e12, 4, DDIMScheduler(), architecture="experts")  # fmt: skip
    assert all(w % 8 == 0 for widths in experts.widths for w in widths)


def test_expert_candidates_fit_the_group_norm_of_their_attending_middle_block():
    # an expert's middle block normalises its attention input in `attn_norm_num_groups` groups (UNet2DModel's
    # option, the middle block's only): candidates were multiples of norm_num_groups (and the head) alone, so an
    # expert 4 wide was a GroupNorm of 8 groups over 4 channels, and the whole plan failed once the images were read
    from diffusers_stages.planning.sizing import width_multiple

    config = {"norm_num_groups": 4, "attention_head_dim": None, "attn_norm_num_groups": 8,
              "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}  # fmt: skip
    assert width_multiple(config, "experts") == 8
    assert width_multiple(config) == 4  # a decoder has no middle block (the shared encoder's is not sized)
    assert width_multiple(dict(config, add_attention=False), "experts") == 4  # a middle block without attention
    experts = widths_for_budget(dict(config, sample_size=8, block_out_channels=(8, 16)), TimestepPartition([500]),
                                [1.0, 0.1], 1e12, 4, DDIMScheduler(), architecture="experts")  # fmt: skip
    assert all(w % 8 == 0 for widths in experts.widths for w in widths)


@pytest.mark.parametrize("sample_size", [None, "8", 0, [8], True])
def test_a_model_config_without_a_usable_sample_size_is_refused_by_name(
    gray_unet_kwargs, tmp_path, capsys, sample_size
):
    # a config without `sample_size` (UNet2DModel's default, None: any size) failed deep in the FLOP count with
    # "TypeError: 'NoneType' object is not iterable" (the plan command: a traceback after every image was loaded)
    from diffusers_stages.plan import run

    config = {key: value for key, value in gray_unet_kwargs.items() if key != "sample_size"}
    if sample_size is not None:
        config["sample_size"] = sample_size
    match = "`model_config` has no usable `sample_size`"
    with pytest.raises(ValueError, match=match):
        widths_for_budget(config, PARTITION, [0.9, 0.4, 0.1], 1e9, 10, _sampling_scheduler(), scales=SCALES)
    with pytest.raises(ValueError, match=match):
        plan_stages(torch.randn(16, 1, 8, 8), DDPMScheduler(), num_samples=0, budget=1e9, model_config=config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):  # before any image is read
        run(["--train_data_dir", str(tmp_path / "missing"), "--model_config", str(tmp_path / "config.json"),
             "--budget", "1e9"])  # fmt: skip
    assert "`--model_config` has no usable `sample_size`" in capsys.readouterr().err


def test_a_model_config_with_per_stage_up_blocks_is_refused_before_planning(gray_unet_kwargs, tmp_path, capsys):
    # budget planning cannot size decoders of per-stage `decoder_up_block_types`: that was found only after the
    # planning (and, in the plan command, after every image was loaded)
    from diffusers_stages.plan import run

    config = dict(gray_unet_kwargs, stage_boundaries=[500], decoder_up_block_types=[["UpBlock2D"] * 2] * 2)
    with pytest.raises(ValueError, match="`model_config` sets per-stage `decoder_up_block_types`"):
        plan_stages(torch.randn(16, 1, 8, 8), DDPMScheduler(), num_samples=0, budget=1e9, model_config=config)
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "MultiStageUNet2DModel"}))
    with pytest.raises(SystemExit):  # before any image is read
        run(["--train_data_dir", str(tmp_path / "missing"), "--model_config", str(tmp_path / "config.json"),
             "--budget", "1e9"])  # fmt: skip
    assert "`--model_config` sets per-stage `decoder_up_block_types`" in capsys.readouterr().err


def test_numpy_integer_step_counts_and_batches_count_as_the_same_python_ints(gray_unet_kwargs):
    """A numpy integer (a step count read from an array, say) was refused as "not a positive integer" by the budget
    functions, and by `plan_stages` with a hint about configs saved as JSON, where the package's other call
    arguments take it (`models.checks.positive_integer_arguments`)."""
    scheduler = _sampling_scheduler()
    assert stage_calls(PARTITION, np.int64(10), scheduler) == stage_calls(PARTITION, 10, scheduler)
    assert stage_calls(PARTITION, batch_size=np.int32(64)) == stage_calls(PARTITION, batch_size=64)
    widths = [(8, 16)] * 3
    assert expected_flops(gray_unet_kwargs, PARTITION, widths, np.int64(10), scheduler) == expected_flops(
        gray_unet_kwargs, PARTITION, widths, 10, scheduler
    )
    assert expected_flops(gray_unet_kwargs, PARTITION, widths, batch_size=np.int64(4)) == expected_flops(
        gray_unet_kwargs, PARTITION, widths, batch_size=4
    )
    kwargs = {"difficulty": [0.9, 0.4, 0.1], "budget": 1e9, "scales": SCALES}
    assert widths_for_budget(gray_unet_kwargs, PARTITION, num_inference_steps=np.int64(10), scheduler=scheduler,
                             **kwargs) == widths_for_budget(gray_unet_kwargs, PARTITION, num_inference_steps=10,
                                                            scheduler=scheduler, **kwargs)  # fmt: skip
    data = torch.tensor(load_digits().images[:64], dtype=torch.float32)[:, None] / 8 - 1
    plans = [
        plan_stages(data, DDPMScheduler(), 3, num_samples=8, num_levels=20, generator=torch.manual_seed(0),
                    budget=1e9, model_config=gray_unet_kwargs, **counts).to_dict()
        for counts in ({"num_inference_steps": 10}, {"num_inference_steps": np.int64(10)},
                       {"batch_size": 4}, {"batch_size": np.int64(4)})
    ]  # fmt: skip
    assert plans[0] == plans[1] and plans[2] == plans[3]
    # still refused by name: a numpy bool, a zero, a float
    for value in (np.bool_(True), np.int64(0), 10.0):
        with pytest.raises(
            ValueError, match=re.escape(f"`num_inference_steps` must be a positive integer, got {value!r}.")
        ):
            stage_calls(PARTITION, value, scheduler)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got np.int64\\(0\\)"):
        plan_stages(data, DDPMScheduler(), budget=1e9, model_config=gray_unet_kwargs, batch_size=np.int64(0))


@pytest.mark.parametrize("paid", [{"num_inference_steps": 10}, {"batch_size": 4}], ids=["sampling", "training"])
@pytest.mark.parametrize("architecture", ["multistage", "experts"])
def test_plan_stages_refuses_a_budget_below_the_cheapest_widths_before_planning(gray_unet_kwargs, paid, architecture):
    """The budget was compared with what the cheapest widths cost only after the (long) optimal-denoiser pass, though
    that cost depends on neither the data nor the stages: every model call (or training sample) at the cheapest
    candidate width. A bad `num_samples`, which planning would refuse first, shows that it is checked before."""
    data = torch.randn(16, 1, 8, 8)
    kwargs = {"budget": 1e3, "model_config": gray_unet_kwargs, "architecture": architecture, **paid}
    with pytest.raises(
        ValueError, match="`budget`=1000 FLOPs is below what the smallest allowed widths cost"
    ) as error:
        plan_stages(data, DDPMScheduler(), num_samples=0, **kwargs)
    # the same message as after planning (`widths_for_budget`), and the same cheapest cost
    with pytest.raises(ValueError) as after:
        widths_for_budget(gray_unet_kwargs, PARTITION, [0.9, 0.4, 0.1], 1e3, scheduler=DDPMScheduler(),
                          architecture=architecture, **paid)  # fmt: skip
    assert str(error.value) == str(after.value)


def test_plan_stages_refuses_budget_arguments_it_would_ignore(gray_unet_kwargs):
    """Each of these was ignored without a word: a `sampling_scheduler` without `num_inference_steps` (the widths
    were sized for training FLOPs), a `batch_size` with `num_inference_steps` (sampling FLOPs per image), and what a
    budget pays for or sizes without a `budget` (no widths were planned). The command refuses the same options."""
    data = torch.randn(16, 1, 8, 8)
    budget = {"budget": 1e9, "model_config": gray_unet_kwargs}
    for kwargs, match in (
        ({**budget, "sampling_scheduler": DDIMScheduler()},
         "`sampling_scheduler` is the scheduler whose sampling steps `budget` counts: give `num_inference_steps`"),
        ({**budget, "num_inference_steps": 10, "batch_size": 4},
         "`batch_size` 4 is the training batch a budget without `num_inference_steps` pays for"),
        ({"model_config": gray_unet_kwargs}, "`model_config` is read with a `budget` only"),
        ({"num_inference_steps": 10}, "`num_inference_steps` is read with a `budget` only"),
        ({"sampling_scheduler": DDIMScheduler()}, "`sampling_scheduler` is read with a `budget` only"),
        ({"batch_size": 4}, "`batch_size` is read with a `budget` only"),
        ({"architecture": "experts"}, "`architecture` is read with a `budget` only"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):  # before planning: a bad `num_samples` would be refused first
            plan_stages(data, DDPMScheduler(), num_samples=0, **kwargs)


def test_plan_stages_refuses_a_sampling_scheduler_of_other_units_before_planning(gray_unet_kwargs):
    """A sampling scheduler whose timesteps are not the schedule's (a DDIM sampler for an EDM plan, another number
    of training timesteps) was refused only when the budget counted its calls, after the whole planning pass."""
    from diffusers_stages.planning import NoiseSchedule

    data = torch.randn(16, 1, 8, 8)
    budget = {"budget": 1e9, "model_config": gray_unet_kwargs, "num_inference_steps": 4}
    for schedule, sampler, match in (
        (NoiseSchedule.edm(num_levels=20), DDIMScheduler(), "`scheduler` DDIMScheduler is not an EDM scheduler"),
        (DDPMScheduler(), DDIMScheduler(num_train_timesteps=500), "`scheduler` DDIMScheduler has num_train_timesteps=500"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):  # a bad `num_samples` would be refused first by planning
            plan_stages(data, schedule, num_samples=0, num_levels=20, sampling_scheduler=sampler, **budget)


def test_plan_stages_refuses_a_model_config_of_other_samples_than_the_data(gray_unet_kwargs):
    """Widths were planned, and their FLOPs counted, for a model config of other channels or size than the data the
    stages were measured on (the command refuses such a --model_config); now refused before planning."""
    data = torch.randn(16, 1, 8, 8)
    budget = {"budget": 1e9, "num_inference_steps": 4}
    for config, data_text in (
        (dict(gray_unet_kwargs, in_channels=3, out_channels=3), "1-channel samples of size (8, 8)"),
        (dict(gray_unet_kwargs, sample_size=16), "1-channel samples of size (8, 8)"),
        (dict(gray_unet_kwargs, sample_size=[8, 16]), "1-channel samples of size (8, 8)"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"but `data` holds {data_text}")):
            plan_stages(data, DDPMScheduler(), num_samples=0, model_config=config, **budget)
    with pytest.raises(ValueError, match=re.escape("but `data` holds samples of 128 values")):  # flattened
        plan_stages(data.reshape(16, 64).repeat(1, 2), DDPMScheduler(), num_samples=0, model_config=gray_unet_kwargs,
                    **budget)  # fmt: skip
    # the data's own shape, flattened or not, plans (a model built with the default sample size too: `[8, 8]`)
    for samples in (data, data.reshape(16, 64)):
        with pytest.raises(ValueError, match="`num_samples` must be a positive integer"):  # planning was reached
            plan_stages(samples, DDPMScheduler(), num_samples=0, model_config=dict(gray_unet_kwargs, sample_size=[8, 8]),
                        **budget)  # fmt: skip
