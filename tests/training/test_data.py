"""Training data: folders and labels, deterministic per-(seed, epoch, index) augmentation, the epoch sampler."""

import os
import pathlib
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_stages.training.data import EpochShuffleSampler, TrainingImages, image_folder_records, preprocess_image


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        os.makedirs(tmp_path / label)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    return str(tmp_path)


def test_class_labels_from_sub_folders(folder):
    records = image_folder_records(folder, class_conditional=True)
    assert records.class_names == ["cat", "dog"] and records.labels == [0, 0, 0, 1, 1, 1]
    assert image_folder_records(folder, class_conditional=False).labels is None


def test_folder_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="must be an existing folder"):
        image_folder_records(str(tmp_path / "missing"), False)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no images"):
        image_folder_records(str(tmp_path / "empty"), False)
    with pytest.raises(ValueError, match="at least 2 sub-folders"):
        image_folder_records(os.path.join(folder, "cat"), True)


def test_class_conditional_refuses_images_outside_the_class_folders(folder):
    # were skipped in silence (neither decoded nor trained on), against "nothing is skipped silently"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(os.path.join(folder, "stray.png"))
    stray = os.path.join(folder, "stray.png")
    with pytest.raises(
        ValueError, match=f"`--class_conditional`.*in no class sub-folder: \\[{re.escape(repr(stray))}\\]"
    ):
        image_folder_records(folder, class_conditional=True)
    assert len(image_folder_records(folder, class_conditional=False)) == 7


def test_hidden_folders_and_files_are_skipped_with_a_warning_naming_them(folder, caplog):
    # Jupyter's checkpoint copies became a class (and, unconditionally, duplicate training images)
    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    for hidden in (".ipynb_checkpoints", os.path.join("cat", ".ipynb_checkpoints")):
        os.makedirs(os.path.join(folder, hidden))
        image.save(os.path.join(folder, hidden, "0-checkpoint.png"))
    image.save(os.path.join(folder, "dog", ".hidden.png"))
    image.save(os.path.join(folder, ".stray.png"))  # hidden: skipped, not an image outside the classes
    with caplog.at_level("WARNING"):
        records = image_folder_records(folder, class_conditional=True)
    assert records.class_names == ["cat", "dog"] and records.labels == [0, 0, 0, 1, 1, 1]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for skipped in (".ipynb_checkpoints", os.path.join("cat", ".ipynb_checkpoints"), ".stray.png"):
        assert repr(os.path.join(folder, skipped)) in warned
    assert repr(os.path.join(folder, "dog", ".hidden.png")) in warned
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert len(image_folder_records(folder, class_conditional=False)) == 6
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "skipped" in warned and repr(os.path.join(folder, ".ipynb_checkpoints")) in warned


def test_resize_and_crop():
    image = Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8))
    pixels = preprocess_image(image, 8, center_crop=True, rng=None)
    assert pixels.shape == (3, 8, 8) and pixels.min() == -1.0


@pytest.mark.parametrize(
    ("size", "resized", "left"),
    [
        ((20, 18), (17, 16), 0),  # 16 * 20 / 18 = 17.8: torchvision truncates it to 17 (was rounded to 18)
        ((19, 16), (19, 16), 2),  # (19 - 16) / 2 = 1.5: torchvision's centre crop rounds it to 2 (was 1)
        ((23, 16), (23, 16), 4),  # 3.5 rounds to 4 (was 3)
        ((33, 50), (16, 24), 0),  # the taller side: 24.2 truncated to 24
    ],
)
def test_resize_and_centre_crop_are_torchvisions(size, resized, left):
    # diffusers' scripts resize with `transforms.Resize(resolution)` (the shorter side to it, the longer side
    # int(resolution * long / short)) and centre crop with `transforms.CenterCrop` (offsets int(round(diff / 2))): the
    # images were resized and cropped a pixel off theirs. A 16-pixel resolution; a random image of `size` (w, h)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    expected = image if resized == size else image.resize(resized, Image.Resampling.BILINEAR)
    top = int(round((resized[1] - 16) / 2))
    expected = np.asarray(expected.crop((left, top, left + 16, top + 16)), dtype=np.float32) / 127.5 - 1.0
    pixels = preprocess_image(image, 16, center_crop=True, rng=None)
    assert torch.equal(pixels, torch.from_numpy(expected).permute(2, 0, 1))


