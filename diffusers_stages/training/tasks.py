"""What differs between the three methods during training: the networks, how each batch is spread over them,
and the pipeline they are saved as. Everything else is the one loop in `loop.py`."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import diffusers
import torch
from accelerate import PartialState
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, EDMEulerScheduler, SchedulerMixin, UNet2DModel
from diffusers.models.modeling_utils import ModelMixin

from ..models.expert_routing import ExpertRoutingModel, expert_folder
from ..models.iunet import IUNet2DModel
from ..models.meme import meme_expert_configs
from ..models.unet_multistage import MultiStageUNet2DModel
from ..models.unet_multistage_ddpmpp import MultiStageDDPMppUNet2DModel
from ..partition import TimestepPartition
from ..pipelines import DualBackbonePipeline, ExpertRoutingPipeline, MultiStagePipeline
from ..routing import check_scheduler_units, is_edm_scheduler
from ..timestep_sampling import soft_assignment_timesteps, stage_counts, stage_sampled_timesteps, stratified_timesteps
from .args import partition_from_args, unet_shape_kwargs

PAPER_BOUNDARIES = {"timestep": (0.442, 0.631), "sigma": (2.5103, 7.6577)}  # Zhang et al. (2024), Table 4
SCRIPT_KEYS = ("sample_size", "in_channels", "out_channels", "num_class_embeds", "num_train_timesteps",
               "stage_boundaries", "boundary_units")  # fmt: skip


@dataclass
class Draw:
    """One step's training samples: batch row, noise level (partition units) and network of each."""

    rows: torch.Tensor
    timesteps: torch.Tensor
    network: torch.Tensor


def noise_schedulers(args: argparse.Namespace, source: dict | None = None):
    """``(training scheduler, sampling scheduler)``: DDPM and DDIM with one config, or EDM's Euler for both.

    ``source`` is the scheduler config of a pretrained pipeline (fine-tuning): then both come from it, so that its
    betas, step count, prediction type and sampler settings carry over. The source's own class samples; DDPM (EDM's
    Euler for an EDM source) trains, as those are the classes the loss knows how to noise with.
    """
    if source is not None:
        name = source.get("_class_name")
        sampling_class = getattr(diffusers, str(name), None)
        if not isinstance(sampling_class, type) or not issubclass(sampling_class, SchedulerMixin):
            raise ValueError(
                f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r}: its scheduler config names "
                f"{name!r}, which is not a diffusers scheduler."
            )
        sampling = sampling_class.from_config(source)
        if is_edm_scheduler(sampling):
            return EDMEulerScheduler.from_config(source), sampling
        if not hasattr(sampling, "alphas_cumprod"):
            raise ValueError(
                f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r}: its {name} is neither "
                "DDPM-style (a beta schedule) nor EDM-style, the two kinds of noise schedule this script trains with."
            )
        return DDPMScheduler.from_config(source), sampling
    if args.boundary_units == "sigma":
        scheduler = EDMEulerScheduler(num_train_timesteps=args.ddpm_num_steps, prediction_type=args.prediction_type)
        return scheduler, scheduler
    scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
    )
    return scheduler, DDIMScheduler.from_config(scheduler.config)


def _unet_downsampling(shape: dict) -> int:
    return 2 ** (len(shape["block_out_channels"]) - 1)


