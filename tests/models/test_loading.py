"""Loading: `realign_storage` copies a loaded model to aligned storage without doubling its memory, and the files of a
saved folder are hostile input (links out of the folder, malformed configs and weight indexes are refused)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_stages import MultiStageUNet2DModel
from diffusers_stages.models.loading import realign_storage
from tests.conftest import TINY_UNET, corrupt_weights

PEAK = """
import resource, sys
from diffusers import UNet2DModel

from diffusers_stages import MultiStageUNet2DModel
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = MultiStageUNet2DModel.from_pretrained(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident memory of a process")
def test_loading_peaks_at_the_parameters_plus_one_tensor(tmp_path):
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(  # 80 MB of parameters, in tensors of at most 2.4 MB
        sample_size=8, block_out_channels=(128, 256), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=2, norm_num_groups=8,
    )  # fmt: skip
    model.save_pretrained(tmp_path)
    growth = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], capture_output=True, text=True, check=True)
    # before: every mapped page read stayed resident until the last copy, twice the parameters (2.0)
    assert float(growth.stdout.split()[-1]) < 1.3


def test_realigned_tensors_keep_their_values_and_unaligned_ones_are_copied():
    base = torch.arange(40.0)
    module = torch.nn.Linear(3, 3)
    module.weight.data = base[1:10].reshape(3, 3)  # 4 bytes past an aligned address
    weight, bias = module.weight.detach().clone(), module.bias.data_ptr()
    realign_storage(module)
    assert module.weight.data_ptr() % 64 == 0 and torch.equal(module.weight, weight)
    assert bias % 64 or module.bias.data_ptr() == bias  # an aligned tensor is left where it is


WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def saved_model(tmp_path):
    """A tiny saved `MultiStageUNet2DModel` folder and the model."""
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,)).eval()
    model.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved", model


@pytest.mark.parametrize("name", [WEIGHTS, "config.json"])
def test_a_file_that_links_out_of_the_folder_is_refused(saved_model, tmp_path, name):
    folder, _ = saved_model
    os.rename(folder / name, tmp_path / name)  # e.g. another model's weights, or any file of the user's
    os.symlink(tmp_path / name, folder / name)
    with pytest.raises(ValueError, match=f"{name}.*outside"):
        MultiStageUNet2DModel.from_pretrained(folder)


def test_a_hub_cache_snapshot_whose_files_link_to_its_blobs_loads(saved_model, tmp_path):
    folder, model = saved_model
    repo = tmp_path / "hub" / "models--me--staged"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(folder.iterdir())):
        shutil.copy(path, blobs / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snapshot / path.name)  # as huggingface_hub links
    loaded = MultiStageUNet2DModel.from_pretrained(snapshot)
    x = torch.randn(1, 3, 8, 8, generator=torch.manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x, 300).sample, model(x, 300).sample)


@pytest.mark.parametrize(
    "weight_map", [{"conv_in.weight": 5}, ["shard.safetensors"], {"conv_in.weight": ["a", "b"]}, None]
)
def test_a_weight_index_of_the_wrong_shape_is_named(saved_model, weight_map):
    folder, _ = saved_model
    os.rename(folder / WEIGHTS, folder / "shard.safetensors")
    index = {"metadata": {}} if weight_map is None else {"metadata": {}, "weight_map": weight_map}
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map.*diffusion_pytorch_model\.safetensors\.index\.json"):
        MultiStageUNet2DModel.from_pretrained(folder)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json"], ids=["list", "not-json"])
def test_a_config_that_is_not_a_json_object_is_named(saved_model, text):
    folder, _ = saved_model
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json"):
        MultiStageUNet2DModel.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weights_saved_as_integers_are_refused_not_cast(saved_model, dtype):
    from safetensors.torch import load_file, save_file

    folder, _ = saved_model
    state = load_file(folder / WEIGHTS)
    state["conv_in.weight"] = state["conv_in.weight"].to(dtype)  # a corrupted or hostile checkpoint
    save_file(state, folder / WEIGHTS)
    with pytest.raises(ValueError, match=r"conv_in\.weight.*(I64|BOOL)"):
        MultiStageUNet2DModel.from_pretrained(folder)


