"""The baselines of Zhang et al.'s Table 4 and two simple splits: uniform, equal log-SNR, SNR clustering and
loss-gradient clustering (Go et al., NeurIPS 2023)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..models.checks import _is_integral, positive_integer_arguments
from ..partition import TimestepPartition
from .optimal_denoiser import check_planning_data, optimal_predictions
from .schedule import NoiseSchedule
from .stage_plan import StagePlan, _check_num_stages, _interpolate, _plan


def uniform_plan(schedule: NoiseSchedule, num_stages: int = 3) -> StagePlan:
    """Equal-length stages: equal shares of the training timesteps, or of log-sigma for EDM schedules."""
    num_stages = _check_num_stages(num_stages, schedule.num_levels)
    if schedule.units == "timestep":
        boundaries = TimestepPartition.uniform(num_stages, schedule.num_train_timesteps).boundaries
    else:
        log_sigma = torch.linspace(
            schedule.levels[0].log(), schedule.levels[-1].log(), num_stages + 1, dtype=torch.float64
        )
        boundaries = log_sigma[1:-1].exp().tolist()
    return _plan(schedule, "uniform", boundaries, {})


def snr_plan(schedule: NoiseSchedule, num_stages: int = 3) -> StagePlan:
    """Equal spacing in log-SNR, ``log(a^2 / s^2)``, between the two ends of the schedule."""
    num_stages = _check_num_stages(num_stages, schedule.num_levels)
    log_snr = schedule.log_snr()
    targets = torch.linspace(float(log_snr[0]), float(log_snr[-1]), num_stages + 1, dtype=torch.float64)[1:-1]
    # log-SNR decreases along the grid: interpolate the level at each target (linear between grid points)
    boundaries = [_interpolate(-log_snr, schedule.levels, -target) for target in targets]
    return _plan(schedule, "snr", boundaries, {"log-SNR": log_snr})


def snr_clustering_plan(schedule: NoiseSchedule, num_stages: int = 3) -> StagePlan:
    """The "SNR" baseline of Zhang et al. (Table 4): Go et al.'s [`interval_clustering`] of the grid with affinity
    ``-|log-SNR(t) - log-SNR(t')|``. On DDPM's linear schedule with every timestep on the grid it gives 0.347 / 0.708
    of T; the paper reports 0.348 / 0.709."""
    num_stages = _check_num_stages(num_stages, schedule.num_levels)
    log_snr = schedule.log_snr()
    cuts = interval_clustering(-(log_snr[:, None] - log_snr[None]).abs(), num_stages)
    return _plan(schedule, "snr_clustering", schedule.levels[cuts], {"log-SNR": log_snr})


def interval_clustering(affinity: torch.Tensor, num_clusters: int) -> list[int]:
    r"""
    Split ``n`` ordered items into ``num_clusters`` contiguous intervals maximising the affinity of each item to its
    interval's centre (middle item), by dynamic programming, with interval sizes in ``[n/(2k), 3n/(2k)]`` (the
    timestep clustering of Go et al., NeurIPS 2023, that Zhang et al. use as the "gradient" baseline).

    Returns the index of the first item of each interval after the first.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning.methods import interval_clustering
    >>> groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    >>> interval_clustering((groups[:, None] == groups[None]).double(), 3)
    [3, 6]

    ```
    """
    n, k = affinity.shape[0], num_clusters
    if not _is_integral(k) or not 1 <= k <= n:
        raise ValueError(f"`num_clusters` must be an integer in [1, {n}], got {num_clusters!r}.")
    k = int(k)
    low, high = max(1, math.floor(n / (2 * k))), math.ceil(3 * n / (2 * k))
    # prefix sums: the affinity of items i..j-1 to a centre c is prefix[c, j] - prefix[c, i]
    prefix = torch.cat([torch.zeros(n, 1, dtype=torch.float64), affinity.double().cumsum(1)], dim=1)
    best = torch.full((k + 1, n + 1), math.inf, dtype=torch.float64)
    best[0, 0] = 0.0
    start = torch.zeros((k + 1, n + 1), dtype=torch.long)
    for c in range(1, k + 1):
        for j in range(c * low, n + 1):
            starts = torch.arange(max(0, j - high), j - low + 1)  # every admissible first item of the last interval
            centres = (starts + j - 1) // 2
            values = best[c - 1, starts] - (prefix[centres, j] - prefix[centres, starts])
            pick = int(values.argmin())
            best[c, j], start[c, j] = values[pick], starts[pick]
    if not math.isfinite(best[k, n]):
        raise ValueError(f"{n} items cannot be split into {k} intervals of {low} to {high} items.")
    cuts, j = [], n
    for c in range(k, 1, -1):
        j = int(start[c, j])
        cuts.append(j)
    return cuts[::-1]


def gradient_affinity(
    model: torch.nn.Module,
    data: torch.Tensor,
    schedule: NoiseSchedule,
    level_indices: list[int],
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
) -> torch.Tensor:
    """Cosine similarity of the model's loss gradients (w.r.t. its parameters) between noise levels, on one fixed
    batch and one fixed noise (Go et al., NeurIPS 2023). ``model(sample, timestep).sample`` predicts the noise for
    ``"timestep"`` schedules and EDM's preconditioned ``F`` for ``"sigma"`` schedules."""
    from ..training.state import eval_mode

    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    try:  # every parameter's gradient (a frozen model has none), without dropout: the seed alone decides
        with eval_mode({"model": model.requires_grad_(True)}):
            return _gradient_affinity(model, params, data, schedule, level_indices, generator, progress_bar)
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)


def _gradient_affinity(model, params, data, schedule, level_indices, generator, progress_bar) -> torch.Tensor:
    from ..conventions import class_embedding_count, null_class_label

    device = params[0].device
    clean = data.to(device=device, dtype=params[0].dtype)
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(device)
    config, loaded = getattr(model, "config", None), getattr(model, "loaded_experts", None)
    if loaded:  # an ExpertRoutingModel: its experts' class embeddings (they agree)
        config = model.experts[loaded[0]].config
    count = class_embedding_count(config)  # class-conditional: the unconditional label
    labels = (
        {} if count is None else {"class_labels": torch.full((len(clean),), null_class_label(count), device=device)}
    )
    grads = []
    for g in tqdm(level_indices, desc="loss gradients", disable=not progress_bar):
        a, s = float(schedule.signal_scale[g]), float(schedule.noise_scale[g])
        noisy = a * clean + s * noise
        batch = torch.full((clean.shape[0],), float(schedule.levels[g]), device=device)
        if schedule.units == "timestep":
            loss = torch.mean((model(noisy, batch.long(), **labels).sample - noise) ** 2)
        else:  # EDM preconditioning (Karras et al. 2022, table 1) and its loss weight 1 / c_out^2
            sd = schedule.sigma_data
            c_in, c_skip = 1 / math.sqrt(s**2 + sd**2), sd**2 / (s**2 + sd**2)
            c_out = s * sd / math.sqrt(s**2 + sd**2)
            denoised = c_skip * noisy + c_out * model(c_in * noisy, batch.log() / 4, **labels).sample
            loss = torch.mean((denoised - clean) ** 2) / c_out**2
        # parameters a level does not reach (another stage's decoder) get a zero gradient
        grad = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for p, x in zip(params, grad)]))
    grads = torch.nn.functional.normalize(torch.stack(grads).double().cpu(), dim=1)
    return grads @ grads.T


def gradient_plan(
    schedule: NoiseSchedule,
    num_stages: int = 3,
    model: torch.nn.Module | None = None,
    data: torch.Tensor | None = None,
    num_gradient_levels: int = 50,
    batch_size: int = 64,
    num_samples: int = 128,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
) -> StagePlan:
    r"""
    Loss-gradient-based boundaries, in one of two documented forms:

    - with a trained ``model``: the "gradient" baseline of Zhang et al. (Table 4), Go et al.'s timestep clustering:
      the cosine affinity of the model's parameter gradients between ``num_gradient_levels`` noise levels, on a fixed
      batch of ``batch_size`` images from ``data``, split into contiguous stages by [`interval_clustering`]. A
      class-conditional model is measured with its unconditional label (the last class embedding, the one
      classifier-free guidance trains) for every image.
      Memory: ``num_gradient_levels x num_parameters`` float64 on the CPU.
    - without a model (a network-free proxy): the loss curve ``L(t) = E||eps*_t(x_t) - eps||^2 / D`` of the optimal
      denoiser on ``data``, with boundaries splitting its total variation ``int |dL/dt| dt`` into equal shares (each
      stage sees the same amount of change in the loss).
    """
    num_stages = _check_num_stages(num_stages, schedule.num_levels)
    if data is None:
        raise ValueError("`data` is required by the 'gradient' method (the training images).")
    check_planning_data(data)
    if model is not None:
        in_channels = getattr(getattr(model, "config", None), "in_channels", None)
        if in_channels is not None and data.ndim == 4 and data.shape[1] != in_channels:
            raise ValueError(
                f"`model` takes {in_channels}-channel samples, but `data` has {data.shape[1]} channels: a latent-space "
                "model is planned on the training images' VAE latents, scaled as it was trained on them "
                "(`diffusers_stages.conventions.vae_to_model_latents`), not on the images (the `plan` command: give "
                "it the run's `--vae_path`)."
            )
        _check_model_sample_size(model, data)
        num_gradient_levels, batch_size = positive_integer_arguments(
            num_gradient_levels=num_gradient_levels, batch_size=batch_size
        )
        picks = torch.randperm(data.shape[0], generator=generator)[:batch_size]
        grid = torch.linspace(0, schedule.num_levels - 1, min(num_gradient_levels, schedule.num_levels)).round().long()
        grid = grid.unique().tolist()
        if len(grid) < 2 * num_stages:
            raise ValueError(f"`num_gradient_levels`={num_gradient_levels} is too small for {num_stages} stages.")
        affinity = gradient_affinity(model, data[picks], schedule, grid, generator, progress_bar)
        cuts = interval_clustering(affinity, num_stages)
        boundaries = schedule.levels[[grid[c] for c in cuts]]
        curves = {"gradient affinity to the clean end": _on_grid(affinity[0], grid, schedule)}
        curves["gradient affinity to the noisy end"] = _on_grid(affinity[-1], grid, schedule)
        return _plan(schedule, "gradient", boundaries, curves)
    predictions, _, noise = optimal_predictions(
        data,
        schedule,
        num_samples,
        generator,
        "epsilon",
        chunk_size=chunk_size,
        device=device,
        progress_bar=progress_bar,
    )
    loss = ((predictions - noise) ** 2).mean(dim=(1, 2)).double()
    variation = torch.cat([torch.zeros(1, dtype=torch.float64), (loss[1:] - loss[:-1]).abs().cumsum(0)])
    if variation[-1] <= 0:
        raise ValueError("The optimal denoiser's loss is flat over the schedule (e.g. a single training image).")
    targets = variation[-1] * torch.arange(1, num_stages, dtype=torch.float64) / num_stages
    cuts = torch.searchsorted(variation, targets).clamp(1, schedule.num_levels - 1)
    if len(cuts.unique()) != num_stages - 1:
        raise ValueError(f"The loss curve changes in too few levels for {num_stages} stages; raise `num_levels`.")
    return _plan(schedule, "gradient", schedule.levels[cuts], {"optimal denoiser loss": loss})


def _check_model_sample_size(model: torch.nn.Module, data: torch.Tensor) -> None:
    """Refuse ``data`` the ``model`` does not take as it was trained: flattened ``(N, D)`` data (a U-Net takes
    images), or images of another size than its config's ``sample_size`` (when it sets one)."""
    if data.ndim != 4:
        raise ValueError(
            f"`model` takes (N, C, H, W) samples, but `data` is flattened, of shape {tuple(data.shape)}: give the "
            "images unflattened."
        )
    size = getattr(getattr(model, "config", None), "sample_size", None)
    sides = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if size is not None and sides != list(data.shape[2:]):
        raise ValueError(
            f"`model` takes samples of size {size} (its `sample_size`), but `data` holds samples of size "
            f"{tuple(data.shape[2:])}: it would be measured where it never trained. Plan on data of its size (the "
            "`plan` command: `--resolution`)."
        )


def _on_grid(values: torch.Tensor, grid: list[int], schedule: NoiseSchedule) -> torch.Tensor:
    """Values given on a sub-grid, linearly interpolated to every level of the schedule (for plotting)."""
    sub = schedule.levels[grid]
    return torch.tensor([_interpolate(sub, values, level) for level in schedule.levels], dtype=torch.float64)
