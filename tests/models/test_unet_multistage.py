import json
import re
import weakref

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_stages import MultiStageUNet2DModel, TimestepPartition
from tests.conftest import TINY_UNET
from tests.models.staged_model_tester import (
    GraphCounter,
    StagedModelTesterMixin,
    assert_fuse_qkv_projections_round_trip,
    assert_mixed_batch_matches_reference,
    assert_save_reload_bit_identical,
    stage_batch_sizes,
)

TAILORED = {"stage_boundaries": (442, 631), "decoder_block_out_channels": ((16, 24), (8, 16), (4, 8))}


class TestMultiStageUNet2DModel(StagedModelTesterMixin):
    model_class = MultiStageUNet2DModel
    stage_timesteps = (10, 500, 900)
    mixed_timesteps = (5, 900, 450, 700, 100, 632)  # stages 0, 2, 1, 2, 0, 2
    mixed_stage_counts = (2, 1, 3)
    attention_prefixes = ("mid_block", "decoders.0.", "decoders.1.", "decoders.2.")
    bad_configs = (
        ({"stage_boundaries": (631, 442)}, "`stage_boundaries`"),
        ({"stage_boundaries": (442, 1000)}, "`stage_boundaries`"),
        ({"decoder_block_out_channels": ((8, 16), (8, 16))}, "`decoder_block_out_channels`"),
        ({"decoder_block_out_channels": ((8, 16), (8, 16), (6, 8))}, "`decoder_block_out_channels`"),
        ({"decoder_block_out_channels": ((8, 16), (8, 16), (8,))}, "`decoder_block_out_channels`"),
        ({"boundary_units": "seconds"}, "`boundary_units`"),
        ({"up_block_types": ("UpBlock2D",)}, "`up_block_types`"),
        ({"attention_head_dim": 16, "decoder_block_out_channels": ((8, 16), (8, 16), (4, 8))}, "`attention_head_dim`"),
    )

    def get_init_kwargs(self) -> dict:
        return {**TINY_UNET, **TAILORED}

    def test_reloaded_config_keeps_the_decoders(self, model, tmp_path):
        x, t = self.inputs(self.mixed_timesteps)
        reloaded = assert_save_reload_bit_identical(model, tmp_path, x, t, self.weight_files)
        assert reloaded.config.decoder_block_out_channels == [[16, 24], [8, 16], [4, 8]]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"num_class_embeds": 5, "resnet_time_scale_shift": "scale_shift"},
        {"time_embedding_type": "learned", "num_train_timesteps": 1000},
        {"center_input_sample": True, "mid_block_type": None},
    ],
)
def test_from_unet_reproduces_the_source_at_every_timestep(tiny_unet_kwargs, extra):
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_kwargs, **extra).eval()
    staged = MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300, 650)).eval()
    timesteps = list(range(1000))  # every training timestep, in one mixed batch across all three stages
    x = torch.randn(len(timesteps), 3, 8, 8)
    labels = torch.arange(len(timesteps)) % 4 if "num_class_embeds" in extra else None
    with torch.no_grad():
        expected = unet(x, torch.tensor(timesteps), class_labels=labels).sample
        got = staged(x, torch.tensor(timesteps), class_labels=labels).sample
    assert torch.allclose(got, expected, atol=1e-5)


def test_from_unet_equals_the_source_for_tensor_and_integer_timesteps_as_its_docstring_says(tiny_unet_kwargs):
    # UNet2DModel truncates a non-tensor timestep to an integer (450.5 -> 450); the staged model takes its value, as
    # the from_unet docstring says: equal for tensors and integers, and a Python float equals the source's tensor
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_kwargs).eval()
    staged = MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300, 650)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for t in (450, torch.tensor(450.5), torch.tensor([450.5, 700.25])):
            assert torch.allclose(staged(x, t).sample, unet(x, t).sample, atol=1e-5)
        assert torch.allclose(staged(x, 450.5).sample, unet(x, torch.tensor(450.5)).sample, atol=1e-5)
        assert not torch.allclose(staged(x, 450.5).sample, unet(x, 450.5).sample, atol=1e-5)