def _experts():
    from diffusers import UNet2DModel

    from diffusers_stages import ExpertRoutingModel

    small = dict(
        sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    )  # fmt: skip
    return ExpertRoutingModel([UNet2DModel(**small), UNet2DModel(**small)], stage_boundaries=(500,))


@pytest.mark.parametrize("kind", ["staged", "experts"])
def test_a_subfolder_that_links_out_of_the_folder_is_refused(saved_model, tmp_path, kind):
    from diffusers_stages import ExpertRoutingModel

    folder, _ = saved_model
    if kind == "experts":
        folder = tmp_path / "experts"
        _experts().save_pretrained(folder)
    model_class = ExpertRoutingModel if kind == "experts" else MultiStageUNet2DModel
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(folder, repo / "unet")  # the repository's `unet` is another folder of the user's
    with pytest.raises(ValueError, match="'unet'.*outside"):
        model_class.from_pretrained(repo, subfolder="unet")
    assert model_class.from_pretrained(folder.parent, subfolder=folder.name) is not None  # a real sub-folder loads


@pytest.mark.parametrize("subfolder", ["unet", "a\x00b"], ids=["missing", "nul"])
def test_a_subfolder_that_is_not_there_is_named_not_the_root_loaded(saved_model, subfolder):
    # diffusers falls back to the folder's own config and weights: the saved model, silently, for any subfolder
    folder, _ = saved_model
    with pytest.raises(ValueError, match="`subfolder`"):
        MultiStageUNet2DModel.from_pretrained(folder, subfolder=subfolder)


@pytest.mark.parametrize("corruption", [None, "integers", "link"])
def test_weights_beside_a_subfolder_are_never_loaded_in_its_place(saved_model, tmp_path, corruption):
    # diffusers reads a folder's own weight file before its subfolder's: weights planted in a pipeline folder's root
    # replaced the `unet`'s, unchecked (cast from integers, or linked from outside)
    from diffusers import UNet2DModel

    from diffusers_stages.models.loading import load_strictly

    folder, model = saved_model
    repo = tmp_path / "repo"
    torch.manual_seed(1)
    MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,)).save_pretrained(repo)  # planted: other weights
    os.remove(repo / "config.json")
    shutil.copytree(folder, repo / "unet")
    if corruption is not None:
        corrupt_weights(repo / WEIGHTS, corruption, outside=tmp_path)
    loaded = MultiStageUNet2DModel.from_pretrained(repo, subfolder="unet")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert str(loaded.config._name_or_path) == str(
        repo
    )  # as diffusers records it: the folder given, not its subfolder

    torch.manual_seed(0)
    plain = UNet2DModel(**TINY_UNET)
    plain.save_pretrained(repo / "plain")
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS, repo / WEIGHTS)
    loaded = load_strictly(UNet2DModel, repo, "plain")  # diffusers' own classes, as strictly
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), plain.state_dict().values()))


def _hub_cache(folder, tmp_path, name: str = "staged"):
    """A Hub cache holding ``folder`` as the snapshot of repository ``me/{name}`` (what a download leaves: each file
    a relative link to its blob, as huggingface_hub links them): the cache folder and the snapshot folder."""
    cache, revision = tmp_path / "cache", "0" * 40
    snapshot, blobs = cache / f"models--me--{name}" / "snapshots" / revision, cache / f"models--me--{name}" / "blobs"
    blobs.mkdir(parents=True)
    for i, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        shutil.copy(path, blobs / f"blob{i}")
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blobs / f"blob{i}", link.parent), link)
    (cache / f"models--me--{name}" / "refs").mkdir()
    (cache / f"models--me--{name}" / "refs" / "main").write_text(revision)
    return cache, snapshot


def test_an_expert_container_subfolder_that_leads_out_of_the_hub_snapshot_is_refused(tmp_path):
    # the Hub path read the folder `subfolder` led to (another cached repository here); a local folder refused it
    from diffusers import UNet2DModel

    from diffusers_stages import ExpertRoutingModel

    ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=(500,)).save_pretrained(
        tmp_path / "m"
    )
    cache, _ = _hub_cache(tmp_path / "m", tmp_path, "experts")
    _, other = _hub_cache(tmp_path / "m", tmp_path, "other")
    subfolder = os.path.relpath(other, cache / "models--me--experts" / "snapshots" / other.name)
    with pytest.raises(ValueError, match=r"`subfolder` '\.\./.*outside the folder"):
        ExpertRoutingModel.from_pretrained("me/experts", subfolder=subfolder, cache_dir=cache, local_files_only=True)
    assert ExpertRoutingModel.from_pretrained("me/experts", cache_dir=cache, local_files_only=True) is not None


