"""Stage planning: the boundary rule, baselines, units, stability on real data, sizes, configs and bad input."""

import functools
import math

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel
from sklearn.datasets import load_digits

from diffusers_stages import MultiStageUNet2DModel, TimestepPartition
from diffusers_stages.planning import (
    NoiseSchedule,
    boundaries_from_similarity,
    gradient_plan,
    interval_clustering,
    partition_to_model_config,
    plan_stages,
    plot_plan,
    stage_difficulty,
    suggest_decoder_widths,
)
from diffusers_stages.planning.baselines import gradient_affinity


@pytest.fixture
def gray_unet_kwargs(tiny_unet_kwargs) -> dict:
    return dict(tiny_unet_kwargs, in_channels=1, out_channels=1)  # for 8x8 digits


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8 - 1  # 1797 x 1 x 8 x 8 in [-1, 1]


# ---------------------------------------------------------------------------------------------------------------
# the boundary rule
def test_boundary_rule_on_linear_similarities_any_number_of_stages():
    # S(t, anchor) = 1 - |t - anchor| / 10 on 11 levels: the running mean from an anchor is 1 - j/20, it crosses
    # alpha = 0.8 at j = 4, so every stage grown from an end holds 4 levels past its anchor, plus the crossing
    def linear(num_levels):
        levels = torch.arange(num_levels, dtype=torch.float64)
        return lambda anchor: (1 - (levels - anchor).abs() / 10).clamp_min(0)

    assert boundaries_from_similarity(linear(11), 11, 2, 0.8)[0] == [4.0]  # one cut, from the clean end
    positions, curves = boundaries_from_similarity(linear(11), 11, 3, 0.8)
    assert positions == [4.0, 6.0] and sorted(curves) == [0, 10]  # Algorithm 1: anchors t=0 and t=T
    positions, curves = boundaries_from_similarity(linear(41), 41, 5, 0.8)
    assert positions == [4.0, 9.0, 31.0, 36.0] and sorted(curves) == [0, 5, 35, 40]  # re-anchored past each cut
    with pytest.raises(ValueError, match="leaves no room for 4 stages"):
        boundaries_from_similarity(linear(11), 11, 4, 0.8)  # the end stages would meet


@pytest.mark.parametrize(
    "num_stages, alpha, match",
    [  # were "`alpha`=0.8 leaves no room for 0 stages", torch's RuntimeError, a KeyError and a TypeError
        (0, 0.8, "`num_stages` must be an integer >= 2, got 0"),
        (1, 0.8, "`num_stages` must be an integer >= 2, got 1"),
        (2.0, 0.8, "`num_stages` must be an integer >= 2, got 2.0"),
        (12, 0.8, "`num_stages`=12 exceeds the 11 noise levels"),
        (3, 1.5, "`alpha` must be in \\(0, 1\\], got 1.5"),
        (3, 0.0, "`alpha` must be in \\(0, 1\\], got 0.0"),
    ],
)
def test_boundary_rule_refuses_bad_arguments_by_name(num_stages, alpha, match):
    ramp = torch.linspace(1, 0, 11, dtype=torch.float64)
    curves = {0: ramp, 10: ramp.flip(0)}
    with pytest.raises(ValueError, match=match):
        boundaries_from_similarity(curves.__getitem__, 11, num_stages, alpha)


def test_boundary_rule_refuses_stages_that_meet_between_two_grid_levels():
    # the clean-end stage ended at 4.3 and the noisy-end one started at 4.8: the middle stage held no grid level (on
    # digits, 21 levels, alpha=0.8, eta=0.1: boundaries 368 / 370 of T), and with every timestep on the grid both
    # became timestep 5: "`boundaries` must be strictly increasing, got [5.0, 5.0]", not the rule's own error
    def similarity(clean_levels, noisy_levels):
        def curve(anchor):
            out = torch.zeros(8, dtype=torch.float64)
            out[:clean_levels] = float(anchor == 0)  # each end is alike, the other end unlike it
            out[8 - noisy_levels :] = float(anchor != 0)
            return out

        return curve

    with pytest.raises(ValueError, match="`alpha`=0.95 leaves no room for 3 stages: .* meet .*\\[4.3, 4.8\\]"):
        boundaries_from_similarity(similarity(5, 3), 8, 3, 0.95)
    positions, _ = boundaries_from_similarity(similarity(4, 3), 8, 3, 0.9)  # level 4 is left to the middle stage
    assert positions == pytest.approx([3.5, 4.6])


