"""The fused decoder path: decoders of one architecture run as one channel-packed network on a mixed batch, with the
per-stage path's outputs and gradients, and the per-stage path wherever fusing is not valid."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

from diffusers_stages import MultiStageDDPMppUNet2DModel, MultiStageUNet2DModel
from diffusers_stages.models import packed_decoders as packed_module
from diffusers_stages.models.decoders import StageDecoder, fused_decoders, stack_decoder_storage, stage_stack
from diffusers_stages.models.packed_decoders import packable
from tests.conftest import TINY_UNET
from tests.models.test_unet_multistage_ddpmpp import TINY as TINY_DDPMPP
from tests.test_routing import _OpCounts

BOUNDARIES = (250, 500, 750)  # four stages
CASES = {
    "even": [10, 300, 600, 900, 20, 310, 610, 910],
    "uneven": [10, 20, 30, 40, 900, 300],  # 4, 1, 0, 1 samples: padding and a stage without samples
    "two": [600, 900, 950],
    "batch 1": [600],  # one stage: never fused
}


def distinct_decoders(model):
    """The model with each decoder's parameters moved apart (identical copies would hide a stage mix-up)."""
    with torch.no_grad():
        for stage, decoder in enumerate(model.decoders):
            for p in decoder.parameters():
                p.add_(0.05 * (stage + 1) * torch.randn(p.shape, generator=torch.manual_seed(stage)))
    return model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return distinct_decoders(MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=BOUNDARIES, num_class_embeds=5))


class Counts:
    """How often each decoder's forward and the packed pass run (patched on the classes, so no hook disables the
    fusion)."""

    def __init__(self, monkeypatch):
        self.decoders, self.fused = [], 0
        forward, packed_call = StageDecoder.forward, packed_module._Packed.__call__

        def counted_forward(decoder, *args):
            self.decoders.append(decoder)
            return forward(decoder, *args)

        def counted_packed(*args, **kwargs):
            self.fused += 1
            return packed_call(*args, **kwargs)

        monkeypatch.setattr(StageDecoder, "forward", counted_forward)
        monkeypatch.setattr(packed_module._Packed, "__call__", counted_packed)


def run(model, t, fuse: bool | None = None, labels: bool = True):
    """Output and parameter gradients of one forward and backward: fused (whatever the padding), per stage, or as
    the model is set (``fuse=None``)."""
    if fuse is not None:
        model.enable_fused_decoders(max_padding=math.inf) if fuse else model.disable_fused_decoders()
    model.zero_grad(set_to_none=True)
    x = torch.randn(len(t), 3, 8, 8, generator=torch.manual_seed(1))
    class_labels = torch.arange(len(t)) % 5 if labels else None
    out = model(x, torch.tensor(t), class_labels=class_labels).sample
    (out * torch.randn(out.shape, generator=torch.manual_seed(2))).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same(reference, fused):
    (out, grads), (fused_out, fused_grads) = reference, fused
    assert torch.allclose(fused_out, out, atol=1e-5)
    assert grads.keys() == fused_grads.keys() and any(name.startswith("decoders.") for name in grads)
    scale = max(grad.abs().max() for grad in grads.values())  # fp32 sums in another order: rounding at this scale
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6 * scale), name


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_path_gives_the_per_stage_outputs_and_gradients(model, case, mode, monkeypatch):
    getattr(model, mode)()
    counts = Counts(monkeypatch)
    reference = run(model, CASES[case], fuse=False)
    per_stage_calls, counts.decoders = counts.decoders, []
    fused = run(model, CASES[case], fuse=True)
    assert_same(reference, fused)
    stages = model.partition.stage_for_timestep(torch.tensor(CASES[case])).unique().tolist()
    assert per_stage_calls == [model.decoders[s] for s in stages]
    if len(stages) > 1:  # one packed pass, which runs no decoder's forward
        assert (counts.fused, counts.decoders) == (1, [])
    else:
        assert counts.fused == 0 and counts.decoders == per_stage_calls


PACKED_VARIANTS = {
    "scale-shift time embedding": dict(resnet_time_scale_shift="scale_shift"),
    "skip adapters (1x1 convolutions)": dict(decoder_block_out_channels=((16, 32),) * 4),
    "no skip adapters": dict(decoder_block_out_channels=((16, 32),) * 4, decoder_skip_adapters=False),
    "dropout": dict(dropout=0.1),
    "no attention": dict(up_block_types=("UpBlock2D", "UpBlock2D"), down_block_types=("DownBlock2D",) * 2),
}


