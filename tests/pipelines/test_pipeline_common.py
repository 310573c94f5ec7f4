"""What every pipeline of the package shares with a modern diffusers pipeline (the checks diffusers runs on
`DDIMPipeline`, and the call arguments of its newer pipelines), over the three pipelines with tiny components."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.callbacks import PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from diffusers_stages import DualBackbonePipeline, UViT2DModel

from .conftest import KINDS
from .conftest import tiny_pipeline as _pipeline

RUN = {"num_inference_steps": 3, "output_type": "pt"}


def _denoisers(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def _stage_networks(pipe) -> list[torch.nn.Module]:
    """The networks the sampling loop calls (an `ExpertRoutingModel`'s experts, not the container)."""
    networks = [
        pipe.stage_denoiser(stage)[0] for stage in range(pipe.resolve_partition(RUN["num_inference_steps"]).num_stages)
    ]
    return list({id(n): n for n in networks}.values())


def _images(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    return pipe(generator=torch.manual_seed(seed), **{**RUN, **kwargs}).images


@pytest.fixture(scope="module", params=KINDS)
def pipe(request):
    return _pipeline(request.param)


@pytest.fixture(scope="module", params=KINDS)
def conditional(request):
    return _pipeline(request.param, num_class_embeds=4)


# --------------------------------------------------------------------------------------------------------------------
# diffusers' DDIMPipeline checks
def test_components_round_trip(pipe):
    again = type(pipe)(**pipe.components)
    again.set_progress_bar_config(disable=True)
    assert again.components.keys() == pipe.components.keys()
    assert all(again.components[k] is v for k, v in pipe.components.items())
    assert torch.equal(_images(again), _images(pipe))


def test_from_pipe_shares_the_components_and_samples_the_same(pipe):
    again = type(pipe).from_pipe(pipe)
    again.set_progress_bar_config(disable=True)
    assert all(again.components[k] is v for k, v in pipe.components.items() if v is not None)
    assert torch.equal(_images(again), _images(pipe))


@pytest.mark.parametrize("kind", KINDS)
def test_a_component_swapped_in_after_construction_is_checked_as_the_constructor_checks_it(kind):
    # diffusers' `pipe.unet = ...` bypasses the constructor: a plain UNet2DModel as the multi-stage `unet` was an
    # AttributeError about `partition`, one as `experts` (in the constructor too) one about `prediction_type`, and a
    # deep backbone of other channels a convolution's error
    from diffusers import UNet2DModel

    from tests.conftest import TINY_UNET

    pipe = _pipeline(kind)
    name, replacement, message = {
        "multistage": ("unet", UNet2DModel(**TINY_UNET), "`unet` must be a MultiStageUNet2DModel"),
        "experts": ("experts", UNet2DModel(**TINY_UNET), "`experts` must be an ExpertRoutingModel, got UNet2DModel"),
        "dual_backbone": ("deep", UNet2DModel(**{**TINY_UNET, "in_channels": 4}), "must agree on `in_channels`"),
    }[kind]
    setattr(pipe, name, replacement)
    calls = (lambda: pipe(**RUN), lambda: pipe.expert_schedule(3), lambda: type(pipe)(**pipe.components))
    # `enable_stage_offload` hooks the stage networks: an AttributeError about `partition` or `prediction_type`, or
    # (dual backbone) hooks installed on networks no run can use
    for call in (*calls, lambda: pipe.enable_stage_offload(device="cpu")):
        with pytest.raises(ValueError, match=message):
            call()
    assert pipe._stage_offload is None


@pytest.mark.parametrize("kind", KINDS)
def test_from_pipe_keeps_networks_of_a_subclass_of_the_annotated_classes(kind):
    # diffusers' `from_pipe` carries a model component over only when its exact class is in the new pipeline's
    # annotation: a subclass the constructor accepts (a user's `MyUNet(MultiStageUNet2DModel)`, the package's own
    # `EarlyExitUViT2DModel(UViT2DModel)` as a backbone) was dropped with a warning, and `from_pipe` failed with
    # "expected [...] but only {...} were passed"
    from diffusers import UNet2DModel

    from diffusers_stages import ExpertRoutingModel, MultiStageUNet2DModel
    from diffusers_stages.models.early_exit import EarlyExitUViT2DModel
    from tests.conftest import TINY_UNET

    class MyMultiStage(MultiStageUNet2DModel):
        pass

    class MyRouting(ExpertRoutingModel):
        pass

    class MyUNet(UNet2DModel):
        pass

    pipe = _pipeline(kind)
    torch.manual_seed(0)
    if kind == "multistage":
        networks = {"unet": MyMultiStage(**TINY_UNET, stage_boundaries=(442, 631)).eval()}
    elif kind == "experts":
        networks = {"experts": MyRouting([UNet2DModel(**TINY_UNET).eval() for _ in range(2)], stage_boundaries=(500,))}
    else:
        networks = {"shallow": MyUNet(**TINY_UNET).eval(), "deep": UNet2DModel(**TINY_UNET).eval()}
    pipe = type(pipe)(**{**pipe.components, **networks})
    again = type(pipe).from_pipe(pipe)
    assert all(getattr(again, name) is network for name, network in networks.items())
    if kind == "dual_backbone":  # the package's early-exit U-ViT (a UViT2DModel) as the shallow backbone
        uvit = {"sample_size": 8, "hidden_size": 16, "num_attention_heads": 2}
        pipe = DualBackbonePipeline(
            shallow=EarlyExitUViT2DModel(**uvit, num_layers=3),
            deep=UViT2DModel(**uvit, num_layers=5),
            scheduler=pipe.scheduler,
        )
        again = DualBackbonePipeline.from_pipe(pipe, switch_timestep=600)
        assert again.shallow is pipe.shallow and again.deep is pipe.deep and again.config.switch_timestep == 600


@pytest.mark.parametrize("switch", [{"switch_timestep": 300.0}, {"switch_step_fraction": 0.7}])
def test_dual_backbone_from_pipe_keeps_the_backbones_and_the_switch(switch):
    pipe = _pipeline("dual_backbone", **switch)
    again = DualBackbonePipeline.from_pipe(pipe)
    assert again.shallow is pipe.shallow and again.deep is pipe.deep  # kept by the annotation's classes
    assert {k: again.config[k] for k in switch} == switch
    assert again.expert_schedule(5) == pipe.expert_schedule(5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_scheduler_class_or_name_instead_of_an_instance_is_named(kind, tmp_path):
    # `scheduler=DDIMScheduler` (the class, parentheses forgotten) or `scheduler="DDIMScheduler"` failed in diffusers'
    # `register_modules` with "'property' object has no attribute 'get'" or "'str' object has no attribute '__module__'",
    # from the constructor and from `from_pretrained(folder, scheduler=...)`
    pipe = _pipeline(kind)
    pipe.save_pretrained(tmp_path)
    for wrong, shown in ((diffusers.DDIMScheduler, "the class DDIMScheduler"), ("DDIMScheduler", "'DDIMScheduler'")):
        match = rf"`scheduler` must be a scheduler instance .*got {shown}"
        with pytest.raises(ValueError, match=match):
            type(pipe)(**{**pipe.components, "scheduler": wrong})
        with pytest.raises(ValueError, match=match):
            type(pipe).from_pretrained(tmp_path, scheduler=wrong)


def test_dict_and_tuple_outputs_are_equivalent(pipe):
    as_dict = _images(pipe)
    (as_tuple,) = pipe(generator=torch.manual_seed(0), return_dict=False, **RUN)
    assert torch.equal(as_dict, as_tuple)


def test_same_seed_same_images_other_seed_other_images(pipe):
    first = _images(pipe, seed=3, batch_size=2)
    assert torch.equal(first, _images(pipe, seed=3, batch_size=2))
    assert not torch.allclose(first, _images(pipe, seed=4, batch_size=2))


@pytest.mark.parametrize("kind", KINDS)
def test_to_dtype_converts_every_model_and_samples(kind):
    pipe = _pipeline(kind)
    noise = torch.randn(1, 3, 8, 8, generator=torch.manual_seed(0))  # the same noise in both dtypes
    reference = pipe(latents=noise, **{**RUN, "output_type": "latent"}).images
    pipe.to(torch.float16)
    assert all(p.dtype == torch.float16 for m in _denoisers(pipe) for p in m.parameters())
    pipe.to(torch.float64)
    assert all(p.dtype == torch.float64 for m in _denoisers(pipe) for p in m.parameters())
    latents = pipe(latents=noise, **{**RUN, "output_type": "latent"}).images
    assert latents.dtype == torch.float64
    assert torch.allclose(latents.float(), reference, atol=5e-3)  # DDIM amplifies the rounding at t=999


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_pt_output_keeps_the_pipelines_dtype_as_diffusers_postprocess_does(kind, dtype):
    """``output_type="pt"`` gives the images in the pipeline's dtype, as `StableDiffusionPipeline` does (its
    `VaeImageProcessor.postprocess` keeps the dtype); ``"np"`` is float32, as diffusers' numpy images are."""
    pipe = _pipeline(kind).to(dtype)
    images = pipe(generator=torch.manual_seed(0), num_inference_steps=2, output_type="pt").images
    assert images.dtype == dtype == diffusers.image_processor.VaeImageProcessor().postprocess(images, "pt").dtype
    assert pipe(num_inference_steps=2, output_type="np").images.dtype == np.float32


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("kind", ["experts", "dual_backbone"])
def test_stage_networks_in_different_dtypes_sample(kind, stage):
    """A per-component ``torch_dtype`` (``{"deep": torch.float16, "default": torch.float32}``) leaves the stage
    networks in different dtypes: each gets the latents in its own dtype (a torch dtype error before)."""
    pipe = _pipeline(kind)
    noise = torch.randn(1, 3, 8, 8, generator=torch.manual_seed(0))
    reference = pipe(latents=noise, **{**RUN, "output_type": "latent"}).images
    pipe.stage_denoiser(stage)[0].to(torch.float64)
    assert {s for _, s in pipe.expert_schedule(RUN["num_inference_steps"])} == {0, 1}  # both networks run
    latents = pipe(latents=noise, **{**RUN, "output_type": "latent"}).images
    assert latents.dtype == pipe.stage_denoiser(1)[0].dtype  # the latents' dtype: the first network to run's
    assert torch.allclose(latents.float(), reference, atol=1e-4)


def test_inference_mode(pipe):
    with torch.inference_mode():
        images = _images(pipe)
    assert torch.equal(images, _images(pipe))  # and the scheduler still works outside it afterwards


# --------------------------------------------------------------------------------------------------------------------
# call arguments of a modern diffusers pipeline
@pytest.mark.parametrize("kind", KINDS)
def test_user_latents_are_the_initial_noise_scaled_by_init_noise_sigma(kind):
    pipe = _pipeline(kind, scheduler=EulerDiscreteScheduler())  # init_noise_sigma far from 1
    noise = randn_tensor((2, 3, 8, 8), generator=torch.manual_seed(7))
    from_latents = pipe(latents=noise.clone(), batch_size=2, **RUN).images
    assert torch.equal(from_latents, _images(pipe, seed=7, batch_size=2))
    assert pipe.scheduler.init_noise_sigma > 2
    # the latents are the noise before scaling: passing pre-scaled ones changes the result
    assert not torch.allclose(from_latents, pipe(latents=noise * 3, batch_size=2, **RUN).images)


@pytest.mark.parametrize(
    ("latents", "match"),
    [
        (torch.zeros(1, 3, 8, 8), r"shape \(2, 3, 8, 8\), got \(1, 3, 8, 8\)"),
        (torch.zeros(2, 4, 8, 8), r"shape \(2, 3, 8, 8\), got \(2, 4, 8, 8\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.long), r"torch.int64"),
        ([[0.0]], "got list"),
    ],
)
def test_bad_latents_are_refused(pipe, latents, match):
    with pytest.raises(ValueError, match="`latents` must be a floating-point tensor of .*" + match):
        pipe(latents=latents, batch_size=2, **RUN)


def test_callback_reads_and_replaces_the_latents(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe
        seen.append((i, float(t), kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == pipe.num_timesteps - 1 else {}

    latents = pipe(callback_on_step_end=callback, generator=torch.manual_seed(0), **{**RUN, "output_type": "latent"})
    assert [i for i, _, _ in seen] == list(range(pipe.num_timesteps)) and pipe.num_timesteps == 3
    assert [t for _, t, _ in seen] == [t for t, _ in pipe.expert_schedule(3)]
    assert torch.count_nonzero(latents.images) == 0  # the last callback's latents are the output


def test_pipeline_callback_objects_are_accepted(pipe):
    class Zero(PipelineCallback):
        tensor_inputs = ["latents"]  # noqa: RUF012 (diffusers' own form)

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    images = pipe(callback_on_step_end=Zero(cutoff_step_ratio=1.0), **{**RUN, "output_type": "latent"}).images
    assert torch.count_nonzero(images) == 0


def test_a_callback_can_interrupt_the_loop_as_in_diffusers(pipe):
    """diffusers' contract (`StableDiffusionPipeline`, `WanPipeline`): a callback sets ``pipe._interrupt = True``, the
    remaining steps are skipped (no model call, no callback), and the latents so far are the output."""
    seen, first = [], {}

    def callback(p, i, t, kwargs):
        seen.append(i)
        first.setdefault("latents", kwargs["latents"].clone())
        p._interrupt = i == 0
        return {}

    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in _stage_networks(pipe)]
    try:
        out = pipe(callback_on_step_end=callback, generator=torch.manual_seed(0), **{**RUN, "output_type": "latent"})
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [0] and len(calls) == 1 and pipe.interrupt
    assert torch.equal(out.images, first["latents"])
    # the next run starts uninterrupted
    assert torch.equal(_images(pipe), _images(pipe, callback_on_step_end=lambda *a: {})) and not pipe.interrupt


def test_a_callback_can_change_the_guidance_scale_as_in_diffusers(conditional):
    """diffusers' dynamic guidance (its callback guide, `SDCFGCutoffCallback`): a callback that sets
    ``pipe._guidance_scale`` changes the guidance of the following steps (1, or 0.0 as diffusers' callbacks set, turns
    it off), checked as the argument is."""
    batches = []
    networks = _stage_networks(conditional)
    hooks = [m.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0])) for m in networks]

    def cutoff(p, i, t, kwargs):
        p._guidance_scale = 1.0
        return {}

    def to_zero(p, i, t, kwargs):  # `SDCFGCutoffCallback`'s own value: diffusers guides only above 1
        p._guidance_scale = 0.0
        return {}

    def to_negative(p, i, t, kwargs):
        p._guidance_scale = -2.0
        return {}

    try:
        _images(conditional, class_labels=[0, 2], guidance_scale=3.0, callback_on_step_end=cutoff)
        assert batches == [4, 2, 2]  # the first step guided (labels and null labels), the others not
        # was: "`guidance_scale` must be >= 1" after the first step, for diffusers' documented 0.0
        guided_off = _images(conditional, class_labels=[0, 2], guidance_scale=3.0, callback_on_step_end=to_zero)
        assert batches[3:] == [4, 2, 2]
        assert torch.equal(
            guided_off, _images(conditional, class_labels=[0, 2], guidance_scale=3.0, callback_on_step_end=cutoff)
        )
        with pytest.raises(ValueError, match=r"`guidance_scale` must be >= 1 \(1 disables guidance\), got -2.0"):
            _images(conditional, class_labels=[0, 2], guidance_scale=3.0, callback_on_step_end=to_negative)
    finally:
        for hook in hooks:
            hook.remove()


def test_bad_callbacks_are_refused(pipe):
    with pytest.raises(ValueError, match="`callback_on_step_end` must be callable, got 3"):
        pipe(callback_on_step_end=3, **RUN)
    with pytest.raises(ValueError, match=r"must be among \['latents'\], got \['noise'\]"):
        pipe(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"], **RUN)


@pytest.mark.parametrize("kind", KINDS)
def test_eta_makes_ddim_stochastic_and_is_refused_where_the_step_has_none(kind):
    pipe = _pipeline(kind)
    noisy = _images(pipe, eta=1.0)
    assert torch.equal(noisy, _images(pipe, eta=1.0))  # the step's noise comes from the generator
    assert not torch.allclose(noisy, _images(pipe, eta=0.0))
    assert torch.equal(_images(pipe, eta=0.0), _images(pipe))  # DDIM's default
    pipe.scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match="`eta`=1.0 needs a scheduler whose `step` takes `eta`"):
        _images(pipe, eta=1.0)
    with pytest.raises(ValueError, match="'s_churn', which DDPMScheduler.step does not take"):
        _images(pipe, scheduler_step_kwargs={"s_churn": 1.0})


def test_height_and_width(pipe):
    assert _images(pipe).shape == (1, 3, 8, 8)  # the model's sample_size
    assert _images(pipe, height=16, width=4).shape == (1, 3, 16, 4)
    for name, value in (("height", 7), ("width", 0), ("height", 8.0), ("width", True)):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive multiple of 2 .*got {value}"):
            _images(pipe, **{name: value})


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_without_sample_size_samples_at_the_height_and_width_given(kind):
    """`UNet2DModel`'s default ``sample_size`` is None: ``height`` and ``width`` say the size (a TypeError before,
    even with both given), and without them the error names them."""
    pipe = _pipeline(kind)
    for stage in range(2):
        pipe.stage_denoiser(stage)[0].register_to_config(sample_size=None)
    assert _images(pipe, height=8, width=16).shape == (1, 3, 8, 16)
    for given in ({}, {"height": 8}, {"width": 8}):
        with pytest.raises(ValueError, match="`height` and `width` must be given: .*no `sample_size`"):
            _images(pipe, **given)


def test_num_images_per_prompt_repeats_each_label(conditional):
    labels = []
    for model in _stage_networks(conditional):
        model.register_forward_pre_hook(lambda m, a, kw: labels.append(kw["class_labels"].tolist()), with_kwargs=True)
    images = _images(conditional, class_labels=[0, 2], num_images_per_prompt=2, guidance_scale=2.0)
    assert images.shape[0] == 4 and conditional.guidance_scale == 2.0
    assert all(called == [0, 0, 2, 2, 3, 3, 3, 3] for called in labels) and labels  # labels, then the null labels
    assert _images(conditional, class_labels=[0, 2], num_images_per_prompt=3).shape[0] == 6
    with pytest.raises(ValueError, match="`num_images_per_prompt` must be a positive integer, got 0"):
        _images(conditional, class_labels=[0], num_images_per_prompt=0)


def test_num_images_per_prompt_multiplies_an_unconditional_batch(pipe):
    assert _images(pipe, batch_size=2, num_images_per_prompt=2).shape[0] == 4


# --------------------------------------------------------------------------------------------------------------------
# model CPU offload
def test_model_cpu_offload_sequence_names_every_model_component(pipe):
    names = pipe.model_cpu_offload_seq.split("->")
    models = {k for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert set(names) <= set(pipe.components) and models <= set(names)


@pytest.mark.parametrize("kind", KINDS)
def test_model_cpu_offload_runs(kind):
    """Accelerate's hooks need an accelerator for real offloading; on CPU they are attached with ``device="cpu"``
    and must leave the images unchanged (no accelerator was available to check the move itself)."""
    pipe = _pipeline(kind)
    reference = _images(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(m, "_hf_hook") for m in _denoisers(pipe))
    onloads = _record_onloads(pipe)
    assert torch.equal(_images(pipe), reference)
    # every model call first runs its component's offload hook, which moves the component onto the accelerator: the
    # loop calls an `ExpertRoutingModel`'s experts, not the hooked container, whose weights then stayed on the CPU
    steps = RUN["num_inference_steps"]
    assert sorted(set(onloads)) == sorted({_owner(pipe, n) for n in _stage_networks(pipe)}) and len(onloads) >= steps


def _owner(pipe, network: torch.nn.Module) -> str:
    """The name of the pipeline component that holds ``network``."""
    return next(k for k, m in pipe.components.items() if isinstance(m, torch.nn.Module) and network in m.modules())


def _record_onloads(pipe) -> list[str]:
    """Record the component of every `enable_model_cpu_offload` hook that runs (the hook moves it in)."""
    onloads = []
    for name, model in pipe.components.items():
        hook = getattr(model, "_hf_hook", None)
        if hook is not None and name != "vae":
            hook.pre_forward = _recording(hook.pre_forward, onloads, name)
    return onloads


def _recording(pre_forward, onloads: list, name: str):
    def recorded(module, *args, **kwargs):
        onloads.append(name)
        return pre_forward(module, *args, **kwargs)

    return recorded


# --------------------------------------------------------------------------------------------------------------------
# the schedulers that tests.conftest.SCHEDULERS leaves out, and swapping the scheduler with `from_config`
MORE_SCHEDULERS = (
    "KDPM2AncestralDiscreteScheduler",
    "EDMDPMSolverMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "SASolverScheduler",
)


@pytest.mark.parametrize("name", MORE_SCHEDULERS)
@pytest.mark.parametrize("kind", KINDS)
def test_more_schedulers_give_the_same_images_for_a_seed_also_after_reload(kind, name, tmp_path):
    pipe = _pipeline(kind, getattr(diffusers, name)())
    first = _images(pipe, batch_size=2)
    assert first.shape == (2, 3, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(_images(pipe, batch_size=2), first)
    pipe.save_pretrained(tmp_path)
    reloaded = type(pipe).from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.scheduler).__name__ == name
    assert torch.equal(_images(reloaded, batch_size=2), first)


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler"])
def test_a_scheduler_swapped_with_from_config_and_back_gives_the_same_images(pipe, name):
    swapped = type(pipe)(**pipe.components)
    swapped.set_progress_bar_config(disable=True)
    swapped.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    assert torch.equal(_images(swapped, seed=1), _images(swapped, seed=1))
    swapped.scheduler = type(pipe.scheduler).from_config(swapped.scheduler.config)
    assert torch.equal(_images(swapped), _images(pipe))


@pytest.mark.parametrize("kind", KINDS)
def test_pndm_with_runge_kutta_warm_up_refuses_too_few_steps_up_front(kind):
    pipe = _pipeline(kind, PNDMScheduler())
    with pytest.raises(ValueError, match="PNDMScheduler.*`num_inference_steps` of at least 4.*got 3.*skip_prk_steps"):
        _images(pipe, num_inference_steps=3)
    assert _images(pipe, num_inference_steps=4).shape == (1, 3, 8, 8)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    assert _images(pipe, num_inference_steps=2).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_a_consistency_model_scheduler_is_refused_by_name(kind):
    with pytest.raises(ValueError, match="CMStochasticIterativeScheduler .*consistency models"):
        _images(_pipeline(kind, CMStochasticIterativeScheduler()))


@pytest.mark.parametrize("kind", ["multistage", "dual_backbone"])  # experts predicting epsilon refuse flow matching
def test_flow_matching_with_dynamic_shifting_is_refused_by_name(kind):
    pipe = _pipeline(kind, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler has use_dynamic_shifting=True"):
        _images(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False)
    assert _images(pipe).shape == (1, 3, 8, 8)


# --------------------------------------------------------------------------------------------------------------------
# class names: DiTPipeline's `id2label` and `get_label_ids`
@pytest.mark.parametrize("kind", KINDS)
def test_class_names_are_saved_and_turned_into_class_labels(kind, tmp_path):
    # a class-conditional pipeline kept no class names: the user had to know which index was which class
    pipe = _pipeline(kind, num_class_embeds=4)
    names = {0: "cat, kitty", 2: "dog"}  # DiT's convention: comma-separated synonyms; not every class named
    pipe = type(pipe)(**pipe.components, **_switch(pipe), id2label=names)
    assert pipe.labels == {"cat": 0, "dog": 2, "kitty": 0} and pipe.get_label_ids(["dog", "kitty"]) == [2, 0]
    pipe.save_pretrained(tmp_path)
    again = type(pipe).from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert again.config.id2label == {"0": "cat, kitty", "2": "dog"} and again.get_label_ids("cat") == [0]
    by_name = _images(again, class_labels=again.get_label_ids(["dog", "cat"]))
    assert torch.equal(by_name, _images(pipe, class_labels=[2, 0]))
    with pytest.raises(ValueError, match=r"`label` \['bird'\] is not a class name of this pipeline; its names are: "):
        again.get_label_ids(["cat", "bird"])


def test_a_name_of_two_classes_is_kept_and_refused_only_when_asked_for(tmp_path):
    # ImageNet's names (DiT's `id2label`, the `imagenet-1k` dataset's label names) call classes 134 and 517 "crane":
    # such names were refused, and with them training on ImageNet and DiT's own `id2label`
    pipe = _pipeline("multistage", num_class_embeds=4)
    pipe = type(pipe)(**pipe.components, id2label={0: "crane", 1: "tench, Tinca tinca", 2: "crane"})
    pipe.save_pretrained(tmp_path)
    again = type(pipe).from_pretrained(tmp_path)
    assert again.labels == {"Tinca tinca": 1, "tench": 1} and again.get_label_ids(["tench"]) == [1]
    with pytest.raises(ValueError, match=r"`label` 'crane' names classes 0 and 2: pass its index as `class_labels`"):
        again.get_label_ids(["tench", "crane"])


def _switch(pipe) -> dict:
    return (
        {k: v for k, v in pipe.config.items() if k.startswith("switch_")} if "switch_timestep" in pipe.config else {}
    )


@pytest.mark.parametrize(
    ("id2label", "match"),
    [
        ({3: "null"}, r"`id2label` keys must be class indices in \[0, 3\) .*got 3"),
        ({-1: "x"}, r"keys must be class indices in \[0, 3\) .*got -1"),
        ({True: "x"}, r"keys must be class indices .*got True"),
        ({"one": "x"}, r"keys must be class indices .*got 'one'"),
        ({0: ""}, r"`id2label` names must be non-empty strings, got '' for class 0"),
        ({0: 7}, r"names must be non-empty strings, got 7"),
        ({1: "a", "1": "b"}, r"`id2label` names class 1 twice \('a' and 'b'\)"),
        (["cat"], r"`id2label` must be a dict of class index -> name, got list"),
    ],
)
def test_bad_class_names_are_refused(id2label, match):
    pipe = _pipeline("multistage", num_class_embeds=4)
    with pytest.raises(ValueError, match=match):
        type(pipe)(**pipe.components, id2label=id2label)


def test_class_names_of_an_unconditional_model_are_refused_and_none_are_named(pipe):
    with pytest.raises(ValueError, match="`id2label` was given, but this pipeline's model is not class-conditional"):
        type(pipe)(**pipe.components, **_switch(pipe), id2label={0: "cat"})
    with pytest.raises(ValueError, match="its names are: none: this pipeline was saved without `id2label`"):
        pipe.get_label_ids("cat")
    for label in (3, [0, 1], None):  # a TypeError from `list(3)` before, or "not a class name" for indices
        with pytest.raises(ValueError, match=r"`label` must be a class name or a list of class names, got "):
            pipe.get_label_ids(label)


@pytest.mark.parametrize("kind", KINDS)
def test_an_sde_scheduler_draws_its_noise_from_the_generator(kind):
    # DPMSolverSDEScheduler's step takes no generator: it seeded its Brownian noise from the global generator, so the
    # same `generator` gave other images at every call
    pytest.importorskip("torchsde")
    pipe = _pipeline(kind, diffusers.DPMSolverSDEScheduler())

    def run(seeds, global_seed):
        torch.manual_seed(global_seed)
        generator = [torch.Generator().manual_seed(s) for s in seeds]
        one = generator if len(seeds) > 1 else generator[0]
        return pipe(batch_size=len(seeds), generator=one, **{**RUN, "output_type": "latent"}).images

    assert torch.equal(run([0], 1), run([0], 2))
    assert not torch.allclose(run([0], 1), run([1], 1))
    assert torch.allclose(run([5, 6], 1)[1:], run([6], 2), rtol=1e-5, atol=1e-5)  # one seed per image for a list
    assert pipe.scheduler.noise_sampler_seed is None  # the scheduler's own option is left as it was


# --------------------------------------------------------------------------------------------------------------------
# custom timesteps and sigmas, as StableDiffusionPipeline's `retrieve_timesteps` takes them
# the stage of each of the timesteps (999, 700, 450, 100): multi-stage boundaries (442, 631), experts 500, and the
# dual backbone's default step fraction 0.4 (2 shallow steps of 4)
CUSTOM_TIMESTEPS = [999, 700, 450, 100]
CUSTOM_STAGES = {"multistage": [2, 2, 1, 0], "experts": [1, 1, 0, 0], "dual_backbone": [1, 1, 0, 0]}


@pytest.mark.parametrize("kind", KINDS)
def test_custom_timesteps_give_the_images_of_the_scheduler_set_with_them(kind):
    pipe = _pipeline(kind, DDPMScheduler())  # "leading" spacing: 3 steps are 666, 333, 0
    by_count = _images(pipe, num_inference_steps=3, batch_size=2)
    assert pipe.scheduler.timesteps.tolist() == [666, 333, 0]
    custom = _images(pipe, timesteps=[666, 333, 0], batch_size=2)
    assert pipe.num_timesteps == 3 and pipe.scheduler.timesteps.tolist() == [666, 333, 0]
    assert torch.equal(custom, by_count)
    # `num_inference_steps=None` with custom timesteps, as diffusers' retrieve_timesteps asks for
    assert torch.equal(_images(pipe, timesteps=[666, 333, 0], num_inference_steps=None, batch_size=2), by_count)
    assert pipe.expert_schedule(None, timesteps=[666, 333, 0]) == pipe.expert_schedule(3)
    with pytest.raises(ValueError, match="`num_inference_steps` must be a positive integer, got None"):
        _images(pipe, num_inference_steps=None)
    # routed by the timesteps given: the schedule the loop follows, and a run on them
    schedule = pipe.expert_schedule(timesteps=CUSTOM_TIMESTEPS)
    assert schedule == [(float(t), stage) for t, stage in zip(CUSTOM_TIMESTEPS, CUSTOM_STAGES[kind])]
    assert _images(pipe, timesteps=torch.tensor(CUSTOM_TIMESTEPS)).shape == (1, 3, 8, 8)
    assert pipe.num_timesteps == 4


@pytest.mark.parametrize("kind", KINDS)
def test_custom_sigmas_give_the_images_of_the_scheduler_set_with_them(kind):
    pipe = _pipeline(kind, EulerDiscreteScheduler())
    by_count = _images(pipe, num_inference_steps=3)
    sigmas = pipe.scheduler.sigmas.tolist()  # the final sigma 0 included, as diffusers' custom sigmas are
    reference = EulerDiscreteScheduler()
    reference.set_timesteps(sigmas=sigmas)  # timesteps from the float32 sigmas: 499.5007 where 3 steps give 499.5
    from_sigmas = _images(pipe, sigmas=sigmas)
    assert torch.equal(pipe.scheduler.timesteps, reference.timesteps) and pipe.num_timesteps == 3
    assert torch.allclose(from_sigmas, by_count, atol=1e-4)
    schedule = pipe.expert_schedule(sigmas=sigmas)  # routed by those timesteps
    assert [t for t, _ in schedule] == reference.timesteps.tolist()
    assert [stage for _, stage in schedule] == [stage for _, stage in pipe.expert_schedule(3)]


@pytest.mark.parametrize(
    "scheduler, kwargs, match",
    [
        (None, {"timesteps": [666, 333, 0]}, r"`timesteps`=\[666, 333, 0\].*DDIMScheduler.*does not support custom"),
        (DDPMScheduler, {"sigmas": [14.6, 1.0, 0.0]}, r"`sigmas`=\[14.6, 1.0, 0.0\].*DDPMScheduler.*does not"),
        (EulerDiscreteScheduler, {"timesteps": [600], "sigmas": [1.0, 0.0]}, "Only one of `timesteps` or `sigmas`"),
        # EDM's `set_timesteps(sigmas=...)` takes a ramp its sigma schedule maps to sigmas (and fails on a list)
        (diffusers.EDMEulerScheduler, {"sigmas": [80.0, 1.0]}, r"`sigmas`=\[80.0, 1.0\] cannot be given to EDMEuler"),
        (DDPMScheduler, {"timesteps": []}, r"`timesteps` must be .*got \[\]"),
        (DDPMScheduler, {"timesteps": "999"}, r"`timesteps` must be .*got '999'"),
        (DDPMScheduler, {"timesteps": [999, True]}, r"`timesteps` must be .*got \[999, True\]"),
        (EulerDiscreteScheduler, {"sigmas": [float("nan"), 0.0]}, r"`sigmas` must be .*got \[nan, 0.0\]"),
        (DDPMScheduler, {"timesteps": torch.tensor([[999, 0]])}, r"`timesteps` must be .*got tensor"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_custom_timesteps_or_sigmas_a_scheduler_cannot_take_are_refused_before_sampling(
    kind, scheduler, kwargs, match
):
    pipe = _pipeline(kind, scheduler and scheduler())  # DDIM by default
    with pytest.raises(ValueError, match=match):
        pipe.expert_schedule(**kwargs)
    with pytest.raises(ValueError, match=match):
        _images(pipe, **kwargs)
