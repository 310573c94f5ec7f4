"""`examples/experts/train_experts.py`: all experts in one run (hard/soft), one expert per run and assembly."""

import fnmatch
import json
import os
import shlex
import shutil

import huggingface_hub
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_stages import ExpertRoutingPipeline, IUNet2DModel, TimestepPartition
from diffusers_stages.evaluation import count_flops
from diffusers_stages.models.meme import attention_share
from diffusers_stages.plan import run as plan_run
from diffusers_stages.planning.budget import expected_flops
from diffusers_stages.timestep_sampling import stage_mass
from diffusers_stages.training import ExpertTask
from tests.conftest import SMALL_UNET


@pytest.fixture(scope="module")
def script(examples):
    return examples.load_script("experts")


def _sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=4, generator=torch.manual_seed(0), output_type="np", **kwargs).images


def test_all_experts_hard_assignment_meme_architectures(examples, script, image_folder, tmp_path):
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--assignment", "hard",
         "--class_conditional", "--max_train_steps", "2"])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    assert pipe.experts.partition.boundaries == (250.0, 500.0, 750.0)
    # MEME presets: iU-Nets, convolution-heavy near the data, attention-heavy near the noise
    experts = pipe.experts.experts
    assert all(type(e) is IUNet2DModel for e in experts)
    assert [e.config.attention_ratios for e in experts] == [0.125, 0.375, 0.625, 0.875]
    shares = [attention_share(e) for e in experts]  # after rounding to heads of 4 channels at widths 8 and 16
    assert shares == sorted(shares) and shares[0] < 0.5 < shares[3]
    assert _sample(pipe, class_labels=[0, 1]).shape == (2, 8, 8, 3)


def test_one_expert_per_run_then_assemble(examples, script, image_folder, tmp_path, monkeypatch):
    runs = []
    for index in range(2):
        runs.append(str(tmp_path / f"expert{index}"))
        push = ["--push_to_hub", "--hub_model_id", "me/expert0", "--hub_local_dir", str(tmp_path / "hub0")] * (
            index == 0
        )
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", runs[-1], "--num_experts", "2",
             "--expert_index", str(index), "--own_interval_probability", "0.9,0.7", "--max_train_steps", "1",
             "--expert_block_out_channels", "16,16", "8,16", "--gradient_checkpointing", *push])  # fmt: skip
        assert os.path.isdir(os.path.join(runs[-1], f"expert_{index}"))
    # the pushed run's card: its code (was `StagedDiffusionPipeline.from_pretrained`, which refuses a folder without a
    # pipeline) downloads the run, which assembles with the other runs
    with open(tmp_path / "hub0" / "me" / "expert0" / "README.md", encoding="utf-8") as f:
        code = f.read().split("```python\n")[1].split("```")[0]

    def snapshot_download(repo_id, allow_patterns, **kwargs):  # the files of the pushed repository it asks for
        pushed, snapshot = tmp_path / "hub0" / repo_id, tmp_path / "snapshot"
        for path in (p for p in pushed.rglob("*") if p.is_file()):
            name = path.relative_to(pushed).as_posix()
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    card = {}
    exec(code.replace('"me/expert0"', repr(str(tmp_path / "hub0" / "me" / "expert0"))), card)  # as downloaded
    assert type(card["expert"]) is IUNet2DModel
    runs[0] = card["run"]
    out, hub = str(tmp_path / "assembled"), str(tmp_path / "hub")
    examples.train(script, ["--assemble_experts", *runs, "--output_dir", out, "--num_sample_images", "4", "--num_inference_steps", "3",
         "--push_to_hub", "--hub_model_id", "me/experts", "--hub_local_dir", hub])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(os.path.join(hub, "me", "experts"))
    assert [e.config.block_out_channels for e in pipe.experts.experts] == [[16, 16], [8, 16]]
    assert all(type(e) is IUNet2DModel for e in pipe.experts.experts)  # assembled with the class each run saved
    assert _sample(pipe, batch_size=1).shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match="one run per expert"):
        examples.train(script, ["--assemble_experts", runs[0], runs[0], "--output_dir", str(tmp_path / "bad")])


def test_soft_assignment_with_a_zero_stage_share_trains(examples, script, image_folder, tmp_path):
    # the expert with no share of the batch draws no sample (a RuntimeError at the first step before)
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out,
                            "--stage_shares", "1,1,1,0", "--max_train_steps", "1"])  # fmt: skip
    assert len(ExpertRoutingPipeline.from_pretrained(out).experts.loaded_experts) == 4