def test_bin_weights_of_an_expert_container_are_fetched_though_the_snapshot_holds_other_safetensors(
    tmp_path, monkeypatch
):
    # the `.bin` fallback looked for safetensors in the whole snapshot: another folder of the repository fetched
    # before (a pipeline's `unet/`) kept the container's `.bin` weights from being downloaded
    import fnmatch

    import huggingface_hub
    from diffusers import UNet2DModel

    from diffusers_stages import ExpertRoutingModel

    remote, snapshot = tmp_path / "remote", tmp_path / "snapshot"
    model = ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=(500,))
    model.save_pretrained(remote / "experts", safe_serialization=False)
    UNet2DModel(**TINY_UNET).save_pretrained(remote / "unet")
    files = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):  # as the Hub cache: files add up in the snapshot
        for name in (f for f in files if any(fnmatch.fnmatch(f, p) for p in allow_patterns)):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    snapshot_download("me/repo", allow_patterns=["unet/*"])  # fetched before, by another load
    loaded = ExpertRoutingModel.from_pretrained("me/repo", subfolder="experts", load_experts=[1])
    x = torch.randn(1, 3, 8, 8, generator=torch.manual_seed(0))
    assert torch.equal(loaded.experts[1](x, 100).sample, model.experts[1](x, 100).sample)
    assert not (snapshot / "experts" / "expert_0").exists()


def test_weights_saved_as_integers_are_refused_from_the_hub_too(saved_model, tmp_path):
    # a Hub repository id was not checked (only a local folder was): diffusers cast the integers silently
    from safetensors.torch import load_file, save_file

    cache, snapshot = _hub_cache(saved_model[0], tmp_path)
    assert MultiStageUNet2DModel.from_pretrained("me/staged", cache_dir=cache, local_files_only=True) is not None
    state = load_file(snapshot / WEIGHTS)
    save_file({**state, "conv_in.weight": state["conv_in.weight"].to(torch.int64)}, snapshot / WEIGHTS)
    with pytest.raises(ValueError, match=r"conv_in\.weight.*I64"):
        MultiStageUNet2DModel.from_pretrained("me/staged", cache_dir=cache, local_files_only=True)


@pytest.mark.parametrize("linked", ["blob", "snapshot file"])
@pytest.mark.parametrize("kind", ["package", "diffusers"])
def test_a_hub_cache_file_that_links_out_of_the_cache_is_refused(saved_model, tmp_path, linked, kind):
    # a model loaded by repository id (a pipeline's and a local folder's were checked) loaded whatever its snapshot's
    # files or their blobs linked to: another model's weights here, any file of the user's
    from diffusers import UNet2DModel

    from diffusers_stages.models.loading import load_strictly

    folder, _ = saved_model
    if kind == "diffusers":
        folder = tmp_path / "plain"
        _plain_unet().save_pretrained(folder / "unet")
    load = {
        "package": lambda: MultiStageUNet2DModel.from_pretrained("me/staged", cache_dir=cache, local_files_only=True),
        "diffusers": lambda: load_strictly(UNet2DModel, "me/staged", "unet", cache_dir=cache, local_files_only=True),
    }[kind]
    cache, snapshot = _hub_cache(folder, tmp_path)
    assert load() is not None  # links to the repository's own blobs load
    link = snapshot / ("unet" if kind == "diffusers" else "") / WEIGHTS
    shutil.copy(link, tmp_path / "outside.safetensors")
    if linked == "blob":
        link = link.resolve()
    os.remove(link)
    os.symlink(tmp_path / "outside.safetensors", link)
    with pytest.raises(ValueError, match=f"'{WEIGHTS}' in .*snapshots.* links to .*outside.safetensors', outside"):
        load()


