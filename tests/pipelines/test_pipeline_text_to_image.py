"""Staged U-Nets inside diffusers' own text-to-image pipelines (issue 15): `StableDiffusionPipeline` and
`StableDiffusionXLPipeline` with a `MultiStageUNet2DConditionModel` or an `ExpertRoutingModel` as their ``unet``."""

import copy
import inspect

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor

from diffusers_stages import ExpertRoutingModel, MultiStageUNet2DConditionModel

# DDIM (ints), Euler and Heun (float timesteps; Heun calls the model twice per step), DPM++ (multistep history)
SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"]
BOUNDARIES = (350, 700)  # three stages; 3 steps of any of these schedulers visit at least two of them


def _images(pipe, steps: int = 3, **kwargs) -> np.ndarray:
    """The images of "a cat" (the prompt by name: `StableUnCLIPImg2ImgPipeline` takes an image first)."""
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"guidance_scale": 5.0, "output_type": "np", **kwargs}
    return pipe(prompt="a cat", num_inference_steps=steps, generator=torch.manual_seed(0), **kwargs).images


def _record_stages(model) -> list:
    """(timestep, stage) of every call: the stage read back from which decoder/expert ran."""
    calls = []
    parts = model.decoders if isinstance(model, MultiStageUNet2DConditionModel) else model.experts
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append([float(args[1]), None]), with_kwargs=True)
    for stage, part in enumerate(parts):
        part.register_forward_pre_hook(lambda m, args, stage=stage: calls[-1].__setitem__(1, stage))
    return calls


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_staged_unet_in_the_standard_pipeline_gives_the_source_images(
    tiny_sd_components, tiny_sdxl_components, sdxl, scheduler
):
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    components = tiny_sdxl_components if sdxl else tiny_sd_components
    pipe = pipeline_class(**dict(components, scheduler=getattr(diffusers, scheduler)()))
    source = _images(pipe)
    pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=BOUNDARIES)
    calls = _record_stages(pipe.unet)
    staged = _images(pipe)
    assert np.abs(staged - source).max() < 1e-5
    # every call went to the decoder of the stage its timestep lies in, and more than one stage was visited
    expected = pipe.unet.partition.stage_for_timestep(torch.tensor([t for t, _ in calls])).tolist()
    assert [stage for _, stage in calls] == expected and len(set(expected)) > 1


def test_fine_tuned_decoder_changes_only_its_stage(tiny_sd_components):
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    source = _images(pipe, output_type="latent")
    pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=(100, 200))  # DDIM: 666, 333, 0
    with torch.no_grad():
        pipe.unet.decoders[1].conv_out.bias.add_(1.0)  # a stage no step visits
    assert torch.equal(_images(pipe, output_type="latent"), source)
    with torch.no_grad():
        pipe.unet.decoders[0].conv_out.bias.add_(1.0)  # the last step's stage
    assert not torch.allclose(_images(pipe, output_type="latent"), source, atol=1e-3)


def test_saved_staged_pipeline_reloads_through_the_standard_classes(tiny_sd_components, tmp_path):
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=BOUNDARIES)
    with torch.no_grad():
        pipe.unet.decoders[1].conv_out.bias.add_(0.1)  # "fine-tuned": the decoders differ
    images = _images(pipe)
    pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.py")) and not list(tmp_path.rglob("*.bin"))

    # the documented one-liners: the standard class (diffusers_stages imported), and DiffusionPipeline
    for loaded in (
        StableDiffusionPipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True),
        StableDiffusionPipeline.from_pretrained(
            tmp_path, unet=MultiStageUNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
        ),
    ):
        assert type(loaded) is StableDiffusionPipeline and type(loaded.unet) is MultiStageUNet2DConditionModel
        assert loaded.unet.config.stage_boundaries == list(map(float, BOUNDARIES))
        np.testing.assert_array_equal(_images(loaded), images)


def test_from_pipe_needs_the_staged_unet_passed_as_the_readme_says(tiny_sd_components):
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=BOUNDARIES)
    with pytest.raises(ValueError, match="expected"):  # diffusers drops a unet that is not a UNet2DConditionModel
        diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    image = torch.rand(1, 3, 16, 16, generator=torch.manual_seed(1))
    for img2img in (
        diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe, unet=pipe.unet),
        diffusers.AutoPipelineForImage2Image.from_pipe(pipe),
    ):
        assert img2img.unet is pipe.unet
        assert _images(img2img, image=image, strength=0.7).shape == (1, 16, 16, 3)


