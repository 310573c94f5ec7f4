"""`IUNet2DModel`: MEME's iU-Net expert (iFormer's Inception mixer in a U-Net)."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline, IUNet2DModel, TimestepPartition
from diffusers_stages.models.iunet import InceptionMixer
from tests.models.staged_model_tester import (
    assert_fuse_qkv_projections_round_trip,
    assert_group_offload_keeps_outputs,
    assert_layerwise_casting_works,
)

TINY = {
    "sample_size": 8,
    "block_out_channels": (8, 16),
    "attention_head_dim": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def build(**kwargs) -> IUNet2DModel:
    torch.manual_seed(0)
    return IUNet2DModel(**{**TINY, **kwargs}).eval()


def mixers(model) -> list[InceptionMixer]:
    return [m for m in model.modules() if isinstance(m, InceptionMixer)]


def test_shapes_class_labels_and_per_sample_timesteps():
    model = build(num_class_embeds=3, attention_ratios=(0.5, 0.75), attention_pool_sizes=(2, 1))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([10, 500, 990]), class_labels=torch.tensor([0, 1, 2]))
        (tup,) = model(x, 500, class_labels=torch.tensor([0, 1, 2]), return_dict=False)
        labels_matter = model(x, 500, class_labels=torch.tensor([2, 1, 0])).sample
    assert out.sample.shape == (3, 3, 8, 8) and tup.shape == (3, 3, 8, 8) and torch.isfinite(tup).all()
    assert not torch.allclose(tup, labels_matter)
    # the split per level: (conv, max-pool, attention) channels; 0.75 of 16 = 3 heads of 4
    assert mixers(model)[0].widths == (2, 2, 4) and mixers(model)[1].widths == (2, 2, 12)
    # odd sizes: the up path doubles back to each skip's size
    odd = build(sample_size=7, attention_pool_sizes=2)
    with torch.no_grad():
        assert odd(torch.randn(1, 3, 7, 7), 3.5).sample.shape == (1, 3, 7, 7)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, 500)


@pytest.mark.parametrize("ratio, conv_free, attention_free", [(0.0, False, True), (1.0, True, False)])
def test_ratio_extremes_drop_a_path(ratio, conv_free, attention_free):
    model = build(attention_ratios=ratio)
    for mixer in mixers(model):
        assert (mixer.attention is None) == attention_free
        assert (mixer.conv is None and mixer.pool is None) == conv_free
    assert (len(model.attn_processors) == 0) == attention_free  # no attention anywhere in the pure convolution net
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8), 100).sample.shape == (2, 3, 8, 8)


def test_attention_share_changes_the_parameter_mix():
    conv, mixed = build(attention_ratios=0.0), build(attention_ratios=0.5)
    assert not any("attention" in n for n, _ in conv.named_parameters())
    assert any("mixer.attention.to_q" in n for n, _ in mixed.named_parameters())
    assert any("mixer.pool" in n for n, _ in mixed.named_parameters())


def test_save_and_reload_are_bit_identical(tmp_path):
    model = build(num_class_embeds=3, attention_ratios=(0.25, 0.75))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    reloaded = IUNet2DModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_ratios == [0.25, 0.75]
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 800]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=y).sample, reloaded(x, t, class_labels=y).sample)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build(attention_ratios=0.5).train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 700])

    def gradients():
        model.zero_grad()
        model(x, t).sample.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert all(block.gradient_checkpointing for block in model.mid_blocks)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_inside_expert_routing_and_the_pipeline(tmp_path):
    experts = [build(attention_ratios=r) for r in (0.0, 0.5, 1.0)]
    model = ExpertRoutingModel(experts, stage_boundaries=TimestepPartition.uniform(3).boundaries)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        routed = model(x, torch.tensor([10, 500, 900])).sample
        assert torch.equal(routed[1:2], experts[1](x[1:2], torch.tensor([500])).sample)
    pipe = ExpertRoutingPipeline(experts=model, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    pipe.save_pretrained(tmp_path)
    reloaded = ExpertRoutingPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.experts.experts[2]) is IUNet2DModel
    again = reloaded(batch_size=1, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 8, 8, 3) and (images == again).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention_ratios": 1.5}, "`attention_ratios` must lie in [0, 1]"),
        ({"attention_ratios": -0.1}, "`attention_ratios` must lie in [0, 1]"),
        ({"attention_ratios": (0.5, 0.5, 0.5)}, "`attention_ratios` must be one value or one per level (2)"),
        ({"attention_head_dim": 3}, "must be multiples of `attention_head_dim`=3"),
        ({"attention_head_dim": 0}, "`attention_head_dim` must be a positive integer"),
        ({"norm_num_groups": 3}, "must be multiples of `norm_num_groups`=3"),
        ({"norm_num_groups": 0}, "`norm_num_groups` must be a positive integer"),
        ({"attention_pool_sizes": 0}, "`attention_pool_sizes` must be positive integers"),
        ({"block_out_channels": ()}, "`block_out_channels` must be positive integers"),
        ({"layers_per_block": 0}, "`layers_per_block` must be a positive integer"),
        ({"block_out_channels": 8}, "`block_out_channels` must be positive integers, one per level, got 8"),
        ({"layers_per_block": True}, "`layers_per_block` must be a positive integer, got True"),
        ({"attention_ratios": True}, "`attention_ratios` must lie in [0, 1]"),
        ({"in_channels": 0}, "`in_channels` must be a positive integer, got 0"),
        ({"num_class_embeds": -1}, "`num_class_embeds` must be a positive integer or None, got -1"),
        # were accepted, and the pipelines later failed on a `height` the caller never gave (or an IndexError)
        (
            {"sample_size": 0},
            "`sample_size` must be a positive integer, a (height, width) pair of them or None, got 0",
        ),
        ({"sample_size": "8"}, "`sample_size` must be a positive integer, a (height, width) pair of them or None"),
        ({"sample_size": (8,)}, "`sample_size` must be a positive integer, a (height, width) pair of them or None"),
        # were built: a dropout of 1 (every residual branch zeroed in training) or nan (a RuntimeError at the first
        # call), torch's unnamed message outside [0, 1], a TypeError for a string; an epsilon of nan made every
        # output nan, 0 or below a group norm that divides by zero on a flat feature map
        ({"dropout": 1.0}, "`dropout` must be a number in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "`dropout` must be a number in [0, 1), got -0.1"),
        ({"dropout": float("nan")}, "`dropout` must be a number in [0, 1), got nan"),
        ({"dropout": "0.1"}, "`dropout` must be a number in [0, 1), got '0.1'"),
        ({"norm_eps": float("nan")}, "`norm_eps` must be a positive finite number, got nan"),
        ({"norm_eps": 0.0}, "`norm_eps` must be a positive finite number, got 0.0"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):  # fmt: skip
        IUNet2DModel(**{**TINY, **kwargs})


def test_channels_last_blocks_match_the_plain_layout(monkeypatch):
    # on CPU the blocks run channels-last (faster oneDNN kernels); the result must be the NCHW computation's, returned
    # in the caller's layout
    import diffusers_stages.models.iunet as iunet

    model = build(num_class_embeds=3).eval()
    sample, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    layouts = []
    block = model.down_blocks[0].blocks[0]
    block.register_forward_hook(
        lambda m, args, out: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        fast = model(sample, 300, class_labels=labels).sample
        monkeypatch.setattr(iunet, "compute_memory_format", lambda sample: torch.contiguous_format)
        plain = model(sample, 300, class_labels=labels).sample
    assert layouts == [True, False] and fast.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_a_model_in_training_mode_samples_as_in_eval_mode(tmp_path):
    # diffusers' `ResnetBlock2D` makes its shortcut's input contiguous in training mode: a model as built (training
    # mode) must still give the outputs of its saved and reloaded copy (eval mode), bit for bit, without gradients
    torch.manual_seed(0)
    model = IUNet2DModel(**TINY, num_class_embeds=3)
    assert model.training and model.down_blocks[1].blocks[0].resnet.conv_shortcut is not None
    model.save_pretrained(tmp_path)
    reloaded = IUNet2DModel.from_pretrained(tmp_path)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 800]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=y).sample, reloaded(x, t, class_labels=y).sample)
    model(x, t, class_labels=y).sample.mean().backward()  # training itself is unchanged
    assert model.conv_in.weight.grad is not None


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"sample": torch.randn(2, 4, 8, 8)}, "`sample` must have shape (batch, 3, height, width)"),
        ({"sample": torch.zeros(2, 3, 8, 8, dtype=torch.long)}, "`sample` must be a floating-point tensor"),
        ({"timestep": torch.tensor([1, 2, 3])}, "`timestep` must be one value or one per sample (2)"),
        ({"timestep": "5"}, "`timestep` must be a number or a tensor, got str"),
        ({"class_labels": torch.tensor([0, 1, 2])}, "`class_labels` must hold one label or one per sample (2)"),
        ({"class_labels": None}, "`class_labels` must be given"),
    ],
)
def test_bad_inputs_are_named(inputs, message):
    # a `ValueError` naming the argument, as `UViT2DModel` gives, not a shape error inside a convolution
    model = build(num_class_embeds=3)
    call = {"sample": torch.randn(2, 3, 8, 8), "timestep": 5, "class_labels": torch.tensor([0, 1]), **inputs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(**call)


def test_a_sample_of_another_dtype_is_named():
    # was torch's "Input type (double) and bias type (float) should be the same" from inside `conv_in`
    with pytest.raises(ValueError, match="`sample` must have the model's dtype torch.float32, got torch.float64"):
        build()(torch.randn(1, 3, 8, 8, dtype=torch.float64), 10)


@pytest.mark.parametrize("size, pool_size", [(7, 3), (6, 4), (8, 2), (5, 2), (2, 4)])
def test_pooled_attention_goes_back_to_the_pixels_of_its_cell(size, pool_size):
    # iFormer's low-frequency path: Upsample(MSA(AvgPool(X))), the upsampling by the pooling factor: every pixel gets
    # the attention output of the pooled cell it was averaged into. Resizing to the map's size instead misplaced rows
    # and columns whenever the pooling factor did not divide the map (7 by 3: pixel 5 took cell 2's output, not 1's)
    mixer = InceptionMixer(8, 8, 4, pool_size, 4, 1e-5)
    mixer.attention = torch.nn.Identity()  # the pooled grid itself comes back
    x = torch.randn(1, 8, size, size)
    cell = torch.arange(size) // pool_size
    expected = torch.nn.functional.avg_pool2d(x, pool_size, ceil_mode=True)[:, :, cell][:, :, :, cell]
    assert torch.equal(mixer._low(x), expected)


def test_layerwise_casting_runs_and_stays_close():
    model = build(num_class_embeds=3).eval()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 2])
    assert_layerwise_casting_works(model, lambda m, dtype: m(x.to(dtype), t, class_labels=labels).sample)


def test_group_offload_gives_the_same_outputs(tmp_path):
    # block-level offload hooks each level (`down_blocks.{i}`): the forward ran the level's blocks without calling
    # the level, so its weights were never loaded (on an accelerator they stayed on the offload device)
    model = build(num_class_embeds=3).eval()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 2])
    assert_group_offload_keeps_outputs(model, lambda m: m(x, t, class_labels=labels).sample, tmp_path)


def test_fuse_qkv_projections_fuses_every_attention_and_unfuse_restores_the_processors():
    model = build(attention_ratios=0.5)
    assert_fuse_qkv_projections_round_trip(model, torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 990]))
