"""Decoder sizes per stage, and writing a plan into a `MultiStageUNet2DModel` config.

The decoder widths are a **heuristic**, not part of Zhang et al.'s algorithm: the paper only states the rule
"larger decoders near the data end, smaller near the noise end" (CIFAR-10: 192 / 128 / 16 around a 128-wide
encoder). Here a stage's width scales with a per-stage difficulty in ``[0, 1]``; the default difficulty is the
noise-prediction error of the best *linear* (Gaussian, Wiener) denoiser on the data, averaged over the stage:

    difficulty(t) = (1/D) sum_i a_t^2 lambda_i / (a_t^2 lambda_i + s_t^2),

with ``lambda_i`` the eigenvalues of the data covariance. It is ~1 where the noise hides under the data's structure
(the clean end: hard, needs capacity) and falls to 0 at the noisy end (``eps ~ x_t``: easy).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ..partition import TimestepPartition
from .optimal_denoiser import _check_data, check_planning_data
from .schedule import NoiseSchedule

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

PAPER_SCALES = (0.125, 1.5)  # Zhang et al., CIFAR-10: decoders 16 and 192 around a 128-wide encoder


def data_spectrum(data: torch.Tensor, max_dim: int = 4096, max_images: int = 2048, generator=None) -> torch.Tensor:
    """Eigenvalues of the data covariance: exact (streamed ``D x D``) when ``D <= max_dim``, else the non-zero ones
    of a random subset of ``max_images`` images (never an ``N x N`` matrix); on the data's device."""
    flat = _check_data(data)
    n, dim = flat.shape
    mean = flat.double().mean(0)
    if dim <= max_dim:
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=flat.device)
        for start in range(0, n, 4096):
            centred = flat[start : start + 4096].double() - mean
            cov += centred.T @ centred
        return torch.linalg.eigvalsh(cov / n).clamp_min(0)
    subset = flat[torch.randperm(n, generator=generator)[:max_images]].double() - mean
    return torch.linalg.svdvals(subset) ** 2 / subset.shape[0]


def stage_difficulty(data: torch.Tensor, schedule: NoiseSchedule, partition: TimestepPartition) -> list[float]:
    r"""
    Per-stage difficulty in ``[0, 1]``: the linear (Wiener) denoiser's noise-prediction error per dimension,
    averaged over the grid levels of each stage (see the module docstring).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning import NoiseSchedule, stage_difficulty
    >>> data = torch.randn(256, 16, generator=torch.manual_seed(0))
    >>> schedule = NoiseSchedule.edm(num_levels=20)
    >>> [round(d, 2) for d in stage_difficulty(data, schedule, schedule.partition([0.5, 5.0]))]
    [0.97, 0.28, 0.0]

    ```
    """
    if partition.units != schedule.units:
        raise ValueError(f"`partition` is in {partition.units!r} units but `schedule` in {schedule.units!r} units.")
    dim = check_planning_data(data).shape[1]
    # a fixed subset of wide data (see `data_spectrum`): the widths depend on the data alone, not the global seed
    spectrum = data_spectrum(data, generator=torch.Generator().manual_seed(0)).cpu()  # where the schedule's scales are
    a2, s2 = schedule.signal_scale[:, None] ** 2, schedule.noise_scale[:, None] ** 2
    per_level = (a2 * spectrum / (a2 * spectrum + s2)).sum(1) / dim
    stages = partition.stage_for_noise_level(schedule.levels)
    return [
        float(per_level[stages == s].mean()) if bool((stages == s).any()) else 0.0 for s in range(partition.num_stages)
    ]


def suggest_decoder_widths(
    block_out_channels: Sequence[int],
    difficulty: Sequence[float],
    norm_num_groups: int | None = None,
    min_scale: float = PAPER_SCALES[0],
    max_scale: float = PAPER_SCALES[1],
    *,
    config: Mapping | None = None,
) -> tuple[tuple[int, ...], ...]:
    r"""
    Heuristic decoder widths per stage, clean stage first: ``block_out_channels`` scaled by
    ``min_scale + (max_scale - min_scale) * difficulty_s / max(difficulty)`` and rounded to a positive multiple of
    ``norm_num_groups`` (default 32), or, given the model's ``config`` (a config or a model) instead, of its
    ``norm_num_groups`` and, where its blocks attend, its ``attention_head_dim`` (`width_multiple`): the result is then
    a valid ``decoder_block_out_channels`` of that model, every attention layer with a head.

    The defaults reproduce the extremes of the paper's CIFAR-10 decoders (x1.5 and x0.125 of the encoder).

    Example:

    ```py
    >>> from diffusers_stages.planning import suggest_decoder_widths
    >>> suggest_decoder_widths((128, 256), difficulty=[0.9, 0.4, 0.0], norm_num_groups=16)
    ((192, 384), (96, 192), (16, 32))

    ```
    """
    if config is not None:
        if norm_num_groups is not None:
            raise ValueError(
                f"Give one of `norm_num_groups` and `config`, got both (norm_num_groups={norm_num_groups!r}): the "
                "widths are rounded to the config's norm_num_groups and attention_head_dim."
            )
        config = getattr(config, "config", config)
        if not isinstance(config, Mapping):
            raise ValueError(f"`config` must be a model config (a mapping) or a model, got {type(config).__name__}.")
        norm_num_groups = width_multiple(config)
    norm_num_groups = 32 if norm_num_groups is None else norm_num_groups
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"Need 0 < `min_scale` <= `max_scale`, got min_scale={min_scale}, max_scale={max_scale}.")
    if not isinstance(norm_num_groups, int) or norm_num_groups < 1:
        raise ValueError(f"`norm_num_groups` must be a positive integer, got {norm_num_groups!r}.")
    difficulty = [float(d) for d in difficulty]
    if len(difficulty) < 2 or not all(0 <= d < math.inf for d in difficulty) or max(difficulty) <= 0:
        raise ValueError(
            f"`difficulty` needs one non-negative finite value per stage (>= 2 stages, not all 0), got {difficulty}."
        )
    top = max(difficulty)
    return tuple(
        scaled_widths(block_out_channels, min_scale + (max_scale - min_scale) * d / top, norm_num_groups)
        for d in difficulty
    )


