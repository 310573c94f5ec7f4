import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusers_stages import UViT2DModel
from diffusers_stages.models.uvit import dual_uvit_configs
from tests.models.staged_model_tester import (
    assert_fuse_qkv_projections_round_trip,
    assert_group_offload_keeps_outputs,
    assert_layerwise_casting_works,
)

TINY = {"sample_size": 8, "hidden_size": 16, "num_layers": 5, "num_attention_heads": 2, "patch_size": 2}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UViT2DModel(**TINY).eval()


def test_output_shape_and_return_types(model):
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 500, 999]))
        assert isinstance(out, UNet2DOutput) and out.sample.shape == (3, 3, 8, 8)
        (tuple_out,) = model(x, torch.tensor([1, 500, 999]), return_dict=False)
    assert torch.equal(tuple_out, out.sample)
    other = UViT2DModel(**{**TINY, "in_channels": 4, "out_channels": 2, "final_conv": False})
    assert other(torch.randn(1, 4, 8, 8), 3).sample.shape == (1, 2, 8, 8)
    assert other.output_head.conv is None and model.output_head.conv is not None  # U-ViT's final conv


def test_long_skips_join_each_in_block_to_its_mirror_out_block(model):
    assert len(model.blocks) == 5 and len(model.skip_proj) == 2
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(f"block{i}", out))
    for j, proj in enumerate(model.skip_proj):
        proj.register_forward_hook(lambda m, args, out, j=j: seen.__setitem__(f"skip{j}", args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), 10)
    # out-block 3 takes in-block 1's output, out-block 4 takes in-block 0's (concatenated after the hidden state)
    assert torch.equal(seen["skip0"][..., :16], seen["block2"]) and torch.equal(
        seen["skip0"][..., 16:], seen["block1"]
    )
    assert torch.equal(seen["skip1"][..., :16], seen["block3"]) and torch.equal(
        seen["skip1"][..., 16:], seen["block0"]
    )
    # and the skips matter: cutting the skip half of a projection changes the output
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = model(x, 10).sample
        model.skip_proj[1].weight[:, 16:] = 0
        assert not torch.allclose(model(x, 10).sample, before)


def test_time_and_class_are_tokens():
    torch.manual_seed(0)
    model = UViT2DModel(**TINY, num_class_embeds=3).eval()
    assert model.pos_embed.shape == (1, 2 + 16, 16)  # time token, class token, 4x4 patches
    tokens = {}
    model.blocks[0].register_forward_hook(lambda m, args, out: tokens.__setitem__("in", args[0]))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([7, 900]), class_labels=torch.tensor([0, 2])).sample
        time_token = model.time_proj(torch.tensor([7, 900])) + model.pos_embed[0, 0]
        class_token = model.class_embed(torch.tensor([0, 2])) + model.pos_embed[0, 1]
        assert torch.allclose(tokens["in"][:, 0], time_token) and torch.allclose(tokens["in"][:, 1], class_token)
        # the output depends on both
        assert not torch.allclose(model(x, torch.tensor([8, 900]), class_labels=torch.tensor([0, 2])).sample, out)
        assert not torch.allclose(model(x, torch.tensor([7, 900]), class_labels=torch.tensor([1, 2])).sample, out)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, 10)
    mlp = UViT2DModel(**TINY, mlp_time_embed=True)
    assert mlp.time_embed is not None and UViT2DModel(**TINY).time_embed is None


def test_save_reload_bit_identical_and_strict(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UViT2DModel.from_pretrained(tmp_path).eval()
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in model.config.items() if not k.startswith("_")
    }
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([3, 600])).sample, model(x, torch.tensor([3, 600])).sample)
    # a checkpoint from another depth does not load into this config
    UViT2DModel(**{**TINY, "num_layers": 3}).save_pretrained(tmp_path / "shallow")
    config = UViT2DModel.load_config(tmp_path / "shallow")
    (tmp_path / "shallow" / "config.json").write_text((tmp_path / "config.json").read_text())
    assert config["num_layers"] == 3
    with pytest.raises(ValueError, match="does not match its config"):
        UViT2DModel.from_pretrained(tmp_path / "shallow")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UViT2DModel(**TINY, num_class_embeds=2)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 700]), torch.tensor([0, 1])

    def grads():
        model.zero_grad()
        model(x, t, class_labels=y).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    calls = []
    model.blocks[0].norm1.register_forward_hook(lambda m, args, out: calls.append(1))
    checkpointed = grads()
    assert len(calls) == 2  # the block was recomputed in the backward pass
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"num_layers": 4}, "num_layers"),
        ({"num_layers": 0}, "num_layers"),
        ({"sample_size": 9}, "sample_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"hidden_size": 15}, "hidden_size"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"mlp_ratio": 0.05}, "mlp_ratio"),  # int(16 * 0.05) = 0: a feed-forward layer of no width before
        ({"mlp_ratio": float("inf")}, "mlp_ratio"),  # an OverflowError inside the constructor before
        ({"num_class_embeds": 0}, "num_class_embeds"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_class_embeds": True}, "num_class_embeds"),  # a TypeError inside torch before
        ({"out_channels": -1}, "out_channels"),
        ({"out_channels": 0}, "out_channels"),  # silently `in_channels` before
        # flags given as 0/1 or strings were built silently ("no" read as True)
        ({"qkv_bias": "no"}, "qkv_bias"),
        ({"mlp_time_embed": 1}, "mlp_time_embed"),
        ({"final_conv": 0}, "final_conv"),
    ],
)
def test_bad_configs_name_the_argument(change, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        UViT2DModel(**{**TINY, **change})


def test_forward_checks_its_inputs(model):
    with pytest.raises(ValueError, match=r"`sample` must be 8x8"):
        model(torch.randn(1, 3, 16, 16), 10)
    with pytest.raises(ValueError, match="`timestep` must be one value or one per sample"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3]))


