import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
)

from diffusers_stages import DualBackbonePipeline, ExpertRoutingModel, ExpertRoutingPipeline, UViT2DModel
from diffusers_stages.pipelines.pipeline_dual_backbone import DEFAULT_SWITCH_STEP_FRACTION


@pytest.fixture
def backbones(tiny_unet_kwargs):
    torch.manual_seed(0)
    deep = UNet2DModel(**{**tiny_unet_kwargs, "block_out_channels": (16, 32), "layers_per_block": 2}).eval()
    torch.manual_seed(1)
    shallow = UNet2DModel(**{**tiny_unet_kwargs, "block_out_channels": (4, 8), "attention_head_dim": None}).eval()
    return shallow, deep


def _dual(shallow, deep, scheduler, **switch):
    pipe = DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=scheduler, **switch)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _count_calls(pipe):
    counts = {"shallow": 0, "deep": 0}
    for name in ("shallow", "deep"):
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, name=name: counts.__setitem__(name, counts[name] + 1)
        )
    return counts


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, HeunDiscreteScheduler, DPMSolverMultistepScheduler])
def test_equals_a_two_expert_routing_pipeline(backbones, scheduler_class):
    shallow, deep = backbones
    dual = _dual(shallow, deep, scheduler_class(), switch_timestep=400)
    routing = ExpertRoutingPipeline(ExpertRoutingModel([deep, shallow], stage_boundaries=(400,)), scheduler_class())
    routing.set_progress_bar_config(disable=True)
    run = {"batch_size": 2, "num_inference_steps": 5, "output_type": "np"}
    assert np.array_equal(
        dual(generator=torch.manual_seed(0), **run).images, routing(generator=torch.manual_seed(0), **run).images
    )
    assert dual.expert_schedule(5) == routing.expert_schedule(5)


@pytest.mark.parametrize(
    "scheduler_class", [DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, EDMEulerScheduler]
)
@pytest.mark.parametrize("steps", [4, 7])
def test_step_fraction_gives_the_shallow_model_that_share_of_steps(backbones, scheduler_class, steps):
    shallow, deep = backbones
    pipe = _dual(shallow, deep, scheduler_class(), switch_step_fraction=0.3)
    counts = _count_calls(pipe)
    pipe(num_inference_steps=steps, generator=torch.manual_seed(0), output_type="np")
    shallow_steps = round(0.3 * steps)
    calls_per_step = 2 if scheduler_class is HeunDiscreteScheduler else 1
    assert counts["shallow"] == shallow_steps * calls_per_step  # a Heun pair is never split
    assert counts["shallow"] + counts["deep"] == len(pipe.scheduler.timesteps)
    assert pipe.resolve_partition(steps).units == ("sigma" if scheduler_class is EDMEulerScheduler else "timestep")


def test_step_fraction_of_custom_timesteps_is_that_share_of_their_steps(backbones):
    """A step fraction with custom ``timesteps`` (a scheduler that takes them): the shallow model runs that share of
    the steps given, and the switch lies halfway between their last shallow and first deep timestep."""
    shallow, deep = backbones
    pipe = _dual(shallow, deep, DDPMScheduler(), switch_step_fraction=0.5)
    timesteps = [999, 990, 980, 10]
    assert pipe.resolve_partition(50, timesteps=timesteps).boundaries == (985.0,)
    assert [stage for _, stage in pipe.expert_schedule(timesteps=timesteps)] == [1, 1, 0, 0]
    counts = _count_calls(pipe)
    pipe(timesteps=timesteps, generator=torch.manual_seed(0), output_type="np")
    assert counts == {"shallow": 2, "deep": 2}
    with pytest.raises(ValueError, match=r"step-fraction switch needs at least 2 steps, got `timesteps`=\[500\]"):
        pipe.expert_schedule(timesteps=[500])