@pytest.fixture
def two_experts(tiny_cond_unet):
    """``two_experts(sdxl)``: a low-noise and a wider high-noise expert (Wan 2.2 / SDXL base+refiner style)."""

    def build(sdxl: bool = False) -> ExpertRoutingModel:
        low_noise = tiny_cond_unet(3, sdxl=sdxl)
        high_noise = tiny_cond_unet(4, sdxl=sdxl, block_out_channels=(16, 32))
        return ExpertRoutingModel([low_noise, high_noise], stage_boundaries=(500,))

    return build


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_expert_routing_unet_runs_the_right_expert_at_each_step(
    tiny_sd_components, tiny_sdxl_components, two_experts, sdxl
):
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = pipeline_class(**(tiny_sdxl_components if sdxl else tiny_sd_components))
    pipe.unet = two_experts(sdxl)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.time_cond_proj_dim is None
    calls = []  # every call of the container: its inputs and output
    pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args, kwargs, out[0])), with_kwargs=True
    )
    _images(pipe, steps=4)

    stages = [int(pipe.unet.partition.stage_for_timestep(args[1].reshape(1))[0]) for args, _, _ in calls]
    assert stages == [1, 1, 0, 0]  # DDIM, 4 steps: 999, 749 (high noise), 499, 249 (low noise)
    for (args, kwargs, out), stage in zip(calls, stages):
        kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
        with torch.no_grad():
            right = pipe.unet.experts[stage](*args, **kwargs).sample
            wrong = pipe.unet.experts[1 - stage](*args, **kwargs).sample
        assert torch.equal(out, right) and not torch.allclose(out, wrong, atol=1e-4)


def test_expert_routing_unet_saves_and_reloads_with_the_standard_class(tiny_sd_components, two_experts, tmp_path):
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    pipe.unet = two_experts()
    images = _images(pipe)
    pipe.save_pretrained(tmp_path)
    names = sorted(p.name for p in (tmp_path / "unet").iterdir())
    assert names == ["config.json", "expert_0", "expert_1", "expert_routing.py"]  # the file: AutoModel's `auto_map`
    assert "import ExpertRoutingModel" in (tmp_path / "unet" / "expert_routing.py").read_text()  # one import line
    for loaded in (StableDiffusionPipeline.from_pretrained(tmp_path), DiffusionPipeline.from_pretrained(tmp_path)):
        assert type(loaded.unet) is ExpertRoutingModel
        assert [type(e).__name__ for e in loaded.unet.experts] == ["UNet2DConditionModel"] * 2
        np.testing.assert_array_equal(_images(loaded), images)


