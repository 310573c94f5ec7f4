import pytest
import torch
from diffusers import UNet2DModel

from diffusers_stages import ExpertRoutingModel, IUNet2DModel, TimestepPartition
from diffusers_stages.models import build_meme_experts, meme_expert_configs
from diffusers_stages.models.meme import attention_share

TINY = {"sample_size": 8, "norm_num_groups": 4, "layers_per_block": 1, "attention_head_dim": 4}


def test_attention_share_rises_toward_the_noise_end():
    configs = meme_expert_configs(num_experts=4, block_out_channels=(32, 64, 64, 128))
    assert [c["attention_ratios"] for c in configs] == [0.125, 0.375, 0.625, 0.875]
    # attention pooled by 2 at the highest resolution only; the contract is shared
    assert {c["attention_pool_sizes"] for c in configs} == {(2, 1, 1, 1)}
    assert {(c["sample_size"], c["in_channels"], c["out_channels"]) for c in configs} == {(32, 3, 3)}
    experts = build_meme_experts(num_experts=4, block_out_channels=(32, 64), **TINY)
    assert all(type(e) is IUNet2DModel for e in experts)
    assert [attention_share(e) for e in experts] == [0.125, 0.375, 0.625, 0.875]  # whole heads at these widths
    assert meme_expert_configs(num_experts=1, block_out_channels=(8,))[0]["attention_pool_sizes"] == (1,)


def test_experts_of_different_sizes_route_and_count_parameters():
    widths = [(16, 32), (16, 32), (8, 16), (8, 16)]  # larger near the data
    experts = build_meme_experts(num_experts=4, block_out_channels=widths, attention_shares=[0, 0, 1, 1], **TINY)
    assert [attention_share(e) for e in experts] == [0.0, 0.0, 1.0, 1.0]
    sizes = [sum(p.numel() for p in e.parameters()) for e in experts]
    assert sizes[0] > sizes[3]
    model = ExpertRoutingModel(experts, stage_boundaries=TimestepPartition.uniform(4).boundaries).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 8, 8), torch.tensor([10, 300, 600, 900])).sample
    assert out.shape == (4, 3, 8, 8) and torch.isfinite(out).all()


def test_bad_presets_are_refused():
    with pytest.raises(ValueError, match="num_experts"):
        meme_expert_configs(num_experts=0)
    with pytest.raises(ValueError, match="attention_shares"):
        meme_expert_configs(num_experts=2, attention_shares=[1.0, 0.0])
    with pytest.raises(ValueError, match="attention_shares"):
        meme_expert_configs(num_experts=2, attention_shares=[0.5])
    with pytest.raises(ValueError, match="once per expert"):
        meme_expert_configs(num_experts=3, block_out_channels=[(8, 16), (8, 16)])
    with pytest.raises(ValueError, match="same number of levels"):
        meme_expert_configs(num_experts=2, block_out_channels=[(8, 16), (8, 16, 16)])
    # the wrong type: named, not a TypeError or float()'s "could not convert string to float"
    with pytest.raises(ValueError, match="`attention_shares` must hold 2 values in \\[0, 1\\], got 'ab'"):
        meme_expert_configs(num_experts=2, attention_shares="ab")
    with pytest.raises(ValueError, match="`attention_shares` must hold 2 values"):
        meme_expert_configs(num_experts=2, attention_shares=[0.2, None])
    with pytest.raises(
        ValueError, match="`block_out_channels` must be a list of widths, or one list per expert, got 64"
    ):
        meme_expert_configs(num_experts=2, block_out_channels=64)
    with pytest.raises(ValueError, match="`num_experts` must be a positive integer, got True"):
        meme_expert_configs(num_experts=True)
    assert [c["attention_ratios"] for c in meme_expert_configs(2, attention_shares=torch.tensor([0.25, 0.5]))] == [
        0.25,
        0.5,
    ]
    with pytest.raises(ValueError, match="Inception mixers"):
        attention_share(UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))  # fmt: skip


def test_bad_out_channels_and_mixed_widths_are_named():
    # `out_channels=0` became `in_channels` silently; a width list mixing lists and numbers was a TypeError
    with pytest.raises(ValueError, match="`out_channels` must be a positive integer or None, got 0"):
        meme_expert_configs(num_experts=2, out_channels=0)
    with pytest.raises(
        ValueError, match=r"`block_out_channels` must be a list of widths, or one list per expert, got"
    ):
        meme_expert_configs(num_experts=2, block_out_channels=[(8, 16), 16])
    assert meme_expert_configs(num_experts=2, in_channels=1)[0]["out_channels"] == 1  # None: as `in_channels`


def test_rounding_to_whole_heads_can_make_a_narrow_level_a_pure_mixer():
    # as the module docstring says: the shares (n + 1/2) / N are never 0 or 1, but each level rounds its share to
    # whole heads, so the README's expert 3 (share 0.875) has a pure-attention mixer at its 32-channel level
    # (3.5 heads of 8 round up to 4: no convolution or max-pool branch), and its 64-channel level keeps both paths
    from diffusers_stages.models.iunet import InceptionMixer

    config = meme_expert_configs(num_experts=4, block_out_channels=(32, 64, 64), norm_num_groups=16)[3]
    expert = IUNet2DModel(**config)
    widths = {m.widths for m in expert.modules() if isinstance(m, InceptionMixer)}
    assert widths == {(0, 0, 32), (4, 4, 56)}  # (conv, max-pool, attention) channels


def test_five_experts_get_whole_heads_near_the_shares_asked():
    # the default shares for 5 experts are 0.1, 0.3, ..., 0.9; at the training scripts' default widths (heads of 8)
    # every mixer's attention is whole heads (at least one where it attends) and each expert's share is within half
    # a head per level of the one asked, still rising toward the noise end
    from diffusers_stages.models.iunet import InceptionMixer

    configs = meme_expert_configs(num_experts=5, block_out_channels=(128, 256, 256, 256), sample_size=8)
    assert [c["attention_ratios"] for c in configs] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    with torch.device("meta"):
        experts = build_meme_experts(num_experts=5, block_out_channels=(128, 256, 256, 256), sample_size=8)
    shares = [attention_share(e) for e in experts]
    assert shares == sorted(shares) and shares == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9], abs=0.015)
    for expert in experts:
        for mixer in (m for m in expert.modules() if isinstance(m, InceptionMixer)):
            low = mixer.widths[2]
            assert low % 8 == 0 and 0 < low < sum(mixer.widths)  # whole heads; both paths at these widths
            assert mixer.attention.heads == low // 8
