"""The frozen VAE of latent training is read as strictly as the package's models (its folder may be a download)."""

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL

from diffusers_stages.training.loop import _load_vae
from diffusers_stages.training.tasks import TrainingTask
from tests.conftest import corrupt_weights

TINY_VAE = dict(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8)
# a task of the package's pipelines, for its latent scaling (`TrainingTask.model_latents`) only
PIPELINE_TASK = TrainingTask.__new__(TrainingTask)


@pytest.mark.parametrize("corruption", [None, "missing", "integers", "link"])
def test_the_vae_loads_strictly(tmp_path, corruption):
    folder = tmp_path / "source" / "vae"
    AutoencoderKL(**TINY_VAE).save_pretrained(folder)
    if corruption is not None:
        key = corrupt_weights(folder / "diffusion_pytorch_model.safetensors", corruption)
    task = SimpleNamespace(vae_path=str(tmp_path / "source"), vae_subfolder="vae")
    if corruption is None:
        assert _load_vae(task, torch.device("cpu"), torch.float32).dtype == torch.float32
        return
    with pytest.raises(ValueError, match="outside" if corruption == "link" else key):
        _load_vae(task, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "statistics", [{"shift_factor": 0.25}, {"latents_mean": [0.1, -0.2], "latents_std": [2.0, 0.5]}]
)
def test_training_latents_are_what_the_pipeline_decodes(statistics):
    """Training samples z = (E(x) - shift) * scale, or (E(x) - latents_mean) * scale / latents_std for a VAE with
    per-channel statistics (diffusers' SDXL convention): the pipeline's decoder input is E(x) again."""
    from diffusers_stages.conventions import model_to_vae_latents
    from diffusers_stages.training.loop import _clean_samples

    torch.manual_seed(0)
    vae = AutoencoderKL(**{**TINY_VAE, "latent_channels": 2, "scaling_factor": 0.5, **statistics}).eval()
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    state = SimpleNamespace(vae=vae, task=PIPELINE_TASK, weight_dtype=torch.float32)
    latents = _clean_samples(state, {"pixel_values": pixels}, torch.Generator().manual_seed(1))
    with torch.no_grad():
        encoded = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
    mean, std = (
        torch.tensor(statistics.get(k, d)).view(1, -1, 1, 1) for k, d in (("latents_mean", 0.25), ("latents_std", 1.0))
    )
    assert torch.allclose(latents, (encoded - mean) * 0.5 / std, atol=1e-6)
    assert torch.allclose(model_to_vae_latents(vae, latents), encoded, atol=1e-6)


def test_a_vae_that_is_not_an_autoencoder_kl_is_refused_by_name_before_training(tmp_path):
    """Training draws from AutoencoderKL's posterior (`latent_dist`): a VQModel or AutoencoderTiny folder was read as
    an AutoencoderKL config and failed only when its weights loaded (a shape error, or a GroupNorm one)."""
    from diffusers import VQModel

    from diffusers_stages.training.loop import vae_shape

    VQModel(**TINY_VAE).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`--vae_path` .* holds a VQModel, not an AutoencoderKL"):
        vae_shape(SimpleNamespace(vae_path=str(tmp_path), vae_subfolder=None))


@pytest.mark.parametrize("force_upcast", [True, False])
def test_under_float16_a_vae_that_asks_for_it_encodes_in_float32(tmp_path, force_upcast):
    """SDXL's VAE overflows in float16 (NaN latents, NaN loss): one whose config has ``force_upcast`` stays in float32
    under fp16 mixed precision, as diffusers' SDXL training script keeps it; the batch is encoded in the VAE's dtype."""
    from diffusers_stages.training.loop import _clean_samples

    AutoencoderKL(**TINY_VAE, force_upcast=force_upcast).save_pretrained(tmp_path)
    task = SimpleNamespace(vae_path=str(tmp_path), vae_subfolder=None)
    vae = _load_vae(task, torch.device("cpu"), torch.float16)
    assert vae.dtype == (torch.float32 if force_upcast else torch.float16)
    state = SimpleNamespace(vae=vae, task=PIPELINE_TASK, weight_dtype=torch.float16)
    latents = _clean_samples(state, {"pixel_values": torch.rand(1, 3, 8, 8)}, torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 8, 8) and latents.dtype == torch.float32


def test_the_vae_a_mixed_precision_run_saves_and_samples_with_stays_on_the_training_device(tmp_path, monkeypatch):
    # the float32 VAE reloaded for the saves of a bf16 run (the training copy is rounded) was left on the CPU, and
    # the final grid decoded the accelerator's latents with it: a device mismatch on a GPU, after the pipeline's save
    import copy

    from diffusers_stages.training import loop
    from tests.fake_cuda import fake_cuda

    stored = AutoencoderKL(**TINY_VAE).eval()  # read from its folder on the CPU (the stand-in cannot load weights)
    monkeypatch.setattr(loop, "load_strictly", lambda *args, **kwargs: copy.deepcopy(stored))
    task = SimpleNamespace(vae_path="vae", vae_subfolder=None)
    with fake_cuda():
        device = torch.device("cuda")
        state = SimpleNamespace(vae=loop._load_vae(task, device, torch.bfloat16), task=task)
        saved = loop._saved_vae(state, on_device=True)
        assert saved.dtype == torch.float32
        # a save during training reads it onto the host: no second VAE on the accelerator
        assert loop._saved_vae(state).device.type == "cpu"
        saved.decode(torch.randn(1, 4, 8, 8, device=device))  # as the final grid decodes the sampled latents


