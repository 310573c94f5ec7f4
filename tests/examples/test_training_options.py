"""The loop's options as the scripts take them: planned configs, the task's loss, the task built once, per-epoch
pipeline saves, and a Hub repository created before any training."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DModel
from huggingface_hub.errors import OfflineModeIsEnabled

from diffusers_stages import MultiStagePipeline, TimestepPartition
from diffusers_stages.planning import partition_to_model_config
from diffusers_stages.training import MultiStageTask, build_task, hub, train
from diffusers_stages.training.loss import diffusion_loss


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("multistage")


@pytest.fixture
def planned_folder(tmp_path) -> str:
    """A folder holding a plan command's output config: boundaries [300, 700] and per-stage decoder widths."""
    unet = UNet2DModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))  # fmt: skip
    config = partition_to_model_config(unet.config, TimestepPartition([300, 700]), [(8, 16), (8, 8), (4, 8)])
    folder = tmp_path / "planned"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "MultiStageUNet2DModel"}))
    return str(folder)


def test_a_planned_config_trains_as_planned(examples, script, image_folder, planned_folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--max_train_steps", "1"]
    examples.train(script, [*base, "--model_config", planned_folder])
    unet = MultiStagePipeline.from_pretrained(out).unet
    assert unet.config.stage_boundaries == [300.0, 700.0] and unet.num_stages == 3
    assert [list(w) for w in unet.config.decoder_block_out_channels] == [[8, 16], [8, 8], [4, 8]]

    # the same boundaries may be repeated; other ones are refused before training
    args = script.parse_args([*base, "--model_config", planned_folder, "--stage_boundaries", "300", "700"])
    assert list(build_task(MultiStageTask, args).partition.boundaries) == [300, 700]
    with pytest.raises(SystemExit):
        script.parse_args([*base, "--model_config", planned_folder, "--stage_boundaries", "442", "631"])
    assert "`--stage_boundaries` [442.0, 631.0] conflicts with the stage boundaries [300.0, 700.0]" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        script.parse_args([*base, "--model_config", planned_folder, "--num_train_timesteps", "500"])
    assert "`--num_train_timesteps` 500 disagrees with `--model_config`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "given, match",
    [
        ({"sample_size": 16}, "`--model_config` .* is for samples of size 16, but this run trains on size 8"),
        ({"sample_size": [8, 16]}, "is for samples of size \\[8, 16\\], but this run trains on size 8"),
        ({"in_channels": 1}, "`--model_config` .* is for 1-channel samples, but this run trains on 3-channel ones"),
    ],
)
def test_a_planned_config_for_other_samples_is_refused_not_rewritten(
    examples, image_folder, planned_folder, tmp_path, capsys, given, match
):
    # the plan command sizes a budget's decoders at the config's sample_size and in_channels; the scripts replaced
    # both with the run's (`--resolution`, RGB) without a word, so the model trained was not the one planned (a plan
    # for 8-pixel gray images trained at the default --resolution 64 in RGB costs about 64 times its budget)
    config_file = os.path.join(planned_folder, "config.json")
    with open(config_file) as f:
        planned = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**planned, **given}, f)
    base = [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        examples.load_script("multistage").parse_args([*base, "--model_config", planned_folder])
    assert re.search(match, capsys.readouterr().err)
    # the experts' UNet2DModel config too (one for every expert)
    unet = {k: v for k, v in planned.items() if k not in ("stage_boundaries", "decoder_block_out_channels")}
    with open(config_file, "w") as f:
        json.dump({**unet, "_class_name": "UNet2DModel", **given}, f)
    with pytest.raises(SystemExit):
        examples.load_script("experts").parse_args(
            [*base, "--model_config", planned_folder, "--num_experts", "2", "--assignment", "hard"]
        )
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("given", "class_conditional", "match"),
    [
        ({"num_class_embeds": 10}, False, "is class-conditional \\(num_class_embeds=10\\), but this run is not "
         "`--class_conditional`"),
        ({"class_embed_type": "timestep"}, False, "embeds class labels with class_embed_type='timestep'"),
        ({"class_embed_type": "identity"}, True, "embeds class labels with class_embed_type='identity'"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("name", ["multistage", "experts", "dual_backbone"])
def test_a_config_of_other_class_labels_than_the_run_is_refused_not_rewritten(
    examples, image_folder, planned_folder, tmp_path, capsys, name, given, class_conditional, match
):
    # a class-conditional config trained without `--class_conditional` became an unconditional model without a word;
    # one with a `class_embed_type` (labels embedded as values, not indices) failed at the first training step, with
    # "`class_labels` must be given" (or, with `--class_conditional` and "identity", a RuntimeError of the time
    # embedding's shape)
    config_file = os.path.join(planned_folder, "config.json")
    with open(config_file) as f:
        planned = json.load(f)
    if name != "multistage":  # a UNet2DModel config
        planned = {k: v for k, v in planned.items() if k not in ("stage_boundaries", "decoder_block_out_channels")}
        planned["_class_name"] = "UNet2DModel"
    with open(config_file, "w") as f:
        json.dump({**planned, **given}, f)
    base = [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run")]
    extra = {"experts": ["--num_experts", "2", "--assignment", "hard"]}.get(name, [])
    labels = ["--class_conditional"] if class_conditional else []
    with pytest.raises(SystemExit):
        examples.load_script(name).parse_args([*base, *extra, *labels, "--model_config", planned_folder])
    assert re.search(f"`--model_config` .*{match}", capsys.readouterr().err)


def test_a_planned_config_too_large_to_build_is_a_usage_error(
    examples, image_folder, planned_folder, tmp_path, capsys
):
    # a hostile (or mistyped) width: building it even on the meta device overflowed torch's storage size, a
    # RuntimeError that the network check let through as a traceback
    config_file = os.path.join(planned_folder, "config.json")
    with open(config_file) as f:
        planned = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**planned, "decoder_block_out_channels": [[8, 10**9], [8, 8], [4, 8]]}, f)
    base = [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        examples.load_script("multistage").parse_args([*base, "--model_config", planned_folder])
    assert "describe no network that can be built: Storage size calculation overflowed" in capsys.readouterr().err


def test_the_loop_trains_with_the_tasks_loss_and_builds_the_task_once(examples, script, image_folder, tmp_path):
    class HalfLoss(MultiStageTask):
        """A task with its own objective: half the diffusion loss, counting its calls."""

        calls = 0

        def loss(self, network, noise_scheduler, clean, timesteps, noise, class_labels=None):
            HalfLoss.calls += 1
            return 0.5 * diffusion_loss(network, noise_scheduler, clean, timesteps, noise=noise)

    argv = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
            "--max_train_steps", "2"]  # fmt: skip
    args = script.parse_args(argv)
    task = build_task(HalfLoss, args)
    assert build_task(MultiStageTask, args) is build_task(MultiStageTask, args)  # the checked task, kept
    assert build_task(HalfLoss, script.parse_args(argv)) is not task  # other arguments: a new task
    script.train(args, task)
    assert HalfLoss.calls == 2  # one network, two steps


def test_save_model_epochs_saves_the_pipeline_during_training(examples, script, image_folder, tmp_path, monkeypatch):
    saves = []
    save = MultiStageTask.save
    monkeypatch.setattr(MultiStageTask, "save", lambda self, *args: saves.append(args[-1]) or save(self, *args))
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                            "--train_batch_size", "12", "--num_epochs", "3", "--save_model_epochs", "1"])  # fmt: skip
    # after epochs 1 and 2, and the final save after epoch 3; each written beside, then swapped in
    assert saves == [os.path.join(out, ".pipeline.partial")] * 3
    assert not [name for name in os.listdir(out) if name.startswith(".")]
    assert MultiStagePipeline.from_pretrained(out).unet.num_stages == 3


