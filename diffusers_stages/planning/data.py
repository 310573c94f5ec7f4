"""Training images for planning: an image folder or a `datasets` dataset, as a ``[-1, 1]`` tensor."""

from __future__ import annotations

import logging
import os
import reprlib
import struct

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..models.checks import check_positive_integers

logger = logging.getLogger(__name__)

ORIENTATION = 0x0112  # the EXIF tag of a photo stored sideways
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def open_image_file(path: str, argument: str = "train_data_dir") -> Image.Image:
    """Open and fully decode one image file, turned upright by its EXIF orientation (as `datasets` does); a file that
    is not a readable image (truncated, or not an image at all, e.g. a text file named ``.png``) is a `ValueError`
    naming the file and ``argument``, the folder's argument."""
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file opens fine and fails only here
        if image.getexif().get(ORIENTATION) is not None:  # upright, as `datasets` (diffusers' scripts) reads it
            image, stored = ImageOps.exif_transpose(image), image
            stored.close()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as error:
        raise ValueError(
            f"`{argument}` holds a file that is not a readable image: {path!r} ({type(error).__name__}: {error}). "
            "Fix or remove it."
        ) from None
    return check_image_mode(image, repr(path), argument)


def check_image_mode(image, where: str, argument: str) -> Image.Image:
    """``image`` (a PIL image, or an array Pillow reads: uint8) if its grey levels can be read (see `eight_bit`); a
    floating-point image, a 32-bit integer one past 255, or a value that is no image (a label or a caption: the wrong
    image column) is a `ValueError` naming ``where`` (a file, a dataset row) and ``argument``."""
    if not isinstance(image, Image.Image):
        try:
            image = Image.fromarray(np.asarray(image))
        except (TypeError, ValueError) as error:  # Pillow: "Cannot handle this data type"
            raise ValueError(
                f"`{argument}` {where} holds no image in its image column: {type(image).__name__} "
                f"{reprlib.repr(image)} ({error}). Give the column of images (`image_column`): PIL images or uint8 "
                "arrays."
            ) from None
    mode = image.mode
    if mode == "F":
        raise ValueError(
            f"`{argument}` holds a floating-point image (mode 'F'), which has no fixed range of grey levels: {where}. "
            "Save it as an 8- or 16-bit image."
        )
    if mode == "I" and image.getextrema()[1] > 255:  # converting to grey would clip every level past 255
        raise ValueError(
            f"`{argument}` holds a 32-bit integer image (mode 'I') with levels up to {image.getextrema()[1]}, which "
            f"has no fixed range of grey levels (converted, every level past 255 would be white): {where}. Save it "
            "as an 8- or 16-bit image."
        )
    return image


def eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit levels: a 16-bit grey image scaled to 8 bits (Pillow's conversion to "L" or "RGB" clips
    at 255, white), any other image as it is."""
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8), "L")
    return image


def image_to_tensor(image, resolution: int, num_channels: int = 3) -> torch.Tensor:
    """One image (PIL or array; 8-bit, or 16-bit grey scaled to 8 bits) -> ``(C, R, R)`` in ``[-1, 1]``: resized and
    centre-cropped as diffusers' ``train_unconditional.py`` does."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = eight_bit(image)
    image = ImageOps.fit(image.convert("L" if num_channels == 1 else "RGB"), (resolution, resolution), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, num_channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path``, its links and ``..`` resolved, is ``folder`` or lies in it."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(os.path.join(root, ""))


def is_hidden(name: str) -> bool:
    """Whether a file or folder ``name`` is hidden (starts with "."): never training data, as in `datasets`'
    ``imagefolder`` (Jupyter's ``.ipynb_checkpoints`` holds copies of the images beside it)."""
    return name.startswith(".")


def warn_skipped(skipped: list[str], argument: str) -> None:
    """Log a warning naming the hidden folders and image files of ``argument`` that were skipped (if any)."""
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        logger.warning(
            f"`{argument}`: skipped {len(skipped)} hidden folder(s) or image file(s) (names starting with '.'): "
            f"{', '.join(map(repr, skipped[:5]))}{more}."
        )


def image_files(folder: str, root: str, argument: str) -> list[str]:
    """The image files under ``folder`` (recursively; folders and files sorted, a folder's files before its
    sub-folders'). Hidden folders and files (`is_hidden`) are skipped, with a warning naming them. A link in it (or
    ``folder`` itself) that leads out of ``root`` is a `ValueError` naming it and ``argument``: the data is what the
    folder holds, never files elsewhere."""
    found, skipped = [], []
    for current, dirs, files in os.walk(folder):
        skipped += [os.path.join(current, name) for name in sorted(dirs) if is_hidden(name)]
        skipped += [os.path.join(current, name) for name in sorted(files)
                    if is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)]  # fmt: skip
        dirs[:] = sorted(name for name in dirs if not is_hidden(name))  # os.walk does not enter the hidden ones
        files = [name for name in files if not is_hidden(name)]
        for path in [current, *(os.path.join(current, name) for name in dirs + files)]:
            if os.path.islink(path) and not is_inside(path, root):
                real = os.path.realpath(path)
                raise ValueError(
                    f"`{argument}` holds a link to a file or folder outside it: {path!r} -> {real!r}. Copy what "
                    f"it links to into {root!r}, or use the folder that holds it."
                )
        found += [os.path.join(current, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    warn_skipped(skipped, argument)
    return found


def check_dataset_name(name: str | None, option: str) -> None:
    """Refuse an empty or blank dataset name (`datasets.load_dataset` fails on one with an `IndexError`): a
    `ValueError` naming ``option``."""
    if name is not None and not name.strip():
        raise ValueError(
            f"`{option}` must name a dataset (a `save_to_disk` folder, or a name or path `datasets.load_dataset` "
            f"takes), got {name!r}."
        )


def load_images(
    train_data_dir: str | None = None,
    dataset: str | None = None,
    resolution: int = 32,
    num_channels: int = 3,
    image_column: str = "image",
    split: str = "train",
    max_images: int | None = None,
    progress_bar: bool = False,
) -> torch.Tensor:
    r"""
    Load training images as an ``(N, C, R, R)`` float32 tensor in ``[-1, 1]``.

    Args:
        train_data_dir (`str`): a folder of images (searched recursively).
        dataset (`str`): a `datasets` dataset: a folder written by ``save_to_disk``, or a name/path for
            ``datasets.load_dataset``.
        resolution (`int`): side of the square images.
        num_channels (`int`): 1 (grayscale) or 3 (RGB).
        image_column (`str`): the image column of ``dataset``.
        split (`str`): the split of ``dataset``; a ``save_to_disk`` Dataset without splits is read whole, as
            ``"train"`` (another split is refused).
        max_images (`int`, *optional*): keep the first ``max_images`` images (a positive integer).
    """
    if (train_data_dir is None) == (dataset is None):
        raise ValueError("Give exactly one of `train_data_dir` and `dataset`.")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"`resolution` must be a positive integer, got {resolution!r}.")
    if num_channels not in (1, 3):
        raise ValueError(f"`num_channels` must be 1 or 3, got {num_channels!r}.")
    check_positive_integers(optional=("max_images",), max_images=max_images)
    check_dataset_name(dataset, "dataset")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`train_data_dir` {train_data_dir!r} is not a folder.")
        paths = sorted(image_files(train_data_dir, train_data_dir, "train_data_dir"))
        images = paths[:max_images]
        load = open_image_file  # every file is decoded here, before any planning: a bad one is named
    else:
        images = _load_dataset(dataset, split, image_column)
        images = images.select(range(min(max_images, len(images)))) if max_images is not None else images
        rows = enumerate(row[image_column] for row in images)
        images, load = (check_image_mode(image, f"row {i}", "dataset") for i, image in rows), (lambda image: image)
    tensors = [
        image_to_tensor(load(image), resolution, num_channels)
        for image in tqdm(images, desc="loading images", disable=not progress_bar)
    ]
    if not tensors:
        where = f"`train_data_dir` {train_data_dir!r}" if train_data_dir is not None else f"`dataset` {dataset!r}"
        raise ValueError(f"No images found in {where} (image files end in {', '.join(IMAGE_EXTENSIONS)}).")
    return torch.stack(tensors)


def _load_dataset(dataset: str, split: str, image_column: str):
    try:
        import datasets
    except ImportError:
        raise ValueError("`dataset` needs the `datasets` package: `pip install datasets`.") from None
    if dataset.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(dataset)):
        raise ValueError(f"`dataset` {dataset!r} is a path that does not exist.")  # not a Hub name: no download
    saved = ("dataset_info.json", "dataset_dict.json")  # what `save_to_disk` writes (Dataset, DatasetDict)
    from_disk = os.path.isdir(dataset) and any(os.path.exists(os.path.join(dataset, name)) for name in saved)
    if from_disk:
        loaded = datasets.load_from_disk(dataset)
    else:
        try:
            # never a loading script of the dataset's (datasets < 2.20 ran one unless told not to)
            loaded = datasets.load_dataset(dataset, split=split, trust_remote_code=False)
        except (OSError, ValueError) as error:  # not found locally nor on the Hub (offline: a ConnectionError)
            raise ValueError(
                f"`dataset` {dataset!r} is neither a folder nor a dataset `datasets` can load: "
                f"{type(error).__name__}: {error}"
            ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"`split` {split!r} is not in the dataset; it has {list(loaded)}.")
        loaded = loaded[split]
    elif from_disk and split != "train":  # one Dataset without splits: read whole, as "train" (training reads so)
        raise ValueError(
            f"`split` {split!r} is not in the dataset: it is one `save_to_disk` Dataset without splits, read whole "
            "(as the training scripts train on it). Drop `split`, or save a DatasetDict with that split."
        )
    if image_column not in loaded.column_names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of the dataset: {loaded.column_names}.")
    return loaded
