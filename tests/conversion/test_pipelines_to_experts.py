"""Several single diffusers pipelines -> one expert-routing or dual-backbone pipeline."""

import os

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_stages import DualBackbonePipeline, ExpertRoutingPipeline
from diffusers_stages.conversion import pipelines_to_experts
from diffusers_stages.models.loading import realign_storage
from tests.conftest import TINY_UNET

from .conftest import tiny_unet


def combine(sources, output, *extra):
    args = pipelines_to_experts.parse_args(["--sources", *sources, "--output_path", output, *extra])
    return pipelines_to_experts.main(args)


@pytest.fixture
def large_and_small(tmp_path):
    paths = []
    for name, width in (("large", 16), ("small", 8)):
        paths.append(str(tmp_path / name))
        DDPMPipeline(unet=tiny_unet(width, width), scheduler=DDPMScheduler()).save_pretrained(paths[-1])
    return paths


def test_expert_routing_pipeline_from_two_pipelines(large_and_small, tmp_path):
    out = str(tmp_path / "routed")
    combine(large_and_small, out, "--stage_boundaries", "600", "--verify", "--tolerance", "0")
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    large = DDPMPipeline.from_pretrained(large_and_small[0]).unet
    small = DDPMPipeline.from_pretrained(large_and_small[1]).unet
    for reference in (large, small):  # the package's loaders realign storage; compare like with like
        realign_storage(reference)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(pipe.experts(x, 100).sample, large(x, 100).sample)
    assert torch.equal(pipe.experts(x, 800).sample, small(x, 800).sample)


def test_dual_backbone_pipeline_from_deep_and_shallow(large_and_small, tmp_path):
    out = str(tmp_path / "duo")
    combine(large_and_small, out, "--pipeline", "dual_backbone", "--switch_step_fraction", "0.5", "--verify")
    pipe = DualBackbonePipeline.from_pretrained(out)
    assert pipe.deep.config.block_out_channels == [16, 32] and pipe.shallow.config.block_out_channels == [8, 16]
    assert [expert for _, expert in pipe.expert_schedule(4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("pipeline", ["experts", "dual_backbone"])
def test_class_conditional_sources_are_verified_with_class_labels(tmp_path, pipeline):
    sources = []
    for name, width in (("large", 16), ("small", 8)):
        sources.append(str(tmp_path / name))
        unet = UNet2DModel(**{**TINY_UNET, "block_out_channels": (width, 2 * width), "num_class_embeds": 4})
        DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler()).save_pretrained(sources[-1])
    switch = ["--stage_boundaries", "600"] if pipeline == "experts" else ["--switch_step_fraction", "0.5"]
    written = combine(sources, str(tmp_path / "out"), "--pipeline", pipeline, *switch, "--verify", "--tolerance", "0",
                      "--unconditional_label", "3")  # fmt: skip
    written.set_progress_bar_config(disable=True)
    assert written(class_labels=[0, 2], num_inference_steps=2, output_type="np").images.shape == (2, 8, 8, 3)


def test_class_conditional_sources_need_their_unconditional_label_named(tmp_path, capsys):
    """The routing pipelines take the last class embedding as the unconditional label: sources with
    `num_class_embeds=4` were combined as they are, their class 3 silently unsampleable. As unet_to_multistage, the
    command now asks `--unconditional_label`: 3 keeps every expert bit for bit, 4 appends an untrained label."""
    sources, models = [], []
    for name, width in (("large", 16), ("small", 8)):
        sources.append(str(tmp_path / name))
        torch.manual_seed(width)
        models.append(UNet2DModel(**{**TINY_UNET, "block_out_channels": (width, 2 * width), "num_class_embeds": 4}))
        DDPMPipeline(unet=models[-1].eval(), scheduler=DDPMScheduler()).save_pretrained(sources[-1])
    with pytest.raises(ValueError, match=r"Give `--unconditional_label`: .*large's U-Net .*`num_class_embeds`=4"):
        combine(sources, str(tmp_path / "out"), "--stage_boundaries", "600")
    with pytest.raises(ValueError, match="`--unconditional_label` must be 3 .* or 4 .*, got 1"):
        combine(sources, str(tmp_path / "out"), "--stage_boundaries", "600", "--unconditional_label", "1")
    assert not (tmp_path / "out").exists()
    written = combine(sources, str(tmp_path / "out"), "--stage_boundaries", "600", "--unconditional_label", "4",
                      "--verify", "--tolerance", "0")  # fmt: skip
    assert "guidance_scale=1" in capsys.readouterr().out
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([3, 1])
    with torch.no_grad():
        for index, t in ((0, 100), (1, 800)):
            assert written.experts.expert(index).config.num_class_embeds == 5
            expected = models[index](x, torch.tensor(t), class_labels=labels).sample
            assert torch.equal(written.experts(x, torch.tensor(t), class_labels=labels).sample, expected)
    written.set_progress_bar_config(disable=True)
    assert written(class_labels=[3], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


def test_sources_must_share_the_training_schedule(large_and_small, tmp_path):
    other = str(tmp_path / "other")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_end=0.03)).save_pretrained(other)
    with pytest.raises(ValueError, match=r"another noise schedule .*beta_end"):
        combine([large_and_small[0], other], str(tmp_path / "out"), "--stage_boundaries", "500")
    with pytest.raises(ValueError, match="two --sources"):
        combine(
            [*large_and_small, large_and_small[0]],
            str(tmp_path / "out"),
            "--pipeline",
            "dual_backbone",
            "--stage_boundaries",
            "500",
        )
    with pytest.raises(ValueError, match="needs --stage_boundaries"):
        combine(large_and_small, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_pixel_and_latent_sources_are_refused(ddpm_folder, ldm_folder, tmp_path):
    # a DDPMPipeline (pixels) and an LDMPipeline (latents) of the same shapes were combined: the pixel expert then
    # denoised latents
    for sources in ([ddpm_folder, ldm_folder], [ldm_folder, ddpm_folder]):
        with pytest.raises(ValueError, match=r"ddpm is a DDPMPipeline, without a VAE, .*ldm"):
            combine(sources, str(tmp_path / "out"), "--stage_boundaries", "500")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pipeline", ["experts", "dual_backbone"])
def test_half_precision_sources_stay_half_precision(tmp_path, pipeline):
    # the experts were written in float32: twice their sources' size, for weights that are float16 values
    from safetensors.torch import load_file

    sources = []
    for name, width in (("large", 16), ("small", 8)):
        sources.append(str(tmp_path / name))
        DDPMPipeline(unet=tiny_unet(width, width).half(), scheduler=DDPMScheduler()).save_pretrained(sources[-1])
    switch = ["--stage_boundaries", "600"] if pipeline == "experts" else ["--switch_step_fraction", "0.5"]
    combine(sources, str(tmp_path / "out"), "--pipeline", pipeline, *switch, "--verify", "--tolerance", "0")
    weights = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".safetensors")]
    assert len(weights) == 2
    assert {v.dtype for path in weights for v in load_file(path).values()} == {torch.float16}