@pytest.mark.parametrize("given", ["vae_path", "source"])
def test_a_vae_whose_weights_do_not_fit_its_config_is_refused_before_the_data_are_read(tmp_path, capsys, given):
    """A VAE folder holding the safetensors of another width was refused by the strict loading only when the loop
    loaded the VAE (`_load_vae`), after the training data were read: its weight headers are read against the
    AutoencoderKL its config builds when the arguments are checked, naming the option it came from and the tensor."""
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline
    from tests.conftest import TINY_UNET, tiny_vae
    from tests.examples.conftest import TINY, TINY_RUN, load_script

    empty = tmp_path / "no-images"  # never read: the arguments are checked first
    empty.mkdir()
    if given == "vae_path":
        script, vae_dir = load_script("multistage"), tmp_path / "vae"
        tiny_vae().save_pretrained(vae_dir)
        argv = [*TINY, "--resolution", "16", "--vae_path", str(vae_dir)]
        option = f"`--vae_path` {str(vae_dir)!r}: its weights"
    else:  # fine-tuning: the source pipeline's own VAE
        script, source = load_script("experts"), tmp_path / "source"
        experts = ExpertRoutingModel([UNet2DModel(**{**TINY_UNET, "in_channels": 4, "out_channels": 4})] * 2,
                                     stage_boundaries=(400,))  # fmt: skip
        ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler(), vae=tiny_vae()).save_pretrained(source)
        vae_dir = source / "vae"
        argv = [*TINY_RUN, "--resolution", "16", "--pretrained_model_name_or_path", str(source),
                "--assignment", "hard"]  # fmt: skip
        option = f"`--pretrained_model_name_or_path` {str(source)!r}: the weights in its vae/"
    config = json.loads((vae_dir / "config.json").read_text())
    wide = tmp_path / "wide"
    AutoencoderKL.from_config({**config, "block_out_channels": [8, 16]}).save_pretrained(wide)
    shutil.copy(wide / "diffusion_pytorch_model.safetensors", vae_dir / "diffusion_pytorch_model.safetensors")
    assert json.loads((vae_dir / "config.json").read_text()) == config  # the config still says [8, 8]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([*argv, "--train_data_dir", str(empty), "--output_dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and option in error
    assert "do not fit its config.json: decoder.conv_in.bias has shape [16] there, [8] in the AutoencoderKL" in error


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", '{"weight_map": {"a": "../elsewhere.safetensors"}}'])
def test_a_malformed_weight_index_of_a_vae_path_is_refused_naming_the_option(tmp_path, capsys, content):
    # the weight headers read when the arguments are checked go through the folder's index: a malformed one is
    # refused there, naming `--vae_path` (as the loader's check, `check_folder_files`, refused it after the data)
    from tests.conftest import tiny_vae
    from tests.examples.conftest import TINY, load_script

    empty, vae_dir = tmp_path / "no-images", tmp_path / "vae"
    empty.mkdir()
    tiny_vae().save_pretrained(vae_dir)
    (vae_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(content)
    with pytest.raises(SystemExit):
        load_script("multistage").parse_args([*TINY, "--resolution", "16", "--vae_path", str(vae_dir),
                                              "--train_data_dir", str(empty), "--output_dir", str(tmp_path / "run")])  # fmt: skip
    error = capsys.readouterr().err
    assert f"`--vae_path` {str(vae_dir)!r}: " in error and "diffusion_pytorch_model.safetensors.index.json" in error


def test_a_vae_config_edited_to_countless_layers_is_named_not_built_for_ever(tmp_path):
    """check_vae_weights built the AutoencoderKL of a config edited to 10**9 layers per block without end before
    reading a weight header; it now stops once far more tensors are made than the files hold."""
    import subprocess
    import sys

    from tests.conftest import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "layers_per_block": 10**9}))
    check = (
        "import sys\nfrom diffusers_stages.training.loop import check_vae_weights\n"
        "try:\n    check_vae_weights(sys.argv[1], None, '`--vae_path`')\nexcept ValueError as error:\n    print(error)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "vae")], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("`--vae_path`") and "more tensors than" in run.stdout, run.stdout


@pytest.mark.parametrize("subfolder", [None, "vae"])
def test_a_vae_config_its_class_cannot_build_is_named_with_the_class_error(tmp_path, subfolder):
    """check_vae_weights names a config value AutoencoderKL cannot take (8 channels in 32 groups) with the class's
    own error, and where the VAE came from (the option, the path, the subfolder)."""
    from diffusers_stages.training.loop import check_vae_weights
    from tests.conftest import tiny_vae

    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "norm_num_groups": 32}))
    path = str(tmp_path) if subfolder else str(folder)
    where = "the weights in its vae/ do not" if subfolder else "its weights do not"
    with pytest.raises(ValueError) as error:
        check_vae_weights(path, subfolder, "`--vae_path`")
    assert str(error.value).startswith(
        f"`--vae_path` {path!r}: {where} load, as its config.json builds no AutoencoderKL: ValueError: "
    ), error.value