def test_model_config_gives_every_expert_that_unet(examples, script, image_folder, tmp_path):
    unet = UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)  # fmt: skip
    unet.save_config(tmp_path / "unet")
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--num_experts", "2",
         "--model_config", str(tmp_path / "unet" / "config.json"), "--assignment", "hard", "--max_train_steps", "1"])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    assert [type(e) for e in pipe.experts.experts] == [UNet2DModel, UNet2DModel]
    assert _sample(pipe, batch_size=1).shape == (1, 8, 8, 3)


def test_a_budget_plan_of_experts_trains_as_planned(examples, script, image_folder, tmp_path, capsys):
    """`plan --architecture experts --budget` prints the `train_experts.py` arguments of its experts (before, an
    experts plan could not be trained: `--expert_block_out_channels` was refused with `--model_config`), and the
    trained pipeline samples at exactly the FLOPs the plan expected."""
    config = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
                  norm_num_groups=4, down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2)  # fmt: skip
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(config))
    budget = 1.2 * expected_flops(config, TimestepPartition([500]), [(8, 16)] * 2, 4, DDPMScheduler())
    planned = plan_run(["--train_data_dir", image_folder, "--resolution", "8", "--num_channels", "3", "--num_levels",
                        "30", "--num_samples", "16", "--num_stages", "2", "--model_config", str(path), "--budget",
                        str(budget), "--num_inference_steps", "4", "--architecture", "experts"])  # fmt: skip
    printed = [line for line in capsys.readouterr().out.splitlines() if "train_experts.py " in line]
    assert len(printed) == 1 and "decoder_block_out_channels" not in planned
    assert planned["expected_flops"] <= budget and planned["expert_block_out_channels"] != [[8, 16]] * 2
    out = str(tmp_path / "run")
    examples.train(script, [*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--assignment",
                            "hard", "--max_train_steps", "1", *shlex.split(printed[0].split("train_experts.py ")[1])])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    assert [list(e.config.block_out_channels) for e in pipe.experts.experts] == planned["expert_block_out_channels"]
    assert list(pipe.experts.partition.boundaries) == planned["stage_boundaries"]
    pipe.scheduler = DDPMScheduler()  # the plan's sampler (the command's default schedule)
    pipe.set_progress_bar_config(disable=True)
    flops, _ = count_flops(lambda: pipe(batch_size=1, num_inference_steps=4, output_type="pt"))
    assert flops == planned["expected_flops"]


def test_a_training_budget_plan_of_experts_prints_the_batch_it_paid_for(examples, script, image_folder, tmp_path,
                                                                        capsys):  # fmt: skip
    """A training budget pays for one step of `plan --batch_size` images, each trained by the expert of its interval
    (the batch stratified by the stages' mass, the plan's `stage_calls`). The printed arguments left the batch to the
    script's default (16) and the assignment to its default, soft, which splits the batch equally over the experts:
    the run trained at another cost per step than the plan expected."""
    config = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
                  norm_num_groups=4, down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2)  # fmt: skip
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(config))
    planned = plan_run(["--train_data_dir", image_folder, "--resolution", "8", "--num_channels", "3", "--num_levels",
                        "30", "--num_samples", "16", "--num_stages", "2", "--model_config", str(path), "--budget",
                        "1e8", "--batch_size", "6", "--architecture", "experts"])  # fmt: skip
    printed = [line for line in capsys.readouterr().out.splitlines() if "train_experts.py " in line]
    arguments = shlex.split(printed[0].split("train_experts.py ")[1])
    at = examples.TINY_RUN.index("--train_batch_size")
    run = examples.TINY_RUN[:at] + examples.TINY_RUN[at + 2 :]  # the batch is the plan's
    args = script.parse_args([*run, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
                              "--max_train_steps", "1", *arguments])  # fmt: skip
    assert args.train_batch_size == 6 and args.assignment == "hard"
    task = ExpertTask(args)  # each sample to its interval's expert, in the proportions the plan paid for
    assert [6 * mass for mass in stage_mass(task.partition)] == planned["stage_calls"]
    examples.train(script, [*run, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
                            "--max_train_steps", "1", *arguments])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(str(tmp_path / "run"))
    assert [list(e.config.block_out_channels) for e in pipe.experts.experts] == planned["expert_block_out_channels"]


