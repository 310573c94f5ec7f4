"""FD-classifier: a seeded classifier on the data, a Frechet distance that orders real < noisy < noise."""

import copy
import os
import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from diffusers_stages.evaluation import Evaluator, FeatureClassifier, count_flops, train_classifier


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    images = torch.from_numpy(data.images[order]).float()[:, None] / 8.0 - 1.0
    labels = torch.from_numpy(data.target[order]).long()
    return images[:1400], labels[:1400], images[1400:], labels[1400:]


def test_classifier_is_seeded_and_cached(digits, tmp_path):
    images, labels, _, _ = digits
    path = str(tmp_path / "classifier.safetensors")
    net = train_classifier(images, labels, max_steps=20, cache_path=path)
    again = train_classifier(images, labels, max_steps=20)  # trained again from the same seed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("diffusers_stages.evaluation.F.cross_entropy", None)  # training would fail: loaded, not trained
        cached = train_classifier(images, labels, max_steps=20, cache_path=path)
    for other in (again, cached):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert not any(p.requires_grad for p in net.parameters())


def test_frechet_distance_orders_quality(digits):
    images, labels, test, test_labels = digits
    evaluator = Evaluator(train_classifier(images, labels, max_steps=60), images)
    generator = torch.Generator().manual_seed(0)
    real = evaluator.score(test, test_labels)
    noisy = evaluator.score(test + 0.5 * torch.randn(test.shape, generator=generator), test_labels)
    noise = evaluator.score(torch.rand(test.shape, generator=generator) * 2 - 1)
    assert real["fd"] < noisy["fd"] < noise["fd"] and "accuracy" not in noise
    assert real == evaluator.score(test, test_labels)  # deterministic


def test_bad_inputs(digits):
    images, labels, test, _ = digits
    with pytest.raises(ValueError, match="image_size"):
        FeatureClassifier(image_size=28)
    with pytest.raises(ValueError, match="one label each"):
        train_classifier(images, labels[:10])
    with pytest.raises(ValueError, match="images"):
        Evaluator(FeatureClassifier(8), images[:10]).score(test[:1])


def test_count_flops_counts_backward():
    weight = torch.ones(8, 2, requires_grad=True)
    forward, _ = count_flops(lambda: torch.ones(4, 8) @ weight)
    both, _ = count_flops(lambda: (torch.ones(4, 8) @ weight).sum().backward())
    assert forward == 128 and both == 2 * forward  # the weight's gradient is one more matmul


def test_count_flops_counts_cpu_attention_forward_and_backward():
    query = torch.randn(2, 4, 16, 8, requires_grad=True)
    forward, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query))
    assert forward == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # Q K^T and (softmax) V, 2 FLOPs per multiply-add
    both, _ = count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query).sum().backward()
    )
    assert both > 2 * forward  # the backward pass has twice the matmuls and more


def test_fewer_images_than_a_batch_still_train_the_classifier(digits):
    images, labels, _, _ = digits
    torch.manual_seed(0)
    untrained = FeatureClassifier(8, width=16)  # what train_classifier starts from (seed 0)
    net = train_classifier(images[:100], labels[:100], batch_size=128, max_steps=5)
    assert not all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), untrained.state_dict().values()))


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (lambda test: test[:, :, :4], None, "`images` must be .* shape \\(N, 1, 8, 8\\) of the real images"),
        (lambda test: test.repeat(1, 3, 1, 1), None, "of the real images, got \\(397, 3, 8, 8\\)"),
        (lambda test: test.clone().index_fill_(0, torch.tensor([3]), float("nan")), None, "`images` hold NaN"),
        (
            lambda test: test,
            lambda labels: labels[:10],
            "`labels` must hold one class per image \\(397\\) as an integer tensor, got shape \\(10,\\)",
        ),
        (lambda test: test, lambda labels: labels.float(), "`labels` must hold one class per image"),
        (
            lambda test: test,
            lambda labels: labels + 1,
            "`labels` must be classes of the classifier, in \\[0, 10\\), got 10",
        ),
        (
            lambda test: test,
            lambda labels: labels - 1,
            "`labels` must be classes of the classifier, in \\[0, 10\\), got -1",
        ),
        (  # 8-bit images: the classifier would see 0..255 and score them silently
            lambda test: ((test + 1) * 127.5).round().to(torch.uint8),
            None,
            "`images` must be floating point in \\[-1, 1\\], got torch.uint8",
        ),
        (  # the same levels as floats (PIL -> float tensor): never negative, up to 255
            lambda test: (test + 1) * 127.5,
            None,
            "`images` must be in \\[-1, 1\\], got values in \\[0, 255\\]",
        ),
    ],
)
def test_score_refuses_images_and_labels_that_do_not_fit(digits, images, labels, match):
    train, train_labels, test, test_labels = digits
    evaluator = Evaluator(FeatureClassifier(8), train[:64])
    with pytest.raises(ValueError, match=match):
        evaluator.score(images(test), None if labels is None else labels(test_labels))


