import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline
from tests.conftest import SCHEDULERS

BOUNDARIES = (300, 600)
SIGMA_BOUNDARIES = (2.5103, 7.6577)


def _scheduler(scheduler_class):
    # flow-matching schedulers expect a velocity; every other scheduler here is built for epsilon
    return scheduler_class()


def _prediction(scheduler_class) -> str:
    return "flow_prediction" if scheduler_class is FlowMatchEulerDiscreteScheduler else "epsilon"


def _pipe(experts, scheduler, vae=None):
    pipe = ExpertRoutingPipeline(experts=experts, scheduler=scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edm(scheduler_class) -> bool:
    return scheduler_class is EDMEulerScheduler


def _routing(experts, scheduler_class, **kwargs):
    edm = _edm(scheduler_class)
    return ExpertRoutingModel(
        experts,
        stage_boundaries=SIGMA_BOUNDARIES if edm else BOUNDARIES,
        boundary_units="sigma" if edm else "timestep",
        prediction_type=_prediction(scheduler_class),
        **kwargs,
    )


@pytest.fixture
def base_unet(tiny_unet_kwargs):
    torch.manual_seed(0)
    return UNet2DModel(**tiny_unet_kwargs).eval()


@pytest.fixture
def different_experts(tiny_unet_kwargs):
    """Three experts of different widths, clean end widest (as in MEME's size ordering)."""
    experts = []
    for seed, widths in ((0, (16, 24)), (1, (8, 16)), (2, (4, 8))):
        torch.manual_seed(seed)
        experts.append(UNet2DModel(**{**tiny_unet_kwargs, "block_out_channels": widths}).eval())
    return experts


def _record_calls(pipe):
    """Record (timestep, expert, first-order?) of every model call with forward pre-hooks on the experts."""
    calls = []
    for i, expert in enumerate(pipe.experts.experts):

        def hook(module, args, i=i):
            first_order = getattr(pipe.scheduler, "state_in_first_order", True)
            calls.append((float(torch.as_tensor(args[1]).reshape(-1)[0]), i, first_order))

        expert.register_forward_pre_hook(hook)
    return calls


def _expected_expert(timestep: float, edm: bool) -> int:
    if edm:
        return sum(math.exp(4 * timestep) >= b for b in SIGMA_BOUNDARIES)
    return sum(timestep >= b for b in BOUNDARIES)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__)
def test_identical_experts_reproduce_a_single_model_run_and_each_call_goes_to_its_expert(
    base_unet, different_experts, scheduler_class
):
    # 1. three copies of one network give exactly what the network alone gives, with the same seed and scheduler
    single = _pipe(
        ExpertRoutingModel(
            [base_unet],
            stage_boundaries=(),
            prediction_type=_prediction(scheduler_class),
            **({"boundary_units": "sigma"} if _edm(scheduler_class) else {}),
        ),
        _scheduler(scheduler_class),
    )
    copies = _pipe(
        _routing([base_unet, copy.deepcopy(base_unet), copy.deepcopy(base_unet)], scheduler_class),
        _scheduler(scheduler_class),
    )
    run = {"batch_size": 1, "num_inference_steps": 5, "generator": None, "output_type": "np"}
    expected = single(**{**run, "generator": torch.manual_seed(0)}).images
    assert np.array_equal(copies(**{**run, "generator": torch.manual_seed(0)}).images, expected)

    # 2. different experts: every call goes to the expert of its noise level; a corrector stays with its predictor
    pipe = _pipe(_routing(different_experts, scheduler_class), _scheduler(scheduler_class))
    calls = _record_calls(pipe)
    images = pipe(**{**run, "generator": torch.manual_seed(0)}).images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()
    for i, (t, expert, first_order) in enumerate(calls):
        if first_order:
            assert expert == _expected_expert(t, _edm(scheduler_class)), f"call {i} at t={t} went to expert {expert}"
        else:
            assert expert == calls[i - 1][1]
    assert {e for _, e, _ in calls} == {0, 1, 2}
    # the dry run shows the same switch before sampling
    assert [(t, e) for t, e, _ in calls] == pipe.expert_schedule(5)


def test_matches_diffusers_own_ddim_pipeline(base_unet):
    pipe = _pipe(ExpertRoutingModel([base_unet, copy.deepcopy(base_unet)], stage_boundaries=(500,)), DDIMScheduler())
    ours = pipe(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(1), output_type="np").images
    reference = DDIMPipeline(unet=base_unet, scheduler=DDIMScheduler())
    reference.set_progress_bar_config(disable=True)
    theirs = reference(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(1), output_type="np").images
    assert np.array_equal(ours, theirs)


