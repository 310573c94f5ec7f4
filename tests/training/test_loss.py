"""`diffusion_loss`: the right target for every prediction type, EDM preconditioning and weighting, clear errors."""

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler

from diffusers_stages.training import diffusion_loss

CLEAN = torch.rand(4, 3, 8, 8, generator=torch.manual_seed(0)) * 2 - 1
NOISE = torch.randn(4, 3, 8, 8, generator=torch.manual_seed(1))
T = torch.tensor([0, 10, 500, 999])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_model_has_zero_loss_and_others_do_not(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    target = {"epsilon": NOISE, "sample": CLEAN, "v_prediction": scheduler.get_velocity(CLEAN, NOISE, T)}[
        prediction_type
    ]

    def oracle(noisy, t, class_labels=None):
        assert torch.allclose(noisy, scheduler.add_noise(CLEAN, NOISE, T)) and torch.equal(t, T)
        return target

    loss = diffusion_loss(oracle, scheduler, CLEAN, T, noise=NOISE)
    assert loss.shape == (4,) and loss.abs().max() < 1e-12
    zero = diffusion_loss(lambda x, t, class_labels=None: torch.zeros_like(x), scheduler, CLEAN, T, noise=NOISE)
    assert torch.allclose(zero, target.pow(2).flatten(1).mean(1))


def test_min_snr_weighting():
    scheduler = DDPMScheduler()

    def zero(x, t, class_labels=None):
        return (torch.zeros_like(x),)

    plain = diffusion_loss(zero, scheduler, CLEAN, T, noise=NOISE)
    weighted = diffusion_loss(zero, scheduler, CLEAN, T, noise=NOISE, snr_gamma=5.0)
    snr = scheduler.alphas_cumprod[T] / (1 - scheduler.alphas_cumprod[T])
    assert torch.allclose(weighted, plain * torch.clamp(snr, max=5.0) / snr)


def test_edm_preconditioning_and_weighting():
    scheduler = EDMEulerScheduler()
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    s, sd = sigma.view(-1, 1, 1, 1), scheduler.config.sigma_data
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()  # Karras et al. (2022), Table 1

    def oracle(model_input, c_noise, class_labels=None):
        noisy = CLEAN + s * NOISE
        assert torch.allclose(model_input, noisy / (s**2 + sd**2).sqrt()) and torch.allclose(c_noise, sigma.log() / 4)
        return (CLEAN - c_skip * noisy) / c_out  # F such that D = c_skip x + c_out F = x_0

    assert diffusion_loss(oracle, scheduler, CLEAN, sigma, noise=NOISE).abs().max() < 1e-8
    zero = diffusion_loss(lambda x, c, class_labels=None: torch.zeros_like(x), scheduler, CLEAN, sigma, noise=NOISE)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    expected = weight * (c_skip * (CLEAN + s * NOISE) - CLEAN).pow(2).flatten(1).mean(1)
    assert torch.allclose(zero, expected, rtol=1e-5)


def test_errors_name_the_argument():
    def model(x, t, class_labels=None):
        return x

    with pytest.raises(ValueError, match="`timesteps` must hold one value per sample"):
        diffusion_loss(model, DDPMScheduler(), CLEAN, T[:2])
    with pytest.raises(ValueError, match="`noise` must have the shape"):
        diffusion_loss(model, DDPMScheduler(), CLEAN, T, noise=NOISE[:1])
    with pytest.raises(ValueError, match="`snr_gamma` applies to DDPM-style"):
        diffusion_loss(model, EDMEulerScheduler(), CLEAN, torch.ones(4), snr_gamma=5.0)
    with pytest.raises(ValueError, match="sigma > 0"):
        diffusion_loss(model, EDMEulerScheduler(), CLEAN, torch.zeros(4))


@pytest.mark.parametrize(
    "timesteps, got",
    [
        (torch.tensor([0.3, 10.0, 500.0, 999.0]), "0.3"),  # was: truncated to 0 without a word
        (torch.tensor([-1, 10, 500, 999]), "-1"),  # was: alphas_cumprod[-1], the noisiest level
        (torch.tensor([0, 10, 500, 1000]), "1000"),  # was: an IndexError inside add_noise
    ],
)
def test_ddpm_timesteps_must_be_training_timesteps(timesteps, got):
    with pytest.raises(
        ValueError, match=f"`timesteps` must be integer training timesteps in \\[0, 1000\\), got {got}"
    ):
        diffusion_loss(lambda x, t, class_labels=None: x, DDPMScheduler(), CLEAN, timesteps, noise=NOISE)
    whole = diffusion_loss(lambda x, t, class_labels=None: x, DDPMScheduler(), CLEAN, T.float(), noise=NOISE)
    assert torch.equal(
        whole, diffusion_loss(lambda x, t, class_labels=None: x, DDPMScheduler(), CLEAN, T, noise=NOISE)
    )


@pytest.mark.parametrize("snr_gamma", [0.0, -5.0, float("nan"), float("inf"), True])
def test_snr_gamma_must_be_a_positive_number(snr_gamma):
    # 0 gave a zero loss, -5 a negative one and NaN a NaN one, without a word
    with pytest.raises(ValueError, match=f"`snr_gamma` must be a finite number > 0, got {snr_gamma}"):
        diffusion_loss(lambda x, t, class_labels=None: x, DDPMScheduler(), CLEAN, T, noise=NOISE, snr_gamma=snr_gamma)


@pytest.mark.parametrize("scheduler, timesteps", [(DDPMScheduler(), T), (EDMEulerScheduler(), torch.ones(4))])
def test_a_model_output_of_another_shape_is_refused(scheduler, timesteps):
    # (4, 1, 8, 8) against (4, 3, 8, 8) was broadcast over the channels and scored without a word
    with pytest.raises(
        ValueError, match=r"model's output has shape \(4, 1, 8, 8\), not the shape of `clean` \(4, 3, 8, 8\)"
    ):
        diffusion_loss(lambda x, t, class_labels=None: x[:, :1], scheduler, CLEAN, timesteps, noise=NOISE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_edm_sigmas_must_be_finite(bad):
    sigma = torch.tensor([bad, 1.0, 2.0, 3.0])  # was: a NaN loss for that sample, without a word
    with pytest.raises(ValueError, match=f"EDM `timesteps` must be finite noise levels sigma > 0, got {bad}"):
        diffusion_loss(lambda x, c, class_labels=None: x, EDMEulerScheduler(), CLEAN, sigma, noise=NOISE)


def test_min_snr_weighting_with_zero_terminal_snr_is_finite():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)  # SNR 0 at t = 999

    def zero(x, t, class_labels=None):
        return torch.zeros_like(x)

    plain = diffusion_loss(zero, scheduler, CLEAN, T, noise=NOISE)
    weighted = diffusion_loss(zero, scheduler, CLEAN, T, noise=NOISE, snr_gamma=5.0)
    assert torch.isfinite(weighted).all()  # was NaN: min(SNR, gamma) / SNR = 0 / 0
    assert weighted[-1] == plain[-1]  # its limit as SNR -> 0: weight 1


def test_snr_gamma_may_be_a_numpy_number():
    # np.float32(5.0) (a value read from a NumPy array or a sweep) was refused as "`snr_gamma` must be a finite number
    # > 0, got np.float32(5.0)"
    import numpy as np

    scheduler = DDPMScheduler()

    def model(x, t, class_labels=None):
        return x * 0.5

    expected = diffusion_loss(model, scheduler, CLEAN, T, noise=NOISE, snr_gamma=5.0)
    for snr_gamma in (np.float32(5.0), np.float64(5.0), np.int64(5)):
        assert torch.equal(diffusion_loss(model, scheduler, CLEAN, T, noise=NOISE, snr_gamma=snr_gamma), expected)
    with pytest.raises(ValueError, match="`snr_gamma` must be a finite number > 0, got np.True_"):
        diffusion_loss(model, scheduler, CLEAN, T, noise=NOISE, snr_gamma=np.True_)
