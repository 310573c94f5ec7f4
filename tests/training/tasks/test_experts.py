"""Assembling one-expert-per-run folders (`--assemble_experts`): the run folders are read as hostile input."""

import json
import re

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from diffusers_stages.training.tasks.experts import EXPERT_RUN_FILE, assemble_expert_runs
from tests.conftest import SMALL_UNET

SMALL = SMALL_UNET


@pytest.fixture
def runs(tmp_path):
    """Two finished `--expert_index` runs (experts 0 and 1 of a two-stage split)."""
    folders = []
    for index in range(2):
        run = tmp_path / f"run{index}"
        torch.manual_seed(index)
        UNet2DModel(**SMALL).save_pretrained(run / f"expert_{index}")
        DDPMScheduler().save_pretrained(run / "scheduler")
        info = {"expert_index": index, "prediction_type": "epsilon", "stage_boundaries": [500.0]}
        (run / EXPERT_RUN_FILE).write_text(
            json.dumps({**info, "num_train_timesteps": 1000, "boundary_units": "timestep"})
        )
        folders.append(run)
    return folders


def test_runs_assemble(runs):
    pipe = assemble_expert_runs([str(r) for r in runs])
    assert pipe.experts.loaded_experts == [0, 1] and type(pipe.scheduler) is DDPMScheduler


@pytest.mark.parametrize("name", ["UNet2DModel", "DiffusionPipeline", "SchedulerMixin", 5])
def test_a_scheduler_class_that_is_no_diffusers_scheduler_is_refused(runs, name):
    path = runs[0] / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": name}))
    with pytest.raises(ValueError, match="_class_name"):
        assemble_expert_runs([str(r) for r in runs])


def test_a_scheduler_config_that_does_not_build_is_named(runs):
    path = runs[0] / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_train_timesteps": "five"}))
    with pytest.raises(ValueError, match="`--assemble_experts`.*scheduler_config.json"):
        assemble_expert_runs([str(r) for r in runs])


@pytest.mark.parametrize("corruption", ["missing", "integers"])
def test_an_expert_checkpoint_that_disagrees_with_its_config_is_refused(runs, corruption):
    from safetensors.torch import load_file, save_file

    path = runs[1] / "expert_1" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(state)[0]
    state = (
        {k: v for k, v in state.items() if k != key} if corruption == "missing" else {**state, key: state[key].int()}
    )
    save_file(state, path)
    with pytest.raises(ValueError, match=key):
        assemble_expert_runs([str(r) for r in runs])


def test_an_expert_file_that_links_out_of_its_run_is_refused(runs, tmp_path):
    import os

    path = runs[1] / "expert_1" / "diffusion_pytorch_model.safetensors"
    os.rename(path, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", path)
    with pytest.raises(ValueError, match="outside"):
        assemble_expert_runs([str(r) for r in runs])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda run: (run / EXPERT_RUN_FILE).write_text("[1]"), EXPERT_RUN_FILE),
        (
            lambda run: (run / EXPERT_RUN_FILE).write_text(
                json.dumps({**json.loads((run / EXPERT_RUN_FILE).read_text()), "expert_index": "1"})
            ),
            "expert_index",
        ),
        (
            lambda run: (run / "expert_1" / "config.json").write_text(
                json.dumps({**json.loads((run / "expert_1" / "config.json").read_text()), "_class_name": ["a"]})
            ),
            "holds a",
        ),
    ],
    ids=["run-file-list", "index-string", "class-list"],
)
def test_run_files_of_the_wrong_json_types_are_named(runs, edit, message):
    # (an AttributeError, a TypeError of `sorted` or an `unhashable type` before any check named them)
    edit(runs[1])
    with pytest.raises(ValueError, match=f"`--assemble_experts`.*{message}"):
        assemble_expert_runs([str(r) for r in runs])


def test_runs_trained_on_another_noise_schedule_are_refused(runs):
    # only the first run's scheduler was kept: expert 1 sampled on a schedule it was never trained on, silently
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(runs[1] / "scheduler")
    with pytest.raises(ValueError, match=r"`--assemble_experts`: .*run1.*\(\['beta_schedule'\] differ\)"):
        assemble_expert_runs([str(r) for r in runs])