def test_evaluator_refuses_bad_real_images_and_batch_size(digits):
    train, *_ = digits
    with pytest.raises(ValueError, match="`real_images` must be a batch"):
        Evaluator(FeatureClassifier(8), train[0])
    with pytest.raises(ValueError, match="`real_images` hold NaN"):
        Evaluator(FeatureClassifier(8), train[:8] * float("nan"))
    with pytest.raises(ValueError, match="`real_images` must be floating point in \\[-1, 1\\], got torch.uint8"):
        Evaluator(FeatureClassifier(8), ((train[:8] + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match="`real_images` must be in \\[-1, 1\\], got values in \\[0, 255\\]"):
        Evaluator(FeatureClassifier(8), (train[:8] + 1) * 127.5)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        Evaluator(FeatureClassifier(8), train[:8], batch_size=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_steps": 0}, "`max_steps` must be a positive integer, got 0"),  # was: an untrained classifier
        ({"images": lambda images: ((images + 1) * 127.5).to(torch.uint8)}, "`images` must be floating point"),
        ({"images": lambda images: (images + 1) * 127.5}, "`images` must be in \\[-1, 1\\], got values in"),
        ({"epochs": 0}, "`epochs` must be a positive integer, got 0"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer, got 0"),
        ({"labels": lambda labels: labels.float()}, "`labels` must be integer classes"),
        ({"labels": lambda labels: labels - 1}, "`labels` must be classes in \\[0, 9\\), got -1"),
        (
            {"num_classes": 5},
            "`labels` must be classes in \\[0, 5\\), got [5-9]",
        ),  # was: an IndexError in cross_entropy
    ],
)
def test_train_classifier_refuses_bad_labels_and_step_counts(digits, kwargs, match):
    images, labels, _, _ = digits
    kwargs = dict(kwargs)
    images = kwargs.pop("images", lambda images: images)(images[:64])
    labels = kwargs.pop("labels", lambda labels: labels)(labels[:64])
    with pytest.raises(ValueError, match=match):
        train_classifier(images, labels, **kwargs)


def test_train_classifier_leaves_the_global_random_state_as_it_was(digits):
    images, labels, _, _ = digits
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(images[:64], labels[:64], max_steps=2)
    assert torch.equal(torch.rand(3), expected)  # the caller's seed still decides what comes next


def test_an_interrupted_cache_write_leaves_no_cache_file(digits, tmp_path, monkeypatch):
    images, labels, _, _ = digits
    path = tmp_path / "classifier.safetensors"

    def interrupted(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)  # a partial file, as a crash or Ctrl-C mid-write leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr("diffusers_stages.evaluation.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(images[:64], labels[:64], max_steps=1, cache_path=str(path))
    assert os.listdir(tmp_path) == []  # nothing that a later call would load as the classifier
    monkeypatch.undo()
    net = train_classifier(images[:64], labels[:64], max_steps=1, cache_path=str(path))
    cached = train_classifier(images[:64], labels[:64], max_steps=1, cache_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), cached.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_classifier_in_another_dtype_scores_float32_images(digits, dtype):
    train, train_labels, test, test_labels = digits
    torch.manual_seed(0)
    classifier = FeatureClassifier(8)
    reference = Evaluator(classifier, train[:256]).score(test[:64], test_labels[:64])
    # was: RuntimeError "Input type (float) and bias type (double) should be the same"
    result = Evaluator(copy.deepcopy(classifier).to(dtype), train[:256]).score(test[:64], test_labels[:64])
    assert result["fd"] == pytest.approx(reference["fd"], rel=1e-4 if dtype == torch.float64 else 0.1)
    assert isinstance(result["fd"], float) and abs(result["accuracy"] - reference["accuracy"]) <= 0.1


@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (4, 3, 8, 8), (4, 1, 8, 16)])
def test_real_images_must_fit_the_classifier(shape):
    # was: a RuntimeError from inside the network ("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(
        ValueError, match=re.escape(f"`real_images` must be of the classifier's input shape (N, 1, 8, 8), got {shape}")
    ):
        Evaluator(FeatureClassifier(8), torch.zeros(shape))