class TrainingTask:
    """Base class: a partition of the schedule, named networks, a batch plan per step, and a saved pipeline."""

    method = ""
    tags: tuple[str, ...] = ()
    find_unused_parameters = False  # True only where a network may get no sample in a step
    scheduler_config: dict | None = None  # a pretrained source's scheduler config; None: the arguments' schedule

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.partition = self.build_partition(args)

    def build_partition(self, args: argparse.Namespace) -> TimestepPartition:
        raise NotImplementedError

    @property
    def downsampling(self) -> int:
        """Total down-sampling factor of the networks (the resolution must be divisible by it)."""
        raise NotImplementedError

    def build_networks(
        self, in_channels: int, sample_size: int, num_class_embeds: int | None
    ) -> dict[str, ModelMixin]:
        raise NotImplementedError

    def check_data(self, in_channels: int, sample_size: int, num_class_embeds: int | None) -> None:
        """Refuse training data that networks loaded from a checkpoint cannot take (a ValueError naming the
        argument); networks built from the arguments fit any data, so by default there is nothing to check."""

    def draw(self, batch_size: int, generator: torch.Generator) -> Draw:
        raise NotImplementedError

    def pipeline(self, networks: dict[str, ModelMixin], scheduler, vae=None):
        """The pipeline the networks are sampled and saved as (None where one run gives no full sampler)."""
        raise NotImplementedError

    def save(self, networks: dict[str, ModelMixin], scheduler, vae, output_dir: str) -> None:
        self.pipeline(networks, scheduler, vae).save_pretrained(output_dir)

    def description(self) -> str:
        """Markdown for the model card: the method and its stages."""
        raise NotImplementedError

    # helpers
    def _every_network_every_step(self, args: argparse.Namespace, count: int, kind: str) -> None:
        """Each of ``count`` networks gets a sample in every batch, unless a zero `--stage_shares` entry says not:
        then DDP is told to expect unused parameters."""
        if args.train_batch_size < count:
            raise ValueError(
                f"`--train_batch_size` {args.train_batch_size} must be at least the number of {kind}s trained "
                f"({count}) so that every {kind} trains at every step."
            )
        self.find_unused_parameters = args.stage_shares is not None and min(args.stage_shares) == 0

    def _stratified(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return stratified_timesteps(self.partition, batch_size, self.args.stage_shares, generator=generator)

    def _script_config(self, config: dict, **values) -> dict:
        config = {k: v for k, v in config.items() if k not in SCRIPT_KEYS}
        return {**config, **values}

    def _stage_table(self) -> str:
        unit = "t" if self.partition.units == "timestep" else "sigma"
        rows = [f"| {s} | [{lo:g}, {hi:g}) |" for s, (lo, hi) in enumerate(self.partition.intervals())]
        return f"| stage (0 = cleanest) | {unit} interval |\n| --- | --- |\n" + "\n".join(rows)


# the classes a pretrained `unet` folder may hold, and the config key with one entry per resolution level
PRETRAINED_UNETS = {
    "MultiStageUNet2DModel": (MultiStageUNet2DModel, "block_out_channels"),
    "MultiStageDDPMppUNet2DModel": (MultiStageDDPMppUNet2DModel, "channel_mult"),
}
# arguments that would define the stages or the architecture anew; they have no default, so given means meant
REFUSED_WITH_PRETRAINED = ("stage_boundaries", "decoder_block_out_channels", "model_config", "down_block_types",
                           "up_block_types")  # fmt: skip


@dataclass
class PretrainedSource:
    """What fine-tuning reads from a `MultiStagePipeline` folder before any weights load: the configs of its `unet`
    and `scheduler`, and the class of its VAE (None when it has none)."""

    path: str
    unet_config: dict
    scheduler_config: dict
    vae_class: str | None

    @classmethod
    def read(cls, path: str) -> PretrainedSource:
        """Read a `MultiStagePipeline` folder (or Hub repository); anything else is a ValueError naming
        `--pretrained_model_name_or_path`."""
        try:
            index = DiffusionPipeline.load_config(path)
            unet_config = MultiStageUNet2DModel.load_config(path, subfolder="unet")
            scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
        except (OSError, ValueError) as error:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {path!r} is not a MultiStagePipeline folder or Hub repository "
                f"(model_index.json, unet/, scheduler/): {error}"
            ) from None
        if unet_config.get("_class_name") not in PRETRAINED_UNETS:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {path!r} holds a {unet_config.get('_class_name')} as its unet, not "
                f"one of {sorted(PRETRAINED_UNETS)}: convert it first (e.g. `python -m "
                "diffusers_stages.conversion.unet_to_multistage` for a UNet2DModel or DDPM/DDIM/LDM pipeline)."
            )
        vae = index.get("vae") or [None, None]  # [library, class], or [None, None] for a pixel-space pipeline
        return cls(path, unet_config, scheduler_config, vae[1] if vae[0] is not None else None)

    @property
    def model_class(self) -> type[ModelMixin]:
        return PRETRAINED_UNETS[self.unet_config["_class_name"]][0]

    @property
    def downsampling(self) -> int:
        """The model's down-sampling factor: one halving per resolution level."""
        return 2 ** (len(self.unet_config[PRETRAINED_UNETS[self.unet_config["_class_name"]][1]]) - 1)