def test_positional_text_reaches_cross_attention_experts(two_experts):
    experts = two_experts()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([100, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        positional = experts(x, t, text).sample
        assert torch.equal(positional, experts(x, t, encoder_hidden_states=text).sample)
        assert torch.allclose(positional[1:], experts.experts[1](x[1:], t[1:], text[1:]).sample, atol=1e-6)


def test_experts_must_agree_on_what_the_pipeline_builds_once(tiny_cond_unet):
    with pytest.raises(ValueError, match="cross_attention_dim"):
        ExpertRoutingModel([tiny_cond_unet(0), tiny_cond_unet(1, cross_attention_dim=16)], stage_boundaries=(500,))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        sdxl = tiny_cond_unet(0, sdxl=True)
        refiner_like = tiny_cond_unet(1, sdxl=True, projection_class_embeddings_input_dim=5 * 8 + 32)
        ExpertRoutingModel([sdxl, refiner_like], stage_boundaries=(500,))


def test_fused_qkv_projections_of_an_expert_routing_unet_give_the_unfused_images(tiny_sd_components, two_experts):
    # the container's inherited AttentionMixin.fuse_qkv_projections fused nothing in the experts' `Attention` layers,
    # then the pipeline set fused processors on them: "'Attention' object has no attribute 'to_qkv'" at sampling
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    pipe.unet = two_experts()
    images = _images(pipe)
    pipe.fuse_qkv_projections()
    assert all(expert.original_attn_processors is not None for expert in pipe.unet.experts)
    np.testing.assert_allclose(_images(pipe), images, atol=1e-5)
    pipe.unfuse_qkv_projections()
    assert "FusedAttnProcessor2_0" not in {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    np.testing.assert_allclose(_images(pipe), images, atol=1e-5)


def test_a_staged_pipeline_saved_fused_reloads_as_a_plain_one_does(tiny_sd_components, tmp_path):
    # `fuse_qkv_projections` adds `to_qkv`/`to_kv` copies that `save_pretrained` writes; diffusers reloads such a
    # folder (the copies are ignored, rebuilt by the next fusion), the strict loading refused them as unexpected keys
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=BOUNDARIES)
    images = _images(pipe)
    pipe.fuse_qkv_projections(vae=False)
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    np.testing.assert_allclose(_images(loaded), images, atol=1e-5)
    loaded.fuse_qkv_projections(vae=False)
    np.testing.assert_allclose(_images(loaded), images, atol=1e-5)


def test_attention_slicing_of_an_expert_routing_unet_slices_every_expert(
    tiny_sd_components, two_experts, tiny_unet_kwargs
):
    # `pipe.enable_attention_slicing()` calls `set_attention_slice` on components that have it: the container had
    # none, so the experts' attention stayed unsliced without a word
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    pipe.unet = two_experts()
    images = _images(pipe)
    for slice_size in ("auto", "max", 1):
        pipe.enable_attention_slicing(slice_size)
        assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}
        np.testing.assert_allclose(_images(pipe), images, atol=1e-5)
    pipe.disable_attention_slicing()
    assert "SlicedAttnProcessor" not in {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    np.testing.assert_allclose(_images(pipe), images, atol=1e-5)

    # an expert that cannot slice (diffusers' UNet2DModel has no `set_attention_slice`) is left as it is, as
    # diffusers' pipelines leave such a component (`DDPMPipeline.enable_attention_slicing()` changes nothing)
    unconditional = ExpertRoutingModel(
        [diffusers.UNet2DModel(**tiny_unet_kwargs) for _ in range(2)], stage_boundaries=(500,)
    )
    processors = {name: type(p) for name, p in unconditional.attn_processors.items()}
    for slice_size in ("auto", None):
        unconditional.set_attention_slice(slice_size)
        assert {name: type(p) for name, p in unconditional.attn_processors.items()} == processors


def _image_to_image_case(name: str, sd: dict, sdxl: dict, tiny_cond_unet) -> tuple:
    """``(pipeline_class, components, call kwargs)`` of a standard pipeline other than text-to-image."""
    image = torch.rand(1, 3, 16, 16, generator=torch.manual_seed(1))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    if name == "img2img":  # strength < 1: the run starts mid-schedule
        return diffusers.StableDiffusionImg2ImgPipeline, sd, {"image": image, "strength": 0.6, "steps": 5}
    if name == "inpaint":  # a 9-channel U-Net (latents, mask, masked image)
        components = dict(sd, unet=tiny_cond_unet(0, in_channels=9))
        return diffusers.StableDiffusionInpaintPipeline, components, {"image": image, "mask_image": mask}
    if name == "controlnet":  # residuals of a trained (here: perturbed) ControlNet reach the encoder's skips
        controlnet = diffusers.ControlNetModel.from_unet(sd["unet"], conditioning_embedding_out_channels=(4, 8))
        with torch.no_grad():
            for parameter in controlnet.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.manual_seed(2)))
        return diffusers.StableDiffusionControlNetPipeline, dict(sd, controlnet=controlnet), {"image": image}
    if name == "t2i_adapter":  # `down_intrablock_additional_residuals` (were refused) reach the shared encoder
        # features of the tiny U-Net's shapes: 8 channels at 4x4 (after down block 0), 16 (inside down block 1)
        torch.manual_seed(2)
        adapter = diffusers.T2IAdapter(channels=[8, 16], downscale_factor=4, adapter_type="full_adapter_xl")
        return diffusers.StableDiffusionAdapterPipeline, dict(sd, adapter=adapter.eval()), {"image": image}
    if name == "lcm":  # `timestep_cond` from the guidance embedding (`time_cond_proj_dim`)
        components = dict(sd, unet=tiny_cond_unet(0, time_cond_proj_dim=8), scheduler=diffusers.LCMScheduler())
        return StableDiffusionPipeline, components, {"guidance_rescale": 0.7, "num_images_per_prompt": 2}
    if name == "sdxl_img2img":
        return diffusers.StableDiffusionXLImg2ImgPipeline, sdxl, {"image": image, "strength": 0.7}
    if name == "sdxl_inpaint":
        return diffusers.StableDiffusionXLInpaintPipeline, sdxl, {"image": image, "mask_image": mask, "strength": 0.8}
    if name == "sdxl_controlnet":
        controlnet = diffusers.ControlNetModel.from_unet(sdxl["unet"], conditioning_embedding_out_channels=(4, 8))
        return diffusers.StableDiffusionXLControlNetPipeline, dict(sdxl, controlnet=controlnet), {"image": image}
    if (
        name == "sdxl_refiner_aesthetics"
    ):  # a real refiner's layout: text_encoder_2 alone, 5 time ids (aesthetic score)
        unet = tiny_cond_unet(0, sdxl=True, cross_attention_dim=32, projection_class_embeddings_input_dim=5 * 8 + 32)
        components = dict(sdxl, unet=unet, text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
        kwargs = {"image": image, "strength": 0.7, "aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}
        return diffusers.StableDiffusionXLImg2ImgPipeline, components, kwargs
    if name == "upscale":  # `class_labels`: the noise level of the low-resolution image (x4 upscaler's layout)
        components = {k: v for k, v in sd.items() if k != "requires_safety_checker"}
        components.update(
            unet=tiny_cond_unet(0, in_channels=7, num_class_embeds=100),
            low_res_scheduler=diffusers.DDPMScheduler(),
            scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
            max_noise_level=99,
        )
        low_res = torch.rand(1, 3, 8, 8, generator=torch.manual_seed(3)) * 2 - 1
        return diffusers.StableDiffusionUpscalePipeline, components, {"image": low_res, "noise_level": 20}
    if name == "pix2pix":  # an 8-channel U-Net; guidance triples the batch
        components = dict(sd, unet=tiny_cond_unet(0, in_channels=8))
        return diffusers.StableDiffusionInstructPix2PixPipeline, components, {"image": image}
    if name == "depth2img":  # a 5-channel U-Net; the depth map given (no depth estimator)
        components = {k: v for k, v in sd.items() if k not in ("safety_checker", "requires_safety_checker")}
        components.update(unet=tiny_cond_unet(0, in_channels=5), depth_estimator=None)
        kwargs = {"image": image, "depth_map": torch.rand(1, 16, 16, generator=torch.manual_seed(3))}
        return diffusers.StableDiffusionDepth2ImgPipeline, components, kwargs
    if name == "pag":  # perturbed-attention guidance on the middle block (the shared encoder's) and the up path
        return diffusers.StableDiffusionPAGPipeline, dict(sd, pag_applied_layers=["mid", "up"]), {"pag_scale": 1.0}
    if name == "sag":  # self-attention guidance reads the middle block's attention maps
        return diffusers.StableDiffusionSAGPipeline, sd, {"sag_scale": 0.75}
    if name == "unclip":  # `class_embed_type="projection"`: the noised image embedding as `class_labels`
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, patch_size=4)
        torch.manual_seed(5)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision, image_size=32, projection_dim=16))
        components = {k: v for k, v in sd.items() if k not in ("safety_checker", "requires_safety_checker")}
        components.update(
            image_encoder=image_encoder.eval(),
            image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=16),
            image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
            unet=tiny_cond_unet(0, class_embed_type="projection", projection_class_embeddings_input_dim=2 * 16),
        )
        image_embeds = torch.randn(1, 16, generator=torch.manual_seed(4))
        kwargs = {"image_embeds": image_embeds, "noise_level": 10, "height": 16, "width": 16}
        return diffusers.StableUnCLIPImg2ImgPipeline, components, kwargs
    if name == "panorama":  # windows of the latent denoised one by one
        return diffusers.StableDiffusionPanoramaPipeline, sd, {"height": 16, "width": 32}
    # an SDXL refiner run: the second half of the schedule only
    components = dict(sdxl, requires_aesthetics_score=False)
    return diffusers.StableDiffusionXLImg2ImgPipeline, components, {"image": image, "denoising_start": 0.5, "steps": 4}


