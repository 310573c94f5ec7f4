"""Loading a saved folder never runs a file from it unless the user passed `trust_remote_code=True` (issue 11).

Every attack writes a payload that would create a marker file; each test asserts the marker was never written.
"""

import ast
import itertools
import json
import os
import pickle
import py_compile
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DModel

from diffusers_stages import (
    DualBackbonePipeline,
    ExpertRoutingModel,
    ExpertRoutingPipeline,
    MultiStagePipeline,
    StagedDiffusionPipeline,
)
from tests.conftest import SMALL_UNET

SMALL = SMALL_UNET


def _unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**SMALL).eval()


def _multistage(tiny_multistage):
    return MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler())


def _experts(_):
    return ExpertRoutingPipeline(
        experts=ExpertRoutingModel([_unet(0), _unet(1)], stage_boundaries=(500,)), scheduler=DDIMScheduler()
    )


def _dual(_):
    return DualBackbonePipeline(shallow=_unet(0), deep=_unet(1), scheduler=DDIMScheduler(), switch_step_fraction=0.5)


BUILDERS = {"multistage": _multistage, "experts": _experts, "dual": _dual}


@pytest.fixture(params=sorted(BUILDERS))
def saved(request, tiny_multistage, tmp_path):
    """A saved folder of each pipeline, its class, and the images it gives."""
    pipe = BUILDERS[request.param](tiny_multistage)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    return folder, type(pipe), images


def _payload(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\nfrom diffusers_stages import *  # noqa\n"


def _index(folder) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def _write_index(folder, index: dict) -> None:
    (folder / "model_index.json").write_text(json.dumps(index))


def _samples(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images


def test_planted_code_files_never_run_and_the_folder_still_loads(saved, tmp_path):
    folder, pipeline_class, images = saved
    marker = tmp_path / "ran"
    index = _index(folder)
    (folder / "None.py").write_text(_payload(marker))  # diffusers resolves custom_pipeline=None to this file
    (folder / f"{index['_class_name'][0]}.py").write_text(_payload(marker))  # the root re-export file, replaced
    for name, entry in index.items():
        if isinstance(entry, list) and entry[0] and (folder / name).is_dir():
            (folder / name / f"{entry[0]}.py").write_text(_payload(marker))  # component re-export files
    source = tmp_path / f"{index['_class_name'][0]}.py"
    source.write_text(_payload(marker))
    (folder / "__pycache__").mkdir()
    py_compile.compile(str(source), cfile=str(folder / "__pycache__" / f"{source.stem}.cpython-311.pyc"))

    for loader in (pipeline_class, StagedDiffusionPipeline):
        loaded = loader.from_pretrained(folder)
        assert type(loaded) is pipeline_class
        assert np.array_equal(_samples(loaded), images)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder)  # diffusers itself refuses code unless trusted
    assert not marker.exists()


@pytest.mark.parametrize(
    "class_name",
    [
        "MultiStagePipeline; import os; os.system('touch MARK'); __getattr__=lambda n: MultiStagePipeline",
        "MultiStagePipeline\nimport os",
        "MultiStagеPipeline",  # Cyrillic "е": a look-alike of the package's class
        "../MultiStagePipeline",
        "DDIMPipeline",  # a real class, but not one of the package's pipelines
    ],
    ids=["semicolon", "newline", "look-alike", "path", "foreign"],
)
def test_injected_pipeline_class_names_are_refused(saved, tmp_path, class_name):
    folder, pipeline_class, _ = saved
    marker = tmp_path / "ran"
    index = _index(folder)
    index["_class_name"] = [index["_class_name"][0], class_name]
    _write_index(folder, index)
    (folder / f"{index['_class_name'][0]}.py").write_text(_payload(marker))
    with pytest.raises(ValueError, match="_class_name"):
        pipeline_class.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "entry",
    [
        ["diffusers_stages.models.unet_multistage", "MultiStageUNet2DModel; import os"],
        ["diffusers_stages.models.unet_multistage;import os", "MultiStageUNet2DModel"],
        ["../../evil", "MultiStageUNet2DModel"],
        ["/tmp/evil", "MultiStageUNet2DModel"],
        ["evil_module", "Evil"],
        ["diffusers", "DiffusionPipeline"],
        ["diffusers_stages.models.unet_multistage", "TimestepPartition"],
    ],
    ids=[
        "class-injection",
        "module-injection",
        "relative-path",
        "absolute-path",
        "foreign",
        "not-a-component",
        "not-a-model",
    ],
)
def test_injected_component_entries_are_refused(tiny_multistage, tmp_path, entry):
    folder, marker = tmp_path / "saved", tmp_path / "ran"
    _multistage(tiny_multistage).save_pretrained(folder)
    index = _index(folder)
    index["unet"] = entry
    _write_index(folder, index)
    (folder / "unet" / f"{entry[0].replace('/', '_')}.py").write_text(_payload(marker))
    with pytest.raises(ValueError, match="unet"):
        MultiStagePipeline.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, entry",
    [("scheduler", ["diffusers", "SchedulerMixin"]), ("shallow", ["diffusers", "ModelMixin"])],
    ids=["SchedulerMixin", "ModelMixin"],
)
def test_a_base_class_as_a_component_is_named_not_a_crash(tmp_path, name, entry):
    # diffusers exports its base classes too; they have no config to build from (an AttributeError deep inside)
    folder = tmp_path / "saved"
    _dual(None).save_pretrained(folder)
    index = _index(folder)
    index[name] = entry
    _write_index(folder, index)
    with pytest.raises(ValueError, match=f"{name}.*{entry[1]}"):
        DualBackbonePipeline.from_pretrained(folder)