def test_push_to_hub_fails_before_training_when_the_repository_cannot_be_created(
    examples, script, image_folder, tmp_path, monkeypatch
):
    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")

    monkeypatch.setattr(hub, "create_repo", offline)
    out = str(tmp_path / "run")
    args = script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                              "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/tiny"])  # fmt: skip
    with pytest.raises(
        ValueError, match="`--push_to_hub`: cannot create the Hub repository `--hub_model_id` 'me/tiny'"
    ):
        script.main(args)
    assert not os.path.exists(out)  # nothing trained, nothing written


@pytest.fixture
def fake_hub(monkeypatch) -> list[tuple[str, dict]]:
    """The Hub calls of a run, recorded (``("create_repo" | "upload_folder", keyword arguments)``); the Hub's answer to
    `create_repo`: the repository id with the token owner's namespace ``me``."""
    import huggingface_hub

    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    class HfApi:
        def __init__(self, token=None):
            self.create_repo = create_repo

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    return calls


def test_a_repository_name_without_namespace_gets_the_full_id_on_the_card(
    examples, script, image_folder, tmp_path, fake_hub
):
    # `--hub_model_id tiny` is pushed to `<user>/tiny` (the Hub adds the namespace, as in diffusers' scripts), but the
    # card was titled `tiny` and its usage code loaded `from_pretrained("tiny")`, a repository that is not the user's
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                            "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "tiny"])  # fmt: skip
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert [kwargs["repo_id"] for call, kwargs in fake_hub if call == "upload_folder"] == ["me/tiny"]
    assert "# me/tiny\n" in card and '.from_pretrained("me/tiny")' in card and '"tiny"' not in card


