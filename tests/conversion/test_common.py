"""All-or-nothing output folders and strict key checks shared by the conversion scripts."""

import os

import pytest
from diffusers_stages.conversion.common import check_keys, load_state_dict, staged_output


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


def test_check_keys_names_missing_and_unexpected_keys():
    with pytest.raises(ValueError, match=r"1 missing \(first: \['b'\]\), 1 unexpected \(first: \['c'\]\)"):
        check_keys({"a", "b"}, {"a", "c"}, "source")
    check_keys({"a"}, {"a"}, "source")


def test_only_safetensors_checkpoints_are_read(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"pickle")
    with pytest.raises(ValueError, match="must be an existing .safetensors file"):
        load_state_dict(str(path))
