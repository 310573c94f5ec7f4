"""Choosing the dual-backbone switch point from measurements instead of a sweep of sampling runs.

DuoDiff (arXiv 2410.09633) picks ``t_switch`` by sampling and scoring once per candidate. Here both trained
denoisers are scored once on a few batches of real data: the per-noise-level denoising error of each (the training
loss, [`diffusion_loss`], on shared noise), and the switch is the lowest noise level above which the shallow
model's error stays within ``tolerance`` (relative) of the deep model's. Running the shallow model only there
changes each affected model call's error by at most that much.

Command: ``python -m diffusers_stages.switch --pipeline DIR --data digits --tolerance 0.05 --plot switch.png``
(a saved `DualBackbonePipeline`, or ``--shallow DIR --deep DIR --scheduler DIR``, with ``--vae DIR`` for latent
models: they are measured on the data's VAE latents).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode

from .cli import (
    HelpFormatter,
    check_output_file,
    check_png_path,
    check_seed,
    load_saved_folder,
    refuse_empty_folder,
    write_atomically,
)
from .conventions import (
    class_embedding_count,
    encode_model_latents,
    latent_statistics_error,
    null_class_label,
    num_data_classes,
)
from .hub import is_missing_local_path
from .loss import diffusion_loss
from .models.checks import check_positive_integers, check_sample_size, renamed_arguments
from .schedulers import has_continuous_timesteps, is_edm_scheduler, model_call_timesteps


@dataclass
class SwitchRecommendation:
    """The measured error curves and the switch they give."""

    levels: torch.Tensor  # noise levels measured: training timesteps (DDPM-style) or sigmas (EDM-style)
    shallow_error: torch.Tensor
    deep_error: torch.Tensor
    tolerance: float
    switch: float | None  # shallow model for levels >= switch; None: the shallow model is never good enough
    units: str  # "timestep" or "sigma"

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments of `DualBackbonePipeline` for this switch (``switch_timestep`` / ``switch_sigma``), with
        which it runs the shallow model on exactly the measured levels ``>= switch``: ``switch_timestep`` is the
        switch (a timestep on a boundary belongs to the noisier stage); ``switch_sigma`` is the geometric mean of the
        switch and the measured level below it (a sigma on a boundary belongs to the cleaner stage)."""
        if self.switch is None:
            raise ValueError(f"No switch meets tolerance {self.tolerance}: use the deep model alone, or loosen it.")
        below = self.levels[self.levels < self.switch]
        if not len(below):
            raise ValueError(
                f"The shallow model meets tolerance {self.tolerance} at every measured level, down to {self.switch:.4g}: "
                "there is no switch to make, sample with the shallow model alone (or tighten the tolerance)."
            )
        if self.units == "sigma":
            return {"switch_sigma": math.sqrt(float(below.max()) * self.switch)}
        return {f"switch_{self.units}": self.switch}

    def shallow_share(self) -> float:
        """Share of the measured levels handed to the shallow model."""
        return 0.0 if self.switch is None else float((self.levels >= self.switch).double().mean())


def noise_levels(scheduler, num_levels: int, name: str = "num_levels") -> torch.Tensor:
    """Evenly spread training timesteps (DDPM-style) or log-spaced sigmas (EDM-style), low to high; a count the
    scheduler cannot give is a `ValueError` naming ``name``."""
    if is_edm_scheduler(scheduler):
        sigma_min, sigma_max = scheduler.config.sigma_min, scheduler.config.sigma_max
        if not 0 < sigma_min < sigma_max < math.inf:  # else no levels from low to high to walk down
            raise ValueError(
                f"`scheduler` {type(scheduler).__name__} has `sigma_min` {sigma_min!r} and `sigma_max` {sigma_max!r}: "
                "the switch is measured at noise levels between them, which needs 0 < sigma_min < sigma_max < inf."
            )
        low, high = math.log(sigma_min), math.log(sigma_max)
        return torch.linspace(low, high, num_levels, dtype=torch.float64).exp().float()
    num_train_timesteps = scheduler.config.num_train_timesteps
    if num_levels > num_train_timesteps:  # rounded, levels would repeat: measured and counted twice
        raise ValueError(
            f"`{name}`={num_levels} exceeds the {num_train_timesteps} training timesteps of the scheduler: give at "
            f"most {num_train_timesteps}."
        )
    return torch.linspace(0, num_train_timesteps - 1, num_levels).round().long()