class MultiStageTask(TrainingTask):
    """Zhang et al. (CVPR 2024): shared encoder, one decoder per stage, all trained jointly on stratified batches.

    With `--pretrained_model_name_or_path` the networks, the stages and the noise schedule are those of an existing
    `MultiStagePipeline` folder (fine-tuning) instead of being built from the arguments."""

    method = "multi-stage multi-decoder U-Net"
    tags = ("multi-stage", "multi-decoder")

    def __init__(self, args: argparse.Namespace):
        # fine-tuning: the source's configs (no weights yet) come first, the partition and every check follow them
        path = getattr(args, "pretrained_model_name_or_path", None)
        self.source = None if path is None else PretrainedSource.read(path)
        if self.source is not None:
            self.scheduler_config = self.source.scheduler_config
            self._use_source_vae(args)
        super().__init__(args)

    def build_partition(self, args):
        if self.source is not None:
            partition = self._source_partition(args)
        else:
            boundaries = PAPER_BOUNDARIES[args.boundary_units]
            if args.boundary_units == "timestep":
                boundaries = [round(b * args.ddpm_num_steps) for b in boundaries]
            default = TimestepPartition(boundaries, args.ddpm_num_steps, args.boundary_units)
            partition = partition_from_args(args, default)
        decoders = getattr(args, "decoder_block_out_channels", None)
        if decoders is not None and len(decoders) != partition.num_stages:
            raise ValueError(
                f"`--decoder_block_out_channels` gives {len(decoders)} decoders, but the stage split "
                f"{list(partition.boundaries)} has {partition.num_stages} stages: give one width list per stage."
            )
        if getattr(args, "stage_sampling", "mixed") == "mixed":
            self._every_network_every_step(args, partition.num_stages, "decoder")
        else:  # one stage per batch or per process: the other decoders get no gradient in a step
            self.find_unused_parameters = True
        if self.source is not None and self.source.unet_config.get("augment_dim"):
            # EDM's augmentation embedding gets no gradient (the loop passes no augmentation labels): tell DDP
            self.find_unused_parameters = True
        return partition

    def _use_source_vae(self, args: argparse.Namespace) -> None:
        """Without `--vae_path`, train in the latent space of the source's own VAE (`--vae_path SOURCE
        --vae_subfolder vae`): that is the space its model denoises."""
        vae_class = self.source.vae_class
        if args.vae_path is not None or vae_class is None:
            return
        if vae_class != "AutoencoderKL":
            raise ValueError(
                f"`--pretrained_model_name_or_path` {self.source.path!r} holds a {vae_class} as its VAE, but training "
                "encodes images with an AutoencoderKL only: give one whose latents fit the model with `--vae_path`."
            )
        args.vae_path, args.vae_subfolder = self.source.path, "vae"

    def _source_partition(self, args: argparse.Namespace) -> TimestepPartition:
        """The loaded model's partition, after refusing every argument that contradicts the source."""
        path, config = self.source.path, self.source.unet_config
        partition = TimestepPartition.from_config(config)
        for name in REFUSED_WITH_PRETRAINED:
            value = getattr(args, name, None)
            if value is not None:
                shown = list(value) if isinstance(value, tuple) else value
                raise ValueError(
                    f"`--{name}` {shown} cannot be combined with `--pretrained_model_name_or_path`: fine-tuning keeps "
                    f"the model of {path!r} (stage boundaries {list(partition.boundaries)} in {partition.units!r} "
                    f"units, its own architecture). Drop `--{name}`."
                )
        if args.boundary_units != partition.units:
            raise ValueError(
                f"`--boundary_units` {args.boundary_units} disagrees with the model of {path!r}, whose stage "
                f"boundaries are in {partition.units!r} units: pass `--boundary_units {partition.units}`."
            )
        # the schedule arguments must repeat the source's rather than be read from it: argparse cannot tell a
        # default from a typed value, so a silent override could hide a value the user meant, while training with
        # the arguments' schedule would fine-tune on a noise schedule the model never saw; the error names the fix
        training, sampling = noise_schedulers(args, self.source.scheduler_config)
        expected = {
            "ddpm_num_steps": training.config.num_train_timesteps,
            "prediction_type": training.config.prediction_type,
        }
        if not is_edm_scheduler(training):  # EDM has no beta schedule (nor does fresh EDM training read one)
            expected["ddpm_beta_schedule"] = training.config.beta_schedule
        for name, value in expected.items():
            if getattr(args, name) != value:
                raise ValueError(
                    f"`--{name}` {getattr(args, name)} disagrees with the scheduler of {path!r} ({value}): pass "
                    f"`--{name} {value}` (fine-tuning keeps the source's noise schedule)."
                )
        try:  # EDM scheduler <-> sigma stages, and the stages' step count = the scheduler's
            check_scheduler_units(sampling, partition)
        except ValueError as error:
            raise ValueError(f"`--pretrained_model_name_or_path` {path!r}: {error}") from None
        if args.gradient_checkpointing and not self.source.model_class._supports_gradient_checkpointing:
            raise ValueError(
                f"`--gradient_checkpointing` is not supported by {self.source.model_class.__name__} (the model of "
                f"{path!r}): drop it."
            )
        return partition

    @property
    def downsampling(self):
        if self.source is not None:
            return self.source.downsampling
        return _unet_downsampling(unet_shape_kwargs(self.args))

    def check_data(self, in_channels, sample_size, num_class_embeds):
        if self.source is None:
            return
        path, config = self.source.path, self.source.unet_config
        if in_channels != config["in_channels"]:
            data = (
                f"`--vae_path` {self.args.vae_path!r} gives latents of {in_channels} channels"
                if self.args.vae_path is not None
                else f"the data are RGB images ({in_channels} channels; a latent model needs `--vae_path`)"
            )
            raise ValueError(
                f"`--pretrained_model_name_or_path` {path!r} holds a model with in_channels={config['in_channels']}, "
                f"but {data}."
            )
        size = config.get("sample_size")  # an int, [height, width], or None (a U-Net of any size)
        if size is not None and tuple(size if isinstance(size, (list, tuple)) else (size, size)) != (sample_size,) * 2:
            factor = self.args.resolution // sample_size
            fix = f"pass `--resolution {size * factor}`" if isinstance(size, int) else "the data are square"
            raise ValueError(
                f"`--resolution` {self.args.resolution} gives {sample_size}x{sample_size} samples, but the model of "
                f"{path!r} has sample_size={size}: {fix}."
            )
        if num_class_embeds != config.get("num_class_embeds"):
            data = (
                f"{num_class_embeds - 1} classes (+ the null label: num_class_embeds={num_class_embeds})"
                if num_class_embeds is not None
                else "no class labels (num_class_embeds=None)"
            )
            raise ValueError(
                f"`--class_conditional`: the data give {data}, but the model of {path!r} has "
                f"num_class_embeds={config.get('num_class_embeds')} (with `--class_conditional`, classes + 1)."
            )

    def build_networks(self, in_channels, sample_size, num_class_embeds):
        if self.source is not None:  # the training loop has checked the data against it (`check_data`)
            # fp32 master weights whatever the folder stores; Accelerate's mixed precision casts in the forward pass
            unet = self.source.model_class.from_pretrained(
                self.source.path, subfolder="unet", torch_dtype=torch.float32
            )
            return {"unet": unet}
        config = self._script_config(
            unet_shape_kwargs(self.args),
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            num_class_embeds=num_class_embeds,
            **self.partition.to_config(),
        )
        if self.args.decoder_block_out_channels is not None:
            config["decoder_block_out_channels"] = [list(w) for w in self.args.decoder_block_out_channels]
        return {"unet": MultiStageUNet2DModel(**config)}

    def draw(self, batch_size, generator):
        state, scheme = PartialState(), getattr(self.args, "stage_sampling", "mixed")
        timesteps, _ = stage_sampled_timesteps(self.partition, batch_size, scheme, self.args.stage_shares, generator,
                                               state.process_index, state.num_processes)  # fmt: skip
        zeros = torch.zeros(batch_size, dtype=torch.long)
        return Draw(torch.arange(batch_size), timesteps, zeros)

    def pipeline(self, networks, scheduler, vae=None):
        return MultiStagePipeline(unet=networks["unet"], scheduler=scheduler, vae=vae)

    def description(self):
        widths = self.args.decoder_block_out_channels or "the encoder's"
        origin = ""
        if self.source is not None:
            config = self.source.unet_config
            widths = config.get("decoder_block_out_channels") or config.get("decoder_channels") or "the encoder's"
            origin = f" Fine-tuned from `{self.source.path}` ({config['_class_name']})."
        return (
            "A multi-stage, multi-decoder U-Net (Zhang et al., CVPR 2024): one shared encoder and one decoder per "
            f"stage of the noise schedule, trained jointly (every decoder in every batch). Decoder widths: {widths}."
            f"{origin}\n\n" + self._stage_table()
        )