def test_augmentation_is_a_function_of_seed_epoch_and_index(folder):
    dataset = TrainingImages(image_folder_records(folder, False), 8, center_crop=False, random_flip=True, seed=3)
    first = [dataset[k]["pixel_values"] for k in range(12)]  # two epochs of 6 images
    assert all(torch.equal(a, dataset[k]["pixel_values"]) for k, a in enumerate(first))
    assert any(not torch.equal(first[k], first[k + 6]) for k in range(6))  # other crops/flips in epoch 1


def test_the_dataset_pickles_for_spawned_workers(folder):
    # `--dataloader_num_workers` > 0 where workers are spawned (macOS, Windows) pickles the dataset: its image loader
    # was a lambda ("Can't pickle local object")
    dataset = TrainingImages(image_folder_records(folder, True), 8, center_crop=False, random_flip=True, seed=3)
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[10]["pixel_values"], dataset[10]["pixel_values"]) and copy[10]["labels"] == 1  # epoch 1


def test_epoch_sampler():
    sampler = EpochShuffleSampler(5, seed=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == [0, 1, 2, 3, 4] and sorted(epoch1) == [5, 6, 7, 8, 9]
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


def _break(path: str, kind: str) -> str:
    """Make ``path`` a truncated PNG (the first half of a real one) or a text file named like an image."""
    file = pathlib.Path(path)
    if kind == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        file.write_text("not an image\n")
    return path


@pytest.mark.parametrize(
    "kind, cause", [("truncated", "OSError: image file is truncated"), ("text", "cannot identify")]
)
def test_a_bad_image_file_is_named_before_training(folder, kind, cause):
    bad = _break(os.path.join(folder, "dog", "1.png"), kind)
    for class_conditional in (False, True):
        with pytest.raises(
            ValueError, match=f"`--train_data_dir` holds a file that is not a readable image: .*{cause}"
        ):
            image_folder_records(folder, class_conditional)
        with pytest.raises(ValueError) as error:
            image_folder_records(folder, class_conditional)
        assert repr(bad) in str(error.value)


def test_a_training_run_stops_on_a_bad_image_file_before_it_starts(folder, tmp_path_factory):
    from tests.examples.conftest import TINY, load_script

    bad = _break(os.path.join(folder, "cat", "2.png"), "text")
    script, out = load_script("multistage"), tmp_path_factory.mktemp("outputs") / "run"  # outside the data folder
    with pytest.raises(ValueError) as error:
        script.main(script.parse_args([*TINY, "--train_data_dir", folder, "--output_dir", str(out)]))
    assert f"not a readable image: {bad!r}" in str(error.value)
    assert not out.exists()


def test_an_unreachable_dataset_is_one_line_naming_the_argument(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from diffusers_stages.training.data import hf_dataset_records

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'me/cats' on the Hub (LocalEntryNotFoundError)\\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError) as error:
        hf_dataset_records("me/cats", class_conditional=False)
    message = str(error.value)
    assert message.startswith("`--dataset_name` 'me/cats' could not be loaded (ConnectionError: Couldn't reach")
    assert "\n" not in message and "--train_data_dir" in message and error.value.__cause__ is None


def test_a_dataset_is_loaded_without_running_its_loading_script(monkeypatch):
    # `datasets` 2.16 to 2.19 (the floor the test extra allows) ran a dataset's loading script (a `<name>.py` in its
    # folder or Hub repository) unless told `trust_remote_code=False`: a data folder would run code of its own
    datasets = pytest.importorskip("datasets")
    from diffusers_stages.training.data import hf_dataset_records

    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", record)
    with pytest.raises(ValueError):
        hf_dataset_records("me/cats", class_conditional=False)
    assert calls and all(call.get("trust_remote_code") is False for call in calls)


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_save_to_disk_folder_is_a_dataset(tmp_path, as_dict):
    # was refused ("saved using `save_to_disk`. Please use `load_from_disk`"), though the plan command reads it
    datasets = pytest.importorskip("datasets")
    from diffusers_stages.training.data import hf_dataset_records

    images = [Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)) for i in range(4)]
    dataset = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]})
    (datasets.DatasetDict(train=dataset) if as_dict else dataset).save_to_disk(str(tmp_path / "ds"))
    records = hf_dataset_records(str(tmp_path / "ds"), class_conditional=True)
    assert len(records) == 4 and records.labels == [0, 1, 0, 1]
    assert np.asarray(records.load(3))[0, 0, 0] == 90
    assert np.asarray(pickle.loads(pickle.dumps(records)).load(3))[0, 0, 0] == 90  # for spawned workers


