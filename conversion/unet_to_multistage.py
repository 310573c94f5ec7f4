"""Convert a diffusers `UNet2DModel` folder, or a `DDPMPipeline` / `DDIMPipeline` / `LDMPipeline` folder, into a
`MultiStagePipeline` folder whose every stage decoder starts as a copy of the source's up path; or a
`StableDiffusionPipeline` / `StableDiffusionXLPipeline` folder into the same pipeline class with a
`MultiStageUNet2DConditionModel` as its ``unet`` (loadable with that class once diffusers_stages is imported).

Before fine-tuning the converted pipeline samples exactly what the source does (same seed, same images); the
stages then diverge as each decoder is trained on its own part of the noise schedule.

    python -m diffusers_stages.conversion.unet_to_multistage --source ddpm-folder --output_path staged \\
        --stage_boundaries 442 631 --verify
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import types

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, ModelMixin, SchedulerMixin, UNet2DConditionModel, UNet2DModel

import diffusers_stages
from diffusers_stages.conversion.common import (
    build_parser,
    check_plain_safetensors,
    input_paths,
    load_strict,
    max_difference,
    probe_class_labels,
    probe_tensor,
    probe_timesteps,
    read_json,
    report_verification,
    run,
    save_in_stored_dtypes,
    source_folder,
    staged_output,
    with_appended_class,
)
from diffusers_stages.conversion.multistage_to_unet import conditioning
from diffusers_stages.models import MultiStageUNet2DConditionModel, MultiStageUNet2DModel
from diffusers_stages.models.loading import component_folder, load_scheduler
from diffusers_stages.pipelines import MultiStagePipeline
from diffusers_stages.pipelines.loading import (
    check_tokenizer,
    load_transformers_components,
    pipeline_module_class,
    resolve_component_class,
)
from diffusers_stages.pipelines.pipeline_staged import _vae_latent_channels
from diffusers_stages.schedulers import scheduler_units as units_of
from diffusers_stages.training.args import BoundaryList

SOURCE_PIPELINES = {"DDPMPipeline": "unet", "DDIMPipeline": "unet", "LDMPipeline": "unet"}  # pipeline -> denoiser
TEXT_TO_IMAGE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # converted in place
VERIFY_PROMPT = "a photo of a cat"
SOURCE_VAES = {"LDMPipeline": "vqvae"}  # pipeline -> its VAE component (DDPM/DDIM take none: diffusers ignores one)
PLANS = ("uniform", "snr")
PLAN_LEVELS = 100  # noise levels of the planning grid --plan works on: at most this many stages


UNCONDITIONAL_LABEL_HELP = (
    "Class-conditional U-Nets (`num_class_embeds` N), required for them: the class the pipeline drops for "
    "classifier-free guidance, always the last of its class embeddings (it samples the classes before it). N - 1: "
    "the source reserves its last class for 'no class' (as this package's training does), which converts as is; N: "
    "all N classes are data classes, and a new label N (a zero row appended to a class table) is the unconditional "
    "label, never trained (sample with guidance_scale=1)."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--source",
        required=True,
        help="A UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors) or a DDPMPipeline, "
        "DDIMPipeline or LDMPipeline folder (model_index.json); or a StableDiffusionPipeline or "
        "StableDiffusionXLPipeline folder (its unet becomes a MultiStageUNet2DConditionModel).",
    )
    parser.add_argument(
        "--stage_boundaries",
        nargs="+",
        action=BoundaryList,  # `442 631`, as every command of the package; the old `442,631` with a warning
        help="Inner stage boundaries, increasing, in --boundary_units (e.g. 442 631: Zhang et al.'s CIFAR-10 split).",
    )
    parser.add_argument(
        "--boundary_units",
        choices=("timestep", "sigma"),
        help="Units of --stage_boundaries (default: timestep): those of the source's scheduler. A DDPM-type source (a beta schedule: "
        "DDPM, DDIM, PNDM, ...; every bare UNet2DModel folder) conditions on training timesteps, so 'sigma' is "
        "refused for it (the converted pipeline could not sample); 'sigma' is for a source with an EDM scheduler.",
    )
    parser.add_argument(
        "--plan",
        choices=PLANS,
        help="Plan the boundaries from the source's noise schedule instead of giving them: 'uniform' (equal shares "
        "of the training timesteps) or 'snr' (equal steps of log-SNR). Data-driven plans: see diffusers_stages.planning.",
    )
    parser.add_argument(
        "--num_stages",
        type=int,
        help=f"Number of stages for --plan, from 2 to {PLAN_LEVELS} and at most the source's training timesteps "
        "(default: 3).",
    )
    parser.add_argument(
        "--unconditional_label",
        type=int,
        help=UNCONDITIONAL_LABEL_HELP,
    )
    parser.add_argument("--verify_steps", type=int, default=3, help="Sampling steps of the --verify comparison.")
    args = parser.parse_args(argv)
    if (args.stage_boundaries is None) == (args.plan is None):
        parser.error("give exactly one of --stage_boundaries and --plan")
    if args.num_stages is not None and args.plan is None:
        parser.error(f"--num_stages {args.num_stages} is for --plan: --stage_boundaries give the stages already")
    if args.num_stages is None:
        args.num_stages = 3
    if not 2 <= args.num_stages <= PLAN_LEVELS:
        parser.error(
            f"--num_stages must be an integer from 2 to {PLAN_LEVELS} (the planning grid's noise levels), got "
            f"{args.num_stages}"
        )
    if args.boundary_units is not None and args.plan is not None:
        parser.error(f"--boundary_units {args.boundary_units} is for --stage_boundaries: --plan takes the scheduler's")
    if args.boundary_units is None:
        args.boundary_units = "timestep"
    if args.verify_steps < 1:
        parser.error(f"--verify_steps must be a positive integer, got {args.verify_steps}")
    return args


def load_source(path: str, option: str = "--source") -> tuple[UNet2DModel, object, object, str | None]:
    """``(unet, scheduler, vae, source_pipeline_class)`` from a UNet2DModel or supported pipeline folder (given as
    ``option``, which errors name)."""
    source_folder(path, option)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        refuse_staged_source(path, read_class_name(os.path.join(path, "config.json")), option)
        unet = load_strict(UNet2DModel, path)
        return unet, DDPMScheduler(num_train_timesteps=bare_schedule_length(unet, path)), None, None
    index = read_json(index_path, "model_index.json")
    pipeline_class = refuse_staged_source(path, index.get("_class_name"), option)
    if pipeline_class not in SOURCE_PIPELINES:
        raise ValueError(
            f"`{option}` {path!r} holds a {pipeline_class}; supported pipelines are "
            f"{sorted(SOURCE_PIPELINES) + list(TEXT_TO_IMAGE_PIPELINES)} (or give the UNet2DModel folder itself)."
        )
    unet = load_strict(UNet2DModel, path, subfolder=SOURCE_PIPELINES[pipeline_class])
    scheduler_class = source_component_class(index, "scheduler", SchedulerMixin, option=option)
    scheduler = load_scheduler(scheduler_class, component_folder(path, "scheduler"), f"`{option}`")
    if pipeline_class == "DDIMPipeline" and not isinstance(scheduler, DDIMScheduler):
        # what the source samples with: diffusers' DDIMPipeline makes any scheduler it is given a DDIMScheduler
        print(f"note: {path} names a {type(scheduler).__name__}, which its DDIMPipeline samples as a DDIMScheduler")
        scheduler = DDIMScheduler.from_config(scheduler.config)
    vae, name = None, SOURCE_VAES.get(pipeline_class)
    extra = [c for c in ("vae", "vqvae") if c != name and index.get(c) not in (None, [None, None])]
    if extra:  # diffusers' loader ignores it: a sample from the source never passes through it
        raise ValueError(
            f"`{option}` {path!r} is a {pipeline_class} whose model_index.json also names a {extra[0]!r} component "
            f"({index[extra[0]]!r}), which a {pipeline_class} does not take (diffusers ignores it, so the source "
            "samples without it): remove the entry, or save the folder as an LDMPipeline (its `vqvae`) if the "
            "U-Net denoises latents."
        )
    vae_class = None if name is None else source_component_class(index, name, ModelMixin, optional=True, option=option)
    if vae_class is not None:
        vae = load_strict(vae_class, path, subfolder=name)
        channels = _vae_latent_channels(vae)
        if channels != unet.config.in_channels:  # the source cannot sample either: the decoder fails on its latents
            raise ValueError(
                f"`{option}` {path!r} is a {pipeline_class} whose {name} decodes latents of {channels} channels, but "
                f"its U-Net denoises `in_channels`={unet.config.in_channels}: it cannot sample, nor could the "
                "converted pipeline. Save it with the VAE the U-Net was trained with."
            )
    return unet, scheduler, vae, pipeline_class


def bare_schedule_length(unet: UNet2DModel, path: str) -> int:
    """The training schedule length of a bare U-Net folder's DDPM scheduler: its config's ``num_train_timesteps``
    (1000, diffusers' DDPM default, when null), refused by name unless a positive integer."""
    steps = unet.config.num_train_timesteps
    if steps is None:
        return 1000
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"{os.path.join(path, 'config.json')}: `num_train_timesteps` must be a positive integer or null, got "
            f"{steps!r} (it sets the length of the DDPM schedule the converted pipeline gets)."
        )
    return steps


