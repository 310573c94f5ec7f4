"""UNet2DModel / DDPMPipeline / DDIMPipeline / LDMPipeline folders -> MultiStagePipeline folders."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, LDMPipeline, UNet2DModel, VQModel
from safetensors.torch import load_file, save_file

from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel
from diffusers_stages.conversion import unet_to_multistage
from tests.conftest import TINY_UNET

from .conftest import tiny_unet


def convert(source, output, *extra):
    args = unet_to_multistage.parse_args(["--source", source, "--output_path", output, *extra])
    return unet_to_multistage.main(args)


def sample(pipe, steps=3):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, generator=torch.manual_seed(0), num_inference_steps=steps, output_type="np").images


def test_ddpm_pipeline_converts_to_identical_samples(ddpm_folder, tmp_path, capsys):
    out = str(tmp_path / "staged")
    convert(ddpm_folder, out, "--stage_boundaries", "442", "631", "--verify", "--tolerance", "0")
    assert "max |source - converted| = 0.000e+00" in capsys.readouterr().out
    staged = MultiStagePipeline.from_pretrained(out)
    assert staged.partition.boundaries == (442.0, 631.0) and staged.unet.num_stages == 3
    np.testing.assert_array_equal(sample(staged), sample(DDPMPipeline.from_pretrained(ddpm_folder)))


def test_ldm_pipeline_keeps_the_vqvae_and_its_scaling(ldm_folder, tmp_path):
    out = str(tmp_path / "staged")
    staged = convert(ldm_folder, out, "--stage_boundaries", "500", "--verify", "--tolerance", "0")
    assert staged.vae.config.scaling_factor == 0.5  # both LDMPipeline and the staged loop divide by it
    np.testing.assert_array_equal(
        sample(MultiStagePipeline.from_pretrained(out)), sample(LDMPipeline.from_pretrained(ldm_folder))
    )


def test_ddim_pipeline_and_bare_unet_folder(tmp_path):
    unet = tiny_unet(2)
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ddim")
    unet.save_pretrained(tmp_path / "unet")
    convert(str(tmp_path / "ddim"), str(tmp_path / "a"), "--stage_boundaries", "300", "600", "--verify")
    staged = convert(str(tmp_path / "unet"), str(tmp_path / "b"), "--stage_boundaries", "300", "--verify")
    assert type(staged.scheduler).__name__ == "DDPMScheduler"  # a bare U-Net gets the DDPM training schedule


@pytest.mark.parametrize(
    "embedding",
    [{"num_class_embeds": 3}, {"class_embed_type": "timestep"}, {"class_embed_type": "identity"}],
    ids=["table", "timestep", "identity"],
)
def test_class_conditional_unet_verifies_its_denoisers_with_class_labels(tmp_path, capsys, embedding):
    # `--verify` gave labels to a `num_class_embeds` table only: a timestep or identity class embedding failed with
    # "class_labels should be provided" and nothing was written
    torch.manual_seed(0)
    UNet2DModel(**TINY_UNET, **embedding).save_pretrained(tmp_path / "unet")
    label = ["--unconditional_label", "2"] if "num_class_embeds" in embedding else []  # the table's last class
    staged = convert(str(tmp_path / "unet"), str(tmp_path / "out"), "--stage_boundaries", "500", "--verify",
                     "--tolerance", "0", *label)  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("max |source - converted| = 0.000e+00") == 2  # one probe per stage
    assert "DDPMPipeline cannot sample a class-conditional U-Net" in out
    assert staged.unet.config.num_class_embeds == embedding.get("num_class_embeds")


def test_verify_steps_must_be_positive(ddpm_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert(ddpm_folder, str(tmp_path / "out"), "--stage_boundaries", "500", "--verify", "--verify_steps", "0")
    assert "--verify_steps must be a positive integer, got 0" in capsys.readouterr().err


def test_a_shorter_training_schedule_carries_over(tmp_path):
    # the U-Net's config does not record the schedule length: the stages must span the scheduler's 500 steps
    DDIMPipeline(unet=tiny_unet(2), scheduler=DDIMScheduler(num_train_timesteps=500)).save_pretrained(tmp_path / "s")
    staged = convert(str(tmp_path / "s"), str(tmp_path / "out"), "--stage_boundaries", "250", "--verify")
    assert staged.partition.num_train_timesteps == 500
    assert sample(MultiStagePipeline.from_pretrained(str(tmp_path / "out"))).shape == (2, 8, 8, 3)


def test_planned_boundaries(ddpm_folder, tmp_path):
    staged = convert(ddpm_folder, str(tmp_path / "planned"), "--plan", "uniform", "--num_stages", "4")
    assert staged.partition.num_stages == 4
    assert staged.partition.boundaries == pytest.approx((250.0, 500.0, 750.0))


def test_refuses_existing_output_and_writes_nothing_on_a_broken_source(ddpm_folder, tmp_path):
    out = tmp_path / "staged"
    out.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert(ddpm_folder, str(out), "--stage_boundaries", "500")
    weights = os.path.join(ddpm_folder, "unet", "diffusion_pytorch_model.safetensors")
    state = load_file(weights)
    state.pop("conv_out.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(ValueError, match="missing_keys.*conv_out.bias|conv_out.bias"):
        convert(ddpm_folder, str(tmp_path / "new"), "--stage_boundaries", "500")
    assert sorted(os.listdir(tmp_path)) == ["ddpm", "staged"]  # no partial folder


def test_unsupported_pipeline_and_bad_arguments(tmp_path, ddpm_folder):
    with pytest.raises(ValueError, match="must be a folder"):
        convert(str(tmp_path / "missing"), str(tmp_path / "x"), "--stage_boundaries", "500")
    with pytest.raises(SystemExit):  # argparse: exactly one of --stage_boundaries and --plan
        unet_to_multistage.parse_args(["--source", ddpm_folder, "--output_path", "x"])
    with pytest.raises(ValueError, match="strictly increasing"):
        convert(ddpm_folder, str(tmp_path / "y"), "--stage_boundaries", "600", "300")
    assert not (tmp_path / "y").exists()


def test_units_follow_what_the_source_scheduler_passes_the_model():
    # was: "sigma" only for EDM schedulers, so a continuous-timestep Euler source (c_noise, CosXL-style) took timestep
    # boundaries that its pipeline then refuses, and refused the sigma ones it routes by
    from diffusers import EulerDiscreteScheduler

    continuous = EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
    unet_to_multistage.check_units(continuous, "sigma")
    with pytest.raises(ValueError, match="`--boundary_units timestep` does not fit the source"):
        unet_to_multistage.check_units(continuous, "timestep")


def test_sigma_boundaries_on_a_timestep_source_are_refused_at_conversion(ddpm_folder, tmp_path, capsys):
    # without --verify nothing samples during conversion: the folder written would fail at its first sampling call
    with pytest.raises(ValueError, match="`--boundary_units sigma` does not fit the source: its DDPMScheduler"):
        convert(ddpm_folder, str(tmp_path / "out"), "--stage_boundaries", "1", "5", "--boundary_units", "sigma")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        unet_to_multistage.parse_args(["--help"])
    assert "'sigma' is refused" in " ".join(capsys.readouterr().out.split())  # documented in --help


@pytest.mark.parametrize("kind", ["pipeline", "model"])
def test_an_already_staged_source_is_refused_by_name(tmp_path, kind):
    unet = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,))
    source = tmp_path / "staged"
    if kind == "pipeline":
        MultiStagePipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(source)
    else:
        unet.save_pretrained(source)
    holds = "MultiStagePipeline" if kind == "pipeline" else "MultiStageUNet2DModel"
    with pytest.raises(ValueError, match=f"`--source` .* is already staged \\(it holds a {holds}\\)"):
        convert(str(source), str(tmp_path / "out"), "--stage_boundaries", "300")
    assert not (tmp_path / "out").exists()


def _edit_index(folder, edit):
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        f.write(edit(index) if callable(edit) else edit)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("[1, 2]", "model_index.json"),
        ("{not json", "model_index.json"),
        (lambda i: json.dumps({**i, "scheduler": ["diffusers", "UNet2DModel"]}), "scheduler"),
        (lambda i: json.dumps({**i, "scheduler": 5}), "scheduler"),
        (lambda i: json.dumps({k: v for k, v in i.items() if k != "scheduler"}), "scheduler"),
        (
            lambda i: json.dumps({**i, "_class_name": ["a", "b"], "scheduler": ["os", "system"]}),
            "holds a b; supported",
        ),
        (lambda i: json.dumps({**i, "vae": ["diffusers", "DDPMScheduler"]}), "vae"),
    ],
    ids=["list", "not-json", "scheduler-is-a-model", "scheduler-number", "no-scheduler", "odd-class", "vae-scheduler"],
)
def test_a_malformed_source_index_is_named_and_writes_nothing(ddpm_folder, tmp_path, edit, message):
    _edit_index(ddpm_folder, edit)
    with pytest.raises(ValueError, match=message):
        convert(ddpm_folder, str(tmp_path / "out"), "--stage_boundaries", "500")
    assert not (tmp_path / "out").exists()


def test_a_source_unet_config_that_is_not_a_json_object_is_named(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="config.json"):
        convert(str(tmp_path / "unet"), str(tmp_path / "out"), "--stage_boundaries", "500")


@pytest.mark.parametrize(
    "text", ["[1]", '{"_class_name": "DDPMScheduler", "num_train_timesteps": -5}'], ids=["list", "negative"]
)
def test_a_source_scheduler_config_that_does_not_build_is_named(ddpm_folder, tmp_path, text):
    # (diffusers' OSError about reaching https://huggingface.co, or a RuntimeError from inside the scheduler)
    with open(os.path.join(ddpm_folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        f.write(text)
    with pytest.raises(ValueError, match="scheduler_config.json"):
        convert(ddpm_folder, str(tmp_path / "out"), "--stage_boundaries", "500")
    assert not (tmp_path / "out").exists()


def test_num_stages_without_plan_is_a_usage_error(ddpm_folder, capsys):
    args = ["--source", ddpm_folder, "--output_path", "x"]
    # --num_stages is for --plan: with --stage_boundaries it was silently ignored (3 stages written, not 5)
    with pytest.raises(SystemExit):
        unet_to_multistage.parse_args([*args, "--stage_boundaries", "442", "631", "--num_stages", "5"])
    assert "--num_stages 5 is for --plan" in capsys.readouterr().err
    assert unet_to_multistage.parse_args([*args, "--plan", "snr"]).num_stages == 3  # the default is kept
    assert unet_to_multistage.parse_args([*args, "--plan", "snr", "--num_stages", "4"]).num_stages == 4


def test_a_tolerance_no_difference_can_meet_is_a_usage_error(ddpm_folder, capsys):
    # a negative or NaN --tolerance failed every --verify, after the whole conversion had run (every script's option)
    args = ["--source", ddpm_folder, "--output_path", "x", "--stage_boundaries", "500", "--verify"]
    for tolerance in ("-1", "nan", "abc"):
        with pytest.raises(SystemExit):
            unet_to_multistage.parse_args([*args, "--tolerance", tolerance])
        assert f"argument --tolerance: must be a number >= 0, got '{tolerance}'" in capsys.readouterr().err
    assert unet_to_multistage.parse_args([*args, "--tolerance", "0"]).tolerance == 0.0


def test_a_half_precision_source_stays_half_precision(tmp_path, capsys):
    # the converted unet was written in float32: twice the source's size, for weights that are float16 values
    DDPMPipeline(unet=tiny_unet().half(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "fp16")
    convert(str(tmp_path / "fp16"), str(tmp_path / "out"), "--stage_boundaries", "500", "--verify", "--tolerance", "0")
    assert capsys.readouterr().out.count("max |source - converted| = 0.000e+00") == 3
    weights = load_file(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}


def test_boundary_units_with_plan_is_a_usage_error(ddpm_folder, capsys):
    # --plan takes its units from the scheduler: --boundary_units was silently ignored
    args = ["--source", ddpm_folder, "--output_path", "x", "--plan", "snr"]
    with pytest.raises(SystemExit):
        unet_to_multistage.parse_args([*args, "--boundary_units", "sigma"])
    assert "--boundary_units sigma is for --stage_boundaries" in capsys.readouterr().err
    assert (
        unet_to_multistage.parse_args(
            ["--source", ddpm_folder, "--output_path", "x", "--stage_boundaries", "500"]
        ).boundary_units
        == "timestep"
    )


def test_a_learned_time_embedding_verifies_with_integer_timesteps(tmp_path, capsys):
    # --verify probed each stage at a float timestep (250.0): a learned (nn.Embedding) time embedding needs integers,
    # and the check was a torch RuntimeError on both scripts
    from diffusers_stages.conversion import multistage_to_unet

    torch.manual_seed(0)
    UNet2DModel(**TINY_UNET, time_embedding_type="learned", num_train_timesteps=1000).save_pretrained(
        tmp_path / "unet"
    )
    convert(
        str(tmp_path / "unet"), str(tmp_path / "staged"), "--stage_boundaries", "500", "--verify", "--tolerance", "0"
    )
    args = ["--source", str(tmp_path / "staged"), "--stage", "1", "--output_path", str(tmp_path / "stage1")]
    multistage_to_unet.main(multistage_to_unet.parse_args([*args, "--verify", "--tolerance", "0"]))
    assert capsys.readouterr().out.count("= 0.000e+00") == 4  # two stages, the samples, the export


def test_a_config_key_diffusers_ignores_is_left_out_not_a_type_error(tmp_path, capsys):
    """A folder saved by another diffusers version may hold a config key `UNet2DModel` does not take: diffusers warns
    and ignores it (keeping it in `unet.config`); the conversion ignored it too, not a TypeError, and writes no such
    key."""
    source = str(tmp_path / "ddpm")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(source)
    config_path = os.path.join(source, "unet", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "an_option_of_another_version": 3}, f)
    out = str(tmp_path / "staged")
    convert(source, out, "--stage_boundaries", "500", "--verify")
    assert "3-step samples (seed 0): max |source - converted| = 0.000e+00" in capsys.readouterr().out
    with open(os.path.join(out, "unet", "config.json")) as f:
        assert "an_option_of_another_version" not in json.load(f)


@pytest.mark.parametrize("value", [-5, 0, 2.5, "1000", True], ids=["negative", "zero", "fraction", "text", "bool"])
def test_a_bare_unet_config_with_a_schedule_length_that_is_no_count_is_named(tmp_path, value):
    # a bare U-Net folder's `num_train_timesteps` sizes the DDPM schedule the converted pipeline gets: -5 was a torch
    # RuntimeError ("number of steps must be non-negative") from inside the scheduler, and 0 was taken as 1000
    tiny_unet().save_pretrained(tmp_path / "unet")
    config_path = tmp_path / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_train_timesteps": value}))
    with pytest.raises(
        ValueError, match=r"config.json.*`num_train_timesteps` must be a positive integer or null, got"
    ):
        convert(str(tmp_path / "unet"), str(tmp_path / "out"), "--stage_boundaries", "5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("num_stages", ["1", "101"])
def test_a_num_stages_the_plan_cannot_give_is_a_usage_error_naming_the_option(ddpm_folder, capsys, num_stages):
    # `--plan uniform --num_stages 101` loaded the source, then failed with "exceeds the 100 noise levels of the
    # planning grid; raise `num_levels`", an option the command does not have
    args = ["--source", ddpm_folder, "--output_path", "x", "--plan", "uniform", "--num_stages", num_stages]
    with pytest.raises(SystemExit):
        unet_to_multistage.parse_args(args)
    assert f"--num_stages must be an integer from 2 to 100 (the planning grid's noise levels), got {num_stages}" in (
        capsys.readouterr().err
    )
    assert unet_to_multistage.parse_args([*args[:-1], "100"]).num_stages == 100


def test_a_vae_a_ddpm_pipeline_folder_does_not_take_is_refused_by_name(ddpm_folder, ldm_folder, tmp_path):
    """A DDPMPipeline folder whose model_index.json also names a `vae` (which diffusers' DDPMPipeline ignores) was
    converted into a latent pipeline decoding through it: 16-pixel images where the source samples 8-pixel ones,
    while --verify compared with an LDMPipeline built from the same parts and reported 0.000e+00. The entry is
    refused by name; without it the folder converts to what the source samples."""
    import shutil

    source = str(tmp_path / "ddpm-with-vae")
    shutil.copytree(ddpm_folder, source)
    shutil.copytree(os.path.join(ldm_folder, "vqvae"), os.path.join(source, "vae"))
    index_path = os.path.join(source, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    with open(index_path, "w") as f:
        json.dump({**index, "vae": ["diffusers", "VQModel"]}, f)
    out = str(tmp_path / "staged")
    with pytest.raises(ValueError, match=r"is a DDPMPipeline whose model_index.json also names a 'vae' component"):
        convert(source, out, "--stage_boundaries", "500", "--verify")
    assert not os.path.exists(out)
    with open(index_path, "w") as f:
        json.dump(index, f)
    staged = convert(source, out, "--stage_boundaries", "500", "--verify", "--tolerance", "0")
    assert staged.vae is None
    np.testing.assert_array_equal(
        sample(MultiStagePipeline.from_pretrained(out)), sample(DDPMPipeline.from_pretrained(source))
    )


def class_conditional_unet(folder, classes=3, **config):
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET, num_class_embeds=classes, **config).eval()
    unet.save_pretrained(folder)
    return unet


def test_a_class_conditional_unet_needs_its_unconditional_label_named(tmp_path):
    """The pipeline samples classifier-free guidance with the last class embedding as the unconditional label, and
    takes only the classes before it: a diffusers U-Net with `num_class_embeds=3` (three data classes) was converted
    as is, its class 2 silently becoming the unconditional label. The choice is now the user's, by name."""
    class_conditional_unet(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"`--unconditional_label`.*num_class_embeds`=3.*2.*3"):
        convert(str(tmp_path / "unet"), str(tmp_path / "out"), "--stage_boundaries", "500")
    assert not (tmp_path / "out").exists()
    for label in ("0", "1", "4", "-1"):  # only the last class, or a new one after it
        with pytest.raises(ValueError, match=f"`--unconditional_label` must be 2 .* or 3 .*, got {label}"):
            convert(str(tmp_path / "unet"), str(tmp_path / "out"), "--stage_boundaries", "500",
                    "--unconditional_label", label)  # fmt: skip
        assert not (tmp_path / "out").exists()


def test_an_unconditional_label_the_source_reserves_converts_as_is(tmp_path, capsys):
    source = class_conditional_unet(tmp_path / "unet")
    staged = convert(str(tmp_path / "unet"), str(tmp_path / "out"), "--stage_boundaries", "500",
                     "--unconditional_label", "2", "--verify", "--tolerance", "0")  # fmt: skip
    assert capsys.readouterr().out.count("max |source - converted| = 0.000e+00") == 2
    assert staged.unet.config.num_class_embeds == 3
    assert torch.equal(staged.unet.class_embedding.weight, source.class_embedding.weight)
    with pytest.raises(ValueError, match="class_labels"):  # class 2 is the unconditional label now
        staged(class_labels=[2], num_inference_steps=2, output_type="np")


@pytest.mark.parametrize("embed_type", [None, "timestep"])
def test_a_new_unconditional_label_keeps_every_class_of_the_source(tmp_path, capsys, embed_type):
    source = class_conditional_unet(tmp_path / "unet", class_embed_type=embed_type)
    staged = convert(str(tmp_path / "unet"), str(tmp_path / "out"), "--stage_boundaries", "500",
                     "--unconditional_label", "3", "--verify", "--tolerance", "0")  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("max |source - converted| = 0.000e+00") == 2 and "guidance_scale=1" in out
    assert ("a zero class embedding" in out) == (embed_type is None)  # a "timestep" one embeds the value 3 itself
    assert staged.unet.config.num_class_embeds == 4
    if embed_type is None:  # the source's rows, then a zero (untrained) one
        weight = staged.unet.class_embedding.weight
        assert torch.equal(weight[:3], source.class_embedding.weight) and not weight[3].any()
    x, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    with torch.no_grad():
        for t in (100, 700):
            expected = source(x, torch.tensor(t), class_labels=labels).sample
            assert torch.equal(staged.unet(x, torch.tensor(t), class_labels=labels).sample, expected)
    staged.set_progress_bar_config(disable=True)
    assert staged(class_labels=[2], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


def test_an_unconditional_label_for_a_source_without_classes_is_refused(ddpm_folder, tmp_path):
    with pytest.raises(ValueError, match=r"`--unconditional_label` 0 .* no `num_class_embeds`"):
        convert(ddpm_folder, str(tmp_path / "out"), "--stage_boundaries", "500", "--unconditional_label", "0")
    assert not (tmp_path / "out").exists()


def test_verify_steps_the_source_scheduler_refuses_are_named_before_converting(ddpm_folder, tmp_path, monkeypatch):
    """`--verify --verify_steps 1001` on a 1000-step schedule failed after the whole conversion, with diffusers'
    message about `num_inference_steps`, an argument the command does not have."""
    monkeypatch.setattr(unet_to_multistage, "convert", lambda *a: pytest.fail("converted before the check"))
    with pytest.raises(ValueError, match=r"`--verify_steps` 1001 .*DDPMScheduler.*num_inference_steps"):
        convert(ddpm_folder, str(tmp_path / "out"), "--stage_boundaries", "500", "--verify", "--verify_steps", "1001")
    assert not (tmp_path / "out").exists()


def test_a_plan_on_a_schedule_shorter_than_the_planning_grid(tmp_path):
    """`--plan` on a source trained on fewer than 100 timesteps failed, whatever `--num_stages`, with "`num_levels`
    must be an integer in [3, 10], got 100": an argument the command does not have. The grid is the schedule's
    timesteps now, and more stages than those are refused as `--num_stages`."""
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "ddpm")
    staged = convert(str(tmp_path / "ddpm"), str(tmp_path / "out"), "--plan", "uniform", "--num_stages", "3")
    assert staged.partition.boundaries == pytest.approx((10 / 3, 20 / 3))
    with pytest.raises(ValueError, match="`--num_stages` 11 .* 10 training timesteps"):
        convert(str(tmp_path / "ddpm"), str(tmp_path / "other"), "--plan", "snr", "--num_stages", "11")
    assert not (tmp_path / "other").exists()


def test_an_ldm_whose_vqvae_does_not_decode_its_unets_latents_is_refused(ldm_folder, tmp_path):
    """An LDMPipeline whose VQModel decodes 4-channel latents while its U-Net denoises 3 channels converted into a
    pipeline that cannot sample (`--verify` ended in a torch RuntimeError from inside the VQModel's decoder)."""
    vqvae = VQModel.from_pretrained(ldm_folder, subfolder="vqvae")
    wide = VQModel(**{**vqvae.config, "latent_channels": 4, "vq_embed_dim": 4})
    LDMPipeline(vqvae=wide, unet=tiny_unet(1), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ldm")
    for extra in ([], ["--verify"]):
        with pytest.raises(ValueError, match=r"vqvae.* latents of 4 channels.*`in_channels`=3"):
            convert(str(tmp_path / "ldm"), str(tmp_path / "out"), "--stage_boundaries", "500", *extra)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "UniPCMultistepScheduler"])