class ExpertTask(TrainingTask):
    """MEME (Lee et al., AAAI 2024): one U-Net per interval, all in one run or one per run, soft or hard assignment."""

    method = "multi-expert denoisers"
    tags = ("multi-expert", "meme")

    def build_partition(self, args):
        partition = partition_from_args(args, TimestepPartition.uniform(args.num_experts, args.ddpm_num_steps))
        widths = args.expert_block_out_channels
        if widths is not None and len(widths) != partition.num_stages:
            raise ValueError(
                f"`--expert_block_out_channels` gives {len(widths)} experts, but the stage split has "
                f"{partition.num_stages} stages: give one width list per expert."
            )
        if args.expert_index is not None and not 0 <= args.expert_index < partition.num_stages:
            raise ValueError(f"`--expert_index` must be in [0, {partition.num_stages}), got {args.expert_index}.")
        probabilities = args.own_interval_probability
        if args.assignment == "hard":
            if probabilities is not None:
                raise ValueError("`--own_interval_probability` is for `--assignment soft`; hard assignment uses 1.")
            probabilities = (1.0,) * partition.num_stages
        elif probabilities is not None and len(probabilities) != partition.num_stages:
            raise ValueError(
                f"`--own_interval_probability` needs one value per expert ({partition.num_stages}), got {list(probabilities)}."
            )
        self.probabilities = probabilities
        self._every_network_every_step(args, 1 if args.expert_index is not None else partition.num_stages, "expert")
        self.partition = partition  # `_shape` reads it
        if args.model_config is None:  # the iU-Net presets' shapes, before any data is read
            for i in self.trained_experts:
                IUNet2DModel.check_config(**self._shape(i))
        return partition

    @property
    def trained_experts(self) -> list[int]:
        return list(range(self.partition.num_stages)) if self.args.expert_index is None else [self.args.expert_index]

    def _shape(self, expert: int) -> dict:
        if self.args.model_config is not None:
            return unet_shape_kwargs(self.args)
        # MEME presets: iU-Nets, convolution-heavy near the data, attention-heavy toward the noise
        widths = self.args.expert_block_out_channels or tuple(self.args.block_out_channels)
        configs = meme_expert_configs(
            num_experts=self.partition.num_stages, block_out_channels=widths,
            attention_shares=self.args.expert_attention_shares, layers_per_block=self.args.layers_per_block,
            attention_head_dim=self.args.attention_head_dim, norm_num_groups=self.args.norm_num_groups,
            dropout=self.args.dropout,
        )  # fmt: skip
        return configs[expert]

    @property
    def downsampling(self):
        return max(_unet_downsampling(self._shape(i)) for i in self.trained_experts)

    def build_networks(self, in_channels, sample_size, num_class_embeds):
        networks = {}
        for i in self.trained_experts:
            contract = {"sample_size": sample_size, "in_channels": in_channels, "out_channels": in_channels,
                        "num_class_embeds": num_class_embeds}  # fmt: skip
            if self.args.model_config is not None:  # one `UNet2DModel` config for every expert
                unet = self._script_config(self._shape(i), num_train_timesteps=self.args.ddpm_num_steps, **contract)
                networks[expert_folder(i)] = UNet2DModel(**unet)
            else:
                networks[expert_folder(i)] = IUNet2DModel(**self._script_config(self._shape(i), **contract))
        return networks

    def draw(self, batch_size, generator):
        experts = self.trained_experts
        if self.args.assignment == "hard" and len(experts) > 1:
            timesteps, stages = self._stratified(batch_size, generator)  # each sample to its own interval's expert
            return Draw(torch.arange(batch_size), timesteps, stages)
        # soft assignment (MEME): expert n trains on its own interval with probability p_n, elsewhere otherwise;
        # the batch is split over the experts trained (by `--stage_shares`, equally by default)
        shares = (
            [1.0] * len(experts) if self.args.stage_shares is None else [self.args.stage_shares[i] for i in experts]
        )
        counts = stage_counts(batch_size, shares, generator)
        timesteps, network = [], []
        for k, (expert, count) in enumerate(zip(experts, counts)):
            p = None if self.probabilities is None else self.probabilities[expert]
            timesteps.append(soft_assignment_timesteps(self.partition, expert, count, p, generator=generator))
            network.append(torch.full((count,), k, dtype=torch.long))
        return Draw(torch.arange(batch_size), torch.cat(timesteps), torch.cat(network))

    def _routing_model(self, networks) -> ExpertRoutingModel:
        experts = [networks[expert_folder(i)] for i in range(self.partition.num_stages)]
        return ExpertRoutingModel(experts, prediction_type=self.args.prediction_type, **self.partition.to_config())

    def pipeline(self, networks, scheduler, vae=None):
        if self.args.expert_index is not None:
            return None  # one expert alone does not sample: assemble the runs with `--assemble_experts`
        return ExpertRoutingPipeline(experts=self._routing_model(networks), scheduler=scheduler, vae=vae)

    def save(self, networks, scheduler, vae, output_dir):
        if self.args.expert_index is None:
            return super().save(networks, scheduler, vae, output_dir)
        # one expert per run: the expert's own folder and what assembling the runs needs to check they fit
        name = expert_folder(self.args.expert_index)
        networks[name].save_pretrained(os.path.join(output_dir, name))
        scheduler.save_pretrained(os.path.join(output_dir, "scheduler"))
        if vae is not None:
            vae.save_pretrained(os.path.join(output_dir, "vae"))
        with open(os.path.join(output_dir, EXPERT_RUN_FILE), "w", encoding="utf-8") as f:
            json.dump({"expert_index": self.args.expert_index, "prediction_type": self.args.prediction_type,
                       **self.partition.to_config()}, f, indent=2)  # fmt: skip

    def description(self):
        what = "all experts in one run" if self.args.expert_index is None else f"expert {self.args.expert_index} only"
        assignment = self.args.assignment
        if assignment == "soft":
            p = self.probabilities or "MEME's (0.8, 0.4, 0.2, 0.1)"
            assignment = f"soft (own-interval probability {p})"
        return (
            "Independent denoisers, one per interval of the noise schedule (MEME, Lee et al., AAAI 2024), trained "
            f"with {assignment} interval assignment, {what}. {self._architecture()}\n\n" + self._stage_table()
        )

    def _architecture(self) -> str:
        if self.args.model_config is not None:
            return "Every expert is the `UNet2DModel` of `--model_config`."
        shares = ", ".join(f"{self._shape(i)['attention_ratios']:g}" for i in range(self.partition.num_stages))
        return f"Experts: iU-Nets (`IUNet2DModel`) with attention shares {shares} (clean expert first)."


