"""The call checks shared by every pipeline (`StagedDiffusionPipeline.__call__`): nothing wrong passes silently."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, UNet2DModel, VQModel

from diffusers_stages import (
    DualBackbonePipeline,
    ExpertRoutingModel,
    ExpertRoutingPipeline,
    MultiStagePipeline,
    MultiStageUNet2DModel,
)
from tests.conftest import TINY_UNET

from .conftest import KINDS, tiny_pipeline

RUN = {"num_inference_steps": 2, "output_type": "pt"}


def _pipeline(kind: str, num_class_embeds: int | None = None):
    """A tiny pipeline of each kind (3 classes + the null label when ``num_class_embeds=4``)."""
    return tiny_pipeline(kind, num_class_embeds=num_class_embeds, switch_timestep=500)


@pytest.fixture(scope="module", params=KINDS)
def unconditional(request):
    return _pipeline(request.param)


@pytest.fixture(scope="module", params=KINDS)
def conditional(request):
    return _pipeline(request.param, num_class_embeds=4)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_scale_is_refused(conditional, scale):
    with pytest.raises(ValueError, match=f"`guidance_scale` must be finite, got {scale}"):
        conditional(class_labels=[0, 1], guidance_scale=scale, **RUN)
    per_stage = [2.0] * conditional.partition.num_stages
    per_stage[-1] = scale
    with pytest.raises(ValueError, match="`guidance_scale` must be finite, got \\[2.0, .*" + str(scale)):
        conditional(class_labels=[0, 1], guidance_scale=per_stage, **RUN)


@pytest.mark.parametrize("scale", [True, "2", None, [2.0, True]])
def test_guidance_scale_that_is_not_a_number_is_refused(conditional, scale):
    with pytest.raises(ValueError, match="`guidance_scale` must be a number >= 1 or one per stage"):
        conditional(class_labels=[0, 1], guidance_scale=scale, **RUN)


def test_guidance_on_an_unconditional_model_is_refused(unconditional):
    with pytest.raises(ValueError, match="`guidance_scale`=3.0 needs a class-conditional model"):
        unconditional(guidance_scale=3.0, **RUN)
    per_stage = [1.0] * unconditional.partition.num_stages
    per_stage[0] = 2.0
    with pytest.raises(ValueError, match="`guidance_scale`=\\[2.0, 1.0.*needs a class-conditional model"):
        unconditional(guidance_scale=per_stage, **RUN)
    # 1 (no guidance), also per stage, also as a tensor, still samples
    ones = torch.ones(unconditional.partition.num_stages)
    images = unconditional(guidance_scale=ones, generator=torch.manual_seed(0), **RUN).images
    assert torch.equal(images, unconditional(generator=torch.manual_seed(0), **RUN).images)


@pytest.mark.parametrize("count", [1, 3])
def test_generator_list_must_have_one_generator_per_image(unconditional, conditional, count):
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    with pytest.raises(ValueError, match=f"`generator` is a list of {count} generators, but the batch has 2 images"):
        unconditional(batch_size=2, generator=generators, **RUN)
    with pytest.raises(ValueError, match=f"`generator` is a list of {count} generators, but the batch has 2 images"):
        conditional(class_labels=[0, 1], generator=generators, **RUN)  # the batch size the labels give


@pytest.mark.parametrize("generator", [3, [torch.Generator(), 3], "0"])
def test_a_generator_of_another_type_is_refused(unconditional, generator):
    # named, not an AttributeError inside `randn_tensor`
    with pytest.raises(ValueError, match="`generator` must be a torch.Generator or a list of them"):
        unconditional(batch_size=2, generator=generator, **RUN)


def test_one_generator_per_image_samples_each_image_from_its_own_seed(unconditional):
    pair = unconditional(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **RUN).images
    alone = unconditional(batch_size=1, generator=[torch.Generator().manual_seed(6)], **RUN).images
    assert torch.allclose(pair[1:], alone, atol=1e-6)


@pytest.mark.parametrize(
    "labels, match",
    [
        ([1.7, 0], "`class_labels` must be integers \\(class indices\\), got \\[1.7, 0\\]"),
        ([True, 0], "`class_labels` must be integers \\(class indices\\), got \\[True, 0\\]"),
        (
            torch.tensor([1.0, 0.0]),
            "`class_labels` must be integers, got a tensor of dtype torch.float32: \\[1.0, 0.0\\]",
        ),
        (
            torch.tensor([True, False]),
            "`class_labels` must be integers, got a tensor of dtype torch.bool: \\[True, False\\]",
        ),
        (np.array([1.5]), "`class_labels` must be integers, got a tensor of dtype torch.float64: \\[1.5\\]"),
        (
            torch.arange(20.0),
            r"got a tensor of dtype torch.float32: \[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, \.\.\.\]",
        ),
        ("1", "`class_labels` must be integers"),
    ],
)
def test_class_labels_must_be_integers(conditional, labels, match):
    with pytest.raises(ValueError, match=match):
        conditional(class_labels=labels, **RUN)


def test_integer_class_labels_of_every_accepted_form_agree(conditional):
    images = [
        conditional(class_labels=labels, generator=torch.manual_seed(0), **RUN).images
        for labels in ([2, 0], (2, 0), torch.tensor([2, 0]), np.array([2, 0], dtype=np.int32), [np.int64(2), 0])
    ]
    assert all(torch.equal(images[0], other) for other in images[1:])


@pytest.mark.parametrize("name", ["num_inference_steps", "batch_size"])
@pytest.mark.parametrize("value", [True, False, 2.0])
def test_integer_arguments_refuse_bools_and_floats(unconditional, name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a positive integer, got {value}"):
        unconditional(**{**RUN, name: value})


@pytest.mark.parametrize("labels", [[1, 2], (1,), torch.tensor([1, 2]), np.array([0, 2])], ids=repr)
def test_class_labels_given_first_as_in_dit_pipeline_are_named(conditional, labels):
    # DiTPipeline's first argument is `class_labels`; here it is `batch_size` (DDPMPipeline's), and `pipe([1, 2])`
    # said only "`batch_size` must be a positive integer"
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, got .*class labels go in "
                       r"`class_labels=` \(DiTPipeline's first argument is `batch_size` here\)"):  # fmt: skip
        conditional(labels, **RUN)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # the callback's return value: diffusers' loop raised AttributeError on None, and took another batch size
        ({"callback_on_step_end": lambda *a: None}, "`callback_on_step_end` must return a dict .*got None"),
        (
            {"callback_on_step_end": lambda p, i, t, kw: {"latents": torch.zeros(3, *kw["latents"].shape[1:])}},
            r"returned 'latents' that are not a floating-point tensor of shape \(2, 3, 8, 8\): got shape \(3, 3, 8, 8\)",
        ),
        ({"callback_on_step_end": lambda *a: {"latents": None}}, "returned 'latents' .*got None"),
        (
            {"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": "latents"},
            r"`callback_on_step_end_tensor_inputs` must be a list of names, got the string 'latents': pass \['latents'\]",
        ),
        ({"scheduler_step_kwargs": [1]}, r"`scheduler_step_kwargs` must be a dict of .*got \[1\]"),  # AttributeError
    ],
)
def test_bad_callbacks_generators_and_step_kwargs_name_the_argument(unconditional, kwargs, message):
    with pytest.raises(ValueError, match=message):
        unconditional(batch_size=2, **RUN, **kwargs)


def test_callback_tensor_inputs_none_is_the_default_and_a_non_list_is_named(unconditional):
    # None (which diffusers' checks let through) was a TypeError, even without a callback
    reference = unconditional(generator=torch.manual_seed(0), **RUN).images
    assert torch.equal(
        unconditional(callback_on_step_end_tensor_inputs=None, generator=torch.manual_seed(0), **RUN).images, reference
    )
    seen = []
    unconditional(
        callback_on_step_end=lambda p, i, t, kw: seen.append(sorted(kw)) or {},
        callback_on_step_end_tensor_inputs=None,
        **RUN,
    )
    assert seen == [["latents"]] * RUN["num_inference_steps"]
    with pytest.raises(ValueError, match="`callback_on_step_end_tensor_inputs` must be a list of names, got 3"):
        unconditional(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=3, **RUN)


@pytest.mark.parametrize("steps", [0, 1.5, "4", 4.0, True])
def test_expert_schedule_checks_its_step_count(unconditional, steps):
    # 0 was a ZeroDivisionError inside the scheduler, "4" a TypeError, 1.5 a silent schedule
    with pytest.raises(ValueError, match=f"`num_inference_steps` must be a positive integer, got {steps!r}"):
        unconditional.expert_schedule(steps)


def test_numpy_integer_arguments_are_accepted_as_python_ints(unconditional):
    # diffusers' pipelines take numpy integers (e.g. a step count read from an array); they were refused here
    reference = unconditional(batch_size=2, generator=torch.manual_seed(0), height=8, width=8, **RUN).images
    numpy_run = {**RUN, "num_inference_steps": np.int64(RUN["num_inference_steps"])}
    images = unconditional(
        batch_size=np.int32(2), num_images_per_prompt=np.int64(1), height=np.int64(8), width=np.uint8(8),
        generator=torch.manual_seed(0), **numpy_run,
    ).images  # fmt: skip
    assert torch.equal(images, reference)
    assert unconditional.expert_schedule(np.int64(4)) == unconditional.expert_schedule(4)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got np.True_|got True"):
        unconditional(batch_size=np.bool_(True), **RUN)
    with pytest.raises(
        ValueError, match="`num_inference_steps` must be a positive integer, got np.int64\\(0\\)|got 0"
    ):
        unconditional.expert_schedule(np.int64(0))


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_a_scheduler_reading_a_learned_variance_needs_a_model_that_predicts_one(unconditional, variance_type):
    # diffusers' DDPM step failed on None arithmetic (a TypeError) for a model without a variance half
    from diffusers import DDPMScheduler

    pipe = type(unconditional)(**{**unconditional.components, "scheduler": DDPMScheduler(variance_type=variance_type)})
    with pytest.raises(ValueError, match=f"variance_type='{variance_type}'.*out_channels=3, not twice in_channels=3"):
        pipe(**RUN)


@pytest.mark.parametrize("height, width", [(8, 16), (16, 8)])
def test_a_dit_is_refused_a_height_other_than_its_width(height, width):
    """`DiTTransformer2DModel` unpatchifies square images only: a height other than the width was a RuntimeError of
    the model's reshape ("shape '[-1, 5, 5, 2, 2, 6]' is invalid") after the checks had let it through; square sides
    other than `sample_size` still sample."""
    dits = [
        DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=4, in_channels=3, out_channels=6, num_layers=1, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10,
        ).eval()
        for _ in range(2)
    ]  # fmt: skip
    pipe = DualBackbonePipeline(shallow=dits[0], deep=dits[1], scheduler=DDIMScheduler(), switch_timestep=500)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=f"`height` and `width` must be equal .*got height={height}, width={width}"):
        pipe(class_labels=[1], height=height, width=width, **RUN)
    assert pipe(class_labels=[1], height=16, width=16, **RUN).images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("vae_name", ["AutoencoderKL", "VQModel"])
def test_a_vae_whose_latents_the_networks_do_not_take_is_refused_before_sampling(unconditional, vae_name):
    """A VAE with 4 latent channels behind networks of 3 was taken, sampled every step and then failed in the VAE's
    decoder (RuntimeError "expected input[1, 3, 8, 8] to have 4 channels"); a VQModel decodes `vq_embed_dim`
    channels."""
    vae_class, extra = {"AutoencoderKL": (AutoencoderKL, {}), "VQModel": (VQModel, {"vq_embed_dim": 4})}[vae_name]
    vae = vae_class(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3 if extra else 4, norm_num_groups=4,
        layers_per_block=1, **extra,
    ).eval()  # fmt: skip
    pipe = type(unconditional)(**{**unconditional.components, "vae": vae})
    calls = []
    pipe.stage_denoiser(0)[0].register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=f"`vae` {vae_name} decodes latents of 4 channels, but the networks .*3"):
        pipe(**RUN)
    assert not calls  # refused before the first model call


def _pipeline_predicting(kind: str, out_channels: int):
    """A tiny pipeline of ``kind`` whose networks take 3 channels and predict ``out_channels``."""
    shape = {**TINY_UNET, "out_channels": out_channels}
    if kind == "multistage":
        return MultiStagePipeline(
            unet=MultiStageUNet2DModel(**shape, stage_boundaries=(500,)), scheduler=DDIMScheduler()
        )
    if kind == "experts":
        experts = ExpertRoutingModel([UNet2DModel(**shape), UNet2DModel(**shape)], stage_boundaries=(500,))
        return ExpertRoutingPipeline(experts=experts, scheduler=DDIMScheduler())
    return DualBackbonePipeline(shallow=UNet2DModel(**shape), deep=UNet2DModel(**shape), scheduler=DDIMScheduler())


@pytest.mark.parametrize("out_channels", [1, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_networks_that_predict_other_channels_than_they_take_are_refused(kind, out_channels):
    """A prediction of 1 channel for latents of 3 was broadcast over them by the scheduler's step (images sampled,
    silently wrong); one of 4 was a RuntimeError of the step ("size of tensor a (3) must match ... b (4)"). Twice the
    channels (DiT's learned variance) is taken."""
    pipe = _pipeline_predicting(kind, out_channels)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=f"out_channels={out_channels}, .*in_channels=3"):
        pipe(**RUN)
    assert _pipeline_predicting(kind, 6)(**RUN).images.shape == (1, 3, 8, 8)