def source_model_folders(path: str) -> tuple[str, str | None]:
    """``(unet folder, vae folder or None)`` of a UNet2DModel or unconditional pipeline source."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        return path, None
    entry = read_json(index_path, "model_index.json").get("_class_name")
    name = SOURCE_VAES.get(entry[-1] if isinstance(entry, list) and entry else entry)
    vae = os.path.join(path, name) if name is not None and os.path.isdir(os.path.join(path, name)) else None
    return os.path.join(path, "unet"), vae


def source_component_class(
    index: dict, name: str, base: type, optional: bool = False, option: str = "--source"
) -> type | None:
    """The class of component ``name`` in the `model_index.json` of the source (given as ``option``), resolved by the
    pipelines' allow-list (never imported from a name the folder gives) and checked to be a ``base``; `None` for an
    ``optional`` component that is absent or saved as null."""
    entry = index.get(name)
    component_class = None if entry is None else resolve_component_class(name, entry)
    if component_class is None and not optional:
        raise ValueError(f"`model_index.json` of `{option}` has no {name!r} component, got {entry!r}.")
    if component_class is not None and not issubclass(component_class, base):
        raise ValueError(
            f"Component {name!r} of `{option}` is a {component_class.__name__}, not a {base.__name__}: {entry!r}."
        )
    return component_class


def read_class_name(config_path: str) -> object:
    """The ``_class_name`` of a saved config file (None when there is no such file)."""
    if not os.path.isfile(config_path):
        return None
    return read_json(config_path, "config.json").get("_class_name")


def refuse_staged_source(path: str, class_entry: object, option: str = "--source") -> str | None:
    """Refuse a source (given as ``option``) that is already one of this package's staged pipelines or models (saved
    as ``[file, class]`` or by class name), with the way out of this command (``--source``) or of
    pipelines_to_experts (``--sources``); return the class name otherwise."""
    name = class_entry[-1] if isinstance(class_entry, list) and class_entry else class_entry
    name = None if name is None else str(name)
    if name is not None and isinstance(getattr(diffusers_stages, name, None), type) and option == "--sources":
        raise ValueError(  # pipelines_to_experts' sources
            f"`{option}` {path!r} is already staged (it holds a {name}): pipelines_to_experts combines plain "
            f"UNet2DModel or {'/'.join(SOURCE_PIPELINES)} folders. Export a stage of it as a plain U-Net first with "
            "`python -m diffusers_stages.conversion.multistage_to_unet`, and give that folder."
        )
    if name is not None and isinstance(getattr(diffusers_stages, name, None), type):
        raise ValueError(
            f"`{option}` {path!r} is already staged (it holds a {name}): unet_to_multistage converts a plain "
            f"UNet2DModel or a {'/'.join([*SOURCE_PIPELINES, *TEXT_TO_IMAGE_PIPELINES])} folder. Fine-tune a "
            "MultiStagePipeline with `train_multistage.py --pretrained_model_name_or_path` (a Stable Diffusion one "
            "with `train_text_to_image.py`), or export one stage as a plain U-Net with "
            "`python -m diffusers_stages.conversion.multistage_to_unet`."
        )
    return name


def check_units(scheduler, units: str) -> None:
    """Refuse boundary units the source's scheduler does not condition its model on: a converted pipeline keeps the
    source's scheduler, and could not sample with stages in other units."""
    scheduler_units = units_of(scheduler)  # what it passes the model: training timesteps, or c_noise of sigma
    if units != scheduler_units:
        raise ValueError(
            f"`--boundary_units {units}` does not fit the source: its {type(scheduler).__name__} conditions the model "
            f"on {'sigmas (EDM)' if scheduler_units == 'sigma' else 'training timesteps'}, so the converted pipeline "
            f"could not sample. Give `--stage_boundaries` in {scheduler_units!r} units (`--boundary_units "
            f"{scheduler_units}`), or use `--plan`."
        )


