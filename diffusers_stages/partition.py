"""The one idea behind all three methods: a partition of the noise schedule into stages.

Stage ``s`` covers the half-open interval ``[b_{s-1}, b_s)`` of noise levels (``(b_{s-1}, b_s]`` in sigma units, below), with ``b_{-1}`` the clean end of
the schedule and ``b_{S-1}`` its noisy end. Stage 0 is therefore always the *least* noisy stage (near the data)
and the last stage the noisiest, as in Zhang et al. (CVPR 2024): ``[0, t1)``, ``[t1, t2)``, ``[t2, T]``.

Two units are supported, matching the two ways diffusers models are conditioned on noise:

- ``"timestep"``: discrete-time models (DDPM/DDIM-style ``alphas_cumprod``). Boundaries and model timesteps are in
  training-timestep units ``[0, num_train_timesteps]``. Every diffusers scheduler for such models (DDPM, DDIM,
  PNDM, DPM-Solver, UniPC, DEIS, Euler, Heun, KDPM2, LMS, FlowMatch) hands the model the training timestep *of the
  noise level it is at* (sigmas are mapped back through the training schedule, shifts included), so routing on
  that value is routing on the noise level.
- ``"sigma"``: EDM-style models. Boundaries are noise standard deviations; the model is conditioned on EDM's
  ``c_noise = ln(sigma) / 4``, which is what diffusers' EDM schedulers pass as ``timestep``. As in the authors'
  EDM code (a stage is chosen by ``sigma > lower bound``), a sigma stage is the interval ``(b_{s-1}, b_s]``: a noise
  level exactly on a boundary belongs to the cleaner stage. A model timestep is compared by its value alone, whatever
  its dtype (the scheduler's float32 tensor that a model receives, its Python float that `expert_schedule` routes,
  a float64 one), with each boundary ``b``'s ``c_noise``, taken as the larger of ``ln(b)/4`` (in float64) and the
  float32 next at or above ``ln(b32)/4``, ``b32`` being ``b`` rounded to float32: the schedulers hold sigmas in
  float32 and take their log in float32, and any float32 ``log`` accurate to one ulp (torch's on the CPU; CUDA's
  ``logf``) gives ``b32`` a ``c_noise`` at or below that bound. So a sigma the scheduler samples on (or within
  float32 rounding of) a boundary goes to the cleaner stage, from the model's own routing and the pipelines' alike,
  and no ``exp``/``log`` round trip is made; a float32 ``c_noise`` tells noise levels apart down to about 2.4e-7
  relative. A sigma itself (`stage_for_noise_level`: the training loop's per-stage loss, the planners) goes where
  its ``c_noise`` does, ``0.25 * log(sigma)`` computed as the EDM schedulers compute it (in the sigma's dtype, at
  least float32): to the stage the model runs on it, up to another device's ``log`` rounding a ``c_noise`` within
  that 2.4e-7 of a boundary the other way.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

UNITS = ("timestep", "sigma")


def exact_float(device: torch.device | str) -> torch.dtype:
    """The dtype noise levels are compared in on ``device``: float64, except on Apple's MPS, which has none; float32
    there still holds every integer timestep below 2**24 exactly, and the boundaries are rounded toward the stage that
    owns them (`TimestepPartition._bounds_tensor`), so integer timesteps route as in float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def as_levels(value: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
    """``value`` as a tensor to route: a tensor as it is, Python numbers in float64, which holds them exactly (torch's
    default float32 would round 441.99999 up to 442.0, across a boundary at 442); a `ValueError` naming ``timestep``
    for anything else (None, a string, a bool, a complex number)."""
    if torch.is_tensor(value):
        if value.dtype != torch.bool and not value.is_complex():
            return value
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):  # a ragged sequence
            array = None
        if array is not None and array.dtype.kind in "iuf":  # integers, unsigned integers, floats
            return torch.as_tensor(array, dtype=torch.float64)
    raise ValueError(f"`timestep` must be a number, or a tensor or sequence of numbers, got {value!r}.")


