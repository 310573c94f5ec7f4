"""MultiStageDDPMppUNet2DModel: routing, save/reload, class labels, training and sampling with EDM schedulers."""

import re

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from diffusers_stages import MultiStageDDPMppUNet2DModel, MultiStagePipeline
from diffusers_stages.schedulers import ContinuousVPDPMSolverSinglestepScheduler
from diffusers_stages.training.loss import diffusion_loss
from tests.models.staged_model_tester import StagedModelTesterMixin, assert_fuse_qkv_projections_round_trip

TINY = {
    "sample_size": 8,
    "encoder_channels": 16,
    "decoder_channels": (24, 16, 8),
    "channel_mult": (1, 2),
    "layers_per_block": 1,
    "attention_resolutions": (4,),
    "dropout": 0.0,
}


def c_noise(*sigmas: float) -> torch.Tensor:
    return torch.tensor(sigmas).log() / 4  # what diffusers' EDM schedulers pass as `timestep`


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MultiStageDDPMppUNet2DModel(**TINY).eval()


class TestMultiStageDDPMppUNet2DModel(StagedModelTesterMixin):
    model_class = MultiStageDDPMppUNet2DModel
    stage_timesteps = tuple(c_noise(0.5, 5.0, 40.0).tolist())
    mixed_timesteps = tuple(c_noise(0.5, 40.0, 5.0, 1.0).tolist())  # stages 0, 2, 1, 0
    mixed_stage_counts = (2, 1, 1)
    min_trainable_tensors = 100
    num_attention_processors = 1 + 3 * 2  # one encoder block; each decoder's middle and last 4x4 blocks
    attention_prefixes = ("down_blocks.", "decoders.0.", "decoders.1.", "decoders.2.")
    bad_configs = (
        ({"decoder_channels": (16, 16)}, "decoder_channels"),
        ({"sample_size": 7}, "sample_size"),
        ({"encoder_channels": 18}, "norm_num_groups"),
        ({"num_class_embeds": 1}, "num_class_embeds"),
        ({"stage_boundaries": (5.0, 1.0)}, "boundaries"),
    )

    def get_init_kwargs(self) -> dict:
        return dict(TINY)


def test_decoders_are_tailored_and_attend_where_configured(model):
    # decoder widths follow `decoder_channels`; the middle blocks stay at the encoder's deepest width
    assert [d.conv_out.in_channels for d in model.decoders] == [24, 16, 8]
    assert all(d.mid_blocks[0].resnet.in_channels == 32 for d in model.decoders)
    # attention: encoder blocks at 4x4, the first middle block, the last block of each decoder's 4x4 level
    assert [b.attention is not None for b in model.down_blocks] == [False, False, True]
    assert [b.attention is not None for b in model.decoders[0].up_blocks] == [False, True, False, False, False]


def test_class_labels_are_scaled_one_hot_and_the_last_means_no_class():
    torch.manual_seed(0)
    model = MultiStageDDPMppUNet2DModel(**TINY, num_class_embeds=4).eval()  # 3 classes + "no class"
    x, t = torch.randn(2, 3, 8, 8), c_noise(1.0, 1.0)
    with torch.no_grad():
        by_index = model(x, t, class_labels=torch.tensor([2, 3])).sample
        by_rows = model(x, t, class_labels=torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])).sample
    assert torch.allclose(by_index, by_rows, atol=1e-6)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t, class_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t)


def test_trains_with_the_edm_loss(model):
    model.train()
    scheduler = EDMEulerScheduler()
    sigmas = torch.tensor([0.3, 3.0, 30.0])  # one sample per stage
    loss = diffusion_loss(model, scheduler, torch.randn(3, 3, 8, 8), sigmas, generator=torch.manual_seed(0))
    loss.mean().backward()
    for s in range(3):  # every stage's decoder received a gradient, and the shared encoder
        assert model.decoders[s].conv_out.weight.grad.abs().sum() > 0
    assert model.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scheduler_class", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_samples_deterministically_through_the_pipeline(model, scheduler_class, tmp_path):
    pipe = MultiStagePipeline(unet=model, scheduler=scheduler_class())
    pipe.set_progress_bar_config(disable=True)
    calls = {s: 0 for s in range(3)}
    for s, decoder in enumerate(model.decoders):
        decoder.register_forward_hook(lambda *_, s=s: calls.__setitem__(s, calls[s] + 1))
    images = pipe(batch_size=2, num_inference_steps=6, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and all(n > 0 for n in calls.values())  # the Karras schedule visits all
    pipe.save_pretrained(tmp_path)
    reloaded = MultiStagePipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded(batch_size=2, num_inference_steps=6, generator=torch.manual_seed(0), output_type="np").images
    assert (images == again).all()


def test_bad_inputs_name_the_argument(model):
    with pytest.raises(ValueError, match="sample"):
        model(torch.randn(1, 1, 8, 8), c_noise(1.0))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(1, 3, 8, 8), c_noise(1.0), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="augment_labels"):
        model(torch.randn(1, 3, 8, 8), c_noise(1.0), augment_labels=torch.zeros(1, 9))