EXPERT_RUN_FILE = "expert_run.json"


EXPERT_CLASSES = {cls.__name__: cls for cls in (IUNet2DModel, UNet2DModel)}  # what `train_experts.py` trains


def _load_expert(folder: str) -> ModelMixin:
    """An expert saved by an `--expert_index` run, with the class named in its `config.json`."""
    name = UNet2DModel.load_config(folder).get("_class_name")
    if name not in EXPERT_CLASSES:
        raise ValueError(
            f"`--assemble_experts`: {folder!r} holds a {name}, not one of the experts this script trains "
            f"({sorted(EXPERT_CLASSES)})."
        )
    return EXPERT_CLASSES[name].from_pretrained(folder)


def assemble_expert_runs(run_dirs: list[str]):
    """Gather the experts of one-expert-per-run folders into an `ExpertRoutingPipeline` (scheduler and VAE of the
    first run); refuses runs whose partitions or prediction types differ, or that miss or repeat an expert."""
    import diffusers

    runs = []
    for run in run_dirs:
        path = os.path.join(run, EXPERT_RUN_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"`--assemble_experts`: {run!r} is not a finished `--expert_index` run (no {EXPERT_RUN_FILE})."
            )
        with open(path, encoding="utf-8") as f:
            runs.append((run, json.load(f)))
    shared = [{k: v for k, v in info.items() if k != "expert_index"} for _, info in runs]
    if any(s != shared[0] for s in shared):
        raise ValueError(
            f"`--assemble_experts`: the runs were trained with different stage splits or targets: {shared}."
        )
    partition = TimestepPartition.from_config(shared[0])
    indices = sorted(info["expert_index"] for _, info in runs)
    if indices != list(range(partition.num_stages)):
        raise ValueError(
            f"`--assemble_experts` needs one run per expert 0..{partition.num_stages - 1}, got experts {indices}."
        )
    experts = [None] * partition.num_stages
    for run, info in runs:
        experts[info["expert_index"]] = _load_expert(os.path.join(run, expert_folder(info["expert_index"])))
    model = ExpertRoutingModel(experts, prediction_type=shared[0]["prediction_type"], **partition.to_config())
    first = runs[0][0]
    scheduler_class = getattr(diffusers, DDPMScheduler.load_config(os.path.join(first, "scheduler"))["_class_name"])
    scheduler = scheduler_class.from_pretrained(os.path.join(first, "scheduler"))
    vae_path = os.path.join(first, "vae")
    vae = diffusers.AutoencoderKL.from_pretrained(vae_path) if os.path.isdir(vae_path) else None
    return ExpertRoutingPipeline(experts=model, scheduler=scheduler, vae=vae)