def test_component_names_and_folders_that_leave_the_folder_are_refused(tiny_multistage, tmp_path):
    folder = tmp_path / "saved"
    _multistage(tiny_multistage).save_pretrained(folder)
    index = _index(folder)
    index["../unet"] = index["unet"]
    _write_index(folder, index)
    with pytest.raises(ValueError, match="components"):
        MultiStagePipeline.from_pretrained(folder)

    del index["../unet"]
    _write_index(folder, index)
    os.rename(folder / "unet", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", folder / "unet")  # a component folder that is a link out of the folder
    with pytest.raises(ValueError, match="inside"):
        MultiStagePipeline.from_pretrained(folder)


@pytest.mark.parametrize("wrong", [UNet2DModel, AutoencoderKL], ids=["UNet2DModel", "AutoencoderKL"])
def test_a_component_of_the_wrong_kind_is_refused_not_loaded_with_random_weights(tiny_multistage, tmp_path, wrong):
    folder = tmp_path / "saved"
    _multistage(tiny_multistage).save_pretrained(folder)
    index = _index(folder)
    index["unet"] = ["diffusers", wrong.__name__]
    _write_index(folder, index)
    with pytest.raises(ValueError, match=f"'unet'.*{wrong.__name__}.*MultiStageUNet2DModel"):
        MultiStagePipeline.from_pretrained(folder)


def test_a_folder_of_another_pipeline_names_the_right_class(tiny_multistage, tmp_path):
    folder = tmp_path / "saved"
    _multistage(tiny_multistage).save_pretrained(folder)
    with pytest.raises(ValueError, match="MultiStagePipeline.from_pretrained"):
        ExpertRoutingPipeline.from_pretrained(folder)


def test_trusted_loading_is_the_users_explicit_choice(tiny_multistage, tmp_path):
    folder = tmp_path / "saved"
    pipe = _multistage(tiny_multistage)
    pipe.save_pretrained(folder)
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded) is MultiStagePipeline
    assert np.array_equal(_samples(loaded), _samples(pipe))


