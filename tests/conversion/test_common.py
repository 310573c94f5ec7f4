"""All-or-nothing output folders (also across a kill) and strict key checks shared by the conversion scripts."""

import argparse
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_stages import MultiStagePipeline
from diffusers_stages.conversion import common, multistage_to_unet, unet_to_multistage
from diffusers_stages.conversion.common import check_keys, load_state_dict, load_strict, recover_output, staged_output
from tests.conftest import TINY_UNET

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instrumented_convert.py")


def test_staged_output_moves_the_folder_into_place_on_success(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as tmp:
        (open(os.path.join(tmp, "weights.safetensors"), "w")).close()
    assert os.listdir(out) == ["weights.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left


def test_staged_output_refuses_an_existing_folder_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="already exists.*--overwrite"), staged_output(tmp_path / "out"):
        pass


def test_an_output_path_that_is_a_file_is_refused_even_with_overwrite(tmp_path):
    """`--output_path weights.safetensors --overwrite` deleted the file and put the converted folder in its place
    (diffusers' `save_pretrained` refuses a file path); --overwrite replaces a previous output folder only."""
    (tmp_path / "weights.safetensors").write_text("not a folder")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"`--output_path` .*weights.safetensors exists and is not a folder"):
            with staged_output(tmp_path / "weights.safetensors", overwrite=overwrite):
                pass
        assert (tmp_path / "weights.safetensors").read_text() == "not a folder"
        assert sorted(os.listdir(tmp_path)) == ["weights.safetensors"]


