"""Combine several single diffusers models of the same task (`UNet2DModel`, `DDPMPipeline`, `DDIMPipeline` or
`LDMPipeline` folders) into one `ExpertRoutingPipeline` or `DualBackbonePipeline` folder: each source denoises its
own part of the noise schedule (T-Stitch / SDXL-refiner style: a small model at the noisy end, a large one near the
data). Nothing is retrained; every expert is its source, bit for bit.

    # a large model for t < 600, a small one for t >= 600
    python -m diffusers_stages.conversion.pipelines_to_experts --sources large-ddpm small-ddpm \\
        --stage_boundaries 600 --output_path routed --verify
    # DuoDiff: the shallow model runs the first 40% of the sampling steps
    python -m diffusers_stages.conversion.pipelines_to_experts --pipeline dual_backbone \\
        --sources deep-ddpm shallow-ddpm --switch_step_fraction 0.4 --output_path duo
"""

from __future__ import annotations

import argparse
import sys

import torch

from diffusers_stages.conventions import class_embedding_count
from diffusers_stages.conversion.common import (
    build_parser,
    input_paths,
    max_difference,
    report_verification,
    run,
    save_in_stored_dtypes,
    staged_output,
)
from diffusers_stages.conversion.unet_to_multistage import (
    UNCONDITIONAL_LABEL_HELP,
    load_source,
    source_model_folders,
    text_to_image_class,
    with_unconditional_label,
)
from diffusers_stages.models import ExpertRoutingModel
from diffusers_stages.models.loading import check_same_vae
from diffusers_stages.pipelines import DualBackbonePipeline, ExpertRoutingPipeline
from diffusers_stages.schedulers import training_schedule_differences
from diffusers_stages.training.args import BoundaryList

PIPELINES = {"experts": ExpertRoutingPipeline, "dual_backbone": DualBackbonePipeline}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--sources",
        nargs="+",
        required=True,
        help="Source folders (UNet2DModel, DDPMPipeline, DDIMPipeline or LDMPipeline), one per stage, from the "
        "clean end of the schedule to the noisy end. For --pipeline dual_backbone: the deep model, then the "
        "shallow one. The scheduler (and VAE) come from the first source that has one; all must agree.",
    )
    parser.add_argument(
        "--pipeline", choices=tuple(PIPELINES), default="experts", help="The pipeline to write (default: experts)."
    )
    parser.add_argument(
        "--stage_boundaries",
        nargs="+",
        action=BoundaryList,  # `442 631`, as every command of the package; the old `442,631` with a warning
        help="For experts: the len(--sources) - 1 inner boundaries in training timesteps (e.g. 600: the first "
        "source below t=600). For dual_backbone: one value, the switch timestep.",
    )
    parser.add_argument(
        "--switch_step_fraction",
        type=float,
        help="For dual_backbone only: share of the sampling steps the shallow model runs, in (0, 1).",
    )
    parser.add_argument(
        "--unconditional_label", type=int, help=UNCONDITIONAL_LABEL_HELP + " The same for every source."
    )
    return parser.parse_args(argv)


def check_source_count(args: argparse.Namespace) -> None:
    """Refuse, before any source is read, ``--stage_boundaries`` that give another number of stages than the
    ``--sources`` (experts: one source per stage), or a dual backbone of other than two sources."""
    if args.pipeline == "dual_backbone" and len(args.sources) != 2:
        raise ValueError(f"--pipeline dual_backbone takes two --sources (deep, shallow), got {len(args.sources)}.")
    if args.pipeline != "experts" or args.stage_boundaries is None:
        return
    stages = len(args.stage_boundaries) + 1
    if stages != len(args.sources):
        given = " ".join(f"{b:g}" for b in args.stage_boundaries)
        fewer = f", or {len(args.sources) - 1} boundaries" if len(args.sources) > 1 else ""
        raise ValueError(
            f"`--stage_boundaries` {given} gives {stages} stages, one per `--sources` folder, but "
            f"{len(args.sources)} `--sources` were given: give {stages} sources{fewer}."
        )