def test_a_hub_snapshot_the_cache_does_not_name_skips_the_integer_check_with_a_warning(
    saved_model, tmp_path, monkeypatch
):
    # the weights loaded; only the check's lookup of the snapshot failed: loading goes on, and says what it skipped
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache, snapshot = _hub_cache(saved_model[0], tmp_path)

    def not_found(*args, **kwargs):
        raise LocalEntryNotFoundError("no snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.warns(UserWarning, match=r"'me/staged'.*not checked for floating-point weights stored as integers"):
        model = MultiStageUNet2DModel.from_pretrained("me/staged", cache_dir=cache, local_files_only=True)
    assert model is not None


def _plain_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**TINY_UNET)


def _plain_cond_unet():
    from diffusers import UNet2DConditionModel

    from tests.conftest import TINY_COND_UNET

    return UNet2DConditionModel(**TINY_COND_UNET)


def _plain_uvit():
    from diffusers_stages import UViT2DModel

    return UViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)


@pytest.mark.parametrize(
    ("model_class", "plain", "hint"),
    [
        ("MultiStageUNet2DModel", _plain_unet, r"MultiStageUNet2DModel\.from_unet\(UNet2DModel\.from_pretrained\("),
        (
            "MultiStageUNet2DConditionModel",
            _plain_cond_unet,
            r"MultiStageUNet2DConditionModel\.from_unet\(UNet2DConditionModel\.from_pretrained\(",
        ),
        ("ExpertRoutingModel", _plain_unet, r"ExpertRoutingModel\(\[UNet2DModel\.from_pretrained\(.*\), \.\.\.\]"),
        ("IUNet2DModel", _plain_unet, r"load it with `UNet2DModel\.from_pretrained\("),
        ("EarlyExitUViT2DModel", _plain_unet, r"load it with `UNet2DModel\.from_pretrained\("),
        ("UViT2DModel", _plain_cond_unet, r"load it with `UNet2DConditionModel\.from_pretrained\("),
        ("MultiStageDDPMppUNet2DModel", _plain_uvit, r"load it with `UViT2DModel\.from_pretrained\("),
    ],
)
def test_a_folder_of_another_model_class_is_named_with_what_to_call(tmp_path, model_class, plain, hint):
    # was a misleading error (`num_train_timesteps` must be a positive integer, got None) from the config of a
    # plain UNet2DModel read as a MultiStageUNet2DModel's
    import diffusers_stages.models

    plain().save_pretrained(tmp_path / "plain")
    name = type(plain()).__name__
    with pytest.raises(
        ValueError,
        match=rf"holds a model of class {name} \(`_class_name` of its config.json\), not of class {model_class}.*{hint}",
    ):
        getattr(diffusers_stages.models, model_class).from_pretrained(tmp_path / "plain")


def test_a_hub_repository_of_another_model_class_is_named_too(tmp_path):
    _plain_unet().save_pretrained(tmp_path / "plain")
    cache, _ = _hub_cache(tmp_path / "plain", tmp_path)
    with pytest.raises(
        ValueError, match=r"holds a model of class UNet2DModel .*MultiStageUNet2DModel\.from_unet\(UNet2DModel"
    ):
        MultiStageUNet2DModel.from_pretrained("me/staged", cache_dir=cache, local_files_only=True)


def test_a_subclass_loads_its_base_class_folder(saved_model, tmp_path):
    class Tuned(MultiStageUNet2DModel):
        pass

    assert type(Tuned.from_pretrained(saved_model[0])) is Tuned


def test_a_config_that_links_out_of_the_folder_is_refused_before_it_is_read(saved_model, tmp_path):
    # the check of the folder's class read `config.json` before the folder's files were checked
    _plain_unet().save_pretrained(tmp_path / "plain")
    linked = tmp_path / "linked"
    shutil.copytree(saved_model[0], linked)
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(tmp_path / "plain" / "config.json")
    with pytest.raises(ValueError, match="links to .*outside the folder"):
        MultiStageUNet2DModel.from_pretrained(linked)


def _corrupt_second_shard(folder, corruption: str) -> str:
    """Drop the first tensor of ``folder``'s second safetensors shard (its index still maps it there), or add a tensor
    the index does not list; returns the tensor's name."""
    from safetensors.torch import load_file, save_file

    shard = sorted(folder.glob("*-00002-of-*.safetensors"))[0]
    state = load_file(shard)
    key = sorted(state)[0] if corruption == "missing" else "extra.weight"
    state = {k: v for k, v in state.items() if k != key} if corruption == "missing" else {**state, key: torch.ones(2)}
    save_file(state, shard)
    return key


