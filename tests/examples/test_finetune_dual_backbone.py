"""`train_dual_backbone.py --pretrained_model_name_or_path`: fine-tunes a `DualBackbonePipeline` folder (both
backbones, or one with `--backbones`), keeps its switch and noise schedule, and refuses the shape and switch options."""

import json
import os
import re
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from diffusers_stages import DualBackbonePipeline, ExpertRoutingModel, ExpertRoutingPipeline, UViT2DModel
from tests.conftest import LDM_SCHEDULE, SMALL_UNET, TINY_UNET


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("dual_backbone")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A tiny `DualBackbonePipeline`: two U-Nets of different depths, switched at timestep 600."""
    folder = tmp_path_factory.mktemp("dual") / "source"
    torch.manual_seed(0)
    DualBackbonePipeline(
        shallow=UNet2DModel(**SMALL_UNET), deep=UNet2DModel(**TINY_UNET), scheduler=DDIMScheduler(**LDM_SCHEDULE),
        switch_timestep=600,
    ).save_pretrained(folder)  # fmt: skip
    return str(folder)


def _finetune_args(examples, image_folder: str, source: str, out: str, *extra: str) -> list[str]:
    return examples.finetune_args(image_folder, source, out, "--ddpm_beta_schedule", "scaled_linear", *extra)


def test_finetunes_both_backbones_and_keeps_the_switch(examples, script, image_folder, source, tmp_path):
    out = str(tmp_path / "run")
    examples.train(script, _finetune_args(examples, image_folder, source, out))

    before, after = DualBackbonePipeline.from_pretrained(source), DualBackbonePipeline.from_pretrained(out)
    assert after.config.switch_timestep == 600 and after.config.switch_step_fraction is None
    for name in ("shallow", "deep"):
        a, b = getattr(before, name), getattr(after, name)
        assert {k: v for k, v in a.config.items() if not k.startswith("_")} == {
            k: v for k, v in b.config.items() if not k.startswith("_")
        }
        assert examples.weights_changed(f"{source}/{name}", f"{out}/{name}")
    assert type(after.scheduler) is DDIMScheduler
    assert {k: after.scheduler.config[k] for k in LDM_SCHEDULE} == LDM_SCHEDULE
    after.set_progress_bar_config(disable=True)
    assert after(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 8, 8, 3)


def test_finetunes_one_backbone_as_a_one_backbone_run(examples, script, image_folder, source, tmp_path):
    out = str(tmp_path / "run")
    examples.train(script, _finetune_args(examples, image_folder, source, out, "--backbones", "shallow"))
    # the format of any one-backbone run: that backbone and the scheduler, no pipeline
    assert sorted(n for n in os.listdir(out) if os.path.isdir(os.path.join(out, n)) and n != "logs") == [
        "scheduler",
        "shallow",
    ]
    assert examples.weights_changed(f"{source}/shallow", f"{out}/shallow")
    shallow = UNet2DModel.from_pretrained(out, subfolder="shallow")
    pipe = DualBackbonePipeline.from_pretrained(source, shallow=shallow)  # with the source's deep one
    assert pipe.config.switch_timestep == 600


def test_finetunes_uvit_backbones(examples, script, image_folder, tmp_path):
    source, out = str(tmp_path / "uvit"), str(tmp_path / "run")
    uvit = dict(sample_size=8, patch_size=2, hidden_size=16, num_attention_heads=2)
    torch.manual_seed(0)
    DualBackbonePipeline(shallow=UViT2DModel(**uvit, num_layers=1), deep=UViT2DModel(**uvit, num_layers=3),
                         scheduler=DDPMScheduler(), switch_step_fraction=0.5).save_pretrained(source)  # fmt: skip
    examples.train(script, [*_finetune_args(examples, image_folder, source, out), "--ddpm_beta_schedule", "linear"])
    pipe = DualBackbonePipeline.from_pretrained(out)
    assert isinstance(pipe.shallow, UViT2DModel) and len(pipe.deep.blocks) == 3
    assert pipe.config.switch_step_fraction == 0.5 and all(
        examples.weights_changed(f"{source}/{n}", f"{out}/{n}") for n in ("shallow", "deep")
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--switch_step_fraction", "0.5"], "`--switch_step_fraction` 0.5 cannot be combined with `--pretrained_model_name_or_path`: fine-tuning keeps the model of"),
        (["--switch_timestep", "500"], "`--switch_timestep` 500.0 cannot be combined with `--pretrained_model_name_or_path`"),
        (["--block_out_channels", "8,16"], "`--block_out_channels` [8, 16] cannot be combined with `--pretrained_model_name_or_path`"),
        (["--shallow_block_out_channels", "8,8"], "`--shallow_block_out_channels` [8, 8] cannot be combined"),
        (["--ddpm_beta_schedule", "linear"], "`--ddpm_beta_schedule` linear disagrees with the scheduler of"),
        (["--backbone", "uvit"], "`--backbone uvit` disagrees with the backbones of"),
        (["--backbone", "early_exit"], "drop --pretrained_model_name_or_path"),
        # were not read, in silence (options with defaults: another value was typed, so meant)
        (["--shallow_layers_per_block", "2"], "`--shallow_layers_per_block` 2 is not used by `--pretrained_model_name_or_path`: fine-tuning keeps"),
        (["--backbone", "uvit", "--deep_depth", "5"], "`--deep_depth` 5 is not used by `--pretrained_model_name_or_path`"),
    ],  # the other checks of the source (FineTuningTask's) are those of the experts' and multi-stage scripts' tests
)  # fmt: skip
def test_contradictions_are_usage_errors(examples, script, image_folder, source, tmp_path, capsys, extra, message):
    examples.assert_usage_error(script, _finetune_args(examples, image_folder, source, str(tmp_path / "run"), *extra),
                                message, capsys)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_data_that_does_not_fit_the_backbone_trained_is_refused_before_training(
    examples, script, image_folder, source, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = _finetune_args(examples, image_folder, source, str(out), "--backbones", "deep", "--resolution", "16")
    message = "`--resolution` 16 gives 16x16 samples, but the model of"
    examples.assert_usage_error(script, argv, message, capsys)  # the samples' size: before any image is read
    assert not (out / "deep").exists()


def test_a_folder_of_another_pipeline_is_named(examples, script, image_folder, tmp_path, capsys):
    experts = ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=(400,))
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "experts")
    argv = [
        *_finetune_args(examples, image_folder, str(tmp_path / "experts"), "run"),
        "--ddpm_beta_schedule",
        "linear",
    ]
    examples.assert_usage_error(script, argv, "is not a DualBackbonePipeline folder or Hub repository", capsys)


@pytest.mark.parametrize(
    "switch",
    [
        {"switch_timestep": "600"},
        {"switch_step_fraction": 0.5, "switch_timestep": 600},
        {"switch_timestep": 5000.0},  # outside the source scheduler's (0, 1000)
        {"switch_timestep": None, "switch_sigma": -1.0},
    ],
)
def test_a_saved_switch_the_pipeline_would_refuse_is_named(examples, script, image_folder, source, tmp_path, capsys,
                                                           switch):  # fmt: skip
    # read from a folder: anything, named before training (not by the pipeline once trained, at saving)
    hostile = tmp_path / "hostile"
    shutil.copytree(source, hostile)
    index = json.loads((hostile / "model_index.json").read_text())
    (hostile / "model_index.json").write_text(json.dumps({**index, **switch}))
    with pytest.raises(SystemExit):
        script.parse_args(_finetune_args(examples, image_folder, str(hostile), str(tmp_path / "run")))
    assert f"{str(hostile)!r}: its model_index.json: " in capsys.readouterr().err


def test_resuming_a_finetune_without_its_source_is_refused_by_name(examples, script, image_folder, tmp_path):
    # a source the arguments can build again (a run of the script's own), whose switch is not the default: resumed
    # without the source, the run would go on from the checkpoint and save the default switch instead of the source's
    source, out = str(tmp_path / "source"), str(tmp_path / "run")
    scratch = [*examples.TINY, "--train_data_dir", image_folder, "--max_train_steps", "1"]
    examples.train(
        script, [*scratch, "--output_dir", source, "--switch_timestep", "600", "--checkpointing_steps", "1"]
    )
    finetune = [*examples.finetune_args(image_folder, source, out, "--checkpointing_steps", "1")]
    examples.train(script, finetune)
    option = finetune.index("--pretrained_model_name_or_path")
    resumed = [*finetune[:option], *finetune[option + 2 :], *examples.TINY_SHAPE, "--max_train_steps", "2"]
    with pytest.raises(
        ValueError, match=re.escape(f"fine-tuning {source!r}: resume with `--pretrained_model_name_or_path")
    ):
        examples.train(script, [*resumed, "--resume_from_checkpoint", "latest"])
    # and a run from the arguments is not resumed as a fine-tuning one
    again = examples.finetune_args(
        image_folder, out, source, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"
    )
    with pytest.raises(
        ValueError, match=re.escape(f"from the arguments: resume without `--pretrained_model_name_or_path` {out!r}")
    ):
        examples.train(script, again)


def test_a_finetuned_backbones_card_samples_with_the_other_backbone_of_its_source(
    examples, script, image_folder, tmp_path
):
    # the card said to load the other backbone from "<repository of the deep run>" (a run that does not exist: the
    # source holds it), with the class of the fine-tuned one (a U-ViT source's deep U-Net loaded as a UViT2DModel)
    source, hub = str(tmp_path / "source"), str(tmp_path / "hub")
    uvit = UViT2DModel(sample_size=8, patch_size=2, hidden_size=16, num_layers=1, num_attention_heads=2)
    DualBackbonePipeline(shallow=uvit, deep=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler(),
                         switch_timestep=600).save_pretrained(source)  # fmt: skip
    examples.train(script, examples.finetune_args(image_folder, source, str(tmp_path / "run"), "--backbones", "shallow",
                   "--push_to_hub", "--hub_model_id", "me/shallow", "--hub_local_dir", hub))  # fmt: skip
    with open(os.path.join(hub, "me", "shallow", "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert "sampled together with the deep network of its source pipeline" in card
    assert "Fine-tuned from `source`" in card and str(tmp_path) not in card  # the local source by its name only
    code = card.split("```python\n")[1].split("```")[0].replace('"me/', f'"{hub}/me/')
    code = code.replace('"source"', repr(source))  # where the reader has the source pipeline
    code = code.replace("pipe(", "pipe.set_progress_bar_config(disable=True) or pipe(num_inference_steps=2, ")
    scope = {}
    exec(code, scope)  # the card's own code: the pushed backbone, the source's other one, the switch
    assert type(scope["deep"]) is UNet2DModel and scope["pipe"].config.switch_timestep == 600


def test_a_finetuned_backbones_card_samples_with_the_scheduler_class_of_its_source(
    examples, script, image_folder, source, tmp_path
):
    # the card loaded the run's scheduler as a DDIMScheduler whatever class the source (and the run) saved: a
    # DPMSolverMultistepScheduler source sampled with DDIM
    from diffusers import DPMSolverMultistepScheduler

    dpm, hub = str(tmp_path / "dpm"), str(tmp_path / "hub")
    pipe = DualBackbonePipeline.from_pretrained(source)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(dpm)
    examples.train(script, _finetune_args(examples, image_folder, dpm, str(tmp_path / "run"), "--backbones", "deep",
                                          "--push_to_hub", "--hub_model_id", "me/deep", "--hub_local_dir", hub))  # fmt: skip
    with open(os.path.join(hub, "me", "deep", "README.md"), encoding="utf-8") as f:
        code = f.read().split("```python\n")[1].split("```")[0].replace('"me/', f'"{hub}/me/')
    code = code.replace('"dpm"', repr(dpm))  # the local source, named by its folder name: where the reader has it
    scope = {}
    exec(code.replace("image = pipe(", "pass  # "), scope)  # the card's own code, up to sampling
    assert type(scope["pipe"].scheduler) is DPMSolverMultistepScheduler


def test_a_one_backbone_run_of_other_class_names_says_it_saves_none(examples, script, image_folder, tmp_path):
    # (the warning itself, logged by the training loop, is tested with the experts script)
    labelled = {"num_class_embeds": 4}  # the image folder's 3 classes + the null label
    DualBackbonePipeline(
        shallow=UNet2DModel(**SMALL_UNET, **labelled), deep=UNet2DModel(**TINY_UNET, **labelled),
        scheduler=DDIMScheduler(**LDM_SCHEDULE), switch_timestep=600, id2label={"0": "cat", "1": "dog", "2": "bird"},
    ).save_pretrained(tmp_path / "src")  # fmt: skip
    argv = _finetune_args(examples, image_folder, str(tmp_path / "src"), str(tmp_path / "run"), "--class_conditional")
    task = script.DualBackboneTask(script.parse_args([*argv, "--backbones", "shallow"]))
    task.class_names = ["0", "1", "2"]
    (warning,) = task.data_warnings()
    assert "['cat', 'dog', 'bird']" in warning and "the run saves no class names" in warning
    task.class_names = ["cat", "dog", "bird"]
    assert task.data_warnings() == []
