"""Stable Diffusion / SDXL pipeline folders -> the same pipeline with a staged unet, and one stage back out as a plain
`UNet2DConditionModel` (issue 15, part 4)."""

import os
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from diffusers_stages import MultiStageUNet2DConditionModel
from diffusers_stages.conversion import multistage_to_unet, pipelines_to_experts, unet_to_multistage
from tests.conftest import with_safety_checker


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_pipeline_folder_converts_to_a_staged_pipeline_of_the_same_class(
    tiny_sd_components, tiny_sdxl_components, tmp_path, capsys, sdxl
):
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    source = pipeline_class(**(tiny_sdxl_components if sdxl else tiny_sd_components))
    source.save_pretrained(tmp_path / "source")
    out = str(tmp_path / "staged")
    args = ["--source", str(tmp_path / "source"), "--output_path", out, "--stage_boundaries", "300", "600"]
    converted = unet_to_multistage.main(unet_to_multistage.parse_args([*args, "--verify", "--verify_steps", "2"]))
    printed = capsys.readouterr().out
    assert printed.count("max |source - converted|") == 4 and "images of 'a photo of a cat'" in printed
    assert type(converted) is pipeline_class and type(converted.unet) is MultiStageUNet2DConditionModel
    reloaded = pipeline_class.from_pretrained(out)
    assert reloaded.unet.partition.boundaries == (300.0, 600.0)
    assert np.abs(_images(reloaded) - _images(source)).max() < 1e-5


def test_stage_exports_as_a_plain_unet2dconditionmodel(tiny_sd_components, tmp_path, capsys):
    pipe = StableDiffusionPipeline(**tiny_sd_components)
    pipe.unet = MultiStageUNet2DConditionModel.from_unet(pipe.unet, stage_boundaries=(500,))
    with torch.no_grad():  # decoders trained apart
        for p in pipe.unet.decoders.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pipe.save_pretrained(tmp_path / "staged")
    for stage in (0, 1):
        out = str(tmp_path / f"stage{stage}")
        args = ["--source", str(tmp_path / "staged"), "--stage", str(stage), "--output_path", out, "--verify"]
        multistage_to_unet.main(multistage_to_unet.parse_args([*args, "--tolerance", "0"]))
        assert "max |source - converted| = 0.000e+00" in capsys.readouterr().out
        unet = UNet2DConditionModel.from_pretrained(out)  # plain diffusers reads it
        x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
        with torch.no_grad():
            expected = pipe.unet(x, 250 + 500 * stage, text, stage_index=stage).sample
            assert torch.equal(unet(x, 250 + 500 * stage, text).sample, expected)


def test_text_to_image_sources_are_refused_by_name(tiny_sd_components, tmp_path):
    source = StableDiffusionPipeline(**tiny_sd_components)
    source.save_pretrained(tmp_path / "sd")
    sd = str(tmp_path / "sd")

    def convert(*argv, output="refused"):
        return unet_to_multistage.main(unet_to_multistage.parse_args(["--output_path", str(tmp_path / output), *argv]))

    # sigma stages: the pipeline hands the unet its scheduler's timesteps, so every step would route as a sigma
    with pytest.raises(ValueError, match="`--boundary_units sigma` does not fit the source: its DDIMScheduler"):
        convert("--source", sd, "--stage_boundaries", "2.5", "--boundary_units", "sigma")
    # a class option for a text-conditioned U-Net
    with pytest.raises(ValueError, match="`--unconditional_label` 3 is for class-conditional UNet2DModel sources"):
        convert("--source", sd, "--stage_boundaries", "500", "--unconditional_label", "3")
    with pytest.raises(ValueError, match="`--verify_steps` 1001 does not fit the source's"):
        convert("--source", sd, "--stage_boundaries", "500", "--verify", "--verify_steps", "1001")
    assert not (tmp_path / "refused").exists()
    # an already staged pipeline (a key-mismatch error before), a bare unet folder and a plain one to export from
    # (a diffusers error about `cross_attention_dim` before)
    convert("--source", sd, "--stage_boundaries", "500", output="staged")
    with pytest.raises(ValueError, match="is already staged .*MultiStageUNet2DConditionModel.*train_text_to_image"):
        convert("--source", str(tmp_path / "staged"), "--stage_boundaries", "300")
    with pytest.raises(ValueError, match="holds a UNet2DConditionModel, not the UNet2DModel expected"):
        convert("--source", str(tmp_path / "sd" / "unet"), "--stage_boundaries", "300")
    with pytest.raises(ValueError, match="holds a UNet2DConditionModel, not the MultiStageUNet2DModel expected"):
        multistage_to_unet.main(
            multistage_to_unet.parse_args(["--source", sd, "--stage", "0", "--output_path", str(tmp_path / "e")])
        )