@pytest.mark.parametrize("other", ["none", "weights"])
def test_runs_in_another_latent_space_are_refused(runs, other):
    # only the first run's VAE was kept: an expert trained on other latents (or on pixels) decoded with it, silently
    from tests.conftest import tiny_vae

    for index, run in enumerate(runs):
        torch.manual_seed(index)
        UNet2DModel(**{**SMALL, "in_channels": 4, "out_channels": 4}).save_pretrained(run / f"expert_{index}")
    tiny_vae().save_pretrained(runs[0] / "vae")
    if other == "weights":
        vae = tiny_vae()
        torch.nn.init.normal_(vae.decoder.conv_out.weight)
        vae.save_pretrained(runs[1] / "vae")
    with pytest.raises(ValueError, match=r"`--assemble_experts`: .*run1.*VAE"):
        assemble_expert_runs([str(r) for r in runs])
    if other == "weights":  # the same VAE in every run assembles
        tiny_vae().save_pretrained(runs[1] / "vae")
        assert assemble_expert_runs([str(r) for r in runs]).vae is not None


@pytest.mark.parametrize("key", ["stage_boundaries", "num_train_timesteps", "boundary_units", "prediction_type"])
def test_run_files_without_an_entry_are_named(runs, key):
    # (a KeyError when every run lacked it)
    for run in runs:
        info = json.loads((run / EXPERT_RUN_FILE).read_text())
        (run / EXPERT_RUN_FILE).write_text(json.dumps({k: v for k, v in info.items() if k != key}))
    with pytest.raises(ValueError, match=f"`--assemble_experts`: .*{EXPERT_RUN_FILE}.* lacks \\['{key}'\\]"):
        assemble_expert_runs([str(r) for r in runs])


@pytest.mark.parametrize("folder", ["expert_1", "scheduler"])
def test_a_run_without_its_expert_or_scheduler_folder_is_named_not_looked_up_on_the_hub(runs, folder, monkeypatch):
    # the missing folder's path (`run1/expert_1`, a valid repository id when relative) was sent to the Hub: an OSError
    import shutil

    shutil.rmtree(runs[1] / folder)
    monkeypatch.chdir(runs[1].parent)
    with pytest.raises(ValueError, match=f"`--assemble_experts`: .*{folder}"):
        assemble_expert_runs(["run0", "run1"])


@pytest.mark.parametrize("file", ["config.json", "diffusion_pytorch_model.safetensors"])
def test_a_run_whose_expert_folder_lacks_a_file_is_named(runs, file):
    # (diffusers' OSError "no file named config.json / diffusion_pytorch_model.bin found", naming neither the option
    # nor the run)
    (runs[1] / "expert_1" / file).unlink()
    with pytest.raises(
        ValueError, match=f"`--assemble_experts`: .*expert_1.*Is '{runs[1]}' a complete `--expert_index` run"
    ):
        assemble_expert_runs([str(r) for r in runs])


@pytest.mark.parametrize("key, value", [("sample_size", 16), ("in_channels", 4), ("num_class_embeds", 3)])
def test_runs_of_other_sizes_channels_or_classes_are_named(runs, key, value):
    # (the container's message named neither the assembly nor what to change in the runs)
    torch.manual_seed(1)
    UNet2DModel(**{**SMALL, key: value}).save_pretrained(runs[1] / "expert_1")
    with pytest.raises(ValueError, match=f"`--assemble_experts`: .*`{key}`.*`--resolution`"):
        assemble_expert_runs([str(r) for r in runs])


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(timestep_spacing="trailing", steps_offset=1, clip_sample=False),  # how it samples only
        DDIMScheduler(),  # another sampler of the same betas
        None,  # a config key of another diffusers version
    ],
)
def test_runs_that_differ_only_in_how_they_sample_assemble(runs, scheduler):
    # every scheduler option was compared: sampling-only ones (`timestep_spacing`, `steps_offset`, `clip_sample`, a
    # DDIM saved for the same training schedule, a key this diffusers version does not know) were refused as "trained
    # with another noise scheduler", though the experts learned the same schedule; the first run's scheduler samples
    path = runs[1] / "scheduler" / "scheduler_config.json"
    if scheduler is None:
        path.write_text(json.dumps({**json.loads(path.read_text()), "a_later_option": 1, "_diffusers_version": "9.0"}))
    else:
        scheduler.save_pretrained(runs[1] / "scheduler")
    pipe = assemble_expert_runs([str(r) for r in runs])
    assert type(pipe.scheduler) is DDPMScheduler and pipe.scheduler.config.timestep_spacing == "leading"


