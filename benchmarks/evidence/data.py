"""Real, offline image data: sklearn's digits and Fashion-MNIST from Debian's ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DATASETS = ("digits", "fashion-mnist")
NUM_CLASSES = 10


def ensure_fashion_mnist(directory: str = FASHION_MNIST_DIR) -> str:
    """Return the Fashion-MNIST folder; a clear error saying how to install it when it is absent (a benchmark never
    installs system packages itself)."""
    missing = [f for files in FASHION_FILES.values() for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found under {directory}: install Debian's data set first "
            "(`sudo apt-get install dataset-fashion-mnist`), or run the `quick` preset, which uses scikit-learn's digits."
        )
    return directory


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]  # idx header: 0, 0, dtype (0x08 = uint8), number of dimensions, then one int32 per dimension
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_images(name: str, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Images ``(N, 1, H, W)`` scaled to ``[-1, 1]`` and their labels ``(N,)``.

    - ``"digits"``: sklearn's 1,797 8x8 digits, split 80/20 (seeded) into ``"train"`` / ``"test"``.
    - ``"fashion-mnist"``: 60,000 / 10,000 28x28 images, zero-padded (black) to 32x32.

    Example:

    ```py
    >>> images, labels = load_images("digits", "train")
    >>> tuple(images.shape), float(images.min()), float(images.max())
    ((1437, 1, 8, 8), -1.0, 1.0)

    ```
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(seed).permutation(len(digits.target))
        cut = int(0.8 * len(order))
        index = order[:cut] if split == "train" else order[cut:]
        images = torch.from_numpy(digits.images[index]).float()[:, None] / 8.0 - 1.0  # pixel values 0..16
        return images, torch.from_numpy(digits.target[index]).long()
    if name == "fashion-mnist":
        directory = ensure_fashion_mnist()
        image_file, label_file = FASHION_FILES[split]
        images = torch.from_numpy(_read_idx(os.path.join(directory, image_file)).copy()).float()[:, None]
        images = torch.nn.functional.pad(images / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0)  # 28x28 -> 32x32
        return images, torch.from_numpy(_read_idx(os.path.join(directory, label_file)).copy()).long()
    raise ValueError(f"`name` must be one of {DATASETS}, got {name!r}.")
