"""Training data: an image folder or a `datasets` dataset, resized and cropped, with labels and optional flips.

Every random choice about an item (crop offset, flip) is a pure function of ``(seed, epoch, index)``: the
[`EpochShuffleSampler`] hands the dataset keys ``epoch * len + index``, so a run resumed in the middle of an epoch,
with any number of dataloader workers or processes, sees exactly the images an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import numbers
import os
import random
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from PIL import Image

from ..planning.data import (
    IMAGE_EXTENSIONS,
    check_image_mode,
    eight_bit,
    image_files,
    is_hidden,
    open_image_file,
    warn_skipped,
)


class ImageRecords:
    """Where the training images come from: ``load(i)`` gives image ``i`` (PIL), ``labels[i]`` its class or None."""

    def __init__(
        self, load: Callable[[int], Image.Image], length: int, labels: list[int] | None, class_names: list[str]
    ):
        self.load, self.length, self.labels, self.class_names = load, length, labels, class_names

    def __len__(self) -> int:
        return self.length

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# the loaders of `ImageRecords`: module functions (bound with `partial`), not lambdas, since dataloader workers that
# are spawned (macOS, Windows; `--dataloader_num_workers`) receive the dataset pickled
def folder_image(files: list[str], index: int) -> Image.Image:
    return open_image_file(files[index], "--train_data_dir")


def dataset_image(dataset, column: str, index: int) -> Image.Image:
    # the image folder's mode checks: a floating-point image, or a 32-bit one past 255, has no grey levels to convert
    return check_image_mode(dataset[index][column], f"row {index}", "--dataset_name")


def record_image(load: Callable[[int], Image.Image], indices: list[int], index: int) -> Image.Image:
    return load(indices[index])


def first_shuffled(records: ImageRecords, count: int, seed: int) -> ImageRecords:
    """The first ``count`` of ``records`` after a shuffle seeded with ``seed``: the rows diffusers' scripts train on
    with `--max_train_samples` (`datasets`' ``shuffle(seed=seed).select(range(count))`` draws this permutation). The
    classes stay those of all the records."""
    if count > len(records):
        raise ValueError(
            f"`--max_train_samples` {count} is more than the {len(records)} training images: pass at most "
            f"{len(records)}, or drop it to train on all of them."
        )
    indices = np.random.default_rng(seed).permutation(len(records))[:count].tolist()
    labels = None if records.labels is None else [records.labels[i] for i in indices]
    return ImageRecords(partial(record_image, records.load, indices), count, labels, records.class_names)


def class_folders(train_data_dir: str) -> list[str]:
    """The classes of a class-conditional `--train_data_dir`: its top-level sub-folders (hidden ones left out),
    sorted. Fewer than 2 is a `ValueError` saying how to give the labels."""
    class_names = sorted(name for name in os.listdir(train_data_dir)
                         if not is_hidden(name) and os.path.isdir(os.path.join(train_data_dir, name)))  # fmt: skip
    if len(class_names) < 2:
        raise ValueError(
            f"`--class_conditional` takes the classes from the sub-folders of `--train_data_dir` "
            f"{train_data_dir!r}, one sub-folder per class (`{os.path.join(train_data_dir, '<class>', '*.png')}`), "
            f"and needs at least 2 sub-folders; found {class_names}. Move each class's images into a sub-folder of "
            "its own, or give a `datasets` dataset (`--dataset_name` with `--label_column`, its column of class "
            "indices), or train without `--class_conditional`."
        )
    return class_names


def image_folder_records(train_data_dir: str, class_conditional: bool) -> ImageRecords:
    """Images under ``train_data_dir`` (recursively); with ``class_conditional`` each top-level sub-folder is a class.
    Hidden folders and files (names starting with ".", such as Jupyter's ``.ipynb_checkpoints``) are skipped, with a
    warning naming them: never a class, nor training images.

    Every file is decoded once here, before any training: a file that is not a readable image (truncated, or not an
    image) is a `ValueError` naming it, never skipped in silence nor found hours into a run."""
    if not os.path.isdir(train_data_dir):
        raise ValueError(f"`--train_data_dir` must be an existing folder of images, got {train_data_dir!r}.")
    if class_conditional:
        entries = sorted(os.listdir(train_data_dir))
        hidden = [name for name in entries if is_hidden(name)]  # e.g. .ipynb_checkpoints: never a class
        warn_skipped([os.path.join(train_data_dir, name) for name in hidden
                      if os.path.isdir(os.path.join(train_data_dir, name)) or name.lower().endswith(IMAGE_EXTENSIONS)],
                     "--train_data_dir")  # fmt: skip
        entries = [name for name in entries if not is_hidden(name)]
        class_names = class_folders(train_data_dir)
        stray = [os.path.join(train_data_dir, name) for name in entries
                 if name not in class_names and name.lower().endswith(IMAGE_EXTENSIONS)]  # fmt: skip
        files, labels = [], []
        for label, name in enumerate(class_names):
            class_files = image_files(os.path.join(train_data_dir, name), train_data_dir, "--train_data_dir")
            files += class_files
            labels += [label] * len(class_files)
        if len(set(labels)) < len(class_names):
            empty = [name for label, name in enumerate(class_names) if label not in labels]
            raise ValueError(
                f"`--class_conditional` takes the classes from the sub-folders of `--train_data_dir` "
                f"{train_data_dir!r}: each needs images, but {empty} hold none."
            )
        if stray:  # in no class: never trained on, which must not pass in silence
            raise ValueError(
                f"`--class_conditional` takes the classes from the sub-folders of `--train_data_dir` "
                f"{train_data_dir!r}, but it holds images in no class sub-folder: {stray[:5]}"
                f"{f' and {len(stray) - 5} more' if len(stray) > 5 else ''}. Move them into their class's folder, "
                "or remove them."
            )
    else:
        files, labels, class_names = image_files(train_data_dir, train_data_dir, "--train_data_dir"), None, []
    if not files:
        raise ValueError(f"`--train_data_dir` {train_data_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    for path in files:  # decode every file once before training starts: a bad one stops the run, named
        open_image_file(path, "--train_data_dir").close()
    return ImageRecords(partial(folder_image, files), len(files), labels, class_names)


def hf_dataset_records(
    dataset_name: str,
    class_conditional: bool,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | None = None,
) -> ImageRecords:
    """The ``train`` split of a `datasets` dataset (a Hub name, or a local path `datasets.load_dataset` reads)."""
    dataset = load_train_split(
        dataset_name, dataset_config_name, cache_dir, {"--image_column": image_column,
                                                       "--label_column": label_column if class_conditional else None}
    )  # fmt: skip
    labels, class_names = None, []
    if class_conditional:
        labels, class_names = _class_labels(dataset, label_column)
    return ImageRecords(partial(dataset_image, dataset, image_column), len(dataset), labels, class_names)


def _is_class_index(value) -> bool:
    """Whether ``value`` is a whole number >= 0 (an int, or a float such as 2.0; not a bool, a string or nan)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return value >= 0 and value == int(value)


def _class_labels(dataset, label_column: str) -> tuple[list[int], list[str]]:
    """``(label of each row, class names)`` of `--label_column`: class indices 0, 1, ... (below the number of a
    ``ClassLabel``'s names); anything else (a -1 "no label", a string, a fraction) is a `ValueError` naming it."""
    values = list(dataset[label_column])
    feature = dataset.features[label_column]
    names = list(feature.names) if hasattr(feature, "names") else None
    bad = [x for x in values if not _is_class_index(x) or (names is not None and int(x) >= len(names))]
    if bad:
        shown = sorted(set(map(repr, bad)))[:5]
        raise ValueError(
            f"`--label_column` {label_column!r} must hold class indices 0, 1, ... (one per class"
            f"{f', below {len(names)}' if names is not None else ''}), got [{', '.join(shown)}] in "
            f"{len(bad)} row(s): drop or relabel them, or train without `--class_conditional`."
        )
    labels = [int(x) for x in values]
    return labels, names if names is not None else [str(i) for i in range(max(labels) + 1)]


def load_train_split(dataset_name: str, dataset_config_name: str | None, cache_dir: str | None, columns: dict):
    """The ``train`` split of `--dataset_name` (a Hub name, a local path `datasets.load_dataset` reads, or a
    `save_to_disk` folder), checked to have the ``columns`` (``{argument: column or None}``); a dataset that cannot be
    loaded or lacks a column is a `ValueError` naming the argument."""
    try:
        import datasets
    except ImportError:
        raise ValueError("`--dataset_name` needs the `datasets` package: `pip install datasets`.") from None
    try:
        if os.path.isfile(os.path.join(dataset_name, "dataset_info.json")):  # a `save_to_disk` folder
            dataset = datasets.load_from_disk(dataset_name)
            dataset = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
        else:
            # never a loading script of the dataset's (datasets < 2.20 ran one unless told not to)
            dataset = datasets.load_dataset(
                dataset_name, dataset_config_name, cache_dir=cache_dir, split="train", trust_remote_code=False
            )
    except Exception as error:  # noqa: BLE001 (offline, unknown name, no train split: one line, not a traceback)
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"`--dataset_name` {dataset_name!r} could not be loaded ({type(error).__name__}: {first_line}). Offline, "
            "use a dataset already in the `datasets` cache, a local path, or `--train_data_dir` (a folder of images)."
        ) from None
    if len(dataset) == 0:  # else a run with no batches, stopped by a division by zero once set up
        raise ValueError(
            f"`--dataset_name` {dataset_name!r} has no rows in its train split: give a dataset of images."
        )
    for flag, column in columns.items():
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"`{flag}` {column!r} is not a column of {dataset_name!r}: {dataset.column_names}.")
    return dataset