def test_verify_of_a_ddpm_pipeline_its_scheduler_needs_more_of_compares_the_denoisers(tmp_path, capsys, scheduler):
    """A DDPMPipeline saved with another scheduler: diffusers' DDPMPipeline neither scales the initial noise nor the
    model input (Euler's init_noise_sigma, scale_model_input), and passes `generator` to a step that may not take
    one (UniPC). `--verify` then failed on the sample comparison (Euler: difference 1.0, nothing written) or with a
    TypeError traceback (UniPC), though the converted pipeline, which does both, was right: the samples are not
    compared then, with the reason, and the denoisers are."""
    import diffusers

    DDPMPipeline(unet=tiny_unet(), scheduler=getattr(diffusers, scheduler)()).save_pretrained(tmp_path / "src")
    staged = convert(str(tmp_path / "src"), str(tmp_path / "out"), "--stage_boundaries", "500", "--verify",
                     "--tolerance", "0")  # fmt: skip
    out = capsys.readouterr().out
    assert "verify: no sampling comparison: DDPMPipeline" in out and scheduler in out
    assert out.count("max |source - converted| = 0.000e+00") == 2  # the denoiser of each stage
    assert type(staged.scheduler).__name__ == scheduler
    assert sample(staged, steps=2).shape == (2, 8, 8, 3)


