"""Sample quality without Inception weights: "FD-classifier", a Frechet distance on a small classifier's features.

Published FID needs InceptionV3 weights, which are not available offline, and Inception features are meaningless on
8x8 grey digits anyway. Here a small CNN is trained (seeded) on the training images; its penultimate features feed
torchmetrics' `FrechetInceptionDistance(feature=module)` (the same Frechet distance as FID, Heusel et al. 2017, eq. 6,
on other features). Its accuracy on class-conditional samples is the second number. Scores are comparable only
within one data set and one sample count: they are not FID.

```py
classifier = train_classifier(train_images, train_labels)           # (N, 1, H, W) in [-1, 1], labels 0..9
evaluator = Evaluator(classifier, train_images)
evaluator.score(generated_images, generated_labels)                  # {"fd": ..., "accuracy": ...}
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from .cli import check_output_file, check_seed, write_atomically
from .models.checks import _is_integral, check_positive_integers, is_integer_tensor, positive_integer_arguments

logger = logging.getLogger(__name__)

T = TypeVar("T")


def count_flops(fn: Callable[[], T]) -> tuple[int, T]:
    """Run ``fn()`` once and return ``(flops, result)``: every FLOP of its matmuls, convolutions and attention
    (`scaled_dot_product_attention` on CPU too, which torch's counter alone counts as 0), backward included.

    Example:

    ```py
    >>> import torch
    >>> flops, _ = count_flops(lambda: torch.ones(4, 8) @ torch.ones(8, 2))
    >>> flops  # 2 * 4 * 8 * 2
    128

    ```
    """
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        result = fn()
    return counter.get_total_flops(), result


def _cpu_attention_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter has formulas for the CUDA attention kernels only: on CPU, `scaled_dot_product_attention` runs this
# fused kernel and would count 0 FLOPs, so attention-heavy networks (U-ViT, iU-Net) looked cheaper than they are
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


class FeatureClassifier(nn.Module):
    """A small CNN classifier; ``forward`` returns its penultimate features (what the Frechet distance compares).

    Example:

    ```py
    >>> import torch
    >>> net = FeatureClassifier(image_size=8)
    >>> net(torch.zeros(2, 1, 8, 8)).shape, net.logits(torch.zeros(2, 1, 8, 8)).shape
    (torch.Size([2, 64]), torch.Size([2, 10]))

    ```
    """

    def __init__(
        self, image_size: int, in_channels: int = 1, width: int = 32, num_features: int = 64, num_classes: int = 10
    ):
        super().__init__()
        if not _is_integral(image_size) or image_size not in (8, 16, 32):
            raise ValueError(f"`image_size` must be 8, 16 or 32, got {image_size!r}.")
        image_size, in_channels, width, num_features, num_classes = positive_integer_arguments(
            image_size=image_size, in_channels=in_channels, width=width, num_features=num_features,
            num_classes=num_classes,
        )  # fmt: skip
        layers, channels, size = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()], width, image_size
        while size > 4:  # halve the resolution down to 4x4, doubling the width
            layers += [nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.SiLU()]
            channels, size = 2 * channels, size // 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, num_features), nn.SiLU())
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features  # read by torchmetrics
        self.input_shape = (in_channels, image_size, image_size)  # (C, H, W) of the images it takes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._features(images).float()  # float32 features whatever the classifier's dtype (the FD's precision)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(images))

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.to(self.head.weight))  # images of any float dtype and device: the classifier's


# the metadata entry of a cached classifier that keys it on what determines its weights (see `_training_key`)
_CACHE_KEY = "diffusers_stages.classifier_key"
# the training recipe's version, in the key: bump it when `train_classifier` trains otherwise (optimizer, learning
# rate, augmentation), so that classifiers cached by the earlier recipe are trained again
_RECIPE = 1


def _training_key(net: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int,
                  steps: int) -> str:  # fmt: skip
    """A hash of what determines a trained classifier's weights: its architecture, the training settings, the torch
    version (major.minor: another release's kernels and random streams train other weights) and the images and labels
    as training sees them (float32 and int64, on the CPU)."""
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    settings = {"recipe": _RECIPE, "architecture": repr(net), "seed": seed, "batch_size": batch_size, "steps": steps,
                "torch": torch_version}  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for tensor, dtype in ((images, torch.float32), (labels, torch.long)):
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _load_cached(net: FeatureClassifier, cache_path: str | os.PathLike, key: str) -> bool:
    """Load ``net``'s weights from ``cache_path`` when the file's key is ``key``; `False` (with a log line) when it
    holds a classifier of other data or settings, or one cached without a key: it is to be trained again and
    overwritten. A file that holds no classifier of this architecture's tensors is a `ValueError` (not overwritten)."""
    try:
        with safe_open(os.fspath(cache_path), "pt") as f:
            cached_key, names = (f.metadata() or {}).get(_CACHE_KEY), set(f.keys())
    except (SafetensorError, OSError) as error:  # not safetensors (a user's other file given as the path)
        raise ValueError(
            f"`cache_path` {cache_path!r} holds no classifier ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}): delete it or give another path."
        ) from None
    if cached_key is None and names != set(net.state_dict()):  # another model's weights: not ours to overwrite
        raise ValueError(
            f"`cache_path` {cache_path!r} holds no classifier (tensors {sorted(names)[:3]}...): delete it or give "
            "another path."
        )
    if cached_key != key:
        held = (
            "cached without a key (on unknown data)"
            if cached_key is None
            else "of other images, labels, settings or torch version"
        )
        logger.warning(f"`cache_path` {cache_path!r} holds a classifier {held}: training it again and overwriting it.")
        return False
    try:
        net.load_state_dict(load_file(cache_path))
    except (RuntimeError, SafetensorError, OSError) as error:  # a keyed file whose tensors were changed since
        raise ValueError(
            f"`cache_path` {cache_path!r} holds another classifier than its key says ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}): delete it or give another path."
        ) from None
    return True


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 128,
    max_steps: int = 1000,
    width: int = 16,
    num_classes: int | None = None,
    cache_path: str | os.PathLike | None = None,
    progress_bar: bool = False,
) -> FeatureClassifier:
    """Train a [`FeatureClassifier`] on ``images`` ``(N, C, H, W)`` in ``[-1, 1]`` and their class ``labels``
    (seeded, ``seed`` in ``[0, 2**32)``: same seed, same weights). ``num_classes`` defaults to the largest label + 1.

    With ``cache_path`` (a safetensors file), a newly trained classifier is saved there with a key of what determines
    its weights (the images and labels, ``seed``, ``batch_size``, the steps taken, the architecture, the torch
    version's major.minor), and loaded from there when its key is this call's. A cached classifier of other data,
    settings or torch version (or one cached without a key, by an earlier version) is trained again and overwritten,
    with a log line; a file that holds no classifier is a `ValueError`, left as it is."""
    _check_images(images, "images")
    if not is_integer_tensor(labels) or labels.ndim != 1:
        got = f"shape {tuple(labels.shape)}, dtype {labels.dtype}" if torch.is_tensor(labels) else type(labels)
        raise ValueError(f"`labels` must be integer classes, one per image, got {got}.")
    if len(images) != len(labels):
        raise ValueError(
            f"`images` must be a batch (N >= 2, C, H, W) with one label each, got shape {tuple(images.shape)} and "
            f"{len(labels)} labels."
        )
    if not _is_integral(seed):  # torch's seeding would take -1 (as 2**64 - 1) and fail on others with its own words
        raise ValueError(f"`seed` must be an integer in [0, 2**32), got {seed!r}.")
    check_seed(seed, "seed")
    seed = int(seed)  # a numpy integer too: `torch.Generator.manual_seed` takes Python ints only
    if images.shape[-2] != images.shape[-1]:
        raise ValueError(f"`images` must be square (the classifier's input), got shape {tuple(images.shape)}.")
    check_positive_integers(("num_classes",), epochs=epochs, batch_size=batch_size, max_steps=max_steps,
                            width=width, num_classes=num_classes)  # fmt: skip
    num_classes = num_classes or int(labels.max()) + 1
    if not 0 <= labels.min() <= labels.max() < num_classes:  # cross_entropy would fail with an index error
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise ValueError(f"`labels` must be classes in [0, {num_classes}), got {bad}.")
    if cache_path is not None and not os.path.isfile(cache_path):
        check_output_file(cache_path, "cache_path")  # a folder, or under a file: refused before training, not after
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's global random state is left as it was
        torch.manual_seed(seed)
        net = FeatureClassifier(images.shape[-1], images.shape[1], width=width, num_classes=num_classes)
    steps = min(max_steps, epochs * max(1, len(images) // batch_size))  # fewer images than a batch: still trained
    key = None if cache_path is None else _training_key(net, images, labels, seed, batch_size, steps)
    if cache_path is not None and os.path.isfile(cache_path) and _load_cached(net, cache_path, key):
        return net.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    # the classifier's device (images get there in `_features`), moved once; int64, what cross_entropy takes of any
    # integer dtype (int32: NumPy's default integer on Windows)
    labels = labels.to(net.head.weight.device, torch.long)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(steps), desc="classifier", disable=not progress_bar):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()  # small translations: features, not pixels
        loss = F.cross_entropy(net.logits(torch.roll(images[index], shift, dims=(2, 3))), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if cache_path is not None:  # written beside it, then renamed: an interrupted write leaves no half file to load
        weights = {k: v.contiguous() for k, v in net.state_dict().items()}
        write_atomically(cache_path, lambda partial: save_file(weights, partial, metadata={_CACHE_KEY: key}))
    return net.eval().requires_grad_(False)


class Evaluator:
    """FD-classifier and classifier accuracy of generated images against a data set's real images.

    Args:
        classifier: the trained [`FeatureClassifier`].
        real_images: reference images in ``[-1, 1]`` (the training split, as FID is usually taken), a float tensor
            ``(N >= 2, C, H, W)`` of the classifier's input shape; their features are computed once, here.
        batch_size: how many images go through the classifier at once (memory only: the scores do not depend on it).
    """

    def __init__(self, classifier: FeatureClassifier, real_images: torch.Tensor, batch_size: int = 1000):
        (batch_size,) = positive_integer_arguments(batch_size=batch_size)
        _check_images(real_images, "real_images")
        input_shape = getattr(classifier, "input_shape", None)
        if input_shape is not None and tuple(real_images.shape[1:]) != tuple(input_shape):
            raise ValueError(
                f"`real_images` must be of the classifier's input shape (N, {', '.join(map(str, input_shape))}), got "
                f"{tuple(real_images.shape)}."
            )
        self.classifier = classifier
        self.batch_size = batch_size
        self.image_shape = tuple(real_images.shape[1:])
        self.fd = FrechetInceptionDistance(feature=classifier, reset_real_features=False)
        self.fd.to(next(classifier.parameters()).device)  # the feature sums live where the classifier computes
        for chunk in real_images.split(batch_size):
            self.fd.update(chunk, real=True)

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """``{"fd": ..., "accuracy": ...}`` for ``images`` ``(N >= 2, C, H, W)`` in ``[-1, 1]`` (accuracy, the
        fraction whose predicted class is their label, only when ``labels`` are given). The distance falls with
        ``N`` (about as 1 / N): compare scores of as many images. Fewer images than the classifier's features
        (``num_features``, 64) give a singular covariance (rank ``N - 1``): the score is still the exact Frechet
        distance of the two Gaussian fits (no NaN, no complex part), but that small-sample bias dominates it: compare
        such scores only with others of the same ``N``. Images in ``[0, 1]`` or ``[0, 255]``, far outside
        ``[-1, 1]``, integer, NaN or infinite, numpy arrays and PIL images are a `ValueError` naming the argument."""
        _check_images(images, "images")
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"`images` must be of the shape (N, {', '.join(map(str, self.image_shape))}) of the real images, got "
                f"{tuple(images.shape)}."
            )
        if labels is not None and (not is_integer_tensor(labels) or labels.shape != (len(images),)):
            got = f"shape {tuple(labels.shape)}, dtype {labels.dtype}" if torch.is_tensor(labels) else type(labels)
            raise ValueError(
                f"`labels` must hold one class per image ({len(images)}) as an integer tensor, got {got}."
            )
        num_classes = getattr(getattr(self.classifier, "head", None), "out_features", None)
        if labels is not None and num_classes is not None and not 0 <= labels.min() <= labels.max() < num_classes:
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ValueError(  # such a label is never predicted: it would only lower the accuracy, silently
                f"`labels` must be classes of the classifier, in [0, {num_classes}), got {bad}."
            )
        self.fd.reset()  # forgets the generated features only (reset_real_features=False)
        correct = 0
        for i, chunk in enumerate(images.split(self.batch_size)):
            self.fd.update(chunk, real=False)
            if labels is not None:
                logits = self.classifier.logits(chunk)
                chunk_labels = labels[i * self.batch_size : i * self.batch_size + len(chunk)].to(logits.device)
                correct += int((logits.argmax(1) == chunk_labels).sum())
        result = {"fd": float(self.fd.compute())}
        if labels is not None:
            result["accuracy"] = correct / len(images)
        return result


# how far outside [-1, 1] an image batch may reach: unclamped samples and added noise stay well within; levels in
# [0, 255] brought to [-1, 1] the wrong way (centred, or `* 2 - 1`) go to 127.5 or 509
_FAR_OUTSIDE = 10.0


def _check_images(images: torch.Tensor, name: str) -> None:
    """A batch of at least two finite floating-point images ``(N, C, H, W)`` that can be in ``[-1, 1]`` (slightly
    outside is fine: unclamped samples, added noise), or a `ValueError` naming ``name``. A batch with no value below
    0 and some above it is taken for levels in ``[0, 1]`` (a diffusers pipeline's ``output_type="pt"``) or
    ``[0, 255]``: images in ``[-1, 1]`` with every pixel at least mid-grey are no data set's. A value beyond
    ``+-_FAR_OUTSIDE`` (10) is no slight overshoot either: levels in ``[0, 255]`` centred (``images - 127.5``) or
    given the ``[0, 1]`` conversion (``images * 2 - 1``)."""
    if type(images).__module__ == "numpy" and hasattr(images, "shape"):  # a pipeline's `output_type="np"` images
        raise ValueError(
            f"`{name}` must be a torch tensor (N >= 2, C, H, W) in [-1, 1], got a numpy array of shape "
            f'{tuple(images.shape)} (a diffusers pipeline\'s `output_type="np"` images, (N, H, W, C) in [0, 1]: '
            "`torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1`)."
        )
    pil = _is_pil(images) or (
        isinstance(images, (list, tuple)) and len(images) > 0 and all(_is_pil(image) for image in images)
    )
    if pil:  # a diffusers pipeline's default `output_type="pil"` images
        got = f"a list of {len(images)} PIL images" if isinstance(images, (list, tuple)) else "a PIL image"
        raise ValueError(
            f"`{name}` must be a torch tensor (N >= 2, C, H, W) in [-1, 1], got {got} (a diffusers pipeline's "
            'default output: ask it for `output_type="pt"`, (N, C, H, W) in [0, 1], and pass `images * 2 - 1`).'
        )
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] < 2:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"`{name}` must be a batch (N >= 2, C, H, W), got shape {shape}.")
    if not images.is_floating_point():  # 8-bit images would reach the classifier as 0..255, scored without a word
        raise ValueError(
            f"`{name}` must be floating point in [-1, 1], got {images.dtype} (8-bit images: `images / 127.5 - 1`)."
        )
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"`{name}` hold NaN or infinite values: the Frechet distance would be meaningless.")
    low, high = float(images.min()), float(images.max())
    if (low >= 0 and high > 0) or max(
        -low, high
    ) > _FAR_OUTSIDE:  # no pixel below mid-grey, some brighter: levels in [0, 1] or [0, 255] as floats
        raise ValueError(
            f"`{name}` must be in [-1, 1], got values in [{low:g}, {high:g}] (levels in [0, 255]: "
            "`images / 127.5 - 1`; in [0, 1]: `images * 2 - 1`)."
        )


def _is_pil(image: object) -> bool:
    """Whether ``image`` is a PIL image (without importing PIL: the check runs on every scored batch)."""
    return any(cls.__module__.startswith("PIL.") and cls.__name__ == "Image" for cls in type(image).__mro__)
