"""`train_multistage.py --pretrained_model_name_or_path`: fine-tunes converted and EDM `MultiStagePipeline` folders,
keeps their stages and noise schedules, and refuses arguments or data that contradict them."""

import argparse
import json
import os

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    EDMEulerScheduler,
    UNet2DModel,
    VQModel,
)
from safetensors.torch import load_file

from diffusers_stages import MultiStageDDPMppUNet2DModel, MultiStagePipeline, MultiStageUNet2DModel
from diffusers_stages.conversion import unet_to_multistage
from diffusers_stages.training.tasks import noise_schedulers
from tests.conftest import LDM_SCHEDULE, TINY_UNET

SCHEDULE = LDM_SCHEDULE


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("multistage")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """A tiny DDIMPipeline with a scaled_linear schedule, converted by `unet_to_multistage` (stages 300 / 700)."""
    root = tmp_path_factory.mktemp("converted")
    torch.manual_seed(0)
    DDIMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDIMScheduler(**SCHEDULE)).save_pretrained(root / "ddim")
    unet_to_multistage.main(
        unet_to_multistage.parse_args(
            ["--source", str(root / "ddim"), "--output_path", str(root / "staged"), "--stage_boundaries", "300", "700"]
        )
    )
    return str(root / "staged")


def _finetune_args(examples, image_folder: str, source: str, out: str, *extra: str) -> list[str]:
    return [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--pretrained_model_name_or_path",
            source, "--max_train_steps", "2", "--learning_rate", "1e-3", *extra]  # fmt: skip


def _weights(folder: str) -> dict:
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def _assert_same_model_new_weights(source: str, tuned: str) -> None:
    before, after = MultiStagePipeline.from_pretrained(source), MultiStagePipeline.from_pretrained(tuned)
    assert type(after.unet) is type(before.unet) and after.partition == before.partition
    assert {k: v for k, v in after.unet.config.items() if not k.startswith("_")} == {
        k: v for k, v in before.unet.config.items() if not k.startswith("_")
    }
    a, b = _weights(source), _weights(tuned)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # trained, same architecture


def test_finetunes_a_converted_pipeline_on_its_schedule(examples, script, image_folder, converted, tmp_path):
    out = str(tmp_path / "run")
    hub = str(tmp_path / "hub")
    args = script.parse_args(
        _finetune_args(examples, image_folder, converted, out, "--ddpm_beta_schedule", "scaled_linear",
                       "--push_to_hub", "--hub_model_id", "me/tuned", "--hub_local_dir", hub)
    )  # fmt: skip
    script.main(args)
    with open(os.path.join(hub, "me", "tuned", "README.md"), encoding="utf-8") as f:
        card = f.read()  # the local source by its folder name: its path on this machine is never published
    assert "Fine-tuned from `staged` (MultiStageUNet2DModel)" in card and converted not in card
    assert "base_model" not in card  # a local folder is no Hub model

    _assert_same_model_new_weights(converted, out)
    tuned = MultiStagePipeline.from_pretrained(out)
    assert tuned.partition.boundaries == (300.0, 700.0)
    # sampled with the source's scheduler class and schedule; trained with DDPM on the same betas
    assert type(tuned.scheduler) is DDIMScheduler
    assert {k: tuned.scheduler.config[k] for k in SCHEDULE} == SCHEDULE
    training, _ = noise_schedulers(args, DDIMScheduler.load_config(converted, subfolder="scheduler"))
    assert type(training) is DDPMScheduler
    assert torch.equal(training.alphas_cumprod, DDPMScheduler(**SCHEDULE).alphas_cumprod)
    assert not torch.equal(training.alphas_cumprod, DDPMScheduler().alphas_cumprod)
    tuned.set_progress_bar_config(disable=True)
    assert tuned(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 8, 8, 3)


