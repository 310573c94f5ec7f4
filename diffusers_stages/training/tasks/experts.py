"""Multi-expert denoiser training (MEME, Lee et al., AAAI 2024): all experts in one run or one per run, and the
assembly of one-expert runs into one pipeline."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ...models.checks import renamed_arguments
from ...models.expert_routing import (
    CONTAINER_CONFIG,
    PREDICTION_TYPES,
    ExpertRoutingModel,
    expert_folder,
    import_class,
)
from ...models.iunet import IUNet2DModel
from ...models.loading import (
    check_same_vae,
    component_folder,
    exported_class,
    load_scheduler,
    load_strictly,
    read_json,
)
from ...models.meme import meme_expert_configs
from ...partition import TimestepPartition
from ...pipelines import ExpertRoutingPipeline
from ...pipelines.loading import resolve_pipeline_class
from ...planning.sizing import config_value
from ...schedulers import training_schedule_differences
from ...timestep_sampling import MEME_OWN_INTERVAL_PROBABILITIES, soft_assignment_timesteps, stage_counts, stage_mass
from ..args import (
    UNET_SHAPE_OPTIONS,
    check_no_block_types,
    check_positive_options,
    partition_from_args,
    refuse_given_options,
    scratch_shape,
    unet_shape_kwargs,
)
from ..hub import shared_name
from .base import Draw, _unet_downsampling, shares_text
from .pretrained import FineTuningTask, PipelineSource

MEME_NUM_EXPERTS = 4  # uniform intervals without `--num_experts` or `--stage_boundaries`
# arguments that would define the experts or their architecture anew (none has a default: given means meant),
# refused when fine-tuning a pipeline folder
REFUSED_WITH_PRETRAINED = (
    "num_experts", "stage_boundaries", "expert_block_out_channels", "expert_attention_shares", "model_config",
    *UNET_SHAPE_OPTIONS,
)  # fmt: skip


class ExpertTask(FineTuningTask):
    """MEME (Lee et al., AAAI 2024): one U-Net per interval, all in one run or one per run, soft or hard assignment.

    With `--pretrained_model_name_or_path` the experts (all, or `--expert_index`'s), their intervals and the noise
    schedule are those of an existing `ExpertRoutingPipeline` folder (fine-tuning).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_stages.training import ExpertTask, build_parser
    >>> args = build_parser("train_experts.py").parse_args(["--block_out_channels", "8,16", "--layers_per_block", "1",
    ...     "--norm_num_groups", "4", "--train_batch_size", "6"])
    >>> vars(args).update(num_experts=2, assignment="soft", own_interval_probability=(0.8, 0.4), expert_index=None,
    ...     expert_block_out_channels=None, expert_attention_shares=None, assemble_experts=None)  # the script's own
    >>> task = ExpertTask(args)
    >>> task.partition
    TimestepPartition(boundaries=[500.0], num_train_timesteps=1000, units='timestep')
    >>> sorted(task.build_networks(in_channels=3, sample_size=8, num_class_embeds=None))
    ['expert_0', 'expert_1']
    >>> draw = task.draw(batch_size=6, generator=torch.manual_seed(0))
    >>> draw.network, draw.timesteps  # soft assignment: expert 0 also draws from outside [0, 500) (601)
    (tensor([0, 0, 0, 1, 1, 1]), tensor([497, 183, 601, 368, 294,  33]))

    ```
    """

    method = "multi-expert denoisers"
    tags = ("multi-expert", "meme")

    def read_source(self, path):
        source = PipelineSource.read_pipeline(path, "ExpertRoutingPipeline", ("experts",))
        container = source.configs["experts"]
        missing = [key for key in CONTAINER_CONFIG if key not in container]
        if container.get("_class_name") != ExpertRoutingModel.__name__ or missing:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {path!r}: its experts/ holds a {container.get('_class_name')!r} "
                f"(`_class_name`), not a saved ExpertRoutingModel with {list(CONTAINER_CONFIG)} in its config.json "
                f"(it lacks {missing})."
            )
        return source

    def source_configs(self):
        return {folder: self.source.configs[folder] for folder in map(_source_folder, self.trained_experts)}

    def build_partition(self, args):
        partition = self._argument_partition(args) if self.source is None else self._source_partition(args)
        if args.expert_index is not None and not 0 <= args.expert_index < partition.num_stages:
            raise ValueError(f"`--expert_index` must be in [0, {partition.num_stages}), got {args.expert_index}.")
        if args.expert_index is not None:  # the batch is not split: the run's one expert takes all of it
            refuse_given_options(args, ("stage_shares",), f"`--expert_index` {args.expert_index}",
                                 "a run of one expert gives it the whole batch")  # fmt: skip
        if args.stage_sampling != "mixed":  # the option is the multi-stage scripts' (shared parser)
            raise ValueError(
                f"`--stage_sampling {args.stage_sampling}` is not implemented for experts: every batch is stratified "
                "over the experts' intervals (`--stage_shares`). Drop it, or train a multi-stage U-Net with "
                "`train_multistage.py`."
            )
        probabilities = args.own_interval_probability
        if args.assignment == "hard":
            if probabilities is not None:
                raise ValueError("`--own_interval_probability` is for `--assignment soft`; hard assignment uses 1.")
            probabilities = (1.0,) * partition.num_stages
        elif probabilities is not None and len(probabilities) != partition.num_stages:
            raise ValueError(
                f"`--own_interval_probability` needs one value per expert ({partition.num_stages}), got {list(probabilities)}."
            )
        elif probabilities is not None and not all(0.0 < p <= 1.0 for p in probabilities):
            raise ValueError(f"`--own_interval_probability` values must be in (0, 1], got {list(probabilities)}.")
        elif probabilities is None and partition.num_stages != len(MEME_OWN_INTERVAL_PROBABILITIES):
            raise ValueError(
                f"`--own_interval_probability` must be given for {partition.num_stages} experts (soft assignment): "
                f"MEME's defaults {MEME_OWN_INTERVAL_PROBABILITIES} are for {len(MEME_OWN_INTERVAL_PROBABILITIES)}."
            )
        self.probabilities = probabilities
        count = 1 if args.expert_index is not None else partition.num_stages
        self._every_network_every_step(args, count, "expert", separate=True, option="`--num_experts`, or the source's")
        self.partition = partition  # `_shape` and `trained_experts` read it
        if self.source is not None:
            self._check_source_experts(args, partition)
        elif args.model_config is not None:  # every expert that `UNet2DModel` (of its own widths, when given)
            refuse_given_options(
                args, ("expert_attention_shares",), f"`--model_config` {args.model_config!r}",
                "every expert is that config's UNet2DModel, and the shares shape the MEME presets' iU-Nets",
            )  # fmt: skip
            self._check_expert_widths(args)
        else:  # the iU-Net presets' shapes, before any data is read
            check_no_block_types(
                args,
                "the MEME presets' iU-Nets, which have their own blocks (give a UNet2DModel with `--model_config`)",
            )
            for i in self.trained_experts:
                IUNet2DModel.check_config(**self._shape(i))
        return partition

    @staticmethod
    def _check_expert_widths(args) -> None:
        """`--expert_block_out_channels` with `--model_config` (e.g. a budget plan's: `plan --architecture experts`):
        one positive width per block of that config's U-Net (a width of 0 builds, and fails in the first step)."""
        blocks = len(config_value(unet_shape_kwargs(args), "block_out_channels"))  # UNet2DModel's default if unset
        for i, widths in enumerate(args.expert_block_out_channels or ()):
            if len(widths) != blocks:
                raise ValueError(
                    f"`--expert_block_out_channels` gives expert {i} the widths {list(widths)}, but the U-Net of "
                    f"`--model_config` {args.model_config!r} has {blocks} blocks: give {blocks} widths per expert."
                )
            if min(widths) < 1:
                raise ValueError(
                    f"`--expert_block_out_channels` gives expert {i} the widths {list(widths)}: each must be a positive "
                    "integer."
                )

    def _source_partition(self, args) -> TimestepPartition:
        """The source's intervals (its experts' container config)."""
        return self.source.partition("experts")

    def _check_source_experts(self, args, partition: TimestepPartition) -> None:
        """Read the configs of the source's experts this run trains (each of a class the script trains, whose
        down-sampling is known, and which the container's `expert_classes` entry names: only the classes diffusers
        and the package export are looked up, nothing is imported), then refuse every argument that contradicts the
        source."""
        classes, entries = [], self.source.configs["experts"]["expert_classes"]
        for i in self.trained_experts:
            folder = _source_folder(i)
            classes.append(self.source.read_model(folder, EXPERT_CLASSES, ": the script trains those experts only"))
            self.source.config_downsampling(folder)
            entry = entries[i] if isinstance(entries, list) and len(entries) == partition.num_stages else entries
            try:
                named = import_class(entry, loaded_modules=False)
            except ValueError:
                named = None
            if named is not classes[-1]:
                raise ValueError(
                    f"`--pretrained_model_name_or_path` {self.source.path!r}: entry {i} of `expert_classes` in its "
                    f"experts/config.json must name the class of {folder}/config.json ({classes[-1].__name__}), got "
                    f"{entry!r}."
                )
        kept = f"{partition.num_stages} experts, stage boundaries {list(partition.boundaries)} in {partition.units!r} units"
        self.check_source_arguments(args, partition, REFUSED_WITH_PRETRAINED, kept, classes)

    def _argument_partition(self, args) -> TimestepPartition:
        """The intervals of `--num_experts` / `--stage_boundaries` (MEME's 4 uniform ones by default)."""
        check_positive_options(args, ("num_experts",))
        count = MEME_NUM_EXPERTS if args.num_experts is None else args.num_experts
        partition = partition_from_args(args, TimestepPartition.uniform(count, args.num_train_timesteps))
        if args.num_experts is not None and args.num_experts != partition.num_stages:  # both given, at odds
            raise ValueError(
                f"`--num_experts` {args.num_experts} disagrees with `--stage_boundaries` {list(partition.boundaries)} "
                f"({partition.num_stages} experts): give one of them, or both for the same count."
            )
        self._check_every_interval_trains(args, partition)
        widths = args.expert_block_out_channels
        if widths is not None and len(widths) != partition.num_stages:
            raise ValueError(
                f"`--expert_block_out_channels` gives {len(widths)} experts, but the stage split has "
                f"{partition.num_stages} stages: give one width list per expert."
            )
        return partition

    @staticmethod
    def _check_every_interval_trains(args, partition: TimestepPartition) -> None:
        """Each expert's interval holds an integer training timestep (an empty one was a ValueError at the first step
        with soft assignment, and left its expert untrained with hard assignment)."""
        if partition.units != "timestep":
            return
        empty = [s for s, mass in enumerate(stage_mass(partition)) if mass == 0]
        if empty:
            source = "`--stage_boundaries`" if args.stage_boundaries is not None else "`--num_experts`"
            given = list(partition.boundaries) if args.stage_boundaries is not None else args.num_experts
            shown = str(empty) if len(empty) <= 8 else str(empty[:8])[:-1] + ", ...]"
            advice = (  # uniform intervals at least one timestep wide each hold one
                "Widen their intervals."
                if args.stage_boundaries is not None
                else f"Give at most {partition.num_train_timesteps} experts (`--num_train_timesteps`) or "
                "`--stage_boundaries`."
            )
            raise ValueError(
                f"{source} {given} leave experts {shown} no integer training timestep (expert {empty[0]}: "
                f"{partition.interval_text(empty[0])}): they could never train. {advice}"
            )

    @property
    def trained_experts(self) -> list[int]:
        return list(range(self.partition.num_stages)) if self.args.expert_index is None else [self.args.expert_index]

    def _shape(self, expert: int) -> dict:
        if self.args.model_config is not None:  # its widths, or the expert's own (a budget plan's)
            shape = unet_shape_kwargs(self.args)
            widths = self.args.expert_block_out_channels
            return shape if widths is None else {**shape, "block_out_channels": tuple(widths[expert])}
        # MEME presets: iU-Nets, convolution-heavy near the data, attention-heavy toward the noise
        shape = scratch_shape(self.args)
        widths = self.args.expert_block_out_channels or tuple(shape["block_out_channels"])
        try:
            configs = meme_expert_configs(
                num_experts=self.partition.num_stages, block_out_channels=widths,
                attention_shares=self.args.expert_attention_shares, layers_per_block=shape["layers_per_block"],
                attention_head_dim=shape["attention_head_dim"], norm_num_groups=shape["norm_num_groups"],
                dropout=shape["dropout"],
            )  # fmt: skip
        except ValueError as error:  # named by the options that gave the values, not the library's arguments
            width_option = "expert_block_out_channels" if self.args.expert_block_out_channels else "block_out_channels"
            options = {"attention_shares": "--expert_attention_shares", "block_out_channels": f"--{width_option}"}
            raise renamed_arguments(error, options) from None
        return configs[expert]

    @property
    def downsampling(self):
        if self.source is not None:
            return max(self.source.config_downsampling(_source_folder(i)) for i in self.trained_experts)
        return max(_unet_downsampling(self._shape(i)) for i in self.trained_experts)

    def build_networks(self, in_channels, sample_size, num_class_embeds):
        if self.source is not None:  # the training loop has checked the data against them (`check_data`)
            # strictly, only the experts trained; fp32 master weights whatever the folder stores
            source = ExpertRoutingModel.from_pretrained(
                self.source.path, subfolder="experts", load_experts=self.trained_experts, torch_dtype=torch.float32
            )
            return {expert_folder(i): source.experts[i] for i in self.trained_experts}
        networks = {}
        for i in self.trained_experts:
            contract = {"sample_size": sample_size, "in_channels": in_channels, "out_channels": in_channels,
                        "num_class_embeds": num_class_embeds}  # fmt: skip
            if self.args.model_config is not None:  # one `UNet2DModel` config for every expert
                unet = self._script_config(
                    self._shape(i), num_train_timesteps=self.args.num_train_timesteps, **contract
                )
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
        return ExpertRoutingPipeline(
            experts=self._routing_model(networks), scheduler=scheduler, vae=vae, id2label=self.id2label
        )

    def no_sampler_reason(self):
        return (
            "one expert alone does not sample: gather the runs of every expert with `--assemble_experts` "
            "(examples/experts/README.md), whose pipeline draws a sample grid"
        )

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
            names = {"id2label": self.id2label} if self.id2label else {}  # the assembled pipeline's class names
            json.dump({"expert_index": self.args.expert_index, "prediction_type": self.args.prediction_type,
                       **self.partition.to_config(), **names}, f, indent=2)  # fmt: skip

    def saved_class_names(self):
        if self.args.expert_index is None:
            return super().saved_class_names()
        return (
            f"and the run saves the data's (in its {EXPERT_RUN_FILE}): `--assemble_experts` with it as the base "
            "refuses them (to put the expert back, train on data of the source's class names)"
        )

    def usage(self, repo_id):
        if self.args.expert_index is None:
            return super().usage(repo_id)
        # one expert alone holds no pipeline: load the expert; to sample, download every expert's run and assemble them
        index, cls = self.args.expert_index, self._expert_class(self.args.expert_index)
        # a fine-tuned expert goes back into its source pipeline (given first), the source's other experts kept
        runs = (
            "<the runs' folders>"
            if self.source is None
            else f"<{shared_name(self.source.path)}'s folder> <this run's folder>"
        )
        fetched = "each expert's run" if self.source is None else "this run and its source pipeline"
        return [
            f"from {'diffusers' if cls == 'UNet2DModel' else 'diffusers_stages'} import {cls}",
            "from huggingface_hub import snapshot_download",
            "",
            f"# expert {index} of {self.partition.num_stages} (stage {index} above) alone does not sample:",
            f'expert = {cls}.from_pretrained("{repo_id}", subfolder="{expert_folder(index)}")',
            f"# download {fetched}, then gather them into one pipeline with",
            f"# `python examples/experts/train_experts.py --assemble_experts {runs} --output_dir <folder>`",
            f'run = snapshot_download("{repo_id}", allow_patterns=["*.json", "*.safetensors"])',
        ]

    def description(self):
        what = "all experts in one run" if self.args.expert_index is None else f"expert {self.args.expert_index} only"
        assignment = self.args.assignment
        if assignment == "soft":
            p = self.probabilities or "MEME's (0.8, 0.4, 0.2, 0.1)"
            assignment = f"soft (own-interval probability {p})"
        shares = "" if self.args.stage_shares is None else f", {shares_text(self.args.stage_shares)}"
        return (
            "Independent denoisers, one per interval of the noise schedule (MEME, Lee et al., AAAI 2024), trained "
            f"with {assignment} interval assignment, {what}{shares}. {self._architecture()}\n\n" + self._stage_table()
        )

    def _expert_class(self, expert: int) -> str:
        """The class name of expert ``expert`` (one this run trains)."""
        if self.source is not None:
            return self.source.configs[_source_folder(expert)]["_class_name"]
        return "UNet2DModel" if self.args.model_config is not None else "IUNet2DModel"

    def _architecture(self) -> str:
        if self.source is not None:
            classes = ", ".join(self._expert_class(i) for i in self.trained_experts)
            return f"Fine-tuned from `{shared_name(self.source.path)}` (ExpertRoutingPipeline); experts trained: {classes}."
        if self.args.model_config is not None:
            widths = self.args.expert_block_out_channels
            own = (
                ""
                if widths is None
                else f", with block widths {', '.join(str(list(w)) for w in widths)} (clean first)"
            )
            return f"Every expert is the `UNet2DModel` of `--model_config`{own}."
        shares = ", ".join(f"{self._shape(i)['attention_ratios']:g}" for i in range(self.partition.num_stages))
        return f"Experts: iU-Nets (`IUNet2DModel`) with attention shares {shares} (clean expert first)."


EXPERT_RUN_FILE = "expert_run.json"


def _source_folder(expert: int) -> str:
    """The folder of expert ``expert`` in an `ExpertRoutingPipeline` folder (its `experts` component's sub-folder)."""
    return f"experts/{expert_folder(expert)}"


EXPERT_CLASSES = {cls.__name__: cls for cls in (IUNet2DModel, UNet2DModel)}  # what `train_experts.py` trains


def _load_expert(run: str, index: int) -> ModelMixin:
    """Expert ``index`` of an `--expert_index` run, with the class named in its `config.json`."""
    folder = _run_folder(run, expert_folder(index))
    try:
        name = UNet2DModel.load_config(folder).get("_class_name")
        if not isinstance(name, str) or name not in EXPERT_CLASSES:  # read from a folder: anything
            raise ValueError(
                f"`--assemble_experts`: {folder!r} holds a {name}, not one of the experts this script trains "
                f"({sorted(EXPERT_CLASSES)})."
            )
        return load_strictly(EXPERT_CLASSES[name], folder)
    except OSError as error:  # a file missing: diffusers' message names neither the option nor the run
        raise ValueError(f"`--assemble_experts`: {error} Is {run!r} a complete `--expert_index` run?") from None


def assemble_expert_runs(run_dirs: list[str]) -> ExpertRoutingPipeline:
    """Gather the experts of one-expert-per-run folders into an `ExpertRoutingPipeline`: runs of every expert
    (scheduler and VAE of the first run), or a saved `ExpertRoutingPipeline` folder first (the base) and runs that
    replace the experts they hold (the base's other experts, scheduler, VAE and class names are kept). Refuses runs
    whose partitions, prediction types, schedulers, VAEs or class names differ (from the base's, or from one
    another's without a base), or that miss (without a base) or repeat an expert."""
    base = assembly_base(run_dirs)
    runs = [(run, _read_run(run)) for run in (run_dirs if base is None else run_dirs[1:])]
    # the class names each folder gives, with the file that holds them (runs before it saved none)
    named = [(run, info["id2label"], os.path.join(run, EXPERT_RUN_FILE)) for run, info in runs if info.get("id2label")]
    if base is not None:  # its configs only (no weights yet): every run is checked against them
        expected, base_names = _read_base(base)
        if base_names:  # the base's class names, if it has them, are the runs'
            named.insert(0, (base, base_names, os.path.join(base, PIPELINE_INDEX)))
    for run, id2label, _ in named[1:]:
        _check_same_class_names(named[0][1], id2label, run, named[0][0])
    shared = [{k: v for k, v in info.items() if k not in ("expert_index", "id2label")} for _, info in runs]
    if base is not None:
        _check_runs_fit_base(base, expected, runs, shared)
        shared = [expected]
    elif any(s != shared[0] for s in shared):
        raise ValueError(
            f"`--assemble_experts`: the runs were trained with different stage splits or targets: {shared}."
        )
    partition = TimestepPartition.from_config(shared[0])
    indices = sorted(info["expert_index"] for _, info in runs)
    if base is None and indices != list(range(partition.num_stages)):
        raise ValueError(
            f"`--assemble_experts` needs one run per expert 0..{partition.num_stages - 1}, got experts {indices}."
        )
    if base is not None:  # strictly, as any ExpertRoutingPipeline folder: the experts no run replaces only
        kept = [i for i in range(partition.num_stages) if i not in indices]
        experts = _load_base(base, ExpertRoutingModel.from_pretrained, subfolder="experts", load_experts=kept,
                             torch_dtype=torch.float32)  # fmt: skip
        # its class names are checked once the experts are assembled (they need a loaded expert)
        pipeline = _load_base(base, ExpertRoutingPipeline.from_pretrained, experts=experts, id2label=None,
                              torch_dtype=torch.float32)  # fmt: skip
        reference, scheduler, vae, others = base, pipeline.scheduler, pipeline.vae, runs
        experts = list(experts.experts)
    else:
        reference, others = runs[0][0], runs[1:]
        scheduler, vae = _load_run_scheduler(reference), _load_run_vae(reference)
        experts = [None] * partition.num_stages
    for run, _ in others:  # experts replace one another mid-trajectory: one noise schedule, one latent space
        _check_same_schedule(scheduler, _load_run_scheduler(run), run, reference)
        _check_same_latent_space(vae, _load_run_vae(run), run, reference)
    for run, info in runs:
        experts[info["expert_index"]] = _load_expert(run, info["expert_index"])
    try:
        model = ExpertRoutingModel(experts, prediction_type=shared[0]["prediction_type"], **partition.to_config())
    except ValueError as error:  # the experts' contract: sizes, channels, classes
        fix = (
            f"Fine-tune from {base!r} on the same data, `--resolution` (and `--vae_path`) and `--class_conditional`."
            if base is not None
            else "Train every expert's run on the same data, `--resolution` (and `--vae_path`) and with the same "
            "`--class_conditional`."
        )
        raise ValueError(f"`--assemble_experts`: {error} {fix}") from None
    pipeline = ExpertRoutingPipeline(experts=model, scheduler=scheduler, vae=vae)
    if named:  # read from a folder: a refusal names the file
        try:
            pipeline.register_class_names(named[0][1])
        except ValueError as error:
            raise ValueError(f"`--assemble_experts`: {named[0][2]!r}: {error}") from None
    return pipeline


PIPELINE_INDEX = "model_index.json"  # what marks a saved pipeline folder, the base of an assembly


def assembly_base(folders: Sequence[str]) -> str | None:
    """The base of `--assemble_experts` ``folders``: the first folder when it is a saved pipeline (it holds a
    `model_index.json`), whose experts the runs after it replace; None without one. A pipeline folder anywhere else,
    or with no run after it, is refused by name."""
    pipelines = [i for i, folder in enumerate(folders) if os.path.isfile(os.path.join(folder, PIPELINE_INDEX))]
    both = [folders[i] for i in pipelines if os.path.isfile(os.path.join(folders[i], EXPERT_RUN_FILE))]
    if both:  # an output folder reused by another kind of run keeps the files the later save did not replace
        raise ValueError(
            f"`--assemble_experts`: {both[0]!r} holds both a saved pipeline ({PIPELINE_INDEX}) and an `--expert_index` "
            f"run ({EXPERT_RUN_FILE}), so it cannot be told which it is: one was left there by an earlier run. Delete "
            "the stale one, or give each run and the base pipeline an `--output_dir` of its own."
        )
    later = [folders[i] for i in pipelines if i > 0]
    if later:
        what = "a second saved pipeline folder" if pipelines[0] == 0 else "a saved pipeline folder but not the first"
        raise ValueError(
            f"`--assemble_experts`: {later[0]!r} is {what}: only the first folder may be an ExpertRoutingPipeline "
            "(the base, whose experts the runs after it replace); the others must be `--expert_index` runs."
        )
    if not pipelines:
        return None
    if len(folders) == 1:
        raise ValueError(
            f"`--assemble_experts`: {folders[0]!r} is a saved pipeline folder with no run after it: give the "
            "`--expert_index` runs whose experts replace its own after it."
        )
    return folders[0]


def _read_run(run: str) -> dict:
    """The `expert_run.json` of a finished `--expert_index` run, its entries checked."""
    path = os.path.join(run, EXPERT_RUN_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"`--assemble_experts`: {run!r} is neither a finished `--expert_index` run (no {EXPERT_RUN_FILE}) nor, "
            f"as the first folder, a saved ExpertRoutingPipeline (no {PIPELINE_INDEX})."
        )
    info = read_json(path, "--assemble_experts")
    missing = [
        key for key in ("expert_index", "prediction_type", *TimestepPartition([]).to_config()) if key not in info
    ]
    if missing:
        raise ValueError(
            f"`--assemble_experts`: {path!r} lacks {missing}: it was not written by an `--expert_index` run of "
            "train_experts.py, or was edited since."
        )
    if isinstance(info.get("expert_index"), bool) or not isinstance(info.get("expert_index"), int):
        raise ValueError(
            f"`--assemble_experts`: `expert_index` of {path!r} must be an integer, got {info.get('expert_index')!r}."
        )
    try:  # read from a folder: the stage split and target as the experts' container checks them
        TimestepPartition.from_config(info)
        if not isinstance(info["prediction_type"], str) or info["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {info['prediction_type']!r}.")
    except ValueError as error:
        raise ValueError(f"`--assemble_experts`: {path!r}: {error}") from None
    return info


def _read_base(base: str) -> tuple[dict, object]:
    """The stage split and target of the base pipeline (as a run's `expert_run.json` holds them) and its class names
    (`id2label` of its `model_index.json`, None without), from its configs only."""
    index = read_json(os.path.join(base, PIPELINE_INDEX), "--assemble_experts")
    try:  # the package's allow-list: nothing the folder names is imported
        resolve_pipeline_class(ExpertRoutingPipeline, index.get("_class_name"))
    except ValueError as error:
        raise ValueError(
            f"`--assemble_experts`: the first folder {base!r} is a saved pipeline ({PIPELINE_INDEX}) but not the "
            f"ExpertRoutingPipeline whose experts the runs after it would replace: {error}"
        ) from None
    container = _load_base(base, ExpertRoutingModel.from_pretrained, subfolder="experts", load_experts=[])
    expected = {"prediction_type": container.config.prediction_type, **container.partition.to_config()}
    return expected, index.get("id2label")


def _load_base(base: str, loader: Callable, **kwargs):
    """``loader(base, **kwargs)`` (a strict loader of the package: nothing in the folder is run), any refusal a
    `ValueError` naming `--assemble_experts` and the base."""
    try:
        return loader(base, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"`--assemble_experts`: the base pipeline {base!r} (the first folder, a saved pipeline) does not load as "
            f"an ExpertRoutingPipeline: {error}"
        ) from None


def _check_runs_fit_base(base: str, expected: dict, runs: list[tuple[str, dict]], shared: list[dict]) -> None:
    """Refuse a run trained with another stage split or target (``shared``: each run's) than the base's
    (``expected``), of an expert the base does not have, or of an expert another run gives too."""
    num_experts = TimestepPartition.from_config(expected).num_stages
    given = {}
    for (run, info), settings in zip(runs, shared):
        if settings != expected:
            raise ValueError(
                f"`--assemble_experts`: {run!r} was trained with another stage split or target than the base "
                f"pipeline {base!r} ({settings}, not {expected}): fine-tune its experts with `--expert_index` and "
                f"`--pretrained_model_name_or_path {base}`."
            )
        index = info["expert_index"]
        if not 0 <= index < num_experts:
            raise ValueError(
                f"`--assemble_experts`: {run!r} holds expert {index}, but the base pipeline {base!r} has "
                f"{num_experts} experts (0..{num_experts - 1})."
            )
        if index in given:
            raise ValueError(
                f"`--assemble_experts`: two runs of expert {index}: {given[index]!r} and {run!r}; give one of them (the "
                f"experts no run gives are those of {base!r})."
            )
        given[index] = run


def _check_same_class_names(expected, id2label, run: str, first: str) -> None:
    """Refuse ``run``'s class names (its `id2label`) unless they are those of the run (or base pipeline) ``first``
    (``expected``), naming the first class whose names differ."""
    if id2label == expected:
        return
    where = ""
    if isinstance(expected, dict) and isinstance(id2label, dict):
        key = next(k for k in sorted({*expected, *id2label}, key=str) if expected.get(k) != id2label.get(k))
        where = f" (class {key}: {id2label.get(key)!r}, not {expected.get(key)!r})"
    raise ValueError(
        f"`--assemble_experts`: {run!r} was trained on other class names (`id2label` of {EXPERT_RUN_FILE}) than "
        f"{first!r}{where}. Train every expert's run on the same data."
    )


def _load_run_scheduler(run: str) -> SchedulerMixin:
    """The scheduler an `--expert_index` run saved: only a class diffusers exports (the folder is hostile input)."""
    scheduler_path = _run_folder(run, "scheduler")
    name = DDPMScheduler.load_config(scheduler_path).get("_class_name")
    scheduler_class = exported_class(name, SchedulerMixin, (diffusers,))
    if scheduler_class is None:
        raise ValueError(
            f"`--assemble_experts`: `_class_name` {name!r} of {scheduler_path!r} is not a diffusers scheduler."
        )
    return load_scheduler(scheduler_class, scheduler_path, "`--assemble_experts`")


def _load_run_vae(run: str) -> diffusers.AutoencoderKL | None:
    """The VAE of a latent-space run, None for a pixel-space one."""
    if not os.path.lexists(os.path.join(run, "vae")):
        return None
    return load_strictly(diffusers.AutoencoderKL, _run_folder(run, "vae"))


def _run_folder(run: str, name: str) -> str:
    """The folder ``name`` of a run, which must be a directory inside it (a missing one would send diffusers'
    loaders to the Hub with its path as a repository id)."""
    try:
        return component_folder(run, name)
    except ValueError as error:
        raise ValueError(f"`--assemble_experts`: {error} Is {run!r} a complete `--expert_index` run?") from None


def _check_same_schedule(scheduler: SchedulerMixin, other: SchedulerMixin, run: str, first: str) -> None:
    """Refuse a run trained on another noise schedule than the first run's (`training_schedule_differences`): the
    pipeline samples every expert with the first run's scheduler, whose sampling-only options are then used."""
    differ = training_schedule_differences(scheduler, other)
    if differ:
        raise ValueError(
            f"`--assemble_experts`: {run!r} was trained on another noise schedule than {first!r} ({differ} differ): "
            "the experts share one schedule, so train every expert with the same `--ddpm_beta_schedule`, "
            "`--num_train_timesteps` and `--prediction_type`."
        )


def _check_same_latent_space(vae, other, run: str, first: str) -> None:
    """Refuse a run in another space than the first run's (pixels, or another VAE's latents): the pipeline decodes
    every expert's samples with the first run's VAE."""
    if (vae is None) != (other is None):
        spaces = ("pixels", "a VAE's latents") if other is None else ("a VAE's latents", "pixels")
        raise ValueError(
            f"`--assemble_experts`: {run!r} was trained on {spaces[0]} and {first!r} on {spaces[1]}: the experts must "
            "share one space (one VAE, or none)."
        )
    if vae is not None:
        try:
            check_same_vae(vae, other, run)
        except ValueError as error:
            raise ValueError(f"`--assemble_experts`: {error}") from None