def test_train_classifier_refuses_non_square_images():
    with pytest.raises(ValueError, match="`images` must be square"):
        train_classifier(torch.zeros(4, 1, 8, 16), torch.tensor([0, 1, 0, 1]), max_steps=1)


def test_classifier_and_evaluator_take_images_and_labels_on_an_accelerator(digits):
    # the classifier trains and scores on the CPU; generated images and their labels may come from a GPU
    from tests.fake_cuda import fake_cuda

    images, labels, test_images, test_labels = digits
    expected = train_classifier(images[:64], labels[:64], max_steps=3)
    with fake_cuda(grad=True):
        net = train_classifier(images[:64].to("cuda"), labels[:64].to("cuda"), max_steps=3)
        evaluator = Evaluator(net, images[:64].to("cuda"))
        scores = evaluator.score(test_images[:32].to("cuda"), test_labels[:32].to("cuda"))
    for a, b in zip(net.state_dict().values(), expected.state_dict().values()):
        assert torch.equal(a, b)
    assert np.isfinite(scores["fd"]) and 0 <= scores["accuracy"] <= 1


def test_a_cache_file_that_is_no_classifier_is_refused_by_name_and_kept(digits, tmp_path):
    # another file given as `cache_path` (not safetensors, or another model's weights) is not overwritten: refused
    from safetensors.torch import save_file

    images, labels, _, _ = digits
    path = tmp_path / "classifier.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="`cache_path` .* holds no classifier .*: delete it or give another"):
        train_classifier(images[:64], labels[:64], max_steps=1, cache_path=str(path))
    assert path.read_bytes() == b"not safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(path))  # a U-Net's, say
    kept = path.read_bytes()
    with pytest.raises(ValueError, match="`cache_path` .* holds no classifier"):
        train_classifier(images[:64], labels[:64], max_steps=1, cache_path=str(path))
    assert path.read_bytes() == kept


def _trains(monkeypatch) -> list:
    """Count the training steps of `train_classifier` (calls of its loss)."""
    loss, calls = torch.nn.functional.cross_entropy, []
    monkeypatch.setattr(
        "diffusers_stages.evaluation.F.cross_entropy", lambda *a, **k: calls.append(1) or loss(*a, **k)
    )
    return calls


@pytest.mark.parametrize(
    "other",
    [
        {"labels": "shuffled"},  # other labels, same images
        {"images": "flipped"},  # other images (another data set of the same shape), same labels
        {"seed": 1},
        {"max_steps": 3},
        {"batch_size": 16},
        {"width": 8},  # another architecture (was: a ValueError asking to delete the file)
        {"num_classes": 12},
    ],
)
def test_a_cache_of_other_data_or_settings_is_retrained_and_overwritten(digits, tmp_path, monkeypatch, caplog, other):
    # was: any cached classifier of the same shapes was loaded as it was, whatever data and settings it was trained
    # on, and scored samples against the wrong data's features without a word
    images, labels, _, _ = digits
    images, labels = images[:64], labels[:64]
    path = str(tmp_path / "classifier.safetensors")
    train_classifier(images, labels, max_steps=2, cache_path=path)
    kwargs = {"max_steps": 2, **other}
    if kwargs.pop("labels", None):
        labels = labels.roll(1)
    if kwargs.pop("images", None):
        images = images.flip(-1)
    expected = train_classifier(images, labels, **kwargs)  # what the call asks for, trained without a cache
    calls = _trains(monkeypatch)
    with caplog.at_level("WARNING", logger="diffusers_stages.evaluation"):
        net = train_classifier(images, labels, cache_path=path, **kwargs)
    assert calls  # trained again
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))
    assert any(path in r.getMessage() and "training it again" in r.getMessage() for r in caplog.records)
    calls.clear()
    cached = train_classifier(images, labels, cache_path=path, **kwargs)  # overwritten: now loaded
    assert not calls
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), expected.state_dict().values()))