def test_from_unet_with_skip_blocks_and_fourier_embedding():
    torch.manual_seed(0)
    unet = UNet2DModel(  # NCSN++-style blocks (their attention hard-codes 32 groups, hence the widths)
        sample_size=8,
        block_out_channels=(32, 32),
        layers_per_block=1,
        time_embedding_type="fourier",
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        attention_head_dim=None,
    ).eval()
    staged = MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300, 600)).eval()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1.0, 350.0, 700.0, 999.0])
    with torch.no_grad():
        assert torch.allclose(staged(x, t).sample, unet(x, t).sample, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_fourier_model_cast_to_half_precision_returns_its_dtype(dtype):
    # the output is divided by the float32 timesteps: a half-precision model returned float32 (as diffusers'
    # UNet2DModel does), so a sampling loop's next sample was float32 and the model refused it (not its dtype)
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(**TINY_UNET, time_embedding_type="fourier", stage_boundaries=(0.5,),
                                  boundary_units="sigma").eval()  # fmt: skip
    x, sigmas = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        expected = model(x, sigmas).sample
        out = model.to(dtype)(x.to(dtype), sigmas).sample
        assert out.dtype == dtype and (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
        assert model.to(dtype)(out, sigmas).sample.dtype == dtype  # the next step takes it
        assert model.float()(x, sigmas.double()).sample.dtype == torch.float32  # float64 timesteps too


@pytest.mark.parametrize(
    "edit",
    [
        {"decoder_block_out_channels": [[16, 24], [8, 16], [8, 8]]},  # a decoder of another width
        {"stage_boundaries": [500], "decoder_block_out_channels": [[16, 24], [8, 16]]},  # a decoder fewer
        {"stage_boundaries": [300, 500, 700], "decoder_block_out_channels": [[16, 24], [8, 16], [4, 8], [4, 8]]},
    ],
)
def test_checkpoint_disagreeing_with_config_is_refused(tiny_multistage, tmp_path, edit):
    tiny_multistage.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its config"):
        MultiStageUNet2DModel.from_pretrained(tmp_path)


def test_sigma_units_route_edm_noise_conditioning(tiny_unet_kwargs):
    model = MultiStageUNet2DModel(**tiny_unet_kwargs, stage_boundaries=(0.5, 5.0), boundary_units="sigma").eval()
    calls = stage_batch_sizes(model, "decoders")
    c_noise = torch.log(torch.tensor([0.1, 1.0, 2.0, 10.0])) / 4
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8), c_noise)
    assert calls == {0: [1], 1: [2], 2: [1]}


def test_bad_inputs_name_the_argument(tiny_multistage, tiny_unet_kwargs):
    with pytest.raises(ValueError, match="`sample`.*\\(2, 4, 8, 8\\)"):
        tiny_multistage(torch.randn(2, 4, 8, 8), 10)
    with pytest.raises(ValueError, match="`timestep`"):
        tiny_multistage(torch.randn(2, 3, 8, 8), torch.tensor([10, 1500]))
    with pytest.raises(ValueError, match="`stage_index`"):
        tiny_multistage(torch.randn(2, 3, 8, 8), 10, stage_index=3)
    with pytest.raises(ValueError, match="`class_labels`"):
        tiny_multistage(torch.randn(2, 3, 8, 8), 10, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`unet`"):
        MultiStageUNet2DModel.from_unet(torch.nn.Conv2d(3, 3, 1))
    for boundaries in (500, "500"):  # were a TypeError, and the unsorted boundaries 5, 0, 0
        with pytest.raises(ValueError, match=f"`stage_boundaries` must be a sequence of numbers, got {boundaries!r}"):
            MultiStageUNet2DModel.from_unet(UNet2DModel(**tiny_unet_kwargs), stage_boundaries=boundaries)


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.randn(2, 3, 9, 9), 10), {}, r"`sample`'s height and width must be multiples of 2.*\(2, 3, 9, 9\)"),
        ((torch.randn(3, 8, 8), 10), {}, r"`sample` must have shape \(batch, 3, height, width\)"),
        ((X.long(), 10), {}, r"`sample` must be a floating-point tensor, got dtype torch.int64"),
        ((X.double(), 10), {}, r"`sample` must have the model's dtype torch.float32, got torch.float64"),
        ((X.half(), 10), {"stage_index": 1}, r"`sample` must have the model's dtype torch.float32, got torch.float16"),
        ((X, torch.tensor([10, 20, 30])), {}, r"`timestep` must be one value or one per sample \(2\)"),
        ((X, torch.tensor([[10], [20]])), {}, r"`timestep` .*got shape \(2, 1\)"),
        ((X, torch.tensor([10.0, float("nan")])), {}, r"`timestep` must be finite, got \[10.0, nan\]"),
        ((X, float("inf")), {"stage_index": 1}, r"`timestep` must be finite, got inf"),
        ((X, 10), {"stage_index": 1.0}, r"`stage_index` must be an integer, got 1.0"),
        ((X, 10), {"stage_index": True}, r"`stage_index` must be an integer, got True"),
        ((X, 10), {"stage_index": torch.tensor(1)}, r"`stage_index` must be an integer, got tensor\(1\)"),
        ((X, 10), {"stage_index": -1}, r"`stage_index` must be in \[0, 3\), got -1"),
    ],
)
def test_forward_checks_its_inputs_like_a_library(tiny_multistage, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_multistage(*args, **kwargs)


@pytest.fixture
def class_conditional(tiny_unet_kwargs):
    torch.manual_seed(0)
    return MultiStageUNet2DModel(**tiny_unet_kwargs, num_class_embeds=5, stage_boundaries=(500,)).eval()


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (None, "must be given"),
        (torch.tensor([0, 5]), r"class indices in \[0, 5\), got \[0, 5\]"),
        (torch.tensor([1, 2, 3]), r"one label or one per sample \(2\), got shape \(3,\)"),
        (torch.tensor([1.0, 2.0]), "integer class indices, got dtype torch.float32"),
    ],
)
def test_bad_class_labels_name_the_argument(class_conditional, labels, message):
    with pytest.raises(ValueError, match=f"`class_labels` .*{message}"):
        class_conditional(X, 10, class_labels=labels)