def test_16_bit_grey_images_keep_their_grey_levels(tmp_path):
    # was white: Pillow's conversion of a 16-bit image to RGB clips every level above 255
    levels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    records = image_folder_records(str(tmp_path), class_conditional=False)
    assert records.load(0).mode.startswith("I;16")
    pixels = TrainingImages(records, 8, center_crop=True, random_flip=False, seed=0)[0]["pixel_values"]
    expected = torch.from_numpy(np.round(levels / 257.0).astype(np.float32) / 127.5 - 1.0)
    assert pixels.shape == (3, 8, 8) and all(torch.equal(channel, expected) for channel in pixels)


def test_links_out_of_the_folder_are_refused_and_links_inside_it_are_read(folder, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(outside / "private.png")
    os.symlink(os.path.join(folder, "cat", "0.png"), os.path.join(folder, "dog", "cat0.png"))  # inside: read
    assert len(image_folder_records(folder, class_conditional=False)) == 7
    os.symlink(folder, outside / "data")  # the data folder itself given through a link
    assert len(image_folder_records(str(outside / "data"), class_conditional=True)) == 7
    for link, target in (("dog/private.png", outside / "private.png"), ("dog/more", outside), ("bird", outside)):
        os.symlink(target, os.path.join(folder, link))
        for class_conditional in (False, True):
            with pytest.raises(
                ValueError, match="`--train_data_dir` holds a link to a file or folder outside it"
            ) as e:
                image_folder_records(folder, class_conditional)
            assert repr(os.path.join(folder, link)) in str(e.value) and repr(str(target)) in str(e.value)
        os.remove(os.path.join(folder, link))


@pytest.mark.parametrize(
    "labels, names, shown",
    [
        ([0, -1, 1], None, "[-1]"),  # "unlabelled" marker of some datasets: was an index error in the first step
        ([0, -1, 1], ["cat", "dog"], "[-1]"),  # a ClassLabel's "no label": the same
        (["cat", "dog", "cat"], None, "['cat', 'dog']"),  # strings: was int()'s bare ValueError
        ([0.0, 1.5, 1.0], None, "[1.5]"),  # was truncated to 1 in silence
    ],
)
def test_dataset_labels_must_be_class_indices(monkeypatch, labels, names, shown):
    datasets = pytest.importorskip("datasets")
    from diffusers_stages.training import data

    features = {"label": datasets.ClassLabel(names=names)} if names else {}
    table = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (4, 4))] * 3, "label": labels},
        features=datasets.Features({"image": datasets.Image(), **(features or {"label": datasets.Value(
            {str: "string", float: "float64", int: "int64"}[type(labels[1])])})}),
    )  # fmt: skip
    monkeypatch.setattr(data, "load_train_split", lambda *args, **kwargs: table)
    with pytest.raises(ValueError, match=r"`--label_column` 'label' must hold class indices 0, 1, \.\.\. .*got .*"):
        data.hf_dataset_records("me/pets", class_conditional=True)
    with pytest.raises(ValueError) as error:
        data.hf_dataset_records("me/pets", class_conditional=True)
    assert shown in str(error.value)


def test_a_dataset_of_float_images_is_refused_by_name(tmp_path):
    # the plan command refused them (check_image_mode); training converted a float image to clipped RGB, silently
    datasets = pytest.importorskip("datasets")
    from diffusers_stages.training.data import hf_dataset_records

    images = [Image.fromarray(np.full((8, 8), 300.0 * i, dtype=np.float32)) for i in range(2)]
    datasets.Dataset.from_dict({"image": images}).save_to_disk(str(tmp_path / "ds"))
    records = hf_dataset_records(str(tmp_path / "ds"), class_conditional=False)
    with pytest.raises(ValueError, match="`--dataset_name` holds a floating-point image \\(mode 'F'\\).*: row 1"):
        records.load(1)


@pytest.mark.parametrize("class_conditional", [False, True])
def test_a_dataset_without_rows_is_refused_by_name(tmp_path, class_conditional):
    # a train split of no rows was read as an empty dataset: the run set up its output folder and networks, then
    # stopped on a ZeroDivisionError (no batches per epoch), or on `max()` of no labels without a ClassLabel
    datasets = pytest.importorskip("datasets")
    from diffusers_stages.training.data import hf_dataset_records

    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    empty = datasets.Dataset.from_dict({"image": [image], "label": [0]}).filter(lambda row: False)
    empty.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="`--dataset_name` '.*ds' has no rows in its train split"):
        hf_dataset_records(str(tmp_path / "ds"), class_conditional=class_conditional)