def test_a_cache_of_another_torch_version_is_retrained(digits, tmp_path, monkeypatch, caplog):
    # the key held no torch version: a classifier cached under another torch (whose kernels and random streams give
    # other weights) was loaded as this one's; a patch release (same major.minor) keeps the cache
    images, labels, _, _ = digits
    path = str(tmp_path / "classifier.safetensors")
    major, minor = torch.__version__.split(".")[:2]
    monkeypatch.setattr(torch, "__version__", f"{major}.{minor}.0")
    train_classifier(images[:64], labels[:64], max_steps=1, cache_path=path)
    calls = _trains(monkeypatch)
    monkeypatch.setattr(torch, "__version__", f"{major}.{minor}.99+cpu")
    train_classifier(images[:64], labels[:64], max_steps=1, cache_path=path)
    assert not calls  # loaded
    monkeypatch.setattr(torch, "__version__", f"{major}.{int(minor) + 1}.0")
    with caplog.at_level("WARNING", logger="diffusers_stages.evaluation"):
        train_classifier(images[:64], labels[:64], max_steps=1, cache_path=path)
    assert calls and any(path in r.getMessage() and "training it again" in r.getMessage() for r in caplog.records)


def test_a_cache_of_the_same_training_is_loaded_whatever_the_images_dtype_or_step_limit(digits, tmp_path, monkeypatch):
    # the key is what determines the weights: the images as the classifier sees them (float32), the steps it takes
    # (64 images, 30 epochs of at most one batch: 30 steps whatever `max_steps` above that)
    images, labels, _, _ = digits
    path = str(tmp_path / "classifier.safetensors")
    net = train_classifier(images[:64], labels[:64], max_steps=1000, cache_path=path)
    calls = _trains(monkeypatch)
    cached = train_classifier(images[:64].double(), labels[:64].int(), max_steps=2000, cache_path=path)
    assert not calls
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), cached.state_dict().values()))


def test_an_old_cache_file_without_a_key_is_retrained_with_a_log_line(digits, tmp_path, monkeypatch, caplog):
    # a file written before the cache was keyed: what it was trained on is unknown, so it is trained again
    from safetensors import safe_open
    from safetensors.torch import save_file

    images, labels, _, _ = digits
    path = str(tmp_path / "classifier.safetensors")
    expected = train_classifier(images[:64], labels[:64], max_steps=2)
    old = train_classifier(images[64:128], labels[64:128], max_steps=2)  # trained on other images
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, path)  # no metadata
    calls = _trains(monkeypatch)
    with caplog.at_level("WARNING", logger="diffusers_stages.evaluation"):
        net = train_classifier(images[:64], labels[:64], max_steps=2, cache_path=path)
    assert calls and any(path in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))
    with safe_open(path, "pt") as f:
        assert f.metadata()  # keyed now


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_train_classifier_takes_labels_of_any_integer_dtype(digits, dtype):
    # int32 is NumPy's default integer on Windows (sklearn's digits.target there); was: a RuntimeError from
    # cross_entropy ("expected target dtype to be Long or Byte, but got Int") at the first step
    images, labels, _, _ = digits
    expected = train_classifier(images[:64], labels[:64], max_steps=2)
    net = train_classifier(images[:64], labels[:64].to(dtype), max_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))


def test_boolean_labels_are_refused(digits):
    images, labels, _, _ = digits
    with pytest.raises(
        ValueError, match="`labels` must be integer classes, one per image, got shape \\(64,\\), dtype torch.bool"
    ):
        train_classifier(images[:64], labels[:64] > 4, max_steps=1)
    evaluator = Evaluator(FeatureClassifier(8), images[:64])
    with pytest.raises(
        ValueError, match="`labels` must hold one class per image \\(64\\) as an integer tensor, got .* torch.bool"
    ):
        evaluator.score(images[:64], labels[:64] > 4)  # was: scored as classes 0 and 1