def test_the_stage_index_path_reads_no_tensor_value(class_conditional, host_reads):
    # no device synchronisation per pipeline step; the routed path reads the timesteps (and checks the labels)
    labels, t = torch.tensor([1, 4]), torch.tensor([700, 700])
    with torch.no_grad():
        assert host_reads(lambda: class_conditional(X, t, class_labels=labels, stage_index=1)) == 0
        assert host_reads(lambda: class_conditional(X, t, class_labels=labels)) > 0


@pytest.mark.parametrize(
    ("timestep", "kwargs", "message"),
    [
        (1000, {}, r"`timestep` must lie in \[0, 1000\).*got \[1000, 1000\]"),  # inside the partition's range
        (torch.tensor([10, -1]), {}, r"`timestep` must lie in \[0, 1000\).*got \[10, -1\]"),
        (500.5, {}, r"`timestep` must be integer training timesteps .*got dtype torch.float64"),
        (torch.tensor([500.0, 20.0]), {"stage_index": 0}, r"`timestep` must be integer .*got dtype torch.float32"),
    ],
)
def test_a_learned_time_embedding_names_timesteps_it_has_no_row_for(tiny_unet_kwargs, timestep, kwargs, message):
    # were an IndexError or an `embedding` dtype RuntimeError from inside the time embedding
    model = MultiStageUNet2DModel(**tiny_unet_kwargs, time_embedding_type="learned", stage_boundaries=(500,)).eval()
    with torch.no_grad():
        assert model(X, torch.tensor([0, 999])).sample.shape == X.shape  # the table's first and last rows
        with pytest.raises(ValueError, match=message):
            model(X, timestep, **kwargs)


def test_a_sample_of_another_dtype_runs_under_autocast_and_in_a_cast_model(tiny_multistage):
    # the dtype check follows the model's dtype and leaves mixed precision (autocast) alone
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert tiny_multistage(X.bfloat16(), 10).sample.shape == X.shape
        assert tiny_multistage.to(torch.bfloat16)(X.bfloat16(), 10).sample.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="`sample` must have the model's dtype torch.bfloat16, got torch.float32"):
            tiny_multistage(X, 10)
        with pytest.raises(ValueError, match="`sample` must have the model's dtype"):  # not autocast's RuntimeError
            tiny_multistage.to("meta")(X.to("meta"), 10, stage_index=0)