def test_same_seed_same_images_after_save_and_reload(different_experts, tmp_path):
    pipe = _pipe(_routing(different_experts, EulerAncestralDiscreteScheduler), EulerAncestralDiscreteScheduler())
    run = {"batch_size": 2, "num_inference_steps": 4, "output_type": "np"}
    first = pipe(generator=torch.manual_seed(3), **run).images
    assert np.array_equal(first, pipe(generator=torch.manual_seed(3), **run).images)
    assert not np.allclose(first, pipe(generator=torch.manual_seed(4), **run).images)

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["experts"] == ["diffusers_stages.models.expert_routing", "ExpertRoutingModel"]
    assert (tmp_path / "experts" / "diffusers_stages.models.expert_routing.py").exists()
    assert (tmp_path / "experts" / "expert_2" / "diffusion_pytorch_model.safetensors").exists()
    for loaded in (
        ExpertRoutingPipeline.from_pretrained(tmp_path, disable_mmap=True),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True, disable_mmap=True),
        ExpertRoutingPipeline.from_pretrained(tmp_path),  # memory-mapped weights: equal up to float rounding
    ):
        assert type(loaded) is ExpertRoutingPipeline and type(loaded.experts) is ExpertRoutingModel
        loaded.set_progress_bar_config(disable=True)
        again = loaded(generator=torch.manual_seed(3), **run).images
        assert np.allclose(first, again, atol=1e-5)
        if loaded.experts.experts[0].conv_in.weight.data_ptr() % 64 == 0:
            assert np.array_equal(first, again)


def test_a_pipeline_with_only_some_experts_loaded_names_the_missing_one(different_experts, tmp_path):
    _pipe(_routing(different_experts, DDIMScheduler), DDIMScheduler()).save_pretrained(tmp_path)
    noisy_only = ExpertRoutingModel.from_pretrained(tmp_path / "experts", load_experts=[1, 2])
    pipe = ExpertRoutingPipeline.from_pretrained(tmp_path, experts=noisy_only)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"Expert 0 .*load_experts"):
        pipe(num_inference_steps=4, generator=torch.manual_seed(0))


def test_a_pipeline_with_no_expert_loaded_says_so(different_experts, tmp_path):
    # was a bare StopIteration from the pipeline's device lookup
    _pipe(_routing(different_experts, DDIMScheduler), DDIMScheduler()).save_pretrained(tmp_path)
    none = ExpertRoutingModel.from_pretrained(tmp_path / "experts", load_experts=[])
    pipe = ExpertRoutingPipeline.from_pretrained(tmp_path, experts=none)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"no expert is loaded.*load_experts"):
        pipe(num_inference_steps=2, generator=torch.manual_seed(0))


def test_class_names_load_with_only_some_experts(tiny_unet_kwargs, tmp_path):
    # the class names were checked against expert 0's classes: a pipeline saved with `id2label` could not be loaded
    # with only the experts a run needs (the documented `load_experts` use), "Expert 0 ... is not loaded"
    experts = [UNet2DModel(**tiny_unet_kwargs, num_class_embeds=4).eval() for _ in range(3)]
    pipe = ExpertRoutingPipeline(_routing(experts, DDIMScheduler), DDIMScheduler(), id2label={0: "cat", 2: "dog"})
    pipe.save_pretrained(tmp_path)
    noisy_only = ExpertRoutingModel.from_pretrained(tmp_path / "experts", load_experts=[1, 2])
    loaded = ExpertRoutingPipeline.from_pretrained(tmp_path, experts=noisy_only)
    assert loaded.get_label_ids(["dog", "cat"]) == [2, 0]
    with pytest.raises(ValueError, match=r"`id2label` keys must be class indices in \[0, 3\) .*got 3"):
        ExpertRoutingPipeline(noisy_only, DDIMScheduler(), id2label={3: "null"})