def test_a_cache_path_that_cannot_be_written_is_refused_before_training(digits, tmp_path, monkeypatch):
    images, labels, _, _ = digits
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("diffusers_stages.evaluation.F.cross_entropy", None)  # training would fail: it must not start
    for path, match in [(tmp_path, "is a folder"), (tmp_path / "a_file" / "net.safetensors", "cannot be written")]:
        # was: an OSError from the write, after training
        with pytest.raises(ValueError, match=f"`cache_path` {re.escape(repr(str(path)))} {match}"):
            train_classifier(images[:64], labels[:64], max_steps=1, cache_path=str(path))


@pytest.mark.parametrize("count", [2, 30, 100])
def test_fd_is_the_frechet_distance_of_the_classifier_features(digits, count):
    # FID's formula (Heusel et al. 2017, eq. 6) computed directly with scipy's sqrtm; with fewer generated images (2:
    # rank 1; 30) than features (64) the covariance is singular and its square root has small imaginary parts: the
    # score is still the exact distance of the two Gaussian fits (what `Evaluator.score` documents), not NaN
    import scipy.linalg

    train, train_labels, test, _ = digits
    classifier = train_classifier(train[:256], train_labels[:256], max_steps=5)
    generated = test[:count] + 0.3 * torch.randn(test[:count].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        real, fake = (classifier(x).double().numpy() for x in (train[:256], generated))
    mean_real, mean_fake = real.mean(0), fake.mean(0)
    cov_real, cov_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(cov_real @ cov_fake).real
    expected = ((mean_real - mean_fake) ** 2).sum() + np.trace(cov_real + cov_fake - 2 * root)
    assert Evaluator(classifier, train[:256]).score(generated)["fd"] == pytest.approx(expected, rel=1e-4)


def test_a_cache_path_given_as_a_path_object_trains_then_loads(digits, tmp_path):
    # the check added before training read it as a string (`path.endswith`): an AttributeError on a pathlib.Path,
    # which trained, saved and loaded before, as diffusers' `save_pretrained` folders take one
    images, labels, _, _ = digits
    path = tmp_path / "new" / "classifier.safetensors"
    net = train_classifier(images[:64], labels[:64], max_steps=1, cache_path=path)
    cached = train_classifier(images[:64], labels[:64], max_steps=1, cache_path=path)  # loaded, not trained
    assert path.is_file()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), cached.state_dict().values()))


def test_images_in_zero_one_are_refused_as_levels_of_another_range(digits):
    # a diffusers pipeline's `output_type="pt"` gives images in [0, 1]: they were scored silently as [-1, 1] ones
    # (every pixel at least mid-grey), only values above 1 were refused
    images, labels, test, test_labels = digits
    with pytest.raises(ValueError, match=re.escape("`images` must be in [-1, 1], got values in [0, 1]")):
        Evaluator(FeatureClassifier(8), images[:64]).score((test + 1) / 2, test_labels)
    with pytest.raises(ValueError, match=re.escape("`real_images` must be in [-1, 1], got values in [0, 1]")):
        Evaluator(FeatureClassifier(8), (images[:64] + 1) / 2)
    with pytest.raises(ValueError, match=re.escape("`images` must be in [-1, 1], got values in [0, 1]")):
        train_classifier((images[:64] + 1) / 2, labels[:64], max_steps=1)
    Evaluator(FeatureClassifier(8), torch.zeros(4, 1, 8, 8)).score(torch.zeros(4, 1, 8, 8))  # mid-grey: no range told


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "0"])
def test_train_classifier_refuses_a_seed_that_is_no_integer_in_range(digits, seed):
    # was: a RuntimeError from torch ("manual_seed expected a long, but got float"), an overflow or int()'s message,
    # or -1 taken (torch wraps it to 2**64 - 1)
    images, labels, _, _ = digits
    with pytest.raises(
        ValueError, match=f"`seed` must be (an integer )?in \\[0, 2\\*\\*32\\), got {re.escape(repr(seed))}"
    ):
        train_classifier(images[:64], labels[:64], seed=seed, max_steps=1)
    net = train_classifier(images[:64], labels[:64], seed=np.int64(3), max_steps=1)  # a numpy integer is one
    expected = train_classifier(images[:64], labels[:64], seed=3, max_steps=1)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))