@pytest.mark.parametrize("corruption", ["missing", "unexpected"])
@pytest.mark.parametrize("kind", ["staged", "experts", "diffusers"])
def test_a_sharded_checkpoint_with_missing_or_unexpected_keys_is_refused(tmp_path, kind, corruption):
    # diffusers reads a sharded checkpoint's keys from its index, not from the shards: a tensor missing from its shard
    # was left on the `meta` device (uninitialised memory with `low_cpu_mem_usage=False`), one the index does not list
    # was ignored, and both loaded without a word
    from diffusers import UNet2DModel

    from diffusers_stages import ExpertRoutingModel
    from diffusers_stages.models.loading import load_strictly

    torch.manual_seed(0)
    model = {"staged": lambda: MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,)), "experts": _experts}
    model = model.get(kind, lambda: UNet2DModel(**TINY_UNET))()
    model.save_pretrained(tmp_path, max_shard_size="10KB")
    load = {
        "staged": MultiStageUNet2DModel.from_pretrained,
        "experts": ExpertRoutingModel.from_pretrained,
        "diffusers": lambda path: load_strictly(UNet2DModel, path),
    }[kind]
    assert load(tmp_path) is not None  # the intact sharded folder loads
    key = _corrupt_second_shard(tmp_path / "expert_0" if kind == "experts" else tmp_path, corruption)
    with pytest.raises(ValueError, match=rf"-00002-of-.*{re.escape(key)}"):
        load(tmp_path)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_bin_weights_saved_as_integers_are_refused_too(tmp_path, sharded):
    # only safetensors files were checked: a `.bin` checkpoint (`safe_serialization=False`) was cast silently
    torch.manual_seed(0)
    model = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,))
    model.save_pretrained(tmp_path, safe_serialization=False, **({"max_shard_size": "10KB"} if sharded else {}))
    path = sorted(tmp_path.glob("*-00002-of-*.bin" if sharded else "*.bin"))[0]
    state = torch.load(path, weights_only=True)
    key = sorted(state)[0]
    torch.save({**state, key: state[key].to(torch.int32)}, path)
    with pytest.raises(ValueError, match=rf"{path.name} .*{re.escape(key)}: torch.int32"):
        MultiStageUNet2DModel.from_pretrained(tmp_path, use_safetensors=False)


def test_a_sharded_variant_with_a_tensor_missing_from_its_shard_is_refused(tmp_path):
    # a variant's index is `diffusion_pytorch_model.safetensors.index.fp16.json`, not `*.index.json`: the shard check
    # passed over it, and the missing tensor was left on the `meta` device
    torch.manual_seed(0)
    MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,)).save_pretrained(
        tmp_path, max_shard_size="10KB", variant="fp16"
    )
    key = _corrupt_second_shard(tmp_path, "missing")
    with pytest.raises(ValueError, match=rf"index\.fp16\.json.*-00002-of-.*{re.escape(key)}"):
        MultiStageUNet2DModel.from_pretrained(tmp_path, variant="fp16")


def test_a_bin_file_beside_the_safetensors_that_was_not_loaded_never_blocks_or_runs(saved_model, tmp_path):
    # the integer-weights check reads `.bin` weight files too; one that torch's weights-only unpickler refuses (a
    # planted pickle) was not what diffusers loaded, so it must neither run nor stop the safetensors from loading
    import pickle

    folder, model = saved_model
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_in.weight": Payload()}, f, protocol=2)
    loaded = MultiStageUNet2DModel.from_pretrained(folder)
    assert torch.equal(loaded.conv_in.weight, model.conv_in.weight) and not marker.exists()