@pytest.mark.parametrize("variant", list(PACKED_VARIANTS))
def test_the_packed_pass_covers_the_up_blocks_options(variant, monkeypatch):
    torch.manual_seed(0)
    config = {**TINY_UNET, **PACKED_VARIANTS[variant]}
    model = distinct_decoders(MultiStageUNet2DModel(**config, stage_boundaries=BOUNDARIES)).eval()
    counts = Counts(monkeypatch)
    assert_same(run(model, CASES["uneven"], False, labels=False), run(model, CASES["uneven"], True, labels=False))
    assert counts.fused == 1


def test_the_packed_pass_uses_the_classic_attention_processors_scale(model, monkeypatch):
    model.set_attn_processor(AttnProcessor())  # scales by the layer's `scale`, as AttnProcessor2_0 does by default
    for attention in model.attn_processors:
        module = model.get_submodule(attention.removesuffix(".processor"))
        module.scale = 0.3  # a scale of the layer's own: AttnProcessor reads it, the packed pass must too
    counts = Counts(monkeypatch)
    assert_same(run(model, CASES["even"], False), run(model, CASES["even"], True))
    assert counts.fused == 1


def test_upsampling_resnets_are_packed(monkeypatch):
    torch.manual_seed(0)
    config = {**TINY_UNET, "upsample_type": "resnet"}  # up-sampling resnets instead of Upsample2D
    model = distinct_decoders(MultiStageUNet2DModel(**config, stage_boundaries=BOUNDARIES)).eval()
    counts = Counts(monkeypatch)
    assert_same(run(model, CASES["uneven"], False, labels=False), run(model, CASES["uneven"], True, labels=False))
    assert counts.fused == 1


def test_decoders_without_a_packed_form_run_per_stage(model, monkeypatch):
    class OwnProcessor(AttnProcessor2_0):  # a processor the packed pass does not know: it may compute anything
        pass

    model.set_attn_processor(OwnProcessor())
    assert not packable(model.decoders[0]) and fused_decoders(list(model.decoders)) is None
    model.set_attn_processor(AttnProcessor2_0())
    model.decoders[0].up_blocks[1].s1 = model.decoders[0].up_blocks[1].s2 = 0.9  # FreeU
    model.decoders[0].up_blocks[1].b1 = model.decoders[0].up_blocks[1].b2 = 1.1
    assert not packable(model.decoders[0]) and packable(model.decoders[1])
    assert not packable(torch.nn.Linear(2, 2))
    assert fused_decoders(list(model.decoders[1:])) is not None
    assert fused_decoders([model.decoders[1], model.decoders[0]]) is None  # FreeU on a decoder that is not the first
    counts = Counts(monkeypatch)
    reference = run(model, CASES["even"], fuse=False)
    assert_same(reference, run(model, CASES["even"], fuse=True))
    assert counts.fused == 0 and len(counts.decoders) == 8


def test_fused_path_without_class_labels_and_in_inference_mode():
    torch.manual_seed(0)
    model = distinct_decoders(MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=BOUNDARIES)).eval()
    assert_same(run(model, CASES["uneven"], False, labels=False), run(model, CASES["uneven"], True, labels=False))
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([10, 900, 300, 20])
    with torch.inference_mode():
        fused = model(x, t).sample
    model.disable_fused_decoders()
    assert torch.allclose(fused, model(x, t).sample, atol=1e-5)


def test_models_whose_decoders_have_no_packed_form_refuse_fusing():
    model = MultiStageDDPMppUNet2DModel(**{**TINY_DDPMPP, "decoder_channels": (16, 16, 16)})
    with pytest.raises(ValueError, match="`enable_fused_decoders` is not supported by MultiStageDDPMppUNet2DModel"):
        model.enable_fused_decoders()


def no_fusion_setups():
    def hooked(model):
        model.decoders[1].up_blocks[0].register_forward_pre_hook(lambda *_: None)

    def offloaded(model):  # what `enable_stage_offload` installs: accelerate hooks, which override `forward`
        add_hook_to_module(model.decoders[2], ModelHook())

    def checkpointed(model):
        model.enable_gradient_checkpointing()

    def other_processor(model):
        model.decoders[3].up_blocks[0].attentions[0].set_processor(AttnProcessor())

    def switched_off(model):
        model.disable_fused_decoders()

    return [hooked, offloaded, checkpointed, other_processor, switched_off]


