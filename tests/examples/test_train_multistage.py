"""`examples/multistage/train_multistage.py`: trains, reloads, samples, resumes bit for bit, pushes, runs on 2 processes."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusers_stages import MultiStagePipeline


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("multistage")


def test_trains_reloads_and_samples_with_hub_push(examples, script, image_folder, tmp_path):
    out, hub = str(tmp_path / "run"), str(tmp_path / "hub")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--class_conditional", "--use_ema",
         "--random_flip", "--max_train_steps", "3", "--checkpointing_steps", "2", "--save_images_steps", "2",
         "--decoder_block_out_channels", "16,16", "8,16", "4,8",
         "--push_to_hub", "--hub_model_id", "me/tiny-multistage", "--hub_local_dir", hub])  # fmt: skip

    # the output folder is a pipeline that loads both ways and samples the same images
    pipe = MultiStagePipeline.from_pretrained(out)
    assert [tuple(d.up_blocks[0].resnets[0].conv2.weight.shape[:1]) for d in pipe.unet.decoders] == [
        (16,),
        (16,),
        (8,),
    ]
    assert pipe.unet.config.num_class_embeds == 4  # 3 classes + the null label
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 2], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    again = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    again.set_progress_bar_config(disable=True)
    same = again(class_labels=[0, 2], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and (images == same).all()
    # the class folders' names are the pipeline's (DiTPipeline's `id2label`), in the order of the class indices
    assert again.config.id2label == {"0": "0", "1": "1", "2": "2"} and again.get_label_ids(["2", "0"]) == [2, 0]
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_000002.png", "step_000003.png"]
    assert os.path.isdir(os.path.join(out, "checkpoint-2", "unet_ema"))

    # the push: model card with method, boundaries, settings and grid; no checkpoints, logs or sample history
    pushed = os.path.join(hub, "me", "tiny-multistage")
    files = {os.path.relpath(os.path.join(r, f), pushed) for r, _, fs in os.walk(pushed) for f in fs}
    assert "README.md" in files and "sample_grid.png" in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(f.startswith(("checkpoint-", "logs", "samples")) for f in files)
    with open(os.path.join(pushed, "README.md"), encoding="utf-8") as f:
        card = f.read()
    for text in (
        "multi-stage multi-decoder U-Net",
        "[0, 442)",
        "[631, 1000)",
        "3 optimisation steps",
        "sample_grid.png",
    ):
        assert text in card
    assert "TODO" not in card
    assert MultiStagePipeline.from_pretrained(pushed).unet.config.stage_boundaries == [442.0, 631.0]


def test_fused_decoders_train_the_same_weights_in_one_packed_pass_per_step(examples, script, image_folder, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    from diffusers_stages.models import packed_decoders

    passes, packed_call = [], packed_decoders._Packed.__call__
    monkeypatch.setattr(packed_decoders._Packed, "__call__", lambda *a: passes.append(1) or packed_call(*a))
    weights = {}
    for fused in (False, True):
        out = str(tmp_path / f"run-{fused}")
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                                "--stage_shares", "1,1,1", "--train_batch_size", "6", "--max_train_steps", "2",
                                "--save_images_steps", "100", *(["--fused_decoders"] if fused else [])])  # fmt: skip
        weights[fused] = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
        assert len(passes) == (2 if fused else 0)  # one packed pass per optimisation step (2 samples per stage)
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.allclose(weights[True][k], weights[False][k], atol=1e-5) for k in weights[False])


def test_latent_space_with_cached_latents(examples, script, image_folder, tmp_path):
    from diffusers import AutoencoderKL

    vae_dir = str(tmp_path / "vae")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(vae_dir)  # fmt: skip
    out = str(tmp_path / "run")
    args = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--vae_path", vae_dir, "--cache_latents",
            "--center_crop", "--random_flip", "--resolution", "16", "--max_train_steps", "2"]  # fmt: skip
    examples.train(script, args)
    pipe = MultiStagePipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 8 and pipe.vae is not None
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 16, 16, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_data_dir", "/does/not/exist"], "`--train_data_dir` must be an existing folder"),
        (["--stage_boundaries", "700,300"], "`--stage_boundaries` [700.0, 300.0] is not a valid stage split"),
        (["--decoder_block_out_channels", "8,16", "8,16"], "gives 2 decoders, but the stage split"),
        (["--resolution", "9"], "`--resolution` 9 must be divisible by the model's total down-sampling factor 2"),
        (  # was "`boundaries` must be strictly increasing, got [1, 1]", naming no argument
            ["--num_train_timesteps", "2", "--num_inference_steps", "2"],
            "`--num_train_timesteps` 2 is too short for the default stage split [1, 1]",
        ),
        (  # was refused by DDIM at the first sample grid, after `--save_images_steps` steps of training
            ["--num_train_timesteps", "10", "--stage_boundaries", "5", "--num_inference_steps", "50"],
            "`--num_inference_steps` 50 cannot sample the sample grids with DDIMScheduler: `num_inference_steps`: 50 "
            "cannot be larger than",
        ),
        (["--stage_shares", "1,1"], "`--stage_shares` needs 3 non-negative values"),
        (["--stage_shares", "1,1", "--fused_decoders"], "`--stage_shares` needs 3 non-negative values"),
        (
            ["--fused_decoders", "--stage_sampling", "per_batch"],
            "with `--stage_sampling per_batch` every batch holds one",
        ),
        (
            ["--fused_decoders", "--decoder_block_out_channels", "8,16", "8,16", "4,8"],
            "fuses decoders of one architecture",
        ),
        (["--fused_decoders", "--train_batch_size", "64"], "a batch of 64 splits [28, 13, 23] over the stages"),
        (  # up blocks without a channel-packed form: every batch was decoded stage by stage, silently
            [
                "--fused_decoders",
                "--stage_shares",
                "1,1,1",
                "--train_batch_size",
                "6",
                "--up_block_types",
                "ResnetUpsampleBlock2D",
                "UpBlock2D",
            ],
            "`--fused_decoders` fuses up blocks among ('UpBlock2D', 'AttnUpBlock2D') only, got ['ResnetUpsampleBlock2D']",
        ),
        (  # the fused pass does not checkpoint: every training batch was decoded stage by stage, silently
            ["--fused_decoders", "--gradient_checkpointing", "--stage_shares", "1,1,1", "--train_batch_size", "6"],
            "`--fused_decoders` with `--gradient_checkpointing`: the fused pass does not checkpoint",
        ),
        (
            ["--fused_decoders", "--enable_xformers_memory_efficient_attention", "--stage_shares", "1,1,1"],
            "`--fused_decoders` with `--enable_xformers_memory_efficient_attention`: xFormers attention has no",
        ),
        (  # decoders without attention fuse with xFormers (the encoder's attention is not fused): was refused
            [
                "--fused_decoders",
                "--enable_xformers_memory_efficient_attention",
                "--stage_shares",
                "1,1,1",
                "--train_batch_size",
                "6",
                "--up_block_types",
                "UpBlock2D",
                "UpBlock2D",
            ],
            "`--enable_xformers_memory_efficient_attention` needs a CUDA GPU",
        ),
        (
            ["--fused_decoders", "--train_batch_size", "64"],
            "pass equal `--stage_shares` (e.g. `--stage_shares 1,1,1`)",
        ),
        (  # equal shares already: the batch size is what splits unevenly
            ["--fused_decoders", "--train_batch_size", "4", "--stage_shares", "1,1,1"],
            "a batch of 4 splits [2, 1, 1] over the stages, and padding every stage to 2 samples would add more than "
            "25% rows, so batches would be decoded stage by stage: pass a `--train_batch_size` that is a multiple of 3",
        ),
        # were the model's traceback from `build_networks`, once every image was read (and, with `--cache_latents`,
        # encoded) and the accelerator and the VAE were set up
        (["--norm_num_groups", "3"], "The model arguments describe no network that can be built: Every decoder needs"),
        (["--down_block_types", "DownBlock2D", "Foo"], "describe no network that can be built: Foo does not exist."),
        # were a traceback from torch's DDPM / DDIM schedulers
        (["--ddpm_beta_schedule", "sigmoid"], "`--ddpm_beta_schedule sigmoid` is not implemented by DDIMScheduler"),
        # was a ValueError naming `stage_sampling`='per_rank' at the first step, once the data and networks were set up
        (
            ["--stage_sampling", "per_rank"],
            "`--stage_sampling per_rank` trains stage `rank % 3` on each process: launch a multiple of 3 processes",
        ),
        # was ignored in silence: a run without labels drops none
        (
            ["--class_dropout_prob", "0.2"],
            "`--class_dropout_prob` 0.2 is not used by a run without `--class_conditional`",
        ),
        # were ignored in silence (as in diffusers' scripts): a decay typed without `--use_ema` kept no EMA at all
        (
            ["--ema_max_decay", "0.999"],
            "`--ema_max_decay` 0.999 is not used by a run without `--use_ema`: it keeps no EMA of the weights (add "
            "`--use_ema` to keep one). Drop `--ema_max_decay`.",
        ),
        (["--ema_power", "0.6667"], "`--ema_power` 0.6667 is not used by a run without `--use_ema`"),
        (["--ema_inv_gamma", "2"], "`--ema_inv_gamma` 2.0 is not used by a run without `--use_ema`"),
    ],
)
def test_bad_arguments_fail_before_training(examples, script, image_folder, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(out), *extra]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_stage_shares_with_per_rank_sampling_is_refused_before_training(
    examples, script, image_folder, tmp_path, monkeypatch, capsys
):
    # each process trains one stage under `per_rank`, so the shares cannot apply: on a launch of a multiple of the
    # stage count they passed every check and were a ValueError from the timestep draw at the first training step
    monkeypatch.setenv("WORLD_SIZE", "3")
    argv = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
            "--stage_sampling", "per_rank", "--stage_shares", "1,1,1"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    assert (
        "`--stage_shares` [1.0, 1.0, 1.0] cannot be combined with `--stage_sampling per_rank`"
        in capsys.readouterr().err
    )
    script.parse_args(argv[:-2])  # without the shares: a launch of 3 processes trains one stage each


@pytest.mark.parametrize("shares", ["1,3", "3,1"])
def test_fused_decoders_are_refused_only_where_no_split_of_the_batch_fuses(examples, script, image_folder, tmp_path,
                                                                           shares):  # fmt: skip
    # a batch of 4 over shares 1:3 splits [1, 3] or [2, 2] (the tie broken at random each step): half the batches
    # fuse, but the check drew one split with a fixed seed, so `1,3` was refused and its mirror `3,1` accepted
    argv = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"), "--fused_decoders",
            "--stage_boundaries", "500", "--stage_shares", shares, "--train_batch_size", "4"]  # fmt: skip
    assert script.parse_args(argv).fused_decoders


def test_a_model_config_the_model_refuses_is_a_usage_error(examples, script, image_folder, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"block_out_channels": [8, 16], "norm_num_groups": 4, "no_such_argument": 1}')
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
                           "--model_config", str(config)])  # fmt: skip
    assert "unexpected keyword argument 'no_such_argument'" in capsys.readouterr().err


def test_train_refuses_bad_model_arguments_before_reading_the_data(
    examples, script, image_folder, tmp_path, monkeypatch
):
    from diffusers_stages.training import loop

    args = script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run")])
    args.norm_num_groups = 3  # a library call of `train` with arguments that `parse_args` did not check
    monkeypatch.setattr(loop, "_read_records", lambda args: pytest.fail("the data was read"))
    with pytest.raises(ValueError, match="The model arguments describe no network that can be built"):
        script.main(args)
    assert not (tmp_path / "run").exists()


def test_an_unknown_beta_schedule_is_refused_by_the_parser(examples, script, image_folder, tmp_path, capsys):
    # was a NotImplementedError traceback from DDPMScheduler
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--ddpm_beta_schedule", "foo"])
    assert "argument --ddpm_beta_schedule: invalid choice: 'foo'" in capsys.readouterr().err


def test_a_short_schedule_takes_given_boundaries(examples, script, image_folder, tmp_path):
    # the default split was built (and refused) even when `--stage_boundaries` replaced it
    args = script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
                              "--num_train_timesteps", "2", "--stage_boundaries", "1", "--num_inference_steps", "2"])  # fmt: skip
    assert list(script.MultiStageTask(args).partition.boundaries) == [1.0]


def test_missing_data_source_fails_before_training(examples, script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--output_dir", str(tmp_path / "run")])
    assert "Give exactly one of `--train_data_dir`" in capsys.readouterr().err


def _weights(folder: str) -> dict:
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def test_killed_run_resumes_bit_for_bit(examples, script, image_folder, tmp_path):
    # 24 images, batch 4, 2 accumulation steps: 3 optimisation steps per epoch; killed after step 2 (mid-epoch)
    args = [*examples.TINY, "--train_data_dir", image_folder, "--class_conditional", "--use_ema", "--random_flip",
            "--gradient_accumulation_steps", "2", "--max_train_steps", "5", "--checkpointing_steps", "2",
            "--lr_scheduler", "cosine", "--checkpoints_total_limit", "1"]  # fmt: skip
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    examples.train(script, [*args, "--output_dir", straight])
    result = examples.run_subprocess(
        [examples.RUNNER, "--kill-after-checkpoint", examples.SCRIPTS["multistage"], *args, "--output_dir", killed]
    )
    assert result.returncode == -9, result.stderr[-2000:]
    assert sorted(os.listdir(killed)) == ["checkpoint-2"]
    examples.train(script, [*args, "--output_dir", killed, "--resume_from_checkpoint", "latest"])
    for sub in ("unet", "checkpoint-4/unet", "checkpoint-4/unet_ema"):
        a, b = _weights(os.path.join(straight, sub)), _weights(os.path.join(killed, sub))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    assert not os.path.isdir(os.path.join(killed, "checkpoint-2"))  # total limit 1


def test_existing_checkpoints_need_resume_or_overwrite(examples, script, image_folder, tmp_path):
    out = str(tmp_path / "run")
    args = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--max_train_steps", "1",
            "--checkpointing_steps", "1"]  # fmt: skip
    examples.train(script, args)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        examples.train(script, args)


@pytest.mark.parametrize("fused", [False, True])
def test_two_processes_agree_on_weights(examples, script, image_folder, tmp_path, fused):
    # fused: DDP over decoders laid out as one stack per parameter (`stack_decoder_storage`), batches of 2 per stage
    out, dump = str(tmp_path / "run"), str(tmp_path / "dump")
    os.makedirs(dump)
    fusing = ["--fused_decoders", "--stage_shares", "1,1,1", "--train_batch_size", "6"] if fused else []
    args = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--max_train_steps", "2",
            "--class_conditional", *fusing]  # fmt: skip
    result = examples.run_subprocess(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", examples.RUNNER, "--dump-weights", dump,
         examples.SCRIPTS["multistage"], *args]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({12 if fused else 8} in total)" in result.stderr  # 2 processes x batch 4 (6 fused)
    rank0, rank1 = load_file(f"{dump}/rank0_model0.safetensors"), load_file(f"{dump}/rank1_model0.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    initial = script.MultiStageTask(script.parse_args(args)).build_networks(3, 8, 4)["unet"].state_dict()
    assert any(not torch.equal(initial[k], rank0[k]) for k in rank0)  # trained, not left at init
    with open(os.path.join(out, "unet", "config.json"), encoding="utf-8") as f:
        assert json.load(f)["stage_boundaries"] == [442.0, 631.0]


def test_datasets_dataset_as_data_source(examples, script, image_folder, tmp_path):
    pytest.importorskip("datasets")
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--dataset_name", image_folder, "--cache_dir", str(tmp_path / "cache"), "--class_conditional",
         "--output_dir", out, "--max_train_steps", "1"])  # fmt: skip
    assert MultiStagePipeline.from_pretrained(out).unet.config.num_class_embeds == 4  # folders 0, 1, 2 + null label


def test_resuming_with_another_noise_schedule_is_refused_before_the_data_are_read(
    examples, script, image_folder, tmp_path, monkeypatch
):
    # the checkpoint's noise schedule (and fine-tuning source) were compared in the load hook only, once every image
    # was decoded, the networks built and prepared: hours into a large data set's set-up
    from diffusers_stages.training import loop

    out = str(tmp_path / "run")
    base = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--checkpointing_steps", "1"]
    examples.train(script, [*base, "--max_train_steps", "1"])
    monkeypatch.setattr(loop, "_read_records", lambda args: pytest.fail("the data was read"))
    resumed = [
        *base,
        "--max_train_steps",
        "2",
        "--resume_from_checkpoint",
        "latest",
        "--prediction_type",
        "v_prediction",
    ]
    with pytest.raises(ValueError, match=r"was written with another noise schedule \(`prediction_type` 'epsilon'"):
        examples.train(script, resumed)


def test_resuming_on_other_classes_is_refused_before_training(examples, script, image_folder, tmp_path):
    # the class indices are the sorted class sub-folders: a folder renamed (or replaced by another class) between a run
    # and its resume shifted the indices, and the resumed run went on training, silently, each class index on other
    # images than the checkpoint's networks had learned, then saved the new names as the pipeline's
    data, out = tmp_path / "data", str(tmp_path / "run")
    shutil.copytree(image_folder, data)
    base = [*examples.TINY, "--train_data_dir", str(data), "--output_dir", out, "--checkpointing_steps", "1",
            "--class_conditional"]  # fmt: skip
    examples.train(script, [*base, "--max_train_steps", "1"])
    os.rename(data / "0", data / "9")  # folders 1, 2, 9: class 0 is now folder 1's images
    resume = [*base, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=r"was written by a run on other classes \(class 0: '0' there, '1' now\)"):
        examples.train(script, resume)
    assert not os.path.isdir(os.path.join(out, "checkpoint-2"))
    os.rename(data / "9", data / "0")
    examples.train(script, resume)
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))


@pytest.mark.parametrize(
    "changed, message",
    [
        # was a RuntimeError from load_state_dict on the first mismatched tensor
        (["--stage_boundaries", "500"], r"holds a `unet` of another configuration \(`stage_boundaries` \[442.0, "
         r"631.0\] there, \[500.0\] now\): resume with the model arguments"),
        # was a silent switch of the objective: epsilon-trained weights went on training (and were saved) as v-prediction
        (["--prediction_type", "v_prediction"], r"was written with another noise schedule \(`prediction_type` "
         r"'epsilon' there, 'v_prediction' now\): resume with the arguments"),
        # were ignored in silence: the checkpoint's optimizer state replaced the learning rate and the Adam settings
        # (the run went on at 1e-4, its logs and model card saying 0.001)
        (["--learning_rate", "1e-3", "--adam_weight_decay", "0.01"],
         r"was written with other optimizer settings \(`--adam_weight_decay` 1e-06 there, 0.01 now; "
         r"`--learning_rate` 0.0001 there, 0.001 now\): its optimizer and learning-rate states would replace them"),
    ],
    ids=["model", "noise_schedule", "optimizer"],
)  # fmt: skip
def test_resuming_with_other_arguments_names_them(examples, script, image_folder, tmp_path, changed, message):
    out = str(tmp_path / "run")
    base = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--checkpointing_steps", "1"]
    examples.train(script, [*base, "--max_train_steps", "1"])
    with pytest.raises(ValueError, match=message):
        examples.train(script, [*base, "--max_train_steps", "2", "--resume_from_checkpoint", "latest", *changed])
    examples.train(script, [*base, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))


def test_a_vae_of_other_than_rgb_images_is_a_usage_error(examples, script, image_folder, tmp_path, capsys):
    # training reads RGB images: a VAE of grey (1-channel) images passed every check, and the first step failed in
    # its first convolution (a RuntimeError: "expected input[4, 3, 16, 16] to have 1 channels"), the data read and
    # the networks built
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(tmp_path / "grey")  # fmt: skip
    argv = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"), "--resolution",
            "16", "--vae_path", str(tmp_path / "grey"), "--max_train_steps", "1"]  # fmt: skip
    message = f"`--vae_path` {str(tmp_path / 'grey')!r} encodes 1-channel images (its `in_channels`), but training"
    examples.assert_usage_error(script, argv, message, capsys)
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_vae_is_refused_before_the_data_are_read(
    examples, script, image_folder, tmp_path, monkeypatch
):
    # a run resumed with another `--vae_path` (another scaling_factor, or other latent statistics) went on training
    # the checkpoint's networks on latents of another scale and saved them with the new VAE; resumed without
    # `--vae_path` it was refused only in the load hook, once every image was read, as "another configuration"
    from diffusers import AutoencoderKL

    from diffusers_stages.training import loop

    shape = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKL(**shape, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    vae.register_to_config(scaling_factor=0.25)  # the same weights, latents of another scale
    vae.save_pretrained(tmp_path / "other")
    out = str(tmp_path / "run")
    base = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--resolution", "16",
            "--checkpointing_steps", "1"]  # fmt: skip
    examples.train(script, [*base, "--vae_path", str(tmp_path / "vae"), "--max_train_steps", "1"])
    resumed = [*base, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]
    with monkeypatch.context() as patched:
        patched.setattr(loop, "_read_records", lambda args: pytest.fail("the data was read"))
        with pytest.raises(ValueError, match=r"latent space of another VAE \(`scaling_factor` 0.5 there, 0.25 now\)"):
            examples.train(script, [*resumed, "--vae_path", str(tmp_path / "other")])
        with pytest.raises(
            ValueError, match=r"written by a run in the latent space of .*vae'.*resumed in pixel space"
        ):
            examples.train(script, resumed)
    examples.train(script, [*resumed, "--vae_path", str(tmp_path / "vae")])  # its own VAE: resumes
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))


def test_class_folder_names_are_saved_as_the_pipelines_class_names(examples, script, tmp_path):
    # a class-conditional run saved no class names: the user had to know the order of the data's sub-folders. As
    # DiTPipeline, the pipeline now saves `id2label` and `get_label_ids` turns names into `class_labels`
    import shutil

    from sklearn.datasets import load_digits

    digits, data = load_digits(), tmp_path / "data"
    for name, digit in (("zero, nought", 0), ("one", 1)):  # a comma: DiT's synonyms
        os.makedirs(data / name)
        for i in [i for i in range(60) if digits.target[i] == digit][:4]:
            Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8)).convert("RGB").save(
                data / name / f"{i}.png"
            )
    out, hub = str(tmp_path / "run"), str(tmp_path / "hub")
    examples.train(script, [*examples.TINY, "--train_data_dir", str(data), "--output_dir", out, "--class_conditional",
                            "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/digits",
                            "--hub_local_dir", hub])  # fmt: skip
    pipe = MultiStagePipeline.from_pretrained(out)
    assert pipe.config.id2label == {"0": "one", "1": "zero, nought"}  # sub-folders in sorted order
    assert pipe.get_label_ids(["nought", "one", "zero"]) == [1, 0, 1]
    # the model card samples the first class by its name, and its code runs on the pushed folder
    with open(os.path.join(hub, "me", "digits", "README.md"), encoding="utf-8") as f:
        code = f.read().split("```python\n")[1].split("```")[0]
    assert "image = pipe(class_labels=pipe.get_label_ids(['one'])).images[0]" in code
    card = {}
    exec(code.replace('"me/digits"', repr(os.path.join(hub, "me", "digits"))), card)
    assert card["image"].size == (8, 8)

    # a name of two classes (ImageNet's "crane") was refused before training; such names are kept, and the card
    # samples the first class by its index when its name is another class's too
    shutil.copytree(data / "one", data / "one, zero")
    out = str(tmp_path / "b")
    examples.train(script, [*examples.TINY, "--train_data_dir", str(data), "--output_dir", out, "--class_conditional",
                            "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/twice",
                            "--hub_local_dir", hub])  # fmt: skip
    assert MultiStagePipeline.from_pretrained(out).get_label_ids(["nought"]) == [2]
    with open(os.path.join(hub, "me", "twice", "README.md"), encoding="utf-8") as f:
        assert "image = pipe(class_labels=[0]).images[0]" in f.read()


def test_a_batch_smaller_than_the_stage_count_trains(examples, script, image_folder, tmp_path):
    # refused before (`--train_batch_size` must be at least the number of decoders), where diffusers' scripts take
    # any batch (`--train_batch_size 1 --gradient_accumulation_steps 4`, say): each batch's stages are drawn at
    # random by their shares, and the decoders a batch leaves out get no gradient in that step
    out = tmp_path / "run"
    argv = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(out), "--train_batch_size", "2",
            "--max_train_steps", "2", "--gradient_accumulation_steps", "2"]  # fmt: skip
    examples.train(script, argv)
    assert MultiStagePipeline.from_pretrained(str(out)).partition.num_stages == 3


def test_two_processes_train_a_batch_smaller_than_the_stage_count(examples, script, image_folder, tmp_path):
    # each process's batch of 1 reaches one decoder, not the same one on both: DDP expects the unused ones
    out, dump = str(tmp_path / "run"), str(tmp_path / "dump")
    os.makedirs(dump)
    args = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--max_train_steps", "3",
            "--train_batch_size", "1"]  # fmt: skip
    result = examples.run_subprocess(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", examples.RUNNER, "--dump-weights", dump,
         examples.SCRIPTS["multistage"], *args]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(f"{dump}/rank0_model0.safetensors"), load_file(f"{dump}/rank1_model0.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_the_end_of_a_run_says_where_its_pipeline_and_push_went(examples, script, image_folder, tmp_path, caplog):
    """A finished run printed nothing after its progress bar: not where the pipeline was saved, nor where
    `--push_to_hub` (with `--hub_local_dir`, `DIR/<repository>`) put it."""
    out, hub = str(tmp_path / "run"), str(tmp_path / "hub")
    with caplog.at_level("INFO", logger="diffusers_stages.training.loop"):
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                                "--max_train_steps", "1", "--push_to_hub", "--hub_local_dir", hub])  # fmt: skip
    assert f"Saved the trained model and its last sample grid (sample_grid.png) to {out}" in caplog.text
    assert f"Pushed the outputs of {out} to {os.path.join(hub, 'run')}" in caplog.text