def test_resuming_a_finetune_continues_from_the_checkpoint(examples, script, image_folder, converted, tmp_path):
    base = ["--ddpm_beta_schedule", "scaled_linear", "--lr_scheduler", "constant", "--checkpointing_steps", "1"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    examples.train(script, _finetune_args(examples, image_folder, converted, straight, *base))
    examples.train(
        script, [*_finetune_args(examples, image_folder, converted, resumed, *base), "--max_train_steps", "1"]
    )
    examples.train(script, [*_finetune_args(examples, image_folder, converted, resumed, *base), "--resume_from_checkpoint", "latest"])  # fmt: skip
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 2 started from checkpoint-1, not from the source


def test_finetunes_an_edm_ddpmpp_pipeline(examples, script, image_folder, tmp_path, capsys):
    source, out = str(tmp_path / "edm"), str(tmp_path / "run")
    torch.manual_seed(0)
    model = MultiStageDDPMppUNet2DModel(
        sample_size=8, encoder_channels=16, decoder_channels=(24, 16, 8), channel_mult=(1, 2), layers_per_block=1,
        attention_resolutions=(4,), dropout=0.0, num_class_embeds=4, augment_dim=9,
    )  # fmt: skip
    MultiStagePipeline(unet=model, scheduler=EDMEulerScheduler(sigma_max=40.0)).save_pretrained(source)
    args = script.parse_args(_finetune_args(examples, image_folder, source, out, "--boundary_units", "sigma",
                                            "--class_conditional", "--use_ema"))  # fmt: skip
    with pytest.raises(SystemExit):  # a usage error, before any data is read
        script.parse_args([*_finetune_args(examples, image_folder, source, out, "--boundary_units", "sigma"),
                           "--fused_decoders"])  # fmt: skip
    assert "`--fused_decoders` is not supported by MultiStageDDPMppUNet2DModel" in capsys.readouterr().err
    assert script.MultiStageTask(args).find_unused_parameters  # EDM's augmentation embedding trains without labels
    script.main(args)

    _assert_same_model_new_weights(source, out)
    assert torch.equal(_weights(source)["augment_embedding.weight"], _weights(out)["augment_embedding.weight"])
    tuned = MultiStagePipeline.from_pretrained(out)
    assert type(tuned.scheduler) is EDMEulerScheduler and tuned.scheduler.config.sigma_max == 40.0
    assert tuned.partition.units == "sigma" and tuned.partition.boundaries == (2.5103, 7.6577)
    tuned.set_progress_bar_config(disable=True)
    assert tuned(class_labels=[0, 2], num_inference_steps=3, output_type="np").images.shape == (2, 8, 8, 3)


def test_a_score_sde_conversion_is_refused_as_a_schedule_the_script_does_not_train():
    # was "... names 'ContinuousVPDPMSolverSinglestepScheduler', which is not a diffusers scheduler": the package's
    # own scheduler, which `original_multistage_ncsnpp` writes
    from diffusers_stages.schedulers import ContinuousVPDPMSolverSinglestepScheduler

    scheduler = ContinuousVPDPMSolverSinglestepScheduler()
    source = {"_class_name": type(scheduler).__name__, **scheduler.config}  # as `load_config` reads it
    args = argparse.Namespace(pretrained_model_name_or_path="ncsnpp-staged")
    with pytest.raises(ValueError, match=r"'ncsnpp-staged'.*ContinuousVPDPMSolverSinglestepScheduler.*not supported"):
        noise_schedulers(args, source)


def test_trains_in_the_latent_space_of_the_folders_vae(examples, script, image_folder, tmp_path):
    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**{**TINY_UNET, "in_channels": 4, "out_channels": 4})
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)  # fmt: skip
    MultiStagePipeline(unet=unet, scheduler=DDPMScheduler(), vae=vae).save_pretrained(tmp_path / "latent")
    source, out = str(tmp_path / "latent"), str(tmp_path / "run")
    examples.train(script, _finetune_args(examples, image_folder, source, out, "--resolution", "16"))  # no --vae_path
    _assert_same_model_new_weights(source, out)
    assert MultiStagePipeline.from_pretrained(out).vae is not None

    # a VQModel cannot encode training data here: refused unless an AutoencoderKL is given with --vae_path
    vq = VQModel(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=4,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=8)  # fmt: skip
    MultiStagePipeline(unet=unet, scheduler=DDPMScheduler(), vae=vq).save_pretrained(tmp_path / "vq")
    args = script.parse_args(_finetune_args(examples, image_folder, source, out, "--resolution", "16"))
    assert args.vae_path is None and script.MultiStageTask(args).vae_path == source  # the task's, not written back
    args = argparse.Namespace(
        **{**vars(args), "pretrained_model_name_or_path": str(tmp_path / "vq"), "vae_path": None}
    )
    with pytest.raises(
        ValueError, match="holds a VQModel as its VAE, but training encodes images with an AutoencoderKL"
    ):
        script.MultiStageTask(args)