def test_push_without_a_repository_name_takes_the_output_folders_name(
    examples, script, image_folder, tmp_path, fake_hub
):
    # `--push_to_hub` without `--hub_model_id` was refused; diffusers' scripts push to a repository named after
    # `--output_dir`, as this run now does
    out = str(tmp_path / "ddpm-tiny")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                            "--max_train_steps", "1", "--push_to_hub"])  # fmt: skip
    assert [kwargs["repo_id"] for call, kwargs in fake_hub] == ["ddpm-tiny", "me/ddpm-tiny", "me/ddpm-tiny"]
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        assert '.from_pretrained("me/ddpm-tiny")' in f.read()


@pytest.mark.parametrize("output_dir", ["run-", "a b"])
def test_push_to_an_output_folder_name_the_hub_refuses_is_a_usage_error(
    examples, script, image_folder, tmp_path, monkeypatch, capsys, output_dir
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        script.parse_args(
            [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", output_dir, "--push_to_hub"]
        )
    err = capsys.readouterr().err
    assert "`--push_to_hub` without `--hub_model_id` pushes to a repository named after `--output_dir`" in err
    assert "Pass `--hub_model_id your-name/model-name`" in err


def test_each_pipeline_saved_during_training_is_pushed(
    examples, script, image_folder, tmp_path, fake_hub, monkeypatch, caplog
):
    # `--save_model_epochs` saved the pipeline during training but pushed it only at the end; diffusers'
    # train_unconditional.py pushes every save. A push that fails mid-run is a warning: the final push sends it again
    calls, saved = 0, []

    def upload_folder(self, **kwargs):
        nonlocal calls
        calls += 1
        fake_hub.append(("upload_folder", kwargs))
        if calls == 1:  # the local save it failed to push is complete, and stays so
            saved.append(MultiStagePipeline.from_pretrained(kwargs["folder_path"]).unet.num_stages)
            raise ConnectionError("the network is down")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                            "--train_batch_size", "12", "--num_epochs", "3", "--save_model_epochs", "1",
                            "--push_to_hub", "--hub_model_id", "me/tiny"])  # fmt: skip
    uploads = [kwargs["commit_message"] for call, kwargs in fake_hub if call == "upload_folder"]
    assert uploads == ["Epoch 1", "Epoch 2", "End of training"]
    assert saved == [3] and MultiStagePipeline.from_pretrained(out).unet.num_stages == 3
    assert "pushing them to the Hub repository 'me/tiny' failed" in caplog.text and "Training goes on" in caplog.text


def test_a_process_other_than_the_main_one_never_contacts_the_hub(
    examples, script, image_folder, tmp_path, fake_hub, monkeypatch
):
    # diffusers' scripts create the repository and push from the main process only: a run's other processes (here
    # the one process, told it is not the main one; the main process made the output folder) save nothing and make
    # no Hub call, neither before training, nor at `--save_model_epochs`, nor at the end
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: False))
    out = tmp_path / "run"
    out.mkdir()
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(out),
                            "--train_batch_size", "12", "--num_epochs", "2", "--save_model_epochs", "1",
                            "--push_to_hub", "--hub_model_id", "me/tiny"])  # fmt: skip
    assert fake_hub == [] and os.listdir(out) == []