def test_hub_downloads_never_fetch_code_files(tiny_multistage, tmp_path, monkeypatch):
    import huggingface_hub

    folder, asked = tmp_path / "saved", []
    _multistage(tiny_multistage).save_pretrained(folder)

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append(list(allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert type(MultiStagePipeline.from_pretrained("someone/staged", local_files_only=True)) is MultiStagePipeline
    assert asked and all(not p.endswith(".py") and "*" != p for patterns in asked for p in patterns)


def test_a_partly_cached_hub_repository_is_named_as_such_offline(tiny_multistage, tmp_path):
    # the cache held only `unet/` (what `MultiStageUNet2DModel.from_pretrained(repo, subfolder="unet")` fetches): an
    # offline load said the repository "is not a saved pipeline", though it is one the cache holds part of
    import shutil

    _multistage(tiny_multistage).save_pretrained(tmp_path / "saved")
    snapshot = tmp_path / "cache" / "models--me--staged" / "snapshots" / ("0" * 40)
    shutil.copytree(tmp_path / "saved" / "unet", snapshot / "unet")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    with pytest.raises(ValueError, match=r"me/staged has no `model_index.json`: .*Hub cache .*only part of it"):
        MultiStagePipeline.from_pretrained("me/staged", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(ValueError, match="it is not a saved pipeline.$"):  # a local folder: no cache to blame
        MultiStagePipeline.from_pretrained(snapshot)


@pytest.mark.parametrize("load_experts", [None, [1]], ids=["all", "one"])
def test_expert_container_hub_downloads_never_fetch_code_files(tmp_path, monkeypatch, load_experts):
    import fnmatch

    import huggingface_hub

    folder, asked = tmp_path / "experts", []
    ExpertRoutingModel([_unet(0), _unet(1)], stage_boundaries=(500,)).save_pretrained(folder)
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert any(f.endswith(".py") for f in files)  # the AutoModel re-export file is there to be skipped

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append([f for f in files if any(fnmatch.fnmatch(f, p) for p in allow_patterns)])
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = ExpertRoutingModel.from_pretrained("someone/experts", load_experts=load_experts, local_files_only=True)
    assert model.loaded_experts == ([0, 1] if load_experts is None else [1])
    fetched = {f for request in asked for f in request}
    assert "config.json" in fetched and not any(f.endswith(".py") for f in fetched)
    assert any(f.startswith("expert_1/") for f in fetched)
    assert any(f.startswith("expert_0/") for f in fetched) == (load_experts is None)


# --------------------------------------------------------------------------------------------------------------------
# serialization: safetensors by default, `.bin` when asked, and a `.bin` is never unpickled with code
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_weights_on_request_for_every_pipeline_and_a_malicious_pickle_never_runs(saved, tmp_path):
    folder, pipeline_class, images = saved
    pipe = pipeline_class.from_pretrained(folder)
    bin_folder, marker = tmp_path / "bin", tmp_path / "ran"
    pipe.save_pretrained(bin_folder, safe_serialization=False)
    weights = sorted(p.name for p in bin_folder.rglob("*") if p.suffix in (".bin", ".safetensors"))
    assert weights and all(name.endswith(".bin") for name in weights)
    assert np.array_equal(_samples(pipeline_class.from_pretrained(bin_folder)), images)

    for path in bin_folder.rglob("*.bin"):
        with open(path, "wb") as f:
            pickle.dump({"weight": _Payload(marker)}, f, protocol=2)
    with pytest.raises((OSError, ValueError), match="load"):  # torch's weights-only unpickler refuses the payload
        pipeline_class.from_pretrained(bin_folder)
    assert not marker.exists()


def test_safetensors_by_default(saved):
    folder, _, _ = saved
    weights = [p.name for p in folder.rglob("*") if p.suffix in (".bin", ".safetensors")]
    assert weights and all(name.endswith(".safetensors") for name in weights)


@pytest.mark.parametrize(
    "entry",
    [
        ["diffusers", "UNet2DModel; import os"],
        ["diffusers/../evil", "UNet2DModel"],
        ["evil_module", "Evil"],
        ["diffusers", "ModelMixin"],  # a base class: no config to build from
    ],
    ids=["class-injection", "path", "foreign", "base-class"],
)
def test_expert_container_refuses_injected_class_entries(tmp_path, entry):
    folder = tmp_path / "experts"
    ExpertRoutingModel([_unet(0), _unet(1)], stage_boundaries=(500,)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["expert_classes"][1] = entry
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="[Ee]xpert"):
        ExpertRoutingModel.from_pretrained(folder)


def test_variants_and_per_component_dtypes_load_for_every_pipeline(saved, tmp_path):
    folder, pipeline_class, images = saved
    variant_folder = tmp_path / "variant"
    pipeline_class.from_pretrained(folder).save_pretrained(variant_folder, variant="fp16")
    assert any(".fp16." in p.name for p in variant_folder.rglob("*.safetensors"))
    assert np.array_equal(_samples(pipeline_class.from_pretrained(variant_folder, variant="fp16")), images)

    loaded = pipeline_class.from_pretrained(folder, torch_dtype={"default": torch.bfloat16})
    models = [m for m in loaded.components.values() if isinstance(m, torch.nn.Module)]
    assert models and all(m.dtype == torch.bfloat16 for m in models)
    with pytest.raises(ValueError, match="unexpected keyword"):
        pipeline_class.from_pretrained(folder, no_such_option=1)


def test_a_variant_loaded_with_trust_remote_code_gives_the_same_images_or_names_the_loader_it_fails_in(
    saved, tmp_path
):
    # diffusers' own loader (`trust_remote_code=True`) reads every entry of a component folder as a file name with a
    # dot: an ExpertRoutingModel's `expert_0/` sub-folders made the package's own `from_pretrained` fail with
    # diffusers' IndexError
    folder, pipeline_class, images = saved
    variant_folder = tmp_path / "variant"
    pipeline_class.from_pretrained(folder).save_pretrained(variant_folder, variant="fp16")
    for loader in (pipeline_class, StagedDiffusionPipeline):
        if pipeline_class is ExpertRoutingPipeline:
            message = rf"`variant`='fp16' cannot be loaded with `trust_remote_code=True`.*expert_0/.*{loader.__name__}"
            with pytest.raises(ValueError, match=message + r"\.from_pretrained\(folder, variant='fp16'\)` without"):
                loader.from_pretrained(variant_folder, variant="fp16", trust_remote_code=True)
        else:
            # (not memory-mapped: mapped weights give equal images only up to float rounding)
            loaded = loader.from_pretrained(variant_folder, variant="fp16", trust_remote_code=True, disable_mmap=True)
            assert np.array_equal(_samples(loaded), images)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '"a string"'], ids=["list", "not-json", "string"])
@pytest.mark.parametrize("name", ["model_index.json", "scheduler/scheduler_config.json"], ids=["index", "scheduler"])
def test_a_model_index_that_is_not_a_json_object_is_named(tiny_multistage, tmp_path, text, name):
    # (a scheduler config was diffusers' message about the Hub: "couldn't connect to 'https://huggingface.co'")
    folder = tmp_path / "saved"
    _multistage(tiny_multistage).save_pretrained(folder)
    (folder / name).write_text(text)
    with pytest.raises(ValueError, match=os.path.basename(name)):
        MultiStagePipeline.from_pretrained(folder)


@pytest.mark.parametrize("value", [-5, "five"], ids=["negative", "string"])
def test_a_scheduler_config_value_the_scheduler_cannot_take_is_named(saved, value):
    # (a RuntimeError or TypeError from inside the scheduler's `torch.linspace`, naming no file)
    folder, pipeline_class, _ = saved
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_train_timesteps": value}))
    with pytest.raises(ValueError, match=r"scheduler_config\.json.*DDIMScheduler"):
        pipeline_class.from_pretrained(folder)


def test_a_required_component_saved_as_null_is_refused_not_left_out(saved):
    folder, pipeline_class, _ = saved
    index = _index(folder)
    required = [k for k, v in index.items() if k[0] != "_" and isinstance(v, list) and v[0] and k != "scheduler"]
    index[required[0]] = [None, None]
    _write_index(folder, index)
    with pytest.raises(ValueError, match=f"{required[0]!r}.*null"):
        pipeline_class.from_pretrained(folder)


def test_weight_files_that_link_out_of_the_folder_are_refused_in_every_component(saved, tmp_path):
    folder, pipeline_class, _ = saved
    for path in sorted(folder.rglob("*.safetensors")) + [folder / "model_index.json"]:
        moved = tmp_path / "elsewhere" / path.relative_to(folder)
        moved.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, moved)
        os.symlink(moved, path)  # any file of the user's, read as this component's weights
        with pytest.raises(ValueError, match=f"{path.name}.*outside"):
            pipeline_class.from_pretrained(folder)
        os.remove(path)
        os.rename(moved, path)