def test_a_vae_or_resolution_the_source_does_not_take_is_a_usage_error_before_any_image_is_read(
    examples, script, image_folder, tmp_path, capsys, monkeypatch
):
    # a `--vae_path` whose latents have other channels than the source's networks take, or a `--resolution` of
    # another latent size, passed every check of the command line: every image was read (decoded) first, and the run
    # then stopped with a traceback
    from diffusers_stages.training import loop

    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**{**TINY_UNET, "in_channels": 4, "out_channels": 4})
    shape = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)  # fmt: skip
    MultiStagePipeline(
        unet=unet, scheduler=DDPMScheduler(), vae=AutoencoderKL(**shape, latent_channels=4)
    ).save_pretrained(tmp_path / "latent")
    AutoencoderKL(**shape, latent_channels=3).save_pretrained(tmp_path / "three")
    source, out = str(tmp_path / "latent"), str(tmp_path / "run")
    monkeypatch.setattr(loop, "_read_records", lambda args: pytest.fail("the data was read"))
    for extra, message in [
        (["--resolution", "16", "--vae_path", str(tmp_path / "three")],
         f"holds a model with in_channels=4, but `--vae_path` {str(tmp_path / 'three')!r} gives latents of 3 channels"),
        (["--resolution", "32"], "`--resolution` 32 gives 16x16 samples, but the model of"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            script.parse_args(_finetune_args(examples, image_folder, source, out, *extra))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(out)


def _other_channels(tmp_path) -> str:
    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**{**TINY_UNET, "in_channels": 4, "out_channels": 4})
    MultiStagePipeline(unet=unet, scheduler=DDPMScheduler(**SCHEDULE)).save_pretrained(tmp_path / "four")
    return str(tmp_path / "four")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stage_boundaries": (500.0,)}, "`--stage_boundaries` [500.0] cannot be combined with `--pretrained_model_name_or_path`"),
        ({"decoder_block_out_channels": [(8, 16)] * 3}, "`--decoder_block_out_channels` [(8, 16), (8, 16), (8, 16)] cannot"),
        ({"pretrained_model_name_or_path": "/does/not/exist"}, "`--pretrained_model_name_or_path` '/does/not/exist' is not a MultiStagePipeline folder"),
        ({"pretrained_model_name_or_path": _other_channels}, "holds a model with in_channels=4, but the data are RGB images (3 channels"),
        ({"ddpm_beta_schedule": "linear"}, "`--ddpm_beta_schedule` linear disagrees with the scheduler of"),
        ({"num_train_timesteps": 500}, "`--num_train_timesteps` 500 disagrees"),
        ({"boundary_units": "sigma"}, "`--boundary_units` sigma disagrees with the model of"),
        ({"resolution": 16}, "`--resolution` 16 gives 16x16 samples, but the model of"),
        ({"class_conditional": True}, "`--class_conditional`: the data give 3 classes (+ the null label: num_class_embeds=4)"),
        # had defaults, so a value given was dropped in silence: the source's model trained instead
        ({"block_out_channels": (64, 128)}, "`--block_out_channels` [64, 128] cannot be combined with `--pretrained_model_name_or_path`: fine-tuning keeps the model of"),
        ({"layers_per_block": 2}, "`--layers_per_block` 2 cannot be combined with `--pretrained_model_name_or_path`"),
        ({"attention_head_dim": 8}, "`--attention_head_dim` 8 cannot be combined with `--pretrained_model_name_or_path`"),
        ({"norm_num_groups": 4}, "`--norm_num_groups` 4 cannot be combined with `--pretrained_model_name_or_path`"),
        ({"dropout": 0.0}, "`--dropout` 0.0 cannot be combined with `--pretrained_model_name_or_path`"),
    ],
)  # fmt: skip
def test_contradictions_are_value_errors_before_training(
    examples, script, image_folder, converted, tmp_path, change, message
):
    out = tmp_path / "run"
    valid = script.parse_args(
        _finetune_args(examples, image_folder, converted, str(out), "--ddpm_beta_schedule", "scaled_linear")
    )
    change = {k: v(tmp_path) if callable(v) else v for k, v in change.items()}
    with pytest.raises(ValueError) as error:
        script.main(argparse.Namespace(**{**vars(valid), **change}))
    assert message in str(error.value)
    assert not out.exists()


def test_command_line_contradictions_are_usage_errors(examples, script, image_folder, converted, tmp_path, capsys):
    argv = _finetune_args(examples, image_folder, converted, str(tmp_path / "run"), "--stage_boundaries", "500")
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)  # the schedule mismatch (no --ddpm_beta_schedule) is reported after this one
    assert exit_info.value.code == 2 and "`--stage_boundaries` [500.0] cannot be combined" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # had a default, so the value given was dropped in silence
        script.parse_args([*argv[:-2], "--block_out_channels", "64,128"])
    assert "`--block_out_channels` [64, 128] cannot be combined with `--pretrained_model_name_or_path`" in (
        capsys.readouterr().err
    )