def test_a_failed_final_push_leaves_a_finished_run(examples, script, image_folder, tmp_path, fake_hub, monkeypatch):
    # the final push ran before the run was marked finished: after a failed upload (the outputs complete, the error
    # naming the `hf upload` command) resuming the last checkpoint trained nothing but wrote the outputs again
    import huggingface_hub

    from diffusers_stages.training.checkpointing import is_finished

    def upload_folder(self, **kwargs):
        raise ConnectionError("the network is down")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = str(tmp_path / "run")
    with pytest.raises(OSError, match="pushing them to the Hub repository 'me/tiny' failed"):
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                                "--max_train_steps", "2", "--checkpointing_steps", "2", "--push_to_hub",
                                "--hub_model_id", "me/tiny"])  # fmt: skip
    assert is_finished(os.path.join(out, "checkpoint-2"))


def test_the_card_of_a_checkpoint_past_max_train_steps_gives_the_steps_it_holds(
    examples, script, image_folder, tmp_path
):
    # a checkpoint of step 2 resumed with `--max_train_steps 1` writes its weights (step 2) as the final pipeline, as
    # diffusers' scripts do, but the pushed model card said "1 optimisation steps": `--max_train_steps`, not the step
    base = [*examples.TINY, "--train_data_dir", image_folder, "--checkpointing_steps", "2"]
    first, second, hub = (str(tmp_path / name) for name in ("first", "second", "hub"))
    examples.train(script, [*base, "--output_dir", first, "--max_train_steps", "2"])
    examples.train(script, [*base, "--output_dir", second, "--max_train_steps", "1", "--resume_from_checkpoint",
                            os.path.join(first, "checkpoint-2"), "--push_to_hub", "--hub_model_id", "me/tiny",
                            "--hub_local_dir", hub])  # fmt: skip
    assert os.listdir(os.path.join(second, "samples")) == ["step_000002.png"]  # the outputs of step 2
    with open(os.path.join(hub, "me", "tiny", "README.md"), encoding="utf-8") as f:
        assert "- 2 optimisation steps," in f.read()


@pytest.mark.parametrize(("flag", "private"), [([], None), (["--hub_private_repo"], True)])
def test_the_repository_is_private_as_asked_or_as_the_namespace_default(
    examples, script, image_folder, tmp_path, fake_hub, flag, private
):
    # without `--hub_private_repo` the repository was created with `private=False`: public even in an organisation
    # whose repositories are private by default (`None`, as diffusers' `create_repo` calls pass, leaves it to the Hub)
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
                            "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/tiny", *flag])  # fmt: skip
    creates = [kwargs for call, kwargs in fake_hub if call == "create_repo"]  # before training, then at the push
    assert len(creates) == 2 and all(kwargs["private"] is private for kwargs in creates)


def test_mixed_precision_fp16_on_cpu_is_a_usage_error(examples, script, image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--mixed_precision", "fp16"])
    assert "`--mixed_precision fp16` needs a CUDA GPU" in capsys.readouterr().err


def test_fp16_from_accelerate_launch_on_cpu_is_a_usage_error(examples, script, image_folder, monkeypatch, capsys):
    # `accelerate launch --mixed_precision fp16` (or its config) on CPU: Accelerate trained in fp32 without a word,
    # and the model card said fp16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--train_data_dir", image_folder])
    assert (
        "`--mixed_precision fp16` (ACCELERATE_MIXED_PRECISION, set by `accelerate launch`" in capsys.readouterr().err
    )
    # given on the command line, the script's own value is the one Accelerate uses
    script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--mixed_precision", "no"])


def test_gradient_accumulation_from_accelerate_launch_must_be_the_scripts(
    examples, script, image_folder, monkeypatch, capsys
):
    # `accelerate launch --gradient_accumulation_steps 4` (a DeepSpeed launch, or its config) set the accumulation
    # Accelerate synced on, over the script's `--gradient_accumulation_steps`, which counted the steps per epoch, the
    # batches a resumed run skips, `--scale_lr` and the model card: a resumed run restarted mid-data, in silence
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--train_data_dir", image_folder])
    err = capsys.readouterr().err
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4" in err and "`--gradient_accumulation_steps` 1" in err
    script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--gradient_accumulation_steps", "4"])


def test_fp16_on_apple_mps_is_accepted_as_accelerate_accepts_it(examples, script, image_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # was refused: "needs a CUDA GPU"
    args = script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--mixed_precision", "fp16"])
    assert args.mixed_precision == "fp16"


def test_sample_grids_are_drawn_without_dropout_as_the_saved_pipeline_samples(
    examples, script, image_folder, tmp_path
):
    # were drawn with the networks in training mode: with `--dropout` the final sample_grid.png was not what the saved
    # pipeline gives for the same seed (and drew on the global random state)
    import argparse

    import numpy as np
    from PIL import Image

    from diffusers_stages.training.state import sample_grid

    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--dropout", "0.5",
                            "--max_train_steps", "2", "--use_ema"])  # fmt: skip
    settings = argparse.Namespace(num_sample_images=4, eval_batch_size=16, seed=0, num_inference_steps=3)
    grid, _ = sample_grid(MultiStagePipeline.from_pretrained(out), settings, 0)
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(os.path.join(out, "sample_grid.png"))))