@pytest.mark.parametrize(
    "extra, message",
    [  # were ignored in silence: the config's UNet2DModel trained instead
        (["--layers_per_block", "1"], "`--layers_per_block` 1 cannot be combined with `--model_config`"),
        (["--block_out_channels", "8,16"], "`--block_out_channels` [8, 16] cannot be combined with `--model_config`"),
        (["--expert_attention_shares", "0,1"], "`--expert_attention_shares` [0.0, 1.0] cannot be combined with `--model_config`"),
        # each expert's own widths are taken (a budget plan's), but one per block of the config's U-Net
        (["--expert_block_out_channels", "8,16", "8,16,16"], "gives expert 1 the widths [8, 16, 16], but the U-Net"),
        # a width of 0 built (on the meta device too) and failed in the first convolution, after the data were read
        (["--expert_block_out_channels", "8,16", "0,16"], "gives expert 1 the widths [0, 16]: each must be a positive"),
    ],
)  # fmt: skip
def test_model_config_refuses_the_shape_options_it_would_ignore(
    examples, script, image_folder, tmp_path, capsys, extra, message
):
    config = tmp_path / "config.json"
    config.write_text('{"block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 1}')
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
                           "--num_experts", "2", "--assignment", "hard", "--model_config", str(config), *extra])  # fmt: skip
    assert message in capsys.readouterr().err


def test_expert_widths_count_the_blocks_of_unet2dmodels_default_widths(
    examples, script, image_folder, tmp_path, capsys
):
    config = tmp_path / "config.json"  # no `block_out_channels`: UNet2DModel's default, 4 blocks
    config.write_text('{"norm_num_groups": 4, "layers_per_block": 1}')
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY_RUN, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
                           "--num_experts", "2", "--assignment", "hard", "--model_config", str(config),
                           "--expert_block_out_channels", "8,16,16,16", "8,16"])  # fmt: skip
    assert "gives expert 1 the widths [8, 16], but the U-Net of `--model_config`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--expert_index", "4"], "`--expert_index` must be in [0, 4)"),
        (["--own_interval_probability", "0.9,0.5"], "`--own_interval_probability` needs one value per expert (4)"),
        (["--assignment", "hard", "--own_interval_probability", "0.9,0.5,0.5,0.5"], "is for `--assignment soft`"),
        # the three were named by the library's arguments (`attention_shares`, `block_out_channels`), not the options
        (["--expert_attention_shares", "1,0.5,0,0"], "`--expert_attention_shares` must not decrease toward the noise"),
        (["--expert_attention_shares", "2,2,2,2"], "`--expert_attention_shares` must hold 4 values in [0, 1], got"),
        (
            ["--expert_block_out_channels", "8,16", "8", "8,16", "8,16"],
            "Every expert needs the same number of levels in `--expert_block_out_channels`, got",
        ),
        (["--num_experts", "2"], "`--own_interval_probability` must be given for 2 experts"),
        (["--own_interval_probability", "0.8,0.4,0,0.1"], "values must be in (0, 1]"),
        (["--attention_head_dim", "3"], "must be multiples of `attention_head_dim`=3"),
        (["--num_experts", "0"], "`--num_experts` must be a positive integer, got 0."),  # was named `num_stages`
        (["--num_experts", "-1"], "`--num_experts` must be a positive integer, got -1."),
        (  # expert 1 holds no integer timestep: a ValueError at the first step (soft), or never trained (hard)
            ["--stage_boundaries", "500.2", "500.7", "--own_interval_probability", "0.5,0.5,0.5"],
            "`--stage_boundaries` [500.2, 500.7] leave experts [1] no integer training timestep (expert 1: [500.2, 500.7))",
        ),
        (
            ["--num_experts", "2000", "--assignment", "hard"],
            "`--num_experts` 2000 leave experts [1, 3, 5, 7, 9, 11, 13, 15, ...] no integer training timestep",
        ),
        (  # advised to widen the intervals, which `--num_experts` gives no way to do
            ["--num_experts", "2000", "--assignment", "hard"],
            "they could never train. Give at most 1000 experts (`--num_train_timesteps`) or `--stage_boundaries`.",
        ),
        (  # the boundaries' 4 experts were trained in silence
            ["--num_experts", "3", "--stage_boundaries", "300", "600", "900"],
            "`--num_experts` 3 disagrees with `--stage_boundaries` [300.0, 600.0, 900.0] (4 experts)",
        ),
        (  # was ignored in silence (and a zero share a ValueError at the first step): a run trains one expert
            ["--expert_index", "1", "--stage_shares", "1,0,1,1"],
            "`--stage_shares` [1.0, 0.0, 1.0, 1.0] cannot be combined with `--expert_index` 1",
        ),
        (  # were ignored in silence: the presets' iU-Nets have their own blocks
            ["--down_block_types", "DownBlock2D", "AttnDownBlock2D"],
            "`--down_block_types` ['DownBlock2D', 'AttnDownBlock2D'] is not used by the MEME presets' iU-Nets",
        ),
        *(  # were ignored in silence: every batch was stratified over the experts all the same
            (["--stage_sampling", scheme], f"`--stage_sampling {scheme}` is not implemented for experts")
            for scheme in ("per_batch", "per_rank")
        ),
    ],
)
def test_bad_expert_arguments(examples, script, image_folder, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        script.parse_args([*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path), *extra])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--push_to_hub", "--hub_model_id", "me/x y"], "`--hub_model_id` 'me/x y' is not a Hub repository name"),
        (["--num_sample_images", "0"], "`--num_sample_images` must be a positive integer, got 0."),
        (["--eval_batch_size", "0"], "`--eval_batch_size` must be a positive integer, got 0."),
        (["--output_dir", ""], "`--output_dir` must name a folder, got ''"),
        # training options, accepted and ignored: assembling trains nothing
        (["--max_train_steps", "100"], "`--max_train_steps` 100 is not used by `--assemble_experts`"),
        (["--train_data_dir", "data"], "`--train_data_dir` 'data' is not used by `--assemble_experts`"),
        (["--use_ema"], "`--use_ema` True is not used by `--assemble_experts`"),
        (["--expert_index", "1"], "`--expert_index` 1 is not used by `--assemble_experts`"),
    ],
)
def test_bad_assembly_arguments_are_refused_before_assembling(script, tmp_path, capsys, extra, message):
    # were accepted unchecked: a traceback once the experts were assembled and saved (the push, the sample grid)
    with pytest.raises(SystemExit):
        script.parse_args(["--assemble_experts", str(tmp_path / "a"), str(tmp_path / "b"), *extra])
    assert message in capsys.readouterr().err