def plan_boundaries(scheduler, method: str, num_stages: int) -> tuple[list[float], str]:
    """Stage boundaries planned on the source scheduler's noise schedule (diffusers_stages.planning)."""
    from diffusers_stages.planning.methods import snr_plan, uniform_plan
    from diffusers_stages.planning.schedule import NoiseSchedule

    levels = PLAN_LEVELS
    alphas_cumprod = None if units_of(scheduler) == "sigma" else getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is not None:  # a grid of at most the schedule's training timesteps
        levels = min(PLAN_LEVELS, len(alphas_cumprod))
        if num_stages > levels or levels < 3:
            raise ValueError(
                f"`--num_stages` {num_stages} does not fit the source's {type(scheduler).__name__}: it has "
                f"{len(alphas_cumprod)} training timesteps, and --plan places at most one stage per timestep (of at "
                "least 3): give fewer stages, or `--stage_boundaries`."
            )
    plan = {"uniform": uniform_plan, "snr": snr_plan}[method](
        NoiseSchedule.from_scheduler(scheduler, levels), num_stages
    )
    return list(plan.partition.boundaries), plan.partition.units


def convert(unet: UNet2DModel, scheduler, vae, boundaries, units: str) -> MultiStagePipeline:
    """The `MultiStagePipeline` whose stages all copy ``unet`` (see `MultiStageUNet2DModel.from_unet`)."""
    check_units(scheduler, units)
    # the stages cover the scheduler's training schedule (a UNet2DModel config rarely records its length)
    steps = getattr(scheduler.config, "num_train_timesteps", None)
    staged = MultiStageUNet2DModel.from_unet(
        unet, stage_boundaries=boundaries, boundary_units=units, num_train_timesteps=steps
    )
    return MultiStagePipeline(unet=staged.eval(), scheduler=scheduler, vae=vae)