def test_a_component_checkpoint_with_missing_or_unexpected_keys_is_refused_in_every_pipeline(saved):
    from safetensors.torch import load_file, save_file

    folder, pipeline_class, _ = saved
    path = sorted(folder.rglob("*.safetensors"))[0]  # the first model component (deep, expert_0, unet)
    state = load_file(path)
    key = sorted(state)[-1]
    state.pop(key)  # a lenient loader leaves it on the `meta` device
    save_file({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=f"does not match its config.*{key}"):
        pipeline_class.from_pretrained(folder)


def test_a_component_weight_of_another_shape_is_the_named_error_in_every_pipeline(saved):
    # diffusers' own components (the dual backbone's U-Nets, the experts) raised torch's bare "size mismatch"
    # RuntimeError (the experts' wrapped in a ValueError); every pipeline now names the checkpoint and the class
    from safetensors.torch import load_file, save_file

    folder, pipeline_class, _ = saved
    path = sorted(folder.rglob("*.safetensors"))[0]  # the first model component (deep, expert_0, unet)
    state = load_file(path)
    key = next(k for k in sorted(state) if state[k].ndim == 4)
    save_file({**state, key: torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 2)}, path)
    with pytest.raises(ValueError, match=r"The checkpoint at .* does not match its config for \w+"):
        pipeline_class.from_pretrained(folder)