OTHER_PIPELINES = [
    "img2img",
    "inpaint",
    "controlnet",
    "t2i_adapter",
    "lcm",
    "sdxl_refiner",
    "sdxl_img2img",
    "sdxl_inpaint",
    "sdxl_controlnet",
    "sdxl_refiner_aesthetics",
    "upscale",
    "pix2pix",
    "depth2img",
    "pag",
    "sag",
    "panorama",
    "unclip",
]


@pytest.mark.parametrize("name", OTHER_PIPELINES)
def test_staged_unet_in_other_standard_pipelines_gives_the_source_images(
    tiny_sd_components, tiny_sdxl_components, tiny_cond_unet, name
):
    pipeline_class, components, kwargs = _image_to_image_case(
        name, tiny_sd_components, tiny_sdxl_components, tiny_cond_unet
    )
    pipe = pipeline_class(**components)
    source = _images(pipe, **kwargs)
    pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=BOUNDARIES)
    calls = _record_stages(pipe.unet)
    np.testing.assert_allclose(_images(pipe, **kwargs), source, atol=1e-5)
    # from its first step on, every call went to the decoder of its timestep's stage
    expected = pipe.unet.partition.stage_for_timestep(torch.tensor([t for t, _ in calls])).tolist()
    assert calls and [stage for _, stage in calls] == expected


