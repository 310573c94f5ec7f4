"""`train_experts.py --pretrained_model_name_or_path`: fine-tunes an `ExpertRoutingPipeline` folder (all experts, or
one with `--expert_index`), keeps its boundaries, experts and noise schedule, and refuses the shape options."""

import argparse
import json
import os
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from diffusers_stages import (
    ExpertRoutingModel,
    ExpertRoutingPipeline,
    IUNet2DModel,
    MultiStagePipeline,
    MultiStageUNet2DModel,
)
from diffusers_stages.training.tasks import assemble_expert_runs
from tests.conftest import LDM_SCHEDULE, TINY_UNET, tiny_vae


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("experts")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A tiny two-expert `ExpertRoutingPipeline` (a UNet2DModel clean expert, an iU-Net noisy one) split at 400."""
    folder = tmp_path_factory.mktemp("experts") / "source"
    torch.manual_seed(0)
    iunet = IUNet2DModel(sample_size=8, block_out_channels=(8, 16), attention_ratios=0.5, attention_head_dim=4,
                         layers_per_block=1, norm_num_groups=4)  # fmt: skip
    experts = ExpertRoutingModel([UNet2DModel(**TINY_UNET), iunet], stage_boundaries=(400,))
    ExpertRoutingPipeline(experts=experts, scheduler=DDIMScheduler(**LDM_SCHEDULE)).save_pretrained(folder)
    return str(folder)


def _finetune_args(examples, image_folder: str, source: str, out: str, *extra: str) -> list[str]:
    return examples.finetune_args(
        image_folder, source, out, "--ddpm_beta_schedule", "scaled_linear", "--assignment", "hard", *extra
    )


def _changed(examples, before: str, after: str, expert: int) -> bool:
    """Whether expert ``expert`` of folder ``after`` (a pipeline's `experts`, or a one-expert run) has other weights."""
    return examples.weights_changed(os.path.join(before, f"expert_{expert}"), os.path.join(after, f"expert_{expert}"))


def test_finetunes_every_expert_and_keeps_the_boundaries(examples, script, image_folder, source, tmp_path):
    out = str(tmp_path / "run")
    examples.train(script, _finetune_args(examples, image_folder, source, out))

    before, after = ExpertRoutingPipeline.from_pretrained(source), ExpertRoutingPipeline.from_pretrained(out)
    assert after.partition == before.partition and after.partition.boundaries == (400.0,)
    assert [type(e) for e in after.experts.experts] == [UNet2DModel, IUNet2DModel]
    for a, b in zip(before.experts.experts, after.experts.experts):
        assert {k: v for k, v in a.config.items() if not k.startswith("_")} == {
            k: v for k, v in b.config.items() if not k.startswith("_")
        }
    assert all(_changed(examples, f"{source}/experts", f"{out}/experts", i) for i in range(2))
    # sampled with the source's scheduler class and schedule
    assert type(after.scheduler) is DDIMScheduler
    assert {k: after.scheduler.config[k] for k in LDM_SCHEDULE} == LDM_SCHEDULE
    after.set_progress_bar_config(disable=True)
    assert after(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 8, 8, 3)


def test_finetunes_one_expert_per_run_and_the_runs_assemble(examples, script, image_folder, source, tmp_path):
    runs = [str(tmp_path / f"expert{i}") for i in range(2)]
    for index, run in enumerate(runs):
        examples.train(script, _finetune_args(examples, image_folder, source, run, "--expert_index", str(index)))
        # the format of any one-expert run: only its expert, the scheduler and the run's record
        assert sorted(n for n in os.listdir(run) if os.path.isdir(os.path.join(run, n)) and n != "logs") == [
            f"expert_{index}",
            "scheduler",
        ]
        with open(os.path.join(run, "expert_run.json"), encoding="utf-8") as f:
            record = json.load(f)
        assert record["expert_index"] == index and record["stage_boundaries"] == [400.0]
        assert _changed(examples, f"{source}/experts", run, index)

    out = str(tmp_path / "assembled")
    examples.train(script, ["--assemble_experts", *runs, "--output_dir", out, "--num_sample_images", "2",
                            "--num_inference_steps", "3"])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    assert pipe.partition.boundaries == (400.0,) and type(pipe.scheduler) is DDIMScheduler
    for index, run in enumerate(runs):
        assert not _changed(examples, run, f"{out}/experts", index)


def test_a_finetuned_expert_assembles_back_into_its_source(examples, script, image_folder, source, tmp_path):
    # the source pipeline first (the base): the run replaces its expert 1, the other experts are the source's (before,
    # assembling needed a fine-tuned run of every expert: "is not a finished `--expert_index` run")
    ft1, out = str(tmp_path / "ft1"), str(tmp_path / "assembled")
    hub = tmp_path / "hub"
    examples.train(script, _finetune_args(examples, image_folder, source, ft1, "--expert_index", "1", "--push_to_hub",
                                          "--hub_model_id", "me/ft1", "--hub_local_dir", str(hub)))  # fmt: skip
    card = (hub / "me" / "ft1" / "README.md").read_text(encoding="utf-8")  # says how to put it back
    name = os.path.basename(source)  # a local folder by its name: its path on this machine is never published
    assert f"--assemble_experts <{name}'s folder> <this run's folder> --output_dir <folder>" in card
    assert str(tmp_path) not in card
    examples.train(script, ["--assemble_experts", source, ft1, "--output_dir", out, "--num_sample_images", "2",
                            "--num_inference_steps", "3", "--push_to_hub", "--hub_model_id", "me/assembled",
                            "--hub_local_dir", str(hub)])  # fmt: skip
    card = (hub / "me" / "assembled" / "README.md").read_text(encoding="utf-8")
    assert f"from the ExpertRoutingPipeline `{name}`, its experts replaced by those of 1 run(s)" in card
    assert str(tmp_path) not in card
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    assert pipe.partition.boundaries == (400.0,) and type(pipe.scheduler) is DDIMScheduler
    assert [type(e) for e in pipe.experts.experts] == [UNet2DModel, IUNet2DModel]
    assert not _changed(examples, ft1, f"{out}/experts", 1) and not _changed(
        examples, f"{source}/experts", f"{out}/experts", 0
    )
    assert _changed(examples, f"{source}/experts", f"{out}/experts", 1)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 8, 8, 3)
    assert os.path.isfile(os.path.join(out, "sample_grid.png"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_experts", "2"], "`--num_experts` 2 cannot be combined with `--pretrained_model_name_or_path`"),
        (["--stage_boundaries", "500"], "`--stage_boundaries` [500.0] cannot be combined with `--pretrained_model_name_or_path`"),
        (["--expert_block_out_channels", "8,16", "8,16"], "`--expert_block_out_channels` [(8, 16), (8, 16)] cannot be combined"),
        (["--expert_attention_shares", "0.2,0.8"], "`--expert_attention_shares` [0.2, 0.8] cannot be combined"),
        (["--model_config", "config.json"], "`--model_config` config.json cannot be combined"),
        (["--block_out_channels", "8,16"], "`--block_out_channels` [8, 16] cannot be combined with `--pretrained_model_name_or_path`: fine-tuning keeps the model of"),
        (["--layers_per_block", "2"], "`--layers_per_block` 2 cannot be combined"),
        (["--ddpm_beta_schedule", "linear"], "`--ddpm_beta_schedule` linear disagrees with the scheduler of"),
        (["--prediction_type", "v_prediction"], "`--prediction_type` v_prediction disagrees with the scheduler of"),
        (["--boundary_units", "sigma"], "`--boundary_units` sigma disagrees with the model of"),
        (["--expert_index", "2"], "`--expert_index` must be in [0, 2), got 2"),
    ],
)  # fmt: skip
def test_contradictions_are_usage_errors(examples, script, image_folder, source, tmp_path, capsys, extra, message):
    examples.assert_usage_error(script, _finetune_args(examples, image_folder, source, str(tmp_path / "run"), *extra),
                                message, capsys)  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class_conditional"], "`--class_conditional`: the data give 3 classes (+ the null label: num_class_embeds=4), but the model of"),
        # the samples' size is the arguments': a usage error, before any image is read
        (["--resolution", "16"], "`--resolution` 16 gives 16x16 samples, but the model of"),
        (["--expert_index", "1", "--resolution", "16"], "`--resolution` 16 gives 16x16 samples, but the model of"),
    ],
)  # fmt: skip
def test_data_that_does_not_fit_the_experts_is_refused_before_training(
    examples, script, image_folder, source, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    argv = _finetune_args(examples, image_folder, source, str(out), *extra)
    if "--resolution" in extra:
        examples.assert_usage_error(script, argv, message, capsys)
    else:
        examples.assert_refused_before_training(script, argv, message)
    assert not (out / "experts").exists()


def test_a_folder_of_another_pipeline_or_expert_class_is_named(examples, script, image_folder, tmp_path, capsys):
    MultiStagePipeline(unet=MultiStageUNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(
        tmp_path / "multistage"
    )
    argv = _finetune_args(examples, image_folder, str(tmp_path / "multistage"), str(tmp_path / "run"))
    examples.assert_usage_error(script, [*argv, "--ddpm_beta_schedule", "linear"],
                                "is not an ExpertRoutingPipeline folder or Hub repository", capsys)  # fmt: skip

    # an expert class the script does not train (read from a folder: refused by name, nothing imported)
    experts = ExpertRoutingModel(
        [MultiStageUNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=(400,)
    )
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "other")
    argv = _finetune_args(examples, image_folder, str(tmp_path / "other"), str(tmp_path / "run"))
    with pytest.raises(SystemExit):
        script.parse_args([*argv, "--ddpm_beta_schedule", "linear"])
    error = capsys.readouterr().err
    assert "holds a 'MultiStageUNet2DModel' (`_class_name`) as its experts/expert_0" in error
    assert "IUNet2DModel" in error and "UNet2DModel" in error


def test_the_source_is_not_written_back_into_the_arguments(examples, script, image_folder, source, tmp_path):
    args = script.parse_args(_finetune_args(examples, image_folder, source, str(tmp_path / "run")))
    task = script.ExpertTask(args)
    assert args.num_experts is None and task.partition.num_stages == 2
    assert isinstance(args, argparse.Namespace) and args.pretrained_model_name_or_path == source


def test_an_expert_folder_leading_out_of_the_source_is_refused(
    examples, script, image_folder, source, tmp_path, capsys
):
    # read from a folder: hostile input (a link to another folder's expert is not read, its config neither)
    hostile = tmp_path / "hostile"
    shutil.copytree(source, hostile)
    shutil.move(hostile / "experts" / "expert_1", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", hostile / "experts" / "expert_1")
    out = tmp_path / "run"
    argv = _finetune_args(examples, image_folder, str(hostile), str(out))
    examples.assert_usage_error(script, argv, "`subfolder` 'experts/expert_1' of", capsys)
    assert not out.exists()


def test_assembling_refuses_a_pretrained_folder(script, source, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--assemble_experts", str(tmp_path / "a"), "--pretrained_model_name_or_path", source])
    assert "cannot be combined with `--assemble_experts`: assembling gathers" in capsys.readouterr().err


def test_a_one_expert_run_of_a_latent_source_keeps_its_vae(examples, script, image_folder, tmp_path):
    # without `--vae_path`: the folder's own VAE encodes the data, and is saved with the run (the runs must share it)
    torch.manual_seed(0)
    latent = {**TINY_UNET, "in_channels": 4, "out_channels": 4}
    experts = ExpertRoutingModel([UNet2DModel(**latent), UNet2DModel(**latent)], stage_boundaries=(400,))
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler(), vae=tiny_vae()).save_pretrained(tmp_path / "src")
    source, out = str(tmp_path / "src"), str(tmp_path / "run")
    examples.train(script, examples.finetune_args(image_folder, source, out, "--resolution", "16", "--expert_index", "0",
                                                  "--assignment", "hard"))  # fmt: skip
    assert _changed(examples, f"{source}/experts", out, 0)
    assert not examples.weights_changed(f"{source}/vae", f"{out}/vae")
    # and assembles back into its source, whose VAE it shares
    pipe = assemble_expert_runs([source, out])
    kept = ExpertRoutingPipeline.from_pretrained(source).vae.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in pipe.vae.state_dict().items())


def test_a_hostile_expert_class_entry_is_a_usage_error(examples, script, image_folder, source, tmp_path, capsys):
    # read from a folder: the container's `[module, class]` entries are never imported nor run
    hostile = tmp_path / "hostile"
    shutil.copytree(source, hostile)
    config = json.loads((hostile / "experts" / "config.json").read_text())
    config["expert_classes"][0] = ["os", "system"]
    (hostile / "experts" / "config.json").write_text(json.dumps(config))
    argv = _finetune_args(examples, image_folder, str(hostile), str(tmp_path / "run"))
    message = "entry 0 of `expert_classes` in its experts/config.json must name the class of experts/expert_0"
    examples.assert_usage_error(script, argv, message, capsys)


def test_a_bad_partition_in_the_source_is_named_with_its_file(
    examples, script, image_folder, source, tmp_path, capsys
):
    # read from a folder: the container's boundaries are checked as the model checks them, the file named
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    config = json.loads((bad / "experts" / "config.json").read_text())
    (bad / "experts" / "config.json").write_text(json.dumps({**config, "stage_boundaries": [400, 1500]}))
    argv = _finetune_args(examples, image_folder, str(bad), str(tmp_path / "run"))
    message = f"`--pretrained_model_name_or_path` {str(bad)!r}: its experts/config.json: `stage_boundaries`"
    examples.assert_usage_error(script, argv, message, capsys)


def test_a_source_saved_as_a_variant_only_is_refused_before_training(examples, script, image_folder, tmp_path, capsys):
    # (diffusers' OSError "no file named diffusion_pytorch_model.bin found" once the networks were built, after the
    # accelerator, the VAE and the data)
    torch.manual_seed(0)
    experts = ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=(400,))
    pipe = ExpertRoutingPipeline(experts=experts, scheduler=DDIMScheduler(**LDM_SCHEDULE))
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    out = tmp_path / "run"
    message = "its experts/expert_0/ holds no weights to load without a variant, only ['diffusion_pytorch_model.fp16"
    examples.assert_usage_error(
        script, _finetune_args(examples, image_folder, str(tmp_path / "fp16"), str(out)), message, capsys
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "key, value", [("block_out_channels", ["8", "16"]), ("layers_per_block", "1"), ("norm_num_groups", 3)]
)
def test_an_expert_config_that_does_not_build_is_a_usage_error(
    examples, script, image_folder, source, tmp_path, capsys, key, value
):
    # read from a folder: before, a TypeError from inside the model (or the loader's ValueError) once the networks
    # were built, after the accelerator, the VAE and the data
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    config = json.loads((bad / "experts" / "expert_0" / "config.json").read_text())
    (bad / "experts" / "expert_0" / "config.json").write_text(json.dumps({**config, key: value}))
    argv = _finetune_args(examples, image_folder, str(bad), str(tmp_path / "run"))
    message = "its experts/expert_0/config.json does not build a UNet2DModel"
    examples.assert_usage_error(script, argv, message, capsys)


def test_a_latent_source_saved_as_a_variant_only_is_a_usage_error(examples, script, image_folder, tmp_path, capsys):
    # its VAE failed to load with diffusers' OSError once the accelerator was set up
    torch.manual_seed(0)
    latent = {**TINY_UNET, "in_channels": 4, "out_channels": 4}
    experts = ExpertRoutingModel([UNet2DModel(**latent), UNet2DModel(**latent)], stage_boundaries=(400,))
    pipe = ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler(), vae=tiny_vae())
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    argv = examples.finetune_args(image_folder, str(tmp_path / "fp16"), str(tmp_path / "run"), "--resolution", "16",
                                  "--assignment", "hard")  # fmt: skip
    examples.assert_usage_error(script, argv, "its vae/ holds no weights to load without a variant", capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("entry", ["vae", "vae/config.json"])
def test_a_source_vae_leading_out_of_the_source_is_a_usage_error(
    examples, script, image_folder, tmp_path, capsys, entry
):
    # (refused only when the run loaded the VAE, after the accelerator was set up, naming neither the option)
    torch.manual_seed(0)
    latent = {**TINY_UNET, "in_channels": 4, "out_channels": 4}
    experts = ExpertRoutingModel([UNet2DModel(**latent), UNet2DModel(**latent)], stage_boundaries=(400,))
    hostile = tmp_path / "hostile"
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler(), vae=tiny_vae()).save_pretrained(hostile)
    shutil.move(hostile / entry, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", hostile / entry)
    argv = examples.finetune_args(image_folder, str(hostile), str(tmp_path / "run"), "--resolution", "16",
                                  "--assignment", "hard")  # fmt: skip
    examples.assert_usage_error(script, argv, f"`--pretrained_model_name_or_path` {str(hostile)!r}: its vae/", capsys)
    assert not (tmp_path / "run").exists()


def test_a_source_vae_config_of_another_class_names_the_source(examples, script, image_folder, tmp_path, capsys):
    # (the error said "`--vae_path` <source> holds a AutoencoderTiny", an option not given)
    torch.manual_seed(0)
    latent = {**TINY_UNET, "in_channels": 4, "out_channels": 4}
    experts = ExpertRoutingModel([UNet2DModel(**latent), UNet2DModel(**latent)], stage_boundaries=(400,))
    odd = tmp_path / "odd"
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler(), vae=tiny_vae()).save_pretrained(odd)
    config = json.loads((odd / "vae" / "config.json").read_text())
    (odd / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    argv = examples.finetune_args(image_folder, str(odd), str(tmp_path / "run"), "--resolution", "16",
                                  "--assignment", "hard")  # fmt: skip
    message = f"`--pretrained_model_name_or_path` {str(odd)!r} holds a 'AutoencoderTiny' in its vae/config.json"
    examples.assert_usage_error(script, argv, message, capsys)


def test_a_square_sample_size_pair_of_another_size_gives_the_resolution_to_pass(
    examples, script, image_folder, source, tmp_path, capsys
):
    # (a [16, 16] expert refused 8x8 samples with "the data are square", which they were)
    other = tmp_path / "other"
    shutil.copytree(source, other)
    for expert in ("expert_0", "expert_1"):
        config = json.loads((other / "experts" / expert / "config.json").read_text())
        (other / "experts" / expert / "config.json").write_text(json.dumps({**config, "sample_size": [16, 16]}))
    message = "has sample_size=[16, 16]: pass `--resolution 16`."
    argv = _finetune_args(examples, image_folder, str(other), str(tmp_path / "run"))
    examples.assert_usage_error(script, argv, message, capsys)  # before any image is read


@pytest.mark.parametrize(
    "names, extra, said",
    [
        (["cat", "dog", "bird"], [], "saved with the data's (the pipeline's `id2label`)"),
        (["cat", "dog", "bird"], ["--expert_index", "1"], "`--assemble_experts` with it as the base refuses them"),
        (["0", "1", "2"], [], None),
    ],
)
def test_a_class_conditional_source_of_other_class_names_is_a_warning(
    examples, script, image_folder, tmp_path, caplog, names, extra, said
):
    # before, the data's class names replaced the source's silently (a one-expert run's were refused only when
    # assembled back into its source): transfer to other labels may be meant, so the run goes on, but says so
    torch.manual_seed(0)
    labelled = {**TINY_UNET, "num_class_embeds": 4}  # the image folder's 3 classes + the null label
    experts = ExpertRoutingModel([UNet2DModel(**labelled), UNet2DModel(**labelled)], stage_boundaries=(400,))
    id2label = {str(i): name for i, name in enumerate(names)}
    pipe = ExpertRoutingPipeline(experts=experts, scheduler=DDIMScheduler(**LDM_SCHEDULE), id2label=id2label)
    pipe.save_pretrained(tmp_path / "src")
    source, out = str(tmp_path / "src"), str(tmp_path / "run")
    examples.train(script, _finetune_args(examples, image_folder, source, out, "--class_conditional", *extra))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "class names" in r.getMessage()]
    if said is None:
        assert warnings == []
        return
    (warning,) = warnings
    assert f"`--pretrained_model_name_or_path` {source!r}" in warning and said in warning
    assert "['cat', 'dog', 'bird']" in warning and "['0', '1', '2']" in warning


