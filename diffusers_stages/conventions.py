"""Conventions the whole package shares, each written once: the paper's default stage boundaries, the class label
that means "no class" (classifier-free guidance), and how latents are scaled for a VAE.

Example:

```py
>>> from diffusers_stages.conventions import DEFAULT_STAGE_BOUNDARIES, null_class_label, num_data_classes
>>> DEFAULT_STAGE_BOUNDARIES
(442, 631)
>>> num_data_classes(11), null_class_label(11)  # 10 classes + the unconditional label, which is the last
(10, 10)

```
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch

# Zhang et al. (CVPR 2024), Table 4: the optimal-denoiser split on CIFAR-10, as fractions of a DDPM schedule
# ("timestep") and in EDM's sigma units ("sigma", the authors' EDM code).
PAPER_BOUNDARIES: dict[str, tuple[float, float]] = {"timestep": (0.442, 0.631), "sigma": (2.5103, 7.6577)}
# ... and in training timesteps of a 1000-step schedule: the default of every staged model and command
DEFAULT_STAGE_BOUNDARIES: tuple[int, int] = (442, 631)
DEFAULT_SIGMA_BOUNDARIES: tuple[float, float] = PAPER_BOUNDARIES["sigma"]


def paper_boundaries(boundary_units: str, num_train_timesteps: int = 1000) -> list[float]:
    """The paper's boundaries in ``boundary_units``: training timesteps of a ``num_train_timesteps`` schedule, or
    sigmas."""
    if boundary_units not in PAPER_BOUNDARIES:
        raise ValueError(f"`boundary_units` must be one of {sorted(PAPER_BOUNDARIES)}, got {boundary_units!r}.")
    boundaries = PAPER_BOUNDARIES[boundary_units]
    if boundary_units == "timestep":
        return [round(b * num_train_timesteps) for b in boundaries]
    return list(boundaries)


# ----------------------------------------------------------------------------------------------------------------------
# class labels: a class-conditional model has `num_class_embeds` = classes + 1; the last label is "no class"
def class_embedding_count(config) -> int | None:
    """How many class embeddings a model has, its unconditional label (the last) included; ``None`` when it is not
    class-conditional: ``num_class_embeds`` (diffusers' U-Nets and this package's models) or, for a DiT
    (``norm_type="ada_norm_zero"``), its ``num_embeds_ada_norm`` classes plus the unconditional label."""
    if getattr(config, "num_class_embeds", None) is not None:
        return config.num_class_embeds
    if getattr(config, "norm_type", None) == "ada_norm_zero" and getattr(config, "num_embeds_ada_norm", None):
        return config.num_embeds_ada_norm + 1
    return None


def num_data_classes(num_class_embeds: int | None) -> int:
    """The classes of the data behind ``num_class_embeds`` embeddings (0 for an unconditional model)."""
    return 0 if num_class_embeds is None else num_class_embeds - 1


def null_class_label(num_class_embeds: int) -> int:
    """The label that means "no class" (dropped for classifier-free guidance): the last embedding."""
    return num_class_embeds - 1


# ----------------------------------------------------------------------------------------------------------------------
# latent diffusion: the model sees z = (E(x) - shift_factor) * scaling_factor, as diffusers' pipelines do; with a VAE
# that carries per-channel `latents_mean` / `latents_std` (SDXL-type AutoencoderKL): (E(x) - mean) * scaling / std
def _latent_statistics(vae, latents: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """``(shift, std)`` of ``vae``'s latents, as tensors broadcast over ``latents``' channels or numbers."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return getattr(config, "shift_factor", None) or 0.0, 1.0
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    return tuple(torch.tensor(v, device=latents.device, dtype=latents.dtype).view(shape) for v in (mean, std))


def _is_number(value) -> bool:
    """A finite int or float (a bool is no number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def latent_statistics_error(config, channels: int) -> str | None:
    """Why the options of a VAE ``config`` (a dict or a model's config) that scale its latents cannot scale latents
    of ``channels`` channels: ``scaling_factor`` must be a positive number (when given: a config file without one
    loads the class's default), ``shift_factor`` a number or None, and ``latents_mean`` / ``latents_std`` (used,
    instead of the shift, when both are given) one number per channel, the std positive. None when they can."""
    scale = config.get("scaling_factor", 1.0)
    if not (_is_number(scale) and scale > 0):  # a zero one trained on all-zero latents, silently
        return f"`scaling_factor` must be a positive number (the latents are scaled by it), got {scale!r}"
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None:
        shift = config.get("shift_factor")
        if shift is not None and not _is_number(shift):
            return f"`shift_factor` must be a number or null (the latents are shifted by it), got {shift!r}"
        return None
    for name, values in (("latents_mean", mean), ("latents_std", std)):
        numbers = isinstance(values, (list, tuple)) and all(_is_number(v) for v in values)
        if not numbers or len(values) != channels:
            return f"`{name}` must give one number per latent channel ({channels}), got {values!r}"
    if not all(v > 0 for v in std):
        return f"`latents_std` must be positive (the latents are divided by it), got {list(std)!r}"
    return None


def vae_to_model_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latents (a posterior sample) as the denoiser is trained on them."""
    shift, std = _latent_statistics(vae, latents)
    return (latents - shift) * vae.config.scaling_factor / std


@contextlib.contextmanager
def upcast_vae(vae) -> Iterator[None]:
    """Within the block, a float16 ``vae`` whose config asks for it (``force_upcast``: SDXL's VAE overflows in
    float16) is in float32; it is left in float16. As diffusers' SDXL pipelines encode and decode."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


@torch.no_grad()
def encode_model_latents(
    vae,
    images: torch.Tensor,
    generator: torch.Generator,
    batch_size: int = 64,
    progress: Callable[[range], Iterable[int]] | None = None,
) -> torch.Tensor:
    """``images`` (in [-1, 1]) as a latent denoiser is trained on them: posterior samples of ``vae`` drawn from
    ``generator``, ``batch_size`` images at a time (each batch wrapped in ``progress``, e.g. tqdm, if given), scaled
    by `vae_to_model_latents`; float32, on ``vae``'s device. A float16 ``vae`` with ``force_upcast`` encodes in
    float32 (`upcast_vae`), as the training scripts keep it."""
    starts = range(0, len(images), batch_size)
    with upcast_vae(vae):
        latents = [
            vae_to_model_latents(
                vae, vae.encode(images[i : i + batch_size].to(vae.device, vae.dtype)).latent_dist.sample(generator)
            )
            for i in (starts if progress is None else progress(starts))
        ]
    return torch.cat(latents).float()


def model_to_vae_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `vae_to_model_latents`: sampled latents as the VAE's decoder takes them."""
    shift, std = _latent_statistics(vae, latents)
    return latents * std / vae.config.scaling_factor + shift