def training_scheduler(scheduler):
    """The scheduler whose forward process the denoising error is measured on: an EDM scheduler itself, else a
    `DDPMScheduler` with ``scheduler``'s config and training noise schedule (``alphas_cumprod``). A sampler's own
    ``add_noise`` does not give the model's training input: Euler-type schedulers noise to ``x0 + sigma eps`` (the
    model sees it scaled), multistep solvers look the noise level up on their inference grid."""
    if is_edm_scheduler(scheduler):
        return scheduler
    if has_continuous_timesteps(scheduler):  # its models are conditioned on ln(sigma)/4, not on training timesteps
        raise ValueError(
            f"`scheduler` {type(scheduler).__name__} has timestep_type='continuous' (v-prediction): its models are "
            "conditioned on ln(sigma)/4, but the switch is measured on training timesteps (DDPM-style) or with an "
            "EDM scheduler: give it with `timestep_type='discrete'` if the models were trained on training "
            "timesteps, else set the pipeline's `switch_sigma` by hand."
        )
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(
            f"`scheduler` {type(scheduler).__name__} has no training noise schedule (`alphas_cumprod`, or EDM sigmas) "
            "to measure the denoising error on: give the DDPM-style or EDM scheduler the models were trained with."
        )
    ddpm = DDPMScheduler.from_config(scheduler.config)
    ddpm.alphas_cumprod = scheduler.alphas_cumprod.clone()
    return ddpm


