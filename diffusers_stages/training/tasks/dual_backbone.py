"""Dual-backbone training (DuoDiff, arXiv 2410.09633): a shallow and a deep denoiser on every timestep."""

from __future__ import annotations

import os

import torch
from diffusers import UNet2DModel

from ...models.loading import load_strictly
from ...models.uvit import UViT2DModel, dual_uvit_configs
from ...partition import TimestepPartition
from ...pipelines import DualBackbonePipeline
from ...pipelines.pipeline_dual_backbone import (  # said once, in the pipeline
    DEFAULT_SWITCH_STEP_FRACTION,
    SWITCH_KEYS,
    check_fixed_switch,
    checked_switch,
)
from ...schedulers import scheduler_units
from ..args import UNET_SHAPE_OPTIONS, check_positive_options, refuse_given_options, unet_shape_kwargs
from ..hub import shared_name
from .base import Draw, _unet_downsampling, noise_schedulers
from .pretrained import FineTuningTask, PipelineSource

BACKBONE_INTEGERS = ("shallow_layers_per_block", "uvit_hidden_size", "uvit_patch_size", "uvit_num_attention_heads")


def check_backbone_arguments(args) -> None:
    """The backbone shape options of the dual-backbone script, positive (a ValueError naming the option, before the
    resolution check divides by the patch size and before the networks are built)."""
    check_positive_options(args, BACKBONE_INTEGERS)
    uvit = getattr(args, "backbone", "unet") != "unet"  # the demo's arguments have no U-ViT options
    width, heads = (args.uvit_hidden_size, args.uvit_num_attention_heads) if uvit else (1, 1)
    if width % heads:  # else the model's error, naming its arguments, not these options
        raise ValueError(
            f"`--uvit_hidden_size` {width} must be a multiple of `--uvit_num_attention_heads` {heads} (the heads split "
            "the width evenly)."
        )
    widths = getattr(args, "shallow_block_out_channels", None)
    if widths is not None and not (widths and all(w > 0 for w in widths)):
        raise ValueError(f"`--shallow_block_out_channels` must be positive integers, got {list(widths)}.")
    scheme = getattr(args, "stage_sampling", "mixed")  # the multi-stage scripts' option (shared parser)
    if scheme != "mixed":
        raise ValueError(
            f"`--stage_sampling {scheme}` is not implemented for dual-backbone training (nor `--backbone "
            "early_exit`): its networks train on every timestep of every batch. Drop it."
        )


def check_no_unet_arguments(args) -> None:
    """Refuse the U-Net options where `--backbone` builds U-ViTs, which take none of them: they have no default, so a
    value given was meant, and ignoring it would train another model than the one asked for."""
    reason = (  # early_exit: one U-ViT of `--deep_depth` blocks (`--shallow_depth` is not read)
        "its U-ViT takes no U-Net arguments (its shape: `--uvit_*`, `--deep_depth`)" if args.backbone == "early_exit"
        else "its U-ViTs take no U-Net arguments (their shape: `--uvit_*`, `--shallow_depth`, `--deep_depth`)"
    )  # fmt: skip
    options = ("model_config", *UNET_SHAPE_OPTIONS, "shallow_block_out_channels")
    refuse_given_options(args, options, f"`--backbone {args.backbone}`", reason)


BACKBONE_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, UViT2DModel)}  # what `train_dual_backbone.py` trains
# arguments that would define the backbones or the switch anew (none has a default: given means meant), refused when
# fine-tuning a pipeline folder; the U-ViT options and `--shallow_layers_per_block` have defaults: the script refuses
# another value (`refuse_unread_backbone_options`)
REFUSED_WITH_PRETRAINED = (
    "switch_step_fraction", "switch_timestep", "model_config", *UNET_SHAPE_OPTIONS, "shallow_block_out_channels",
)  # fmt: skip