@pytest.mark.parametrize("kind", ["staged", "diffusers"])
def test_pickles_beside_the_safetensors_that_were_loaded_are_never_unpickled(saved_model, monkeypatch, kind):
    # the integer-weights and shard checks unpickled (weights-only) every `.bin` weight file and every `.bin` index's
    # shards of the folder, though diffusers had read the safetensors: files the user never asked to load, read by
    # torch's unpickler (whose weights-only mode torch < 2.6 does not make safe)
    import json

    folder, model = saved_model
    torch.save({"conv_in.weight": torch.zeros(1)}, folder / "diffusion_pytorch_model.bin")
    torch.save({"conv_in.bias": torch.zeros(1)}, folder / "diffusion_pytorch_model-00001-of-00001.bin")
    index = {"weight_map": {"conv_in.bias": "diffusion_pytorch_model-00001-of-00001.bin"}}
    (folder / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps(index))
    unpickled, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *args, **kwargs: (unpickled.append(f), load(f, *args, **kwargs))[1])
    if kind == "staged":
        loaded = MultiStageUNet2DModel.from_pretrained(folder)
    else:
        from diffusers_stages.models.loading import load_strictly

        UNet2DModel(**TINY_UNET).save_pretrained(folder / "unet")
        for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"):
            shutil.copy(folder / name, folder / "unet" / name)
        loaded = load_strictly(UNet2DModel, folder / "unet")
    assert unpickled == [] and loaded is not None


def test_a_bin_checkpoint_loaded_by_default_is_still_checked_for_integer_weights(tmp_path):
    # (the other way round: a folder saved with `safe_serialization=False` is read as `.bin` without asking)
    torch.manual_seed(0)
    MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,)).save_pretrained(tmp_path, safe_serialization=False)
    path = tmp_path / "diffusion_pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    key = sorted(state)[0]
    torch.save({**state, key: state[key].to(torch.int32)}, path)
    with pytest.raises(ValueError, match=rf"{path.name} .*{re.escape(key)}: torch.int32"):
        MultiStageUNet2DModel.from_pretrained(tmp_path)


def test_a_broken_safetensors_file_beside_the_one_loaded_never_blocks_it(saved_model):
    # (a variant's file, or one planted: the integer-weights check read every .safetensors of the folder and failed
    # on it with a SafetensorError, after the intact default weights had loaded)
    folder, model = saved_model
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not safetensors")
    loaded = MultiStageUNet2DModel.from_pretrained(folder)
    assert torch.equal(loaded.conv_in.weight, model.conv_in.weight)


@pytest.mark.parametrize("name", ["torch_dtype", "dtype"])
def test_a_dtype_that_is_not_a_torch_dtype_is_named_not_loaded_as_float32(tmp_path, name):
    # diffusers only warns about transformers' spelling "float16" and loads the model in float32
    from diffusers import UNet2DModel

    from diffusers_stages import ExpertRoutingModel
    from tests.conftest import SMALL_UNET

    staged, routed = tmp_path / "staged", tmp_path / "routed"
    MultiStageUNet2DModel(**TINY_UNET).save_pretrained(staged)
    ExpertRoutingModel([UNet2DModel(**SMALL_UNET)] * 2, stage_boundaries=(500,)).save_pretrained(routed)
    for model_class, folder in [(MultiStageUNet2DModel, staged), (ExpertRoutingModel, routed)]:
        for wrong in ["float16", {"default": torch.float16}]:
            with pytest.raises(ValueError, match=rf"`{name}` must be a torch.dtype \(torch.float16, ...\), got"):
                model_class.from_pretrained(folder, **{name: wrong})
        assert model_class.from_pretrained(folder, **{name: torch.float16}).dtype == torch.float16


def test_a_scheduler_folder_whose_config_links_out_of_it_is_refused(tmp_path):
    # `load_scheduler` (the switch command's `--scheduler`, the experts task's and a checkpoint's scheduler) read a
    # `scheduler_config.json` linked from anywhere; a model folder, and a pipeline's scheduler, refused it
    from diffusers import DDIMScheduler

    from diffusers_stages.models.loading import load_scheduler

    DDIMScheduler().save_pretrained(tmp_path / "elsewhere")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "scheduler_config.json").symlink_to(tmp_path / "elsewhere" / "scheduler_config.json")
    with pytest.raises(ValueError, match="'scheduler_config.json' in .*linked links to .*outside the folder"):
        load_scheduler(DDIMScheduler, tmp_path / "linked", "`--scheduler`")
    assert isinstance(load_scheduler(DDIMScheduler, tmp_path / "elsewhere", "`--scheduler`"), DDIMScheduler)


HUGE_CONFIG = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))  # a 36 GB weight would fail to allocate, not swap
from diffusers import UNet2DModel
from diffusers import UNet2DModel