def test_weights_saved_as_integers_are_refused_not_cast_in_every_component(saved):
    from safetensors.torch import load_file, save_file

    folder, pipeline_class, _ = saved
    for path in sorted(folder.rglob("*.safetensors")):  # diffusers' own models too (expert, shallow and deep U-Nets)
        state = load_file(path)
        key = sorted(state)[0]
        save_file({**state, key: (state[key] * 1000).to(torch.int32)}, path)  # corrupted: diffusers casts it back
        with pytest.raises(ValueError, match=f"{path.name}.*{key}.*I32"):
            pipeline_class.from_pretrained(folder)
        save_file(state, path)


def test_a_sharded_component_with_a_tensor_missing_from_its_shard_is_refused_in_every_pipeline(saved, tmp_path):
    # diffusers reads a sharded checkpoint's keys from its index: the tensor was left on the `meta` device, silently
    from safetensors.torch import load_file, save_file

    folder, pipeline_class, images = saved
    sharded = tmp_path / "sharded"
    pipeline_class.from_pretrained(folder).save_pretrained(sharded, max_shard_size="10KB")
    assert np.array_equal(_samples(pipeline_class.from_pretrained(sharded)), images)
    shard = sorted(sharded.rglob("*-00002-of-*.safetensors"))[0]  # of a diffusers U-Net in every pipeline
    state = load_file(shard)
    key = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != key}, shard)
    with pytest.raises(ValueError, match=rf"{shard.name} lacks 1 weights.*{key}"):
        pipeline_class.from_pretrained(sharded)


def test_a_variant_no_component_has_is_an_error_as_in_diffusers(saved):
    # the variant was dropped component by component, so the default weights loaded without a word; diffusers
    # (`DDIMPipeline.from_pretrained(folder, variant="fp16")`) raises when no component has files of the variant
    folder, pipeline_class, _ = saved
    with pytest.raises(ValueError, match=r"`variant=fp16`, but no such modeling files are available"):
        pipeline_class.from_pretrained(folder, variant="fp16")


def test_a_device_map_of_one_device_loads_every_model_there_as_in_diffusers(saved):
    # `device_map="cpu"` was refused ("not supported"), where `DDIMPipeline.from_pretrained(folder, device_map="cpu")`
    # loads every model onto that device and records it as the pipeline's `hf_device_map`
    folder, pipeline_class, images = saved
    pipe = pipeline_class.from_pretrained(folder, device_map="cpu")
    assert pipe.hf_device_map == "cpu"
    assert all(
        p.device.type == "cpu"
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
        for p in m.parameters()
    )
    assert np.array_equal(_samples(pipe), images)
    with pytest.raises(ValueError, match="low_cpu_mem_usage"):
        pipeline_class.from_pretrained(folder, device_map="cpu", low_cpu_mem_usage=False)


def test_a_device_map_over_several_devices_is_refused_naming_each_device_once(saved):
    # on a machine without an accelerator diffusers' list of device maps holds "cpu" twice, and the refusal said
    # "must be one of ['cpu', 'cpu']"
    folder, pipeline_class, _ = saved
    with pytest.raises(ValueError, match=r"`device_map`.*got 'balanced'") as refused:
        pipeline_class.from_pretrained(folder, device_map="balanced")
    devices = ast.literal_eval(re.search(r"one of (\[.*?\])", str(refused.value))[1])
    assert len(devices) == len(set(devices)), devices


def test_dtype_the_name_diffusers_prefers_to_torch_dtype_is_taken_too(saved):
    # diffusers 0.42 deprecates `torch_dtype` for `dtype` (`DDIMPipeline.from_pretrained(folder, dtype=...)`); the
    # package's pipelines refused `dtype` as an unexpected keyword
    folder, pipeline_class, _ = saved
    for dtype in (torch.float16, {"default": torch.bfloat16}):
        loaded = pipeline_class.from_pretrained(folder, dtype=dtype)
        expected = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        assert all(m.dtype == expected for m in loaded.components.values() if isinstance(m, torch.nn.Module))
    with pytest.raises(ValueError, match="both `dtype` and `torch_dtype`"):
        pipeline_class.from_pretrained(folder, dtype=torch.float16, torch_dtype=torch.float16)