def test_interval_clustering_finds_blocks():
    groups = torch.tensor([0] * 5 + [1] * 7 + [2] * 6)
    affinity = (groups[:, None] == groups[None]).double() + 0.01 * torch.rand(18, 18, generator=torch.manual_seed(0))
    assert interval_clustering(affinity, 3) == [5, 12]


@pytest.mark.parametrize("num_clusters", [0, -1, 2.0, True, 7])
def test_interval_clustering_refuses_a_number_of_clusters_it_cannot_make(num_clusters):
    # were a ZeroDivisionError (0), IndexErrors (-1, True), torch's TypeError (2.0), an error on interval sizes (7)
    with pytest.raises(ValueError, match=f"`num_clusters` must be an integer in \\[1, 6\\], got {num_clusters!r}"):
        interval_clustering(torch.rand(6, 6, generator=torch.manual_seed(0)), num_clusters)


# ---------------------------------------------------------------------------------------------------------------
# baselines
def test_uniform_and_snr_baselines():
    ddpm = DDPMScheduler()
    assert plan_stages(None, ddpm, 4, "uniform").partition == TimestepPartition.uniform(4)
    plan = plan_stages(None, ddpm, 3, "snr")
    log_snr = lambda t: math.log(ddpm.alphas_cumprod[t] / (1 - ddpm.alphas_cumprod[t]))  # noqa: E731
    ends = log_snr(0), log_snr(999)
    for k, boundary in enumerate(plan.partition.boundaries, start=1):  # equal spacing in log-SNR, up to rounding
        assert abs(log_snr(round(boundary)) - (ends[0] + k * (ends[1] - ends[0]) / 3)) < 0.2
    # the SNR baseline of Zhang et al. (Table 4) reports 0.348 / 0.709 of T on CIFAR-10's linear schedule
    clustered = plan_stages(None, ddpm, 3, "snr_clustering", num_levels=1000).fractions
    assert abs(clustered[0] - 0.348) <= 0.002 and abs(clustered[1] - 0.709) <= 0.002
    # EDM: boundaries in sigma, log-uniform
    edm = plan_stages(None, EDMEulerScheduler(), 3, "uniform").partition
    assert edm.units == "sigma"
    ratios = [math.log(b) for b in (0.002, *edm.boundaries, 80.0)]
    assert max(ratios[i + 1] - ratios[i] for i in range(3)) - min(ratios[i + 1] - ratios[i] for i in range(3)) < 1e-9


def test_gradient_baseline_with_and_without_a_model(digits, gray_unet_kwargs, tiny_multistage):
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 40)
    plan = plan_stages(digits[:300], schedule, 3, "gradient", num_samples=16, generator=torch.manual_seed(0))
    assert plan.partition.num_stages == 3 and "optimal denoiser loss" in plan.curves
    torch.manual_seed(0)
    model = UNet2DModel(**gray_unet_kwargs)
    plan = gradient_plan(
        schedule, 3, model, digits, num_gradient_levels=8, batch_size=8, generator=torch.manual_seed(0)
    )
    assert plan.partition.num_stages == 3 and plan.partition.units == "timestep"
    affinity = plan.curves["gradient affinity to the clean end"]
    assert affinity[0] == pytest.approx(1.0) and affinity.shape == (40,)
    # a multi-decoder model: a level reaches only its own decoder, the others get zero gradient
    plan = gradient_plan(
        schedule, 3, tiny_multistage, torch.rand(16, 3, 8, 8) * 2 - 1, num_gradient_levels=8, batch_size=4
    )
    assert plan.partition.num_stages == 3