@pytest.mark.parametrize("pipeline", ["experts", "dual_backbone"])
def test_a_shorter_schedule_with_a_learned_time_embedding_verifies(tmp_path, pipeline, capsys):
    """--verify compared the experts at timesteps 100 and 900 whatever the schedule: past the 500 rows of a learned
    time embedding that was an IndexError. It compares them at 10% and 90% of the sources' training schedule."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        unet = UNet2DModel(**TINY_UNET, time_embedding_type="learned", num_train_timesteps=500).eval()
        paths.append(str(tmp_path / f"source{seed}"))
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=500)).save_pretrained(paths[-1])
    extra = ["--stage_boundaries", "250"] if pipeline == "experts" else ["--switch_step_fraction", "0.5"]
    combine(paths, str(tmp_path / "out"), "--pipeline", pipeline, "--verify", *extra)
    printed = capsys.readouterr().out
    assert "expert 1 vs its source at timestep 450: max |source - converted| = 0.000e+00" in printed


def _copy_with_vae_option(ldm_folder: str, tmp_path, key: str, value) -> str:
    """A copy of the latent source ``ldm_folder`` whose VQ-VAE config sets ``key`` to ``value`` (same weights)."""
    import json
    import shutil

    other = str(tmp_path / "other")
    shutil.copytree(ldm_folder, other)
    config_path = os.path.join(other, "vqvae", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, key: value}, f)
    return other


def test_latent_sources_whose_vaes_scale_their_latents_differently_are_refused(ldm_folder, tmp_path):
    """The same VQ-VAE weights with another `scaling_factor` are another latent space (its experts were trained on
    latents of another scale): only the weights were compared, so the second source's VAE config was dropped."""
    other = _copy_with_vae_option(ldm_folder, tmp_path, "scaling_factor", 1.0)
    with pytest.raises(ValueError, match=r"other has another VAE than the first latent source.*scaling_factor"):
        combine([ldm_folder, other], str(tmp_path / "out"), "--stage_boundaries", "500")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "value"), [("sample_size", 16), ("force_upcast", False)])