def test_prediction_type_mismatch_is_refused(different_experts):
    experts = _routing(different_experts, DDIMScheduler)
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*predict 'epsilon'"):
        ExpertRoutingPipeline(experts=experts, scheduler=DDIMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="flow_prediction"):
        ExpertRoutingPipeline(experts=experts, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe = _pipe(experts, DDIMScheduler())
    pipe.scheduler = DPMSolverMultistepScheduler(prediction_type="sample")  # swapped in after construction
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        pipe(num_inference_steps=2)


def test_a_prediction_type_mismatch_with_flow_matching_says_which_scheduler_fits(different_experts):
    # was: "build the scheduler with `prediction_type='epsilon'`", which FlowMatchEulerDiscreteScheduler does not take
    # (a TypeError), and `prediction_type='flow_prediction'` for DDIM, whose step refuses it
    epsilon = _routing(different_experts, DDIMScheduler)
    with pytest.raises(ValueError, match=r"takes no `prediction_type`.*DDIMScheduler\(prediction_type='epsilon'\)"):
        ExpertRoutingPipeline(experts=epsilon, scheduler=FlowMatchEulerDiscreteScheduler())
    flow = _routing(different_experts, FlowMatchEulerDiscreteScheduler)
    with pytest.raises(ValueError, match="predict 'flow_prediction': use a flow-matching scheduler"):
        ExpertRoutingPipeline(experts=flow, scheduler=DDIMScheduler())


def test_per_expert_guidance_scale(tiny_unet_kwargs):
    experts = []
    for seed in range(3):
        torch.manual_seed(seed)
        experts.append(UNet2DModel(**tiny_unet_kwargs, num_class_embeds=4).eval())
    pipe = _pipe(_routing(experts, DDIMScheduler), DDIMScheduler())
    run = {"class_labels": [0, 2], "num_inference_steps": 4, "output_type": "pt"}
    plain = pipe(generator=torch.manual_seed(0), **run).images
    assert torch.equal(pipe(generator=torch.manual_seed(0), guidance_scale=[1.0, 1.0, 1.0], **run).images, plain)
    guided_noisy = pipe(generator=torch.manual_seed(0), guidance_scale=[1.0, 1.0, 4.0], **run).images
    guided_clean = pipe(generator=torch.manual_seed(0), guidance_scale=[4.0, 1.0, 1.0], **run).images
    assert not torch.allclose(guided_noisy, plain) and not torch.allclose(guided_clean, guided_noisy)
    with pytest.raises(ValueError, match="one per stage"):
        pipe(generator=torch.manual_seed(0), guidance_scale=[2.0, 2.0], **run)


def _dit_experts() -> list[DiTTransformer2DModel]:
    """Two DiTs of different depths predicting (epsilon, variance) as DiT does: 6 output channels for 3 input ones,
    10 classes (the unconditional label is 10)."""
    experts = []
    for depth in (1, 2):
        torch.manual_seed(depth)
        experts.append(
            DiTTransformer2DModel(
                num_attention_heads=2,
                attention_head_dim=4,
                in_channels=3,
                out_channels=6,
                num_layers=depth,
                sample_size=8,
                patch_size=2,
                num_embeds_ada_norm=10,
            ).eval()
        )
    return experts


def test_dit_experts_sample_with_their_own_null_label_and_learned_variance(tmp_path):
    experts = _dit_experts()
    pipe = _pipe(ExpertRoutingModel(experts, stage_boundaries=(500,)), DDIMScheduler())
    labels_seen = []
    for expert in experts:
        expert.register_forward_pre_hook(
            lambda module, args, kwargs: labels_seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
        )
    run = {"class_labels": [1, 9], "num_inference_steps": 3, "output_type": "np", "guidance_scale": 2.0}
    images = pipe(generator=torch.manual_seed(0), **run).images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    assert labels_seen[0] == [1, 9, 10, 10]  # guidance pairs each label with DiT's unconditional label, 10
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        pipe(class_labels=[10], num_inference_steps=2)
    pipe.save_pretrained(tmp_path)
    reloaded = ExpertRoutingPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert (reloaded(generator=torch.manual_seed(0), **run).images == images).all()


def test_guidance_leaves_a_learned_variance_the_conditional_one_as_dit_does():
    """With a scheduler that reads DiT's learned variance, guidance extrapolates only the epsilon half: the variance
    half is the conditional prediction's, as DiT's sampler (and diffusers' DiTPipeline) takes it. Extrapolating it
    too would push DiT's interpolation fraction out of [-1, 1], outside the scheduler's variance range."""
    from diffusers import DDPMScheduler

    experts = _dit_experts()
    pipe = _pipe(ExpertRoutingModel(experts, stage_boundaries=(500,)), DDPMScheduler(variance_type="learned_range"))
    x, labels, scale = torch.randn(2, 3, 8, 8), torch.tensor([1, 9]), 4.0
    with torch.no_grad():
        guided = pipe.denoise(1, x, torch.tensor([700, 700]), labels, scale)
        both = experts[1](torch.cat([x, x]), torch.tensor([700] * 4), class_labels=torch.tensor([1, 9, 10, 10])).sample
    cond, uncond = both.chunk(2)
    assert torch.allclose(guided[:, :3], uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(guided[:, 3:], cond[:, 3:], atol=1e-6)
    images = pipe(class_labels=[1, 9], guidance_scale=scale, num_inference_steps=3, output_type="np").images
    assert np.isfinite(images).all()


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_a_dit_samples_the_images_of_diffusers_dit_pipeline(scheduler_class):
    """One DiT expert (and a dual backbone of it) samples, guided and not, the images of diffusers' `DiTPipeline` for
    the same seed, labels and VAE: its null label (DiTPipeline's 1000, `num_embeds_ada_norm`), its one-timestep-per-
    sample call, the mean half of its learned-variance output, and its latent decoding."""
    from diffusers import AutoencoderKL, DiTPipeline

    from diffusers_stages import DualBackbonePipeline

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000).eval()  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=8).eval()  # fmt: skip
    names = {0: "tench, Tinca tinca", 1: "goldfish"}
    reference = DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler_class(), id2label=names)
    routed = ExpertRoutingPipeline(experts=ExpertRoutingModel([dit], stage_boundaries=()), scheduler=scheduler_class(),
                                   vae=vae, id2label=names)  # fmt: skip
    dual = DualBackbonePipeline(shallow=dit, deep=dit, scheduler=scheduler_class(), vae=vae, id2label=names)
    for pipe in (reference, routed, dual):
        pipe.set_progress_bar_config(disable=True)
    assert routed.get_label_ids(["goldfish", "tench"]) == reference.get_label_ids(["goldfish", "tench"]) == [1, 0]
    for scale in (1.0, 4.0):
        run = {"class_labels": [1, 0, 999], "guidance_scale": scale, "num_inference_steps": 3, "output_type": "np"}
        expected = reference(generator=torch.manual_seed(0), **run).images
        for pipe in (routed, dual):
            np.testing.assert_allclose(pipe(generator=torch.manual_seed(0), **run).images, expected, atol=1e-5)