@pytest.mark.parametrize(
    "scheduler_class", [HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler]
)
@pytest.mark.parametrize(("fraction", "steps"), [(0.4, 4), (0.5, 3), (0.3, 7)])
def test_step_fraction_counts_a_predictor_corrector_pair_as_one_step(backbones, scheduler_class, fraction, steps):
    # was: KDPM2's correctors (at their own interpolated timesteps, KDPM2-a's 2e-4 above the next step's) counted as
    # steps, so the shallow model ran one step where round(f * N) is two
    shallow, deep = backbones
    schedule = _dual(shallow, deep, scheduler_class(), switch_step_fraction=fraction).expert_schedule(steps)
    assert sum(stage == 1 for _, stage in schedule) == 2 * round(fraction * steps)  # pairs: predictor + corrector


@pytest.mark.parametrize(
    ("switch", "steps", "shallow_timesteps"),
    [({"switch_timestep": 500.0}, 5, [999, 799, 599]), ({"switch_step_fraction": 0.5}, 6, [999, 832, 666])],
)
def test_a_singlestep_solvers_calls_route_each_by_its_own_noise_level(backbones, switch, steps, shallow_timesteps):
    # as the README says: only a Heun/KDPM2 pair stays with one network; DPM-Solver's singlestep order-2 update of
    # (599, 400) (5 steps) or (666, 500) (6 steps) has its first call on the shallow model and its second on the deep
    shallow, deep = backbones
    schedule = _dual(shallow, deep, DPMSolverSinglestepScheduler(), **switch).expert_schedule(steps)
    assert [round(t) for t, stage in schedule if stage == 1] == shallow_timesteps
    assert len(schedule) == steps  # every call counts as a step of the fraction


@pytest.mark.parametrize("switch", [{"switch_step_fraction": 0.25}, {"switch_timestep": 600.0}])
def test_pndms_first_plms_pair_stays_on_the_shallow_model(backbones, switch):
    # was: the second call of PLMS's first step (t=500, averaged with the t=750 one) ran on the deep model
    shallow, deep = backbones
    schedule = _dual(shallow, deep, PNDMScheduler(skip_prk_steps=True), **switch).expert_schedule(4)
    assert schedule == [(750.0, 1), (500.0, 1), (500.0, 0), (250.0, 0), (0.0, 0)]


def test_switch_sigma_follows_the_training_noise_schedule(backbones):
    shallow, deep = backbones
    scheduler = DDIMScheduler()
    alphas = scheduler.alphas_cumprod
    sigma_600 = float(((1 - alphas[600]) / alphas[600]).sqrt())
    pipe = _dual(shallow, deep, scheduler, switch_sigma=sigma_600)
    assert pipe.resolve_partition(None).boundaries[0] == pytest.approx(600, abs=1e-3)
    edm = _dual(shallow, deep, EDMEulerScheduler(), switch_sigma=5.0)
    assert edm.resolve_partition(None).to_config()["boundary_units"] == "sigma"
    with pytest.raises(ValueError, match="alphas_cumprod"):
        _dual(shallow, deep, FlowMatchEulerDiscreteScheduler(), switch_sigma=0.5)


def test_a_sampled_sigma_on_switch_sigma_runs_the_deep_model_whatever_the_rounding(backbones):
    # a sigma on the boundary belongs to the cleaner stage (the deep model), as with EDM schedulers; on a DDPM-style
    # scheduler the switch became the sigma's timestep, where a timestep on the boundary is the noisier stage's, so
    # float rounding decided: DDIM's t=500 with its float32 sigma ran deep (boundary 500.000009), with its float64
    # sigma shallow (500.0); Euler-Karras' sigmas[i] of 30 ran shallow for 15 of the 28 inner i
    shallow, deep = backbones
    ddim = DDIMScheduler()
    alphas = ddim.alphas_cumprod
    for t in (20, 300, 500, 980):
        for alpha in (alphas[t], alphas[t].double()):
            sigma = float(((1 - alpha) / alpha).sqrt())
            schedule = _dual(shallow, deep, ddim, switch_sigma=sigma).expert_schedule(50)
            assert [expert for timestep, expert in schedule if timestep == t] == [0], (t, alpha.dtype)
            assert all(expert == 1 for timestep, expert in schedule if timestep > t)
    # sigmas[27] of 30: its timestep 7.0310616 (float32) lies two float32 steps above the timestep of its float32
    # sigma, whose rounding hides the scheduler's float64 one: the sigmas that round to it are on the switch too
    euler = EulerDiscreteScheduler(use_karras_sigmas=True)
    euler.set_timesteps(30)
    for i in range(1, 29):
        schedule = _dual(shallow, deep, euler, switch_sigma=float(euler.sigmas[i])).expert_schedule(30)
        assert [expert for _, expert in schedule] == [1] * i + [0] * (30 - i), i