def test_gradient_baseline_measures_a_class_conditional_model_with_its_unconditional_label(gray_unet_kwargs):
    # a class-conditional model (the training scripts' `--class_conditional`, the demo's) failed with "class_labels
    # should be provided when doing class conditioning", in the plan command after every image was loaded
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 20)
    torch.manual_seed(0)
    model = UNet2DModel(**gray_unet_kwargs, num_class_embeds=11)  # 10 classes and the unconditional label
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("class_labels")), with_kwargs=True
    )
    data = torch.rand(8, 1, 8, 8) * 2 - 1
    plan = gradient_plan(schedule, 3, model, data, num_gradient_levels=8, batch_size=4, generator=torch.manual_seed(0))
    assert plan.partition.num_stages == 3 and seen
    assert all(labels is not None and labels.tolist() == [10] * 4 for labels in seen)


def test_gradient_baseline_refuses_a_model_of_other_channels_than_the_data(tiny_unet_kwargs):
    """A latent-space model (4 VAE channels) given RGB images was a RuntimeError deep in its first convolution."""
    model = UNet2DModel(**{**tiny_unet_kwargs, "in_channels": 4, "out_channels": 4})
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 40)
    with pytest.raises(ValueError, match="`model` takes 4-channel samples, but `data` has 3 channels: .*latents"):
        gradient_plan(schedule, 3, model, torch.rand(8, 3, 8, 8) * 2 - 1, num_gradient_levels=8, batch_size=4)


@pytest.mark.parametrize(
    "data, match",
    [
        # a size the model's down-sampling does not divide was a RuntimeError in its skip connections ("Sizes of
        # tensors must match"); another size than it was trained on measured it where it never trained
        (torch.rand(8, 1, 9, 9) * 2 - 1, r"`model` takes samples of size 8 \(its `sample_size`\), but `data` holds"),
        (torch.rand(8, 1, 16, 16) * 2 - 1, r"`model` takes samples of size 8 \(its `sample_size`\), but `data` holds"),
        (torch.rand(8, 64) * 2 - 1, r"`model` takes \(N, C, H, W\) samples, but `data` is flattened"),
    ],
    ids=["9 px", "16 px", "flattened"],
)
def test_gradient_baseline_refuses_data_of_another_size_than_the_model(tiny_unet_kwargs, data, match):
    model = UNet2DModel(**{**tiny_unet_kwargs, "in_channels": 1, "out_channels": 1})  # sample_size 8
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 40)
    with pytest.raises(ValueError, match=match):
        gradient_plan(schedule, 3, model, data, num_gradient_levels=8, batch_size=4)


@pytest.mark.parametrize(
    "kwargs, bad",
    [  # were a RuntimeError in the model (0), all the images but 3 (-3), TypeErrors (2.0, True, 2.5)
        (dict(batch_size=0), "`batch_size` must be a positive integer, got 0"),
        (dict(batch_size=-3), "`batch_size` must be a positive integer, got -3"),
        (dict(batch_size=2.0), "`batch_size` must be a positive integer, got 2.0"),
        (dict(num_gradient_levels=True), "`num_gradient_levels` must be a positive integer, got True"),
        (dict(num_gradient_levels=2.5), "`num_gradient_levels` must be a positive integer, got 2.5"),
    ],
)
def test_gradient_baseline_refuses_bad_counts_by_name(gray_unet_kwargs, kwargs, bad):
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 40)
    model, data = UNet2DModel(**gray_unet_kwargs), torch.rand(16, 1, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match=bad):
        gradient_plan(schedule, 3, model, data, **{"num_gradient_levels": 8, "batch_size": 4, **kwargs})