@pytest.mark.parametrize("setup", no_fusion_setups(), ids=lambda setup: setup.__name__)
def test_the_per_stage_path_runs_where_fusing_is_not_valid(model, setup, monkeypatch):
    t = CASES["even"]
    reference = run(model, t, fuse=False)
    model.enable_fused_decoders()
    counts = Counts(monkeypatch)
    setup(model)
    out, grads = run(model, t)
    assert counts.fused == 0 and len(counts.decoders) == 4  # each decoder once, on its own samples
    assert_same(reference, (out, grads))


def test_tailored_or_compiled_decoders_and_stage_index_are_never_fused(tiny_multistage, monkeypatch):
    tiny_multistage.enable_fused_decoders()
    counts, x = Counts(monkeypatch), torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        tiny_multistage(x, torch.tensor([10, 500, 900]))  # three widths: three architectures
        tiny_multistage(x, torch.tensor([10, 500, 900]), stage_index=1)
    assert counts.fused == 0 and len(counts.decoders) == 4
    decoders = list(tiny_multistage.decoders)
    assert fused_decoders(decoders) is None and fused_decoders(decoders[1:2] * 2) is not None
    decoders[1].compile(backend="eager")  # what `compile_stages` does: the compiled decoder runs on its own
    assert fused_decoders(decoders[1:2] * 2) is None


def test_gradient_checkpointing_is_fused_only_without_gradients(model, monkeypatch):
    model.enable_gradient_checkpointing()
    model.enable_fused_decoders()
    assert laid_out(model.decoders)  # was refused for checkpointing: every fused call copied the parameters
    model.to(torch.float64).float()  # and a cast keeps the layout
    assert laid_out(model.decoders)
    counts = Counts(monkeypatch)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), class_labels=torch.tensor([0, 1]))
    assert counts.fused == 1


def test_fusing_adds_nothing_to_the_state_dict_and_follows_parameter_updates(model):
    keys = list(model.state_dict())
    model.enable_fused_decoders()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([10, 900, 300, 600])  # stages 0, 3, 1, 2
    with torch.no_grad():
        before = model(x, t, class_labels=torch.arange(4)).sample
        model.decoders[2].conv_out.bias.add_(1.0)  # what an optimizer step does: in place
        after = model(x, t, class_labels=torch.arange(4)).sample
    assert list(model.state_dict()) == keys
    assert torch.allclose(after - before, torch.tensor([0.0, 0.0, 0.0, 1.0])[:, None, None, None], atol=1e-5)


@pytest.mark.parametrize(("max_padding", "fused"), [(None, [0, 0]), (0.0, [1, 0]), (0.25, [1, 0]), (1.0, [1, 1])])
def test_fusing_is_off_by_default_and_bounded_by_the_padding(model, max_padding, fused, monkeypatch):
    if max_padding is not None:
        model.enable_fused_decoders(max_padding=max_padding)
    counts, passes = Counts(monkeypatch), []
    for t in ([10, 300, 600, 900], [10, 20, 30, 900]):  # even (no padding); 3 + 1 samples (6 rows for 4: 50%)
        with torch.no_grad():
            model(torch.randn(4, 3, 8, 8), torch.tensor(t), class_labels=torch.arange(4))
        passes.append(counts.fused - sum(passes))
    assert passes == fused


@pytest.mark.parametrize("max_padding", [-0.5, float("nan"), "0.1", True])
def test_a_bad_max_padding_names_the_argument(model, max_padding):
    with pytest.raises(ValueError, match="`max_padding` must be a number >= 0"):
        model.enable_fused_decoders(max_padding=max_padding)


@pytest.mark.parametrize("max_padding", [np.float32(0.5), np.float64(0.5), np.int64(1), Fraction(1, 2)])
def test_a_max_padding_of_any_real_number_type_is_taken(model, max_padding):
    # numpy's float32 (a ratio computed with numpy) was refused as "must be a number >= 0"
    model.enable_fused_decoders(max_padding=max_padding)
    assert model._fused_decoders_max_padding == float(max_padding)