@pytest.mark.parametrize(
    "first, dtype",
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),  # was refused: neither copy is the other's rounding (5% of weights differ)
        (torch.bfloat16, torch.float16),
    ],
)
def test_runs_that_saved_the_same_vae_at_another_precision_assemble(runs, first, dtype):
    # a run trained with `--mixed_precision fp16|bf16` saves the VAE it encoded with in that dtype: the same latent
    # space as another run's float32 copy, but its weights were compared exactly and the run refused as "another VAE"
    from tests.conftest import tiny_vae

    for index, run in enumerate(runs):
        torch.manual_seed(index)
        UNet2DModel(**{**SMALL, "in_channels": 4, "out_channels": 4}).save_pretrained(run / f"expert_{index}")
    tiny_vae().to(first).save_pretrained(runs[0] / "vae")
    tiny_vae().to(dtype).save_pretrained(runs[1] / "vae")
    assert assemble_expert_runs([str(r) for r in runs]).vae.dtype == torch.float32  # loaded as float32


def test_runs_of_other_class_names_are_named(runs):
    # the refusal listed every run's whole `id2label` as JSON (two thousand names for ImageNet), not which runs differ
    for run, names in zip(runs, ({"0": "cat", "1": "dog"}, {"0": "cat", "1": "bird"})):
        info = json.loads((run / EXPERT_RUN_FILE).read_text())
        (run / EXPERT_RUN_FILE).write_text(json.dumps({**info, "id2label": names}))
    with pytest.raises(ValueError) as error:
        assemble_expert_runs([str(r) for r in runs])
    message = str(error.value)
    assert f"`--assemble_experts`: {str(runs[1])!r} was trained on other class names (`id2label` of" in message
    assert f"than {str(runs[0])!r} (class 1: 'bird', not 'dog')" in message and "cat" not in message


@pytest.mark.parametrize("names", [["cat"], {"0": "cat"}], ids=["list", "unconditional"])
def test_class_names_the_pipeline_refuses_name_their_run_file(runs, names):
    # an `id2label` that is no dict of names, or given to unconditional experts, was refused without naming the file
    info = json.loads((runs[1] / EXPERT_RUN_FILE).read_text())
    (runs[1] / EXPERT_RUN_FILE).write_text(json.dumps({**info, "id2label": names}))
    with pytest.raises(ValueError, match=r"`--assemble_experts`: '.*run1/expert_run.json': `id2label`"):
        assemble_expert_runs([str(r) for r in runs])


# ---------------------------------------------------------------------------------------------------------------
# a saved ExpertRoutingPipeline first (the base): the runs after it replace its experts, every check is against it


@pytest.fixture
def base(tmp_path):
    """A saved two-expert `ExpertRoutingPipeline` of the runs' split, schedule and expert shape (other weights)."""
    from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline

    torch.manual_seed(5)
    experts = ExpertRoutingModel([UNet2DModel(**SMALL), UNet2DModel(**SMALL)], stage_boundaries=(500,))
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_a_run_replaces_its_expert_of_a_base_pipeline(base, runs):
    from diffusers_stages import ExpertRoutingModel

    pipe = assemble_expert_runs([str(base), str(runs[1])])
    before = ExpertRoutingModel.from_pretrained(base, subfolder="experts")
    run = UNet2DModel.from_pretrained(runs[1] / "expert_1")
    for expected, expert in ((before.experts[0], pipe.experts.experts[0]), (run, pipe.experts.experts[1])):
        weights = expected.state_dict()
        assert all(torch.equal(weights[k], v) for k, v in expert.state_dict().items())
    assert pipe.partition.boundaries == (500.0,) and type(pipe.scheduler) is DDPMScheduler


def test_a_base_loads_only_the_experts_no_run_replaces(base, runs):
    # the replaced expert's weights are never read: here they do not even load
    (base / "experts" / "expert_1" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    pipe = assemble_expert_runs([str(base), str(runs[1])])
    assert pipe.experts.loaded_experts == [0, 1]


@pytest.mark.parametrize("run_names", [{"0": "cat", "1": "dog"}, None], ids=["same", "none"])
def test_the_class_names_of_the_base_are_kept(runs, tmp_path, run_names):
    from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline

    conditional = {**SMALL, "num_class_embeds": 3}
    experts = ExpertRoutingModel([UNet2DModel(**conditional), UNet2DModel(**conditional)], stage_boundaries=(500,))
    names = {"0": "cat", "1": "dog"}
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler(), id2label=names).save_pretrained(tmp_path / "b")
    UNet2DModel(**conditional).save_pretrained(runs[1] / "expert_1")
    if run_names:
        _edit_run(runs[1], id2label=run_names)
    assert assemble_expert_runs([str(tmp_path / "b"), str(runs[1])]).config.id2label == names