def test_gradient_affinity_depends_on_the_seed_alone_and_leaves_the_model_as_it_was(gray_unet_kwargs):
    # a model just trained runs its dropout on the global random state; a frozen one (requires_grad False) had no
    # gradients to compare (an IndexError)
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 10)
    torch.manual_seed(0)
    model, data = UNet2DModel(**gray_unet_kwargs, dropout=0.5).train(), torch.rand(4, 1, 8, 8) * 2 - 1
    seeded = [torch.Generator().manual_seed(0) for _ in range(3)]  # not the global generator dropout draws from
    first, again = (gradient_affinity(model, data, schedule, [0, 5, 9], seeded[i]) for i in range(2))
    assert torch.equal(first, again) and model.training
    model.eval().requires_grad_(False)
    assert torch.equal(gradient_affinity(model, data, schedule, [0, 5, 9], seeded[2]), first)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# optimal-denoiser clustering on real data
def test_digits_boundaries_are_stable_across_seeds(digits):
    plans = [plan_stages(digits, DDPMScheduler(), 3, generator=torch.manual_seed(seed)) for seed in range(3)]
    fractions = torch.tensor([plan.fractions for plan in plans])
    assert (fractions.max(0).values - fractions.min(0).values).max() <= 0.02, fractions
    assert 0 < fractions[0, 0] < fractions[0, 1] < 1


def test_sigma_units_give_the_same_stages_as_timesteps(digits):
    # E[x0 | x_t] only depends on the noise-to-signal ratio sigma = s / a: planning on the VE schedule with the
    # sigmas of a DDPM grid finds the same stages, returned in sigma units
    ddpm = NoiseSchedule.from_scheduler(DDPMScheduler(), 60)
    sigmas = ddpm.noise_scale / ddpm.signal_scale
    ve = NoiseSchedule(sigmas, torch.ones_like(sigmas), sigmas, "sigma")
    by_timestep = plan_stages(digits, ddpm, 3, num_samples=32, generator=torch.manual_seed(0)).partition
    by_sigma = plan_stages(digits, ve, 3, num_samples=32, generator=torch.manual_seed(0)).partition
    assert by_sigma.units == "sigma"
    assert torch.equal(by_timestep.stage_for_noise_level(ddpm.levels), by_sigma.stage_for_noise_level(sigmas))
    edm = plan_stages(digits, EDMEulerScheduler(), 3, num_levels=40, num_samples=16, generator=torch.manual_seed(0))
    assert edm.partition.units == "sigma" and 0.002 < edm.partition.boundaries[0] < edm.partition.boundaries[1] < 80


# ---------------------------------------------------------------------------------------------------------------
# decoder sizes and model configs
def test_decoder_widths_follow_difficulty_and_norm_groups(digits, gray_unet_kwargs):
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 50)
    difficulty = stage_difficulty(digits, schedule, TimestepPartition([300, 600]))
    assert difficulty[0] > difficulty[1] > difficulty[2] >= 0  # hardest at the data end
    widths = suggest_decoder_widths((128, 256, 256, 256), difficulty, norm_num_groups=32)
    assert widths[0] == (192, 384, 384, 384)  # the hardest stage gets the paper's x1.5
    assert all(w % 32 == 0 and w >= 32 for stage in widths for w in stage)
    assert [stage[0] for stage in widths] == sorted((stage[0] for stage in widths), reverse=True)
    widths = suggest_decoder_widths(gray_unet_kwargs["block_out_channels"], difficulty, 4)
    model = MultiStageUNet2DModel(**gray_unet_kwargs, stage_boundaries=(300, 600), decoder_block_out_channels=widths)
    assert model(torch.randn(3, 1, 8, 8), torch.tensor([10, 400, 900])).sample.shape == (3, 1, 8, 8)


def test_decoder_widths_for_a_model_config_give_every_attention_layer_a_head(gray_unet_kwargs):
    # rounded to norm_num_groups alone (4), the narrow decoder of a model whose heads are 8 channels wide got width 4:
    # no head, and the model refused to build; given the model's config, the widths are multiples of both
    config = dict(gray_unet_kwargs, attention_head_dim=8)
    widths = suggest_decoder_widths(config["block_out_channels"], [1.0, 0.3, 0.0], config=config)
    assert all(w % 8 == 0 for stage in widths for w in stage)
    MultiStageUNet2DModel(**config, stage_boundaries=(300, 600), decoder_block_out_channels=widths)  # builds
    with pytest.raises(ValueError, match="`norm_num_groups` and `config`"):
        suggest_decoder_widths(config["block_out_channels"], [1.0, 0.0], norm_num_groups=4, config=config)


