"""The package's scheduler knowledge (`diffusers_stages.schedulers`), on real diffusers schedulers."""

import math
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
)

from diffusers_stages import StageRouter, TimestepPartition, routing
from diffusers_stages.pipelines import pipeline_dual_backbone, pipeline_expert_routing
from diffusers_stages.schedulers import (
    ContinuousVPDPMSolverSinglestepScheduler,
    check_prediction_type,
    check_scheduler_units,
    fresh_scheduler,
    is_edm_scheduler,
    is_flow_matching_scheduler,
    model_call_timesteps,
    scheduler_prediction_type,
    scheduler_step_kwargs,
    scheduler_units,
    sigma_to_timestep,
    step_parameters,
    training_schedule_differences,
    vp_inverse_lambda,
    vp_lambda,
    vp_log_alpha,
)


def test_old_import_locations_give_the_same_functions():
    assert routing.is_edm_scheduler is is_edm_scheduler
    assert routing.check_scheduler_units is check_scheduler_units
    assert pipeline_expert_routing.scheduler_prediction_type is scheduler_prediction_type
    assert pipeline_dual_backbone.sigma_to_timestep is sigma_to_timestep


def test_units_and_prediction_types():
    assert is_edm_scheduler(EDMEulerScheduler()) and scheduler_units(EDMEulerScheduler()) == "sigma"
    assert not is_edm_scheduler(DDIMScheduler()) and scheduler_units(DDIMScheduler()) == "timestep"
    assert scheduler_prediction_type(DDIMScheduler(prediction_type="v_prediction")) == "v_prediction"
    assert scheduler_prediction_type(FlowMatchEulerDiscreteScheduler()) == "flow_prediction"
    check_scheduler_units(EDMEulerScheduler(), TimestepPartition([2.5], units="sigma"))
    with pytest.raises(ValueError, match="c_noise"):
        check_scheduler_units(EDMEulerScheduler(), TimestepPartition([500]))


def test_euler_with_continuous_timesteps_routes_by_sigma():
    # was: routed as training timesteps, so its c_noise = ln(sigma)/4 failed in the router ("inside [0.0, 1000.0]")
    scheduler = EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
    assert scheduler_units(scheduler) == "sigma"
    router = StageRouter(TimestepPartition([2.5], units="sigma"), scheduler)
    scheduler.set_timesteps(6)
    stages = [router(t) for t in scheduler.timesteps]
    assert stages == [int(sigma > 2.5) for sigma in scheduler.sigmas[:-1]] and set(stages) == {0, 1}
    with pytest.raises(
        ValueError, match=r"EulerDiscreteScheduler conditions the model on c_noise.*timestep_type='discrete'"
    ):
        check_scheduler_units(scheduler, TimestepPartition([500]))


def test_a_consistency_model_scheduler_is_refused_by_name():
    # was: "num_train_timesteps=40 ...", "boundaries must lie strictly inside (0, 40)" or "build the scheduler with
    # prediction_type='epsilon'" (it takes none): its timesteps are 250 ln(sigma), in no partition's units
    scheduler = CMStochasticIterativeScheduler()
    for check in (
        lambda: scheduler_units(scheduler),
        lambda: scheduler_prediction_type(scheduler),
        lambda: check_scheduler_units(scheduler, TimestepPartition([2.5], units="sigma")),
    ):
        with pytest.raises(ValueError, match=r"CMStochasticIterativeScheduler .*250 ln\(sigma\).*EDMEulerScheduler"):
            check()


