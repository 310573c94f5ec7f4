"""Training images for planning: any size and mode in, ``(N, C, R, R)`` in ``[-1, 1]`` out."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_stages.planning import load_images
from diffusers_stages.planning.data import image_to_tensor


def test_a_folder_of_mixed_sizes_and_modes_loads_as_one_batch(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8), "L").save(tmp_path / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 30, 3), dtype=np.uint8), "RGB").save(tmp_path / "rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8), "L").convert("P").save(tmp_path / "palette.gif")
    (tmp_path / "notes.txt").write_text("skipped: not an image extension\n")
    for channels in (1, 3):
        images = load_images(str(tmp_path), resolution=8, num_channels=channels)
        assert images.shape == (4, channels, 8, 8) and images.min() >= -1 and images.max() <= 1


def test_sixteen_bit_images_keep_their_grey_levels(tmp_path):
    Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)).save(tmp_path / "sixteen.png")
    image = Image.open(tmp_path / "sixteen.png")
    assert image.mode == "I;16"
    expected = 30000 / 65535 * 2 - 1  # -0.08, not the 1.0 (white) of a clipped conversion
    assert torch.allclose(image_to_tensor(image, 4, 1), torch.tensor(expected), atol=1 / 255)
    assert torch.allclose(image_to_tensor(image, 4, 3), torch.tensor(expected), atol=1 / 255)


def test_a_floating_point_image_is_refused_by_name(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "fine.png")
    with pytest.raises(ValueError, match="`train_data_dir` holds a floating-point image \\(mode 'F'\\).*float.tif"):
        load_images(str(tmp_path), resolution=4, num_channels=1)


def test_a_32_bit_image_past_255_is_refused_by_name_and_one_within_is_read(tmp_path):
    # Pillow's conversion to grey clips mode 'I' at 255: 16-bit levels in a 32-bit TIFF were read as all white
    Image.fromarray(np.full((4, 4), 30000, dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match="`train_data_dir` holds a 32-bit integer image .* up to 30000.*wide.tif"):
        load_images(str(tmp_path), resolution=4, num_channels=1)
    Image.fromarray(np.full((4, 4), 51, dtype=np.int32)).save(tmp_path / "wide.tif")  # 8-bit levels: read as they are
    assert torch.allclose(load_images(str(tmp_path), resolution=4, num_channels=1), torch.tensor(51 / 127.5 - 1))


def test_links_out_of_the_folder_are_refused_and_links_inside_it_are_read(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir(), outside.mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(data / "a.png")
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(outside / "private.png")
    (data / "b.png").symlink_to(data / "a.png")  # a link inside the folder: read
    assert load_images(str(data), resolution=4, num_channels=1).shape == (2, 1, 4, 4)
    (data / "private.png").symlink_to(outside / "private.png")  # a link out of it: refused, named
    with pytest.raises(ValueError, match="`train_data_dir` holds a link to a file or folder outside it") as e:
        load_images(str(data), resolution=4, num_channels=1)
    assert repr(str(data / "private.png")) in str(e.value) and repr(str(outside / "private.png")) in str(e.value)


def test_an_image_with_an_exif_orientation_is_read_upright_as_datasets_reads_it(tmp_path):
    # a phone photo is stored sideways with an EXIF orientation tag: `datasets` (diffusers' training scripts, and
    # `--dataset` here) turns it upright, the image folder read it sideways, so the same photos gave other data
    pixels = np.zeros((8, 16), dtype=np.uint8)
    pixels[:, :8] = 255  # the left half white: wide, so a quarter turn changes what the square crop holds
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    upright = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270)  # what a viewer (and datasets) shows
    loaded = load_images(train_data_dir=str(tmp_path), resolution=8, num_channels=1)
    torch.testing.assert_close(loaded[0], image_to_tensor(upright, 8, 1))  # photo.png sorts first
    torch.testing.assert_close(loaded[1], image_to_tensor(Image.fromarray(pixels), 8, 1))


@pytest.mark.parametrize("column", ["label", "caption"])
def test_a_dataset_column_that_holds_no_images_is_refused_by_name(tmp_path, column):
    # `--image_column label` (or a caption column) raised Pillow's TypeError 'Cannot handle this data type', a
    # traceback that named neither the column nor the row; the training scripts read rows by the same check
    datasets = pytest.importorskip("datasets")
    from diffusers_stages.training.data import dataset_image

    images = [Image.fromarray(np.full((4, 4), 10 * i, dtype=np.uint8)) for i in range(3)]
    rows = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2], "caption": ["a", "b", "c"]})
    rows.save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"`dataset` row 0 holds no image in its image column: (int 0|str 'a')"):
        load_images(dataset=str(tmp_path / "saved"), image_column=column, resolution=4, num_channels=1)
    with pytest.raises(ValueError, match=r"`--dataset_name` row 1 holds no image"):
        dataset_image(rows, column, 1)
    assert load_images(dataset=str(tmp_path / "saved"), resolution=4, num_channels=1).shape == (3, 1, 4, 4)


def test_a_split_of_a_saved_dataset_without_splits_is_refused_by_name(tmp_path):
    # `split="test"` on a `save_to_disk` Dataset (no splits) loaded all its rows without a word; the default "train"
    # keeps reading all of them, as the training scripts train on them
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.full((4, 4), 10 * i, dtype=np.uint8)) for i in range(3)]
    datasets.Dataset.from_dict({"image": images}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match="`split` 'test' is not in the dataset: it is one `save_to_disk` Dataset"):
        load_images(dataset=str(tmp_path / "saved"), split="test", resolution=4, num_channels=1)
    assert load_images(dataset=str(tmp_path / "saved"), resolution=4, num_channels=1).shape == (3, 1, 4, 4)
    # a split `datasets.load_dataset` selects (an image folder's test/ folder) is still read
    (tmp_path / "folder" / "test").mkdir(parents=True)
    for i, image in enumerate(images[:2]):
        image.save(tmp_path / "folder" / "test" / f"{i}.png")
    loaded = load_images(dataset=str(tmp_path / "folder"), split="test", resolution=4, num_channels=1)
    assert loaded.shape == (2, 1, 4, 4)


def test_a_dataset_is_loaded_without_running_its_loading_script(monkeypatch):
    # (as the training scripts: `datasets` < 2.20 ran a dataset's loading script unless told not to)
    datasets = pytest.importorskip("datasets")
    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", record)
    with pytest.raises((ValueError, ConnectionError)):
        load_images(dataset="me/cats")
    assert calls and all(call.get("trust_remote_code") is False for call in calls)