def test_assembly_takes_its_own_options(script, tmp_path):
    argv = ["--assemble_experts", str(tmp_path / "a"), "--output_dir", str(tmp_path / "out"), "--seed", "3",
            "--num_sample_images", "2", "--num_inference_steps", "3", "--push_to_hub", "--hub_model_id", "me/x",
            "--hub_local_dir", str(tmp_path / "hub"), "--hub_private_repo", "--logger", "none",
            "--eval_batch_size", "1"]  # fmt: skip
    args = script.parse_args(argv)
    assert args.seed == 3 and args.eval_batch_size == 1  # the assembled pipeline's grid is sampled in chunks too


@pytest.mark.parametrize(
    "entry, message",
    [
        ("expert_run.json", "(it holds expert_run.json, an `--expert_index` run's record)"),
        ("checkpoint-3/", "(it holds checkpoints: checkpoint-3)"),
        ("model_index.json", None),  # a saved pipeline, overwritten as before
        ("", None),  # an empty folder
        (None, None),  # no folder yet
    ],
)
def test_assembling_into_a_training_run_folder_is_refused(script, tmp_path, capsys, entry, message):
    # was written into the run's folder, beside its own files: that folder was then refused as a run (it "holds both a
    # saved pipeline and an `--expert_index` run"), and the run, resumed, saved over the pipeline
    out = tmp_path / "out"
    if entry is not None:
        out.mkdir()
    if entry:
        (out / entry.rstrip("/")).mkdir() if entry.endswith("/") else (out / entry).write_text("{}")
    argv = ["--assemble_experts", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir", str(out)]
    if message is None:
        assert script.parse_args(argv).output_dir == str(out)
        return
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    error = capsys.readouterr().err
    assert f"`--output_dir` {str(out)!r} is the folder of a training run" in error and message in error


def test_resuming_with_other_stage_boundaries_names_them(examples, script, image_folder, tmp_path):
    # an expert's config holds no boundaries: a resumed run went on training every expert on another interval
    out = str(tmp_path / "run")
    base = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--checkpointing_steps", "1",
            "--assignment", "hard"]  # fmt: skip
    examples.train(script, [*base, "--max_train_steps", "1"])
    resume = [*base, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=r"was written with other stages \(`stage_boundaries` \[250.0, 500.0, 750.0\] "
                       r"there, \[100.0, 200.0, 300.0\] now\): resume with the arguments"):  # fmt: skip
        examples.train(script, [*resume, "--stage_boundaries", "100", "200", "300"])
    examples.train(script, resume)
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))