def gather_sources(paths: list[str], unconditional_label: int | None = None):
    """``(denoisers, scheduler, vae)``: the sources' U-Nets, and the one schedule and VAE they must share. A
    class-conditional U-Net takes ``unconditional_label`` (`--unconditional_label`, see `with_unconditional_label`)."""
    unets, scheduler, vae, bare = [], None, None, []
    pixel_source = latent_source = None  # a pipeline without a VAE, one with (a bare U-Net folder could be either)
    for path in paths:
        text_to_image = text_to_image_class(path)
        if text_to_image is not None:
            raise ValueError(
                f"{path} holds a {text_to_image.__name__}: this script combines unconditional pipelines only. Route "
                "text-to-image U-Nets inside one standard pipeline in code: `pipe.unet = ExpertRoutingModel([clean.unet, "
                "noisy.unet], stage_boundaries=(500,))`, then `pipe.save_pretrained(folder)` (see the README)."
            )
        unet, source_scheduler, source_vae, pipeline_class = load_source(path, "--sources")
        unets.append(unet)
        if pipeline_class is None:
            bare.append((path, unet))
        if pipeline_class is not None and scheduler is None:
            scheduler, reference = source_scheduler, path
        elif pipeline_class is not None:
            differ = training_schedule_differences(scheduler, source_scheduler)
            if differ:
                raise ValueError(
                    f"{path} was trained on another noise schedule than {reference} ({differ} differ): experts "
                    "replace one another mid-trajectory, so they must share the training schedule."
                )
        if pipeline_class is not None and source_vae is None:
            pixel_source = pixel_source or (path, pipeline_class)
        latent_source = latent_source or (path if source_vae is not None else None)
        if pixel_source and latent_source:
            raise ValueError(
                f"{pixel_source[0]} is a {pixel_source[1]}, without a VAE, and {latent_source} a latent pipeline: "
                "experts replace one another mid-trajectory, so they must all denoise pixels or all one VAE's latents."
            )
        if source_vae is not None and vae is None:
            vae = source_vae
        elif source_vae is not None:
            check_same_vae(vae, source_vae, path)
    classes = {path: unet.config.num_class_embeds for path, unet in zip(paths, unets)}
    if len(set(classes.values())) > 1:  # before `--unconditional_label`, which one kind of source would refuse
        raise ValueError(
            f"`--sources` disagree on `num_class_embeds` (source: value): {classes}; experts replace one another "
            "mid-trajectory, so they must take the same class labels."
        )
    unets = [with_unconditional_label(unet, unconditional_label, path) for path, unet in zip(paths, unets)]
    if scheduler is None:  # bare U-Nets only: the first one's DDPM schedule
        scheduler, reference = load_source(paths[0], "--sources")[1], paths[0]
    steps = scheduler.config.num_train_timesteps
    for path, unet in bare:  # a bare U-Net's config may record the schedule length it was trained on
        recorded = unet.config.get("num_train_timesteps")
        if recorded is not None and recorded != steps:
            raise ValueError(
                f"`--sources` {path} records {recorded} training timesteps (its config.json's `num_train_timesteps`), "
                f"but the shared schedule (from {reference}) has {steps}: experts replace one another mid-trajectory, so they must share the training "
                "schedule."
            )
    return unets, scheduler, vae


