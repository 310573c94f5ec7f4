"""Multi-stage multi-decoder U-Net training (Zhang et al., CVPR 2024), from the arguments or fine-tuning a
`MultiStagePipeline` folder."""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import PartialState
from diffusers.models.modeling_utils import ModelMixin

from ...conventions import paper_boundaries
from ...models.packed_decoders import PACKED_UP_BLOCKS
from ...models.staged import DEFAULT_MAX_PADDING
from ...models.unet_multistage import MultiStageUNet2DModel
from ...models.unet_multistage_ddpmpp import MultiStageDDPMppUNet2DModel
from ...partition import TimestepPartition
from ...pipelines import MultiStagePipeline
from ...routing import fits_padding
from ...timestep_sampling import most_even_stage_counts, stage_mass, stage_sampled_timesteps
from ..args import (
    UNET_SHAPE_OPTIONS,
    partition_from_args,
    read_model_config,
    refuse_given_options,
    unet_shape_kwargs,
)
from ..hub import shared_name
from .base import Draw, _unet_downsampling, shares_text
from .pretrained import FineTuningTask, PipelineSource

# the classes a pretrained `unet` folder may hold, and the config key with one entry per resolution level
PRETRAINED_UNETS = {
    "MultiStageUNet2DModel": (MultiStageUNet2DModel, "block_out_channels"),
    "MultiStageDDPMppUNet2DModel": (MultiStageDDPMppUNet2DModel, "channel_mult"),
}
# what to do with a source whose unet is none of them
CONVERT_FIRST = (
    ": convert it first (e.g. `python -m diffusers_stages.conversion.unet_to_multistage` for a UNet2DModel or "
    "DDPM/DDIM/LDM pipeline)"
)
# arguments that would define the stages or the architecture anew; they have no default (the U-Net shape's apply
# only from scratch, `UNET_SHAPE_DEFAULTS`), so given means meant
REFUSED_WITH_PRETRAINED = ("stage_boundaries", "decoder_block_out_channels", "model_config", *UNET_SHAPE_OPTIONS)


class PretrainedSource(PipelineSource):
    """What fine-tuning reads from a `MultiStagePipeline` folder before any weights load (`PipelineSource`): its
    `unet` of one of ``PRETRAINED_UNETS``."""

    @classmethod
    def read(cls, path: str) -> PretrainedSource:
        """Read a `MultiStagePipeline` folder (or Hub repository); anything else is a ValueError naming
        `--pretrained_model_name_or_path`."""
        source = cls.read_pipeline(path, "MultiStagePipeline", ("unet",))
        classes = {name: model_class for name, (model_class, _) in PRETRAINED_UNETS.items()}
        source.read_model("unet", classes, CONVERT_FIRST)
        source.config_downsampling("unet", PRETRAINED_UNETS[source.unet_config["_class_name"]][1])  # checks its levels
        return source

    @property
    def unet_config(self) -> dict:
        return self.configs["unet"]

    @property
    def model_class(self) -> type[ModelMixin]:
        return PRETRAINED_UNETS[self.unet_config["_class_name"]][0]

    @property
    def downsampling(self) -> int:
        """The model's down-sampling factor: one halving per resolution level."""
        return self.config_downsampling("unet", PRETRAINED_UNETS[self.unet_config["_class_name"]][1])


def _differ(per_decoder: object) -> bool:
    """Whether a per-decoder config value (one list per decoder) holds two different lists; a value of another form
    (read from a folder: anything) is left to the model's own config check, which refuses it by name."""
    if not isinstance(per_decoder, (list, tuple)) or not all(isinstance(x, (list, tuple)) for x in per_decoder):
        return False
    return len({repr(list(x)) for x in per_decoder}) > 1