@pytest.mark.parametrize(
    "save", [{}, {"max_shard_size": "10KB"}, {"safe_serialization": False}], ids=["file", "shards", "bin"]
)
def test_source_weights_of_another_width_are_refused_before_the_data_are_read(
    examples, script, image_folder, source, tmp_path, capsys, save
):
    # were refused by the strict loading only once the networks were built, after the data were read (minutes on a
    # real data set): the weight files' headers are read against the config's model when the arguments are checked
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    expert = bad / "experts" / "expert_0"
    for name in os.listdir(expert):
        if name.startswith("diffusion_pytorch_model"):
            os.remove(expert / name)
    config = json.loads((expert / "config.json").read_text())
    UNet2DModel(**{**TINY_UNET, "block_out_channels": (8, 24)}).save_pretrained(tmp_path / "wide", **save)
    for name in os.listdir(tmp_path / "wide"):
        if name.startswith("diffusion_pytorch_model"):
            shutil.copy(tmp_path / "wide" / name, expert / name)
    assert json.loads((expert / "config.json").read_text()) == config  # the config still says (8, 16)
    message = (
        f"`--pretrained_model_name_or_path` {str(bad)!r}: the weights in its experts/expert_0/ do not fit its "
        "config.json: down_blocks.1.attentions.0.group_norm.bias has shape [24] there, [16] in the UNet2DModel it builds"
    )
    examples.assert_usage_error(script, _finetune_args(examples, image_folder, str(bad), str(tmp_path / "run")),
                                message, capsys)  # fmt: skip


def test_assembling_on_several_processes_is_refused(script, tmp_path, capsys, monkeypatch):
    # `accelerate launch --num_processes 2 train_experts.py --assemble_experts ...` ran the assembly, its sample grid
    # and its push once per process, all writing the same folder and repository
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        script.parse_args(["--assemble_experts", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir",
                           str(tmp_path / "out")])  # fmt: skip
    assert "`--assemble_experts` runs on one process" in capsys.readouterr().err