def with_unconditional_label(unet: UNet2DModel, label: int | None, path: str) -> UNet2DModel:
    """``unet`` (of source ``path``) as the staged pipelines take class labels: its last class embedding the
    unconditional label. ``label`` (`--unconditional_label`) must say which, for a U-Net with ``num_class_embeds``
    classes: ``num_class_embeds - 1`` keeps ``unet`` as is; ``num_class_embeds`` returns a copy with one more class
    embedding, zero (never trained), so that every class of the source stays a data class. A class-conditional U-Net
    without ``label``, or a ``label`` for a U-Net without class indices, is a `ValueError`."""
    classes = unet.config.num_class_embeds
    if classes is None:
        if label is not None:
            raise ValueError(
                f"`--unconditional_label` {label} is for a class-conditional source, but {path}'s U-Net has no "
                "`num_class_embeds` (no class indices to choose from): leave the option out."
            )
        return unet
    choices = (
        f"{classes - 1} (the source's last class, if it was trained as the 'no class' label) or {classes} (a new, "
        f"untrained label after all {classes} classes of the source)"
    )
    if label is None:
        raise ValueError(
            f"Give `--unconditional_label`: {path}'s U-Net is class-conditional (`num_class_embeds`={classes}), and the "
            "package's pipelines take its last class embedding as the unconditional label of classifier-free guidance "
            f"(that class cannot be sampled): {choices}."
        )
    if label not in (classes - 1, classes):
        raise ValueError(f"`--unconditional_label` must be {choices}, got {label}.")
    if label == classes - 1:
        return unet
    table = isinstance(unet.class_embedding, torch.nn.Embedding)  # (a "timestep" class embedding takes any integer)
    embedding = "a zero class embedding" if table else "its class embedding of that value"
    print(
        f"note: all {classes} classes of the source stay data classes: a new unconditional label {classes} is "
        f"added ({embedding}), never trained, so sample with guidance_scale=1"
    )
    return with_appended_class(unet)