@pytest.mark.parametrize("dtype", ["float16", {"default": "bfloat16"}, {"default": torch.float16, "vae": 16}])
def test_a_dtype_that_is_not_a_torch_dtype_is_named_not_loaded_as_float32(saved, dtype):
    # diffusers only warns and loads such a dtype (transformers' spelling "float16") as float32: the user asked for
    # half precision and silently got full precision (with `trust_remote_code=True` too, where the package's class
    # hands the folder to diffusers' own loader)
    folder, pipeline_class, _ = saved
    for name, trust in itertools.product(("torch_dtype", "dtype"), (False, True)):
        with pytest.raises(ValueError, match=rf"`{name}` must be a torch.dtype .* got {re.escape(repr(dtype))}"):
            pipeline_class.from_pretrained(folder, trust_remote_code=trust, **{name: dtype})


def test_a_per_component_dtype_for_a_component_the_pipeline_lacks_is_named(saved):
    # {"unet": torch.float16} for an ExpertRoutingPipeline (whose model is "experts") loaded everything in float32
    # (with `trust_remote_code=True` too: diffusers' own loader ignores the name)
    folder, pipeline_class, _ = saved
    for name, trust in itertools.product(("torch_dtype", "dtype"), (False, True)):
        with pytest.raises(ValueError, match=rf"`{name}` names components .* does not have: \['no_such_part'\]"):
            dtype = {"no_such_part": torch.float16, "default": torch.float32}
            pipeline_class.from_pretrained(folder, trust_remote_code=trust, **{name: dtype})
    with pytest.raises(ValueError, match=r"names components .* does not have: \['no_such_part'\]"):
        StagedDiffusionPipeline.from_pretrained(folder, trust_remote_code=True, dtype={"no_such_part": torch.float16})
    with pytest.raises(ValueError, match="`dtype` must be a torch.dtype"):
        StagedDiffusionPipeline.from_pretrained(folder, trust_remote_code=True, dtype="float16")


def test_diffusers_loading_options_at_their_defaults_are_taken_and_others_named(saved):
    # `DDIMPipeline.from_pretrained(folder, quantization_config=None, proxies=None, ...)` (what wrappers pass along)
    # loads; the package's pipelines refused every such option as an unexpected keyword, even at its default
    folder, pipeline_class, images = saved
    defaults = dict(proxies=None, quantization_config=None, max_memory=None, offload_folder=None, use_flashpack=False)
    assert np.array_equal(_samples(pipeline_class.from_pretrained(folder, **defaults)), images)
    with pytest.raises(ValueError, match=r"`quantization_config` is not supported by .*from_pretrained"):
        pipeline_class.from_pretrained(folder, quantization_config={"load_in_8bit": True})
    with pytest.raises(ValueError, match="unexpected keyword"):
        pipeline_class.from_pretrained(folder, no_such_option=None)


def test_save_pretrained_takes_diffusers_positional_arguments_and_never_pushes_a_variant(saved, tmp_path, monkeypatch):
    # diffusers' order: (save_directory, safe_serialization, variant, max_shard_size, push_to_hub); the variant given
    # third was `push_to_hub`, so `save_pretrained(folder, True, "fp16")` tried to create a Hub repository
    import huggingface_hub

    folder, pipeline_class, images = saved

    def no_push(*args, **kwargs):
        raise AssertionError("save_pretrained without push_to_hub contacted the Hub")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_push)
    variant_folder = tmp_path / "variant"
    pipeline_class.from_pretrained(folder).save_pretrained(variant_folder, True, "fp16", "10GB")
    weights = [p.name for p in variant_folder.rglob("*") if p.suffix in (".bin", ".safetensors")]
    assert weights and all(name.endswith(".fp16.safetensors") for name in weights)
    assert np.array_equal(_samples(pipeline_class.from_pretrained(variant_folder, variant="fp16")), images)