def test_train_classifier_refuses_images_that_are_no_tensor():
    # was: an AttributeError ("'list' object has no attribute 'ndim'")
    with pytest.raises(ValueError, match="`images` must be a batch \\(N >= 2, C, H, W\\), got shape list"):
        train_classifier([[0.0] * 64] * 4, torch.tensor([0, 1, 0, 1]), max_steps=1)


def test_numpy_images_of_a_pipeline_are_refused_with_the_conversion(digits):
    # a diffusers pipeline's `output_type="np"` gives (N, H, W, C) arrays in [0, 1]; was "got shape ndarray"
    images, labels, _, _ = digits
    evaluator = Evaluator(FeatureClassifier(8), images[:16])
    generated = np.zeros((4, 8, 8, 1), dtype=np.float32)
    match = r"`images` must be a torch tensor.*got a numpy array of shape \(4, 8, 8, 1\).*permute\(0, 3, 1, 2\)"
    with pytest.raises(ValueError, match=match):
        evaluator.score(generated)
    with pytest.raises(ValueError, match=match.replace("`images`", "`real_images`")):
        Evaluator(FeatureClassifier(8), generated)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 8.0}, "`image_size` must be 8, 16 or 32, got 8.0"),  # was built: input_shape (1, 8.0, 8.0)
        ({"width": 0}, "`width` must be a positive integer, got 0"),  # was a RuntimeError at the first forward call
        ({"width": 1.5}, "`width` must be a positive integer, got 1.5"),
        ({"in_channels": 0}, "`in_channels` must be a positive integer, got 0"),
        ({"num_features": 0}, "`num_features` must be a positive integer, got 0"),  # was built: 0 features, FD 0
        ({"num_classes": 0}, "`num_classes` must be a positive integer, got 0"),
    ],
)
def test_feature_classifier_refuses_sizes_that_build_no_classifier(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        FeatureClassifier(**{"image_size": 8, **kwargs})
    assert FeatureClassifier(np.int64(8), width=np.int64(4)).input_shape == (1, 8, 8)  # numpy integers are integers


@pytest.mark.parametrize(
    "convert, low, high",
    [
        (lambda x: (x + 1) * 127.5 * 2 - 1, -1, 509),  # levels in [0, 255] given `images * 2 - 1`, meant for [0, 1]
        (lambda x: x * 127.5, -127.5, 127.5),  # levels in [0, 255] centred: `images - 127.5`
    ],
)
def test_images_far_outside_minus_one_one_are_refused(digits, convert, low, high):
    # such batches have values below 0, so the [0, 1] / [0, 255] check let them through: they were scored silently
    # (an FD in the thousands) where slightly outside [-1, 1] (unclamped samples, added noise) is meant
    images, labels, test, test_labels = digits
    evaluator = Evaluator(FeatureClassifier(8), images[:64])
    match = re.escape(f"`images` must be in [-1, 1], got values in [{low:g}, {high:g}]")
    with pytest.raises(ValueError, match=match):
        evaluator.score(convert(test), test_labels)
    with pytest.raises(ValueError, match=match.replace("`images`", "`real_images`")):
        Evaluator(FeatureClassifier(8), convert(images[:64]))
    with pytest.raises(ValueError, match=match):
        train_classifier(convert(images[:64]), labels[:64], max_steps=1)
    evaluator.score(test + 0.5 * torch.randn(test.shape, generator=torch.Generator().manual_seed(0)))  # noise: taken


def test_pil_images_of_a_pipeline_are_refused_with_the_conversion(digits):
    # a diffusers pipeline's default output (output_type="pil") is a list of PIL images; was "got shape list"
    from PIL import Image

    images, labels, _, _ = digits
    evaluator = Evaluator(FeatureClassifier(8), images[:16])
    generated = [Image.new("L", (8, 8)) for _ in range(4)]
    match = r"`images` must be a torch tensor.*got a list of 4 PIL images.*output_type=\"pt\".*images \* 2 - 1"
    with pytest.raises(ValueError, match=match):
        evaluator.score(generated)
    with pytest.raises(ValueError, match=match.replace("`images`", "`real_images`")):
        Evaluator(FeatureClassifier(8), generated)
    with pytest.raises(ValueError, match=r"`images` must be a torch tensor.*got a PIL image"):
        train_classifier(generated[0], labels[:1], max_steps=1)