def test_a_run_with_dropout_and_sample_grids_resumes_bit_for_bit(examples, script, image_folder, tmp_path):
    # a grid drawn after a checkpoint used dropout's random state, which the checkpoint does not hold: the resumed
    # run's later steps drew other dropout masks than the uninterrupted run's
    from safetensors.torch import load_file

    args = [*examples.TINY, "--train_data_dir", image_folder, "--dropout", "0.5", "--lr_scheduler", "constant",
            "--checkpointing_steps", "2", "--save_images_steps", "2"]  # fmt: skip
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    examples.train(script, [*args, "--output_dir", straight, "--max_train_steps", "4"])
    examples.train(script, [*args, "--output_dir", resumed, "--max_train_steps", "2"])
    examples.train(
        script, [*args, "--output_dir", resumed, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    )
    a, b = (load_file(os.path.join(run, "unet", "diffusion_pytorch_model.safetensors")) for run in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_hub_token_is_not_logged_to_the_trackers(examples, script, image_folder, tmp_path, monkeypatch):
    # `--hub_token` went into the trackers' config with every other argument: TensorBoard's hparams file in
    # `--logging_dir`, wandb's servers with `--logger wandb`
    from accelerate import Accelerator

    configs = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None, **kw: configs.append(config))
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--max_train_steps",
                            "1", "--hub_token", "hf_secret123"])  # fmt: skip
    assert len(configs) == 1 and configs[0]["max_train_steps"] == 1
    assert "hf_secret123" not in json.dumps(configs[0])


def test_the_trackers_log_the_unet_shape_the_run_used(
    examples, script, image_folder, planned_folder, tmp_path, monkeypatch
):
    # the shape options default to None (so that a value given can be refused where a source gives the shape): a
    # model built from the arguments was logged with `layers_per_block` and `dropout` "None", not the 2 and 0.0 it had
    from accelerate import Accelerator

    configs = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None, **kw: configs.append(config))
    base = [*examples.TINY_RUN, "--train_data_dir", image_folder, "--max_train_steps", "1"]
    shape = ["--block_out_channels", "8,16", "--norm_num_groups", "4", "--attention_head_dim", "4"]
    examples.train(script, [*base, *shape, "--output_dir", str(tmp_path / "scratch")])
    assert configs[0]["layers_per_block"] == 2 and configs[0]["dropout"] == 0.0
    assert configs[0]["block_out_channels"] == str((8, 16)) and configs[0]["norm_num_groups"] == 4
    # where the config gives the shape, the scratch defaults are not logged as if they were used
    examples.train(script, [*base, "--model_config", planned_folder, "--output_dir", str(tmp_path / "planned")])
    assert configs[1]["layers_per_block"] != 2 and configs[1]["block_out_channels"] != str((128, 256, 256, 256))


@pytest.mark.parametrize(
    "option, instead",
    [
        (["--save_images_epochs", "10"], "`--save_images_steps`"),
        (["--ddpm_num_inference_steps", "1000"], "`--num_inference_steps`"),
        (["--input_perturbation", "0.1"], "input perturbation"),
        (["--use_8bit_adam"], "AdamW"),
        (["--validation_epochs", "5"], "`--save_images_steps`"),
        (["--revision", "main"], "--revision"),
        (["--rank", "4"], "train_text_to_image_lora.py"),  # a LoRA run's: was argparse's "unrecognized arguments"
    ],
)
def test_diffusers_script_options_not_taken_are_refused_by_name(
    examples, script, image_folder, option, instead, capsys
):
    # a command line carried over from diffusers' train_unconditional.py / train_text_to_image.py: argparse's bare
    # "unrecognized arguments" said neither that the option is diffusers' nor what takes its place here
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--train_data_dir", image_folder, *option])
    err = capsys.readouterr().err
    assert f"`{option[0]}`" in err and "diffusers" in err and instead in err