@torch.no_grad()
def denoising_error(
    model: torch.nn.Module,
    scheduler,
    images: torch.Tensor,
    levels: torch.Tensor,
    batch_size: int = 64,
    seed: int = 0,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean denoising loss of ``model`` on ``images`` at each noise level, on ``scheduler``'s training noise
    ([`training_scheduler`]); the noise depends only on ``seed`` (not on ``batch_size``), so two models are compared
    on the very same noisy inputs."""
    from .training.state import eval_mode

    scheduler = training_scheduler(scheduler)
    errors = torch.zeros(len(levels), dtype=torch.float64)
    device = next(model.parameters()).device
    with eval_mode({"model": model}):  # no dropout (a model just trained is in training mode): the seed alone decides
        for i, level in enumerate(levels):
            # the whole level's noise in one draw: torch's CPU sampler draws other values in other-sized pieces
            noises = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed + i))
            for start in range(0, len(images), batch_size):
                clean, noise = images[start : start + batch_size], noises[start : start + batch_size]
                labels = None if class_labels is None else class_labels[start : start + batch_size].to(device)
                t = level.repeat(len(clean)).to(device)
                loss = diffusion_loss(
                    model, scheduler, clean.to(device), t, noise=noise.to(device), class_labels=labels
                )
                errors[i] += loss.double().sum().cpu()
    return errors / len(images)


def check_settings(tolerance: float, num_levels: int, num_images: int = 1, prefix: str = "") -> None:
    """Refuse settings no switch can be measured with (a `ValueError` naming the argument, after ``prefix``: ``"--"``
    for the command's options, and the value)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"`{prefix}tolerance` must be a non-negative number, got {tolerance!r}.")
    for name, value, low in (("num_levels", num_levels, 2), ("num_images", num_images, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{prefix}{name}` must be an integer >= {low}, got {value!r}.")


def recommend_switch(
    shallow: torch.nn.Module,
    deep: torch.nn.Module,
    scheduler,
    images: torch.Tensor,
    tolerance: float = 0.05,
    num_levels: int = 25,
    **error_kwargs,
) -> SwitchRecommendation:
    r"""
    Measure both denoisers' error at ``num_levels`` noise levels and recommend the switch.

    The switch is the lowest measured level ``s`` such that at every measured level ``>= s`` the shallow error is
    at most ``(1 + tolerance)`` times the deep error (so the noisy end is handed over as one piece, as DuoDiff
    does).

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDPMScheduler, UNet2DModel
    >>> from diffusers_stages.switch import recommend_switch
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
    ...     norm_num_groups=4, layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
    ...     up_block_types=("UpBlock2D",) * 2)
    >>> images = torch.rand(8, 1, 8, 8) * 2 - 1
    >>> found = recommend_switch(unet, unet, DDPMScheduler(), images, tolerance=0.0, num_levels=5)
    >>> found.switch, found.shallow_share()  # identical models: the shallow one may take the whole schedule
    (0.0, 1.0)

    ```
    """
    from .pipelines.pipeline_dual_backbone import _check_interchangeable

    check_settings(tolerance, num_levels)
    _check_interchangeable(shallow, deep)  # as `DualBackbonePipeline` refuses the pair: both measured on `images`
    _check_images(images, deep)
    check_positive_integers(batch_size=error_kwargs.get("batch_size", 1))
    levels = noise_levels(scheduler, num_levels)
    shallow_error = denoising_error(shallow, scheduler, images, levels, **error_kwargs)
    deep_error = denoising_error(deep, scheduler, images, levels, **error_kwargs)
    for name, error in (("shallow", shallow_error), ("deep", deep_error)):
        if not bool(torch.isfinite(error).all()):  # NaN compares false: it would read as "not good enough"
            bad = levels[~torch.isfinite(error)].tolist()
            raise ValueError(
                f"`{name}` gives a non-finite denoising error at levels {bad}: its weights (or outputs) hold NaN or "
                "infinite values, no switch can be measured with it."
            )
    good = shallow_error <= (1.0 + tolerance) * deep_error
    switch = None
    for i in range(len(levels) - 1, -1, -1):  # walk down from the noisy end while the shallow model is good enough
        if not good[i]:
            break
        switch = float(levels[i])
    units = "sigma" if is_edm_scheduler(scheduler) else "timestep"
    return SwitchRecommendation(levels, shallow_error, deep_error, float(tolerance), switch, units)


def _check_images(images: torch.Tensor, model: torch.nn.Module) -> None:
    """Images both models can be scored on: a non-empty finite floating-point ``(N, C, H, W)`` batch with the
    models' input channels."""
    if not torch.is_tensor(images) or images.ndim != 4 or len(images) == 0 or not images.is_floating_point():
        got = (
            f"a {images.dtype} tensor of shape {tuple(images.shape)}"
            if torch.is_tensor(images)
            else type(images).__name__
        )
        raise ValueError(f"`images` must be a non-empty floating-point (N, C, H, W) tensor in [-1, 1], got {got}.")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("`images` hold NaN or infinite values: no denoising error can be measured on them.")
    in_channels = getattr(getattr(model, "config", None), "in_channels", None)
    if in_channels is not None and images.shape[1] != in_channels:
        raise ValueError(f"`images` have {images.shape[1]} channels but the deep model takes {in_channels}.")


def flops_per_call(model: torch.nn.Module, sample: torch.Tensor, timestep, class_labels=None) -> int:
    """FLOPs of one forward call (`torch.utils.flop_counter`)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(sample, timestep, class_labels=class_labels)
    return counter.get_total_flops()


def plot_switch(found: SwitchRecommendation, path: str | os.PathLike, flops_ratio: float | None = None) -> str:
    """Save both error curves, the switch and the shallow model's region as a PNG at ``path`` (its folders are
    created; an extension of another image format, ``switch.pdf``, is a `ValueError`)."""
    check_png_path(path, "path")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = found.levels.double().numpy()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(levels, found.deep_error.numpy(), "o-", label="deep")
    ax.plot(levels, found.shallow_error.numpy(), "s-", label="shallow")
    ax.plot(levels, (1 + found.tolerance) * found.deep_error.numpy(), ":", color="gray", label="deep x (1 + tol)")
    if found.switch is not None:
        ax.axvline(found.switch, color="red", label=f"switch = {found.switch:.4g}")
        ax.axvspan(found.switch, levels[-1], color="C1", alpha=0.1, lw=0)
    ax.set_yscale("log")
    if found.units == "sigma":
        ax.set_xscale("log")
    ax.set_xlabel("training timestep" if found.units == "timestep" else "sigma")
    ax.set_ylabel("denoising error (training loss)")
    extra = "" if flops_ratio is None else f", shallow/deep FLOPs {flops_ratio:.2f}"
    ax.set_title(f"Dual-backbone switch, tolerance {found.tolerance:g}{extra}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:  # at exactly ``path``, whatever its extension (matplotlib would add one), replaced whole
        write_atomically(path, lambda partial: fig.savefig(partial, format="png"))
    finally:
        plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# command line
def _load_data(name: str, resolution: int, channels: int, num_images: int) -> torch.Tensor:
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = torch.from_numpy(load_digits().images[:num_images]).float()[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
        digits = torch.nn.functional.interpolate(digits, size=(resolution, resolution), mode="bilinear")
        return digits.repeat(1, channels, 1, 1)
    from .planning.data import load_images

    source = {"train_data_dir": name} if os.path.isdir(name) else {"dataset": name}
    try:
        return load_images(**source, resolution=resolution, num_channels=channels, max_images=num_images)
    except ValueError as error:  # it names its arguments; this command's option for both is --data
        raise renamed_arguments(error, {"train_data_dir": "--data", "dataset": "--data"}) from None


def _image_side(sample_size) -> int:
    """The side of the square images the models are measured on: ``sample_size``, an int or a pair of equal sides
    (diffusers takes ``(8, 8)``, saved as a list)."""
    if sample_size is None:  # diffusers' models take None (any size): the data need one
        raise ValueError(
            "The switch is measured on images of the models' size, but the deep model's `sample_size` is None: set "
            "it in both models' configs (`model.register_to_config(sample_size=32)`, then save) to the size they "
            "were trained at."
        )
    try:
        check_sample_size(sample_size)
    except ValueError as error:
        raise ValueError(
            f"The switch is measured on images of the models' size, but the deep model's `sample_size` is "
            f"{sample_size!r}: {error}"
        ) from None
    sides = [sample_size] if isinstance(sample_size, int) else sample_size
    if len(set(sides)) != 1:
        raise ValueError(
            f"The switch is measured on square images, but the deep model's `sample_size` is {sample_size}: give "
            "models of square images."
        )
    return sides[0]


def _class_labels(config, data: str, num_images: int) -> tuple[torch.Tensor | None, str]:
    """Labels for a class-conditional pair, and what they are: the digits' own classes when the models have their 10,
    else the unconditional label (the one classifier-free guidance trains) for every image; None for unconditional
    models."""
    count = class_embedding_count(config)
    if count is None:
        return None, ""
    if data == "digits" and num_data_classes(count) == 10:
        from sklearn.datasets import load_digits

        return torch.from_numpy(load_digits().target[:num_images]).long(), "the digits' classes"
    return torch.full((num_images,), null_class_label(count), dtype=torch.long), "the unconditional label"


def _load_models(args) -> tuple:
    if args.pipeline is not None:
        from .pipelines import DualBackbonePipeline

        pipe = DualBackbonePipeline.from_pretrained(args.pipeline)  # never runs code from the folder
        return pipe.shallow, pipe.deep, pipe.scheduler, pipe.vae
    if args.shallow is None or args.deep is None or args.scheduler is None:
        raise ValueError("Give `--pipeline DIR`, or all of `--shallow DIR --deep DIR --scheduler DIR`.")
    return (
        load_saved_folder(args.shallow, "--shallow"),
        load_saved_folder(args.deep, "--deep"),
        load_saved_folder(args.scheduler, "--scheduler", scheduler=True),
        load_saved_folder(args.vae, "--vae") if args.vae is not None else None,
    )


def _check_vae(vae, in_channels: int, source: str) -> None:
    """Refuse ``vae`` (named ``source``) unless it is an AutoencoderKL whose latents the models take, before any data
    is read (`recommend_switch` would name its `images`)."""
    from diffusers import AutoencoderKL

    if not isinstance(vae, AutoencoderKL):
        raise ValueError(
            f"{source} is a {type(vae).__name__}: the switch is measured on an AutoencoderKL's latents (the VAE the "
            "training scripts train with), as the models were trained on them."
        )
    if vae.config.latent_channels != in_channels:
        raise ValueError(
            f"{source} gives {vae.config.latent_channels}-channel latents, but the models take {in_channels} "
            "channels: give the VAE the models were trained on (none for pixel models)."
        )
    statistics = latent_statistics_error(vae.config, in_channels)  # how its latents are scaled
    if statistics is not None:
        raise ValueError(f"{source}: {statistics}.")


def _check_pixel_models(in_channels: int, pipeline: str | None) -> None:
    """Without a VAE the models are measured on images: refuse models of other samples than grey or RGB images
    (latent models, whose VAE is missing: `--vae`, or the ``pipeline`` saved without its ``vae``), which would be
    measured on the data's pixels (the digits repeated over their channels) rather than on the latents they denoise."""
    if in_channels in (1, 3):
        return
    fix = (
        f"`--pipeline` {pipeline!r} holds no `vae`: give its models as `--shallow DIR --deep DIR --scheduler DIR` with "
        "`--vae DIR` (the AutoencoderKL they were trained on)"
        if pipeline
        else "latent models are measured on their VAE's latents: give `--vae` (the AutoencoderKL they were trained on)"
    )
    raise ValueError(f"The models take {in_channels}-channel samples, not images (1 or 3 channels): {fix}.")


def _vae_latents(vae, images: torch.Tensor, seed: int, batch_size: int = 64) -> torch.Tensor:
    """``images`` as a latent-diffusion pair is trained on them: seeded samples of ``vae``'s posterior, scaled by
    `vae_to_model_latents` (`conventions.encode_model_latents`, what the training scripts do)."""
    return encode_model_latents(vae, images, torch.Generator(vae.device).manual_seed(seed), batch_size).cpu()


def _one_backbone_hint(path: str) -> str:
    """For the output of a one-backbone run (`train_dual_backbone.py --backbones shallow|deep`: ``<run>/<backbone>/``
    and ``<run>/scheduler/``, no model_index.json), the options that take it."""
    held = [name for name in ("shallow", "deep") if os.path.isfile(os.path.join(path, name, "config.json"))]
    if len(held) != 1 or not os.path.isdir(os.path.join(path, "scheduler")):
        return ""
    backbone, other = held[0], {"shallow": "deep", "deep": "shallow"}[held[0]]
    return (
        f" It is a one-backbone run ({backbone}/): give `--{backbone} {os.path.join(path, backbone)}` "
        f"`--{other} DIR` (the other run's {other}/) `--scheduler {os.path.join(path, 'scheduler')}` instead, or put "
        "the two together as a DualBackbonePipeline (examples/dual_backbone/README.md)."
    )


def check_dual_backbone_folder(path: str) -> None:
    """Refuse, before loading anything, a `--pipeline` that is not a saved `DualBackbonePipeline`: the switch is
    measured between its two backbones."""
    from diffusers import DiffusionPipeline

    refuse_empty_folder(path, "--pipeline")
    if os.path.isfile(path):  # `load_config` would read it as the config itself
        raise ValueError(
            f"`--pipeline` {path!r} is a file, not a saved pipeline folder: give the folder that holds it."
        )
    if is_missing_local_path(path):  # not asked of the Hub, whose error would say to check the connection
        raise ValueError(
            f"`--pipeline` {path!r} is not a saved pipeline folder: no such folder (nor a Hub repository id, "
            "'namespace/name'). Give the folder of a saved DualBackbonePipeline (the one that holds model_index.json)."
        )
    try:
        config = DiffusionPipeline.load_config(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"`--pipeline` {path!r} is not a saved pipeline folder (model_index.json): {error}{_one_backbone_hint(path)}"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"`--pipeline` {path!r}: its model_index.json is not a JSON object (a config), got a "
            f"{type(config).__name__}."
        )
    entry = config.get("_class_name")
    name = entry[-1] if isinstance(entry, list) and entry else entry  # saved as [file, class] by this package
    if name != "DualBackbonePipeline":
        raise ValueError(
            f"`--pipeline` {path!r} holds a {name}, not a DualBackbonePipeline: the switch is measured between a "
            "dual-backbone pipeline's shallow and deep models. Give a DualBackbonePipeline folder (e.g. from "
            "`diffusers_stages.conversion.pipelines_to_experts` or `train_dual_backbone.py`), or the two models with "
            "`--shallow DIR --deep DIR --scheduler DIR`."
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's options."""
    parser = argparse.ArgumentParser(
        description="Recommend the dual-backbone switch from measured denoising errors.", formatter_class=HelpFormatter
    )
    parser.add_argument("--pipeline", help="a saved DualBackbonePipeline folder")
    parser.add_argument("--shallow", help="a saved shallow model folder (with --deep and --scheduler)")
    parser.add_argument("--deep", help="a saved deep model folder")
    parser.add_argument("--scheduler", help="a saved scheduler folder")
    parser.add_argument("--vae", help="with --shallow/--deep of latent models: the AutoencoderKL folder they train on")
    parser.add_argument("--data", default="digits", help="'digits' (sklearn), an image folder, or a datasets name")
    parser.add_argument(
        "--num_images", type=int, default=256, help="the first N images of --data, at the deep model's sample_size"
    )
    parser.add_argument(
        "--num_levels",
        type=int,
        default=25,
        help="noise levels measured (>= 2): evenly spread training timesteps, or log-spaced sigmas for EDM",
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.05, help="allowed relative excess error of the shallow model"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the noise both models are measured on, in [0, 2**32)"
    )
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=50,
        help="sampling steps the split of model calls and the speed-up are reported for (with the scheduler given)",
    )
    parser.add_argument("--plot", default="switch.png", help="where to save the PNG (written as a PNG at this path)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> SwitchRecommendation:
    """Run the command on ``argv``; bad input raises a `ValueError` (the command line, [`cli`], prints it as one
    line)."""
    return switch_command(parse_args(argv))


def switch_command(args: argparse.Namespace) -> SwitchRecommendation:
    """The command on parsed arguments: measure, print and plot the recommended switch."""
    check_settings(args.tolerance, args.num_levels, args.num_images, "--")  # before any model or data is loaded
    check_positive_integers(**{"--num_inference_steps": args.num_inference_steps})
    check_seed(args.seed)
    check_output_file(args.plot, "--plot")
    check_png_path(args.plot, "--plot")
    if args.pipeline is not None:
        given = [f"`--{name}`" for name in ("shallow", "deep", "scheduler", "vae") if getattr(args, name) is not None]
        if given:  # the pipeline's models and scheduler would be measured, these ignored
            raise ValueError(
                f"`--pipeline` holds the models: {', '.join(given)} would be ignored. Give `--pipeline DIR`, or "
                "`--shallow DIR --deep DIR --scheduler DIR` without it."
            )
        check_dual_backbone_folder(args.pipeline)

    shallow, deep, scheduler, vae = _load_models(args)
    # a step count the scheduler cannot sample is refused before anything is measured
    model_call_timesteps(scheduler, args.num_inference_steps)
    noise_levels(scheduler, args.num_levels, "--num_levels")  # levels it can measure, before the data is read
    config, side = deep.config, _image_side(deep.config.sample_size)
    if vae is None:
        _check_pixel_models(config.in_channels, args.pipeline)
        images = _load_data(args.data, side, config.in_channels, args.num_images)
    else:  # latent models: measured on the data's VAE latents, as they were trained
        from .pipelines.pipeline_staged import vae_scale_factor

        _check_vae(vae, config.in_channels, f"`--vae` {args.vae!r}" if args.vae else "the pipeline's `vae`")
        pixels = _load_data(args.data, side * vae_scale_factor(vae), vae.config.in_channels, args.num_images)
        images = _vae_latents(vae, pixels, args.seed)
    labels, labelled = _class_labels(config, args.data, len(images))
    if labels is not None:
        print(f"class labels: {labelled}")
    found = recommend_switch(
        shallow, deep, scheduler, images, args.tolerance, args.num_levels, seed=args.seed, class_labels=labels
    )
    sample, level, label = images[:1], found.levels[-1:], None if labels is None else labels[:1]
    ratio = flops_per_call(shallow, sample, level, label) / flops_per_call(deep, sample, level, label)
    share = found.shallow_share()
    print(f"levels ({found.units}): " + " ".join(f"{v:.4g}" for v in found.levels.tolist()))
    print("deep error:    " + " ".join(f"{v:.4g}" for v in found.deep_error.tolist()))
    print("shallow error: " + " ".join(f"{v:.4g}" for v in found.shallow_error.tolist()))
    print(f"shallow/deep FLOPs per call: {ratio:.3f}")
    if found.switch is None:
        print(f"No switch meets tolerance {args.tolerance}: the shallow model is worse even at the noisiest level.")
    elif share == 1.0:
        print(
            f"The shallow model meets tolerance {args.tolerance} at every measured level: sample with it alone "
            f"(estimated FLOPs speed-up {1.0 / ratio:.2f}x), or tighten the tolerance."
        )
    else:  # the split the pipeline samples with this switch, on this scheduler's grid (not the measured levels')
        from .pipelines import DualBackbonePipeline

        kwargs, steps = found.pipeline_kwargs(), args.num_inference_steps
        pipe = DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=scheduler, **kwargs)
        stages = [stage for _, stage in pipe.expert_schedule(steps)]  # 1: the shallow model
        speedup = len(stages) / (sum(stages) * ratio + len(stages) - sum(stages))
        print(
            f"recommended switch: {kwargs} (shallow model on {share:.0%} of the measured levels, and on "
            f"{sum(stages)} of the {len(stages)} model calls of {steps} steps of {type(scheduler).__name__}: "
            f"estimated FLOPs speed-up {speedup:.2f}x)"
        )
    print(f"plot: {plot_switch(found, args.plot, ratio)}")
    return found


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (`diffusers-stages-switch`): exit status 0 on success; bad input is one line on stderr and
    exit status 1 (2 for a usage error), not a traceback."""
    from diffusers_stages.conversion.common import run as run_command

    run_command(switch_command, parse_args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
