"""The denoising loss, per sample, for DDPM-style and EDM-style models.

Per-sample values (rather than the batch mean) let a training loop log the loss of each stage of a
[`~diffusers_stages.TimestepPartition`] separately, and weight or mask samples as it needs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor

from .schedulers import is_edm_scheduler


def _model_output(model: Callable, sample: torch.Tensor, timestep: torch.Tensor, class_labels, kwargs) -> torch.Tensor:
    out = model(sample, timestep, class_labels=class_labels, **kwargs)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, tuple):
        out = out[0]
    if tuple(out.shape) != tuple(sample.shape):  # it would be broadcast against the target and scored, silently
        raise ValueError(
            f"The model's output has shape {tuple(out.shape)}, not the shape of `clean` {tuple(sample.shape)}: "
            "a model that also predicts the variance (twice the channels) needs its first half taken out."
        )
    return out


def _per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_loss(
    model: Callable,
    noise_scheduler: SchedulerMixin,
    clean: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    Noise ``clean`` to ``timesteps``, denoise it with ``model`` and return the loss of each sample, shape ``(batch,)``.

    Two families of noise schedulers are supported:

    - DDPM-style (`DDPMScheduler`, `DDIMScheduler`, ...; ``timesteps`` are integer training timesteps): the model
      sees ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4) and its output is compared with
      the scheduler's ``prediction_type`` target: ``eps`` ("epsilon", Ho et al. eq. 14), ``v`` ("v_prediction",
      Salimans & Ho 2022) or ``x_0`` ("sample"). ``snr_gamma`` turns on Min-SNR-gamma weighting (Hang et al. 2023).
    - EDM-style (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`; ``timesteps`` are noise levels ``sigma``):
      the model sees ``c_in(sigma) (x_0 + sigma n)`` and ``c_noise = ln(sigma)/4``, its output ``F`` gives the
      denoiser ``D = c_skip x + c_out F`` (Karras et al. 2022, eq. 7), and the loss is
      ``lambda(sigma) ||D - x_0||^2`` with ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (eq. 2/8).

    Args:
        model: a diffusers model or any callable ``model(sample, timestep, class_labels=..., **model_kwargs)``
            returning a tensor, a tuple, or an output with ``.sample``.
        noise_scheduler: the training noise scheduler (its config fixes the schedule and the prediction type).
        clean: clean samples (images or latents), shape ``(batch, channels, height, width)``.
        timesteps: one training timestep (DDPM-style) or one sigma (EDM-style) per sample.
        noise: the Gaussian noise to add; drawn with ``generator`` when not given.
        class_labels: class labels passed to the model.
        model_kwargs: further keyword arguments of the model call (e.g. ``stage_index``).
        snr_gamma: Min-SNR-gamma weighting for DDPM-style schedulers; ``None`` for plain MSE.
        generator: draws ``noise`` when it is not given (a CPU generator draws on the CPU, whatever the device).

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDPMScheduler, UNet2DModel
    >>> from diffusers_stages.training import diffusion_loss
    >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    >>> loss = diffusion_loss(unet, DDPMScheduler(), torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 10, 500, 999]))
    >>> loss.shape
    torch.Size([4])

    ```
    """
    # 1. check the inputs
    if clean.ndim < 2:
        raise ValueError(f"`clean` must have a batch dimension and at least one more, got shape {tuple(clean.shape)}.")
    timesteps = torch.as_tensor(timesteps, device=clean.device)
    if timesteps.ndim != 1 or timesteps.shape[0] != clean.shape[0]:
        raise ValueError(
            f"`timesteps` must hold one value per sample ({clean.shape[0]}), got shape {tuple(timesteps.shape)}."
        )
    if noise is None:
        # diffusers' draw: a CPU generator draws on the CPU, then the noise moves to ``clean``'s device
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    elif noise.shape != clean.shape:
        raise ValueError(f"`noise` must have the shape of `clean` {tuple(clean.shape)}, got {tuple(noise.shape)}.")
    if snr_gamma is not None and (
        isinstance(snr_gamma, bool)
        or not isinstance(snr_gamma, numbers.Real)  # numpy's numbers too
        or not math.isfinite(snr_gamma)
        or snr_gamma <= 0
    ):  # 0 would zero every loss, a negative gamma flip its sign, NaN make it NaN
        raise ValueError(f"`snr_gamma` must be a finite number > 0, got {snr_gamma!r}.")
    snr_gamma = None if snr_gamma is None else float(snr_gamma)
    model_kwargs = model_kwargs or {}
    prediction_type = noise_scheduler.config.prediction_type
    view = (-1,) + (1,) * (clean.ndim - 1)

    # 2. EDM (Karras et al. 2022): preconditioned denoiser D and weighted loss, eq. 2, 7 and 8
    if is_edm_scheduler(noise_scheduler):
        if snr_gamma is not None:
            raise ValueError(
                "`snr_gamma` applies to DDPM-style schedulers only; EDM uses its own weighting lambda(sigma)."
            )
        sigma = timesteps.float().reshape(view)
        bad = ~torch.isfinite(sigma) | (sigma <= 0)
        if bool(bad.any()):
            raise ValueError(f"EDM `timesteps` must be finite noise levels sigma > 0, got {sigma[bad][0].item()}.")
        noisy = clean + sigma * noise
        model_input = noise_scheduler.precondition_inputs(noisy, sigma).to(clean.dtype)
        c_noise = noise_scheduler.precondition_noise(sigma.flatten())
        output = _model_output(model, model_input, c_noise, class_labels, model_kwargs)
        denoised = noise_scheduler.precondition_outputs(noisy.float(), output.float(), sigma)
        sigma_data = noise_scheduler.config.sigma_data
        weight = (sigma.flatten() ** 2 + sigma_data**2) / (sigma.flatten() * sigma_data) ** 2
        return weight * _per_sample_mse(denoised, clean)

    # 3. DDPM-style: forward process q(x_t | x_0), Ho et al. (2020) eq. 4
    if not hasattr(noise_scheduler, "add_noise") or not hasattr(noise_scheduler, "alphas_cumprod"):
        raise ValueError(
            f"`noise_scheduler` {type(noise_scheduler).__name__} is neither DDPM-style (alphas_cumprod, add_noise) "
            "nor EDM-style: train with DDPMScheduler or EDMEulerScheduler."
        )
    num_train_timesteps = len(noise_scheduler.alphas_cumprod)
    outside = (timesteps != timesteps.round()) | (timesteps < 0) | (timesteps >= num_train_timesteps)
    if bool(outside.any()):  # a fraction would be truncated and -1 would index the noisiest level, silently
        raise ValueError(
            f"`timesteps` must be integer training timesteps in [0, {num_train_timesteps}), got "
            f"{timesteps[outside][0].item():g}."
        )
    timesteps = timesteps.long()
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    output = _model_output(model, noisy, timesteps, class_labels, model_kwargs)

    # 4. the target of the scheduler's prediction type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    elif prediction_type == "sample":
        target = clean
    else:
        raise ValueError(
            f"`prediction_type` {prediction_type!r} of the noise scheduler is not supported: use 'epsilon', "
            "'v_prediction' or 'sample'."
        )
    loss = _per_sample_mse(output, target)

    # 5. Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps).float()
        weight = torch.clamp(snr, max=snr_gamma)
        if prediction_type == "epsilon":  # at SNR 0 (zero terminal SNR), the limit of min(SNR, gamma) / SNR: 1
            weight = torch.where(snr > 0, weight / snr, torch.ones_like(snr))
        elif prediction_type == "v_prediction":
            weight = weight / (snr + 1)
        loss = loss * weight
    return loss