def test_pipelines_to_experts_refuses_text_to_image_sources_without_calling_them_supported(
    tiny_sd_components, tmp_path
):
    StableDiffusionPipeline(**tiny_sd_components).save_pretrained(tmp_path / "sd")
    sd, out = str(tmp_path / "sd"), str(tmp_path / "routed")
    args = pipelines_to_experts.parse_args(["--sources", sd, sd, "--stage_boundaries", "500", "--output_path", out])
    # it said "supported pipelines are [..., 'StableDiffusionPipeline', ...]" while refusing one
    with pytest.raises(ValueError, match=r"holds a StableDiffusionPipeline.*ExpertRoutingModel\(\[") as error:
        pipelines_to_experts.main(args)
    assert "supported pipelines are" not in str(error.value)
    assert not (tmp_path / "routed").exists()


def test_stage_export_of_a_fused_or_freeu_model_equals_that_stage(tiny_cond_unet):
    # a fused model's `to_qkv`/`to_kv` copies were a RuntimeError of `load_state_dict`; FreeU (set on the decoder's
    # up blocks, not in config or weights) was dropped, so the export differed from the stage it claims to equal
    staged = MultiStageUNet2DConditionModel.from_unet(tiny_cond_unet(0), stage_boundaries=(300, 600))
    x, text = torch.randn(2, 4, 8, 8, generator=torch.manual_seed(0)), torch.randn(2, 5, 32)
    with torch.no_grad():
        staged.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        unet = multistage_to_unet.multistage_stage_to_unet(staged, 1)
        assert torch.equal(unet(x, 450, text).sample, staged(x, 450, text).sample)
        staged.disable_freeu()
        staged.fuse_qkv_projections()
        unet = multistage_to_unet.multistage_stage_to_unet(staged, 1)
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
        assert torch.allclose(unet(x, 450, text).sample, staged(x, 450, text).sample, atol=1e-6)


def _stored_dtypes(folder) -> set:
    from safetensors import safe_open

    with safe_open(os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".safetensors"))), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_a_half_precision_folder_verifies_and_stays_half_precision(tiny_sd_components, tmp_path, capsys):
    # --verify was a torch RuntimeError (text encoder loaded in float16, the U-Nets in float32), and the unet and vae
    # were written in float32: a mixed folder twice the source's size
    StableDiffusionPipeline(**tiny_sd_components).to(torch.float16).save_pretrained(tmp_path / "fp16")
    out = tmp_path / "staged"
    args = ["--source", str(tmp_path / "fp16"), "--output_path", str(out), "--stage_boundaries", "500"]
    unet_to_multistage.main(
        unet_to_multistage.parse_args([*args, "--verify", "--verify_steps", "2", "--tolerance", "0"])
    )
    assert capsys.readouterr().out.count("max |source - converted| = 0.000e+00") == 3
    for component in ("unet", "vae", "text_encoder"):
        assert _stored_dtypes(out / component) == {"F16"}, component
    # and the stage exported from it
    export = ["--source", str(out), "--stage", "1", "--output_path", str(tmp_path / "stage1"), "--verify"]
    multistage_to_unet.main(multistage_to_unet.parse_args([*export, "--tolerance", "0"]))
    assert _stored_dtypes(tmp_path / "stage1") == {"F16"}


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_the_pipelines_own_options_are_kept(tiny_sd_components, tiny_sdxl_components, tmp_path, sdxl):
    # the pipeline was rebuilt from its components only: SDXL's force_zeros_for_empty_prompt=False became True (other
    # negative embeddings, other images: --verify failed) and SD's requires_safety_checker=False became True
    pipeline_class, option = (
        (StableDiffusionXLPipeline, "force_zeros_for_empty_prompt")
        if sdxl
        else (StableDiffusionPipeline, "requires_safety_checker")
    )
    components = tiny_sdxl_components if sdxl else tiny_sd_components
    pipeline_class(**{**components, option: False}).save_pretrained(tmp_path / "source")
    out = str(tmp_path / "staged")
    args = ["--source", str(tmp_path / "source"), "--output_path", out, "--stage_boundaries", "500", "--verify"]
    unet_to_multistage.main(unet_to_multistage.parse_args([*args, "--verify_steps", "2"]))
    assert pipeline_class.from_pretrained(out).config[option] is False


@pytest.mark.parametrize(
    "name, entry, message",
    [
        (
            "scheduler",
            ["diffusers", "UNet2DModel"],
            "'scheduler' of `--source` is a UNet2DModel, not a SchedulerMixin",
        ),
        ("scheduler", None, "has no 'scheduler' component, got None"),
        ("vae", 5, r"entry 'vae' must be \[library, class\], got 5"),
        ("text_encoder", ["os", "system"], "'text_encoder' comes from 'os'"),
    ],
    ids=["scheduler-is-a-model", "no-scheduler", "vae-number", "foreign-library"],
)
def test_a_malformed_source_index_is_named_and_writes_nothing(tiny_sd_components, tmp_path, name, entry, message):
    # diffusers' loader raised an OSError or TypeError (or its own message about a built-in function) for these
    import json

    StableDiffusionPipeline(**tiny_sd_components).save_pretrained(tmp_path / "sd")
    index_path = tmp_path / "sd" / "model_index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), name: entry}))
    args = ["--source", str(tmp_path / "sd"), "--output_path", str(tmp_path / "out"), "--stage_boundaries", "500"]
    with pytest.raises(ValueError, match=message):
        unet_to_multistage.main(unet_to_multistage.parse_args(args))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("feature_extractor", ["CLIPImageProcessor", "CLIPFeatureExtractor"])