DEFAULT_SWITCH_STEP_FRACTION = 0.4  # DuoDiff picks the switch by a sweep; no published rule


class DualBackboneTask(TrainingTask):
    """DuoDiff (arXiv 2410.09633): a shallow and a deep denoiser, both trained on all timesteps."""

    method = "dual backbone (shallow + deep)"
    tags = ("dual-backbone", "duodiff")

    def build_partition(self, args):
        if args.switch_step_fraction is not None and args.switch_timestep is not None:
            raise ValueError(
                "Give one of `--switch_step_fraction` and `--switch_timestep` (the sampling switch), not both."
            )
        if args.switch_step_fraction is None and args.switch_timestep is None:
            args.switch_step_fraction = DEFAULT_SWITCH_STEP_FRACTION
        if args.switch_step_fraction is not None and not 0.0 < args.switch_step_fraction < 1.0:
            raise ValueError(f"`--switch_step_fraction` must be in (0, 1), got {args.switch_step_fraction}.")
        if args.stage_boundaries is not None or args.stage_shares is not None:
            raise ValueError(
                "Dual-backbone training uses every timestep for both networks: drop `--stage_boundaries`/`--stage_shares`."
            )
        return TimestepPartition([], args.ddpm_num_steps, args.boundary_units)  # one stage: the whole schedule

    def _shapes(self) -> dict[str, dict]:
        deep = unet_shape_kwargs(self.args)
        shallow = {**deep, "layers_per_block": self.args.shallow_layers_per_block}
        if self.args.shallow_block_out_channels is not None:
            shallow["block_out_channels"] = tuple(self.args.shallow_block_out_channels)
        wanted = ("shallow", "deep") if self.args.backbones == "both" else (self.args.backbones,)
        return {name: shape for name, shape in (("shallow", shallow), ("deep", deep)) if name in wanted}

    @property
    def downsampling(self):
        return max(_unet_downsampling(shape) for shape in self._shapes().values())

    def build_networks(self, in_channels, sample_size, num_class_embeds):
        return {
            name: UNet2DModel(
                **self._script_config(
                    shape,
                    sample_size=sample_size,
                    in_channels=in_channels,
                    out_channels=in_channels,
                    num_class_embeds=num_class_embeds,
                    num_train_timesteps=self.args.ddpm_num_steps,
                )
            )
            for name, shape in self._shapes().items()
        }

    def draw(self, batch_size, generator):
        # every network sees the whole batch at its own noise levels from the usual training distribution
        count = len(self._shapes())
        timesteps = torch.cat([self._stratified(batch_size, generator)[0] for _ in range(count)])
        network = torch.arange(count).repeat_interleave(batch_size)
        return Draw(torch.arange(batch_size).repeat(count), timesteps, network)

    def pipeline(self, networks, scheduler, vae=None):
        if set(networks) != {"shallow", "deep"}:
            return None  # one backbone alone: load it next to the other one (see the example README)
        return DualBackbonePipeline(
            shallow=networks["shallow"], deep=networks["deep"], scheduler=scheduler, vae=vae,
            switch_step_fraction=self.args.switch_step_fraction, switch_timestep=self.args.switch_timestep,
        )  # fmt: skip

    def save(self, networks, scheduler, vae, output_dir):
        if set(networks) == {"shallow", "deep"}:
            return super().save(networks, scheduler, vae, output_dir)
        ((name, network),) = networks.items()
        network.save_pretrained(os.path.join(output_dir, name))
        scheduler.save_pretrained(os.path.join(output_dir, "scheduler"))

    def description(self):
        switch = (
            f"the shallow network runs the first {self.args.switch_step_fraction:g} of the sampling steps"
            if self.args.switch_step_fraction is not None
            else f"the shallow network runs every step at t >= {self.args.switch_timestep:g}"
        )
        return (
            "A dual-backbone model (DuoDiff, arXiv 2410.09633): a shallow and a deep U-Net, both trained on all "
            f"timesteps; at sampling time {switch}, the deep one the rest."
        )
