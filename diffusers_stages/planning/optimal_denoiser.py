"""The closed-form optimal denoiser on a training set, and the pixel-agreement similarity of Zhang et al.

For a training set ``{y_i}`` and ``x = a * y + s * eps``, the minimiser of the denoising loss is the posterior mean
under the Gaussian mixture centred on the (scaled) training images (Zhang et al., CVPR 2024, section 4.1; Karras
et al. 2022, eq. 57):

    E[y | x] = sum_i w_i(x) y_i,    w_i(x) = softmax_i( -||x - a y_i||^2 / (2 s^2) ),
    eps*(x)  = (x - a E[y | x]) / s.

The similarity of two noise levels is the pixel agreement of the optimal predictions there, on the same ``x0`` and
noise. It compares ``E[y | x]`` by default, as the authors' public code does: ``eps*`` is ~``eps`` at *both* ends
of the schedule (memorised data at ``t -> 0``, ``x_T ~ eps`` at ``t -> T``), so in noise space the clean-end and
noisy-end curves coincide, while ``E[y | x]`` runs from the training image to the data mean.

The softmax is computed in float64 and streamed over the data in chunks (an online log-sum-exp), so memory is
``O(queries x chunk)`` and never ``O(N^2)``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models.checks import check_device, positive_integer_arguments
from .schedule import NoiseSchedule


def _check_data(data: torch.Tensor) -> torch.Tensor:
    """``data`` flattened to ``(N, D)`` and detached (images that require grad, latents encoded with autograd on,
    build no graph in planning), or a `ValueError` for data that is no non-empty finite tensor of images."""
    if not torch.is_tensor(data) or data.ndim < 2 or data.shape[0] == 0 or data[0].numel() == 0:
        shape = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
        raise ValueError(f"`data` must be a non-empty tensor of training images (N, ...), got {shape}.")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("`data` holds NaN or infinite values.")
    return data.detach().reshape(data.shape[0], -1)


def check_planning_data(data: torch.Tensor, name: str = "data") -> torch.Tensor:
    """Refuse, up front and by its real cause, data that no stage plan can be drawn from: not floating point (raw
    ``0..255`` or ``int64`` images), not ``(N, C, H, W)`` / ``(N, D)`` (a single ``(C, H, W)`` image), or fewer than
    two different images (one image, or copies of one: the optimal denoiser then returns that image at every noise
    level, so every level looks alike and no boundary can be placed). ``name`` is the argument the data came from.
    Returns the data flattened to ``(N, D)``."""
    flat = _check_data(data)
    if not data.is_floating_point():
        raise ValueError(
            f"`{name}` must be a floating-point tensor scaled as the model sees it ([-1, 1] for pixels), got dtype "
            f"{data.dtype}: convert 0..255 images with `data.float() / 127.5 - 1`."
        )
    if data.ndim not in (2, 4):
        hint = (
            " (grayscale (N, H, W) images? add the channel with `data[:, None]`; one (C, H, W) image? stack several)"
        )
        raise ValueError(
            f"`{name}` must be training images (N, C, H, W), or flattened (N, D), got a {data.ndim}-D tensor of shape "
            f"{tuple(data.shape)}{hint if data.ndim == 3 else ''}."
        )
    if flat.shape[0] < 2 or _all_identical(flat):
        held = "1 image" if flat.shape[0] == 1 else f"{flat.shape[0]} images, all identical"
        raise ValueError(
            f"`{name}` holds {held}: planning needs at least 2 different training images (the optimal denoiser of a "
            "single image returns it at every noise level, so no noise level differs from another)."
        )
    return flat


def _all_identical(flat: torch.Tensor, chunk: int = 1024) -> bool:
    """Whether every row equals the first, in chunks that stop at the first difference (memory ``O(chunk x D)``)."""
    return not any(bool((flat[i : i + chunk] != flat[0]).any()) for i in range(1, flat.shape[0], chunk))


def optimal_denoiser_mean(
    noisy: torch.Tensor,
    data: torch.Tensor,
    signal_scale: torch.Tensor | float,
    noise_scale: torch.Tensor | float,
    chunk_size: int = 1024,
) -> torch.Tensor:
    r"""
    ``E[y | x]`` for each row of ``noisy`` under the Gaussian mixture on ``data`` (float64, streamed over ``data``).

    Args:
        noisy (`torch.Tensor`): ``(Q, D)`` noisy samples ``x = a y + s eps``.
        data (`torch.Tensor`): ``(N, D)`` training set (any device; chunks are moved to ``noisy.device``).
        signal_scale (`torch.Tensor` or `float`): ``a``, one for all rows or one per row ``(Q,)``.
        noise_scale (`torch.Tensor` or `float`): ``s > 0``, one for all rows or one per row ``(Q,)``.
        chunk_size (`int`): training images per chunk (memory ``O(Q x chunk_size)``).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning.optimal_denoiser import optimal_denoiser_mean
    >>> data = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    >>> optimal_denoiser_mean(torch.tensor([[0.9, 1.1]]), data, 1.0, 0.1)  # near the first image: it is the answer
    tensor([[1., 1.]], dtype=torch.float64)

    ```
    """
    (chunk_size,) = positive_integer_arguments(chunk_size=chunk_size)
    with torch.no_grad():  # a closed form: recorded for backward, every chunk would be kept (memory O(Q x N))
        x = noisy.to(torch.float64)
        a = torch.as_tensor(signal_scale, dtype=torch.float64, device=x.device).reshape(-1, 1)
        s = torch.as_tensor(noise_scale, dtype=torch.float64, device=x.device).reshape(-1, 1)
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"`signal_scale` must be finite, got {a[~torch.isfinite(a)][0].item()}.")
        bad = ~torch.isfinite(s) | (s <= 0)  # s = 0 divides by zero (NaN); s < 0 is no standard deviation
        if bool(bad.any()):
            raise ValueError(f"`noise_scale` must be finite and > 0, got {s[bad][0].item()}.")
        return _streamed_posterior_mean(x, data, a, s, chunk_size)


def _streamed_posterior_mean(x: torch.Tensor, data, a: torch.Tensor, s: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``E[y | x]`` for float64 ``x`` ``(Q, D)`` and scales ``(Q or 1, 1)``: see `optimal_denoiser_mean`."""
    inv_two_var = 1 / (2 * s**2)
    x_sq = (x * x).sum(1, keepdim=True)
    running_max = torch.full((x.shape[0], 1), -torch.inf, dtype=torch.float64, device=x.device)
    running_sum = torch.zeros_like(running_max)
    running_mean = torch.zeros_like(x)
    for start in range(0, data.shape[0], chunk_size):
        y = data[start : start + chunk_size].to(device=x.device, dtype=torch.float64)
        # log w_i = -||x - a y_i||^2 / (2 s^2), expanded so that one matmul does the whole chunk
        sq_dist = x_sq - 2 * a * (x @ y.T) + a**2 * (y * y).sum(1)
        logits = -sq_dist.clamp_min(0) * inv_two_var
        # online softmax: rescale what has been accumulated when the running maximum grows
        new_max = torch.maximum(running_max, logits.max(1, keepdim=True).values)
        rescale = torch.exp(running_max - new_max)
        weights = torch.exp(logits - new_max)
        running_sum = running_sum * rescale + weights.sum(1, keepdim=True)
        running_mean = running_mean * rescale + weights @ y
        running_max = new_max
    return running_mean / running_sum


TARGETS = ("sample", "epsilon")


def optimal_predictions(
    data: torch.Tensor,
    schedule: NoiseSchedule,
    num_samples: int = 128,
    generator: torch.Generator | None = None,
    target: str = "sample",
    chunk_size: int = 1024,
    query_batch: int = 2048,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    The optimal denoiser at every level of ``schedule`` on ``num_samples`` Monte Carlo draws ``(x0, eps)`` shared by
    all levels (Zhang et al., Algorithm 1: two levels are compared on the same ``x0`` and noise).

    Args:
        target (`str`): ``"sample"`` for the posterior mean ``E[x0 | x_t]`` (what the authors' public code compares),
            or ``"epsilon"`` for ``eps*_t = (x_t - a_t E[x0 | x_t]) / s_t``.
        chunk_size (`int`): training images per chunk; query_batch (`int`): noisy samples per pass over the data.
            Peak memory is about ``query_batch x (chunk_size + 2 D)`` plus ``chunk_size x D`` float64 on
            ``device`` (on CUDA also one copy of the training set, in its dtype), plus the
            ``(num_levels x num_samples x D)`` float32 predictions on the CPU.

    Returns:
        ``(predictions, clean, noise)``: ``(num_levels, num_samples, D)`` float32 predictions, and the
        ``(num_samples, D)`` training images and noise of the draws.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning import NoiseSchedule
    >>> from diffusers_stages.planning.optimal_denoiser import optimal_predictions
    >>> data = torch.randn(1, 16)  # one training image: the optimal denoiser recovers it, and the noise, exactly
    >>> schedule = NoiseSchedule.edm(num_levels=4)
    >>> eps_star, _, noise = optimal_predictions(data, schedule, 2, torch.manual_seed(0), "epsilon")
    >>> torch.allclose(eps_star, noise.expand_as(eps_star), atol=1e-4)
    True

    ```
    """
    flat = _check_data(data)  # detached: images that require grad build no graph
    (num_samples,) = positive_integer_arguments(num_samples=num_samples)
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS}, got {target!r}.")
    device = (
        check_device(device, "device")
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    picks = torch.randint(flat.shape[0], (num_samples,), generator=generator)
    noise = torch.randn(num_samples, flat.shape[1], generator=generator, dtype=torch.float64)
    clean = flat[picks].to("cpu", torch.float64)  # the draws stay on the CPU, as the noise, whatever the data's device
    if device.type == "cuda":
        flat = flat.to(device)  # one copy of the training set on the accelerator, chunks read from it
    # every (level, draw) pair is one query row: levels are batched together so each matmul is large
    level_of_row = torch.arange(schedule.num_levels).repeat_interleave(num_samples)
    a, s = schedule.signal_scale[level_of_row, None], schedule.noise_scale[level_of_row, None]
    predictions = torch.empty(schedule.num_levels * num_samples, flat.shape[1], dtype=torch.float32)
    rows_per_block = max(num_samples, query_batch // num_samples * num_samples)
    blocks = range(0, predictions.shape[0], rows_per_block)
    for start in tqdm(blocks, desc="optimal denoiser", disable=not progress_bar):
        rows = slice(start, start + rows_per_block)
        draws = torch.arange(rows.start, min(rows.stop, predictions.shape[0])) % num_samples
        noisy = a[rows] * clean[draws] + s[rows] * noise[draws]
        mean = optimal_denoiser_mean(noisy.to(device), flat, a[rows, 0].to(device), s[rows, 0].to(device), chunk_size)
        mean = mean.cpu()
        predictions[rows] = (mean if target == "sample" else (noisy - a[rows] * mean) / s[rows]).float()
    predictions = predictions.reshape(schedule.num_levels, num_samples, -1)
    return predictions, clean.float(), noise.float()


def pixel_agreement(predictions: torch.Tensor, anchor: int, eta: float) -> torch.Tensor:
    r"""
    ``S(t, anchor)`` at every level: the fraction of pixels where the optimal denoiser's predictions at ``t`` and at
    ``anchor`` differ by at most ``eta``, averaged over the Monte Carlo draws (Zhang et al., Algorithm 1).

    Args:
        predictions (`torch.Tensor`): ``(num_levels, num_samples, D)`` from [`optimal_predictions`].
        anchor (`int`): index of the reference level.
        eta (`float`): pixel tolerance in ``(0, 1]``.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning.optimal_denoiser import pixel_agreement
    >>> predictions = torch.tensor([[[0.0, 0.0]], [[0.05, 0.5]], [[1.0, 1.0]]])  # 3 levels, 1 draw, 2 pixels
    >>> pixel_agreement(predictions, anchor=0, eta=0.1).tolist()
    [1.0, 0.5, 0.0]

    ```
    """
    reference = predictions[anchor]
    return torch.stack([_agreement(level, reference, eta) for level in predictions])


def _agreement(first: torch.Tensor, second: torch.Tensor, eta: float) -> torch.Tensor:
    """The fraction of entries where two levels' ``(num_samples, D)`` predictions differ by at most ``eta``, float64:
    one level at a time, so that memory stays that of one level (not of the whole grid)."""
    return ((first - second).abs() <= eta).count_nonzero().double() / first.numel()


def similarity_matrix(predictions: torch.Tensor, eta: float) -> torch.Tensor:
    r"""
    ``S[t, t']`` for every pair of levels: [`pixel_agreement`] with every level as the anchor, a symmetric
    ``(num_levels, num_levels)`` float64 matrix with ones on the diagonal (the input of the authors' integer
    program, [`~diffusers_stages.planning.methods.ilp_boundaries`]).

    ``eta`` is in the data's units: the authors count a pixel as agreeing when the two predictions differ by less than
    ``2/256`` on ``[0, 1]`` data, that is ``4/256 = 0.015625`` on the ``[-1, 1]`` data this package plans on.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.planning.optimal_denoiser import similarity_matrix
    >>> predictions = torch.tensor([[[0.0, 0.0]], [[0.05, 0.5]], [[1.0, 1.0]]])  # 3 levels, 1 draw, 2 pixels
    >>> similarity_matrix(predictions, eta=0.1).tolist()
    [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]

    ```
    """
    num_levels = predictions.shape[0]
    similarity = torch.eye(num_levels, dtype=torch.float64, device=predictions.device)
    for i in range(num_levels):  # each pair once: the agreement is symmetric
        for j in range(i + 1, num_levels):
            similarity[i, j] = similarity[j, i] = _agreement(predictions[i], predictions[j], eta)
    return similarity