def test_local_rank_is_taken_as_diffusers_scripts_take_it(examples, script, image_folder):
    # diffusers' scripts accept `--local_rank` (a launcher's) and leave the rank to Accelerate: so does this one
    args = script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--local_rank", "0"])
    assert args.local_rank == 0


def test_allow_tf32_is_taken_as_diffusers_text_to_image_takes_it(
    examples, script, image_folder, tmp_path, monkeypatch
):
    # diffusers' train_text_to_image.py `--allow_tf32` was "unrecognized arguments", neither taken nor refused by name
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # restored after the test
    argv = [*examples.TINY, "--train_data_dir", image_folder, "--max_train_steps", "1"]
    examples.train(script, [*argv, "--output_dir", str(tmp_path / "a")])
    assert torch.backends.cuda.matmul.allow_tf32 is False
    examples.train(script, [*argv, "--output_dir", str(tmp_path / "b"), "--allow_tf32"])
    assert torch.backends.cuda.matmul.allow_tf32 is True


def test_scale_lr_multiplies_the_learning_rate_as_diffusers_does(
    examples, script, image_folder, tmp_path, monkeypatch
):
    # diffusers' train_text_to_image.py: lr x gradient accumulation x per-device batch x processes
    from diffusers_stages.training import loop

    rates = []
    optimisation = loop._optimisation

    def recording(*args, **kwargs):
        emas, optimizer, lr_scheduler, steps = optimisation(*args, **kwargs)
        rates.append(optimizer.param_groups[0]["initial_lr"])
        return emas, optimizer, lr_scheduler, steps

    monkeypatch.setattr(loop, "_optimisation", recording)
    base = [*examples.TINY, "--train_data_dir", image_folder, "--max_train_steps", "1", "--learning_rate", "1e-4"]
    examples.train(script, [*base, "--output_dir", str(tmp_path / "a"), "--gradient_accumulation_steps", "2",
                            "--scale_lr"])  # fmt: skip
    examples.train(script, [*base, "--output_dir", str(tmp_path / "b")])
    assert rates == [pytest.approx(1e-4 * 2 * 4 * 1), 1e-4]


def test_tracker_project_name_names_the_trackers_project(examples, script, image_folder, tmp_path, monkeypatch):
    from accelerate import Accelerator

    names = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None, **kw: names.append(name))
    base = [*examples.TINY, "--train_data_dir", image_folder, "--max_train_steps", "1"]
    examples.train(script, [*base, "--output_dir", str(tmp_path / "run"), "--tracker_project_name", "my-project"])
    examples.train(script, [*base, "--output_dir", str(tmp_path / "run2")])
    assert names == ["my-project", "run2"]  # by default the output folder's name, as before


def test_max_train_samples_trains_on_the_first_images_after_a_seeded_shuffle(
    examples, script, image_folder, tmp_path, monkeypatch
):
    # diffusers' train_text_to_image.py: `dataset.shuffle(seed=args.seed).select(range(args.max_train_samples))`
    import numpy as np

    from diffusers_stages.training import loop
    from diffusers_stages.training.data import image_folder_records

    seen = []
    images = loop.TrainingImages

    def recording(records, *args):
        seen.append(records)
        return images(records, *args)

    monkeypatch.setattr(loop, "TrainingImages", recording)
    base = [*examples.TINY, "--train_data_dir", image_folder, "--class_conditional", "--max_train_steps", "1"]
    examples.train(script, [*base, "--output_dir", str(tmp_path / "run"), "--max_train_samples", "5", "--seed", "7"])
    full = image_folder_records(image_folder, True)
    chosen = np.random.default_rng(7).permutation(len(full))[:5]  # what `datasets`' shuffle(seed=7) draws
    (records,) = seen
    assert len(records) == 5 and records.labels == [full.labels[i] for i in chosen]
    assert all(np.array_equal(np.array(records.load(k)), np.array(full.load(i))) for k, i in enumerate(chosen))
    assert records.num_classes == full.num_classes

    # more samples than the data holds is refused before training, named
    with pytest.raises(ValueError, match="`--max_train_samples` 25 is more than the 24 training images"):
        examples.train(script, [*base, "--output_dir", str(tmp_path / "more"), "--max_train_samples", "25"])
    assert not os.path.exists(tmp_path / "more")