def source_pipeline(unet, scheduler, vae, pipeline_class: str | None):
    """A diffusers pipeline that samples with the source model, for --verify."""
    if vae is not None:
        return diffusers.LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler)
    return getattr(diffusers, pipeline_class or "DDPMPipeline")(unet=unet, scheduler=scheduler)


def sampling_mismatch(source, steps: int) -> str | None:
    """Why diffusers' ``source`` pipeline samples its scheduler otherwise than a `MultiStagePipeline` does, for
    ``steps`` steps (None when it samples it the same way): a `DDPMPipeline` neither scales the initial noise
    (``init_noise_sigma``) nor the model input (``scale_model_input``), and passes ``generator`` to every step.
    (`LDMPipeline` does as the staged pipelines; `DDIMPipeline` makes its scheduler a `DDIMScheduler`.)"""
    if not isinstance(source, diffusers.DDPMPipeline):
        return None
    scheduler = copy.deepcopy(source.scheduler)
    name = type(scheduler).__name__
    parameters = inspect.signature(scheduler.step).parameters.values()
    if not any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in parameters):
        return f"DDPMPipeline cannot sample with its {name}: it passes `generator` to the step, which takes none"
    scheduler.set_timesteps(steps)
    probe = torch.ones(1, 1, 1, 1)
    if float(scheduler.init_noise_sigma) != 1.0 or not torch.equal(
        scheduler.scale_model_input(probe, scheduler.timesteps[0]), probe
    ):
        return (
            f"DDPMPipeline scales neither the initial noise (`init_noise_sigma`) nor the model input "
            f"(`scale_model_input`) as its {name} needs, while the converted pipeline does: their samples differ"
        )
    return None


def verify(source, converted: MultiStagePipeline, steps: int, tolerance: float) -> None:
    """Compare the denoisers at one timestep per stage, then sample with both pipelines from the same seed (a
    class-conditional U-Net: the denoisers only, given class labels, since diffusers' pipelines cannot sample it; the
    denoisers only too for a source pipeline that samples its scheduler otherwise, see `sampling_mismatch`)."""
    config = converted.unet.config
    size = config.sample_size
    x = torch.randn(
        2, config.in_channels, *((size, size) if isinstance(size, int) else size), generator=torch.manual_seed(1)
    )
    labels = probe_class_labels(source.unet, 2)
    differences = {}
    for stage, t in enumerate(probe_timesteps(converted.partition)):
        t = probe_tensor(converted.partition, t)
        differences[f"denoiser at timestep {t.item():g} (stage {stage})"] = max_difference(
            source.unet(x, t, class_labels=labels).sample, converted.unet(x, t, class_labels=labels).sample
        )
    if labels is not None:
        print(f"verify: no sampling comparison: {type(source).__name__} cannot sample a class-conditional U-Net")
        return report_verification(differences, tolerance)
    mismatch = sampling_mismatch(source, steps)
    if mismatch is not None:
        print(f"verify: no sampling comparison: {mismatch}")
        return report_verification(differences, tolerance)
    images = []
    for pipe in (source, converted):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.manual_seed(0)
        images.append(pipe(batch_size=2, generator=generator, num_inference_steps=steps, output_type="np").images)
    differences[f"{steps}-step samples (seed 0)"] = max_difference(
        torch.from_numpy(images[0]), torch.from_numpy(images[1])
    )
    report_verification(differences, tolerance)


def check_verify_steps(args: argparse.Namespace, scheduler) -> None:
    """With ``--verify``, refuse ``--verify_steps`` the source's ``scheduler`` cannot sample with (more than its
    training timesteps, for a DDPM-type one) by the option's name, before converting (diffusers' error, at the end,
    named its own ``num_inference_steps``)."""
    if not args.verify:
        return
    try:
        copy.deepcopy(scheduler).set_timesteps(args.verify_steps)
    except ValueError as error:
        raise ValueError(
            f"`--verify_steps` {args.verify_steps} does not fit the source's {type(scheduler).__name__}: {error}"
        ) from None