def test_fused_decoders_are_refused_for_a_source_with_tailored_decoders(examples, script, image_folder, tmp_path,
                                                                        capsys):  # fmt: skip
    unet = MultiStageUNet2DModel(**TINY_UNET, decoder_block_out_channels=((8, 16), (8, 16), (4, 8)))
    MultiStagePipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "tailored")
    argv = _finetune_args(
        examples, image_folder, str(tmp_path / "tailored"), str(tmp_path / "run"), "--fused_decoders"
    )
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert "`--fused_decoders` fuses decoders of one architecture" in capsys.readouterr().err


def test_fused_decoders_check_leaves_a_garbled_source_config_to_the_model(
    examples, script, image_folder, tmp_path, capsys
):
    MultiStagePipeline(unet=MultiStageUNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(
        tmp_path / "s"
    )
    config_path = tmp_path / "s" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["decoder_block_out_channels"] = 5  # read from a folder: anything
    config_path.write_text(json.dumps(config))
    argv = _finetune_args(examples, image_folder, str(tmp_path / "s"), str(tmp_path / "run"), "--fused_decoders",
                          "--train_batch_size", "6", "--stage_shares", "1,1,1")  # fmt: skip
    # the check itself does not fail on it (no TypeError): the model's own check refuses it by name, as the source's
    # config is built before training
    message = "its unet/config.json does not build a MultiStageUNet2DModel: ValueError: `decoder_block_out_channels`"
    examples.assert_usage_error(script, argv, message, capsys)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "key, value", [("_class_name", ["MultiStageUNet2DModel"]), ("block_out_channels", 5)], ids=["class", "levels"]
)
def test_a_source_unet_config_of_the_wrong_json_types_is_named(
    examples, script, image_folder, tmp_path, capsys, key, value
):
    # read from a folder: anything (a TypeError, `unhashable type` or `has no len()`, before any check named it)
    MultiStagePipeline(unet=MultiStageUNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(
        tmp_path / "s"
    )
    config_path = tmp_path / "s" / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), key: value}))
    argv = _finetune_args(examples, image_folder, str(tmp_path / "s"), str(tmp_path / "run"))
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    error = capsys.readouterr().err
    assert "`--pretrained_model_name_or_path`" in error and str(value).replace("'", "") in error.replace("'", "")


def test_a_bad_partition_in_the_source_is_named_with_its_file(examples, script, image_folder, tmp_path, capsys):
    # read from a folder: the stages are checked as the model checks them, the file named
    MultiStagePipeline(unet=MultiStageUNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(
        tmp_path / "s"
    )
    config_path = tmp_path / "s" / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "boundary_units": "seconds"}))
    argv = _finetune_args(examples, image_folder, str(tmp_path / "s"), str(tmp_path / "run"))
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    error = capsys.readouterr().err
    assert (
        f"`--pretrained_model_name_or_path` {str(tmp_path / 's')!r}: its unet/config.json: `boundary_units`" in error
    )


def test_resuming_on_a_source_whose_weights_were_replaced_is_refused(
    examples, script, image_folder, converted, tmp_path, caplog
):
    import shutil

    from safetensors.torch import save_file

    source, out = str(tmp_path / "source"), str(tmp_path / "run")
    shutil.copytree(converted, source)
    base = ["--ddpm_beta_schedule", "scaled_linear", "--checkpointing_steps", "1"]
    examples.train(script, [*_finetune_args(examples, image_folder, source, out, *base), "--max_train_steps", "1"])
    # the source's weights replaced by others of the same shapes: resuming would go on from another model's files
    save_file({k: v + 1 for k, v in _weights(source).items()},
              os.path.join(source, "unet", "diffusion_pytorch_model.safetensors"))  # fmt: skip
    resumed = [*_finetune_args(examples, image_folder, source, out, *base), "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError) as error:
        examples.train(script, resumed)
    assert "`--resume_from_checkpoint`" in str(error.value)
    assert "unet/diffusion_pytorch_model.safetensors has changed" in str(error.value)
    # a checkpoint of an older version (no record) still resumes, with a warning
    record = os.path.join(out, "checkpoint-1", "pretrained_source.json")
    with open(record, encoding="utf-8") as f:
        entry = json.load(f)
    with open(record, "w", encoding="utf-8") as f:
        json.dump({"pretrained_model_name_or_path": entry["pretrained_model_name_or_path"]}, f)
    examples.train(script, resumed)
    assert "cannot check" in caplog.text