def test_noise_offset_shifts_each_channels_noise_as_diffusers_does(examples, script, image_folder, tmp_path, capsys):
    # diffusers' train_text_to_image.py: noise += noise_offset * randn(batch, channels, 1, 1), scored as drawn
    noises = []

    class Recording(MultiStageTask):
        def loss(self, network, noise_scheduler, clean, timesteps, noise, class_labels=None):
            noises.append(noise.clone())
            return super().loss(network, noise_scheduler, clean, timesteps, noise, class_labels)

    base = [*examples.TINY, "--train_data_dir", image_folder, "--max_train_steps", "1", "--stage_boundaries", "500"]
    for name, extra in (("plain", []), ("offset", ["--noise_offset", "0.5"])):
        args = script.parse_args([*base, "--output_dir", str(tmp_path / name), *extra])
        train(args, Recording(args))
    plain, offset = torch.cat(noises[: len(noises) // 2]), torch.cat(noises[len(noises) // 2 :])
    shift = offset - plain  # the same plain noise (same seed), plus one offset per sample and channel
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6) and shift.abs().min() > 0

    with pytest.raises(SystemExit):  # EDM's loss has no offset noise
        script.parse_args([*base, "--boundary_units", "sigma", "--stage_boundaries", "1.0", "--noise_offset", "0.1",
                           "--output_dir", str(tmp_path / "edm")])  # fmt: skip
    assert "`--noise_offset`" in capsys.readouterr().err


def test_a_mixed_precision_run_saves_its_vae_unrounded(examples, script, image_folder, tmp_path):
    # the VAE is cast to the mixed-precision dtype for training (as diffusers' scripts cast it); that copy was the one
    # saved: the pipeline held `--vae_path`'s weights rounded to bf16 and decoded with them
    from safetensors.torch import load_file

    from tests.conftest import tiny_vae

    vae_dir, out = str(tmp_path / "vae"), str(tmp_path / "run")
    tiny_vae().save_pretrained(vae_dir)
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--vae_path", vae_dir,
                            "--resolution", "16", "--max_train_steps", "1", "--mixed_precision", "bf16"])  # fmt: skip
    given, saved = (load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
                    for folder in (vae_dir, os.path.join(out, "vae")))  # fmt: skip
    assert given.keys() == saved.keys() and all(torch.equal(given[k], saved[k]) for k in given)


def test_the_final_grid_of_a_mixed_precision_run_is_what_the_saved_pipeline_samples(
    examples, script, image_folder, tmp_path
):
    # was sampled with the networks under Accelerate's bf16 autocast and decoded with the VAE cast to bf16, while the
    # saved pipeline runs in float32: sample_grid.png (the model card's samples) was not what the pipeline gives
    import argparse

    import numpy as np
    from PIL import Image

    from diffusers_stages.training.state import sample_grid
    from tests.conftest import tiny_vae

    vae_dir, out = str(tmp_path / "vae"), str(tmp_path / "run")
    tiny_vae().save_pretrained(vae_dir)
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--vae_path", vae_dir,
                            "--resolution", "16", "--max_train_steps", "1", "--mixed_precision", "bf16"])  # fmt: skip
    settings = argparse.Namespace(num_sample_images=4, eval_batch_size=16, seed=0, num_inference_steps=3)
    grid, _ = sample_grid(MultiStagePipeline.from_pretrained(out), settings, 0)
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(os.path.join(out, "sample_grid.png"))))


def test_a_polynomial_warm_up_of_all_the_epochs_steps_is_refused_before_the_first_step(
    examples, script, image_folder, tmp_path
):
    # 24 images in batches of 4: one epoch is 6 steps, all of them warm-up; diffusers' polynomial decay divided by
    # zero at the last one (a ZeroDivisionError traceback)
    argv = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"), "--num_epochs",
            "1", "--lr_scheduler", "polynomial", "--lr_warmup_steps", "6", "--checkpointing_steps", "1"]  # fmt: skip
    examples.assert_refused_before_training(
        script, argv, "`--lr_warmup_steps` 6 takes all of the training steps (`--num_epochs`) 6"
    )
    assert not (tmp_path / "run" / "checkpoint-1").exists()