def choose_boundaries(args: argparse.Namespace, scheduler) -> tuple[list[float], str]:
    """The stage boundaries and their units: given (--stage_boundaries), or planned (--plan) on ``scheduler``."""
    if not args.plan:
        return args.stage_boundaries, args.boundary_units
    boundaries, units = plan_boundaries(scheduler, args.plan, args.num_stages)
    print(f"planned ({args.plan}, {args.num_stages} stages): boundaries {boundaries} ({units})")
    return boundaries, units


def text_to_image_class(path: str) -> type | None:
    """The Stable Diffusion pipeline class of a text-to-image source folder; ``None`` for any other source."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        return None
    name = read_json(index_path, "model_index.json").get("_class_name")
    return getattr(diffusers, name) if name in TEXT_TO_IMAGE_PIPELINES else None


def check_text_to_image_index(path: str, pipeline_class: type) -> dict:
    """Check each component entry of a text-to-image source's `model_index.json` by the pipelines' allow-list before
    diffusers' loader reads it (a malformed or foreign entry was an OSError, a TypeError or a message about a
    built-in function): the scheduler a scheduler, the unet and vae models, the required ones present, each
    component's folder inside the source with no file linking out of it. Returns the index."""
    index = read_json(os.path.join(path, "model_index.json"), "model_index.json")
    bases = {"scheduler": SchedulerMixin, "unet": ModelMixin, "vae": ModelMixin}
    for name in pipeline_class._get_signature_keys(pipeline_class)[0]:
        entry = index.get(name)
        library = getattr(diffusers.pipelines, entry[0], None) if _is_entry(entry) else None
        if isinstance(library, types.ModuleType) and library.__name__.startswith("diffusers.pipelines."):
            # a class of diffusers' own pipeline modules (SD's safety checker)
            check_model_weights(component_folder(path, name), pipeline_module_class(entry))
            continue
        optional = name in pipeline_class._optional_components
        component_class = source_component_class(index, name, bases.get(name, object), optional=optional)
        if component_class is not None:
            check_model_weights(component_folder(path, name), component_class)
    return index


def check_model_weights(folder: str, component_class: type | None) -> None:
    """Refuse a network component's ``folder`` without plain safetensors weights (a text encoder with only
    ``pytorch_model.bin`` was an OSError from transformers' loader), before anything is loaded."""
    if isinstance(component_class, type) and issubclass(component_class, torch.nn.Module):
        if os.path.isfile(os.path.join(folder, "config.json")):
            check_plain_safetensors(folder, component_class)


def _is_entry(entry: object) -> bool:
    """Whether ``entry`` has the ``[library, class]`` form of a `model_index.json` component."""
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)


def verify_text_to_image(source, converted, steps: int, tolerance: float) -> None:
    """Compare the U-Nets at one timestep per stage (random text conditioning), then sample one prompt with both
    pipelines from the same seed."""
    config = converted.unet.config
    size = (config.sample_size,) * 2 if isinstance(config.sample_size, int) else tuple(config.sample_size)
    x = torch.randn(2, config.in_channels, *size, generator=torch.manual_seed(1))
    kwargs = conditioning(config, 2)
    differences = {}
    for stage, t in enumerate(probe_timesteps(converted.unet.partition)):
        t = probe_tensor(converted.unet.partition, t)
        differences[f"unet at timestep {t.item():g} (stage {stage})"] = max_difference(
            source.unet(x, t, **kwargs).sample, converted.unet(x, t, **kwargs).sample
        )
    images = []
    for pipe in (source, converted):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.manual_seed(0)
        images.append(pipe(VERIFY_PROMPT, num_inference_steps=steps, generator=generator, output_type="np").images)
    differences[f"{steps}-step images of {VERIFY_PROMPT!r} (seed 0)"] = max_difference(
        torch.from_numpy(images[0]), torch.from_numpy(images[1])
    )
    report_verification(differences, tolerance)


