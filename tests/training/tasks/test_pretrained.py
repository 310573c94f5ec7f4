"""`PipelineSource`: the configs of a `--pretrained_model_name_or_path` folder are hostile input, read before any
weights."""

import json
import os
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline
from diffusers_stages.training.tasks.pretrained import PipelineSource
from tests.conftest import TINY_UNET


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A tiny two-expert `ExpertRoutingPipeline` folder."""
    folder = tmp_path_factory.mktemp("pretrained") / "source"
    torch.manual_seed(0)
    experts = ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=(400,))
    ExpertRoutingPipeline(experts=experts, scheduler=DDIMScheduler()).save_pretrained(folder)
    return str(folder)


def _read(path: str) -> PipelineSource:
    source = PipelineSource.read_pipeline(path, "ExpertRoutingPipeline", ("experts",))
    source.read_model("experts/expert_0", {"UNet2DModel": UNet2DModel})
    return source


@pytest.mark.parametrize(
    "file",
    ["model_index.json", "experts/config.json", "scheduler/scheduler_config.json", "experts/expert_0/config.json"],
)
def test_a_config_that_is_no_json_object_is_named(source, tmp_path, file):
    # before, a list was an AttributeError ("'list' object has no attribute 'get'") from inside the checks
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    (bad / file).write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="`--pretrained_model_name_or_path`") as error:
        _read(str(bad))
    assert os.path.basename(file) in str(error.value) and "JSON object" in str(error.value)


@pytest.mark.parametrize("entry", ["scheduler/scheduler_config.json", "model_index.json", "scheduler"])
def test_a_config_leading_out_of_the_source_is_refused(source, tmp_path, entry):
    # as the loaders refuse it (`check_folder_files`, `check_subfolder`): before, the scheduler config was read
    # through the link, and the run trained and sampled on another folder's noise schedule
    hostile, elsewhere = tmp_path / "hostile", tmp_path / "elsewhere"
    shutil.copytree(source, hostile)
    shutil.move(hostile / entry, elsewhere)
    os.symlink(elsewhere, hostile / entry)
    with pytest.raises(ValueError, match="outside the folder") as error:
        _read(str(hostile))
    assert "`--pretrained_model_name_or_path`" in str(error.value)


@pytest.mark.parametrize(
    "name, message",
    [
        ("DualBackbonePipeline", "holds a DualBackbonePipeline, not a ExpertRoutingPipeline"),
        ("../../evil", "`_class_name`"),
        (["os", "system"], "`_class_name`"),
    ],
)
def test_a_folder_that_names_another_pipeline_is_refused(source, tmp_path, name, message):
    # as `ExpertRoutingPipeline.from_pretrained` refuses it (the package's allow-list, nothing imported): before, the
    # `_class_name` of its model_index.json was not read
    other = tmp_path / "other"
    shutil.copytree(source, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
    with pytest.raises(ValueError, match="`--pretrained_model_name_or_path`") as error:
        _read(str(other))
    assert message in str(error.value)


def test_a_config_edited_to_countless_layers_is_named_not_built_for_ever(source, tmp_path):
    # before, check_builds built the 10**9 layers of an expert's config (on the meta device, but without end)
    import subprocess
    import sys

    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    config = json.loads((bad / "experts/expert_0/config.json").read_text())
    (bad / "experts/expert_0/config.json").write_text(json.dumps({**config, "layers_per_block": 10**9}))
    check = (
        "import sys\nfrom diffusers import UNet2DModel\n"
        "from diffusers_stages.training.tasks.pretrained import PipelineSource\n"
        "source = PipelineSource.read_pipeline(sys.argv[1], 'ExpertRoutingPipeline', ('experts',))\n"
        "source.read_model('experts/expert_0', {'UNet2DModel': UNet2DModel})\n"
        "try:\n    source.check_builds('experts/expert_0')\nexcept ValueError as error:\n    print(error)\n"
    )
    run = subprocess.run([sys.executable, "-c", check, str(bad)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "`--pretrained_model_name_or_path`" in run.stdout and "more tensors than" in run.stdout, run.stdout


@pytest.mark.parametrize("folder", ["experts", "experts/expert_0"])
def test_a_model_folder_inside_a_pipeline_names_the_pipeline_folder(source, folder):
    """A natural first mistake, the denoiser's own folder (`out/unet`) where the pipeline folder is asked: the error
    said only that it holds no model_index.json."""
    with pytest.raises(ValueError, match="`--pretrained_model_name_or_path`") as error:
        _read(os.path.join(source, folder))
    assert f"is the {folder}/ model folder of the pipeline folder {source!r}: pass that folder" in str(error.value)


def test_a_lone_model_folder_is_named_a_model_folder(tmp_path):
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="`--pretrained_model_name_or_path`") as error:
        _read(str(tmp_path / "unet"))
    assert "holds a UNet2DModel (config.json), a model folder, not a pipeline folder" in str(error.value)


def test_a_missing_local_folder_is_named_as_such_not_as_an_offline_hub_error(tmp_path):
    """A mistyped local `--pretrained_model_name_or_path` said "We couldn't connect to 'https://huggingface.co'",
    though the path can only be a folder."""
    path = str(tmp_path / "no-such-run")
    with pytest.raises(ValueError, match="`--pretrained_model_name_or_path`") as error:
        _read(path)
    assert f"{path!r} is not an ExpertRoutingPipeline folder: no such folder (nor a Hub repository id" in str(
        error.value
    )
    assert "huggingface.co" not in str(error.value)