@pytest.mark.parametrize(
    "change",
    [{"block_out_channels": 5}, {"latent_channels": None}, {"block_out_channels": [8] * 10**5}],
    ids=["not-a-list", "no-channels", "more-levels-than-blocks"],
)
def test_a_vae_config_whose_latent_shape_cannot_be_read_is_named(tmp_path, change):
    """vae_shape read a VAE config's latent channels and levels unchecked: a TypeError (`len` of an int), a None
    channel count, or a down-sampling factor of 2**99999 (an error about converting an integer of 30103 digits)."""
    from diffusers_stages.training.loop import vae_shape
    from tests.conftest import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=r"`--vae_path` .*(latent_channels|block_out_channels)"):
        vae_shape(SimpleNamespace(vae_path=str(tmp_path / "vae"), vae_subfolder=None))


def test_a_pipeline_folder_given_as_vae_path_names_its_vae_subfolder(tmp_path):
    """`--vae_path PIPELINE_DIR` without `--vae_subfolder vae` (the READMEs' latent runs take both) said only that
    the folder holds no config.json."""
    from diffusers_stages.training.loop import vae_shape

    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="is a pipeline folder: add `--vae_subfolder vae`"):
        vae_shape(SimpleNamespace(vae_path=str(tmp_path), vae_subfolder=None))
    assert vae_shape(SimpleNamespace(vae_path=str(tmp_path), vae_subfolder="vae"))[0] == TINY_VAE["latent_channels"]


@pytest.mark.parametrize(
    "statistics, named",
    [
        ({"latents_mean": [0.1, 0.2], "latents_std": [1.0, 2.0]}, "`latents_mean` must give one number per latent channel (4)"),
        ({"latents_mean": [0.0] * 4, "latents_std": 2.0}, "`latents_std` must give one number per latent channel (4)"),
        ({"latents_mean": [0.0] * 4, "latents_std": [1.0, 0.0, 1.0, 1.0]}, "`latents_std` must be positive"),
        # the latents were multiplied by 0 (training on all-zero latents, silently) or by None (a TypeError at the
        # first step, after every image was read)
        ({"scaling_factor": 0.0}, "`scaling_factor` must be a positive number (the latents are scaled by it), got 0.0"),
        ({"scaling_factor": None}, "`scaling_factor` must be a positive number (the latents are scaled by it), got None"),
        ({"shift_factor": "0.1"}, "`shift_factor` must be a number or null (the latents are shifted by it), got '0.1'"),
    ],
    ids=["too-few", "a-number", "zero-std", "zero-scaling", "null-scaling", "text-shift"],
)  # fmt: skip
def test_latent_statistics_that_do_not_fit_the_latents_are_named(tmp_path, statistics, named):
    """A VAE config whose `latents_mean`/`latents_std` do not give one (positive, for the std) number per latent
    channel passed the checks: training failed at its first step (a broadcasting RuntimeError, or the latents divided
    by zero), after every image was read, and `plan` after encoding them."""
    from diffusers_stages.training.loop import vae_shape

    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, **statistics}))
    with pytest.raises(ValueError, match=re.escape(named)) as error:
        vae_shape(SimpleNamespace(vae_path=str(tmp_path / "vae"), vae_subfolder=None))
    assert f"`--vae_path` {str(tmp_path / 'vae')!r}" in str(error.value)


@pytest.mark.parametrize("vae_entry", [None, [None, None], ["diffusers", "VQModel"]])
def test_a_pipeline_folder_without_an_autoencoderkl_is_not_told_to_add_its_vae_subfolder(tmp_path, vae_entry):
    """`--vae_path` given a pixel-space pipeline folder (e.g. a `train_multistage.py` output, which has no `vae/`)
    was told to "add `--vae_subfolder vae`", which then fails on a folder that does not exist."""
    from diffusers_stages.training.loop import vae_shape

    index = {"_class_name": "MultiStagePipeline"} if vae_entry is None else {"vae": vae_entry}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no AutoencoderKL `vae`") as error:
        vae_shape(SimpleNamespace(vae_path=str(tmp_path), vae_subfolder=None))
    assert "add `--vae_subfolder vae` (its VAE's folder)" not in str(error.value)