@pytest.mark.parametrize(
    ("name", "conditioning"),
    [
        ("SCMScheduler", "TrigFlow"),
        ("ScoreSdeVeScheduler", "variance-exploding"),
        ("KarrasVeScheduler", "variance-exploding"),
        ("IPNDMScheduler", r"t in \[0, 1\]"),  # was: every call routed to stage 0 (t <= 1), silently
        # was: taken as EDM's ln(sigma)/4 (it has `precondition_noise`), so a sigma partition routed it wrongly
        ("CosineDPMSolverMultistepScheduler", r"atan\(sigma\)"),
        # were: every call routed to stage 0 (timesteps in [0, 1]), silently; MiniMax-H3's run from 0 (noise) to 1
        ("DDPMWuerstchenScheduler", r"ratio r in \[0, 1\]"),
        ("MiniMaxH3Scheduler", r"1 - sigma in \[0, 1\]"),
        # discrete-token schedulers: were a prediction-type error naming flow matching, or a shape error in diffusers
        ("AmusedScheduler", "masked image tokens"),
        ("VQDiffusionScheduler", "discrete tokens"),
        ("DiscreteDDIMScheduler", "discrete tokens"),
        ("EntropyBoundScheduler", "discrete tokens"),
        ("BlockRefinementScheduler", "discrete tokens"),
    ],
)
def test_schedulers_of_other_model_families_are_refused_by_name(name, conditioning):
    # was: "build the scheduler with prediction_type='epsilon'", a missing `step` or `sample_hat`, or SCM's
    # "not supported when num_inference_steps != 2", from inside a run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # KarrasVeScheduler is deprecated
        cls = getattr(diffusers, name)
        # CosineDPMSolverMultistepScheduler needs torchsde to be built (diffusers' stand-in class without it): the
        # refusal reads only the class, so an instance that skips __init__ checks it either way
        # (aMUSEd's and VQ-Diffusion's take token counts to be built: the same)
        bare = ("CosineDPMSolverMultistepScheduler", "AmusedScheduler", "VQDiffusionScheduler")
        scheduler = object.__new__(cls) if name in bare else cls()
    with pytest.raises(ValueError, match=rf"{name} samples .*{conditioning}.*DDIMScheduler"):
        scheduler_units(scheduler)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler"])
def test_flow_matching_with_inverted_sigmas_is_refused(name):
    # was: Mochi's `invert_sigmas=True` passes the model 1000 (1 - sigma), 0 at the noisy end, and the routing took
    # it as a noise level: the first, noisiest calls went to the clean stage (a dual backbone's deep model)
    scheduler = getattr(diffusers, name)(invert_sigmas=True)
    with pytest.raises(ValueError, match=rf"{name} has invert_sigmas=True.*1 - sigma.*invert_sigmas=False"):
        scheduler_units(scheduler)
    assert scheduler_units(getattr(diffusers, name)()) == "timestep"


def test_flow_matching_with_dynamic_shifting_is_refused_before_set_timesteps():
    # was: diffusers' "`mu` must be passed" from inside `set_timesteps`, which the pipelines give no way to pass
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=True.*`mu`.*use_dynamic_shifting=False"):
        model_call_timesteps(scheduler, 4)
    assert len(model_call_timesteps(FlowMatchEulerDiscreteScheduler(shift=3.0), 4)) == 4  # a fixed shift works


@pytest.mark.parametrize(
    "name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler"]
)
def test_dynamic_shifting_where_mu_is_optional_is_not_refused(name):
    # was: refused as needing `mu`; these take `mu` only as an option and without it keep their `flow_shift`
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    shifting = getattr(diffusers, name)(use_dynamic_shifting=True, **flow)
    assert model_call_timesteps(shifting, 4) == model_call_timesteps(getattr(diffusers, name)(**flow), 4)