def test_save_and_reload_keeps_the_switch_and_the_images(backbones, tmp_path):
    shallow, deep = backbones
    pipe = _dual(shallow, deep, EulerDiscreteScheduler(), switch_step_fraction=0.5)
    first = pipe(num_inference_steps=4, generator=torch.manual_seed(2), output_type="np").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["switch_step_fraction"] == 0.5 and index["shallow"] == ["diffusers", "UNet2DModel"]
    for loaded in (
        DualBackbonePipeline.from_pretrained(tmp_path, disable_mmap=True),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True, disable_mmap=True),
    ):
        assert type(loaded) is DualBackbonePipeline and loaded.config.switch_step_fraction == 0.5
        loaded.set_progress_bar_config(disable=True)
        assert np.array_equal(
            first, loaded(num_inference_steps=4, generator=torch.manual_seed(2), output_type="np").images
        )


def test_a_switch_given_at_loading_replaces_the_saved_one_of_any_kind(backbones, tmp_path):
    shallow, deep = backbones
    pipe = _dual(shallow, deep, DDIMScheduler(), switch_step_fraction=0.5)
    pipe.save_pretrained(tmp_path)
    for loaded in (
        DualBackbonePipeline.from_pretrained(tmp_path, switch_timestep=600),
        DualBackbonePipeline.from_pretrained(tmp_path, trust_remote_code=True, switch_timestep=600),
        DualBackbonePipeline.from_pipe(pipe, switch_timestep=600),
    ):
        assert loaded.config.switch_timestep == 600 and loaded.config.switch_step_fraction is None
    assert DualBackbonePipeline.from_pipe(pipe, switch_sigma=1.0).config.switch_step_fraction is None
    assert DualBackbonePipeline.from_pretrained(tmp_path).config.switch_step_fraction == 0.5  # none given: saved
    with pytest.raises(ValueError, match="exactly one"):
        DualBackbonePipeline.from_pipe(pipe, switch_timestep=600, switch_sigma=1.0)


def test_from_pipe_keeps_the_packages_uvit_backbones():
    # DuoDiff's own backbones (what `train_dual_backbone.py --backbone uvit` trains) are carried over, not dropped
    torch.manual_seed(0)
    shallow, deep = (UViT2DModel(sample_size=8, hidden_size=16, num_layers=n, num_attention_heads=2) for n in (1, 3))
    pipe = _dual(shallow.eval(), deep.eval(), DDIMScheduler(), switch_step_fraction=0.5)
    again = DualBackbonePipeline.from_pipe(pipe)
    assert again.shallow is pipe.shallow and again.deep is pipe.deep


def test_no_switch_is_the_default_step_fraction(backbones):
    shallow, deep = backbones
    pipe = _dual(shallow, deep, DDIMScheduler())
    assert DEFAULT_SWITCH_STEP_FRACTION == 0.4 and pipe.config.switch_step_fraction == 0.4
    assert pipe.config.switch_timestep is None and pipe.config.switch_sigma is None
    assert [e for _, e in pipe.expert_schedule(5)] == [1, 1, 0, 0, 0]  # round(0.4 * 5) shallow steps