from diffusers_stages import MultiStageUNet2DModel
from diffusers_stages.models.loading import load_strictly
load = MultiStageUNet2DModel.from_pretrained if sys.argv[2] == "staged" else lambda f: load_strictly(UNet2DModel, f)
try:
    load(sys.argv[1])
except ValueError as error:
    print("ValueError:", error)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits the memory of a process")
def test_a_config_edited_to_huge_sizes_is_named_before_anything_is_allocated(saved_model, tmp_path):
    folder, _ = saved_model
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [2**16, 2**16]}))
    plain = tmp_path / "plain"
    UNet2DModel(**TINY_UNET).save_pretrained(plain)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "block_out_channels": [2**16, 2**16]}))
    for path, kind in ((folder, "staged"), (plain, "diffusers")):  # the package's strict loading, and diffusers'
        run = subprocess.run([sys.executable, "-c", HUGE_CONFIG, str(path), kind], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "does not match its config" in run.stdout, run.stdout
        assert re.search(r"has shape \[8\S*\] there, \[65536\S*\] in the", run.stdout), run.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits the memory of a process")
def test_a_config_edited_to_add_huge_weights_its_files_lack_is_named_before_anything_is_allocated(tmp_path):
    plain = tmp_path / "plain"
    UNet2DModel(**TINY_UNET).save_pretrained(plain)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "num_class_embeds": 2**26}))  # an 8 GiB embedding
    run = subprocess.run([sys.executable, "-c", HUGE_CONFIG, str(plain), "diffusers"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "does not match its config" in run.stdout and "class_embedding.weight" in run.stdout, run.stdout


def test_a_config_edited_to_build_countless_layers_is_named_before_they_are_built(tmp_path):
    plain = tmp_path / "plain"
    UNet2DModel(**TINY_UNET).save_pretrained(plain)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "layers_per_block": 10**9}))  # never done building
    run = subprocess.run(
        [sys.executable, "-c", HUGE_CONFIG, str(plain), "diffusers"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "does not match its config" in run.stdout and "more tensors than" in run.stdout, run.stdout


@pytest.mark.parametrize("load", [{"variant": "fp16"}, {"use_safetensors": False}])
def test_the_size_check_measures_the_weight_files_the_load_reads(tmp_path, load):
    # a folder holding plain safetensors of an earlier (narrower) model beside the variant (or `.bin`) weights of
    # the model its config describes: diffusers loads the variant (`.bin`) weights it is asked for, but the size
    # check measured the config against the plain safetensors and refused the load ("conv_in.bias has shape [8]
    # there, [16] in the MultiStageUNet2DModel it builds")
    torch.manual_seed(0)
    earlier = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,))
    wide = MultiStageUNet2DModel(**{**TINY_UNET, "block_out_channels": (16, 32)}, stage_boundaries=(500,)).eval()
    earlier.save_pretrained(tmp_path)
    wide.save_pretrained(tmp_path, **({"variant": "fp16"} if "variant" in load else {"safe_serialization": False}))
    loaded = MultiStageUNet2DModel.from_pretrained(tmp_path, **load)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, wide(x, t).sample)
    # the check still measures the files read: the variant's config edited to sizes its weights lack is named
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "block_out_channels": [2**16, 2**16]}))
    with pytest.raises(ValueError, match=r"has shape \[16\S*\] there, \[65536\S*\] in the"):
        MultiStageUNet2DModel.from_pretrained(tmp_path, **load)


