"""One stage of a MultiStagePipeline -> a plain diffusers UNet2DModel folder."""

import os

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_stages import MultiStagePipeline
from diffusers_stages.conversion import multistage_to_unet


def export(source, output, stage, *extra):
    args = multistage_to_unet.parse_args(["--source", source, "--stage", str(stage), "--output_path", output, *extra])
    return multistage_to_unet.main(args)


@pytest.fixture
def staged_folder(tmp_path, tiny_multistage):
    with torch.no_grad():  # make the decoders differ, as after training
        for p in tiny_multistage.decoders.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = str(tmp_path / "staged")
    MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def test_stage_with_encoder_widths_exports_to_an_equal_unet(staged_folder, tmp_path, tiny_multistage, capsys):
    out = str(tmp_path / "stage1")
    export(staged_folder, out, 1, "--verify", "--tolerance", "0")
    assert "max |source - converted| = 0.000e+00" in capsys.readouterr().out
    unet = UNet2DModel.from_pretrained(out)  # plain diffusers reads it
    x = torch.randn(2, 3, 8, 8)
    for t in (450, 600):
        assert torch.equal(unet(x, t).sample, tiny_multistage(x, t, stage_index=1).sample)
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))


def test_tailored_stage_is_refused_with_the_reason(staged_folder, tmp_path):
    for stage in (0, 2):
        with pytest.raises(ValueError, match=f"Stage {stage}'s decoder has widths .* not the encoder's"):
            export(staged_folder, str(tmp_path / "out"), stage)
    with pytest.raises(ValueError, match=r"`stage` must be an integer in \[0, 3\), got 3"):
        export(staged_folder, str(tmp_path / "out"), 3)
    assert not (tmp_path / "out").exists()