def test_bad_switches_are_refused(backbones):
    shallow, deep = backbones
    with pytest.raises(ValueError, match="exactly one"):
        _dual(shallow, deep, DDIMScheduler(), switch_timestep=300, switch_step_fraction=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        _dual(shallow, deep, DDIMScheduler(), switch_step_fraction=1.0)
    for timestep in (1200, 1000, 0, -5):  # named as `boundaries`, an argument the caller never gave
        with pytest.raises(ValueError, match=rf"`switch_timestep` must lie strictly inside .*\(0, 1000\).*{timestep}"):
            _dual(shallow, deep, DDIMScheduler(), switch_timestep=timestep)
    with pytest.raises(ValueError, match="EDM"):
        _dual(shallow, deep, EDMEulerScheduler(), switch_timestep=300)
    for sigma in (0.0, -1.0):  # no noise level: named, not a math domain error (nor `boundaries` for EDM)
        for scheduler in (DDIMScheduler(), EDMEulerScheduler()):
            with pytest.raises(ValueError, match="`switch_sigma` must be a noise level > 0"):
                _dual(shallow, deep, scheduler, switch_sigma=sigma)
    for sigma in (80.0, 100.0, 0.001):  # EDMEulerScheduler's (0.002, 80): one backbone never ran, silently
        with pytest.raises(
            ValueError, match=rf"`switch_sigma` must lie inside the noise levels \(0.002, 80\).*{sigma}"
        ):
            _dual(shallow, deep, EDMEulerScheduler(), switch_sigma=sigma)
    pipe = _dual(shallow, deep, DDIMScheduler(), switch_step_fraction=0.5)
    with pytest.raises(ValueError, match=">= 2"):
        pipe(num_inference_steps=1)


@pytest.mark.parametrize(
    ("change", "key"), [({"sample_size": 16}, "sample_size"), ({"in_channels": 1}, "in_channels"),
                        ({"num_class_embeds": 3}, "num_class_embeds")]
)  # fmt: skip
def test_backbones_that_are_not_interchangeable_are_refused_at_construction(change, key):
    # the deep backbone continues the shallow one's samples: a pair that disagrees on its inputs, outputs or labels
    # was accepted, ran every shallow step and failed at the switch (as an `ExpertRoutingModel` of the two refuses)
    torch.manual_seed(0)
    tiny = {"sample_size": 8, "hidden_size": 16, "num_attention_heads": 2}
    shallow, deep = UViT2DModel(**tiny, num_layers=1), UViT2DModel(**{**tiny, **change}, num_layers=3)
    with pytest.raises(ValueError, match=f"`shallow` and `deep` must agree on `{key}`"):
        DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=DDIMScheduler())


@pytest.mark.parametrize("num_class_embeds", [None, 3])
def test_a_unet_and_a_dit_of_other_classes_are_refused_at_construction(num_class_embeds):
    # a DiT counts its classes as `num_embeds_ada_norm` (its unconditional label one more), a U-Net as
    # `num_class_embeds`: only the latter key was compared, so an unconditional U-Net with a DiT of 3 classes was
    # accepted and failed at sampling with a TypeError inside the U-Net, and a U-Net of 3 embeddings (2 classes) with
    # it checked the labels against the first backbone's classes only
    torch.manual_seed(0)
    tiny = {"sample_size": 8, "in_channels": 3, "out_channels": 3}
    unet = UNet2DModel(**tiny, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       num_class_embeds=num_class_embeds)  # fmt: skip
    dit = DiTTransformer2DModel(**tiny, num_attention_heads=2, attention_head_dim=4, num_layers=1, patch_size=2,
                                num_embeds_ada_norm=3)  # fmt: skip
    match = r"`shallow` and `deep` must agree on their class embeddings \(the classes and the unconditional label"
    with pytest.raises(ValueError, match=match):
        DualBackbonePipeline(shallow=dit, deep=unet, scheduler=DDIMScheduler())
    same = UNet2DModel.from_config(unet.config, num_class_embeds=4)  # the DiT's 3 classes and its unconditional label
    DualBackbonePipeline(shallow=dit, deep=same, scheduler=DDIMScheduler())


@pytest.mark.parametrize("missing", ["shallow", "deep"])
def test_a_missing_backbone_is_named_not_an_attribute_error_in_sampling(backbones, missing, tmp_path):
    # `DualBackbonePipeline(shallow=None, ...)` and `from_pretrained(folder, shallow=None)` were accepted, and sampling
    # then failed with "'NoneType' object has no attribute 'config'" (the other pipelines refuse a missing model)
    shallow, deep = backbones
    given = {"shallow": shallow, "deep": deep, missing: None}
    message = rf"`{missing}` must be a denoiser \(a torch.nn.Module\), got None"
    with pytest.raises(ValueError, match=message):
        DualBackbonePipeline(**given, scheduler=DDIMScheduler())
    pipe = _dual(shallow, deep, DDIMScheduler())
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        DualBackbonePipeline.from_pretrained(tmp_path, **{missing: None})
    setattr(pipe, missing, None)  # swapped out after construction: refused before the first step
    with pytest.raises(ValueError, match=message):
        pipe(num_inference_steps=2)