@pytest.mark.parametrize(
    "files, refused",
    [
        (["diffusion_pytorch_model.safetensors"], False),
        (
            ["diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-00001-of-00002.safetensors"],
            False,
        ),
        (["model.safetensors"], False),  # transformers' name
        (["model.safetensors.index.json", "model-00001-of-00002.safetensors"], False),
        (["diffusion_pytorch_model.bin"], True),
        (["diffusion_pytorch_model.fp16.safetensors"], True),
        (
            [
                "diffusion_pytorch_model-00001-of-00002.safetensors",
                "diffusion_pytorch_model-00002-of-00002.safetensors",
            ],
            True,
        ),
        ([], True),
    ],
    ids=["file", "index", "transformers", "transformers-index", "bin", "variant", "shards-without-index", "empty"],
)
def test_refuse_without_plain_safetensors_takes_what_loads_without_a_variant(tmp_path, files, refused):
    """The one check of the conversions and the text-to-image training: plain safetensors, a sharded checkpoint by
    its index (diffusers loads no shards without one); the message names the folder as the caller says it, the weight
    files held (not config.json, nor other files) and the caller's advice."""
    from diffusers_stages.models.loading import refuse_without_plain_safetensors

    for name in [*files, "config.json", "README.md"]:
        (tmp_path / name).write_text("")
    if not refused:
        refuse_without_plain_safetensors(tmp_path, "its unet/", "save a copy.")
        return
    with pytest.raises(ValueError) as error:
        refuse_without_plain_safetensors(tmp_path, "its unet/", "save a copy.")
    assert str(error.value) == (
        "its unet/ holds no plain safetensors weights (one of ['diffusion_pytorch_model.safetensors', "
        "'diffusion_pytorch_model.safetensors.index.json', 'model.safetensors', 'model.safetensors.index.json']), "
        f"only {sorted(files)}: save a copy."
    )


def test_refuse_without_plain_safetensors_names_a_folder_that_is_not_there(tmp_path):
    from diffusers_stages.models.loading import refuse_without_plain_safetensors

    with pytest.raises(ValueError, match=r"^its unet/expert_2/ holds no plain safetensors weights .*, only \[\]: do"):
        refuse_without_plain_safetensors(tmp_path / "unet" / "expert_2", "its unet/expert_2/", "do.")


def test_the_reexport_file_never_tells_to_install_the_package_from_a_package_index(tmp_path):
    # the file every saved (and pushed) folder carries said "needs `pip install diffusers-stages`": the package is not
    # on a package index (the model card says to install it from its repository), so that command installs whatever
    # a stranger publishes under the name
    model = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,))
    model.save_pretrained(tmp_path)
    code = [name for name in os.listdir(tmp_path) if name.endswith(".py")]
    assert code
    for name in code:
        with open(tmp_path / name, encoding="utf-8") as f:
            text = f.read()
        assert "pip install diffusers-stages" not in text and "not on a package index" in text


def test_a_pipeline_folder_names_the_subfolder_to_load_the_model_from(saved_model, tmp_path):
    """`MultiStageUNet2DModel.from_pretrained("my-multistage")` (the quick start's pipeline folder, a natural first
    try) was diffusers' "no file named config.json", which does not say to pass `subfolder="unet"`."""
    from diffusers import DDPMScheduler

    from diffusers_stages import MultiStagePipeline

    _, model = saved_model
    MultiStagePipeline(unet=model, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="is a pipeline folder") as error:
        MultiStageUNet2DModel.from_pretrained(tmp_path / "pipe")
    assert f"MultiStageUNet2DModel.from_pretrained({str(tmp_path / 'pipe')!r}, subfolder='unet')" in str(error.value)
    assert isinstance(error.value, OSError)  # what diffusers raised there: code that catches it keeps working
    assert MultiStageUNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet").num_stages == 2


@pytest.mark.parametrize("edit", ["other sizes", "no config.json"])
def test_a_transformers_model_whose_config_does_not_fit_its_weights_is_the_named_error(tiny_tokenizer, tmp_path, edit):
    # transformers 5 raises a bare RuntimeError ("You set `ignore_mismatched_sizes` to `False` ... look at the above
    # report") for weights of other shapes than the config's, and builds its default config for a folder without
    # config.json: a text encoder so saved was that traceback, naming no folder, once a run had made its output folder
    from transformers import CLIPTextModel

    from diffusers_stages.models.loading import load_strictly
    from tests.conftest import tiny_text_encoder

    tiny_text_encoder(tiny_tokenizer, 0).save_pretrained(tmp_path / "text_encoder")
    config_path = tmp_path / "text_encoder" / "config.json"
    if edit == "no config.json":
        config_path.unlink()
        match = r"text_encoder holds no config\.json"
    else:
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "intermediate_size": 40}))
        match = r"The checkpoint at .*text_encoder does not match its config for CLIPTextModel"
    with pytest.raises(ValueError, match=match):
        load_strictly(CLIPTextModel, str(tmp_path), "text_encoder")