@pytest.mark.parametrize(
    "changes, left_out",
    [
        ({}, ("attention_head_dim",)),  # diffusers' default: heads 8 channels wide
        ({"block_out_channels": (32, 64), "attention_head_dim": None}, ("norm_num_groups",)),  # default: 32 groups
        ({"block_out_channels": (8, 16, 16, 16), "attention_head_dim": 8}, ("down_block_types", "up_block_types")),
    ],
)
def test_decoder_widths_round_to_the_model_defaults_a_config_leaves_out(gray_unet_kwargs, changes, left_out):
    # a config without `attention_head_dim`, `norm_num_groups` or the block types (a hand-written one) was read as
    # "no heads", "groups of 1" and "no attention", while the model builds with diffusers' defaults (8, 32, three
    # attention levels of four): the widths did not fit it, and the model (the plan command's output) was refused
    config = {key: value for key, value in {**gray_unet_kwargs, **changes}.items() if key not in left_out}
    widths = suggest_decoder_widths(config["block_out_channels"], [1.0, 0.3, 0.001], config=config)
    MultiStageUNet2DModel(**config, stage_boundaries=(300, 600), decoder_block_out_channels=widths)  # builds


def test_plan_goes_into_a_model_config_and_survives_save_and_reload(tmp_path, tiny_unet_kwargs):
    plan = plan_stages(None, DDPMScheduler(), 4, "snr_clustering")
    unet = UNet2DModel(**tiny_unet_kwargs)
    config = partition_to_model_config(unet.config, plan.partition)
    model = MultiStageUNet2DModel.from_config(config)
    assert model.partition == plan.partition and model.num_stages == 4
    model.save_pretrained(tmp_path)
    assert MultiStageUNet2DModel.from_pretrained(tmp_path).partition == plan.partition
    with pytest.raises(ValueError, match="decoder_block_out_channels"):  # 3 decoders in the config, 4 stages planned
        partition_to_model_config(dict(config, decoder_block_out_channels=[[8, 16]] * 3), plan.partition)


def test_the_plan_goes_into_the_config_of_a_model_built_with_defaults(gray_unet_kwargs):
    # a model's config lists the arguments left at their defaults in `_use_default_values`, and from_config drops those
    # keys: the planned boundaries, units and timesteps (all at their defaults in `source`) must not be dropped
    source = MultiStageUNet2DModel.from_config(gray_unet_kwargs)
    for partition, widths in [
        (TimestepPartition([100.0, 300.0], num_train_timesteps=500), None),
        (TimestepPartition([0.5, 2.0], units="sigma"), [(4, 8), (8, 16), (12, 24)]),
    ]:
        model = MultiStageUNet2DModel.from_config(partition_to_model_config(source, partition, widths))
        assert model.partition == partition
        assert model.config.decoder_block_out_channels == (widths and [list(w) for w in widths])