@pytest.mark.parametrize("shape", [(2, 5), (3, 9), (2, 9, 1), ()], ids=["width", "batch", "rank", "scalar"])
def test_augment_labels_of_another_shape_are_named(shape):
    # were torch's "mat1 and mat2 shapes cannot be multiplied" or a broadcast error inside the embedding
    torch.manual_seed(0)
    model = MultiStageDDPMppUNet2DModel(**TINY, augment_dim=9).eval()
    x, t = torch.randn(2, 3, 8, 8), c_noise(1.0, 1.0)
    with torch.no_grad():
        for fine in ((2, 9), (1, 9), (9,)):  # one row per sample, or one row for all
            assert model(x, t, augment_labels=torch.zeros(fine)).sample.shape == x.shape
        with pytest.raises(
            ValueError, match=rf"`augment_labels` must have shape \(2, 9\).*got shape {re.escape(str(shape))}"
        ):
            model(x, t, augment_labels=torch.zeros(shape))


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("layers_per_block", 0, "`layers_per_block` must be a positive integer, got 0"),  # built silently
        ("channel_mult", (), r"`channel_mult` must be positive integers, one per level, got \(\)"),  # built silently
        ("channel_mult", (1, 0), r"`channel_mult\[1\]` must be a positive integer, got 0"),
        ("channel_mult_emb", 0, "`channel_mult_emb` must be a positive integer, got 0"),  # built silently
        ("encoder_channels", 0, "`encoder_channels` must be a positive integer, got 0"),
        ("in_channels", 0, "`in_channels` must be a positive integer, got 0"),  # failed in the first forward
        ("augment_dim", -1, "`augment_dim` must be an integer >= 0.*got -1"),  # was a RuntimeError
        ("decoder_mid_blocks", "x", "`decoder_mid_blocks` must be True or False, got 'x'"),  # taken as True
        ("sample_size", 0, "`sample_size` must be a positive integer divisible by 2"),  # built silently
        # one number where a list belongs, or a float width: TypeErrors ('int' is not iterable, has no len())
        ("attention_resolutions", 4, r"`attention_resolutions` must be a list of resolutions.*got 4"),
        ("attention_resolutions", "16", r"`attention_resolutions` must be a list of resolutions.*got '16'"),
        ("decoder_channels", 16, r"`decoder_channels` must be a list of widths, one per stage.*got 16"),
        ("decoder_channels", (24, 16.0, 8), r"`decoder_channels\[1\]` must be a positive integer, got 16.0"),
        # a float or a string count: TypeErrors inside torch's Linear or the comparison
        ("num_class_embeds", 4.0, r"`num_class_embeds` must be an integer >= 2 .*got 4.0"),
        ("num_class_embeds", "4", r"`num_class_embeds` must be an integer >= 2 .*got '4'"),
        ("num_class_embeds", True, r"`num_class_embeds` must be an integer >= 2 .*got True"),
        # every output NaN (nan, a negative epsilon), or torch's errors without the argument's name, some only in
        # the first training forward (a NaN dropout), or a TypeError (a string dropout, a bool group count)
        ("norm_eps", float("nan"), "`norm_eps` must be a positive finite number, got nan"),
        ("norm_eps", -1.0, "`norm_eps` must be a positive finite number, got -1.0"),
        ("dropout", float("nan"), r"`dropout` must be a number in \[0, 1\), got nan"),
        ("dropout", 1.5, r"`dropout` must be a number in \[0, 1\), got 1.5"),
        ("dropout", "0.1", r"`dropout` must be a number in \[0, 1\), got '0.1'"),
        ("norm_num_groups", True, "`norm_num_groups` must be a positive integer, got True"),
        ("norm_num_groups", 2.5, "`norm_num_groups` must be a positive integer, got 2.5"),
        # a size no level has (the default (16,) at 8x8): built silently, with attention only in the middle blocks
        (
            "attention_resolutions",
            (16,),
            r"`attention_resolutions`=\(16,\) must be map sizes of this model: 8, 4 \(`sample_size`=8 halved per "
            r"level of `channel_mult`=\(1, 2\)\), got 16",
        ),
    ],
)
def test_bad_sizes_name_the_argument_and_the_value(name, value, message):
    with pytest.raises(ValueError, match=message):
        MultiStageDDPMppUNet2DModel(**{**TINY, name: value})


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a float map size was taken (4.0 == 4) and saved as 4.0; a bool sample size as a 1x1 model
        ({"attention_resolutions": (4.0,)}, r"`attention_resolutions` must be a list of resolutions.*got \(4.0,\)"),
        ({"attention_resolutions": (True,)}, r"`attention_resolutions` must be a list of resolutions.*got \(True,\)"),
        (
            {"sample_size": True, "channel_mult": (1,), "attention_resolutions": ()},
            r"`sample_size` must be a positive integer divisible by 2\*\*0 .*got True",
        ),
    ],
)
def test_bools_and_floats_are_not_taken_as_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        MultiStageDDPMppUNet2DModel(**{**TINY, **overrides})


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.randn(1, 3, 7, 7), c_noise(1.0)), {}, r"`sample`'s height and width must be multiples of 2"),
        ((torch.randn(1, 3, 8), c_noise(1.0)), {}, r"`sample` must have shape \(batch, 3, height, width\)"),
        ((torch.randn(2, 3, 8, 8), c_noise(1.0, 2.0, 3.0)), {}, r"`timestep` must be one value or one per sample"),
        ((torch.randn(1, 3, 8, 8), torch.tensor([float("inf")])), {}, r"`timestep` must be finite, got \[inf\]"),
        ((torch.randn(1, 3, 8, 8), float("nan")), {"stage_index": 0}, r"`timestep` must be finite, got nan"),
        ((torch.randn(1, 3, 8, 8), c_noise(1.0)), {"stage_index": 3}, r"`stage_index` must be in \[0, 3\), got 3"),
        ((torch.randn(1, 3, 8, 8), c_noise(1.0)), {"stage_index": "1"}, r"`stage_index` must be an integer, got '1'"),
    ],
)
def test_forward_checks_its_inputs_like_a_library(model, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(*args, **kwargs)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 5]), r"class indices in \[0, 4\), got \[0, 5\]"),
        (torch.zeros(2, 4), r"one-hot rows must have shape \(2, 3\), got \(2, 4\)"),
        (torch.tensor([[0, 1, 0], [1, 0, 0]]), r"class indices of shape \(2,\), or one-hot rows of width 3"),
    ],
)
def test_bad_class_labels_name_the_argument(labels, message):
    model = MultiStageDDPMppUNet2DModel(**TINY, num_class_embeds=4).eval()
    with pytest.raises(ValueError, match=f"`class_labels` .*{message}"):
        model(torch.randn(2, 3, 8, 8), c_noise(1.0, 1.0), class_labels=labels)