# ---------------------------------------------------------------------------------------------------------------
# decoders as the authors' code builds them: no adapters, per-decoder attention placement
ATTN, PLAIN = "AttnUpBlock2D", "UpBlock2D"
UNADAPTED = {
    "stage_boundaries": (442, 631),
    "decoder_block_out_channels": ((16, 24), (8, 16), (4, 8)),
    "decoder_skip_adapters": False,
    "decoder_up_block_types": ((ATTN, ATTN), (ATTN, PLAIN), (PLAIN, PLAIN)),
}


@pytest.fixture
def unadapted(tiny_unet_kwargs):
    torch.manual_seed(0)
    return MultiStageUNet2DModel(**tiny_unet_kwargs, **UNADAPTED).eval()


def test_unadapted_decoders_concatenate_the_encoder_skips_at_the_encoder_widths(unadapted):
    # encoder (8, 16): skips 8, 8, 8, 16 and a 16-wide middle block, whatever each decoder's own widths
    for decoder, (narrow, wide) in zip(unadapted.decoders, UNADAPTED["decoder_block_out_channels"]):
        assert all(isinstance(a, torch.nn.Identity) for a in [decoder.mid_adapter, *decoder.skip_adapters])
        resnets = [r for block in decoder.up_blocks for r in block.resnets]
        assert [r.conv1.in_channels for r in resnets] == [16 + 16, wide + 8, wide + 8, narrow + 8]
        assert [r.out_channels for r in resnets] == [wide, wide, narrow, narrow]
    attends = [[hasattr(block, "attentions") for block in d.up_blocks] for d in unadapted.decoders]
    assert attends == [[True, True], [True, False], [False, False]]
    assert not any(name.startswith("decoders.2.") for name in unadapted.attn_processors)


def test_unadapted_mixed_batch_matches_per_sample_reference(unadapted):
    x, t = torch.randn(5, 3, 8, 8), torch.tensor([5, 900, 450, 700, 100])
    assert_mixed_batch_matches_reference(unadapted, x, t, (2, 1, 2), "decoders")


def test_unadapted_save_reload_is_bit_identical(unadapted, tmp_path):
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900])
    reloaded = assert_save_reload_bit_identical(unadapted, tmp_path, x, t, ["diffusion_pytorch_model.safetensors"])
    assert reloaded.config.decoder_skip_adapters is False
    assert [tuple(t) for t in reloaded.config.decoder_up_block_types] == list(UNADAPTED["decoder_up_block_types"])