def test_writes_through_param_data_are_seen_by_the_next_fused_call(model):
    # `param.data` writes change no version counter (diffusers' EMAModel.copy_to makes them): nothing may be cached
    from diffusers.training_utils import EMAModel

    model.enable_fused_decoders()
    x, t, labels = torch.randn(4, 3, 8, 8), torch.tensor([10, 900, 300, 600]), torch.arange(4)  # stages 0, 3, 1, 2

    def fused_and_one_at_a_time():
        with torch.no_grad():
            fused = model(x, t, class_labels=labels).sample
            single = [model(x[i : i + 1], t[i : i + 1], class_labels=labels[i : i + 1]).sample for i in range(4)]
        return fused, torch.cat(single)  # one sample is one stage: never fused

    before, _ = fused_and_one_at_a_time()
    model.decoders[2].conv_out.bias.data.add_(1.0)
    after, reference = fused_and_one_at_a_time()
    assert torch.allclose(after, reference, atol=1e-5)
    assert torch.allclose(after - before, torch.tensor([0.0, 0.0, 0.0, 1.0])[:, None, None, None], atol=1e-5)
    ema = EMAModel([torch.zeros_like(p) for p in model.parameters()])  # all-zero "EMA" weights
    ema.copy_to(model.parameters())
    zeros, reference = fused_and_one_at_a_time()
    assert torch.allclose(zeros, reference, atol=1e-6) and zeros.abs().max() == 0


def laid_out(decoders) -> bool:
    """Whether every parameter of ``decoders`` is the row of its stage in one storage per name."""
    rows = zip(*(list(decoder.parameters()) for decoder in decoders))
    return all(
        t.data_ptr() == row[0].data_ptr() + k * t.numel() * t.element_size() for row in rows for k, t in enumerate(row)
    )


def test_enabling_lays_the_decoders_out_as_one_stack_and_the_fused_pass_reads_it_without_a_copy(model, monkeypatch):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not laid_out(model.decoders)
    model.enable_fused_decoders()
    assert laid_out(model.decoders)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # values and keys unchanged
    stacks = []
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacks.append(1) or torch.cat([t[None] for t in a[0]]))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            model(torch.randn(4, 3, 8, 8), torch.tensor([10, 300, 600, 900]), class_labels=torch.arange(4))
    assert stacks == []  # every parameter stack was a view
    model(torch.randn(3, 3, 8, 8), torch.tensor([10, 300, 900]), class_labels=torch.arange(3))
    assert stacks  # stages 0, 1 and 3: not consecutive rows, so copied


def test_a_stack_of_rows_is_a_view_with_the_gradients_of_torch_stack():
    rows = torch.randn(3, 2, 5)
    tensors = [torch.nn.Parameter(row) for row in rows]  # rows of one storage
    apart = [torch.nn.Parameter(row.clone()) for row in rows]
    weight = torch.randn(3, 2, 5)
    for group in (tensors, apart):
        stacked = stage_stack(group)
        assert torch.equal(stacked, rows) and stacked.requires_grad
        (stacked * weight).sum().backward()
        assert all(torch.equal(t.grad, w) for t, w in zip(group, weight))
    assert stage_stack(tensors).data_ptr() == rows.data_ptr()
    assert stage_stack(apart).data_ptr() not in [t.data_ptr() for t in apart]
    assert stage_stack(tensors[1:]).data_ptr() == tensors[1].data_ptr()  # consecutive rows from the second
    assert stage_stack(tensors[::2]).data_ptr() != tensors[0].data_ptr()  # rows 0 and 2: a copy
    transposed = [torch.nn.Parameter(torch.randn(5, 2).t()) for _ in range(2)]
    assert torch.equal(stage_stack(transposed), torch.stack(transposed))
    with pytest.raises(ValueError, match="`tensors` must hold at least one tensor"):
        stage_stack([])
    with pytest.raises(ValueError, match="`decoders` must hold at least one decoder"):
        stack_decoder_storage([])
    with torch.inference_mode():
        assert stage_stack(tensors).data_ptr() == rows.data_ptr()


def test_the_stacked_layout_survives_casts_and_moves_and_saving(model, tmp_path):
    model.enable_fused_decoders()
    x, t, labels = torch.randn(4, 3, 8, 8), torch.tensor([10, 300, 600, 900]), torch.arange(4)
    with torch.no_grad():
        reference = model(x, t, class_labels=labels).sample
        model.to(torch.float64)
        assert laid_out(model.decoders) and model.decoders[0].conv_out.weight.dtype == torch.float64
        assert torch.allclose(model(x.double(), t, class_labels=labels).sample.float(), reference, atol=1e-5)
        model.float()
        pointers = [p.data_ptr() for p in model.parameters()]
        model.to("cpu")  # nothing to move: nothing copied
        assert [p.data_ptr() for p in model.parameters()] == pointers
        model.share_memory()  # moves each storage as a whole: laid out still, and not copied out of shared memory
        assert laid_out(model.decoders) and all(p.is_shared() for p in model.decoders.parameters())
    model.save_pretrained(tmp_path)  # safetensors of rows of one storage
    loaded = MultiStageUNet2DModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    loaded.enable_fused_decoders()
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, class_labels=labels).sample, reference, atol=1e-5)