@pytest.mark.parametrize("new_transformers", [True, False])
def test_transformers_components_get_the_dtype_argument_of_the_installed_transformers(
    tiny_sd_components, tmp_path, monkeypatch, new_transformers
):
    # `dtype=` is transformers 4.56's name: before it (the package takes 4.46 on) it reached the model's constructor,
    # a TypeError; diffusers' loader passes `torch_dtype=` there, as here now (and nothing for "as stored")
    from diffusers import StableDiffusionPipeline

    from diffusers_stages.pipelines import loading

    StableDiffusionPipeline(**tiny_sd_components).save_pretrained(tmp_path / "sd")
    index = StableDiffusionPipeline.load_config(tmp_path / "sd")
    monkeypatch.setattr(loading, "is_transformers_version", lambda op, version: new_transformers, raising=False)
    calls = []
    monkeypatch.setattr(loading, "load_strictly", lambda cls, path, name, **kwargs: calls.append(kwargs))
    loading.load_transformers_components(tmp_path / "sd", index, StableDiffusionPipeline)
    loading.load_transformers_components(tmp_path / "sd", index, StableDiffusionPipeline, dtype=None)
    name = "dtype" if new_transformers else "torch_dtype"
    assert calls == [{"use_safetensors": True, name: torch.float32}, {"use_safetensors": True}]


def test_save_pretrained_takes_use_flashpack_sixth_as_diffusers(saved, tmp_path):
    # diffusers' sixth argument (after push_to_hub) was a TypeError by position; flashpack is not installed here, so
    # diffusers' own refusal shows that it reached the models' save
    folder, pipeline_class, _ = saved
    with pytest.raises(ImportError, match="flashpack"):
        pipeline_class.from_pretrained(folder).save_pretrained(tmp_path / "flashpack", True, None, None, False, True)


class MyMultiStagePipeline(MultiStagePipeline):
    """A user's own subclass of a package pipeline (as diffusers users subclass `DDIMPipeline`)."""


def test_a_users_subclass_of_a_package_pipeline_reloads_with_its_own_class(tiny_multistage, tmp_path):
    # `MyDDIM(DDIMPipeline).from_pretrained(folder)` loads its own saved folder in diffusers; here the subclass's
    # folder was refused as "'MyMultiStagePipeline' is not one of diffusers-stages' pipelines; load the folder with
    # its own pipeline class", the very call made. The class called is the user's own: nothing from the folder runs.
    pipe = MyMultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    pipe.save_pretrained(tmp_path)
    marker = tmp_path / "ran"
    for path in tmp_path.rglob("*.py"):  # the folder's re-export files are never run
        path.write_text(_payload(marker))
    loaded = MyMultiStagePipeline.from_pretrained(tmp_path)
    assert type(loaded) is MyMultiStagePipeline and not marker.exists()
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(
        loaded(num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images, images
    )
    with pytest.raises(ValueError, match="'MyMultiStagePipeline' is not one of diffusers-stages' pipelines"):
        MultiStagePipeline.from_pretrained(tmp_path)  # the base class cannot know the subclass: still refused


def test_a_scheduler_passed_to_from_pretrained_of_the_other_kind_than_the_saved_one_is_refused(
    tiny_multistage, tmp_path
):
    # the folder's scheduler says what its model predicts; a flow-matching scheduler passed in its place for a
    # DDPM-style model (or the reverse) loaded and sampled garbage images. Another DDPM-style prediction type is
    # taken, as diffusers' `from_pretrained(folder, scheduler=...)` takes it
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler(prediction_type="epsilon")).save_pretrained(
        tmp_path
    )
    with pytest.raises(
        ValueError,
        match=r"`scheduler` FlowMatchEulerDiscreteScheduler .*flow_prediction.*DDIMScheduler .*prediction_type='epsilon'",
    ):
        MultiStagePipeline.from_pretrained(tmp_path, scheduler=FlowMatchEulerDiscreteScheduler())
    for scheduler in (DDIMScheduler(prediction_type="v_prediction"), EulerDiscreteScheduler()):
        assert MultiStagePipeline.from_pretrained(tmp_path, scheduler=scheduler).scheduler is scheduler
    flow = tmp_path / "flow"
    MultiStagePipeline(unet=tiny_multistage, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(flow)
    with pytest.raises(ValueError, match=r"`scheduler` DDIMScheduler .*'epsilon'.*FlowMatchEulerDiscreteScheduler"):
        MultiStagePipeline.from_pretrained(flow, scheduler=DDIMScheduler())
    assert type(MultiStagePipeline.from_pretrained(flow).scheduler) is FlowMatchEulerDiscreteScheduler


def test_a_model_folder_given_for_a_pipeline_names_what_to_load(tiny_multistage, tmp_path):
    """`MultiStagePipeline.from_pretrained("my-multistage/unet")` said only "has no `model_index.json`: it is not a
    saved pipeline", not which folder (or which model class) loads it."""
    import shutil

    _multistage(tiny_multistage).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="it is not a saved pipeline") as error:
        MultiStagePipeline.from_pretrained(tmp_path / "saved" / "unet")
    assert f"It is the unet/ model folder of the pipeline folder {str(tmp_path / 'saved')!r}: load that" in str(
        error.value
    )
    shutil.copytree(tmp_path / "saved" / "unet", tmp_path / "alone")
    with pytest.raises(ValueError, match="it is not a saved pipeline") as error:
        MultiStagePipeline.from_pretrained(tmp_path / "alone")
    assert (
        f"It is a model folder: load it with `MultiStageUNet2DModel.from_pretrained({str(tmp_path / 'alone')!r})`"
        in str(error.value)
    )