def test_a_backbone_whose_config_has_no_sample_size_samples_at_the_height_and_width_given():
    """A backbone may be "any other denoiser" (the class docstring): one whose config has no `sample_size` entry
    at all samples at the `height` and `width` given, and without them the error names them (an AttributeError on
    the config before, even with both given)."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.unets.unet_2d import UNet2DOutput

    class Denoiser(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, in_channels: int = 3, out_channels: int = 3):
            super().__init__()
            self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)

        def forward(self, sample, timestep, **kwargs):
            return UNet2DOutput(sample=self.conv(sample))

    torch.manual_seed(0)
    pipe = _dual(Denoiser().eval(), Denoiser().eval(), DDIMScheduler(), switch_step_fraction=0.5)
    run = {"num_inference_steps": 2, "output_type": "pt"}
    assert pipe(height=8, width=12, **run).images.shape == (1, 3, 8, 12)
    with pytest.raises(ValueError, match="`height` and `width` must be given: .*no `sample_size`"):
        pipe(**run)


@pytest.mark.parametrize("switch", [{"switch_timestep": 600}, {"switch_sigma": 2}])
def test_a_whole_number_switch_loads_without_a_type_warning(backbones, tmp_path, switch):
    # a switch given as an int (the README's `switch_timestep=600`) was saved as one, and every load by diffusers'
    # `DiffusionPipeline.from_pretrained` warned "Expected types for switch_timestep: (float, NoneType), got int"
    import logging

    from diffusers.utils import logging as diffusers_logging

    shallow, deep = backbones
    pipe = _dual(shallow, deep, DDIMScheduler(), **switch)
    ((key, value),) = switch.items()
    assert type(pipe.config[key]) is float and pipe.config[key] == value
    pipe.save_pretrained(tmp_path)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # the tests run at "error" (conftest.py)
    try:
        loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        logger.removeHandler(handler)
    assert loaded.config[key] == value and not [m for m in messages if "Expected types" in m]


@pytest.mark.parametrize("side", ["height", "width"])
def test_another_size_than_a_uvits_own_is_refused_naming_the_argument(side):
    # `pipe(height=16)` on 8-px U-ViTs failed inside the model with an error about its `sample`, an argument the user
    # never gave: the U-ViT's position embedding is learned for its `sample_size` only
    shallow, deep = (UViT2DModel(sample_size=8, hidden_size=16, num_layers=n, num_attention_heads=2) for n in (1, 3))
    pipe = _dual(shallow, deep, DDIMScheduler(num_train_timesteps=100), switch_step_fraction=0.5)
    with pytest.raises(ValueError, match=f"`{side}` must be 8: the UViT2DModel's position embedding is learned for"):
        pipe(num_inference_steps=2, **{side: 16})
    assert pipe(num_inference_steps=2, height=8, width=8, output_type="np").images.shape == (1, 8, 8, 3)


def test_a_backbone_with_a_learned_time_embedding_of_another_schedule_is_named(tiny_unet_kwargs):
    # a learned time embedding of 500 rows under a 1000-step scheduler was accepted, and the run failed inside the
    # embedding at its first step ("IndexError: index out of range in self"), as ExpertRoutingModel refuses it
    torch.manual_seed(1)
    shallow = UNet2DModel(**tiny_unet_kwargs, time_embedding_type="learned", num_train_timesteps=500).eval()
    deep = UNet2DModel(**tiny_unet_kwargs).eval()
    pipe = _dual(shallow, deep, DDIMScheduler())
    message = (
        r"`shallow` \(UNet2DModel\) was built for num_train_timesteps=500, but `scheduler` DDIMScheduler has 1000"
    )
    with pytest.raises(ValueError, match=message):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match=message):
        pipe.expert_schedule(num_inference_steps=2)
    pipe.scheduler = DDIMScheduler(num_train_timesteps=500)
    assert pipe(num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)