def test_decoders_that_lost_the_layout_are_fused_from_a_copy(model, monkeypatch):
    import copy

    model.enable_fused_decoders()
    twin = copy.deepcopy(model)  # deepcopy gives every tensor storage of its own
    assert not laid_out(twin.decoders)
    t, counts = [10, 300, 600, 900], Counts(monkeypatch)
    assert_same(run(model, t, fuse=False), run(twin, t, fuse=None))
    assert counts.fused == 1
    assert stack_decoder_storage(list(twin.decoders)) and laid_out(twin.decoders)
    assert not stack_decoder_storage([twin.decoders[0], model.decoders[0].to(torch.float64)])  # not one structure


def test_a_laid_out_model_saves_and_loads_with_accelerate_and_safetensors(model, tmp_path):
    # accelerate (`save_state`, `save_model`) drops tensors that share a storage as tied weights, and safetensors'
    # `load_model` refuses a model whose tensors are parts of one storage: the state dict gives each row its own
    from accelerate import Accelerator
    from safetensors.torch import load_model, save_model

    model.enable_fused_decoders(max_padding=math.inf)
    optimizer = torch.optim.AdamW(model.parameters())
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator.save_state(tmp_path / "state")
    accelerator.save_model(model, tmp_path / "model")
    save_model(model, tmp_path / "plain.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for load in (
        lambda: accelerator.load_state(tmp_path / "state"),
        lambda: load_model(model, tmp_path / "model" / "model.safetensors"),
        lambda: load_model(model, tmp_path / "plain.safetensors"),
    ):
        load()
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        assert laid_out(model.decoders)  # loaded in place
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    state = model.state_dict()
    state["decoders.1.conv_out.bias"].add_(1.0)  # state dict entries still alias the parameters
    assert torch.equal(model.decoders[1].conv_out.bias, torch.ones_like(model.decoders[1].conv_out.bias))
    kept = model.decoders[0].state_dict(keep_vars=True)
    assert kept["conv_out.weight"] is model.decoders[0].conv_out.weight


def test_one_laid_out_decoder_saves_its_own_values_only(model, tmp_path):
    torch.save(model.decoders[1].state_dict(), tmp_path / "one before.bin")
    torch.save(model.state_dict(), tmp_path / "all before.bin")
    model.enable_fused_decoders()
    torch.save(model.decoders[1].state_dict(), tmp_path / "one.bin")
    torch.save(model.state_dict(), tmp_path / "all.bin")
    for name in ("one", "all"):  # the same records as before the layout (not the whole stack of every name)
        assert (tmp_path / f"{name}.bin").stat().st_size <= 1.05 * (tmp_path / f"{name} before.bin").stat().st_size
    loaded = torch.load(tmp_path / "all.bin", weights_only=True)
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("stage", [0, 2])
def test_an_in_place_update_between_forward_and_backward_is_an_error_as_per_stage(model, stage):
    # the stack is a view of the first decoder's storage: a change of another decoder's weights after the forward
    # would otherwise go unnoticed, and its gradients be computed with the new weights
    model.enable_fused_decoders()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([10, 300, 600, 900])
    out = model(x, t, class_labels=torch.arange(4)).sample
    with torch.no_grad():
        model.decoders[stage].conv_out.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|has been modified inplace"):
        out.sum().backward()


def test_a_channels_last_laid_out_model_keeps_every_state_dict_entry_for_accelerate(model):
    from accelerate.utils import clean_state_dict_for_safetensors

    model.enable_fused_decoders()
    model.to(memory_format=torch.channels_last)  # rows of one storage still, in channels-last order
    assert model.decoders[1].conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    state = model.state_dict()
    cleaned = clean_state_dict_for_safetensors(dict(state))  # what accelerate saves: nothing dropped as tied
    assert cleaned.keys() == state.keys()
    assert all(torch.equal(cleaned[k], v) for k, v in state.items())