# ---------------------------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0.0), "`alpha` must be in \\(0, 1\\], got 0.0"),
        (dict(alpha=1.5), "`alpha` must be in \\(0, 1\\], got 1.5"),
        (dict(eta=0), "`eta` must be in \\(0, 1\\], got 0"),
        (dict(eta=-0.1), "`eta` must be in \\(0, 1\\], got -0.1"),
        (dict(num_stages=1), "`num_stages` must be an integer >= 2, got 1"),
        (dict(method="kmeans"), "`method` must be one of .*, got 'kmeans'"),
        (dict(data=torch.empty(0, 1, 8, 8)), "`data` must be a non-empty tensor .* got \\(0, 1, 8, 8\\)"),
        (dict(data=None), "`data` \\(the training images\\) is required"),
        (dict(data=torch.full((4, 1, 2, 2), float("nan"))), "NaN"),
        (dict(num_samples=0), "`num_samples` must be a positive integer, got 0"),
        ({"num_samples": True}, "`num_samples` must be a positive integer, got True"),
        ({"chunk_size": True}, "`chunk_size` must be a positive integer, got True"),
        ({"alpha": True}, "`alpha` must be in \\(0, 1\\], got True"),
        # were torch's RuntimeError ("Expected one of cpu, cuda, ...") and AssertionError ("Torch not compiled with CUDA")
        (dict(device="gpu0"), "`device` must be a torch device such as 'cpu' or 'cuda', got 'gpu0'"),
        (dict(device="cuda:99"), "`device` must be a device this machine has, got 'cuda:99'"),
        # a model was ignored by every method but "gradient" (the command refuses its --model_path so)
        (dict(model=torch.nn.Linear(1, 1)), "`model` is read by the 'gradient' method only, not 'optimal_denoiser'"),
        (dict(model=torch.nn.Linear(1, 1), data=None, method="snr"), "`model` is read by the 'gradient' method only"),
        # were AttributeError ("'str' object has no attribute 'config'") from deep inside
        (dict(schedule="ddpm"), "`schedule` must be a NoiseSchedule or a diffusers scheduler, got str"),
        (dict(schedule=None, data=None, method="uniform"), "`schedule` must be a NoiseSchedule or a diffusers sch"),
        # a seed given for a generator was torch.randint's TypeError ("received an invalid combination of arguments")
        (dict(generator=0), "`generator` must be a torch.Generator or None, got int"),
    ],
)
def test_bad_parameters_are_refused(kwargs, match):
    arguments = dict(data=torch.randn(8, 1, 4, 4), schedule=DDPMScheduler(), num_levels=10) | kwargs
    with pytest.raises(ValueError, match=match):
        plan_stages(**arguments)


@pytest.mark.parametrize("method", ["optimal_denoiser", "gradient"])
@pytest.mark.parametrize(
    "data, match",
    [
        (torch.rand(1, 1, 4, 4) * 2 - 1, "`data` holds 1 image: planning needs at least 2 different training images"),
        (torch.zeros(8, 1, 4, 4), "`data` holds 8 images, all identical: planning needs at least 2 different"),
        (torch.rand(3, 8, 8) * 2 - 1, "got a 3-D tensor of shape \\(3, 8, 8\\) \\(grayscale \\(N, H, W\\) images"),
        (torch.randint(-1, 2, (8, 1, 4, 4)), "`data` must be a floating-point tensor .* got dtype torch.int64"),
        (torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8), "got dtype torch.uint8: convert 0..255 images"),
    ],
    ids=["one image", "identical images", "3-D", "int64", "uint8"],
)
def test_data_no_plan_can_come_from_is_refused_by_its_real_cause(method, data, match):
    with pytest.raises(ValueError, match=match) as error:
        plan_stages(data, DDPMScheduler(), method=method, num_levels=10, num_samples=4, generator=torch.manual_seed(0))
    assert "alpha" not in str(error.value)


def test_stage_difficulty_refuses_a_single_image():
    schedule = NoiseSchedule.edm(num_levels=10)
    with pytest.raises(ValueError, match="`data` holds 1 image"):
        stage_difficulty(torch.randn(1, 16), schedule, schedule.partition([1.0]))


@pytest.mark.parametrize(
    "levels, units, match",
    [  # were planned on, then refused as "`boundaries` must lie strictly inside the schedule" or "be finite numbers"
        (
            [0.0, 1500.0, 3000.0],
            "timestep",
            "`levels` must lie in \\[0, 1000\\] \\('timestep' units\\), got -?\\d.* to 3000.0",
        ),
        ([-5.0, 0.0, 5.0], "timestep", "`levels` must lie in \\[0, 1000\\] \\('timestep' units\\), got -5.0 to 5.0"),
        (
            [-5.0, 0.0, 5.0],
            "sigma",
            "`levels` must be positive and finite sigmas \\('sigma' units\\), got -5.0 to 5.0",
        ),
        (
            [0.5, 1.0, math.inf],
            "sigma",
            "`levels` must be positive and finite sigmas \\('sigma' units\\), got 0.5 to inf",
        ),
    ],
)
def test_a_schedule_of_levels_outside_its_units_is_refused(levels, units, match):
    scale = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(torch.tensor(levels), (1 - scale**2).sqrt(), scale, units)