def test_verify_still_compares_the_samples_of_a_ddpm_pipeline_with_a_scheduler_it_drives(tmp_path, capsys):
    import diffusers

    DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DPMSolverMultistepScheduler()).save_pretrained(tmp_path / "s")
    convert(str(tmp_path / "s"), str(tmp_path / "out"), "--stage_boundaries", "500", "--verify", "--tolerance", "0")
    out = capsys.readouterr().out
    assert "no sampling comparison" not in out and "3-step samples (seed 0)" in out


def test_a_ddim_pipeline_folder_naming_another_scheduler_samples_ddim_as_the_source(tmp_path, capsys):
    """diffusers' DDIMPipeline turns whatever scheduler its folder names into a DDIMScheduler (`from_config`), so the
    source samples with DDIM; the conversion kept the folder's PNDMScheduler, and `--verify` failed on the samples."""
    DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ddim")
    index = json.loads((tmp_path / "ddim" / "model_index.json").read_text())
    (tmp_path / "ddim" / "model_index.json").write_text(
        json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]})
    )
    assert type(DDIMPipeline.from_pretrained(tmp_path / "ddim").scheduler) is DDIMScheduler  # what the source samples
    staged = convert(str(tmp_path / "ddim"), str(tmp_path / "out"), "--stage_boundaries", "500", "--verify",
                     "--tolerance", "0")  # fmt: skip
    assert type(staged.scheduler) is DDIMScheduler
    out = capsys.readouterr().out
    assert "3-step samples (seed 0): max |source - converted| = 0.000e+00" in out and "PNDMScheduler" in out