def test_a_channels_last_laid_out_model_still_reads_its_stack_as_a_view(model, monkeypatch):
    model.enable_fused_decoders(max_padding=math.inf)
    t = [10, 20, 300, 600, 900]
    reference = run(model, t, fuse=False)
    model.enable_fused_decoders(max_padding=math.inf)
    model.to(memory_format=torch.channels_last)
    stacks = []
    stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacks.append(1) or stack(*a, **k))
    assert_same(reference, run(model, t))
    assert stacks == []  # every parameter stack was a view, channels-last rows included


def test_compiling_stages_and_fusing_decoders_refuse_each_other(model):
    # compiled decoders run on their own, so the fused pass never ran: either order was silently per stage
    model.enable_fused_decoders()
    with pytest.raises(ValueError, match=r"`compile_stages` compiles each decoder on its own.*disable_fused_decoders"):
        model.compile_stages(backend="eager")
    assert not any(getattr(region, "_compiled_call_impl", None) for region in model.compile_regions())
    model.disable_fused_decoders()
    model.compile_stages(backend="eager")
    with pytest.raises(ValueError, match=r"`enable_fused_decoders`: the decoders are compiled"):
        model.enable_fused_decoders()
    assert model._fused_decoders_max_padding is None


def test_enabling_under_inference_mode_keeps_the_parameters_trainable(model):
    # the stacks were made in inference mode: every decoder parameter became an inference tensor, and training
    # afterwards failed on the per-stage path too ("Inference tensors cannot be saved for backward")
    with torch.inference_mode():
        model.enable_fused_decoders(max_padding=math.inf)
    assert laid_out(model.decoders) and not any(p.is_inference() for p in model.parameters())
    reference = run(model, CASES["even"], fuse=False)
    assert_same(reference, run(model, CASES["even"], fuse=True))


def test_torch_compile_of_a_fused_model_traces_the_stacks_without_recompiling(model, monkeypatch):
    # torch.compile of the whole model (not `compile_stages`): the stacks are traced as plain stacks; tracing the
    # view check (storage pointers) broke the graph in every stack and recompiled `stage_stack` for every parameter
    # rank until dynamo's recompile limit made it run uncompiled
    torch._dynamo.reset()
    reference = run(model, CASES["even"], fuse=False)
    model.enable_fused_decoders(max_padding=math.inf)
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # an error, not a warning
    try:
        for _ in range(2):  # the second call reuses the graphs
            model.zero_grad(set_to_none=True)
            x = torch.randn(8, 3, 8, 8, generator=torch.manual_seed(1))
            out = compiled(x, torch.tensor(CASES["even"]), class_labels=torch.arange(8) % 5).sample
            (out * torch.randn(out.shape, generator=torch.manual_seed(2))).sum().backward()
            grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            assert_same(reference, (out.detach(), grads))
        assert not any("stage_stack" in str(reason) for reason in torch._dynamo.utils.counters["recompiles"])
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        assert breaks < 15, torch._dynamo.utils.counters["graph_break"]  # the routing's host reads, not 8 per stack
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_packed_nearest_upsampling_is_interpolate_with_its_gradients(memory_format):
    x = torch.randn(2, 6, 3, 5).contiguous(memory_format=memory_format).requires_grad_()
    weights = torch.randn(2, 6, 6, 10)
    out = packed_module._nearest_2x(x)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    reference = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), x)
    assert torch.equal(out, reference) and torch.allclose(grad, reference_grad, atol=1e-6)


def test_the_packed_pass_divides_only_by_output_factors_other_than_one(model, monkeypatch):
    model.eval()
    inputs = []
    forward = StageDecoder.forward

    def captured(decoder, hidden, skips, emb):
        inputs.append((hidden, list(skips), emb))
        return forward(decoder, hidden, skips, emb)

    monkeypatch.setattr(StageDecoder, "forward", captured)
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8), torch.full((4,), 10), class_labels=torch.arange(4))
    monkeypatch.setattr(StageDecoder, "forward", forward)
    hidden, skips, emb = inputs[0]  # 4 rows: 2 samples of each of 2 decoders
    counts = _OpCounts()
    with torch.no_grad(), counts:
        fused_decoders(list(model.decoders[:2]))(hidden, list(skips), emb)
    assert counts.counts["div"] == 0  # diffusers' factors are 1: no pass over the activations for them
    for block in (module for decoder in model.decoders for module in decoder.modules()):
        if isinstance(block, ResnetBlock2D):
            block.output_scale_factor = 2.0
        elif isinstance(block, Attention):
            block.rescale_output_factor = 3.0
    assert_same(run(model, CASES["even"], False), run(model, CASES["even"], True))
