import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMapEulerDiscreteScheduler,
    UNet2DModel,
    VQModel,
)

from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel
from tests.conftest import SCHEDULERS

BOUNDARIES = (442, 631)
SIGMA_BOUNDARIES = (2.5103, 7.6577)  # Zhang et al.'s EDM boundaries in sigma


def _pipe(unet, scheduler, vae=None):
    pipe = MultiStagePipeline(unet=unet, scheduler=scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _record_calls(pipe):
    """Wrap the U-Net to record (timestep, stage_index, first-order?) of every model call."""
    calls, forward = [], pipe.unet.forward

    def recording_forward(sample, timestep, *args, stage_index=None, **kwargs):
        first_order = getattr(pipe.scheduler, "state_in_first_order", True)
        values = torch.as_tensor(timestep).reshape(-1)
        assert values.numel() in (1, sample.shape[0]) and bool((values == values[0]).all())  # all equal
        calls.append((float(values[0]), stage_index, first_order))
        return forward(sample, timestep, *args, stage_index=stage_index, **kwargs)

    pipe.unet.forward = recording_forward
    return calls


def _expected_stage(timestep: float, edm: bool) -> int:
    if edm:  # EDM schedulers pass c_noise = ln(sigma)/4
        sigma = math.exp(4 * timestep)
        return sum(sigma > b for b in SIGMA_BOUNDARIES)  # a sigma on a boundary is the cleaner stage's
    return sum(timestep >= b for b in BOUNDARIES)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__)