def test_failed_overwrite_keeps_the_old_folder_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous conversion")
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "half.txt"), "w").close()
        raise RuntimeError("conversion failed half way")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["old.txt"]
    with staged_output(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert os.listdir(out) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def _hidden(folder) -> list[str]:
    """The hidden temporary folders beside the outputs in ``folder``, by kind (``partial``, ``old``)."""
    return sorted(name.rsplit("-", 1)[0].rsplit(".", 1)[1] for name in os.listdir(folder) if name.startswith("."))


def test_a_kill_between_the_renames_of_overwrite_is_undone_by_the_next_load(ddpm_folder, tmp_path, capsys):
    out = str(tmp_path / "staged")
    unet_to_multistage.main(
        unet_to_multistage.parse_args(["--source", ddpm_folder, "--output_path", out, "--stage_boundaries", "500"])
    )
    command = [RUNNER, "--kill-after-retire", "unet_to_multistage", "--source", ddpm_folder, "--output_path", out,
               "--overwrite", "--stage_boundaries", "300", "600"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *command], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == -9, result.stderr[-2000:]
    # killed with the previous output moved aside and the new one complete but hidden: no `staged` folder
    assert not os.path.exists(out) and _hidden(tmp_path) == ["old", "partial"]
    # the next script that reads it puts the previous output back and deletes the rest
    multistage_to_unet.main(
        multistage_to_unet.parse_args(["--source", out, "--stage", "0", "--output_path", str(tmp_path / "stage0")])
    )
    assert f"restored {out}: a conversion was killed while replacing it" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["ddpm", "stage0", "staged"]
    assert MultiStagePipeline.from_pretrained(out).partition.boundaries == (500.0,)


def test_the_next_run_restores_an_interrupted_overwrite_and_removes_leftovers(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous conversion")
    retire = common._retire

    def retire_then_fail(output_path, locks):
        retire(output_path, locks)
        raise KeyboardInterrupt  # stops where a kill would: the new folder is not renamed, nothing is cleaned

    monkeypatch.setattr(common, "_retire", retire_then_fail)
    with pytest.raises(KeyboardInterrupt), staged_output(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").close()
    monkeypatch.undo()
    assert not out.exists() and _hidden(tmp_path) == ["old", "partial"]
    with pytest.raises(ValueError, match="already exists"), staged_output(out):
        pass  # the previous output is back (and protected) before the check
    assert os.listdir(out) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    with staged_output(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert os.listdir(out) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_recovery_leaves_the_folders_of_a_running_conversion_alone(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.partial-killed_0").mkdir()  # a killed run's (unlocked)
    (tmp_path / ".outer.partial-12345678").mkdir()  # another output's
    with staged_output(out) as tmp:
        recover_output(out)  # e.g. a second conversion started meanwhile
        assert os.path.isdir(tmp) and not (tmp_path / ".out.partial-killed_0").exists()
        open(os.path.join(tmp, "weights.safetensors"), "w").close()
    assert os.listdir(out) == ["weights.safetensors"]
    assert sorted(os.listdir(tmp_path)) == [".outer.partial-12345678", "out"]


def test_check_keys_names_missing_and_unexpected_keys():
    with pytest.raises(ValueError, match=r"1 missing \(first: \['b'\]\), 1 unexpected \(first: \['c'\]\)"):
        check_keys({"a", "b"}, {"a", "c"}, "source")
    check_keys({"a"}, {"a"}, "source")


def test_only_safetensors_checkpoints_are_read(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"pickle")
    with pytest.raises(ValueError, match="must be an existing .safetensors file"):
        load_state_dict(str(path))


class _Payload:
    """Creates the file ``marker`` if unpickled: what a hostile checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["renamed-pickle", "truncated"])
def test_a_checkpoint_that_is_not_safetensors_inside_is_named_and_never_unpickled(tmp_path, kind):
    # a Lightning .ckpt renamed to .safetensors, or a cut-off download: safetensors' SafetensorError ("header too
    # large") came out as a traceback instead of the scripts' one-line error saying what to do
    path, marker = tmp_path / "last.safetensors", tmp_path / "ran"
    if kind == "renamed-pickle":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(str(marker))}, path)
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(64)}, str(path))
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"`--checkpoint` .*last.safetensors is not a safetensors file .*Export"):
        load_state_dict(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("text", ["[1]", "{not json"], ids=["list", "not-json"])
def test_load_strict_names_a_config_that_is_not_a_json_object(tmp_path, text):
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json"):
        load_strict(UNet2DModel, str(tmp_path / "unet"))


@pytest.mark.parametrize("kind", ["bin", "variant"])
def test_a_source_without_plain_safetensors_weights_says_what_it_holds_and_is_never_unpickled(tmp_path, kind):
    """A `.bin`-only or `variant="fp16"`-only U-Net folder failed with diffusers' "no file named
    diffusion_pytorch_model.safetensors found" (after a stray "An error occurred while trying to fetch" line): the
    error now names the weight files the folder holds and how to get plain safetensors; a pickle is never opened."""
    source, marker = tmp_path / "unet", tmp_path / "ran"
    unet = UNet2DModel(**TINY_UNET)
    if kind == "bin":
        unet.save_pretrained(source, safe_serialization=False)
        torch.save({"payload": _Payload(str(marker))}, source / "diffusion_pytorch_model.bin")
        held = "diffusion_pytorch_model.bin"
    else:
        unet.save_pretrained(source, variant="fp16")
        held = "diffusion_pytorch_model.fp16.safetensors"
    with pytest.raises(ValueError, match=rf"holds no plain safetensors weights.*only \['{held}'\].*save_pretrained"):
        unet_to_multistage.main(
            unet_to_multistage.parse_args(
                ["--source", str(source), "--output_path", str(tmp_path / "out"), "--stage_boundaries", "500"]
            )
        )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_shards_without_their_index_are_refused_naming_them_as_the_training_refuses_them(tmp_path):
    """The conversions' check took ``diffusion_pytorch_model-00001-of-00002.safetensors`` for plain weights even
    without its index, which diffusers needs to load shards: its "no file named diffusion_pytorch_model.safetensors"
    came later, from inside the loading. The conversions now refuse such a folder up front, with the file set the
    text-to-image training refuses (one check, `refuse_without_plain_safetensors`), naming the shards held."""
    source = tmp_path / "unet"
    UNet2DModel(**TINY_UNET).save_pretrained(source, max_shard_size="10KB")
    (source / "diffusion_pytorch_model.safetensors.index.json").unlink()
    shards = sorted(name for name in os.listdir(source) if name.endswith(".safetensors"))
    assert len(shards) > 1 and all("-of-" in name for name in shards)
    with pytest.raises(
        ValueError, match=rf"holds no plain safetensors weights.*only \['{shards[0]}'.*save_pretrained"
    ):
        unet_to_multistage.main(
            unet_to_multistage.parse_args(
                ["--source", str(source), "--output_path", str(tmp_path / "out"), "--stage_boundaries", "500"]
            )
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_output_that_is_or_holds_an_input_is_refused_even_with_overwrite(tmp_path, where):
    source = tmp_path / "source"
    source.mkdir()
    (source / "weights.safetensors").write_bytes(b"original")
    out = {"same": source, "inside": source / "out", "around": tmp_path}[where]
    args = argparse.Namespace(output_path=str(out), overwrite=True, checkpoint=str(source / "weights.safetensors"))
    args.source = str(source)
    with pytest.raises(ValueError, match=r"`--output_path` .* `--source`"):
        with staged_output(args.output_path, args.overwrite, common.input_paths(args)):
            pass
    assert (source / "weights.safetensors").read_bytes() == b"original"


def test_a_conversion_into_its_own_source_is_refused(ddpm_folder):
    before = sorted(os.listdir(ddpm_folder))
    args = ["--source", ddpm_folder, "--output_path", ddpm_folder, "--stage_boundaries", "500", "--overwrite"]
    with pytest.raises(ValueError, match="`--output_path`.*`--source`"):
        unet_to_multistage.main(unet_to_multistage.parse_args(args))
    assert sorted(os.listdir(ddpm_folder)) == before and "unet" in before


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_load_converted_refuses_weights_that_are_not_real_floats(dtype):
    model = torch.nn.Linear(2, 2)
    converted = {"weight": torch.ones(2, 2).to(dtype), "bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"weight.*torch\.(int64|bool|complex64)"):
        common.load_converted(model, converted, "source.safetensors")
    common.load_converted(model, {"weight": torch.ones(2, 2, dtype=torch.float16), "bias": torch.zeros(2)}, "fp16")
    assert model.weight.dtype == torch.float32 and torch.equal(model.weight, torch.ones(2, 2))


def test_an_empty_output_path_is_a_usage_error(tmp_path, capsys):
    # `--output_path ""` (an unset shell variable) was the current directory: with --overwrite, replaced wholesale
    argv = ["--source", str(tmp_path), "--stage", "0", "--output_path", "", "--overwrite"]
    with pytest.raises(SystemExit):
        multistage_to_unet.parse_args(argv)
    assert "argument --output_path: must name a folder, got ''" in capsys.readouterr().err


def test_verify_fails_on_a_nan_the_source_does_not_have():
    """A converted model giving NaN where its source does not was a NaN difference, which `max` skipped unless it
    came first: --verify passed. It fails now; NaN (or inf) at the same place in both agree."""
    from diffusers_stages.conversion.common import max_difference, report_verification

    source = torch.tensor([1.0, 2.0, math.inf])
    converted = torch.tensor([1.0, math.nan, math.inf])
    assert max_difference(source, converted) == math.inf
    assert max_difference(converted, converted) == 0.0  # a source that gives NaN itself: the same NaN agrees
    with pytest.raises(ValueError, match="--verify failed: largest difference inf exceeds --tolerance 0.0001"):
        report_verification({"denoiser": 0.0, "samples": max_difference(source, converted)}, 1e-4)
    with pytest.raises(ValueError, match="--verify failed: largest difference nan exceeds --tolerance 0.0001"):
        report_verification({"denoiser": 0.0, "samples": math.nan}, 1e-4)


def test_an_output_path_under_a_file_is_a_value_error_naming_it(tmp_path):
    """`--output_path file/out` was a FileExistsError traceback from `os.makedirs`; it is refused by name now."""
    (tmp_path / "notes.txt").write_text("not a folder")
    out = tmp_path / "notes.txt" / "out"
    message = r"`--output_path` .*notes\.txt/out cannot be created: .*notes\.txt is not a writable folder"
    with pytest.raises(ValueError, match=message), staged_output(out):
        pass
    assert (tmp_path / "notes.txt").read_text() == "not a folder"


def test_a_failed_conversion_leaves_no_folder_it_created_above_the_output(tmp_path):
    """`--output_path new/deeper/out` created `new/deeper` before converting and left it behind on a failure."""
    with pytest.raises(RuntimeError), staged_output(tmp_path / "new" / "deeper" / "out"):
        raise RuntimeError("conversion failed")
    assert os.listdir(tmp_path) == []
    with staged_output(tmp_path / "new" / "deeper" / "out") as tmp:
        open(os.path.join(tmp, "weights.safetensors"), "w").close()
    assert os.listdir(tmp_path / "new" / "deeper" / "out") == ["weights.safetensors"]


def test_an_output_path_in_a_folder_that_cannot_be_written_is_a_value_error_naming_it(tmp_path, monkeypatch):
    """An --output_path in a read-only folder was a PermissionError traceback from creating the temporary folder."""
    (tmp_path / "read-only").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: path != str(tmp_path / "read-only") and real_access(path, mode)
    )
    message = r"`--output_path` .*read-only/new/out cannot be created: .*read-only is not a writable folder"
    with pytest.raises(ValueError, match=message), staged_output(tmp_path / "read-only" / "new" / "out"):
        pass
    assert os.listdir(tmp_path / "read-only") == []


@pytest.mark.parametrize("name", ["original_multistage", "original_multistage_edm", "original_multistage_ncsnpp"])
def test_an_original_repo_that_is_not_a_folder_is_a_usage_error(tmp_path, capsys, name):
    """A mistyped `--original_repo` was only found after the whole conversion (at the end of `--verify`, a minute
    and 11 GB in at full size); it is a usage error now, before any work."""
    script = importlib.import_module(f"diffusers_stages.conversion.{name}")
    missing = str(tmp_path / "latent-diffusion")
    argv = ["--checkpoint", "c.safetensors", "--original_config", "c", "--output_path", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        script.parse_args([*argv, "--verify", "--original_repo", missing])
    assert f"argument --original_repo: must be a folder, got {missing!r}" in capsys.readouterr().err
    assert script.parse_args([*argv, "--original_repo", str(tmp_path)]).original_repo == str(tmp_path)


def test_a_folder_of_model_folders_names_them(tmp_path):
    """A one-backbone run (`train_dual_backbone.py --backbones shallow`: `shallow/` and `scheduler/`, no
    model_index.json) given as `--source` said only "no file named config.json"; the error names the model folders
    inside it to give instead."""
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path / "run" / "shallow")
    with pytest.raises(ValueError, match="no file named config.json") as error:
        load_strict(UNet2DModel, str(tmp_path / "run"))
    assert f"It holds model folders: give one of them ({tmp_path / 'run' / 'shallow'})." in str(error.value)