def test_without_adapters_encoder_wide_decoders_are_unchanged(tiny_unet_kwargs):
    torch.manual_seed(0)
    adapted = MultiStageUNet2DModel(**tiny_unet_kwargs).eval()
    unadapted = MultiStageUNet2DModel(**tiny_unet_kwargs, decoder_skip_adapters=False).eval()
    unadapted.load_state_dict(adapted.state_dict(), strict=True)  # the same weights, names and shapes
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900])
    with torch.no_grad():
        assert torch.equal(adapted(x, t).sample, unadapted(x, t).sample)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"decoder_skip_adapters": "no"}, "decoder_skip_adapters"),
        ({"decoder_up_block_types": (("SkipUpBlock2D", PLAIN),) * 3}, "decoder_skip_adapters"),
        ({"decoder_up_block_types": ((ATTN, PLAIN),) * 2}, "decoder_up_block_types"),
        ({"decoder_up_block_types": ((ATTN,), (ATTN,), (PLAIN,))}, "decoder_up_block_types"),
        ({"attention_head_dim": 8, "decoder_up_block_types": ((PLAIN, ATTN),) * 3}, "attention_head_dim"),
    ],
)
def test_bad_decoder_options_name_the_argument(tiny_unet_kwargs, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        MultiStageUNet2DModel(**{**tiny_unet_kwargs, **UNADAPTED, **kwargs})


@pytest.mark.parametrize(
    "name, value",
    [
        ("layers_per_block", 0),  # was a RuntimeError in the first forward
        ("layers_per_block", 1.5),  # was a TypeError
        ("attention_head_dim", 0),  # was a ZeroDivisionError
        ("attention_head_dim", -4),
        ("norm_num_groups", 0),
        ("in_channels", 0),
        ("out_channels", 0),
        ("num_class_embeds", -1),
        ("time_embedding_dim", 0),
        ("attn_norm_num_groups", 0),
        ("sample_size", 0),  # was accepted silently
        ("sample_size", (8,)),
        ("upsample_type", "foo"),  # was a shape error in the first forward
        ("downsample_type", "foo"),  # was silently a plain downsampler
        ("mid_block_type", "foo"),
        ("class_embed_type", "foo"),
    ],
)
def test_bad_sizes_and_block_kinds_name_the_argument_and_the_value(tiny_unet_kwargs, name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be .*got {re.escape(repr(value))}"):
        MultiStageUNet2DModel(**{**tiny_unet_kwargs, name: value})


@pytest.mark.parametrize(
    "name, value",
    [
        ("block_out_channels", 5),  # was a TypeError (len of an int)
        ("block_out_channels", [8, "16"]),
        ("down_block_types", "DownBlock2D"),  # was counted as 11 block types
        ("up_block_types", ["UpBlock2D", 2]),
    ],
)
def test_block_lists_of_the_wrong_type_name_the_argument_and_the_value(tiny_unet_kwargs, name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a list of .*got {re.escape(repr(value))}"):
        MultiStageUNet2DModel(**{**tiny_unet_kwargs, name: value}, stage_boundaries=(500,))


PLAIN = {"down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")}


def test_compile_stages_refuses_a_bad_warmup(tiny_unet_kwargs):
    model = MultiStageUNet2DModel(**tiny_unet_kwargs)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="`warmup` must be a dict .* got tuple"):
        model.compile_stages(warmup=(x, 500), backend="eager")
    with pytest.raises(ValueError, match=r"`warmup` must be a dict .* got \['sample', 'stage_index', 'timestep'\]"):
        model.compile_stages(warmup={"sample": x, "timestep": 500, "stage_index": 0}, backend="eager")
    with pytest.raises(ValueError, match=r"`warmup` must be a dict .* got \['t', 'x'\]"):  # was a TypeError
        model.compile_stages(warmup={"x": x, "t": 500}, backend="eager")


def test_compile_stages_refuses_bad_compile_arguments_before_compiling(tiny_unet_kwargs):
    """`torch.compile`'s own refusals (a TypeError, an InvalidBackend, a RuntimeError) become `ValueError`s naming the
    argument, raised before any region is compiled or any dynamo limit is changed."""
    model = MultiStageUNet2DModel(**tiny_unet_kwargs)
    limit = torch._dynamo.config.recompile_limit
    for kwargs, match in (
        ({"backend": "eager", "fullgraf": True}, r"\['fullgraf'\], which are not arguments of `torch.compile`"),
        ({"backend": "no_such_backend"}, r"`torch.compile` refuses \{'backend': 'no_such_backend'\}"),
        ({"mode": "fastest"}, r"`torch.compile` refuses \{'mode': 'fastest'\}"),
    ):
        with pytest.raises(ValueError, match=match):
            model.compile_stages(**kwargs)
    assert not any(getattr(region, "_compiled_call_impl", None) for region in model.compile_regions())
    assert torch._dynamo.config.recompile_limit == limit


def test_compile_stages_compiles_17_identical_decoders_once(tiny_unet_kwargs, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    torch.manual_seed(0)
    boundaries = TimestepPartition.uniform(17).boundaries  # more stages than `recompile_limit`
    model = MultiStageUNet2DModel(**{**tiny_unet_kwargs, **PLAIN}, mid_block_type=None, stage_boundaries=boundaries)
    model = model.eval()
    # a mixed batch of 14 over 7 of the stages, two samples each (torch's convolutions guard on batches up to 15)
    x, t = torch.randn(14, 3, 8, 8), torch.tensor([(0, *boundaries)[s] + 1 for s in (0, 3, 5, 8, 11, 14, 16)] * 2)
    with torch.no_grad():
        expected = model(x, t).sample
    counter = GraphCounter()
    model.compile_stages(warmup={"sample": x[:2], "timestep": t[:2]}, backend=counter, dynamic=True)
    # the time embedding, two down blocks of two widths, and one graph for all 17 decoders
    assert len(model.compile_regions()) == 20 and counter.graphs == 4
    assert torch._dynamo.config.recompile_limit == 8 * 17  # torch's default 8 for each decoder (one `forward`)
    with torch.no_grad():
        for stage in (16, 3, 0, 9):
            model(x[:2], t[:2], stage_index=stage)
        assert torch.allclose(model(x, t).sample, expected, atol=1e-6)  # a mixed batch: every decoder, compiled
    assert counter.graphs == 4
    torch._dynamo.reset()


def test_compile_stages_tailored_decoders_never_hit_the_recompile_limit(tiny_unet_kwargs, monkeypatch):
    """Tailored decoders compile once each, and again for a batch of 1 (specialised) and for a batch over 15 (a
    guard of torch's convolutions): three decoders already need more than torch's default 8 entries of their shared
    `forward`, beyond which a decoder silently runs uncompiled."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    widths = ((8, 16), (12, 20), (16, 24))
    model = MultiStageUNet2DModel(
        **{**tiny_unet_kwargs, **PLAIN}, stage_boundaries=(333, 666), decoder_block_out_channels=widths
    ).eval()
    t = torch.tensor([100, 500, 900])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x, t).sample
        model.compile_stages(warmup={"sample": x[:2], "timestep": t[:2]}, backend="eager", dynamic=True)
        for batch in (1, 32):  # a batch of 1 is specialised; torch's convolutions guard on batches up to 15
            for stage in range(3):
                model(torch.randn(batch, 3, 8, 8), t[stage].expand(batch), stage_index=stage)
        assert torch.allclose(model(x, t).sample, expected, atol=1e-6)  # one row per stage
    assert not [reason for reason in counters["unimplemented"] if "recompile limit" in reason]
    torch._dynamo.reset()


def test_decoders_free_each_encoder_skip_once_read(tiny_unet_kwargs):
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(**tiny_unet_kwargs, stage_boundaries=(500,)).eval()
    encode, skips = model.encode, []

    def recording_encode(*args, **kwargs):  # weak references to the encoder's skips
        hidden, encoded, emb, timesteps = encode(*args, **kwargs)
        skips[:] = [weakref.ref(skip) for skip in encoded]
        return hidden, encoded, emb, timesteps

    model.encode, alive = recording_encode, []
    for decoder in model.decoders:  # how many of the skips are alive when the last up block starts
        decoder.up_blocks[-1].register_forward_pre_hook(lambda *_: alive.append(sum(s() is not None for s in skips)))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(x, torch.tensor([10, 20, 30, 40]))  # one stage
        model(x, torch.tensor([10, 900, 20, 800]))  # mixed: two stages
    assert len(skips) == 4 and alive[0] == 2  # one stage: only the two skips the last up block reads, as UNet2DModel
    assert alive[1:] == [0, 0]  # mixed: the encoder's skips are freed once gathered in stage order


@pytest.mark.parametrize("widths", [5, [8, 16], [[8, 16], [8, 16.5], [8, 16]], [[8, 16], [8, "16"], [8, 16]]])
def test_decoder_widths_of_another_form_are_refused_by_name(widths):
    with pytest.raises(
        ValueError, match="`decoder_block_out_channels` must be one list of integer widths per decoder"
    ):
        MultiStageUNet2DModel(**TINY_UNET, decoder_block_out_channels=widths)


@pytest.mark.parametrize(
    "types", [5, "UpBlock2D", [["AttnUpBlock2D", "UpBlock2D"], 7, ["AttnUpBlock2D", "UpBlock2D"]]]
)
def test_decoder_up_block_types_of_another_form_are_refused_by_name(types):
    with pytest.raises(ValueError, match="`decoder_up_block_types` must be one list of up block names per decoder"):
        MultiStageUNet2DModel(**TINY_UNET, decoder_up_block_types=types)


def test_one_class_label_as_a_number_tensor_serves_a_timestep_class_embedding(tiny_unet_kwargs):
    # a 0-d label passed the label check, then failed diffusers' `Timesteps` assertion ("should be a 1d-array")
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_kwargs, class_embed_type="timestep").eval()
    staged = MultiStageUNet2DModel.from_unet(unet, stage_boundaries=(300, 650)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        expected = unet(x, t, class_labels=torch.tensor([7])).sample
        assert torch.allclose(staged(x, t, class_labels=torch.tensor(7)).sample, expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_timestep_class_embedding_runs_in_a_cast_model(tiny_unet_kwargs, dtype):
    # the labels' sinusoidal projection is float32: it entered the cast class embedding as is ("mat1 and mat2 must
    # have the same dtype", as in diffusers' UNet2DModel); now it is cast to the embedding's dtype, as the time's is
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(**tiny_unet_kwargs, class_embed_type="timestep", stage_boundaries=(500,)).eval()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 7])
    with torch.no_grad():
        expected = model(x, t, class_labels=labels).sample
        out = model.to(dtype)(x.to(dtype), t, class_labels=labels).sample
    assert out.dtype == dtype and torch.allclose(out.float(), expected, atol=5e-2)


def test_peft_lora_training_works_on_the_unconditional_model(tiny_multistage):
    """diffusers' `UNet2DModel` has no LoRA loader, nor does this model, but PEFT injects LoRA layers into it
    directly (LoRA training): the injected model gives the base model's output, and a mixed batch trains the
    adapters of the decoders it visits."""
    peft = pytest.importorskip("peft")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 900])  # stages 0 and 2
    reference = tiny_multistage(x, t).sample
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"]), tiny_multistage)
    out = tiny_multistage(x, t).sample
    assert torch.allclose(out, reference, atol=1e-6)  # lora_B starts at zero
    out.sum().backward()
    grads = {n: p.grad for n, p in tiny_multistage.named_parameters() if "lora_" in n}
    trained = {n.split(".")[1] for n, grad in grads.items() if n.startswith("decoders.") and grad is not None}
    assert trained == {"0", "2"} and grads["mid_block.attentions.0.to_q.lora_A.default.weight"] is not None
    assert len(peft.utils.get_peft_model_state_dict(tiny_multistage)) > 0


def test_fuse_qkv_projections_fuses_every_attention_and_unfuse_restores_the_processors(tiny_multistage):
    model = tiny_multistage.eval()
    assert_fuse_qkv_projections_round_trip(model, torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 990]))


@pytest.mark.parametrize(
    "name, value",
    [
        ("norm_eps", float("nan")),  # every output NaN, silently
        ("norm_eps", -1.0),  # the norms of flat groups NaN
        ("norm_eps", 0),
        ("dropout", float("nan")),  # a RuntimeError in the first training forward only
        ("dropout", 1.0),  # every residual branch dropped
        ("dropout", "0.1"),  # torch's TypeError, without the argument's name
    ],
)
def test_bad_norm_eps_and_dropout_name_the_argument_and_the_value(tiny_unet_kwargs, name, value):
    # MultiStageDDPMppUNet2DModel and IUNet2DModel refused these (check_norm_eps_and_dropout); this model built them
    with pytest.raises(ValueError, match=f"`{name}` must be .*got {re.escape(repr(value))}"):
        MultiStageUNet2DModel(**{**tiny_unet_kwargs, name: value})


@pytest.mark.parametrize(
    "name, value",
    [
        ("downsample_padding", -1),  # was built, then a shape error in the first forward
        ("downsample_padding", 1.5),
        ("freq_shift", "1"),  # was built, then a TypeError in the first forward
        ("freq_shift", float("nan")),  # was built: every output NaN
        ("mid_block_scale_factor", float("nan")),  # was built: every output NaN
        ("mid_block_scale_factor", 0),  # was built: a division by zero in the middle block
        ("center_input_sample", "no"),  # was taken as True ("no" is truthy)
        ("flip_sin_to_cos", 0),
        ("add_attention", "no"),
        ("act_fn", None),  # was an AttributeError (None.lower())
        ("act_fn", "foo"),  # was diffusers' error naming no argument
        ("resnet_time_scale_shift", "foo"),  # was diffusers' error naming `time_embedding_norm`
    ],
)
def test_bad_numeric_options_and_flags_name_the_argument_and_the_value(tiny_unet_kwargs, name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be .*got {re.escape(repr(value))}"):
        MultiStageUNet2DModel(**{**tiny_unet_kwargs, name: value})


def test_a_freq_shift_of_half_the_time_width_is_refused(tiny_unet_kwargs):
    # the sinusoidal frequencies divide by (block_out_channels[0] // 2 - freq_shift): 0 made every output NaN, silently
    with pytest.raises(ValueError, match=r"`freq_shift`=4 must differ from 4, half .*block_out_channels"):
        MultiStageUNet2DModel(**{**tiny_unet_kwargs, "freq_shift": 4})
    MultiStageUNet2DModel(**{**tiny_unet_kwargs, "freq_shift": 4, "time_embedding_type": "fourier"})  # unused there