def _with_option(pipe, option: str) -> dict:
    """Turn ``option`` on in ``pipe``; returns the call's extra keyword arguments."""
    if option == "freeu":
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    elif option == "fused_qkv":
        pipe.fuse_qkv_projections()
    elif option == "attn_processor":
        pipe.unet.set_attn_processor(AttnProcessor())
    elif option == "vae_slicing":  # (diffusers 0.42's pipelines dropped `enable_vae_slicing`: the VAE's own switch)
        pipe.vae.enable_slicing()
        return {"num_images_per_prompt": 2}
    elif option == "callback_on_step_end" and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:

        def damp(pipe, i, t, callback_kwargs):
            return {"latents": callback_kwargs["latents"] * 0.9}

        return {"callback_on_step_end": damp, "callback_on_step_end_tensor_inputs": ["latents"]}
    elif option == "callback_on_step_end":  # the upscaler's legacy per-step callback
        return {"callback": lambda i, t, latents: latents.mul_(0.9)}
    return {}


OPTIONS = ["freeu", "fused_qkv", "attn_processor", "vae_slicing", "callback_on_step_end"]


@pytest.mark.parametrize(
    "name", ["img2img", "inpaint", "controlnet", "sdxl_img2img", "sdxl_refiner_aesthetics", "upscale"]
)
def test_pipeline_options_give_the_source_images_and_tailored_decoders_run(
    tiny_sd_components, tiny_sdxl_components, tiny_cond_unet, name
):
    pipeline_class, components, kwargs = _image_to_image_case(
        name, tiny_sd_components, tiny_sdxl_components, tiny_cond_unet
    )
    source = components["unet"]
    staged = MultiStageUNet2DConditionModel.from_unet(copy.deepcopy(source), stage_boundaries=BOUNDARIES)
    plain_images = _images(pipeline_class(**components), **kwargs)
    for option in OPTIONS:
        images = []
        for unet in (source, staged):
            pipe = pipeline_class(**dict(components, unet=copy.deepcopy(unet)))
            images.append(_images(pipe, **kwargs, **_with_option(pipe, option)))
        np.testing.assert_allclose(images[1], images[0], atol=1e-5, err_msg=option)
        if option != "vae_slicing":  # the option changed something (FreeU, the callback) or nothing (the others)
            assert option in ("attn_processor", "fused_qkv") or not np.allclose(images[0], plain_images, atol=1e-4)

    # decoders of other widths than the encoder's (a fine-tuned, tailored model) run under the same options
    torch.manual_seed(0)
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    tailored = MultiStageUNet2DConditionModel(
        **config, stage_boundaries=BOUNDARIES, decoder_block_out_channels=((16, 32), (8, 16), (4, 8))
    ).eval()
    pipe = pipeline_class(**dict(components, unet=tailored))
    calls = _record_stages(pipe.unet)
    images = _images(pipe, **{**kwargs, "steps": 6})  # (6 steps: a strength-0.7 run visits two stages)
    assert images.shape == plain_images.shape and np.isfinite(images).all()
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    pipe.fuse_qkv_projections()
    assert np.isfinite(_images(pipe, **kwargs)).all()
    assert len({stage for _, stage in calls}) > 1  # more than one decoder ran


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_controlnet_from_a_staged_unet_copies_the_shared_encoder(tiny_cond_unet, sdxl):
    # `ControlNetModel.from_unet(pipe.unet)` after the conversion: the encoder is what diffusers copies from a U-Net
    source = tiny_cond_unet(0, sdxl=sdxl)
    staged = MultiStageUNet2DConditionModel.from_unet(source, stage_boundaries=BOUNDARIES)
    from_source = diffusers.ControlNetModel.from_unet(source).state_dict()
    from_staged = diffusers.ControlNetModel.from_unet(staged).state_dict()
    copied = [name for name in from_source if not name.startswith("controlnet_")]  # the rest: new layers
    assert copied and all(torch.equal(from_source[name], from_staged[name]) for name in copied)