def test_bad_schedules_are_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="`scheduler` must be a diffusers scheduler, got str"):
        NoiseSchedule.from_scheduler("ddpm")  # was an AttributeError

    with pytest.raises(ValueError, match="neither `alphas_cumprod` nor EDM sigmas"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="sigma_min"):
        NoiseSchedule.edm(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="`num_levels` must be an integer in \\[3, 1000\\], got 2"):
        NoiseSchedule.from_scheduler(DDPMScheduler(), num_levels=2)
    # a beta above 1 gives negative alphas_cumprod, so NaN signal scales (were planned on: NaN similarities)
    with pytest.raises(ValueError, match="`signal_scale` must be finite and >= 0 at every level, got nan"):
        NoiseSchedule.from_scheduler(DDPMScheduler(4, trained_betas=[0.1, 0.2, 1.5, 0.3]), num_levels=4)


def test_the_plot_draws_alpha_and_the_running_means_that_cross_it(digits, tmp_path, monkeypatch):
    import matplotlib.axes

    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), 40)
    plan = plan_stages(digits[:300], schedule, 3, alpha=0.9, num_samples=16, generator=torch.manual_seed(0))
    assert plan.alpha == 0.9
    means = [curve for name, curve in plan.curves.items() if name.startswith("mean similarity over the stage")]
    assert len(means) == 2  # one per anchor: t = 0 and t = T
    # the rule's boundaries are where these cross alpha: above it inside the end stages, below it past them
    inside = schedule.levels < plan.partition.boundaries[0]
    assert (means[0][inside] >= 0.9).all() and means[0][~inside][0] < 0.9
    inside = schedule.levels >= plan.partition.boundaries[1]
    assert (means[1][inside] >= 0.9).all() and means[1][~inside][-1] < 0.9
    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y=0, *a, **k: drawn.append((y, k["label"])))
    path = plot_plan(plan, tmp_path / "plan.png")
    assert open(path, "rb").read(4) == b"\x89PNG" and drawn == [(0.9, "alpha = 0.9 (mean-similarity threshold)")]
    with pytest.raises(ValueError, match="`path` .*plan.pdf' names a .pdf file, but the plot is a PNG"):
        plot_plan(plan, tmp_path / "plan.pdf")  # was PNG bytes under a PDF's name
    assert not (tmp_path / "plan.pdf").exists()


@pytest.mark.parametrize("method", ["snr", "snr_clustering"])
def test_log_snr_baselines_plan_a_zero_terminal_snr_schedule(method):
    # DDPM's rescale_betas_zero_snr ends at alphas_cumprod 0: log-SNR -inf made the boundaries NaN ("must be finite
    # numbers") or the clustering infeasible; diffusers' Euler scheduler reads that end as alphas_cumprod 2**-24
    from diffusers import EulerDiscreteScheduler

    ddpm = plan_stages(None, DDPMScheduler(rescale_betas_zero_snr=True), 3, method=method, num_levels=30)
    euler = plan_stages(None, EulerDiscreteScheduler(rescale_betas_zero_snr=True), 3, method=method, num_levels=30)
    assert ddpm.partition.boundaries == pytest.approx(euler.partition.boundaries, rel=1e-6)
    assert bool(torch.isfinite(ddpm.curves["log-SNR"]).all())