class MultiStageTask(FineTuningTask):
    """Zhang et al. (CVPR 2024): shared encoder, one decoder per stage, all trained jointly on stratified batches.

    With `--pretrained_model_name_or_path` the networks, the stages and the noise schedule are those of an existing
    `MultiStagePipeline` folder (fine-tuning) instead of being built from the arguments.

    Example:

    ```py
    >>> from diffusers import DDIMScheduler
    >>> from diffusers_stages.training import MultiStageTask, build_parser
    >>> args = build_parser("train_multistage.py").parse_args(["--block_out_channels", "8,16", "--layers_per_block", "1",
    ...     "--norm_num_groups", "4", "--stage_boundaries", "300", "600"])
    >>> args.decoder_block_out_channels = [[8, 16], [8, 16], [4, 8]]  # an option of train_multistage.py's own
    >>> task = MultiStageTask(args)
    >>> unet = task.build_networks(in_channels=3, sample_size=8, num_class_embeds=None)["unet"]
    >>> type(unet).__name__, unet.config.stage_boundaries, unet.config.decoder_block_out_channels
    ('MultiStageUNet2DModel', [300.0, 600.0], [[8, 16], [8, 16], [4, 8]])
    >>> type(task.pipeline({"unet": unet}, DDIMScheduler())).__name__  # what the run saves
    'MultiStagePipeline'

    ```
    """

    method = "multi-stage multi-decoder U-Net"
    tags = ("multi-stage", "multi-decoder")

    def read_source(self, path):
        return PretrainedSource.read(path)

    def source_configs(self):
        return {"unet": self.source.unet_config}

    def build_partition(self, args):
        if self.source is not None:
            partition = self._source_partition(args)
        else:
            partition = self._planned_partition(args)
            if partition is None:
                partition = partition_from_args(args, self._default_partition(args))
        decoders = getattr(args, "decoder_block_out_channels", None)
        if decoders is not None and len(decoders) != partition.num_stages:
            raise ValueError(
                f"`--decoder_block_out_channels` gives {len(decoders)} decoders, but the stage split "
                f"{list(partition.boundaries)} has {partition.num_stages} stages: give one width list per stage."
            )
        self._check_fused_decoders(args, partition)
        if getattr(args, "stage_sampling", "mixed") == "mixed":
            self._every_network_every_step(args, partition.num_stages, "decoder")
        else:  # one stage per batch or per process: the other decoders get no gradient in a step
            self.find_unused_parameters = True
        launched = int(os.environ.get("WORLD_SIZE", "1"))  # the processes the loop checks Accelerate runs
        if getattr(args, "stage_sampling", "mixed") == "per_rank" and launched % partition.num_stages:
            raise ValueError(
                f"`--stage_sampling per_rank` trains stage `rank % {partition.num_stages}` on each process: launch a "
                f"multiple of {partition.num_stages} processes (one per stage or more), got {launched}, or use "
                "`--stage_sampling mixed` (every stage in every batch) or `per_batch`."
            )
        if getattr(args, "stage_sampling", "mixed") == "per_rank":  # (else refused by the first step's draw)
            refuse_given_options(args, ("stage_shares",), "`--stage_sampling per_rank`",
                                 "each process trains one stage, every stage on an equal share of the processes")  # fmt: skip
        if self.source is not None and self.source.unet_config.get("augment_dim"):
            # EDM's augmentation embedding gets no gradient (the loop passes no augmentation labels): tell DDP
            self.find_unused_parameters = True
        return partition

    @staticmethod
    def _default_partition(args: argparse.Namespace) -> TimestepPartition | None:
        """The paper's split scaled to `--num_train_timesteps`; None when the schedule is too short for it and
        `--stage_boundaries` is given (a ValueError naming the argument when it is not)."""
        boundaries = paper_boundaries(args.boundary_units, args.num_train_timesteps)
        try:
            return TimestepPartition(boundaries, args.num_train_timesteps, args.boundary_units)
        except ValueError as error:
            if args.stage_boundaries is not None:
                return None  # not used: the given boundaries are
            raise ValueError(
                f"`--num_train_timesteps` {args.num_train_timesteps} is too short for the default stage split "
                f"{boundaries} ({error}): give `--stage_boundaries` or a longer schedule."
            ) from None

    def _check_fused_decoders(self, args: argparse.Namespace, partition: TimestepPartition) -> None:
        """Refuse `--fused_decoders` where no batch could be fused: a model or up blocks without a packed form,
        gradient checkpointing or xFormers, batches of one stage, decoders of different architectures, or stage
        counts so uneven that padding them to the largest adds more rows than `enable_fused_decoders` allows by
        default (``DEFAULT_MAX_PADDING``, 25%)."""
        if not getattr(args, "fused_decoders", False):
            return
        # the fused pass does not checkpoint: every training batch would be decoded stage by stage
        if getattr(args, "gradient_checkpointing", False):
            self._refuse_fused_with("gradient_checkpointing", "the fused pass does not checkpoint")
        scheme = getattr(args, "stage_sampling", "mixed")
        if scheme != "mixed":
            raise ValueError(
                f"`--fused_decoders` fuses batches that hold several stages, but with `--stage_sampling {scheme}` "
                "every batch holds one: drop one of the two."
            )
        if self.source is not None:
            if not self.source.model_class._supports_fused_decoders:
                raise ValueError(
                    f"`--fused_decoders` is not supported by {self.source.model_class.__name__} (the model of "
                    f"{self.source.path!r}; only MultiStageUNet2DModel's decoders have a channel-packed form): drop it."
                )
            config = self.source.unet_config
        else:  # `--model_config`'s, or the arguments' shape (their default up blocks too)
            config = unet_shape_kwargs(args)
        widths = getattr(args, "decoder_block_out_channels", None) or config.get("decoder_block_out_channels")
        up_types = config.get("decoder_up_block_types")
        if any(_differ(value) for value in (widths, up_types)):
            raise ValueError(
                f"`--fused_decoders` fuses decoders of one architecture, but these differ (widths {widths}, up "
                f"blocks {up_types}): every batch would be decoded stage by stage; drop `--fused_decoders`."
            )
        # every decoder's up blocks (the config's `up_block_types` where it gives no per-decoder ones) need a packed form
        blocks = config.get("up_block_types") or getattr(args, "up_block_types", None) or PACKED_UP_BLOCKS
        per_decoder = up_types if isinstance(up_types, (list, tuple)) else [blocks]
        names = {t for types in per_decoder if isinstance(types, (list, tuple)) for t in types if isinstance(t, str)}
        if names - set(PACKED_UP_BLOCKS):
            raise ValueError(
                f"`--fused_decoders` fuses up blocks among {PACKED_UP_BLOCKS} only, got "
                f"{sorted(names - set(PACKED_UP_BLOCKS))}: every batch would be decoded stage by stage; drop "
                "`--fused_decoders` or use those blocks."
            )
        # it packs diffusers' own attention only; decoders without attention fuse (the encoder's is not fused)
        if getattr(args, "enable_xformers_memory_efficient_attention", False) and any("Attn" in n for n in names):
            self._refuse_fused_with(
                "enable_xformers_memory_efficient_attention", "xFormers attention has no channel-packed form"
            )
        shares = args.stage_shares if args.stage_shares is not None else stage_mass(partition)
        if len(shares) != partition.num_stages or any(s < 0 for s in shares) or not sum(shares):
            return  # refused with its own message by `check_args`
        counts = [c for c in most_even_stage_counts(args.train_batch_size, shares) if c]
        if len(counts) > 1 and not fits_padding(counts, DEFAULT_MAX_PADDING):
            equal = f"`--stage_shares {','.join(['1'] * partition.num_stages)}`"
            fix = (  # equal shares split a batch size that is a multiple of the stage count evenly
                f"pass a `--train_batch_size` that is a multiple of {partition.num_stages} (with {equal})"
                if len(set(shares)) == 1
                else f"pass equal `--stage_shares` (e.g. {equal})"
            )
            raise ValueError(
                f"`--fused_decoders`: a batch of {args.train_batch_size} splits {counts} over the stages, and padding "
                f"every stage to {max(counts)} samples would add more than {DEFAULT_MAX_PADDING:.0%} rows, so batches "
                f"would be decoded stage by stage: {fix}, or drop `--fused_decoders`."
            )

    @staticmethod
    def _refuse_fused_with(name: str, reason: str) -> None:
        raise ValueError(
            f"`--fused_decoders` with `--{name}`: {reason}, so every batch would be decoded stage by stage; drop one "
            "of the two."
        )

    def _planned_partition(self, args: argparse.Namespace) -> TimestepPartition | None:
        """The stages a `--model_config` holds (e.g. the plan command's output), after refusing every argument that
        contradicts them; None when it holds none."""
        config = read_model_config(args)
        if config is None or config.get("stage_boundaries") is None:
            return None
        name = args.model_config
        try:
            planned = TimestepPartition.from_config(
                {"num_train_timesteps": args.num_train_timesteps, "boundary_units": args.boundary_units, **config}
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"`--model_config` {name!r} holds an invalid stage split: {error}") from None
        if planned.num_train_timesteps != args.num_train_timesteps:
            raise ValueError(
                f"`--num_train_timesteps` {args.num_train_timesteps} disagrees with `--model_config` {name!r}, planned for "
                f"{planned.num_train_timesteps} training steps: pass `--num_train_timesteps {planned.num_train_timesteps}`."
            )
        if planned.units != args.boundary_units:
            raise ValueError(
                f"`--boundary_units` {args.boundary_units} disagrees with `--model_config` {name!r}, whose stage "
                f"boundaries are in {planned.units!r} units: pass `--boundary_units {planned.units}`."
            )
        if args.stage_boundaries is not None and list(args.stage_boundaries) != list(planned.boundaries):
            raise ValueError(
                f"`--stage_boundaries` {list(args.stage_boundaries)} conflicts with the stage boundaries "
                f"{list(planned.boundaries)} of `--model_config` {name!r}: drop `--stage_boundaries` to train as "
                "planned, or remove `stage_boundaries` from the config."
            )
        return planned

    def _source_partition(self, args: argparse.Namespace) -> TimestepPartition:
        """The loaded model's partition, after refusing every argument that contradicts the source."""
        partition = self.source.partition("unet")
        kept = f"stage boundaries {list(partition.boundaries)} in {partition.units!r} units"
        self.check_source_arguments(args, partition, REFUSED_WITH_PRETRAINED, kept, [self.source.model_class])
        return partition

    @property
    def downsampling(self):
        if self.source is not None:
            return self.source.downsampling
        return _unet_downsampling(unet_shape_kwargs(self.args))

    def build_networks(self, in_channels, sample_size, num_class_embeds):
        unet = self._build_unet(in_channels, sample_size, num_class_embeds)
        if getattr(self.args, "fused_decoders", False):  # a source's model class is checked up front
            unet.enable_fused_decoders()
        return {"unet": unet}

    def _build_unet(self, in_channels, sample_size, num_class_embeds):
        if self.source is not None:  # the training loop has checked the data against it (`check_data`)
            # fp32 master weights whatever the folder stores; Accelerate's mixed precision casts in the forward pass
            return self.source.model_class.from_pretrained(
                self.source.path, subfolder="unet", torch_dtype=torch.float32
            )
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
        return MultiStageUNet2DModel(**config)

    def draw(self, batch_size, generator):
        state, scheme = PartialState(), getattr(self.args, "stage_sampling", "mixed")
        timesteps, _ = stage_sampled_timesteps(self.partition, batch_size, scheme, self.args.stage_shares, generator,
                                               state.process_index, state.num_processes)  # fmt: skip
        zeros = torch.zeros(batch_size, dtype=torch.long)
        return Draw(torch.arange(batch_size), timesteps, zeros)

    def pipeline(self, networks, scheduler, vae=None):
        return MultiStagePipeline(unet=networks["unet"], scheduler=scheduler, vae=vae, id2label=self.id2label)

    def description(self):
        planned = (
            None if self.args.model_config is None else unet_shape_kwargs(self.args).get("decoder_block_out_channels")
        )
        widths = self.args.decoder_block_out_channels or planned or "the encoder's"
        origin = ""
        if self.source is not None:
            config = self.source.unet_config
            widths = config.get("decoder_block_out_channels") or config.get("decoder_channels") or "the encoder's"
            origin = f" Fine-tuned from `{shared_name(self.source.path)}` ({config['_class_name']})."
        return (
            "A multi-stage, multi-decoder U-Net (Zhang et al., CVPR 2024): one shared encoder and one decoder per "
            f"stage of the noise schedule, trained jointly ({self._sampling_text()}). Decoder widths: {widths}."
            f"{origin}\n\n" + self._stage_table()
        )

    def _sampling_text(self) -> str:
        """How the run drew the stages of its batches (`--stage_sampling`, `--stage_shares`), for the model card."""
        scheme, shares = getattr(self.args, "stage_sampling", "mixed"), self.args.stage_shares
        if scheme == "per_batch":
            text = "one stage per batch with `--stage_sampling per_batch`"
        elif scheme == "per_rank":
            return "one stage per process with `--stage_sampling per_rank`"
        elif shares is None:
            return "every decoder in every batch"
        else:
            text = "every batch split over the stages"
        if shares is not None:
            text += f", {shares_text(shares)}"
        return text