def test_dynamic_shifting_that_needs_mu_names_the_fixed_shift_its_scheduler_takes():
    # was: "use `UniPCMultistepScheduler.from_config(..., shift=...)`", an option UniPC ignores (it takes flow_shift)
    unipc = diffusers.UniPCMultistepScheduler(
        use_dynamic_shifting=True, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    with pytest.raises(ValueError, match=r"UniPCMultistepScheduler has use_dynamic_shifting=True.*flow_shift=\.\.\."):
        model_call_timesteps(unipc, 4)


@pytest.mark.parametrize(
    ("scheduler_class", "takes_generator", "takes_eta"),
    [
        (DDIMScheduler, True, True),
        (DDPMScheduler, True, False),
        (EulerDiscreteScheduler, True, False),
        (PNDMScheduler, False, False),
        (HeunDiscreteScheduler, False, False),
    ],
)
def test_step_arguments_follow_the_step_signature(scheduler_class, takes_generator, takes_eta):
    scheduler = scheduler_class()
    assert ("generator" in step_parameters(scheduler)) is takes_generator
    generator = torch.Generator()
    kwargs = scheduler_step_kwargs(scheduler, generator=generator)
    assert kwargs == ({"generator": generator} if takes_generator else {})  # dropped silently, as diffusers does
    if takes_eta:
        assert scheduler_step_kwargs(scheduler, eta=1)["eta"] == 1.0
    else:
        with pytest.raises(ValueError, match=f"`eta`=0.0 needs a scheduler .*{scheduler_class.__name__}'s does not"):
            scheduler_step_kwargs(scheduler, eta=0.0)


@pytest.mark.parametrize("eta", [-0.1, math.nan, True, "1"])
def test_bad_eta_is_refused(eta):
    with pytest.raises(ValueError, match="`eta` must be a finite number >= 0"):
        scheduler_step_kwargs(DDIMScheduler(), eta=eta)


def test_a_numpy_eta_is_taken_as_a_python_float():
    """`np.float32(0.5)` (a sweep's value) is a finite number >= 0, as `guidance_scale`'s numpy numbers are."""
    kwargs = scheduler_step_kwargs(DDIMScheduler(), eta=np.float32(0.5))
    assert kwargs["eta"] == 0.5 and type(kwargs["eta"]) is float
    with pytest.raises(ValueError, match="`eta` must be a finite number >= 0, got np.float32\\(-0.5\\)"):
        scheduler_step_kwargs(DDIMScheduler(), eta=np.float32(-0.5))


def test_extra_step_arguments_must_be_taken_by_the_step():
    assert scheduler_step_kwargs(EulerDiscreteScheduler(), extra={"s_churn": 0.5})["s_churn"] == 0.5
    with pytest.raises(ValueError, match="'s_churn', which DDIMScheduler.step does not take"):
        scheduler_step_kwargs(DDIMScheduler(), extra={"s_churn": 0.5})
    with pytest.raises(ValueError, match="may not set 'generator'"):
        scheduler_step_kwargs(DDIMScheduler(), extra={"generator": None})
    with pytest.raises(
        ValueError, match=r"`scheduler_step_kwargs` must be a dict of `DDIMScheduler.step` arguments, got \[1\]"
    ):
        scheduler_step_kwargs(DDIMScheduler(), extra=[1])  # not an AttributeError on `.items()`


def test_fresh_scheduler_has_the_config_but_not_the_state():
    scheduler = DPMSolverMultistepScheduler(solver_order=3)
    scheduler.set_timesteps(5)
    copy = fresh_scheduler(scheduler)
    assert type(copy) is DPMSolverMultistepScheduler and copy.config == scheduler.config
    assert copy is not scheduler and copy.num_inference_steps is None


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_model_calls_of_a_one_call_per_step_scheduler(scheduler_class):
    scheduler = scheduler_class()
    calls = model_call_timesteps(scheduler, 6)
    assert scheduler.num_inference_steps is None  # the dry run leaves the scheduler as it is
    scheduler.set_timesteps(6)
    assert [t for t, _ in calls] == scheduler.timesteps.tolist()
    assert not any(corrector for _, corrector in calls)


@pytest.mark.parametrize("scheduler_class", [HeunDiscreteScheduler, KDPM2DiscreteScheduler])
def test_model_calls_of_a_predictor_corrector_scheduler(scheduler_class):
    calls = model_call_timesteps(scheduler_class(), 4)
    assert len(calls) == 2 * 4 - 1
    assert [corrector for _, corrector in calls] == [False] + [True, False] * 3  # a corrector after each predictor


def test_model_calls_of_custom_timesteps_and_sigmas_are_the_scheduler_set_with_them():
    # a Heun pair on custom timesteps: its corrector at the next timestep given, as with a step count
    assert model_call_timesteps(HeunDiscreteScheduler(), timesteps=np.array([999, 500, 0])) == [
        (999.0, False), (500.0, True), (500.0, False), (0.0, True), (0.0, False)
    ]  # fmt: skip
    scheduler = EulerDiscreteScheduler()
    calls = model_call_timesteps(scheduler, sigmas=[14.6, 1.0, 0.0])  # one call per sigma but the last
    assert scheduler.num_inference_steps is None  # a copy was set
    scheduler.set_timesteps(sigmas=[14.6, 1.0, 0.0])
    assert calls == [(t, False) for t in scheduler.timesteps.tolist()]
    with pytest.raises(ValueError, match=r"`timesteps`=\[999, 0\] needs .*DDIMScheduler's `set_timesteps` does not"):
        model_call_timesteps(DDIMScheduler(), timesteps=[999, 0])


class GlobalRandomHeunScheduler(HeunDiscreteScheduler):
    """A predictor/corrector scheduler whose step draws from the global generator, as `DPMSolverSDEScheduler` seeds
    its Brownian tree (``noise_sampler_seed=None``, its default)."""

    def step(self, *args, **kwargs):
        torch.rand(1)
        return super().step(*args, **kwargs)


def test_the_dry_run_leaves_the_global_generator_as_it_is():
    # was: the dry run's steps drew from it, so `expert_schedule` (and every run's own dry run) changed the noise a
    # later `torch.manual_seed` user got, and `generator=torch.manual_seed(0)` drew other latents than `latents=`
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert len(model_call_timesteps(GlobalRandomHeunScheduler(), 3)) == 5
    assert torch.equal(torch.get_rng_state(), before)


def test_router_with_a_given_corrector_flag_matches_the_live_router():
    scheduler = HeunDiscreteScheduler()
    partition = TimestepPartition([500])
    router = StageRouter(partition, scheduler)
    dry = [router(t, c) for t, c in model_call_timesteps(scheduler, 6)]
    scheduler.set_timesteps(6)
    live_router, sample, live = StageRouter(partition, scheduler), torch.zeros(1, 1, 2, 2), []
    for t in scheduler.timesteps:
        live.append(live_router(t))
        sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample
    assert dry == live and 0 in dry and 1 in dry


def test_sigma_to_timestep_inverts_the_training_schedule():
    scheduler = DDPMScheduler()
    alphas = scheduler.alphas_cumprod
    for t in (10, 600, 990):
        sigma = float(((1 - alphas[t]) / alphas[t]).sqrt())
        assert sigma_to_timestep(scheduler, sigma) == pytest.approx(t, abs=1e-3)
    with pytest.raises(ValueError, match="inside the training schedule"):
        sigma_to_timestep(scheduler, 1e6)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        sigma_to_timestep(FlowMatchEulerDiscreteScheduler(), 0.5)


# ------------------------------------------------------------------------------------------------------------------
# the continuous-time VP DPM-Solver of the authors' score_sde code
def gaussian_data_noise(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The exact noise prediction for data N(0, 0.5^2 I) at label 999 t, plus a nonlinear term."""
    alpha2 = torch.exp(2 * vp_log_alpha(label / 999))[:, None, None, None]
    sigma = (1 - alpha2).sqrt()
    return sigma * x / (0.25 * alpha2 + sigma**2) + 0.05 * torch.tanh(x) * torch.cos(label / 300)[:, None, None, None]


def dpm_solver_reference(x: torch.Tensor, steps: int, t_end: float = 1e-4) -> torch.Tensor:
    """Singlestep DPM-Solver-fast (order 3, logSNR, noise prediction) as the authors' `dpm_solver.py` runs it:
    restated from the DPM-Solver paper (Lu et al. 2022, Algorithms 1 and 2, r1 = 1/3, r2 = 2/3 or r1 = 1/2)."""
    x = x.double()
    orders = [3] * (steps // 3 - 1) + [2, 1] if steps % 3 == 0 else [3] * (steps // 3) + [steps % 3]
    ends = vp_lambda(torch.tensor([1.0, t_end], dtype=torch.float64))
    edges = torch.linspace(ends[0].item(), ends[1].item(), len(orders) + 1, dtype=torch.float64)

    def at(lam):  # (alpha, sigma, label) at half log-SNR lam
        t = vp_inverse_lambda(lam)
        alpha = torch.exp(vp_log_alpha(t))
        return alpha, (1 - alpha**2).sqrt(), (999 * t).float().expand(x.shape[0])

    def eps(x, lam):
        return gaussian_data_noise(x.float(), at(lam)[2]).double()

    for k, (lam_s, lam_t) in zip(orders, zip(edges[:-1], edges[1:])):
        h, (a_s, _, _), (a_t, s_t, _) = lam_t - lam_s, at(lam_s), at(lam_t)
        e_s = eps(x, lam_s)
        if k == 1:
            x = a_t / a_s * x - s_t * torch.expm1(h) * e_s
            continue
        r1 = 1 / k
        a_1, s_1, _ = at(lam_s + r1 * h)
        e_1 = eps(a_1 / a_s * x - s_1 * torch.expm1(r1 * h) * e_s, lam_s + r1 * h)
        if k == 2:
            x = a_t / a_s * x - s_t * torch.expm1(h) * e_s - 0.5 / r1 * s_t * torch.expm1(h) * (e_1 - e_s)
            continue
        r2 = 2 / 3
        a_2, s_2, _ = at(lam_s + r2 * h)
        phi_22 = torch.expm1(r2 * h) / (r2 * h) - 1
        x_2 = a_2 / a_s * x - s_2 * torch.expm1(r2 * h) * e_s - r2 / r1 * s_2 * phi_22 * (e_1 - e_s)
        e_2 = eps(x_2, lam_s + r2 * h)
        x = a_t / a_s * x - s_t * torch.expm1(h) * e_s - 1 / r2 * s_t * (torch.expm1(h) / h - 1) * (e_2 - e_s)
    return x


@pytest.mark.parametrize("steps", [4, 5, 6, 20])
def test_continuous_vp_dpm_solver_follows_the_authors_solver(steps):
    scheduler = ContinuousVPDPMSolverSinglestepScheduler()
    scheduler.set_timesteps(steps)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.manual_seed(0))
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(gaussian_data_noise(x, t.expand(2)), t, x).prev_sample
    reference = dpm_solver_reference(x0, steps)
    assert (x - reference).abs().max() <= 1e-4 * reference.abs().max(), steps


def test_continuous_vp_dpm_solver_grid_is_uniform_in_log_snr_per_block():
    scheduler = ContinuousVPDPMSolverSinglestepScheduler()
    scheduler.set_timesteps(20)
    # 20 calls: six order-3 blocks and one order-2 block, the block ends equally spaced in lambda = -log(sigma)
    assert scheduler.order_list == [1, 2, 3] * 6 + [1, 2]
    lambdas = -scheduler.sigmas.double().log()
    ends = vp_lambda(torch.tensor([1.0, 1e-4], dtype=torch.float64))
    block = (ends[1] - ends[0]) / 7
    expected = [ends[0] + block * (b + j / 3) for b in range(6) for j in range(3)]
    expected += [ends[0] + block * 6, ends[0] + block * 6.5, ends[1]]
    assert torch.allclose(lambdas, torch.stack(expected), atol=1e-5)
    # the timesteps are the model's labels 999 t, t = 1 first
    t = vp_inverse_lambda(torch.stack(expected[:-1]))
    assert torch.allclose(scheduler.timesteps.double(), 999 * t, atol=1e-3) and scheduler.timesteps[0] == 999
    assert [c for _, c in model_call_timesteps(scheduler, 20)] == [False] * 20  # one model call per timestep


def test_continuous_vp_dpm_solver_saves_and_reloads(tmp_path, caplog):
    scheduler = ContinuousVPDPMSolverSinglestepScheduler(t_end=1e-3, algorithm_type="dpmsolver++")
    scheduler.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        reloaded = ContinuousVPDPMSolverSinglestepScheduler.from_pretrained(tmp_path)
    public = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in (scheduler, reloaded)]
    assert not caplog.records and public[0] == public[1]
    for s in (scheduler, reloaded):
        s.set_timesteps(7)
    assert torch.equal(scheduler.timesteps, reloaded.timesteps) and torch.equal(scheduler.sigmas, reloaded.sigmas)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"solver_order": 4}, "solver_order"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"t_end": 1.0}, "t_end"),
        ({"beta_min": 30.0}, "beta_min"),
        ({"num_train_timesteps": 1}, "`num_train_timesteps` must be an integer >= 2, got 1"),  # was: every label 0
        ({"num_train_timesteps": 0}, "`num_train_timesteps` must be an integer >= 2, got 0"),  # was: ZeroDivisionError
        ({"num_train_timesteps": 2.5}, "`num_train_timesteps` must be an integer >= 2, got 2.5"),
    ],
)
def test_continuous_vp_dpm_solver_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContinuousVPDPMSolverSinglestepScheduler(**kwargs)


def test_continuous_vp_dpm_solver_places_its_own_timesteps():
    scheduler = ContinuousVPDPMSolverSinglestepScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(np.int64(6))  # a numpy integer, as diffusers' schedulers take it
    timesteps = scheduler.timesteps.clone()
    scheduler.set_timesteps(6)
    assert torch.equal(scheduler.timesteps, timesteps)


def test_pndm_warm_up_needs_four_steps_and_is_refused_before_set_timesteps():
    with pytest.raises(ValueError, match="PNDMScheduler .* at least 4, got 3"):
        model_call_timesteps(PNDMScheduler(), 3)
    assert len(model_call_timesteps(PNDMScheduler(), 4)) == 13  # 4 Runge-Kutta steps of 3 calls, then one PLMS
    assert len(model_call_timesteps(PNDMScheduler(skip_prk_steps=True), 3)) == 4


@pytest.mark.parametrize(
    ("steps", "calls"),
    [
        (4, [(750, False), (500, True), (500, False), (250, False), (0, False)]),
        (2, [(500, False), (0, True), (0, False)]),
    ],
)
def test_pndms_first_plms_step_is_a_predictor_corrector_pair(steps, calls):
    # was: no call of PNDMScheduler(skip_prk_steps=True) marked a corrector, so a boundary between its first two
    # timesteps sent the second call (averaged with the first, from the first's sample: Heun's rule) to another network
    assert [
        (round(t), corrector) for t, corrector in model_call_timesteps(PNDMScheduler(skip_prk_steps=True), steps)
    ] == calls
    assert not any(corrector for _, corrector in model_call_timesteps(PNDMScheduler(), 4))  # Runge-Kutta: call by call


@pytest.mark.parametrize("steps", [0, -2, 2.5, True])
def test_model_calls_need_a_positive_integer_step_count(steps):
    # was: [] for 0 or -2 and three calls for 2.5 (DDIM), a ZeroDivisionError or a TypeError elsewhere
    for scheduler in (DDIMScheduler(), HeunDiscreteScheduler()):
        with pytest.raises(ValueError, match=f"`num_inference_steps` must be a positive integer, got {steps!r}"):
            model_call_timesteps(scheduler, steps)


def test_a_scheduler_without_an_option_trains_on_its_default():
    # PNDM, LMS, Heun, DEIS... take no `rescale_betas_zero_snr`: they never rescale, as DDPM's default (False)
    assert training_schedule_differences(DDPMScheduler(), PNDMScheduler()) == []
    assert training_schedule_differences(PNDMScheduler(), DDIMScheduler(timestep_spacing="trailing")) == []
    assert training_schedule_differences(DDPMScheduler(rescale_betas_zero_snr=True), PNDMScheduler()) == [
        "rescale_betas_zero_snr"
    ]
    assert training_schedule_differences(DDPMScheduler(), EDMEulerScheduler())  # another family of schedule


def test_model_call_timesteps_takes_a_numpy_step_count():
    # np.int64(4) was refused as "`num_inference_steps` must be a positive integer, got np.int64(4)" (a call argument,
    # which the package's other call arguments take from numpy too); plan(..., num_inference_steps=np.int64(4)) passed
    # its own check and then failed here
    import numpy as np

    for scheduler in (DDIMScheduler(), HeunDiscreteScheduler()):
        assert model_call_timesteps(scheduler, np.int64(4)) == model_call_timesteps(scheduler, 4)
    with pytest.raises(ValueError, match="`num_inference_steps` must be a positive integer, got np.True_"):
        model_call_timesteps(DDIMScheduler(), np.True_)
    with pytest.raises(ValueError, match="`num_inference_steps` must be a positive integer, got np.int64"):
        model_call_timesteps(DDIMScheduler(), np.int64(0))


def test_dpm_solver_fast_orders_use_up_the_calls_and_refuse_a_bad_count():
    # dpm_solver_fast_orders(0, 3) gave [2, 1] (three model calls for none), an order of 4 blocks of 4
    from diffusers_stages.schedulers import dpm_solver_fast_orders

    for order in (1, 2, 3):
        for steps in range(1, 10):
            orders = dpm_solver_fast_orders(steps, order)
            assert sum(orders) == steps and max(orders) <= order and min(orders) >= 1, (steps, order, orders)
    with pytest.raises(ValueError, match="`steps` must be a positive integer, got 0"):
        dpm_solver_fast_orders(0, 3)
    with pytest.raises(ValueError, match="`order` must be 1, 2 or 3, got 4"):
        dpm_solver_fast_orders(8, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"solver_order": np.int64(2)},
            r"`solver_order` must be 1, 2 or 3 \(a Python int: the config is saved as JSON",
        ),
        ({"solver_order": True}, r"`solver_order` must be 1, 2 or 3"),
        ({"beta_min": "0.1"}, r"`beta_min` must be a number, got '0.1'"),
        ({"beta_max": None}, r"`beta_max` must be a number, got None"),
        ({"t_start": "1"}, r"`t_start` must be a number, got '1'"),
        ({"t_end": np.float32(1e-3)}, r"`t_end` must be a number \(a Python float: the config is saved as JSON"),
    ],
)
def test_continuous_vp_dpm_solver_names_options_of_the_wrong_type(kwargs, message):
    # solver_order=np.int64(2) built a scheduler whose repr and save_pretrained failed ("Object of type int64 is not
    # JSON serializable"), beta_min="0.1" raised "TypeError: '<' not supported between instances of 'float' and 'str'"
    with pytest.raises(ValueError, match=message):
        ContinuousVPDPMSolverSinglestepScheduler(**kwargs)


# schedulers that sample what a DDPM-style model (epsilon, v, sample) predicts, each with the prediction types it takes
DDPM_STYLE_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
    "LCMScheduler", "TCDScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
    "DEISMultistepScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
)  # fmt: skip


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", DDPM_STYLE_SCHEDULERS)
def test_a_ddpm_style_scheduler_with_the_models_prediction_type_is_not_refused(name, prediction_type):
    if (
        name in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "PNDMScheduler")
        and prediction_type == "sample"
    ):
        pytest.skip(f"{name} takes no 'sample' prediction itself")
    scheduler = getattr(diffusers, name)(prediction_type=prediction_type)
    assert not is_flow_matching_scheduler(scheduler)
    assert scheduler_prediction_type(scheduler) == prediction_type
    check_prediction_type(scheduler)  # a model that does not say what it predicts: the scheduler's is taken
    check_prediction_type(scheduler, prediction_type)
    # swapped with `from_config`, as diffusers' docs swap schedulers: the prediction type goes with the config
    check_prediction_type(DDIMScheduler.from_config(scheduler.config), prediction_type)


@pytest.mark.parametrize(
    "scheduler",
    [
        FlowMatchEulerDiscreteScheduler(),
        diffusers.FlowMatchHeunDiscreteScheduler(),
        diffusers.FlowMatchLCMScheduler(),
        DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
        diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
    ],
    ids=lambda s: type(s).__name__,
)
def test_a_flow_matching_scheduler_of_a_flow_model_is_not_refused(scheduler):
    assert is_flow_matching_scheduler(scheduler)
    assert scheduler_prediction_type(scheduler) == "flow_prediction"
    check_prediction_type(scheduler)
    check_prediction_type(scheduler, "flow_prediction")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_flow_matching_scheduler_swapped_in_for_a_ddpm_style_models_scheduler_is_refused(prediction_type):
    # `FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)` keeps the model's prediction type in its
    # config, which it ignores (it steps with a velocity): the pipelines sampled it on an epsilon model (garbage), and
    # `scheduler_prediction_type` read that key, so an ExpertRoutingPipeline of v-prediction experts took it too
    source = DDIMScheduler(prediction_type=prediction_type)
    flow = FlowMatchEulerDiscreteScheduler.from_config(source.config)
    assert scheduler_prediction_type(flow) == "flow_prediction"
    message = f"FlowMatchEulerDiscreteScheduler.*prediction_type='{prediction_type}'"
    with pytest.raises(ValueError, match=message):
        check_prediction_type(flow)
    with pytest.raises(ValueError, match=message):
        check_prediction_type(flow, prediction_type)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler.*'flow_prediction'.*'epsilon'"):
        check_prediction_type(FlowMatchEulerDiscreteScheduler(), "epsilon")  # a model that says what it predicts


def test_a_flow_prediction_on_a_ddpm_noise_schedule_and_the_reverse_are_refused():
    # DPM-Solver, UniPC, DEIS and SA-Solver take both options: a velocity on DDPM sigmas (or a noise prediction on
    # flow sigmas) gives garbage images without an error
    for name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"):
        scheduler_class = getattr(diffusers, name)
        with pytest.raises(ValueError, match=f"{name} has prediction_type='flow_prediction'.*use_flow_sigmas=True"):
            check_prediction_type(scheduler_class(prediction_type="flow_prediction"))
        with pytest.raises(ValueError, match=f"{name} has use_flow_sigmas=True.*prediction_type='epsilon'"):
            check_prediction_type(scheduler_class(use_flow_sigmas=True))
    with pytest.raises(
        ValueError, match="DDIMScheduler has prediction_type='v_prediction'.*predicts 'flow_prediction'"
    ):
        check_prediction_type(DDIMScheduler(prediction_type="v_prediction"), "flow_prediction")