def test_the_stage_index_path_reads_no_tensor_value(host_reads):
    # no device synchronisation per pipeline step, class labels included; the routed path reads the timesteps
    model = MultiStageDDPMppUNet2DModel(**TINY, num_class_embeds=4).eval()
    x, t, labels = torch.randn(2, 3, 8, 8), c_noise(5.0, 5.0), torch.tensor([1, 3])
    with torch.no_grad():
        assert host_reads(lambda: model(x, t, class_labels=labels, stage_index=1)) == 0
        assert host_reads(lambda: model(x, t, class_labels=labels)) > 0


# ------------------------------------------------------------------------------------------------------------------
# the NCSN++ options (the authors' score_sde model): FIR resampling, residual input pyramid, shared middle blocks
NCSNPP = {
    **TINY,
    "channel_mult": (1, 2, 2),
    "resample_filter": (1, 3, 3, 1),
    "encoder_type": "residual",
    "decoder_mid_blocks": False,
    "stage_boundaries": (442.0, 630.8),  # score_sde's labels 999 t against 1000 x stage_interval
    "boundary_units": "timestep",
}


class TestNCSNppOptions(StagedModelTesterMixin):
    model_class = MultiStageDDPMppUNet2DModel
    stage_timesteps = (220.5, 536.3, 815.1)
    mixed_timesteps = (220.5, 815.1, 536.3, 10.0)  # stages 0, 2, 1, 0
    mixed_stage_counts = (2, 1, 1)
    min_trainable_tensors = 100
    num_attention_processors = 1 + 1 + 3  # the 4x4 encoder block, the shared middle, each decoder's 4x4 level
    picklable = (
        False  # diffusers' FIR `ResnetBlock2D` holds a lambda (its NCSN++ `UNet2DModel` does not pickle either)
    )
    attention_prefixes = ("down_blocks.", "mid_blocks.", "decoders.0.", "decoders.1.", "decoders.2.")
    bad_configs = (
        ({"resample_filter": (1, 2, 1)}, "resample_filter"),
        ({"encoder_type": "skip"}, "encoder_type"),
        ({"stage_boundaries": (442.0, 1000.0)}, "boundaries"),
    )

    # the input pyramid's FIR down-sampling convolves every image channel of every sample on its own (diffusers'
    # upfirdn2d_native), and torch guards that graph on batch x channels < 16: the mixed batch of 6 after a warm-up
    # on 2 compiles the pyramid once more
    compile_new_batch_recompiles = True

    def get_init_kwargs(self) -> dict:
        return dict(NCSNPP)

    @pytest.mark.slow  # the shared blocks compile as in the EDM configuration above; this one adds a minute
    def test_compiles_with_fullgraph_given_a_stage_index(self, model):
        super().test_compiles_with_fullgraph_given_a_stage_index(model)