def test_every_scheduler_runs_and_routes_each_call_to_its_stage(tiny_unet_kwargs, scheduler_class):
    edm = scheduler_class is EDMEulerScheduler
    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(
        **tiny_unet_kwargs,
        stage_boundaries=SIGMA_BOUNDARIES if edm else BOUNDARIES,
        boundary_units="sigma" if edm else "timestep",
        decoder_block_out_channels=((16, 24), (8, 16), (4, 8)),
    ).eval()
    pipe = _pipe(unet, scheduler_class())
    calls = _record_calls(pipe)
    images = pipe(batch_size=2, num_inference_steps=6, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    assert len(calls) >= 6
    for i, (t, stage, first_order) in enumerate(calls):
        if first_order:
            assert stage == _expected_stage(t, edm), f"call {i} at t={t} went to stage {stage}"
        else:  # the corrector of a Heun-type pair stays with its predictor
            assert stage == calls[i - 1][1]
    assert {s for _, s, _ in calls} == {0, 1, 2}, "6 steps over the whole schedule visit every stage"


def test_a_scheduler_state_beyond_its_config_routes_each_call_by_its_own_timestep(tiny_multistage):
    """`FlowMatchEulerDiscreteScheduler.set_shift` changes the timesteps without changing the config: the schedule
    (and so the routing) was a dry run of a fresh scheduler built from the config, so the calls went to the stages
    of the unshifted timesteps (t=800 to the clean decoder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _pipe(tiny_multistage, FlowMatchEulerDiscreteScheduler())
    pipe.scheduler.set_shift(8.0)
    calls = _record_calls(pipe)
    pipe(num_inference_steps=4, output_type="pt")
    assert [stage for _, stage, _ in calls] == [_expected_stage(t, edm=False) for t, _, _ in calls]
    assert [t for t, _ in pipe.expert_schedule(4)] == [t for t, _, _ in calls]


@pytest.mark.parametrize(
    ("scheduler_class", "units", "as_number"),
    [
        (EDMEulerScheduler, "sigma", False),
        (EDMEulerScheduler, "sigma", True),
        (EDMDPMSolverMultistepScheduler, "sigma", False),
        (DDIMScheduler, "timestep", False),
        (DDIMScheduler, "timestep", True),
        (FlowMapEulerDiscreteScheduler, "timestep", False),  # float64 timesteps
        (FlowMapEulerDiscreteScheduler, "timestep", True),
    ],
)
def test_a_direct_call_on_a_boundary_the_scheduler_samples_runs_the_pipelines_decoder(
    tiny_unet_kwargs, scheduler_class, units, as_number
):
    """A model called without `stage_index` (a user's loop, diffusers' own pipelines) must run the decoder the
    pipeline's schedule picks, also where a boundary is a noise level the scheduler samples: with a sigma boundary
    the model routed the float32 c_noise to the cleaner stage, the schedule its float to the noisier one; a timestep
    given as a Python float (``t.item()``) was read as float32, so a float64 timestep on a boundary went below it."""
    steps = 12  # FlowMapEulerDiscreteScheduler then has float64 timesteps above their float32 rounding
    scheduler = scheduler_class()
    probe = scheduler_class.from_config(scheduler.config)
    probe.set_timesteps(steps)
    x = torch.randn(1, 3, 8, 8, generator=torch.manual_seed(0))
    for i in range(1, steps - 1):
        t = probe.timesteps[i]
        boundary = float(probe.sigmas[i]) if units == "sigma" else float(t)
        torch.manual_seed(0)
        unet = MultiStageUNet2DModel(**tiny_unet_kwargs, stage_boundaries=[boundary], boundary_units=units).eval()
        stage = _pipe(unet, scheduler).expert_schedule(steps)[i][1]
        with torch.no_grad():
            direct = unet(x, t.item() if as_number else t).sample
            by_stage = [unet(x, t, stage_index=s).sample for s in range(2)]
        ran = [s for s in range(2) if torch.equal(direct, by_stage[s])]
        assert ran == [stage], f"call {i} at t={float(t)} (boundary {boundary}): the pipeline runs {stage}, not {ran}"


def test_same_seed_same_images_also_after_save_and_reload(tiny_multistage, tmp_path):
    pipe = _pipe(tiny_multistage, EulerAncestralDiscreteScheduler())  # stochastic sampler: uses the generator
    first = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(3), output_type="np").images
    again = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(3), output_type="np").images
    other = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(4), output_type="np").images
    assert np.array_equal(first, again) and not np.allclose(first, other)

    pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin")) and (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    for loaded in (
        MultiStagePipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert type(loaded) is MultiStagePipeline and type(loaded.unet) is MultiStageUNet2DModel
        assert type(loaded.scheduler) is EulerAncestralDiscreteScheduler
        loaded.set_progress_bar_config(disable=True)
        reloaded = loaded(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(3), output_type="np").images
        assert np.array_equal(first, reloaded)


def test_saved_folder_is_hub_ready(tiny_multistage, tmp_path):
    _pipe(tiny_multistage, DDIMScheduler()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_multistage", "MultiStagePipeline"]
    module, _ = index["unet"]
    # diffusers only accepts a third-party component from the Hub when `<component>/<library>.py` exists (#6563)
    assert (
        (tmp_path / "unet" / f"{module}.py").read_text().strip().endswith("import MultiStageUNet2DModel  # noqa: F401")
    )
    assert (tmp_path / "pipeline_multistage.py").exists()


def _tiny_vae(vae_class, **extra):
    return vae_class(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **extra,
    ).eval()


@pytest.mark.parametrize(
    "vae_class, extra",
    [
        (AutoencoderKL, {"scaling_factor": 0.5, "shift_factor": 0.25}),
        (VQModel, {"scaling_factor": 0.7, "num_vq_embeddings": 16}),
    ],
    ids=["AutoencoderKL", "VQModel"],
)
def test_latent_diffusion_decodes_scaled_latents(tiny_unet_kwargs, vae_class, extra, tmp_path):
    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**{**tiny_unet_kwargs, "in_channels": 4, "out_channels": 4, "sample_size": 4})
    vae = _tiny_vae(vae_class, **extra)
    pipe = _pipe(unet.eval(), DDIMScheduler(), vae)
    latents = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="latent").images
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    assert latents.shape == (2, 4, 4, 4) and images.shape == (2, 3, 8, 8)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor + shift).sample
    assert torch.allclose(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-6)

    pipe.save_pretrained(tmp_path)
    loaded = MultiStagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is type(vae)
    again = loaded(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(images, again)


@pytest.mark.parametrize("force_upcast", [True, False])
def test_a_float16_vae_decodes_in_float32_when_its_config_asks_as_in_diffusers(tiny_unet_kwargs, force_upcast):
    """A float16 AutoencoderKL with ``force_upcast`` (the default; SDXL's VAE overflows in float16) decodes in float32
    and is left in float16, as diffusers' SDXL pipeline does; without it, it decodes in float16."""
    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**{**tiny_unet_kwargs, "in_channels": 4, "out_channels": 4, "sample_size": 4})
    pipe = _pipe(unet.eval(), DDIMScheduler(), _tiny_vae(AutoencoderKL, force_upcast=force_upcast).half())
    run = {"batch_size": 2, "num_inference_steps": 2, "generator": torch.manual_seed(0)}
    latents = pipe(output_type="latent", **run).images
    seen = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    images = pipe(output_type="pt", **{**run, "generator": torch.manual_seed(0)}).images
    assert seen == [torch.float32 if force_upcast else torch.float16] and pipe.vae.dtype == torch.float16
    if force_upcast:  # the float16 weights, in float32
        with torch.no_grad():
            expected = copy.deepcopy(pipe.vae).float().decode(latents / pipe.vae.config.scaling_factor).sample
        assert torch.allclose(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_class_conditional_guidance(tiny_unet_kwargs):
    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**tiny_unet_kwargs, num_class_embeds=4).eval()  # 3 classes + the null label 3
    pipe = _pipe(unet, DDIMScheduler())
    labels = [0, 2]
    calls = _record_calls(pipe)
    guided = pipe(
        class_labels=labels,
        guidance_scale=3.0,
        num_inference_steps=3,
        generator=torch.manual_seed(0),
        output_type="pt",
    ).images
    plain = pipe(class_labels=labels, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    assert guided.shape == (2, 3, 8, 8) and not torch.allclose(guided, plain)
    assert len(calls) == 6  # one batched call (conditional + unconditional) per step with guidance, one without

    # the guided prediction is uncond + s * (cond - uncond) with the null label num_class_embeds - 1
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor(700), torch.tensor(labels)
    with torch.no_grad():
        got = pipe.denoise(2, x, t, y, 3.0)
        cond = unet(x, t, class_labels=y, stage_index=2).sample
        uncond = unet(x, t, class_labels=torch.full_like(y, 3), stage_index=2).sample
    assert torch.allclose(got, uncond + 3.0 * (cond - uncond), atol=1e-5)
    # per-stage guidance scales: 1 everywhere equals no guidance
    per_stage = pipe(
        class_labels=labels,
        guidance_scale=[1.0, 1.0, 1.0],
        num_inference_steps=3,
        generator=torch.manual_seed(0),
        output_type="pt",
    ).images
    assert torch.equal(per_stage, plain)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"class_labels": [0]}, "class_labels"),
        ({"guidance_scale": [2.0, 2.0]}, "guidance_scale"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
    ],
)
def test_bad_call_arguments_name_the_argument(tiny_multistage, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        _pipe(tiny_multistage, DDIMScheduler())(num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_class_labels_are_checked(tiny_unet_kwargs):
    pipe = _pipe(MultiStageUNet2DModel(**tiny_unet_kwargs, num_class_embeds=4).eval(), DDIMScheduler())
    with pytest.raises(ValueError, match="`class_labels` must be given"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="`class_labels`.*\\[0, 3\\]"):
        pipe(class_labels=[0, 3], num_inference_steps=2)  # 3 is the null label
    with pytest.raises(ValueError, match="`batch_size`=3"):
        pipe(batch_size=3, class_labels=[0, 1], num_inference_steps=2)


@pytest.mark.parametrize("class_embed_type", ["timestep", "identity"])
def test_a_model_that_embeds_label_values_is_refused_with_or_without_labels(tiny_unet_kwargs, class_embed_type):
    # were contradictory: "`class_labels` must be given" without them, "not class-conditional" with them
    unet = MultiStageUNet2DModel(**tiny_unet_kwargs, class_embed_type=class_embed_type).eval()
    pipe = _pipe(unet, DDIMScheduler())
    for kwargs in ({}, {"class_labels": [1, 2]}):
        with pytest.raises(ValueError, match=rf"`class_embed_type`='{class_embed_type}'.*not class indices"):
            pipe(num_inference_steps=2, **kwargs)


def test_scheduler_in_other_units_is_refused(tiny_multistage):
    with pytest.raises(ValueError, match="boundary_units='sigma'"):
        _pipe(tiny_multistage, EDMEulerScheduler())(num_inference_steps=2)


# ---------------------------------------------------------------------------------------------------------------
# class labels as a cross-attention context (the authors' class-conditional latent-diffusion models, `cin-mul*`)
def _class_context_pipe(tiny_cond_unet, num_class_embeds: int = 4):
    from diffusers_stages import ClassContextEmbedding, MultiStageUNet2DConditionModel

    unet = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=BOUNDARIES).eval()
    torch.manual_seed(1)
    embedder = ClassContextEmbedding(num_class_embeds=num_class_embeds, cross_attention_dim=32).eval()
    pipe = MultiStagePipeline(unet=unet, scheduler=DDIMScheduler(), class_embedder=embedder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_class_context_is_what_the_unet_attends_to_with_guidance(tiny_cond_unet):
    pipe = _class_context_pipe(tiny_cond_unet)  # 3 classes + the unconditional label 3
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor(700), torch.tensor([0, 2])
    with torch.no_grad():
        context = pipe.class_embedder(y)
        assert context.shape == (2, 1, 32) and torch.equal(context[1, 0], pipe.class_embedder.embedding.weight[2])
        assert torch.equal(pipe.denoise(2, x, t, y, 1.0), pipe.unet(x, t, context, stage_index=2).sample)
        uncond = pipe.unet(x, t, pipe.class_embedder(torch.tensor([3, 3])), stage_index=2).sample
        guided = pipe.denoise(2, x, t, y, 3.0)
    assert torch.allclose(guided, uncond + 3.0 * (pipe.unet(x, t, context, stage_index=2).sample - uncond), atol=1e-5)
    images = pipe(class_labels=[0, 2], guidance_scale=[1, 2, 3], num_inference_steps=3, generator=torch.manual_seed(0))
    assert len(images.images) == 2
    with pytest.raises(ValueError, match=r"`class_labels`.*\[0, 3\)"):
        pipe(class_labels=[3], num_inference_steps=2)  # the unconditional label is not a class
    with pytest.raises(ValueError, match="`class_labels` must be given"):
        pipe(num_inference_steps=2)


def test_class_context_pipeline_same_seed_same_images_after_save_and_reload(tiny_cond_unet, tmp_path):
    pipe = _class_context_pipe(tiny_cond_unet)
    kwargs = dict(class_labels=[1, 0], guidance_scale=2.0, num_inference_steps=3, output_type="pt")
    images = pipe(**kwargs, generator=torch.manual_seed(0)).images
    assert torch.equal(images, pipe(**kwargs, generator=torch.manual_seed(0)).images)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["class_embedder"] == ["diffusers_stages.models.class_context", "ClassContextEmbedding"]
    for loaded in (
        MultiStagePipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert type(loaded.class_embedder).__name__ == "ClassContextEmbedding"
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(loaded(**kwargs, generator=torch.manual_seed(0)).images, images)
    loaded.enable_stage_offload(device="cpu")  # one decoder resident at a time; the class embedder stays
    assert torch.equal(loaded(**kwargs, generator=torch.manual_seed(0)).images, images)


def test_class_context_pipeline_refuses_mismatched_components(tiny_cond_unet, tiny_multistage):
    from diffusers_stages import ClassContextEmbedding, MultiStageUNet2DConditionModel

    pipe = _class_context_pipe(tiny_cond_unet)
    with pytest.raises(ValueError, match="`class_embedder` must be given exactly when"):
        MultiStagePipeline(unet=pipe.unet, scheduler=DDIMScheduler())  # no context for the cross-attention U-Net
    with pytest.raises(ValueError, match="`class_embedder` must be given exactly when"):
        MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler(), class_embedder=pipe.class_embedder)
    labelled = MultiStageUNet2DConditionModel(
        **{k: v for k, v in pipe.unet.config.items() if not k.startswith("_")} | {"num_class_embeds": 4}
    )
    with pytest.raises(ValueError, match="`num_class_embeds`=4"):
        MultiStagePipeline(unet=labelled, scheduler=DDIMScheduler(), class_embedder=pipe.class_embedder)
    with pytest.raises(ValueError, match="width 16.*`cross_attention_dim`=32"):
        MultiStagePipeline(unet=pipe.unet, scheduler=DDIMScheduler(), class_embedder=ClassContextEmbedding(4, 16))
    # a torch.compile'd cross-attention U-Net is one too (it was refused as having no use for the class embedder)
    compiled = MultiStagePipeline(
        unet=torch.compile(pipe.unet), scheduler=DDIMScheduler(), class_embedder=pipe.class_embedder
    )
    assert compiled.unet._orig_mod is pipe.unet
    with pytest.raises(ValueError, match="`class_embedder` must be given exactly when"):
        MultiStagePipeline(unet=torch.compile(pipe.unet), scheduler=DDIMScheduler())


def test_a_unet_that_is_not_staged_is_refused_by_name(tiny_multistage, tiny_unet_kwargs, tmp_path):
    plain = UNet2DModel(**tiny_unet_kwargs)  # was accepted; sampling then failed on `unet.partition`
    with pytest.raises(ValueError, match="`unet` must be a MultiStageUNet2DModel.*got UNet2DModel.*from_unet"):
        MultiStagePipeline(unet=plain, scheduler=DDIMScheduler())
    _pipe(tiny_multistage, DDIMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`unet` must be .*got Linear"):  # a replacement component as well
        MultiStagePipeline.from_pretrained(tmp_path, unet=torch.nn.Linear(1, 1))
    compiled = MultiStagePipeline(unet=torch.compile(tiny_multistage), scheduler=DDIMScheduler())  # still accepted
    assert compiled.unet._orig_mod is tiny_multistage


def test_class_labels_left_out_say_which_labels_to_give(tiny_unet_kwargs):
    """`pipe(batch_size=16)` (examples/multistage/README.md's sampling lines) on a `--class_conditional` run said only
    that `class_labels` must be given, not which labels the model takes nor how to give them by name."""
    pipe = _pipe(MultiStageUNet2DModel(**tiny_unet_kwargs, num_class_embeds=4).eval(), DDIMScheduler())
    with pytest.raises(ValueError, match="`class_labels` must be given") as error:
        pipe(num_inference_steps=2)
    assert "one class index per image, 0 to 2" in str(error.value)
    pipe.register_class_names({0: "cat", 1: "dog", 2: "bird"})
    with pytest.raises(ValueError, match="`class_labels` must be given") as error:
        pipe(num_inference_steps=2)
    assert "pipe.get_label_ids([...]) of its names: bird, cat, dog" in str(error.value)