class TimestepPartition:
    r"""
    Stage boundaries over a noise schedule, and the lookup from noise levels to stage indices. A partition is
    immutable (its attributes are read-only) and hashable, equal partitions hashing alike.

    Args:
        boundaries (`Sequence[float]`):
            The ``S - 1`` inner boundaries of ``S`` stages, strictly increasing, in ``units``.
        num_train_timesteps (`int`, defaults to 1000):
            Length of the training schedule; the ``"timestep"`` domain is ``[0, num_train_timesteps]``.
        units (`str`, defaults to `"timestep"`):
            ``"timestep"`` (training timesteps) or ``"sigma"`` (EDM noise standard deviation).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages import TimestepPartition
    >>> partition = TimestepPartition([442, 631])  # Zhang et al., optimal-denoiser boundaries on CIFAR-10
    >>> partition.num_stages
    3
    >>> partition.stage_for_noise_level(torch.tensor([0, 441, 442, 999])).tolist()
    [0, 0, 1, 2]

    ```
    """

    def __init__(self, boundaries: Sequence[float], num_train_timesteps: int = 1000, units: str = "timestep"):
        if units not in UNITS:
            raise ValueError(f"`units` must be one of {UNITS}, got {units!r}.")
        num_train_timesteps = _check_num_train_timesteps(num_train_timesteps)
        boundaries = _listed(boundaries)
        values = _numbers(boundaries, "boundaries")
        if any(not math.isfinite(b) for b in values):
            raise ValueError(f"`boundaries` must be finite numbers, got {list(boundaries)}.")
        if any(b >= a for a, b in zip(values[1:], values[:-1])):
            raise ValueError(f"`boundaries` must be strictly increasing, got {list(boundaries)}.")
        low, high = self._domain(units, num_train_timesteps)
        if values and (values[0] <= low or values[-1] >= high):
            raise ValueError(
                f"`boundaries` must lie strictly inside the schedule ({low}, {high}) in {units!r} units, "
                f"got {list(boundaries)}."
            )
        # read-only (the properties below): the lookup tensors are cached from them, and the partition is hashable
        self._boundaries = tuple(values)
        self._num_train_timesteps = num_train_timesteps
        self._units = units
        self._bounds: dict[tuple, torch.Tensor] = {}  # the boundaries as a tensor, per (space, dtype, device)

    @property
    def boundaries(self) -> tuple[float, ...]:
        """The inner boundaries, strictly increasing, in `units` (read-only, as every attribute of a partition)."""
        return self._boundaries

    @property
    def num_train_timesteps(self) -> int:
        """The length of the training schedule."""
        return self._num_train_timesteps

    @property
    def units(self) -> str:
        """``"timestep"`` or ``"sigma"``."""
        return self._units

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a partition pickled before its attributes became read-only (``boundaries``, ...)."""
        for name in ("boundaries", "num_train_timesteps", "units"):
            if name in state:
                state[f"_{name}"] = state.pop(name)
        self.__dict__.update(state)

    # ----------------------------------------------------------------------------------------------------------
    # construction
    @classmethod
    def uniform(cls, num_stages: int, num_train_timesteps: int = 1000) -> TimestepPartition:
        """Equal-length stages in training-timestep units: boundaries ``nT/N``, stage ``n - 1`` the timesteps in
        ``[(n-1)T/N, nT/N)``. MEME's intervals ``((n-1)T/N, nT/N]`` count DDPM's ``t = 1..T``, diffusers' timestep
        ``t - 1``: the same timesteps when ``N`` divides ``T`` (MEME's 4 of 1000); otherwise timestep
        ``floor(nT/N)`` is stage ``n - 1``'s here and the next stage's in MEME's counting."""
        num_stages = _positive_integer(num_stages, "num_stages")
        num_train_timesteps = _check_num_train_timesteps(num_train_timesteps)
        step = num_train_timesteps / num_stages
        return cls([step * i for i in range(1, num_stages)], num_train_timesteps, "timestep")

    @classmethod
    def from_fractions(cls, fractions: Sequence[float], num_train_timesteps: int = 1000) -> TimestepPartition:
        """Boundaries given as fractions of the training schedule (e.g. ``[0.442, 0.631]``)."""
        num_train_timesteps = _check_num_train_timesteps(num_train_timesteps)
        fractions = _listed(fractions)
        values = _numbers(fractions, "fractions")
        if any(not 0.0 < f < 1.0 for f in values):
            raise ValueError(f"`fractions` must lie strictly inside (0, 1), got {list(fractions)}.")
        if any(b >= a for a, b in zip(values[1:], values[:-1])):
            raise ValueError(f"`fractions` must be strictly increasing, got {list(fractions)}.")
        return cls([f * num_train_timesteps for f in values], num_train_timesteps, "timestep")

    @classmethod
    def from_config(cls, config: dict | None = None, /, **keys: Any) -> TimestepPartition:
        """Rebuild from the keys written by [`~TimestepPartition.to_config`], given as a dict (a model or pipeline
        config) or as keywords (a model's arguments); a `ValueError` names those keys (``stage_boundaries``,
        ``boundary_units``). A config is saved as JSON: its ``num_train_timesteps`` must be a Python int (a numpy
        integer is refused with a hint, where the constructor takes one)."""
        config = {**(config or {}), **keys}
        missing = [key for key in ("stage_boundaries", "num_train_timesteps", "boundary_units") if key not in config]
        if missing:
            raise ValueError(
                "A TimestepPartition config needs `stage_boundaries`, `num_train_timesteps` and `boundary_units`; "
                f"the config lacks {missing}."
            )
        from .models.checks import check_positive_integers, renamed_arguments  # here: that module imports this one

        try:
            # a config is saved as JSON: a numpy integer is refused with a hint (the constructor, a call, takes it)
            check_positive_integers(num_train_timesteps=config["num_train_timesteps"])
            return cls(config["stage_boundaries"], config["num_train_timesteps"], config["boundary_units"])
        except ValueError as error:
            raise renamed_arguments(error, {"boundaries": "stage_boundaries", "units": "boundary_units"}) from None

    def to_config(self) -> dict:
        """The keys that store this partition in a diffusers config (JSON-serialisable)."""
        return {
            "stage_boundaries": list(self.boundaries),
            "num_train_timesteps": self.num_train_timesteps,
            "boundary_units": self.units,
        }

    # ----------------------------------------------------------------------------------------------------------
    # lookup
    @property
    def num_stages(self) -> int:
        return len(self.boundaries) + 1

    def intervals(self) -> list[tuple[float, float]]:
        """``[(low, high), ...]`` per stage, from the clean end to the noisy end."""
        low, high = self._domain(self.units, self.num_train_timesteps)
        edges = [low, *self.boundaries, high]
        return list(zip(edges[:-1], edges[1:]))

    def interval_text(self, stage: int, format_spec: str = "g") -> str:
        """Stage ``stage``'s interval as messages write it, its ends formatted with ``format_spec``: ``[low, high)``
        in ``"timestep"`` units, ``(low, high]`` in ``"sigma"`` units (a sigma on a boundary is the cleaner stage's),
        ``(low, inf)`` for the noisiest sigma stage."""
        if isinstance(stage, bool) or not isinstance(stage, numbers.Integral) or not 0 <= stage < self.num_stages:
            raise ValueError(f"`stage` must be a stage index in [0, {self.num_stages}), got {stage!r}.")
        low, high = self.intervals()[stage]
        try:
            ends = f"{low:{format_spec}}, {high:{format_spec}}"
        except (TypeError, ValueError):
            raise ValueError(
                f"`format_spec` must be a format specification of floats ('g', '.6g', ...), got {format_spec!r}."
            ) from None
        if self.units == "timestep":
            return f"[{ends})"
        return f"({ends}{')' if math.isinf(high) else ']'}"

    def noise_level(self, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """Convert what the model receives as ``timestep`` into a noise level in this partition's units."""
        timestep = as_levels(timestep)
        if self.units == "sigma":
            return torch.exp(4.0 * timestep.to(exact_float(timestep.device)))  # EDM: c_noise = ln(sigma) / 4
        return timestep

    def stage_for_noise_level(self, noise_level: torch.Tensor | float | int) -> torch.Tensor:
        """Stage of each noise level (in this partition's units), as a ``long`` tensor of the same shape; a timestep is
        compared by its exact value, whatever its dtype (a float32 ``442.0`` stays below a boundary at ``442.00001``),
        a sigma goes to the stage its model timestep ``c_noise = ln(sigma)/4`` (computed as the EDM schedulers do, in
        the sigma's dtype, at least float32) is routed to by [`~TimestepPartition.stage_for_timestep`]: a sigma on a
        boundary, or within float32 rounding of one, goes to the cleaner stage (see the module docstring)."""
        levels = as_levels(noise_level)
        low, high = self._domain(self.units, self.num_train_timesteps)
        # one reduction, read on the host (a NaN extremum fails both comparisons)
        if levels.numel():
            extrema = torch.aminmax(levels)
            smallest, largest = float(extrema.min), float(extrema.max)
            if not (low <= smallest and largest <= high):
                raise ValueError(
                    f"`timestep` must be a noise level inside [{low}, {high}] ({self.units!r} units), got values "
                    f"from {smallest} to {largest}."
                )
        dtype = levels.dtype if levels.is_floating_point() else exact_float(levels.device)
        if self.units == "sigma":  # one rule for a sigma and for its c_noise: the model's (stage_for_timestep)
            return self.stage_for_timestep(0.25 * torch.log(levels.to(torch.promote_types(dtype, torch.float32))))
        # timestep stages are [b_{s-1}, b_s) (Zhang et al.'s [0, 442))
        bounds = self._bounds_tensor("level", dtype, levels.device)
        return torch.bucketize(levels.to(dtype), bounds, right=True)

    def _bounds_tensor(self, space: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The boundaries as a tensor (``space`` "c_noise": as ``ln(sigma)/4``, see the module docstring), built once
        per dtype and device."""
        key = (space, dtype, device)
        if key not in self._bounds:
            exact = torch.tensor(self.boundaries, dtype=torch.float64)
            if space == "c_noise":  # see the module docstring
                sigma32 = exact.float().double()  # infinite beyond float32's range: then the float64 value alone
                from_float32 = _rounded(0.25 * torch.log(sigma32), torch.float32, up=True).double()
                from_float32 = torch.where(sigma32.isinf(), -math.inf, from_float32)
                exact = torch.maximum(0.25 * torch.log(exact), from_float32)
            # a boundary the dtype cannot hold is rounded towards the stage that owns it (the noisier one for
            # [b_{s-1}, b_s), the cleaner one for (b_{s-1}, b_s]), so that a level compares as its exact value
            self._bounds[key] = _rounded(exact, dtype, up=self.units == "timestep").to(device)
        return self._bounds[key]

    def stage_for_timestep(self, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """Stage of each *model* timestep: [`~TimestepPartition.noise_level`] then
        [`~TimestepPartition.stage_for_noise_level`]
        (for sigma units, compared in ``c_noise = ln(sigma) / 4`` space, see the module docstring)."""
        if self.units != "sigma":
            return self.stage_for_noise_level(self.noise_level(timestep))
        c_noise = as_levels(timestep)
        c_noise = c_noise if c_noise.is_floating_point() else c_noise.to(exact_float(c_noise.device))
        if c_noise.numel() and bool(c_noise.isnan().any()):
            raise ValueError(f"`timestep` must be c_noise = ln(sigma)/4 values, got NaN in {c_noise.tolist()}.")
        return torch.bucketize(c_noise, self._bounds_tensor("c_noise", c_noise.dtype, c_noise.device), right=False)

    def stage_index(self, noise_level: torch.Tensor | float | int) -> torch.Tensor:
        """Deprecated name of [`~TimestepPartition.stage_for_noise_level`] (``stage_index`` is the models' argument
        that forces a stage); removed in diffusers-stages 0.2."""
        warnings.warn(
            "`TimestepPartition.stage_index` is deprecated and will be removed in diffusers-stages 0.2: use "
            "`stage_for_noise_level` (or `stage_for_timestep` for what a model receives).",
            FutureWarning,
            stacklevel=2,
        )
        return self.stage_for_noise_level(noise_level)

    # ----------------------------------------------------------------------------------------------------------
    @staticmethod
    def _domain(units: str, num_train_timesteps: int) -> tuple[float, float]:
        return (0.0, float(num_train_timesteps)) if units == "timestep" else (0.0, math.inf)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TimestepPartition) and self.to_config() == other.to_config()

    def __hash__(self) -> int:  # equal partitions (equal `to_config()`) hash alike
        return hash((self.boundaries, self.num_train_timesteps, self.units))

    def __repr__(self) -> str:
        return (
            f"TimestepPartition(boundaries={list(self.boundaries)}, num_train_timesteps={self.num_train_timesteps}, "
            f"units={self.units!r})"
        )


def cleaner_stage_boundary(timestep: float) -> float:
    """A ``"timestep"``-unit boundary that gives the noise level at ``timestep`` to the cleaner stage, as a boundary in
    ``"sigma"`` units does (a sigma's boundary mapped to training timesteps): the float32 next above ``timestep``
    rounded up to float32, so that ``timestep`` and its float32 rounding (what the schedulers hold) lie below it, and
    every float32 timestep above them at or above it."""
    at_or_above = _rounded(torch.tensor([float(timestep)], dtype=torch.float64), torch.float32, up=True)
    return float(torch.nextafter(at_or_above, torch.full_like(at_or_above, math.inf)))


def _rounded(values: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """float64 ``values`` in ``dtype``, each rounded up (``up``) or down to a value of ``dtype`` where it holds none."""
    rounded = values.to(dtype)
    off = rounded.double() < values if up else rounded.double() > values
    return torch.where(off, torch.nextafter(rounded, torch.full_like(rounded, math.inf if up else -math.inf)), rounded)


def _check_num_train_timesteps(num_train_timesteps: int) -> int:
    """``num_train_timesteps`` as a Python int: a positive integer, numpy's too (not a bool)."""
    return _positive_integer(num_train_timesteps, "num_train_timesteps")


def _positive_integer(value: int, name: str) -> int:
    """``value`` as a Python int if it is a positive integer, numpy's too (not a bool); a `ValueError` naming it as
    ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def _listed(values: Any) -> Any:
    """An iterator (a generator) as a list, read once, so that its values are checked and then used; anything else
    as it is."""
    return list(values) if isinstance(values, Iterator) else values


def _numbers(values: Sequence[float], name: str) -> list[float]:
    """``values`` as floats, else a `ValueError` naming them as ``name``."""
    try:
        if isinstance(values, (str, bytes)) or any(isinstance(v, (str, bytes, bool)) for v in values):
            raise TypeError  # a string's characters or a bool are not numbers here, even where float() takes them
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a sequence of numbers, got {values!r}.") from None