def test_a_folder_with_a_safety_checker_converts(tiny_sd_components, tmp_path, feature_extractor):
    # Stable Diffusion 1.x's layout: the safety checker is ["stable_diffusion", ...], a class of diffusers' own
    # pipeline module, which the index check must leave to diffusers; older folders name the feature extractor
    # CLIPFeatureExtractor, gone from transformers 5, which diffusers loads as CLIPImageProcessor (the check refused it)
    import json

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    StableDiffusionPipeline(**with_safety_checker(tiny_sd_components)).save_pretrained(tmp_path / "sd")
    index_path = tmp_path / "sd" / "model_index.json"
    assert '"stable_diffusion"' in index_path.read_text()
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "feature_extractor": ["transformers", feature_extractor]}))
    args = ["--source", str(tmp_path / "sd"), "--output_path", str(tmp_path / "out"), "--stage_boundaries", "500"]
    converted = unet_to_multistage.main(unet_to_multistage.parse_args(args))
    assert isinstance(converted.safety_checker, StableDiffusionSafetyChecker)
    assert isinstance(StableDiffusionPipeline.from_pretrained(tmp_path / "out").feature_extractor, CLIPImageProcessor)


@pytest.mark.parametrize(
    "component, corruption",
    [("vae", "link"), ("vae", "integers"), ("vae", "missing")]
    + [
        (name, corruption)
        for name in ("text_encoder", "safety_checker")
        for corruption in ("link", "missing", "integers")
    ],
)
def test_a_corrupted_component_is_refused_and_writes_nothing(tiny_sd_components, tmp_path, component, corruption):
    # the unet was loaded strictly, the other components by diffusers' loader: a weight file linking out of the folder
    # was read, integer weights were cast, a missing VAE weight left randomly initialised, and all written out
    from tests.conftest import corrupt_weights

    StableDiffusionPipeline(**with_safety_checker(tiny_sd_components)).save_pretrained(tmp_path / "sd")
    weights = "diffusion_pytorch_model.safetensors" if component == "vae" else "model.safetensors"
    key = corrupt_weights(str(tmp_path / "sd" / component / weights), corruption, outside=str(tmp_path))
    args = ["--source", str(tmp_path / "sd"), "--output_path", str(tmp_path / "out"), "--stage_boundaries", "500"]
    with pytest.raises(ValueError, match="outside the folder" if corruption == "link" else key):
        unet_to_multistage.main(unet_to_multistage.parse_args(args))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("component", ["text_encoder", "safety_checker"])
def test_a_transformers_component_without_safetensors_weights_is_named_and_never_unpickled(
    tiny_sd_components, tmp_path, component
):
    """A text encoder (or safety checker) folder holding only `pytorch_model.bin` was an OSError traceback from
    transformers ("no file named model.safetensors"): it is refused as the unet and vae are, naming what it holds."""
    from safetensors.torch import load_file

    StableDiffusionPipeline(**with_safety_checker(tiny_sd_components)).save_pretrained(tmp_path / "sd")
    folder, marker = tmp_path / "sd" / component, tmp_path / "ran"
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()

    class Payload:  # what a hostile pickle would run
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({**state, "payload": Payload()}, folder / "pytorch_model.bin")
    args = ["--source", str(tmp_path / "sd"), "--output_path", str(tmp_path / "out"), "--stage_boundaries", "500"]
    with pytest.raises(
        ValueError, match=rf"{component} holds no plain safetensors weights.*only \['pytorch_model.bin'\]"
    ):
        unet_to_multistage.main(unet_to_multistage.parse_args(args))
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize(
    "removed, message",
    [("tokenizer.json", "holds no vocabulary"), ("tokenizer_config.json", "pads text to `model_max_length`")],
)
def test_a_tokenizer_without_its_files_is_refused_and_writes_nothing(
    tiny_sd_components, tiny_sdxl_components, tmp_path, sdxl, removed, message
):
    # transformers 5 loads a tokenizer folder without its vocabulary as a tokenizer of its 2 special tokens, and one
    # without tokenizer_config.json with a `model_max_length` of 1e30: both were written out as complete tokenizers
    # (a tokenizer.json of 2 tokens, a config padding every prompt to 1e30 tokens: an OverflowError when sampling)
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipeline_class(**(tiny_sdxl_components if sdxl else tiny_sd_components)).save_pretrained(tmp_path / "sd")
    name = "tokenizer_2" if sdxl else "tokenizer"
    (tmp_path / "sd" / name / removed).unlink()
    args = ["--source", str(tmp_path / "sd"), "--output_path", str(tmp_path / "out"), "--stage_boundaries", "500"]
    with pytest.raises(ValueError, match=re.escape(f"`--source` {str(tmp_path / 'sd')!r}: its {name} {message}")):
        unet_to_multistage.main(unet_to_multistage.parse_args(args))
    assert not (tmp_path / "out").exists()
