"""The closed-form optimal denoiser: exact where theory says it is, and equal to a direct softmax when streamed."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_stages.planning import (
    NoiseSchedule,
    boundaries_from_similarity,
    optimal_denoiser_mean,
    optimal_denoiser_plan,
    optimal_predictions,
    pixel_agreement,
)
from diffusers_stages.planning.optimal_denoiser import similarity_matrix


def test_streamed_softmax_equals_direct_posterior_mean():
    generator = torch.manual_seed(0)
    data = torch.randn(37, 12, generator=generator)
    noisy = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    a = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.01], dtype=torch.float64)
    s = torch.tensor([0.01, 0.3, 0.8, 1.0, 1.0], dtype=torch.float64)
    y = data.double()
    logits = -((noisy[:, None] - a[:, None, None] * y[None]) ** 2).sum(-1) / (2 * s[:, None] ** 2)
    direct = torch.softmax(logits, dim=1) @ y
    for chunk_size in (1, 4, 37, 1000):  # chunks never change the answer (online log-sum-exp)
        torch.testing.assert_close(
            optimal_denoiser_mean(noisy, data, a, s, chunk_size), direct, rtol=1e-10, atol=1e-12
        )


def test_float64_softmax_survives_tiny_noise():
    # at s = 1e-3 the logits are ~-1e6: a float32 exp underflows everywhere, the streamed float64 one does not
    data = torch.tensor([[0.5, -0.5], [-0.5, 0.5]])
    noisy = torch.tensor([[0.5 + 1e-3, -0.5]], dtype=torch.float64) + 3.0  # far from both images
    mean = optimal_denoiser_mean(noisy, data, 1.0, 1e-3)
    assert torch.isfinite(mean).all()
    torch.testing.assert_close(mean, torch.tensor([[0.5, -0.5]], dtype=torch.float64))


def test_single_training_image_is_recovered_exactly():
    data = torch.rand(1, 1, 4, 4, generator=torch.manual_seed(0)) * 2 - 1
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), num_levels=10)
    sample, clean, noise = optimal_predictions(data, schedule, 3, torch.manual_seed(1), "sample")
    eps, _, noise_again = optimal_predictions(data, schedule, 3, torch.manual_seed(1), "epsilon")
    torch.testing.assert_close(sample, clean.expand_as(sample))  # E[x0 | x_t] = x0 at every level
    torch.testing.assert_close(eps, noise.expand_as(eps), atol=1e-4, rtol=0)  # eps* = eps
    assert torch.equal(noise, noise_again)
    # every level is the same task: similarity 1 everywhere, so no boundary can be placed; the plan says why (one
    # image), not that `alpha` is wrong
    assert torch.equal(pixel_agreement(sample, 0, 0.01), torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="`data` holds 1 image: planning needs at least 2 different training images"):
        optimal_denoiser_plan(data, schedule, num_stages=3, num_samples=3, generator=torch.manual_seed(0))


def _normal_expectation(fn, points: int = 40001) -> float:
    z = torch.linspace(-9, 9, points, dtype=torch.float64)
    weights = torch.exp(-(z**2) / 2)
    return float((fn(z) * weights).sum() / weights.sum())


def test_two_antipodal_images_give_the_closed_form_curves_and_boundaries():
    # Training set {+1, -1} (D pixels). For x = a y + s eps: E[x0 | x] = tanh(u^2 + u Z) * 1, with u = a sqrt(D) / s
    # and Z = sum(eps) / sqrt(D) ~ N(0, 1) (for y = -1 the same with Z -> -Z). Every pixel agrees or none does, so
    # S(t, anchor) = P(|tanh(u_t^2 + u_t Z) - tanh(u_A^2 + u_A Z)| <= eta); at the clean anchor tanh = 1 and
    # S(t, 0) = Phi((u_t^2 - atanh(1 - eta)) / u_t) exactly.
    dim, eta, alpha = 16, 0.1, 0.9
    data = torch.cat([torch.ones(1, dim), -torch.ones(1, dim)])
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), num_levels=60)
    u = schedule.signal_scale * math.sqrt(dim) / schedule.noise_scale
    h = math.atanh(1 - eta)
    clean_curve = 0.5 * (1 + torch.erf((u**2 - h) / u / math.sqrt(2)))
    noisy_curve = torch.tensor(
        [
            _normal_expectation(
                lambda z, ut=ut: (
                    (torch.tanh(ut**2 + ut * z) - torch.tanh(u[-1] ** 2 + u[-1] * z)).abs() <= eta
                ).double()
            )
            for ut in u.tolist()
        ]
    )
    theory = {0: clean_curve, 59: noisy_curve}
    expected, _ = boundaries_from_similarity(theory.__getitem__, 60, 3, alpha)

    predictions, _, _ = optimal_predictions(data, schedule, 4000, torch.manual_seed(0))
    for anchor, curve in theory.items():  # Monte Carlo over K = 4000 draws: within 4 standard errors
        assert (pixel_agreement(predictions, anchor, eta) - curve).abs().max() < 0.035
    plan = optimal_denoiser_plan(data, schedule, 3, alpha, eta, num_samples=4000, generator=torch.manual_seed(0))
    expected_levels = [float(np.interp(p, range(60), schedule.levels.numpy())) for p in expected]
    for got, want in zip(plan.partition.boundaries, expected_levels):
        assert abs(got - want) <= 10, (plan.partition.boundaries, expected_levels)  # 0.01 of T


@pytest.mark.parametrize("target", ["sample", "epsilon"])
def test_training_images_on_an_accelerator(target, monkeypatch):
    # the draws (images, noise) and the predictions are on the CPU whatever the data's device: the same as from the CPU
    from tests.fake_cuda import fake_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with CUDA, whose stand-in this is

    data = torch.randn(9, 1, 4, 4, generator=torch.manual_seed(0))
    schedule = NoiseSchedule.edm(num_levels=3)
    expected = optimal_predictions(data, schedule, 4, torch.manual_seed(1), target, device="cpu")
    with fake_cuda():
        for device in ("cuda", "cpu"):
            got = optimal_predictions(data.to("cuda"), schedule, 4, torch.manual_seed(1), target, device=device)
            for a, b in zip(got, expected):
                assert a.device == torch.device("cpu") and torch.allclose(a, b)


def test_training_images_that_require_grad_are_planned_on_without_an_autograd_graph():
    # latents encoded outside `torch.no_grad()` require grad: every chunk of the streamed softmax was recorded for
    # backward, so memory grew with the data set (O(queries x N)) instead of staying O(queries x chunk)
    data = torch.randn(40, 1, 4, 4, generator=torch.manual_seed(0)).requires_grad_(True)
    schedule = NoiseSchedule.edm(num_levels=3)
    for target in ("sample", "epsilon"):
        predictions, clean, noise = optimal_predictions(data, schedule, 4, torch.manual_seed(1), target, chunk_size=8)
        assert not predictions.requires_grad and not clean.requires_grad and not noise.requires_grad
    noisy = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    scale = torch.ones(3, dtype=torch.float64, requires_grad=True)
    assert not optimal_denoiser_mean(noisy, data.reshape(40, -1), scale, scale, chunk_size=8).requires_grad


@pytest.mark.parametrize(
    "signal_scale, noise_scale, match",
    [  # were NaN posterior means (s = 0, nan, inf), or taken as |s| (s < 0)
        (1.0, 0.0, "`noise_scale` must be finite and > 0, got 0.0"),
        (1.0, -1.0, "`noise_scale` must be finite and > 0, got -1.0"),
        (1.0, math.inf, "`noise_scale` must be finite and > 0, got inf"),
        (1.0, torch.tensor([1.0, 0.0]), "`noise_scale` must be finite and > 0, got 0.0"),
        (math.nan, 1.0, "`signal_scale` must be finite, got nan"),
    ],
)
def test_optimal_denoiser_mean_refuses_scales_it_has_no_answer_for(signal_scale, noise_scale, match):
    data = torch.randn(4, 3, generator=torch.manual_seed(0))
    with pytest.raises(ValueError, match=match):
        optimal_denoiser_mean(data[:2].double() + 1, data, signal_scale, noise_scale)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op makes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]
        self.largest = max([self.largest, *sizes])
        return out


def test_similarity_is_measured_one_level_at_a_time():
    # every anchor compared all (num_levels, K, D) predictions at once: temporaries of twice the predictions (the
    # ilp's 100 x 100 matrix on 128 draws of 32x32 RGB images took 23 s), now one level's (K, D) at a time (2 s)
    predictions = torch.rand(6, 5, 8, generator=torch.manual_seed(0))  # 6 levels, 5 draws, 8 pixels
    expected = ((predictions[:, None] - predictions[None]).abs() <= 0.3).double().mean(dim=(2, 3))
    with _LargestTensor() as mode:
        similarity = similarity_matrix(predictions, 0.3)
        curve = pixel_agreement(predictions, 4, 0.3)
    assert mode.largest <= 5 * 8  # one level's predictions (the 6 x 6 matrix is smaller)
    torch.testing.assert_close(similarity, expected, rtol=0, atol=1e-15)
    assert torch.equal(similarity, similarity.T) and torch.equal(curve, similarity[4])