@pytest.mark.parametrize("model_config", [False, True])
def test_the_card_of_a_one_expert_run_loads_its_expert(
    examples, script, image_folder, tmp_path, model_config, monkeypatch
):
    # the card's code was `StagedDiffusionPipeline.from_pretrained(repo)`, which a one-expert run (no pipeline) fails
    from diffusers_stages.training import ExpertTask, build_task

    shape = [*examples.TINY_RUN]
    if model_config:
        config = tmp_path / "config.json"
        UNet2DModel(**SMALL_UNET).save_config(tmp_path)
        shape += ["--model_config", str(config)]
    else:
        shape = [*examples.TINY]
    run = tmp_path / "run"
    args = script.parse_args([*shape, "--train_data_dir", image_folder, "--output_dir", str(run), "--num_experts", "2",
                              "--own_interval_probability", "0.9,0.7", "--expert_index", "1"])  # fmt: skip
    task = build_task(ExpertTask, args)
    expert = task.build_networks(3, 8, None)["expert_1"]
    expert.save_pretrained(run / "expert_1")
    code = "\n".join(task.usage(str(run)))
    assert "--assemble_experts" in code
    namespace = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: repo_id)  # no network
    exec(code, namespace)  # the card's code, on the run's folder
    assert namespace["run"] == str(run)
    assert type(namespace["expert"]) is type(expert)


def test_assembled_one_expert_runs_keep_their_class_names(examples, script, image_folder, tmp_path):
    # one-expert runs saved no class names (only all-experts runs' pipelines did): the assembled pipeline had none
    import json

    runs = [str(tmp_path / f"expert{index}") for index in range(2)]
    for index, run in enumerate(runs):
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", run, "--num_experts",
                                "2", "--expert_index", str(index), "--class_conditional", "--max_train_steps", "1",
                                "--assignment", "hard"])  # fmt: skip
    out, hub = str(tmp_path / "assembled"), str(tmp_path / "hub")
    examples.train(script, ["--assemble_experts", *runs, "--output_dir", out, "--num_sample_images", "2",
                            "--num_inference_steps", "2", "--push_to_hub", "--hub_model_id", "me/experts",
                            "--hub_local_dir", hub])  # fmt: skip
    pipe = ExpertRoutingPipeline.from_pretrained(out)
    assert pipe.config.id2label == {"0": "0", "1": "1", "2": "2"} and pipe.get_label_ids(["2"]) == [2]
    with open(os.path.join(hub, "me", "experts", "README.md"), encoding="utf-8") as f:
        assert "image = pipe(class_labels=pipe.get_label_ids(['0'])).images[0]" in f.read()
    # runs trained on other class names do not assemble
    path = os.path.join(runs[1], "expert_run.json")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**info, "id2label": {"0": "zero", "1": "one", "2": "two"}}, f)
    with pytest.raises(ValueError, match=r"`--assemble_experts`: .*expert1' was trained on other class names"):
        examples.train(script, ["--assemble_experts", *runs, "--output_dir", str(tmp_path / "bad")])


def test_a_one_expert_run_says_why_it_draws_no_sample_grid(examples, script, image_folder, tmp_path, caplog):
    # one expert alone does not sample: the run wrote no `samples/` grids and no sample_grid.png, without a word,
    # whatever `--save_images_steps` asked for
    out = str(tmp_path / "run")
    with caplog.at_level("INFO"):
        examples.train(script, [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", out, "--num_experts", "2",
                                "--assignment", "hard", "--expert_index", "1", "--max_train_steps", "2",
                                "--save_images_steps", "1"])  # fmt: skip
    assert not os.path.exists(os.path.join(out, "sample_grid.png"))
    assert caplog.text.count("No sample grid") == 1  # said once, not at every `--save_images_steps`
    assert "one expert alone does not sample" in caplog.text and "--assemble_experts" in caplog.text


def test_a_batch_smaller_than_the_expert_count_trains_on_one_process_only(
    examples, script, image_folder, tmp_path, monkeypatch, capsys
):
    # refused before on one process too, where the experts each batch leaves out simply get no gradient; on several
    # processes each expert is its own DDP network, which every process must run at every step
    argv = [*examples.TINY, "--train_data_dir", image_folder, "--output_dir", str(tmp_path / "run"),
            "--assignment", "hard", "--train_batch_size", "2", "--max_train_steps", "2"]  # fmt: skip
    examples.train(script, argv)
    assert os.path.isfile(tmp_path / "run" / "model_index.json")
    monkeypatch.setenv("WORLD_SIZE", "2")
    examples.assert_usage_error(script, argv, "`--train_batch_size` 2 is smaller than the 4 experts trained", capsys)