def test_latent_sources_whose_vaes_differ_in_sampling_options_only_are_combined(ldm_folder, tmp_path, key, value):
    """The same VAE weights saved with another `sample_size` (its tiling size) or `force_upcast` (the precision it
    decodes in) encode to the same latents: comparing every option refused such sources, whose experts share one
    latent space."""
    other = _copy_with_vae_option(ldm_folder, tmp_path, key, value)
    combine([ldm_folder, other], str(tmp_path / "out"), "--stage_boundaries", "500")
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_errors_about_a_source_name_the_option_sources(large_and_small, tmp_path):
    """A missing, staged or unsupported source was reported as a `--source`, an option this script does not have."""
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model_index.json").write_text('{"_class_name": ["pipeline_multistage", "MultiStagePipeline"]}')
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    for source, message in (
        (tmp_path / "none", "must be a folder"),
        (staged, "is already staged"),
        (other, "DiTPipeline"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            combine([large_and_small[0], str(source)], str(tmp_path / "out"), "--stage_boundaries", "600")
        assert "`--sources`" in str(error.value) and "`--source`" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_staged_source_is_refused_with_this_commands_way_out(large_and_small, tmp_path):
    """A MultiStagePipeline among the sources was refused with unet_to_multistage's words ("unet_to_multistage
    converts a plain UNet2DModel ...", fine-tuning advice): this command combines plain models, so it says that and
    how to export a stage as one."""
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model_index.json").write_text('{"_class_name": ["pipeline_multistage", "MultiStagePipeline"]}')
    with pytest.raises(ValueError, match="is already staged") as error:
        combine([large_and_small[0], str(staged)], str(tmp_path / "out"), "--stage_boundaries", "600")
    message = str(error.value)
    assert "unet_to_multistage" not in message and "pipelines_to_experts combines" in message
    assert "multistage_to_unet" in message


@pytest.mark.parametrize(
    "sources, boundaries, stages", [(1, ["500"], 2), (2, ["300", "600"], 3)], ids=["one-source", "three-stages"]
)
def test_sources_and_boundaries_that_disagree_are_named_by_their_options(
    large_and_small, tmp_path, monkeypatch, sources, boundaries, stages
):
    """One source for two stages was refused after every source was loaded, in the model's words ("`experts` must
    be a list with one denoiser per stage"): the options the user gave are named now, before any source is read."""
    monkeypatch.setattr(pipelines_to_experts, "gather_sources", lambda paths: pytest.fail("sources were loaded"))
    with pytest.raises(
        ValueError,
        match=rf"`--stage_boundaries` {' '.join(boundaries)} gives {stages} stages, one per `--sources` folder, "
        rf"but {sources} `--sources` were given",
    ):
        combine(large_and_small[:sources], str(tmp_path / "out"), "--stage_boundaries", *boundaries)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("order", ["pipeline-first", "bare-first"])
@pytest.mark.parametrize("pipeline", ["experts", "dual_backbone"])
def test_a_bare_unet_trained_on_another_schedule_length_is_refused(ddpm_folder, tmp_path, pipeline, order):
    """A bare U-Net whose config records 500 training timesteps (a learned time embedding of 500 rows) beside a
    1000-step DDPM pipeline was combined: --verify was an IndexError from inside the embedding, and without it the
    written pipeline failed so at sampling. Its schedule length is compared with the shared one, as pipelines' are."""
    torch.manual_seed(0)
    bare = str(tmp_path / "bare")
    UNet2DModel(**TINY_UNET, time_embedding_type="learned", num_train_timesteps=500).save_pretrained(bare)
    sources = [ddpm_folder, bare] if order == "pipeline-first" else [bare, ddpm_folder]
    extra = ["--stage_boundaries", "250"] if pipeline == "experts" else ["--switch_step_fraction", "0.5"]
    with pytest.raises(ValueError, match=r"`--sources` .*bare records 500 training timesteps .* 1000"):
        combine(sources, str(tmp_path / "out"), "--pipeline", pipeline, *extra)
    assert not (tmp_path / "out").exists()


def test_a_dual_backbone_of_other_than_two_sources_is_refused_before_any_is_read(
    large_and_small, tmp_path, monkeypatch
):
    """Three --sources for a dual backbone were all loaded before the count was checked."""
    monkeypatch.setattr(pipelines_to_experts, "gather_sources", lambda paths: pytest.fail("sources were loaded"))
    with pytest.raises(ValueError, match=r"--pipeline dual_backbone takes two --sources \(deep, shallow\), got 3"):
        combine([*large_and_small, large_and_small[0]], str(tmp_path / "out"), "--pipeline", "dual_backbone",
                "--switch_step_fraction", "0.5")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label", [[], ["--unconditional_label", "3"]], ids=["without", "with"])
def test_sources_that_disagree_on_classes_are_named_whatever_the_unconditional_label(tmp_path, label):
    """An unconditional source beside a class-conditional one: without `--unconditional_label` the class-conditional
    one asked for it, with it the unconditional one refused it, and the sources' real disagreement went unsaid."""
    sources = []
    for name, classes in (("plain", None), ("classes", 4)):
        sources.append(str(tmp_path / name))
        unet = UNet2DModel(**{**TINY_UNET, "num_class_embeds": classes})
        DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler()).save_pretrained(sources[-1])
    with pytest.raises(ValueError, match=r"disagree on `num_class_embeds`.*plain.*None.*classes.*4"):
        combine(sources, str(tmp_path / "out"), "--stage_boundaries", "600", *label)
    assert not (tmp_path / "out").exists()