@torch.no_grad()
def main_text_to_image(args: argparse.Namespace, pipeline_class: type):
    """Convert a Stable Diffusion / SDXL folder: same pipeline class and components, a staged ``unet``."""
    if args.unconditional_label is not None:
        raise ValueError(
            f"`--unconditional_label` {args.unconditional_label} is for class-conditional UNet2DModel sources: "
            f"{args.source} is a {pipeline_class.__name__}, conditioned on text."
        )
    refuse_staged_source(args.source, read_class_name(os.path.join(args.source, "unet", "config.json")))
    index = check_text_to_image_index(args.source, pipeline_class)
    with staged_output(args.output_path, args.overwrite, input_paths(args)) as tmp:
        # the U-Net and the VAE strictly (diffusers only warns of missing weights, and casts integer ones)
        unet = load_strict(UNet2DConditionModel, args.source, subfolder="unet")
        vae = load_strict(source_component_class(index, "vae", ModelMixin), args.source, subfolder="vae")
        # in float32, as `unet`, whatever the folder stores (transformers would load float16 text encoders as such)
        source = pipeline_class.from_pretrained(
            args.source, unet=unet, vae=vae, **load_transformers_components(args.source, index, pipeline_class), use_safetensors=True,
            dtype=torch.float32,
        )  # fmt: skip
        # written out as loaded: a tokenizer transformers built without its files would look complete
        for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):  # (SDXL: 2)
            if getattr(source, tokenizer, None) is not None and getattr(source, encoder, None) is not None:
                check_tokenizer(
                    getattr(source, tokenizer),
                    getattr(source, encoder),
                    f"`--source` {args.source!r}: its {tokenizer}",
                )
        check_verify_steps(args, source.scheduler)
        boundaries, units = choose_boundaries(args, source.scheduler)
        check_units(source.scheduler, units)  # the pipeline hands its scheduler's timesteps to the unet
        staged = MultiStageUNet2DConditionModel.from_unet(
            unet, boundaries, units, num_train_timesteps=source.scheduler.config.get("num_train_timesteps")
        )
        # from_pipe: the source's components and its own options (SDXL's force_zeros_for_empty_prompt, ...)
        staged_pipeline = pipeline_class.from_pipe(source, unet=staged.eval())
        components = staged_pipeline.components.items()
        save_in_stored_dtypes(staged_pipeline, tmp, [(c, os.path.join(args.source, name)) for name, c in components])
        # what was written, reloaded by the standard class
        converted = pipeline_class.from_pretrained(tmp, dtype=torch.float32)
        if args.verify:
            verify_text_to_image(source, converted, args.verify_steps, args.tolerance)
    partition = converted.unet.partition
    print(
        f"wrote {args.output_path}: {pipeline_class.__name__} whose unet is a MultiStageUNet2DConditionModel with "
        f"{partition.num_stages} stages {partition.intervals()} ({units}), every decoder a copy of {args.source}'s "
        "up path"
    )
    return converted


@torch.no_grad()
def main(args: argparse.Namespace) -> MultiStagePipeline:
    pipeline_class = text_to_image_class(args.source) if os.path.isdir(args.source) else None
    if pipeline_class is not None:
        return main_text_to_image(args, pipeline_class)
    with staged_output(args.output_path, args.overwrite, input_paths(args)) as tmp:
        unet, scheduler, vae, pipeline_class = load_source(args.source)
        check_verify_steps(args, scheduler)
        labelled = with_unconditional_label(unet, args.unconditional_label, args.source)
        boundaries, units = choose_boundaries(args, scheduler)
        staged = convert(labelled, scheduler, vae, boundaries, units)
        save_in_stored_dtypes(staged, tmp, zip((staged.unet, staged.vae), source_model_folders(args.source)))
        converted = MultiStagePipeline.from_pretrained(tmp)  # what was written, reloaded strictly (in float32)
        if args.verify:
            verify(source_pipeline(unet, scheduler, vae, pipeline_class), converted, args.verify_steps, args.tolerance)
    print(
        f"wrote {args.output_path}: MultiStagePipeline with {converted.partition.num_stages} stages "
        f"{converted.partition.intervals()} ({units}), every decoder a copy of {args.source}'s up path"
    )
    return converted


if __name__ == "__main__":
    run(main, parse_args, sys.argv[1:])