def test_ncsnpp_options_build_score_sde_s_layout():
    torch.manual_seed(0)
    model = MultiStageDDPMppUNet2DModel(**NCSNPP).eval()
    # one input-pyramid convolution per down-sampling, from the image channels, then the level's width
    assert [(p.Conv2d_0.in_channels, p.Conv2d_0.out_channels) for p in model.input_pyramid] == [(3, 16), (16, 32)]
    assert model.input_pyramid[0].fir_kernel == (1, 3, 3, 1)
    # the middle blocks belong to the shared encoder; every decoder starts with its up path
    assert len(model.mid_blocks) == 2 and all(len(d.mid_blocks) == 0 for d in model.decoders)
    # the resampling blocks use the FIR filter, not 2x2 average pooling / nearest up-sampling
    down = [b for b in model.down_blocks if b.resample == "down"]
    x = torch.zeros(1, 16, 8, 8)
    x[..., 3, 3] = 1.0  # an impulse: FIR spreads it over 4x4 taps, average pooling keeps it in one pixel
    assert down[0].resnet.downsample(x)[0, 0].count_nonzero() == 4
    assert MultiStageDDPMppUNet2DModel(**TINY).down_blocks[1].resnet.downsample(x)[0, 0].count_nonzero() == 1
    # the EDM defaults are unchanged: per-decoder middle blocks, no pyramid
    edm = MultiStageDDPMppUNet2DModel(**TINY)
    assert edm.input_pyramid is None and edm.mid_blocks is None and len(edm.decoders[0].mid_blocks) == 2


def test_ncsnpp_samples_with_the_continuous_vp_dpm_solver(tmp_path):
    torch.manual_seed(0)
    model = MultiStageDDPMppUNet2DModel(**NCSNPP).eval()
    pipe = MultiStagePipeline(unet=model, scheduler=ContinuousVPDPMSolverSinglestepScheduler())
    pipe.save_pretrained(tmp_path)
    images = []
    for pipeline in (pipe, MultiStagePipeline.from_pretrained(tmp_path)):
        pipeline.set_progress_bar_config(disable=True)
        images.append(pipeline(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0), output_type="np"))
    # 5 calls: 999 t = 999 (stage 2), 800 (2), 536 (1), 194 (0), 11 (0)
    assert [stage for _, stage in pipe.expert_schedule(5)] == [2, 2, 1, 0, 0]
    assert images[0].images.shape == (2, 8, 8, 3) and (images[0].images == images[1].images).all()


def test_a_sample_of_another_dtype_is_named(model):
    # was torch's "Input type (double) and bias type (float) should be the same" from inside `conv_in`
    with pytest.raises(ValueError, match="`sample` must have the model's dtype torch.float32, got torch.float64"):
        model(torch.randn(1, 3, 8, 8, dtype=torch.float64), c_noise(1.0))


def test_the_input_pyramid_downsampling_is_diffusers_fir_downsampling():
    # the pyramid's convolution is called as a layer (so that hooks see it), with diffusers' initialisation, state
    # dict and outputs bit for bit
    from diffusers.models.downsampling import FirDownsample2D

    from diffusers_stages.models.unet_multistage_ddpmpp import CastingFirDownsample2D

    torch.manual_seed(0)
    reference = FirDownsample2D(3, 8, use_conv=True, fir_kernel=(1, 3, 3, 1))
    torch.manual_seed(0)
    pyramid = CastingFirDownsample2D(3, 8, fir_kernel=(1, 3, 3, 1))
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), pyramid.state_dict().values()))
    assert reference.state_dict().keys() == pyramid.state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    calls = []
    pyramid.Conv2d_0.register_forward_hook(lambda *args: calls.append(1))
    assert torch.equal(pyramid(x), reference(x)) and calls == [1]


def test_fuse_qkv_projections_fuses_every_attention_and_unfuse_restores_the_processors(model):
    assert_fuse_qkv_projections_round_trip(model, torch.randn(3, 3, 8, 8), c_noise(0.5, 5.0, 40.0))