def test_dual_backbone_configs():
    configs = dual_uvit_configs(3, 13, hidden_size=16, patch_size=2, num_attention_heads=2, sample_size=8)
    shallow, deep = UViT2DModel(**configs["shallow"]), UViT2DModel(**configs["deep"])
    assert (len(shallow.blocks), len(deep.blocks)) == (3, 13)
    assert shallow.config.hidden_size == deep.config.hidden_size == 16
    with pytest.raises(ValueError, match="`shallow_depth`"):
        dual_uvit_configs(13, 3, hidden_size=16, patch_size=2, num_attention_heads=2)
    with pytest.raises(ValueError, match="`deep_depth`"):
        dual_uvit_configs(3, 12, hidden_size=16, patch_size=2, num_attention_heads=2)


def test_a_sample_of_another_dtype_is_named(model):
    # was torch's "Input type (double) and bias type (float) should be the same" from inside the patch embedding
    with pytest.raises(ValueError, match="`sample` must have the model's dtype torch.float32, got torch.float64"):
        model(torch.randn(1, 3, 8, 8, dtype=torch.float64), 10)


def test_dual_backbone_configs_name_a_bad_depth_and_refuse_num_layers():
    # a depth that is not a number was a TypeError from the depth comparison; `num_layers` among the common keys
    # was silently replaced by each backbone's depth
    with pytest.raises(ValueError, match="`shallow_depth` must be an odd positive number of U-ViT blocks, got '3'"):
        dual_uvit_configs("3", 13, hidden_size=16, patch_size=2, num_attention_heads=2)
    with pytest.raises(ValueError, match="`num_layers`"):
        dual_uvit_configs(3, 13, hidden_size=16, patch_size=2, num_attention_heads=2, num_layers=5)


@pytest.mark.parametrize("kwargs", [{}, {"num_class_embeds": 3, "mlp_time_embed": True}], ids=["plain", "class"])
def test_layerwise_casting_runs_and_stays_close(kwargs):
    # the patch embedding and `pos_embed` (kept in the model's dtype, by diffusers' default patterns) refused a
    # bfloat16 compute dtype's input, which `model.dtype` asks for
    torch.manual_seed(0)
    model = UViT2DModel(**TINY, **kwargs).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    labels = torch.tensor([0, 2]) if kwargs else None
    assert_layerwise_casting_works(model, lambda m, dtype: m(x.to(dtype), t, class_labels=labels).sample)


def test_group_offload_gives_the_same_outputs(tmp_path):
    # diffusers' `enable_group_offload`: every block and the embeddings are loaded by their hooks before their use
    torch.manual_seed(0)
    model = UViT2DModel(**TINY, num_class_embeds=3, mlp_time_embed=True).eval()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 2])
    assert_group_offload_keeps_outputs(model, lambda m: m(x, t, class_labels=labels).sample, tmp_path)


def test_attention_processors_are_listed_set_and_fused(model):
    # the blocks hold diffusers' `Attention`, but the model had no `attn_processors`/`set_attn_processor` (an
    # AttributeError, unlike `IUNet2DModel`) and no `fuse_qkv_projections`
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    assert sorted(model.attn_processors) == [f"blocks.{i}.attn1.processor" for i in range(TINY["num_layers"])]
    with torch.no_grad():
        expected = model(x, t).sample
        model.set_attn_processor(AttnProcessor())
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor}
        assert torch.allclose(model(x, t).sample, expected, atol=1e-5)
    model.set_attn_processor(dict.fromkeys(model.attn_processors, AttnProcessor2_0()))
    assert_fuse_qkv_projections_round_trip(model, x, t)


def test_the_time_token_is_uvits_sinusoid_of_the_raw_timestep():
    # U-ViT's `timestep_embedding`: [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / half), on the timestep as given (the
    # README's U-ViT table: DuoDiff's CIFAR-10/CelebA configs divide it by 1000 first, which is not reproduced)
    model = UViT2DModel(**TINY).eval()
    t = torch.tensor([0.0, 7.0, 999.0])
    half = TINY["hidden_size"] // 2
    args = t[:, None] * torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)[None]
    assert torch.allclose(model.time_proj(t), torch.cat([torch.cos(args), torch.sin(args)], dim=-1), atol=1e-5)


def test_duodiffs_backbones_have_the_papers_sizes():
    # DuoDiff on CIFAR-10: U-ViTs of width 512, 8 heads, patch 2; deep depth 13 (44.3M), shallow depth 3 (~10.1M)
    configs = dual_uvit_configs(3, 13, hidden_size=512, patch_size=2, num_attention_heads=8, sample_size=32)
    models = {name: UViT2DModel(**config) for name, config in configs.items()}
    sizes = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert round(sizes["deep"] / 1e6, 1) == 44.3 and round(sizes["shallow"] / 1e6, 1) == 10.1
    # long skips: 6 in-blocks, a middle block and 6 out-blocks; 1 + 1 + 1
    assert len(models["deep"].skip_proj) == 6 and len(models["shallow"].skip_proj) == 1
