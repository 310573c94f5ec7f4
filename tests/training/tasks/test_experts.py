"""Assembling one-expert-per-run folders (`--assemble_experts`): the run folders are read as hostile input."""

import json

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