@pytest.mark.parametrize("path", ["/no/such/folder", "./no-such-folder", "../no/such"])
def test_a_missing_local_folder_is_named_as_such_not_as_a_bad_repo_id(tmp_path, path):
    """A mistyped local path was huggingface_hub's "Repo id must be in the form 'repo_name' or
    'namespace/repo_name'", which does not say that the folder does not exist."""
    with pytest.raises(ValueError, match=f"{re.escape(repr(path))} is not a folder"):
        MultiStagePipeline.from_pretrained(path)


def test_a_scheduler_passed_for_a_folder_without_its_scheduler_folder_loads_as_in_diffusers(saved):
    # `DDIMPipeline.from_pretrained(folder, scheduler=DDIMScheduler())` never reads the folder's scheduler/, so it
    # loads without one; the package's pipelines refused it ("Component folder 'scheduler' must be a directory
    # inside ...") while comparing the passed scheduler with the saved one
    folder, pipeline_class, images = saved
    shutil.rmtree(folder / "scheduler")
    pipe = pipeline_class.from_pretrained(folder, scheduler=DDIMScheduler())
    assert np.array_equal(_samples(pipe), images)


def test_a_renamed_or_missing_component_folder_is_named_with_what_to_do(saved, tmp_path):
    # a folder whose unet/ (or experts/, shallow/) was renamed or deleted said "Component folder 'unet' must be a
    # directory inside <folder>, got '<folder>/unet'", which reads as if something of the wrong kind were there
    folder, pipeline_class, _ = saved
    index = _index(folder)
    name = next(
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] and k != "scheduler"
    )
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    (renamed / name).rename(renamed / f"{name}_old")
    message = (
        rf"names the component '{name}' .* has no {name}/ folder \(its folders: .*'{name}_old'.*\).*`{name}=\.\.\.`"
    )
    with pytest.raises(ValueError, match=message):
        pipeline_class.from_pretrained(renamed)
    shutil.rmtree(renamed / f"{name}_old")
    with pytest.raises(ValueError, match=rf"has no {name}/ folder"):
        pipeline_class.from_pretrained(renamed)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_saving_unsharded_over_a_sharded_save_still_loads(saved, tmp_path, variant):
    # diffusers' save_pretrained deletes the old shards but keeps their index (diffusers issue 14719), so a pipeline
    # saved with `max_shard_size` and then again without it into the same folder no longer loaded:
    # "FileNotFoundError: ... does not appear to have a file named diffusion_pytorch_model-00001-of-000NN.safetensors"
    folder, pipeline_class, images = saved
    pipe = pipeline_class.from_pretrained(folder)
    again = tmp_path / "again"
    pipe.save_pretrained(again, variant=variant, max_shard_size="10KB")
    pipe.save_pretrained(again, variant=variant)
    assert not list(again.rglob("*-00001-of-*"))
    assert np.array_equal(_samples(pipeline_class.from_pretrained(again, variant=variant)), images)
    pipe.save_pretrained(again, variant=variant, max_shard_size="10KB")  # and back: the new index is kept
    assert np.array_equal(_samples(pipeline_class.from_pretrained(again, variant=variant)), images)


def test_trusted_loading_by_the_packages_class_gives_the_saved_images(saved):
    # `DualBackbonePipeline.from_pretrained(folder, trust_remote_code=True)` hands the folder to diffusers' loader,
    # which leaves diffusers' own models (the backbones, a VAE) at the unaligned addresses safetensors maps them to:
    # other float rounding on CPU, so the same seed gave other images than the saved pipeline and the package's own load
    folder, pipeline_class, images = saved
    assert np.array_equal(_samples(pipeline_class.from_pretrained(folder, trust_remote_code=True)), images)