def _edit_run(run, **entries) -> None:
    info = json.loads((run / EXPERT_RUN_FILE).read_text())
    (run / EXPERT_RUN_FILE).write_text(json.dumps({**info, **entries}))


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"stage_boundaries": "x"}, "`stage_boundaries` must be a sequence of numbers"),
        ({"stage_boundaries": [500.0, 200.0]}, "`stage_boundaries` must be strictly increasing"),
        ({"num_train_timesteps": "1000"}, "`num_train_timesteps` must be a positive integer"),
        ({"boundary_units": 5}, "`boundary_units` must be one of"),
        ({"prediction_type": ["epsilon"]}, "`prediction_type` must be one of"),
        ({"prediction_type": "nonsense"}, "`prediction_type` must be one of"),
    ],
)
def test_run_files_of_bad_stage_splits_or_targets_name_the_file(runs, entries, message):
    # (the partition's own message named neither the option nor the file; a bad target was blamed on the runs'
    # data and `--resolution`)
    for run in runs:
        _edit_run(run, **entries)
    path = re.escape(repr(str(runs[0] / EXPERT_RUN_FILE)))
    with pytest.raises(ValueError, match=f"^`--assemble_experts`: {path}: {re.escape(message)}"):
        assemble_expert_runs([str(r) for r in runs])


@pytest.mark.parametrize(
    "folders, message",
    [
        (lambda b, r: [r[0], b], "'{b}' is a saved pipeline folder but not the first"),
        (lambda b, r: [b, b, r[1]], "'{b}' is a second saved pipeline folder"),
        (lambda b, r: [b, r[1].parent / "nothing"], "'{n}' is neither a finished `--expert_index` run"),
        (lambda b, r: [b, r[1], r[1]], "two runs of expert 1: '{r1}' and '{r1}'"),
        (lambda b, r: [b], "'{b}' is a saved pipeline folder with no run after it"),
    ],
    ids=["pipeline-not-first", "two-pipelines", "neither", "same-expert-twice", "no-run"],
)
def test_assembling_with_a_base_refuses_folders_by_name(base, runs, folders, message):
    names = {"b": str(base), "r1": str(runs[1]), "n": str(runs[1].parent / "nothing")}
    with pytest.raises(ValueError) as error:
        assemble_expert_runs([str(f) for f in folders(base, runs)])
    assert str(error.value).startswith("`--assemble_experts`: ") and message.format(**names) in str(error.value)


def test_a_run_of_an_expert_the_base_does_not_have_is_refused(base, runs):
    _edit_run(runs[1], expert_index=2)
    (runs[1] / "expert_1").rename(runs[1] / "expert_2")
    with pytest.raises(ValueError, match=r"`--assemble_experts`: '.*run1' holds expert 2, but the base pipeline .* "
                                         r"has 2 experts \(0\.\.1\)"):  # fmt: skip
        assemble_expert_runs([str(base), str(runs[1])])


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"stage_boundaries": [400.0]}, "stage split or target than the base pipeline"),
        ({"prediction_type": "v_prediction"}, "stage split or target than the base pipeline"),
        ({"boundary_units": "sigma"}, "stage split or target than the base pipeline"),
        ({"num_train_timesteps": 2000}, "stage split or target than the base pipeline"),
        ({"id2label": {"0": "cat"}}, "was trained on other class names"),
    ],
)
def test_a_run_that_does_not_fit_the_base_is_refused(base, runs, entries, message):
    # checked between each run and the base, not only between the runs
    if "id2label" in entries:  # the base's class names (its model_index.json), when it has them
        index = json.loads((base / "model_index.json").read_text())
        (base / "model_index.json").write_text(json.dumps({**index, "id2label": {"0": "dog"}}))
    _edit_run(runs[1], **entries)
    with pytest.raises(ValueError, match=f"`--assemble_experts`: '.*run1'.*{message}"):
        assemble_expert_runs([str(base), str(runs[1])])


def test_a_run_of_another_noise_schedule_or_latent_space_than_the_base_is_refused(base, runs):
    from tests.conftest import tiny_vae

    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(runs[1] / "scheduler")
    with pytest.raises(ValueError, match=r"`--assemble_experts`: .*run1.*another noise schedule than '.*base'"):
        assemble_expert_runs([str(base), str(runs[1])])
    DDPMScheduler().save_pretrained(runs[1] / "scheduler")
    tiny_vae().save_pretrained(runs[1] / "vae")
    with pytest.raises(
        ValueError, match=r"`--assemble_experts`: .*run1' was trained on a VAE's latents and '.*base' on pixels"
    ):
        assemble_expert_runs([str(base), str(runs[1])])