NETWORKS = ("unet", "experts", "shallow", "deep")  # the components a swap replaces


@pytest.mark.parametrize("num_class_embeds", [None, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_class_names_that_do_not_fit_a_model_swapped_in_are_refused_before_use_or_saving(
    kind, num_class_embeds, tmp_path
):
    # diffusers registers a component swapped in later (`pipe.unet = ...`) unchecked: the pipeline kept the class
    # names of the model it was built with, named classes of an unconditional model (or classes the new one has not),
    # sampled, and saved a folder that did not load ("`id2label` was given, but this pipeline's model is not
    # class-conditional", an argument the user never gave)
    switch = {"switch_timestep": 500} if kind == "dual_backbone" else {}
    pipe = _pipeline(kind, num_class_embeds=4)
    pipe = type(pipe)(**pipe.components, **switch, id2label={0: "cat", 1: "dog", 2: "fox"})
    pipe.set_progress_bar_config(disable=True)
    other = _pipeline(kind, num_class_embeds=num_class_embeds)  # unconditional, or 2 classes + the null label
    for name in NETWORKS:
        if name in pipe.components:
            setattr(pipe, name, other.components[name])
    match = r"The pipeline's class names \(`id2label`\) do not fit its model: "
    labels = {} if num_class_embeds is None else {"class_labels": [0]}
    for use in (
        lambda: pipe.get_label_ids("cat"),
        lambda: pipe(**labels, **RUN),
        lambda: pipe.save_pretrained(tmp_path),
    ):
        with pytest.raises(ValueError, match=match):
            use()
    assert not any(tmp_path.iterdir())  # refused before anything was written
    pipe.register_class_names(None if num_class_embeds is None else {0: "cat", 1: "dog"})  # the fix the error names
    pipe.save_pretrained(tmp_path)
    again = type(pipe).from_pretrained(tmp_path)
    assert again.config.id2label == (None if num_class_embeds is None else {"0": "cat", "1": "dog"})


@pytest.mark.parametrize("num_class_embeds", [None, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_class_names_kept_from_the_source_that_do_not_fit_a_new_model_say_how_to_drop_them(
    kind, num_class_embeds, tmp_path
):
    # `from_pipe(pipe, unet=...)` and `from_pretrained(folder, unet=...)` keep the source's class names: a model of
    # other classes was refused as "`id2label` was given, ...", an argument the user never passed, with no word on how
    # to replace or drop the names
    switch = {"switch_timestep": 500} if kind == "dual_backbone" else {}
    pipe = _pipeline(kind, num_class_embeds=4)
    pipe = type(pipe)(**pipe.components, **switch, id2label={0: "cat", 1: "dog", 2: "fox"})
    pipe.save_pretrained(tmp_path)
    networks = {k: v for k, v in _pipeline(kind, num_class_embeds).components.items() if k in NETWORKS}
    names = None if num_class_embeds is None else {0: "cat", 1: "dog"}
    for make in (
        lambda **kw: type(pipe).from_pipe(pipe, **networks, **kw),
        lambda **kw: type(pipe).from_pretrained(tmp_path, **networks, **kw),
    ):
        with pytest.raises(ValueError, match=r"`id2label` was kept from the pipeline or folder `from_pipe` or "):
            make()
        assert make(id2label=names).config.id2label == (names and {"0": "cat", "1": "dog"})


@pytest.mark.parametrize(
    ("labels", "shown"),
    [
        ([2**63], r"\[9223372036854775808\]"),
        ([0, -(2**70)], r"\[0, -1180591620717411303424\]"),
        (np.array([2**64 - 1], dtype=np.uint64), r"\[18446744073709551615\]"),
        (torch.tensor([2**63 + 5], dtype=torch.uint64), r"\[9223372036854775813\]"),
    ],
    ids=["int", "negative int", "numpy uint64", "torch uint64"],
)
def test_class_labels_beyond_int64_are_named_with_their_values(conditional, labels, shown):
    # a Python int beyond int64 was torch's "Overflow when unpacking long long", naming neither the argument nor the
    # value, and a uint64 label wrapped around into a negative one, shown as such ("got [-1]" for 2**64 - 1)
    with pytest.raises(ValueError, match=rf"`class_labels` must be class indices in \[0, 3\) .*got {shown}"):
        conditional(class_labels=labels, **RUN)


@pytest.mark.parametrize(
    "scheduler_name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "SASolverScheduler"]
)
def test_a_scheduler_that_drops_a_learned_variance_gets_the_mean_half_and_refuses_channels_it_would_cut(
    scheduler_name,
):
    # with variance_type "learned"/"learned_range", DPM-Solver and SA-Solver take `model_output[:, :3]` as the
    # prediction (diffusers' rule for RGB pixel models): a DiT of 4-channel latents failed after its first step with
    # a shape RuntimeError, and SA-Solver, which draws its noise in the shape of the output it is given, failed on
    # any DiT
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_name)

    def dit(channels: int) -> DiTTransformer2DModel:
        torch.manual_seed(0)
        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=channels, num_layers=1,
                                     out_channels=2 * channels, sample_size=4, patch_size=2, num_embeds_ada_norm=3)  # fmt: skip

    def routed(channels: int, scheduler) -> ExpertRoutingPipeline:
        pipe = ExpertRoutingPipeline(experts=ExpertRoutingModel([dit(channels).eval()], stage_boundaries=()),
                                     scheduler=scheduler)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe

    run = {"class_labels": [0, 1], "guidance_scale": 2.0, "num_inference_steps": 4, "output_type": "pt"}
    images = routed(3, scheduler_class(variance_type="learned_range"))(generator=torch.manual_seed(0), **run).images
    plain = routed(3, scheduler_class())(generator=torch.manual_seed(0), **run).images  # the mean half, as DiTPipeline
    assert torch.allclose(images, plain, atol=1e-6)
    match = (r"variance_type='learned', with which its step takes the first 3 channels of the model's output as its "
             r"prediction .* in_channels=4: build it with `variance_type=None`")  # fmt: skip
    with pytest.raises(ValueError, match=match):
        routed(4, scheduler_class(variance_type="learned"))(**{**run, "output_type": "latent"})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("labels", [None, [0]])
def test_a_model_whose_only_class_embedding_is_the_unconditional_label_is_refused(kind, labels):
    # num_class_embeds=1 leaves no data class: the call asked for "one class index per image, 0 to -1", and refused
    # each index as out of "[0, 0)"
    pipe = _pipeline(kind, num_class_embeds=1)
    with pytest.raises(ValueError, match=r"`num_class_embeds`=1: its last class embedding is the unconditional label"):
        pipe(class_labels=labels, **RUN)


@pytest.mark.parametrize(
    "labels, match",
    [
        (
            np.array(["dog", "cat"]),
            r"got array\(\['dog', 'cat'\].*: turn class names into indices with `pipe.get_label_ids",
        ),
        (np.array([b"dog"]), r"`class_labels` must be integers \(class indices\), got array\(\[b'dog'\]"),
        (
            np.array([1, None], dtype=object),
            r"`class_labels` must be integers \(class indices\), got array\(\[1, None\]",
        ),
        (
            np.array(["2024-01-01"], dtype="datetime64[D]"),
            r"`class_labels` must be integers \(class indices\), got array",
        ),
    ],
    ids=["str", "bytes", "object", "datetime"],
)
def test_numpy_arrays_of_names_or_objects_as_class_labels_are_named(conditional, labels, match):
    # a column of names or an object column (pandas' `.values`) crashed in `torch.from_numpy` with a TypeError
    with pytest.raises(ValueError, match=match):
        conditional(class_labels=labels, **RUN)
    # an object array of integers is the list of them, as a list is
    same = conditional(class_labels=np.array([2, 0], dtype=object), generator=torch.manual_seed(0), **RUN).images
    assert torch.equal(same, conditional(class_labels=[2, 0], generator=torch.manual_seed(0), **RUN).images)


@pytest.mark.parametrize("labels", ["dog", ["dog", "cat"]])
def test_class_names_given_as_class_labels_point_to_get_label_ids(conditional, labels):
    # DiTPipeline users pass names through `get_label_ids`; a name given as `class_labels` was only "must be integers"
    with pytest.raises(ValueError, match=r"must be integers \(class indices\), got .*: turn class names into indices "
                       r"with `pipe.get_label_ids\(\[\.\.\.\]\)`"):  # fmt: skip
        conditional(class_labels=labels, **RUN)


def test_from_pipe_keeps_the_networks_of_a_subclass_whose_signature_names_no_class():
    # the base class's own example (`TwoUNetPipeline`, an `__init__` without annotations): diffusers' `from_pipe` keeps
    # a model component only when its class is in the annotation, so an unannotated one was dropped with a warning and
    # `TwoUNetPipeline.from_pipe(pipe)` failed with "expected ['clean', 'noisy', 'scheduler'], but only {'scheduler'}"
    from diffusers_stages import StagedDiffusionPipeline, TimestepPartition

    class TwoUNetPipeline(StagedDiffusionPipeline):
        def __init__(self, clean, noisy, scheduler):
            super().__init__()
            self.register_modules(clean=clean, noisy=noisy, scheduler=scheduler)

        @property
        def partition(self):
            return TimestepPartition([500])

        def stage_denoiser(self, stage):
            return (self.clean, self.noisy)[stage], {}

    torch.manual_seed(0)
    pipe = TwoUNetPipeline(UNet2DModel(**TINY_UNET).eval(), UNet2DModel(**TINY_UNET).eval(), DDIMScheduler())
    again = TwoUNetPipeline.from_pipe(pipe)
    assert again.clean is pipe.clean and again.noisy is pipe.noisy
    other = UNet2DModel(**TINY_UNET).eval()
    assert TwoUNetPipeline.from_pipe(pipe, noisy=other).noisy is other  # one passed still replaces the source's


def test_from_pipe_of_a_pipeline_without_the_networks_names_what_to_pass():
    # `MultiStagePipeline.from_pipe(ddim_pipe)` (a plain UNet2DModel as `unet`) or `DualBackbonePipeline.from_pipe(...)`
    # of a pipeline without `shallow`/`deep` failed with diffusers' "expected ['class_embedder', 'scheduler', 'unet',
    # 'vae'], but only {'scheduler'} were passed", which lists optional components and says neither what is missing
    # nor what to pass
    from diffusers import DDIMPipeline

    from diffusers_stages import DualBackbonePipeline, ExpertRoutingPipeline, MultiStagePipeline

    torch.manual_seed(0)
    ddim = DDIMPipeline(unet=UNet2DModel(**TINY_UNET).eval(), scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match=r"MultiStagePipeline.from_pipe\(DDIMPipeline\) .*a UNet2DModel as `unet`, not "
                       r"a MultiStageUNet2DModel.* pass it: `from_pipe\(pipe, unet=\.\.\.\)`"):  # fmt: skip
        MultiStagePipeline.from_pipe(ddim)
    with pytest.raises(
        ValueError, match=r"DualBackbonePipeline.from_pipe\(DDIMPipeline\) .*no `deep` and no `shallow`; pass them"
    ):
        DualBackbonePipeline.from_pipe(ddim)
    with pytest.raises(ValueError, match=r"ExpertRoutingPipeline.from_pipe\(DualBackbonePipeline\) .*no `experts`"):
        ExpertRoutingPipeline.from_pipe(tiny_pipeline("dual_backbone"))
    dual = DualBackbonePipeline.from_pipe(ddim, shallow=ddim.unet, deep=ddim.unet)  # passed: taken as before
    assert dual.shallow is ddim.unet and dual.scheduler is ddim.scheduler


def _record_model_calls(pipe) -> list:
    """Every forward call of the pipeline's stage networks, appended to the returned list."""
    calls = []
    for stage in range(pipe.resolve_partition(2).num_stages):
        pipe.stage_denoiser(stage)[0].register_forward_hook(lambda *args, stage=stage: calls.append(stage))
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_a_flow_matching_scheduler_on_a_ddpm_style_model_is_refused_before_sampling(kind):
    # MultiStagePipeline and DualBackbonePipeline sampled `FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler
    # .config)` on an epsilon model without a word (garbage images); only ExpertRoutingPipeline checked prediction types
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    pipe = tiny_pipeline(
        kind, DDIMScheduler(prediction_type="epsilon"), switch_timestep=500
    )  # as loaded from a folder
    calls = _record_model_calls(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for call in (lambda: pipe(**RUN), lambda: pipe.expert_schedule(2)):
        with pytest.raises(
            ValueError, match="`scheduler` FlowMatchEulerDiscreteScheduler .*prediction_type='epsilon'"
        ):
            call()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler .*prediction_type='epsilon'"):
        type(pipe)(**pipe.components)
    # the reverse: a velocity prediction on DDPM noise levels
    pipe.scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction")
    with pytest.raises(
        ValueError, match="`scheduler` DPMSolverMultistepScheduler .*prediction_type='flow_prediction'"
    ):
        pipe(**RUN)
    assert calls == []
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    assert pipe(**RUN).images.shape == (1, 3, 8, 8) and calls


def test_a_resolve_partition_override_without_custom_timesteps_is_named_when_they_are_given():
    # an override written before `timesteps=`/`sigmas=` were added (`resolve_partition(self, num_inference_steps)`)
    # failed with "resolve_partition() got an unexpected keyword argument 'timesteps'", naming neither the override
    # nor what to change; runs without custom values still use it
    from diffusers import DDPMScheduler

    from diffusers_stages import TimestepPartition

    class OldOverride(MultiStagePipeline):
        def resolve_partition(self, num_inference_steps):
            return self.partition if num_inference_steps > 1 else TimestepPartition([])

    class NewOverride(MultiStagePipeline):
        def resolve_partition(self, num_inference_steps, timesteps=None, sigmas=None):
            return self.partition

    base = tiny_pipeline("multistage", DDPMScheduler())
    old, new = OldOverride(**base.components), NewOverride(**base.components)
    for pipe in (old, new):
        pipe.set_progress_bar_config(disable=True)
    assert old(**RUN).images.shape == (1, 3, 8, 8)
    message = (
        r"`timesteps`=\[999, 500\] .*OldOverride.resolve_partition takes no `timesteps`.*"
        r"`resolve_partition\(self, num_inference_steps, timesteps=None, sigmas=None\)`"
    )
    for call in (
        lambda: old(timesteps=[999, 500], num_inference_steps=None, output_type="pt"),
        lambda: old.expert_schedule(None, timesteps=[999, 500]),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=r"`sigmas`=\[.*OldOverride.resolve_partition takes no `sigmas`"):
        old.expert_schedule(None, sigmas=[1.0, 0.5, 0.0])
    assert new(timesteps=[999, 500], num_inference_steps=None, output_type="pt").images.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_every_pipeline_is_still_built_without_a_scheduler(kind):
    # the prediction-type check in the constructors must not turn `scheduler=None` into an AttributeError (nor the
    # dual backbone's check of a fixed switch, which did); sampling then asks for one (`check_scheduler`)
    pipe = tiny_pipeline(kind, switch_timestep=500) if kind == "dual_backbone" else tiny_pipeline(kind)
    switch = {"switch_timestep": 500.0} if kind == "dual_backbone" else {}
    built = type(pipe)(**{**pipe.components, "scheduler": None}, **switch)
    assert built.scheduler is None
    with pytest.raises(ValueError, match="`scheduler` is None"):
        built(**RUN)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_without_a_scheduler_is_refused_by_name(kind):
    # a pipeline built with `scheduler=None` (which the constructors take) or given None later failed deep in the
    # routing with "'NoneType' object has no attribute 'config'"
    pipe = tiny_pipeline(kind)
    pipe.scheduler = None
    for run in (lambda: pipe(**RUN), lambda: pipe.expert_schedule(num_inference_steps=2)):
        with pytest.raises(ValueError, match=r"`scheduler` is None: .*pipe\.scheduler = DDIMScheduler\(\)"):
            run()


def test_a_legacy_transformer2d_dit_is_refused_a_height_other_than_its_width():
    """diffusers' legacy `Transformer2DModel` DiT (`norm_type="ada_norm_zero"`) unpatchifies square images only too:
    only `DiTTransformer2DModel` was checked, so 8 x 16 failed inside its reshape after the checks."""
    from diffusers import Transformer2DModel

    legacy = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=3, out_channels=6, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip
    pipe = DualBackbonePipeline(shallow=legacy, deep=legacy, scheduler=DDIMScheduler(), switch_timestep=500)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"must be equal for a Transformer2DModel .*got height=8, width=16"):
        pipe(class_labels=[1], height=8, width=16, **RUN)
    assert pipe(class_labels=[1], height=16, width=16, **RUN).images.shape == (1, 3, 16, 16)
