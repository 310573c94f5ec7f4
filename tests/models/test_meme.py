import pytest
import torch

from diffusers_stages import ExpertRoutingModel, TimestepPartition
from diffusers_stages.models import build_meme_experts, meme_expert_configs
from diffusers_stages.models.meme import attention_share

TINY = {"sample_size": 8, "norm_num_groups": 4, "layers_per_block": 1, "attention_head_dim": 4}


def test_attention_share_rises_toward_the_noise_end():
    configs = meme_expert_configs(num_experts=4, block_out_channels=(32, 64, 64, 128))
    shares = [sum("Attn" in b for b in c["down_block_types"]) / 4 for c in configs]
    assert shares == [0.0, 0.25, 0.75, 1.0]  # round(share * 4) with shares 0, 1/3, 2/3, 1
    assert [c["add_attention"] for c in configs] == [False, True, True, True]
    # attention sits at the lowest resolutions; the up path mirrors the down path
    assert configs[1]["down_block_types"] == ("DownBlock2D",) * 3 + ("AttnDownBlock2D",)
    assert configs[1]["up_block_types"] == ("AttnUpBlock2D",) + ("UpBlock2D",) * 3


def test_experts_of_different_sizes_route_and_count_parameters():
    widths = [(16, 32), (16, 32), (8, 16), (8, 16)]  # larger near the data, as MEME's FFHQ experts
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