def preprocess_image(
    image: Image.Image, resolution: int, center_crop: bool, rng: random.Random | None
) -> torch.Tensor:
    """RGB, shorter side resized to ``resolution``, cropped square (centre, or at random with ``rng``), in [-1, 1]:
    the sizes and offsets of diffusers' scripts' torchvision transforms (``Resize(resolution)``, bilinear: the longer
    side truncated to ``int(resolution * long / short)``; ``CenterCrop``: offsets ``int(round(diff / 2))``)."""
    image = eight_bit(image).convert("RGB")
    width, height = image.size
    if min(width, height) != resolution:
        short, long = min(width, height), max(width, height)
        size = (resolution, int(resolution * long / short))
        image = image.resize(size if width <= height else size[::-1], Image.Resampling.BILINEAR)
        width, height = image.size
    if center_crop or rng is None:
        left, top = int(round((width - resolution) / 2.0)), int(round((height - resolution) / 2.0))
    else:
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _item_rng(seed: int, key: int, length: int) -> tuple[int, random.Random]:
    epoch, index = divmod(int(key), length)
    return index, random.Random(f"{seed}-{epoch}-{index}")


class TrainingImages(torch.utils.data.Dataset):
    """Images of ``records`` as ``{"pixel_values", "labels"}``; keys from [`EpochShuffleSampler`] fix the randomness."""

    def __init__(self, records: ImageRecords, resolution: int, center_crop: bool, random_flip: bool, seed: int):
        self.records, self.resolution, self.center_crop, self.random_flip, self.seed = (
            records,
            resolution,
            center_crop,
            random_flip,
            seed,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> dict:
        index, rng = _item_rng(self.seed, key, len(self))
        pixels = preprocess_image(self.records.load(index), self.resolution, self.center_crop, rng)
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        labels = self.records.labels[index] if self.records.labels is not None else -1
        return {"pixel_values": pixels, "labels": labels}


class CachedLatents(torch.utils.data.Dataset):
    """Latent distributions encoded once (and once more flipped, with ``random_flip``) as ``{"latent_parameters"}``."""

    def __init__(self, parameters: torch.Tensor, flipped: torch.Tensor | None, labels: list[int] | None, seed: int):
        self.parameters, self.flipped, self.labels, self.seed = parameters, flipped, labels, seed

    def __len__(self) -> int:
        return self.parameters.shape[0]

    def __getitem__(self, key: int) -> dict:
        index, rng = _item_rng(self.seed, key, len(self))
        flip = self.flipped is not None and rng.random() < 0.5
        parameters = (self.flipped if flip else self.parameters)[index]
        return {"latent_parameters": parameters, "labels": self.labels[index] if self.labels is not None else -1}


@torch.no_grad()
def encode_latent_cache(
    records: ImageRecords, vae, resolution: int, random_flip: bool, seed: int, batch_size: int = 32
) -> CachedLatents:
    """Encode every image once with ``vae`` (centre crop), keeping the posterior's mean and log-variance."""
    device, dtype = vae.device, vae.dtype
    parameters, flipped = [], []
    for start in range(0, len(records), batch_size):
        pixels = torch.stack(
            [
                preprocess_image(records.load(i), resolution, True, None)
                for i in range(start, min(start + batch_size, len(records)))
            ]
        ).to(device, dtype)
        parameters.append(vae.encode(pixels).latent_dist.parameters.float().cpu())
        if random_flip:
            flipped.append(vae.encode(pixels.flip(-1)).latent_dist.parameters.float().cpu())
    return CachedLatents(torch.cat(parameters), torch.cat(flipped) if random_flip else None, records.labels, seed)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from ``seed + epoch``, yielding keys ``epoch * n + index`` (see module doc)."""

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        yield from (self.epoch * self.num_items + order).tolist()