def scaled_widths(block_out_channels: Sequence[int], scale: float, norm_num_groups: int) -> tuple[int, ...]:
    """``block_out_channels`` times ``scale``, each rounded to a positive multiple of ``norm_num_groups``."""
    return tuple(
        max(norm_num_groups, round(w * scale / norm_num_groups) * norm_num_groups) for w in block_out_channels
    )


def config_value(config: Mapping, key: str):
    """``config[key]``, or, where the config leaves it out, the value the model is built with: `UNet2DModel`'s
    default (`MultiStageUNet2DModel`'s are the same)."""
    from diffusers import UNet2DModel

    return config[key] if key in config else inspect.signature(UNet2DModel.__init__).parameters[key].default


def width_multiple(config: Mapping, architecture: str = "multistage") -> int:
    """What every width sized for a model of ``config`` must be a multiple of: ``norm_num_groups``, and, where the
    sized part attends with a fixed ``attention_head_dim``, that too (a narrower width would have no head). The sized
    part is a decoder (``architecture="multistage"``: its up blocks), or a whole `UNet2DModel` (``"experts"``: its
    down and up blocks, and its middle block, which attends unless ``add_attention`` is off, normalising in
    ``attn_norm_num_groups`` groups when set). A key the config leaves out has its default (`config_value`)."""
    groups = config_value(config, "norm_num_groups") or 1
    head_dim = config_value(config, "attention_head_dim")
    blocks = [*(config_value(config, "down_block_types") or ()), *(config_value(config, "up_block_types") or ())]
    attends = any("Attn" in str(block) for block in blocks)
    middle = architecture == "experts" and bool(config_value(config, "add_attention"))
    if middle and isinstance(config_value(config, "attn_norm_num_groups"), int):
        groups = math.lcm(groups, max(config_value(config, "attn_norm_num_groups"), 1))
    attends = attends or middle
    return math.lcm(groups, head_dim) if isinstance(head_dim, int) and head_dim > 0 and attends else groups


def plain_config(config: Mapping) -> dict:
    """A copy of a model config without ``_use_default_values``: a model's config lists there the arguments left at
    their defaults, and ``from_config`` drops those keys, so values written over them (planned boundaries, units,
    widths) would be lost. Every value the config holds is then used, as in a saved ``config.json``."""
    return {key: value for key, value in config.items() if key != "_use_default_values"}


def partition_to_model_config(
    config: Mapping | ModelMixin,
    partition: TimestepPartition,
    decoder_block_out_channels: Sequence[Sequence[int]] | None = None,
) -> dict:
    r"""
    A copy of a model config with the plan written in: ``stage_boundaries``, ``boundary_units`` and
    ``num_train_timesteps`` from ``partition`` (and ``decoder_block_out_channels`` when given), ready for
    `MultiStageUNet2DModel.from_config`. ``config`` may be a dict, a model, or a `UNet2DModel` config.

    Example:

    ```py
    >>> from diffusers_stages import MultiStageUNet2DModel, TimestepPartition
    >>> from diffusers_stages.planning import partition_to_model_config
    >>> config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    ...               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...               norm_num_groups=4)
    >>> model = MultiStageUNet2DModel.from_config(partition_to_model_config(config, TimestepPartition([300, 700])))
    >>> model.config.stage_boundaries, model.num_stages
    ([300.0, 700.0], 3)

    ```
    """
    config = getattr(config, "config", config)
    if not isinstance(config, Mapping):
        raise ValueError(f"`config` must be a model config (a mapping) or a model, got {type(config).__name__}.")
    if not isinstance(partition, TimestepPartition):
        raise ValueError(f"`partition` must be a TimestepPartition, got {type(partition).__name__}.")
    new = plain_config(config)
    new.update(partition.to_config())
    if decoder_block_out_channels is not None:
        new["decoder_block_out_channels"] = [list(w) for w in decoder_block_out_channels]
    decoders = new.get("decoder_block_out_channels")
    if decoders is not None and len(decoders) != partition.num_stages:
        raise ValueError(
            f"The config has {len(decoders)} `decoder_block_out_channels` but the plan has {partition.num_stages} "
            "stages: pass `decoder_block_out_channels` (e.g. from `suggest_decoder_widths`)."
        )
    return new
