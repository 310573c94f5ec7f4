"""The package's scheduler knowledge (`diffusers_stages.schedulers`), on real diffusers schedulers."""

import math

import pytest
import torch
from diffusers import (
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
    check_scheduler_units,
    fresh_scheduler,
    is_edm_scheduler,
    model_call_timesteps,
    scheduler_prediction_type,
    scheduler_step_kwargs,
    scheduler_units,
    sigma_to_timestep,
    step_parameters,
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


def test_extra_step_arguments_must_be_taken_by_the_step():
    assert scheduler_step_kwargs(EulerDiscreteScheduler(), extra={"s_churn": 0.5})["s_churn"] == 0.5
    with pytest.raises(ValueError, match="'s_churn', which DDIMScheduler.step does not take"):
        scheduler_step_kwargs(DDIMScheduler(), extra={"s_churn": 0.5})
    with pytest.raises(ValueError, match="may not set 'generator'"):
        scheduler_step_kwargs(DDIMScheduler(), extra={"generator": None})


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