def build(args: argparse.Namespace, unets, scheduler, vae):
    """The pipeline named by ``--pipeline`` over the given denoisers (clean end first)."""
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if args.pipeline == "dual_backbone":
        if len(unets) != 2:
            raise ValueError(f"--pipeline dual_backbone takes two --sources (deep, shallow), got {len(unets)}.")
        switch = [args.stage_boundaries, args.switch_step_fraction]
        if sum(value is not None for value in switch) != 1 or (
            args.stage_boundaries and len(args.stage_boundaries) != 1
        ):
            raise ValueError(
                "--pipeline dual_backbone needs exactly one of --stage_boundaries T (one switch timestep) "
                "and --switch_step_fraction F."
            )
        switch_timestep = args.stage_boundaries[0] if args.stage_boundaries else None
        return DualBackbonePipeline(
            deep=unets[0],
            shallow=unets[1],
            scheduler=scheduler,
            vae=vae,
            switch_step_fraction=args.switch_step_fraction,
            switch_timestep=switch_timestep,
        )
    if args.switch_step_fraction is not None or args.stage_boundaries is None:
        raise ValueError("--pipeline experts needs --stage_boundaries (and no --switch_step_fraction).")
    experts = ExpertRoutingModel(
        unets,
        stage_boundaries=args.stage_boundaries,
        num_train_timesteps=scheduler.config.num_train_timesteps,
        prediction_type=prediction_type,
    )
    return ExpertRoutingPipeline(experts=experts, scheduler=scheduler, vae=vae)


def written_experts(pipe) -> list:
    """The denoisers of a written pipeline, clean end first."""
    if isinstance(pipe, DualBackbonePipeline):
        return [pipe.deep, pipe.shallow]
    return [pipe.experts.expert(stage) for stage in range(pipe.experts.num_stages)]


def verify(written, built, unets, tolerance: float, steps: int = 4) -> None:
    """Each written expert against its source at 10% and 90% of the training schedule, then samples of the reloaded
    pipeline against the pipeline before saving (same seed)."""
    config = unets[0].config
    size = (config.sample_size,) * 2 if isinstance(config.sample_size, int) else tuple(config.sample_size)
    x = torch.randn(2, config.in_channels, *size, generator=torch.manual_seed(1))
    # class-conditional sources: class 0 for both samples (a data class, not the unconditional label)
    labels = None if class_embedding_count(config) is None else torch.zeros(2, dtype=torch.long)
    run = {"batch_size": 2} if labels is None else {"class_labels": labels}
    differences = {}
    # probes inside the training schedule: a learned time embedding has no rows past its end
    steps_trained = written.scheduler.config.num_train_timesteps
    for index, (expert, source) in enumerate(zip(written_experts(written), unets)):
        for t in (torch.tensor(steps_trained // 10), torch.tensor(9 * steps_trained // 10)):
            differences[f"expert {index} vs its source at timestep {int(t)}"] = max_difference(
                expert(x, t, class_labels=labels).sample, source(x, t, class_labels=labels).sample
            )
    images = []
    for pipe in (built, written):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(num_inference_steps=steps, generator=torch.manual_seed(0), output_type="pt", **run).images)
    differences[f"{steps}-step samples, before saving vs reloaded"] = max_difference(*images)
    report_verification(differences, tolerance)


@torch.no_grad()
def main(args: argparse.Namespace):
    pipeline_class = PIPELINES[args.pipeline]
    check_source_count(args)
    with staged_output(args.output_path, args.overwrite, input_paths(args)) as tmp:
        unets, scheduler, vae = gather_sources(args.sources, args.unconditional_label)
        built = build(args, unets, scheduler, vae)
        # each expert stored as its source stores it (float16 stays float16), the VAE as the first latent source's
        folders = [source_model_folders(path) for path in args.sources]
        vae_folder = next((vae for _, vae in folders if vae is not None), None)
        models = [*zip(written_experts(built), (unet for unet, _ in folders)), (built.vae, vae_folder)]
        save_in_stored_dtypes(built, tmp, models)
        written = pipeline_class.from_pretrained(tmp)
        if args.verify:
            verify(written, built, unets, args.tolerance)
    print(f"wrote {args.output_path}: {pipeline_class.__name__} over {len(unets)} sources {args.sources}")
    return written


if __name__ == "__main__":
    run(main, parse_args, sys.argv[1:])
