"""The noise schedule as stage planning sees it: a grid of noise levels with ``x_t = a_t * x0 + s_t * eps``.

Two parameterisations, matching the two units of [`TimestepPartition`]:

- ``"timestep"``: a discrete DDPM-style schedule, ``a_t = sqrt(alphas_cumprod[t])``,
  ``s_t = sqrt(1 - alphas_cumprod[t])`` (taken from any diffusers scheduler that has ``alphas_cumprod``).
- ``"sigma"``: an EDM/Karras schedule, ``a = 1``, ``s = sigma`` with ``sigma`` in ``[sigma_min, sigma_max]``.
"""

from __future__ import annotations

import math

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.checks import _is_integral
from ..partition import TimestepPartition
from ..schedulers import is_edm_scheduler


class NoiseSchedule:
    r"""
    A grid of noise levels, clean end first, in the units of a [`TimestepPartition`].

    Args:
        levels (`torch.Tensor`): the grid, strictly increasing, in ``units`` (training timesteps in
            ``[0, num_train_timesteps]``, or positive finite sigmas).
        signal_scale (`torch.Tensor`): ``a`` of each level.
        noise_scale (`torch.Tensor`): ``s`` of each level (the three are kept as float64 on the CPU).
        units (`str`): ``"timestep"`` or ``"sigma"``.
        num_train_timesteps (`int`, defaults to 1000): length of the training schedule (``"timestep"`` units).
        sigma_data (`float`, defaults to 0.5): EDM's data standard deviation (preconditioning, ``"sigma"`` units).

    Example:

    ```py
    >>> from diffusers import DDPMScheduler
    >>> from diffusers_stages.planning import NoiseSchedule
    >>> schedule = NoiseSchedule.from_scheduler(DDPMScheduler(), num_levels=5)
    >>> schedule.levels.tolist()
    [0.0, 250.0, 500.0, 749.0, 999.0]
    >>> NoiseSchedule.edm(num_levels=3).levels.tolist()  # sigma_min=0.002, sigma_max=80, rho=7
    [0.002, 2.5..., 80.0]

    ```
    """

    def __init__(
        self,
        levels: torch.Tensor,
        signal_scale: torch.Tensor,
        noise_scale: torch.Tensor,
        units: str,
        num_train_timesteps: int = 1000,
        sigma_data: float = 0.5,
    ):
        # on the CPU, where the planning computes (a scheduler's alphas_cumprod may be on an accelerator)
        levels, signal_scale, noise_scale = (
            torch.as_tensor(v, dtype=torch.float64, device="cpu") for v in (levels, signal_scale, noise_scale)
        )
        if levels.ndim != 1 or levels.numel() < 3:
            raise ValueError(
                f"`levels` must be a 1-D grid of at least 3 noise levels, got shape {tuple(levels.shape)}."
            )
        if not bool((levels[1:] > levels[:-1]).all()):
            raise ValueError("`levels` must be strictly increasing (clean end first).")
        # the partition's validation of units and num_train_timesteps, reused
        TimestepPartition([], num_train_timesteps, units)
        ends = f"got {levels[0].item()} to {levels[-1].item()}"
        if units == "timestep" and not 0 <= levels[0] <= levels[-1] <= num_train_timesteps:
            raise ValueError(f"`levels` must lie in [0, {num_train_timesteps}] ('timestep' units), {ends}.")
        if units == "sigma" and not 0 < levels[0] <= levels[-1] < math.inf:  # boundaries are placed by log-sigma
            raise ValueError(f"`levels` must be positive and finite sigmas ('sigma' units), {ends}.")
        if signal_scale.shape != levels.shape or noise_scale.shape != levels.shape:
            raise ValueError("`signal_scale` and `noise_scale` need one value per level.")
        for name, scale in (("signal_scale", signal_scale), ("noise_scale", noise_scale)):
            bad = ~torch.isfinite(scale) | (scale < 0)
            if bool(bad.any()):  # e.g. betas above 1: negative alphas_cumprod, NaN scales
                raise ValueError(f"`{name}` must be finite and >= 0 at every level, got {scale[bad][0].item()}.")
        if not bool((noise_scale > 0).all()):
            raise ValueError("`noise_scale` must be positive at every level (plan from the first noisy level on).")
        self.levels, self.signal_scale, self.noise_scale = levels, signal_scale, noise_scale
        self.units, self.num_train_timesteps, self.sigma_data = units, num_train_timesteps, sigma_data

    # ----------------------------------------------------------------------------------------------------------
    # construction
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, num_levels: int = 100) -> NoiseSchedule:
        """A discrete schedule from its ``alphas_cumprod`` (one value per training timestep, 0 first)."""
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        num_train_timesteps = alphas_cumprod.numel()
        if not _is_integral(num_levels) or not 3 <= num_levels <= num_train_timesteps:
            raise ValueError(f"`num_levels` must be an integer in [3, {num_train_timesteps}], got {num_levels!r}.")
        num_levels = int(num_levels)
        timesteps = torch.linspace(0, num_train_timesteps - 1, num_levels, dtype=torch.float64).round().unique()
        abar = alphas_cumprod[timesteps.long()]
        return cls(timesteps, abar.sqrt(), (1 - abar).sqrt(), "timestep", num_train_timesteps)

    @classmethod
    def edm(
        cls,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        num_levels: int = 100,
        sigma_data: float = 0.5,
    ) -> NoiseSchedule:
        """An EDM/Karras schedule: ``num_levels`` sigmas spaced as Karras et al. (2022), eq. 5, clean end first."""
        if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
            raise ValueError(
                f"Need 0 < `sigma_min` < `sigma_max` < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        if not _is_integral(num_levels) or num_levels < 3:
            raise ValueError(f"`num_levels` must be an integer >= 3, got {num_levels!r}.")
        num_levels = int(num_levels)
        if not 0 < rho < math.inf:
            raise ValueError(f"`rho` must be a positive finite number, got {rho!r}.")
        ramp = torch.linspace(0, 1, num_levels, dtype=torch.float64)
        sigmas = (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
        sigmas[0], sigmas[-1] = sigma_min, sigma_max  # exact ends despite rounding
        return cls(sigmas, torch.ones_like(sigmas), sigmas, "sigma", sigma_data=sigma_data)

    @classmethod
    def from_scheduler(cls, scheduler, num_levels: int = 100) -> NoiseSchedule:
        """From a diffusers scheduler: EDM schedulers give ``"sigma"`` units, any other with ``alphas_cumprod``
        gives ``"timestep"`` units."""
        if not isinstance(scheduler, SchedulerMixin):
            raise ValueError(f"`scheduler` must be a diffusers scheduler, got {type(scheduler).__name__}.")
        config = scheduler.config
        if is_edm_scheduler(scheduler):
            return cls.edm(config.sigma_min, config.sigma_max, config.rho, num_levels, config.sigma_data)
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"`scheduler` {type(scheduler).__name__} has neither `alphas_cumprod` nor EDM sigmas: give a "
                "DDPM-style scheduler (DDPM, DDIM, DPM-Solver, Euler, ...) or an EDM scheduler."
            )
        return cls.from_alphas_cumprod(scheduler.alphas_cumprod, num_levels)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return self.levels.numel()

    def log_snr(self) -> torch.Tensor:
        """``log(a^2 / s^2)`` at every level (decreasing). A zero-terminal-SNR schedule (``rescale_betas_zero_snr``:
        ``a = 0`` at its noisy end) is read there as diffusers' Euler-type schedulers read it, ``a^2 = 2**-24``, so
        that its log-SNR stays finite."""
        signal = torch.where(self.signal_scale == 0, torch.full_like(self.signal_scale, 2.0**-12), self.signal_scale)
        return 2 * (signal.log() - self.noise_scale.log())

    def fraction(self, level: float) -> float:
        """Position of a level on the schedule in [0, 1]: ``t / T`` for timesteps, by log-sigma for sigmas."""
        if self.units == "timestep":
            return float(level) / self.num_train_timesteps
        low, high = math.log(self.levels[0]), math.log(self.levels[-1])
        return (math.log(float(level)) - low) / (high - low)

    def partition(self, boundaries) -> TimestepPartition:
        """A [`TimestepPartition`] with these boundaries, in this schedule's units."""
        return TimestepPartition([float(b) for b in boundaries], self.num_train_timesteps, self.units)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(units={self.units!r}, num_levels={self.num_levels}, levels=[{self.levels[0].item():g} .. "
            f"{self.levels[-1].item():g}])"
        )
