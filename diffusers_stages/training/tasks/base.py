"""The base of the training tasks: what one method changes in the one loop of `loop.py` (its networks, how each
batch is spread over them, their loss, and the pipeline they are saved as)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler, SchedulerMixin
from diffusers.models.modeling_utils import ModelMixin

from ...conventions import vae_to_model_latents
from ...loss import diffusion_loss
from ...models.checks import sample_size_is
from ...models.loading import CONFIG_VALUE_ERRORS, exported_class
from ...partition import TimestepPartition
from ...schedulers import ContinuousVPDPMSolverSinglestepScheduler, is_edm_scheduler
from ...timestep_sampling import stratified_timesteps
from ..hub import first_class_name, pipeline_usage, stage_table

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
        if name == ContinuousVPDPMSolverSinglestepScheduler.__name__:  # `original_multistage_ncsnpp`'s sampler
            raise ValueError(
                f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r}: its {name} (a converted "
                "score_sde NCSN++ model) samples a continuous-time VP SDE, while this script trains on DDPM-style "
                "discrete timesteps or EDM sigmas only: fine-tuning such a folder is not supported."
            )
        sampling_class = exported_class(name, SchedulerMixin, (diffusers,))
        if sampling_class is None:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r}: its scheduler config names "
                f"{name!r}, which is not a diffusers scheduler."
            )
        try:  # read from a folder: a value the scheduler cannot take fails inside it
            sampling = sampling_class.from_config(source)
            if is_edm_scheduler(sampling):
                return EDMEulerScheduler.from_config(source), sampling
            training = DDPMScheduler.from_config(source) if hasattr(sampling, "alphas_cumprod") else None
        except CONFIG_VALUE_ERRORS as error:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r}: its scheduler config does "
                f"not build a {sampling_class.__name__} (or the scheduler training uses): {type(error).__name__}: "
                f"{error}"
            ) from None
        if training is None:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r}: its {name} is neither "
                "DDPM-style (a beta schedule) nor EDM-style, the two kinds of noise schedule this script trains with."
            )
        return training, sampling
    if args.boundary_units == "sigma":
        scheduler = EDMEulerScheduler(
            num_train_timesteps=args.num_train_timesteps, prediction_type=args.prediction_type
        )
        return scheduler, scheduler
    scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
    )
    try:
        sampling = DDIMScheduler.from_config(scheduler.config)
    except NotImplementedError:
        raise ValueError(
            f"`--ddpm_beta_schedule {args.ddpm_beta_schedule}` is not implemented by DDIMScheduler, which samples the "
            "sample grids and the saved pipeline: use linear, scaled_linear or squaredcos_cap_v2."
        ) from None
    return scheduler, sampling


def shares_text(shares) -> str:
    """How a model card gives `--stage_shares` (``"batch shares 1:1:0 (clean stage first)"``): a share of 0 is a
    network the run did not train."""
    return f"batch shares {':'.join(f'{share:g}' for share in shares)} (clean stage first)"


def _unet_downsampling(shape: dict) -> int:
    return 2 ** (len(shape["block_out_channels"]) - 1)


class TrainingTask:
    """Base class: a partition of the schedule, named networks, a batch plan per step, and a saved pipeline.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel
    >>> from diffusers_stages import TimestepPartition
    >>> from diffusers_stages.training import TrainingTask, build_parser
    >>> from diffusers_stages.training.tasks import Draw
    >>> class PlainUNetTask(TrainingTask):  # one UNet2DModel on every timestep, saved as a DDIMPipeline
    ...     method, downsampling = "plain U-Net", 2
    ...
    ...     def build_partition(self, args):
    ...         return TimestepPartition([], args.num_train_timesteps)  # one stage: the whole schedule
    ...
    ...     def build_networks(self, in_channels, sample_size, num_class_embeds):
    ...         return {"unet": UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
    ...             block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...             down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))}
    ...
    ...     def draw(self, batch_size, generator):  # every sample to network 0, at stratified timesteps
    ...         timesteps, _ = self._stratified(batch_size, generator)
    ...         return Draw(torch.arange(batch_size), timesteps, torch.zeros(batch_size, dtype=torch.long))
    ...
    ...     def pipeline(self, networks, scheduler, vae=None):
    ...         return DDIMPipeline(unet=networks["unet"], scheduler=scheduler)
    >>> task = PlainUNetTask(build_parser("train_plain_unet.py").parse_args([]))
    >>> unet = task.build_networks(in_channels=3, sample_size=8, num_class_embeds=None)["unet"]
    >>> draw = task.draw(batch_size=4, generator=torch.manual_seed(0))
    >>> clean, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    >>> task.loss(unet, DDPMScheduler(), clean[draw.rows], draw.timesteps, noise).shape  # per sample, as the loop logs
    torch.Size([4])

    ```
    """

    method = ""
    tags: tuple[str, ...] = ()
    find_unused_parameters = False  # True only where a network may get no sample in a step
    # `--use_ema`'s decay: diffusers' train_unconditional.py warmup, 1 - (1 + step / `--ema_inv_gamma`) ** -`--ema_power`
    # (False: EMAModel's default (1 + step) / (10 + step), as train_text_to_image.py); both capped at `--ema_max_decay`
    ema_warmup = True
    decoders = 1  # the stage decoders of one network that the batches are split over (a sharded run needs them all)
    scheduler_config: dict | None = None  # a pretrained source's scheduler config; None: the arguments' schedule

    def __init__(self, args: argparse.Namespace):
        self.args = args  # read, never written: what a task derives from it is an attribute of the task
        self.vae_path, self.vae_subfolder = self.training_vae(args)
        self.partition = self.build_partition(args)
        self.class_names: list[str] = []  # the training data's classes, set by the loop (the pipeline's id2label)

    def training_vae(self, args: argparse.Namespace) -> tuple[str | None, str | None]:
        """``(path, subfolder)`` of the AutoencoderKL whose latents are trained on (`--vae_path`), or ``(None,
        None)`` for pixel space."""
        return args.vae_path, args.vae_subfolder

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

    def check_networks(self, in_channels: int, sample_size: int, num_class_embeds: int | None) -> None:
        """Build the networks of the arguments on the meta device (no weights, no memory) for samples of this shape,
        so that model arguments they refuse (a `--norm_num_groups` that does not divide the widths, an unknown
        `--down_block_types` entry, a `--model_config` key that is no constructor argument) are a ValueError before
        any data is read, not the model's traceback after it (nor torch's, for widths too large to build at all). A
        task whose networks load from a source folder overrides it (`check_data` checks those)."""
        try:
            with torch.device("meta"):
                self.build_networks(in_channels, sample_size, num_class_embeds)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(
                f"The model arguments describe no network that can be built: {error} Fix the argument it names (or "
                "`--model_config`)."
            ) from None

    def check_data(self, in_channels: int, sample_size: int, num_class_embeds: int | None) -> None:
        """Refuse training data that networks loaded from a checkpoint cannot take (a ValueError naming the
        argument); networks built from the arguments fit any data, so by default there is nothing to check."""

    def model_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """``vae``'s latents (a posterior sample) as the networks train on them: the inverse of what the task's
        pipeline hands its decoder. By default `conventions.vae_to_model_latents` (``(E(x) - shift_factor) *
        scaling_factor``, or with the VAE's ``latents_mean``/``latents_std``), as the package's pipelines decode."""
        return vae_to_model_latents(vae, latents)

    def data_warnings(self) -> list[str]:
        """What about the training data does not stop the run but should be said, once the data are read (logged as
        warnings by the training loop; what the run refuses is `check_data`'s): by default nothing."""
        return []

    def read_records(self, args: argparse.Namespace):
        """The training images and their labels when the task reads them itself (e.g. captions, see
        `TextToImageTask`); None for the loop's own reading of `--train_data_dir` / `--dataset_name`."""
        return None

    @property
    def uses_labels(self) -> bool:
        """Whether each training image comes with a label index the loss conditions on (the class with
        `--class_conditional`; a task may use them for something else, e.g. caption indices)."""
        return self.args.class_conditional

    @property
    def id2label(self) -> dict[str, str] | None:
        """The saved pipeline's class names (`id2label`, as `DiTPipeline`'s): with `--class_conditional`, the
        training data's classes (the image folder's sub-folders, a dataset's `ClassLabel` names); else None."""
        if not self.args.class_conditional or not self.class_names:
            return None
        return {str(index): name for index, name in enumerate(self.class_names)}

    def sample_inputs(self, count: int) -> dict | None:
        """The pipeline-call arguments of a sample grid of ``count`` images besides the generator and step count;
        None for the loop's own (``batch_size`` and class labels)."""
        return None

    def draw(self, batch_size: int, generator: torch.Generator) -> Draw:
        raise NotImplementedError

    def loss(
        self,
        network: ModelMixin,
        noise_scheduler: SchedulerMixin,
        clean: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of each sample (shape ``(batch,)``) of ``network`` on ``clean`` noised with ``noise`` to
        ``timesteps``: by default `diffusion_loss`, with `--snr_gamma`; a method with another objective overrides it."""
        return diffusion_loss(
            network, noise_scheduler, clean, timesteps, noise=noise, class_labels=class_labels,
            snr_gamma=self.args.snr_gamma,
        )  # fmt: skip

    def pipeline(self, networks: dict[str, ModelMixin], scheduler, vae=None):
        """The pipeline the networks are sampled and saved as (None where one run gives no full sampler)."""
        raise NotImplementedError

    def no_sampler_reason(self) -> str:
        """Why `pipeline` gives None (the run's sample grids are not drawn), and how its networks are sampled."""
        return "the networks of this run do not sample alone"

    def save(self, networks: dict[str, ModelMixin], scheduler, vae, output_dir: str) -> None:
        self.pipeline(networks, scheduler, vae).save_pretrained(output_dir)

    def description(self) -> str:
        """Markdown for the model card: the method and its stages."""
        raise NotImplementedError

    def usage(self, repo_id: str) -> list[str]:
        """The model card's sampling code (lines)."""
        first_name = first_class_name(self.id2label)
        return pipeline_usage("StagedDiffusionPipeline", repo_id, self.args.class_conditional, first_name)

    # helpers
    def _every_network_every_step(
        self, args: argparse.Namespace, count: int, kind: str, separate: bool = False, option: str = ""
    ) -> None:
        """Each of ``count`` networks (decoders of one model, or ``separate`` networks) gets a sample in every batch,
        unless a zero `--stage_shares` entry says not, or the batch is smaller than ``count`` (each sample's stage
        drawn at random by its share, `stage_counts`): then DDP is told to expect unused parameters. ``separate``
        networks are each their own DDP model, which every process of a multi-process run must run at every step:
        there a batch smaller than ``count`` is refused, naming ``option`` (the option that sets ``count``)."""
        self.find_unused_parameters = args.stage_shares is not None and min(args.stage_shares) == 0
        self.decoders = 1 if separate else count
        if args.train_batch_size >= count:
            return
        launched = int(os.environ.get("WORLD_SIZE", "1"))  # the processes the loop checks Accelerate runs
        if separate and launched > 1:
            raise ValueError(
                f"`--train_batch_size` {args.train_batch_size} is smaller than the {count} {kind}s trained"
                f"{f' ({option})' if option else ''}: each batch's samples go to {kind}s drawn at random, but in a run "
                f"of {launched} processes every {kind} (its own DDP network) must run on every process at every step. "
                f"Pass `--train_batch_size` {count} or more (`--gradient_accumulation_steps` keeps the samples per "
                "optimisation step), or train on one process."
            )
        self.find_unused_parameters = True  # the decoders a batch leaves out get no gradient in that step

    def _stratified(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return stratified_timesteps(self.partition, batch_size, self.args.stage_shares, generator=generator)

    def _script_config(self, config: dict, **values) -> dict:
        """``config`` (the arguments' shape, or `--model_config`'s) with the run's ``values`` of `SCRIPT_KEYS`. A
        `--model_config` made for other samples (a ``sample_size`` or ``in_channels`` the run's data do not have) is
        a ValueError rather than rewritten: the model trained would not be the one it describes (or was planned)."""
        given = getattr(self.args, "model_config", None) is not None  # a preset's (MEME's iU-Nets') is rewritten
        size, channels = (config.get("sample_size"), config.get("in_channels")) if given else (None, None)
        run_size, run_channels = values.get("sample_size"), values.get("in_channels")
        if size is not None and run_size is not None and not sample_size_is(size, run_size):
            raise ValueError(
                f"`--model_config` {self.args.model_config!r} is for samples of size {size}, but this run trains on "
                f"size {run_size} (`--resolution`, divided by the VAE's down-sampling): give `--resolution` for that "
                "size, or a config for this one."
            )
        if channels is not None and run_channels is not None and channels != run_channels:
            raise ValueError(
                f"`--model_config` {self.args.model_config!r} is for {channels}-channel samples, but this run trains on "
                f"{run_channels}-channel ones (RGB images, or the latents of `--vae_path`): give a config for those."
            )
        if given:
            self._check_config_labels(config, values.get("num_class_embeds"))
        config = {k: v for k, v in config.items() if k not in SCRIPT_KEYS}
        return {**config, **values}

    def _check_config_labels(self, config: dict, num_class_embeds: int | None) -> None:
        """Refuse a `--model_config` whose class labels the run would not train as it describes them: a
        ``class_embed_type`` (labels embedded as values, which the scripts never give: their labels are class indices
        into ``num_class_embeds``, the data's classes + 1), or a class-conditional config in a run without
        `--class_conditional` (its model would be trained unconditional). The class count itself is the data's."""
        path = self.args.model_config
        embed_type = config.get("class_embed_type")
        if embed_type is not None:
            raise ValueError(
                f"`--model_config` {path!r} embeds class labels with class_embed_type={embed_type!r} (as values), but "
                "the training scripts train class indices (`--class_conditional`: one embedding per class of the data "
                "and the unconditional label, `num_class_embeds`): drop `class_embed_type` from the config."
            )
        if config.get("num_class_embeds") is not None and num_class_embeds is None:
            raise ValueError(
                f"`--model_config` {path!r} is class-conditional (num_class_embeds={config['num_class_embeds']}), but "
                "this run is not `--class_conditional`: add `--class_conditional` (the classes are then the data's), "
                "or give a config with `num_class_embeds: null` to train an unconditional model."
            )

    def _stage_table(self) -> str:
        return stage_table(self.partition)