def test_a_run_that_breaks_the_experts_contract_of_the_base_is_refused(base, runs):
    torch.manual_seed(1)
    UNet2DModel(**{**SMALL, "sample_size": 16}).save_pretrained(runs[1] / "expert_1")
    with pytest.raises(ValueError, match="`--assemble_experts`: .*`sample_size`"):
        assemble_expert_runs([str(base), str(runs[1])])


def test_a_base_of_another_pipeline_or_with_a_hostile_expert_entry_is_refused(base, runs, tmp_path):
    # read from a folder: loaded through the package's strict loaders only, nothing it names imported or run
    config = json.loads((base / "experts" / "config.json").read_text())
    config["expert_classes"][0] = ["os", "system"]
    (base / "experts" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"`--assemble_experts`: the base pipeline '.*base' .*does not load.*\['os', 'system'\]"
    ):
        assemble_expert_runs([str(base), str(runs[1])])

    from diffusers_stages import MultiStagePipeline, MultiStageUNet2DModel
    from tests.conftest import TINY_UNET

    MultiStagePipeline(unet=MultiStageUNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(
        tmp_path / "multistage"
    )
    with pytest.raises(
        ValueError,
        match=r"`--assemble_experts`: the first folder '.*multistage' is a saved pipeline .* holds a MultiStagePipeline",
    ):
        assemble_expert_runs([str(tmp_path / "multistage"), str(runs[1])])


@pytest.mark.parametrize("position", [0, 1], ids=["first", "later"])
def test_a_folder_that_is_both_a_pipeline_and_a_run_is_named(base, runs, position):
    # an `--expert_index` run saved into a folder that held a pipeline keeps its stale model_index.json
    (runs[1] / "model_index.json").write_text((base / "model_index.json").read_text())
    folders = [str(base), str(runs[1])] if position else [str(runs[1]), str(runs[0])]
    with pytest.raises(ValueError, match=f"{re.escape(repr(str(runs[1])))} holds both a saved pipeline"):
        assemble_expert_runs(folders)


def _experts_task(assignment, probabilities):
    from diffusers_stages.training import ExpertTask, build_parser

    args = build_parser("train_experts.py").parse_args(
        ["--block_out_channels", "8,16", "--layers_per_block", "1", "--norm_num_groups", "4",
         "--stage_boundaries", "100", "900"]
    )  # fmt: skip
    vars(args).update(
        num_experts=None,
        assignment=assignment,
        own_interval_probability=probabilities,
        expert_index=None,
        expert_block_out_channels=None,
        expert_attention_shares=None,
        assemble_experts=None,
    )  # the script's own options, as train_experts.py gives them
    return ExpertTask(args)


def test_soft_assignment_splits_the_batch_equally_and_hard_assignment_by_the_intervals_mass():
    # as the script's help and README say: with unequal intervals, soft assignment with p_n = 1 is not hard assignment
    soft = _experts_task("soft", (1.0, 1.0, 1.0)).draw(60, torch.manual_seed(0))
    hard = _experts_task("hard", None).draw(60, torch.manual_seed(0))
    assert torch.bincount(soft.network).tolist() == [20, 20, 20]
    assert torch.bincount(hard.network).tolist() == [7, 46, 7]  # one each, then 0.1 / 0.8 / 0.1 of the rest
    for draw in (soft, hard):  # every sample is drawn from its expert's own interval
        stages = torch.bucketize(draw.timesteps, torch.tensor([100, 900]), right=True)
        assert torch.equal(stages, draw.network)


def test_the_card_gives_the_batch_shares_the_experts_trained_on():
    # the card said "all experts in one run" whatever `--stage_shares` gave them: with a share of 0 the expert never
    # trained (it is saved as it was built, or as the fine-tuned source had it)
    from diffusers_stages.training import ExpertTask, build_parser

    args = build_parser("train_experts.py").parse_args(
        ["--block_out_channels", "8,16", "--layers_per_block", "1", "--norm_num_groups", "4", "--stage_shares", "1,0"]
    )
    vars(args).update(num_experts=2, assignment="hard", own_interval_probability=None, expert_index=None,
                      expert_block_out_channels=None, expert_attention_shares=None, assemble_experts=None)  # fmt: skip
    assert "batch shares 1:0 (clean stage first)" in ExpertTask(args).description()