class DualBackboneTask(FineTuningTask):
    """DuoDiff (arXiv 2410.09633): a shallow and a deep denoiser, both trained on all timesteps.

    With `--pretrained_model_name_or_path` the backbones (both, or `--backbones`'), the switch and the noise schedule
    are those of an existing `DualBackbonePipeline` folder (fine-tuning).

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMScheduler
    >>> from diffusers_stages.training import DualBackboneTask, build_parser
    >>> args = build_parser("train_dual_backbone.py").parse_args(["--block_out_channels", "8,16",
    ...     "--layers_per_block", "2", "--norm_num_groups", "4"])
    >>> vars(args).update(backbones="both", shallow_block_out_channels=None, shallow_layers_per_block=1,
    ...     switch_step_fraction=None, switch_timestep=None)  # options of train_dual_backbone.py's own
    >>> task = DualBackboneTask(args)
    >>> networks = task.build_networks(in_channels=3, sample_size=8, num_class_embeds=None)
    >>> {name: network.config.layers_per_block for name, network in networks.items()}
    {'shallow': 1, 'deep': 2}
    >>> task.draw(batch_size=2, generator=torch.manual_seed(0)).network  # each network gets the whole batch
    tensor([0, 0, 1, 1])
    >>> task.pipeline(networks, DDIMScheduler()).config.switch_step_fraction  # the default switch
    0.4

    ```
    """

    tags = ("dual-backbone", "duodiff")

    def read_source(self, path):
        source = PipelineSource.read_pipeline(path, "DualBackbonePipeline", ("shallow", "deep"))
        for name in ("shallow", "deep"):
            source.read_model(name, BACKBONE_CLASSES, ": the script trains those backbones only")
            source.config_downsampling(name)
        return source

    def source_configs(self):
        return {name: self.source.configs[name] for name in self._trained}

    @property
    def method(self) -> str:
        """What the run trains, as its start log line and model card name it."""
        if self.args.backbones == "both":
            return "dual backbone (shallow + deep)"
        return f"dual backbone, {self.args.backbones} network only"

    @property
    def _trained(self) -> tuple[str, ...]:
        """The backbones this run trains."""
        return ("shallow", "deep") if self.args.backbones == "both" else (self.args.backbones,)

    def build_partition(self, args):
        check_backbone_arguments(args)
        if args.stage_boundaries is not None or args.stage_shares is not None:
            raise ValueError(
                "Dual-backbone training uses every timestep for both networks: drop `--stage_boundaries`/`--stage_shares`."
            )
        if self.source is not None:
            return self._source_partition(args)
        if self._uvit:
            check_no_unet_arguments(args)
        if args.switch_step_fraction is not None and args.switch_timestep is not None:
            raise ValueError(
                "Give one of `--switch_step_fraction` and `--switch_timestep` (the sampling switch), not both."
            )
        # the sampling switch: the one given, or the default fraction when none is
        fraction = args.switch_step_fraction
        if args.switch_step_fraction is None and args.switch_timestep is None:
            fraction = DEFAULT_SWITCH_STEP_FRACTION
        if fraction is not None and not 0.0 < fraction < 1.0:
            raise ValueError(f"`--switch_step_fraction` must be in (0, 1), got {fraction}.")
        timestep = args.switch_timestep
        if timestep is not None and not 0.0 < timestep < args.num_train_timesteps:
            raise ValueError(
                f"`--switch_timestep` must lie inside the training schedule (0, {args.num_train_timesteps}), got {timestep}."
            )
        if timestep is not None and args.boundary_units == "sigma":
            raise ValueError(
                "`--switch_timestep` is a DDPM timestep, but `--boundary_units sigma` trains EDM-style models: give "
                "`--switch_step_fraction` instead."
            )
        self.switch = checked_switch({"switch_step_fraction": fraction, "switch_timestep": timestep})
        self._check_switch_steps(args)
        return TimestepPartition([], args.num_train_timesteps, args.boundary_units)  # one stage: the whole schedule

    def _source_partition(self, args) -> TimestepPartition:
        """The source's schedule as one stage, after refusing every argument that contradicts the source; its switch
        (`model_index.json`, read from a folder: checked as the pipeline checks it) is kept."""
        path = self.source.path
        names = {self.source.configs[name]["_class_name"] for name in self._trained}
        if args.backbone == "uvit" and not self._uvit:  # `unet` is the default: only `uvit` can be told as given
            raise ValueError(
                f"`--backbone uvit` disagrees with the backbones of {path!r} ({', '.join(sorted(names))}): drop it "
                "(fine-tuning keeps the source's backbones)."
            )
        _, sampling = noise_schedulers(args, self.source.scheduler_config)
        try:  # as the pipeline checks it, before training rather than when the trained pipeline is built
            self.switch = checked_switch(self.source.index)
            check_fixed_switch(self.switch, sampling)
        except ValueError as error:
            raise ValueError(f"`--pretrained_model_name_or_path` {path!r}: its model_index.json: {error}") from None
        partition = TimestepPartition([], sampling.config.num_train_timesteps, scheduler_units(sampling))
        kept = (
            f"its switch {self._switch_setting()}, which a switch given to `DualBackbonePipeline.from_pretrained` "
            "replaces"
        )
        classes = [BACKBONE_CLASSES[name] for name in names]
        self.check_source_arguments(args, partition, REFUSED_WITH_PRETRAINED, kept, classes)
        self._check_switch_steps(args)
        return partition

    def _check_switch_steps(self, args) -> None:
        """A step-fraction switch needs 2 sampling steps or more to sample the sample grids."""
        fraction = self.switch["switch_step_fraction"]
        sampled = args.backbones == "both"  # one backbone per run samples no grid
        if sampled and fraction is not None and args.num_inference_steps < 2:
            raise ValueError(
                f"`--num_inference_steps` {args.num_inference_steps} cannot sample the sample grids: the switch is a "
                f"step fraction ({fraction:g}), which needs at least 2 steps to give one to each "
                "network. Give `--num_inference_steps` 2 or more, or `--switch_timestep`."
            )

    def _switch_setting(self) -> str:
        """The switch as the pipeline's argument, e.g. ``switch_step_fraction=0.4``."""
        ((key, value),) = ((k, v) for k, v in self.switch.items() if v is not None)
        return f"{key}={value:g}"

    def _shapes(self) -> dict[str, dict]:
        wanted = ("shallow", "deep") if self.args.backbones == "both" else (self.args.backbones,)
        if self._uvit:  # DuoDiff's backbones: two U-ViTs of one width, `--shallow_depth` and `--deep_depth` blocks
            a = self.args
            shapes = dual_uvit_configs(a.shallow_depth, a.deep_depth, hidden_size=a.uvit_hidden_size,
                                       patch_size=a.uvit_patch_size, num_attention_heads=a.uvit_num_attention_heads)  # fmt: skip
            return {name: shapes[name] for name in ("shallow", "deep") if name in wanted}
        deep = unet_shape_kwargs(self.args)
        shallow = {**deep, "layers_per_block": self.args.shallow_layers_per_block}
        if self.args.shallow_block_out_channels is not None:
            shallow["block_out_channels"] = tuple(self.args.shallow_block_out_channels)
        return {name: shape for name, shape in (("shallow", shallow), ("deep", deep)) if name in wanted}

    @property
    def _uvit(self) -> bool:
        if self.source is not None:  # the source's backbones
            return all(self.source.configs[name]["_class_name"] == "UViT2DModel" for name in self._trained)
        return getattr(self.args, "backbone", "unet") == "uvit"

    @property
    def downsampling(self):
        if self.source is not None:
            return max(self.source.config_downsampling(name) for name in self._trained)
        if self._uvit:
            return max(shape["patch_size"] for shape in self._shapes().values())
        return max(_unet_downsampling(shape) for shape in self._shapes().values())

    def build_networks(self, in_channels, sample_size, num_class_embeds):
        if self.source is not None:  # the training loop has checked the data against them (`check_data`)
            # strictly; fp32 master weights whatever the folder stores
            return {
                name: load_strictly(BACKBONE_CLASSES[config["_class_name"]], self.source.path, subfolder=name,
                                    torch_dtype=torch.float32)
                for name, config in self.source_configs().items()
            }  # fmt: skip
        if self._uvit:
            common = {"sample_size": sample_size, "in_channels": in_channels, "num_class_embeds": num_class_embeds}
            return {name: UViT2DModel(**shape, **common) for name, shape in self._shapes().items()}
        return {
            name: UNet2DModel(
                **self._script_config(
                    shape,
                    sample_size=sample_size,
                    in_channels=in_channels,
                    out_channels=in_channels,
                    num_class_embeds=num_class_embeds,
                    num_train_timesteps=self.args.num_train_timesteps,
                )
            )
            for name, shape in self._shapes().items()
        }

    def draw(self, batch_size, generator):
        # every network sees the whole batch at its own noise levels from the usual training distribution
        count = len(self._trained)
        timesteps = torch.cat([self._stratified(batch_size, generator)[0] for _ in range(count)])
        network = torch.arange(count).repeat_interleave(batch_size)
        return Draw(torch.arange(batch_size).repeat(count), timesteps, network)

    def pipeline(self, networks, scheduler, vae=None):
        if set(networks) != {"shallow", "deep"}:
            return None  # one backbone alone: load it next to the other one (see the example README)
        return DualBackbonePipeline(
            shallow=networks["shallow"], deep=networks["deep"], scheduler=scheduler, vae=vae,
            **self.switch, id2label=self.id2label,
        )  # fmt: skip

    def no_sampler_reason(self):
        return (
            "one backbone alone does not sample: load it next to the other one in a DualBackbonePipeline "
            "(examples/dual_backbone/README.md)"
        )

    def save(self, networks, scheduler, vae, output_dir):
        if set(networks) == {"shallow", "deep"}:
            return super().save(networks, scheduler, vae, output_dir)
        ((name, network),) = networks.items()
        network.save_pretrained(os.path.join(output_dir, name))
        scheduler.save_pretrained(os.path.join(output_dir, "scheduler"))
        if vae is not None:  # a latent-space run: its samples are decoded with this VAE
            vae.save_pretrained(os.path.join(output_dir, "vae"))

    def saved_class_names(self):
        if self.args.backbones == "both":
            return super().saved_class_names()
        return "and the run saves no class names (one backbone alone holds no pipeline)"

    def description(self):
        fraction, timestep, sigma = (self.switch[key] for key in SWITCH_KEYS)
        switch = (
            f"the shallow network runs the first {fraction:g} of the sampling steps"
            if fraction is not None
            else f"the shallow network runs every step at t >= {timestep:g}"
            if timestep is not None
            else f"the shallow network runs every step at noise levels sigma > {sigma:g}"
        )
        kind = "U-ViT" if self._uvit else "U-Net"
        origin = (
            ""
            if self.source is None
            else f" Fine-tuned from `{shared_name(self.source.path)}` (DualBackbonePipeline)."
        )
        if self.args.backbones != "both":  # one network per run: the repository holds no pipeline
            name, other = self.args.backbones, self._other_backbone
            partner = "another run" if self.source is None else "its source pipeline"
            return (
                f"The {name} network of a dual-backbone model (DuoDiff, arXiv 2410.09633): a {kind} trained on all "
                f"timesteps in a run of its own, sampled together with the {other} network of {partner} (see Usage); "
                f"at sampling time {switch}, the deep one the rest.{origin}"
            )
        return (
            f"A dual-backbone model (DuoDiff, arXiv 2410.09633): a shallow and a deep {kind}, both trained on all "
            f"timesteps; at sampling time {switch}, the deep one the rest.{origin}"
        )

    def usage(self, repo_id):
        if self.args.backbones == "both":
            return super().usage(repo_id)
        # one backbone and the scheduler, no pipeline: load them and the other run's backbone into one (README)
        name, other = self.args.backbones, self._other_backbone
        model = "UViT2DModel" if self._uvit else "UNet2DModel"
        # the other backbone: a fine-tuned one's source holds it (of its own class), else another run does
        other_model, other_repo, where = model, f"<repository of the {other} run>", "its own run"
        if self.source is not None:
            other_model, other_repo = self.source.configs[other]["_class_name"], shared_name(self.source.path)
            where = "the source pipeline's"
        models = {model, other_model}
        scheduler = "EDMEulerScheduler" if self.args.boundary_units == "sigma" else "DDIMScheduler"
        if self.source is not None:  # the run saves the source's (a diffusers class, checked by `noise_schedulers`)
            scheduler = self.source.scheduler_config["_class_name"]
        switch = self._switch_setting()
        latent = self.vae_path is not None  # its samples are latents: the run's VAE decodes them
        lines = [
            f"from diffusers import {'AutoencoderKL, ' if latent else ''}{scheduler}"
            + (", UNet2DModel" if "UNet2DModel" in models else ""),
            "from diffusers_stages import DualBackbonePipeline" + (", UViT2DModel" if "UViT2DModel" in models else ""),
            "",
            f'{name} = {model}.from_pretrained("{repo_id}", subfolder="{name}")',
            f'{other} = {other_model}.from_pretrained("{other_repo}", subfolder="{other}")  # {where}',
            f'scheduler = {scheduler}.from_pretrained("{repo_id}", subfolder="scheduler")',
        ]
        if latent:
            lines.append(f'vae = AutoencoderKL.from_pretrained("{repo_id}", subfolder="vae")')
        return [
            *lines,
            f"pipe = DualBackbonePipeline(shallow=shallow, deep=deep, scheduler=scheduler, {switch}"
            + (", vae=vae)" if latent else ")"),
            f"image = pipe({'class_labels=[0]' if self.args.class_conditional else 'batch_size=1'}).images[0]",
        ]

    @property
    def _other_backbone(self) -> str:
        return {"shallow": "deep", "deep": "shallow"}[self.args.backbones]