def test_latent_experts_decode_through_the_vae(tiny_unet_kwargs):
    from diffusers import AutoencoderKL

    experts = []
    for seed in range(2):
        torch.manual_seed(seed)
        experts.append(UNet2DModel(**{**tiny_unet_kwargs, "in_channels": 4, "out_channels": 4, "sample_size": 4}))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    pipe = _pipe(ExpertRoutingModel(experts, stage_boundaries=(500,)), DDIMScheduler(), vae)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_a_compiled_container_is_refused_naming_the_call_that_compiles_the_experts(different_experts, how):
    # the pipeline calls each expert directly, never the container's forward: a compiled container compiled nothing
    pipe = _pipe(_routing(different_experts, DDIMScheduler), DDIMScheduler())
    if how == "torch.compile":
        pipe.experts = torch.compile(pipe.experts, backend="eager")
    else:
        pipe.experts.compile(backend="eager")
    with pytest.raises(ValueError, match=r"`experts`.*compile_stages"):
        pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0))
    with pytest.raises(ValueError, match=r"`experts`.*compile_stages"):
        ExpertRoutingPipeline(experts=pipe.experts, scheduler=DDIMScheduler())


def test_compiled_experts_sample_the_same_images(different_experts):
    pipe = _pipe(_routing(different_experts, DDIMScheduler), DDIMScheduler())
    expected = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    pipe.experts.compile_stages(backend="eager")
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(images, expected)


def test_exit_profile_of_a_class_conditional_model_takes_its_labels_and_guidance():
    # `record_exit_profile` took no `class_labels`: a class-conditional early-exit model (the training scripts' `--backbone
    # early_exit --class_conditional`) failed with "`class_labels` must be given", an argument it could not be given
    from diffusers_stages.models import EarlyExitUViT2DModel
    from diffusers_stages.pipelines import record_exit_profile

    torch.manual_seed(0)
    model = EarlyExitUViT2DModel(
        sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2, num_class_embeds=4
    )
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    profile = record_exit_profile(
        model, DDIMScheduler(), num_inference_steps=2, exit_threshold=1.0, class_labels=[0, 2]
    )
    assert [t for t, _ in profile] == [500.0, 0.0] and seen == [[0, 2], [0, 2]]
    seen.clear()
    record_exit_profile(model, DDIMScheduler(), num_inference_steps=2, class_labels=[1], guidance_scale=2.0)
    assert seen == [[1, 3], [1, 3]]  # the label and the unconditional one (the last embedding), as the pipelines guide


def test_a_legacy_transformer2d_dit_expert_samples_the_images_of_its_dit_twin():
    # diffusers' legacy `Transformer2DModel` takes `encoder_hidden_states` second: the loop gave it the timestep there
    # and failed inside its time embedding; with the timestep named it samples as the same weights in the DiT class
    from diffusers import Transformer2DModel

    experts = _dit_experts()
    legacy = []
    for expert in experts:
        config = {k: v for k, v in expert.config.items() if not k.startswith("_")}
        twin = Transformer2DModel(**{**config, "norm_type": "ada_norm_zero"}).eval()
        twin.load_state_dict(expert.state_dict())
        legacy.append(twin)
    run = {"class_labels": [1, 9], "num_inference_steps": 3, "output_type": "np", "guidance_scale": 2.0}
    images = [
        _pipe(ExpertRoutingModel(e, stage_boundaries=(500,)), DDIMScheduler())(generator=torch.manual_seed(0), **run)
        for e in (experts, legacy)
    ]
    assert np.array_equal(images[0].images, images[1].images)