def test_stage_difficulty_of_training_images_on_an_accelerator():
    # the same difficulties as from the CPU, whether the spectrum is exact (D <= max_dim) or from a subset
    from diffusers_stages.planning.sizing import data_spectrum
    from tests.fake_cuda import fake_cuda

    data = torch.randn(64, 16, generator=torch.manual_seed(0))
    schedule = NoiseSchedule.edm(num_levels=20)
    partition = schedule.partition([0.5, 5.0])
    expected = stage_difficulty(data, schedule, partition)
    subset = data_spectrum(data, max_dim=8, max_images=32, generator=torch.manual_seed(1))
    with fake_cuda():
        assert stage_difficulty(data.to("cuda"), schedule, partition) == pytest.approx(expected)
        got = data_spectrum(data.to("cuda"), max_dim=8, max_images=32, generator=torch.manual_seed(1))
        assert torch.allclose(got.cpu(), subset)


def test_schedule_of_a_scheduler_used_on_an_accelerator():
    # DDPMScheduler.add_noise moves alphas_cumprod onto the samples' device (a training scheduler, planned from)
    from tests.fake_cuda import fake_cuda

    data = torch.rand(16, 1, 4, 4, generator=torch.manual_seed(0)) * 2 - 1
    scheduler = DDPMScheduler()
    expected = plan_stages(data, scheduler, num_levels=21, num_samples=4, generator=torch.manual_seed(0), device="cpu")
    with fake_cuda():
        x = torch.randn(1, 1, 4, 4, device="cuda")
        scheduler.add_noise(x, x, torch.tensor([5], device="cuda"))
        schedule = NoiseSchedule.from_scheduler(scheduler, num_levels=21)
        assert {t.device.type for t in (schedule.levels, schedule.signal_scale, schedule.noise_scale)} == {"cpu"}
        found = plan_stages(
            data, scheduler, num_levels=21, num_samples=4, generator=torch.manual_seed(0), device="cpu"
        )
    assert found.partition == expected.partition


def test_stage_difficulty_of_wide_data_does_not_depend_on_the_global_random_state(monkeypatch):
    # past max_dim pixels the spectrum is taken on a random subset of max_images images, drawn from the global random
    # state: the heuristic and budget widths of plan_stages(..., generator=...) changed with torch.manual_seed
    from diffusers_stages.planning import sizing

    monkeypatch.setattr(sizing, "data_spectrum", functools.partial(sizing.data_spectrum, max_dim=4, max_images=8))
    data = torch.randn(64, 16, generator=torch.manual_seed(0)) * torch.linspace(0.1, 2, 16)
    schedule = NoiseSchedule.edm(num_levels=20)
    partition = schedule.partition([0.5, 5.0])
    torch.manual_seed(1)
    first = stage_difficulty(data, schedule, partition)
    torch.manual_seed(2)
    assert stage_difficulty(data, schedule, partition) == first


@pytest.mark.parametrize("method", ["optimal_denoiser", "ilp", "uniform", "snr", "snr_clustering", "gradient"])
def test_numpy_numbers_plan_as_the_python_numbers_they_hold(method):
    # numpy's numbers (a config read with numpy, a sweep over np.linspace) were refused with a value inside the
    # range: "`num_stages` must be an integer >= 2, got np.int64(3)", "`alpha` must be in (0, 1], got np.float32(...)"
    import numpy as np

    data = torch.randn(16, 1, 4, 4, generator=torch.manual_seed(0))
    numpy_args = dict(alpha=np.float32(0.875), eta=np.float32(0.125), num_samples=np.int64(8), chunk_size=np.int64(4))
    python_args = dict(alpha=0.875, eta=0.125, num_samples=8, chunk_size=4)
    plans = [
        plan_stages(
            data, DDPMScheduler(), num_stages, method, num_levels=num_levels, **args, generator=torch.manual_seed(0)
        )
        for num_stages, num_levels, args in [(np.int64(3), np.int32(12), numpy_args), (3, 12, python_args)]
    ]
    assert plans[0].partition == plans[1].partition and plans[0].to_dict() == plans[1].to_dict()
    assert NoiseSchedule.edm(num_levels=np.int64(5)).levels.tolist() == NoiseSchedule.edm(num_levels=5).levels.tolist()
