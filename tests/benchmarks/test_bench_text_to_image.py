"""`benchmarks/bench_text_to_image.py`: one tiny run; the warm start costs the plain U-Net's FLOPs exactly, tailored
decoders scale them, and attention is counted (SDPA on CPU as explicit matmuls)."""

import os
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import bench_text_to_image as bench  # noqa: E402
from benchmarks.measure import count_flops  # noqa: E402


def test_attention_flops_are_counted_with_sdpa_as_with_explicit_matmuls():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**bench.unet_kwargs(4)).eval()
    x, text = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 256)
    with torch.inference_mode():
        sdpa, _ = count_flops(lambda: unet(x, 10, text))
        unet.set_attn_processor(AttnProcessor())
        explicit, _ = count_flops(lambda: unet(x, 10, text))
    assert explicit == sdpa  # count_flops counts CPU scaled_dot_product_attention (torch's counter alone: 0)
    with torch.inference_mode(), torch.utils.flop_counter.FlopCounterMode(display=False) as torch_only:
        unet.set_attn_processor(AttnProcessor2_0())
        unet(x, 10, text)
    assert torch_only.get_total_flops() < sdpa  # what the package's formula adds


@pytest.mark.slow
def test_tiny_run_reports_ratios_against_the_same_run(capsys):
    args = bench.parse_args(["--latent_size", "8", "--steps", "1", "--repeats", "1", "--train_batch", "3"])
    rows = {name: values for name, values, _, _ in bench.main(args)}
    calls = [values for name, values in rows.items() if name.startswith("U-Net call FLOPs")]
    assert all(v["warm start"] == v["plain"] for name, v in rows.items() if "FLOPs" in name)
    assert calls[0]["tailored"] > calls[0]["plain"] and calls[2]["tailored"] < calls[2]["plain"]  # x1.5 / x0.5
    assert "routing overhead inside StableDiffusionPipeline" in capsys.readouterr().out


def test_routing_cost_is_measured_per_call_against_the_source():
    extra, noise = bench.routing_cost_per_call(repeats=5, device="cpu")
    assert abs(extra) < 0.05 and abs(noise) < 0.05  # seconds: differences of two tiny calls, not calls
