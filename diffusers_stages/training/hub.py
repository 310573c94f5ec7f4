"""Model card and Hub upload of a training run's output folder (checkpoints, logs and sample history left out)."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from types import SimpleNamespace
from typing import TYPE_CHECKING

from accelerate.utils import broadcast_object_list
from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
from huggingface_hub import ModelCard, ModelCardData, create_repo
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id

from ..conventions import num_data_classes
from ..hub import check_upload_folder, error_summary
from ..pipelines.pipeline_staged import label_ids
from .args import hub_repo_name
from .checkpointing import PIPELINE_NEW, PIPELINE_OLD, PIPELINE_PARTIAL

if TYPE_CHECKING:
    from accelerate import Accelerator
    from huggingface_hub import HfApi

# checkpoints and their leftovers, logs, the sample history, and the temporary folders of a pipeline save (one a
# failed deletion left behind holds a whole pipeline: `publish_pipeline`)
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    ".checkpoint-*",
    "logs/*",
    "samples/*",
    *(f"{folder}/*" for folder in (PIPELINE_PARTIAL, PIPELINE_NEW, PIPELINE_OLD)),
    "*.pkl",
    "*.bin",
]
MODEL_CARD_TODO_START = "## Intended uses & limitations"
# the package is not on a package index: a card says how to install it from its repository
INSTALL_TEXT = (
    "diffusers-stages is not on a package index: install it from a clone of its repository "
    "(`pip install .` in the clone's root folder), then:"
)


def generation_tag(class_conditional: bool) -> str:
    """The card's task tag: a model with class embeddings (``num_class_embeds``) is not unconditional."""
    return "class-conditional-image-generation" if class_conditional else "unconditional-image-generation"


def shared_name(source: str | os.PathLike) -> str:
    """How a model card names a source the run read (a fine-tuned pipeline, a VAE, the base of an assembly): a Hub
    repository id as it was given; a local folder by its name only, as the card names the data. The card is
    published: a path on the training machine (a user name, a project) would be too, and loads nothing for the
    card's reader."""
    source = os.fspath(source)
    return os.path.basename(os.path.normpath(source)) if os.path.exists(source) else source


def base_model(source: str | None) -> str | None:
    """The card's ``base_model`` of a run that fine-tuned ``source`` (`--pretrained_model_name_or_path`): a Hub
    repository id, as diffusers' training scripts write it (the Hub lists the run under that model); None without a
    source or for a local folder, which is no Hub model (the card's text names it, `shared_name`)."""
    if source is None or os.path.exists(source):
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def stage_table(partition) -> str:
    """A Markdown table of a `TimestepPartition`'s stages and their noise intervals (stage 0 the cleanest)."""
    unit = "t" if partition.units == "timestep" else "sigma"
    rows = [f"| {s} | {partition.interval_text(s)} |" for s in range(partition.num_stages)]
    return f"| stage (0 = cleanest) | {unit} interval |\n| --- | --- |\n" + "\n".join(rows)


class LocalHubApi:
    """The two `huggingface_hub.HfApi` calls a push makes, writing to ``root/<repo_id>`` instead of the Hub.

    Files are chosen by the same `filter_repo_objects` selection `HfApi.upload_folder` uses, so a push tested
    offline uploads exactly what a real one would.

    Example:

    ```py
    >>> import os, tempfile
    >>> from diffusers_stages.training import LocalHubApi, push_output_folder
    >>> with tempfile.TemporaryDirectory() as root:
    ...     run = os.path.join(root, "run")
    ...     os.makedirs(os.path.join(run, "checkpoint-10"))
    ...     for name in ("model_index.json", "checkpoint-10/optimizer.bin"):
    ...         open(os.path.join(run, name), "w").close()
    ...     api = LocalHubApi(os.path.join(root, "hub"))
    ...     pushed = push_output_folder(run, "me/run", "A test run.", [], class_conditional=False, api=api)
    ...     sorted(os.listdir(pushed))  # the model card is written, checkpoints are left out
    ['README.md', 'model_index.json']

    ```
    """

    def __init__(self, root: str):
        self.root = root

    def create_repo(self, repo_id: str, exist_ok: bool = False, private: bool | None = None, token=None, **kwargs):
        validate_repo_id(repo_id)  # as the Hub does: `name` or `namespace/name`, no `..`, no absolute path
        path = os.path.join(self.root, repo_id)
        if os.path.isdir(path) and not exist_ok:
            raise ValueError(f"Repository {repo_id!r} already exists under {self.root!r}.")
        os.makedirs(path, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id, url=path)

    def upload_folder(self, repo_id: str, folder_path: str, ignore_patterns=None, allow_patterns=None, **kwargs):
        files = []
        for root, _, names in os.walk(folder_path):
            files += [os.path.relpath(os.path.join(root, n), folder_path).replace(os.sep, "/") for n in names]
        ignore_patterns = [*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]  # as `HfApi.upload_folder` adds them
        for relative in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            target = os.path.join(self.root, repo_id, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(folder_path, relative), target)
        return os.path.join(self.root, repo_id)


def write_model_card(
    output_dir: str,
    description: str,
    tags: list[str],
    *,
    class_conditional: bool,
    base_model: str | None = None,
) -> str:
    """Write ``output_dir/README.md`` from diffusers' training model card template and ``description``, tagged
    ``class-conditional-image-generation`` or ``unconditional-image-generation`` as ``class_conditional`` says
    (neither for a ``text-to-image`` model), with the Hub model fine-tuned (`base_model`) and the Hub task
    (``pipeline_tag``: ``text-to-image`` or ``unconditional-image-generation``; the Hub has no class-conditional one,
    nor infers one for the package's pipeline classes) in its metadata. The card is always this run's, from the
    template diffusers' training scripts start from: a README the Hub repository already holds (a former run's) is
    replaced, never read."""
    text_to_image = "text-to-image" in tags  # a caption-conditioned model
    pipeline_tag = "text-to-image" if text_to_image else None if class_conditional else generation_tag(False)
    card = ModelCard.from_template(
        card_data=ModelCardData(library_name="diffusers", base_model=base_model, pipeline_tag=pipeline_tag),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    task_tag = [] if text_to_image else [generation_tag(class_conditional)]
    card = populate_model_card(card, tags=["diffusers", "diffusers-stages", *task_tag, *tags])
    # the template's placeholder sections ("TODO: ...") are answered by the description above
    if MODEL_CARD_TODO_START in card.text:
        card.text = card.text.split(MODEL_CARD_TODO_START)[0].rstrip() + "\n"
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


def push_output_folder(
    output_dir: str,
    repo_id: str,
    description: str,
    tags: list[str],
    *,
    class_conditional: bool,
    api: HfApi | LocalHubApi | None = None,
    token: str | None = None,
    private: bool | None = None,
    logging_dir: str | None = None,
    commit_message: str = "End of training",
    base_model: str | None = None,
) -> str:
    """Create the repository, write the model card (``base_model``: the Hub model fine-tuned, see `base_model`) and
    upload ``output_dir`` without checkpoints and logs (those of `--logging_dir` ``logging_dir`` too, a folder
    relative to ``output_dir``). ``private=None``: the namespace's
    default, as in diffusers (``False`` would make the repository public in an organisation that keeps them private)."""
    ignore = list(UPLOAD_IGNORE_PATTERNS)
    if logging_dir is not None:
        relative = os.path.relpath(os.path.join(output_dir, logging_dir), output_dir).replace(os.sep, "/")
        if relative != ".." and not relative.startswith("../"):  # outside the folder: nothing of it is uploaded
            ignore.append(f"{relative}/*")
    check_upload_folder(output_dir, ignore)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    write_model_card(output_dir, description, tags, class_conditional=class_conditional, base_model=base_model)
    try:
        repo_id = api.create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            ignore_patterns=ignore,
            token=token,
        )
    except Exception as error:  # noqa: BLE001 (offline, HTTP 401/403, network errors: all named below)
        excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in ignore)
        raise OSError(
            f"The outputs in {output_dir!r} (and their README.md model card) are complete, but pushing them to the "
            f"Hub repository {repo_id!r} failed ({error_summary(error)}). Upload them later with "
            f"`hf upload {repo_id} {shlex.quote(output_dir)} {excludes}` (after `hf auth login`)."
        ) from error


def model_card_text(
    args: argparse.Namespace,
    task,
    steps: int,
    has_grid: bool,
    *,
    mixed_precision: str,
    repo_id: str | None = None,
    num_processes: int = 1,
) -> str:
    """The model card's description: the method, its stages, how it was trained, how to sample, a sample grid.
    ``mixed_precision`` is what the run used (``accelerator.mixed_precision``: `--mixed_precision`, or else the
    ``accelerate config`` file's), not the command-line argument. ``repo_id``: the repository `create_hub_repo`
    created (``namespace/name``; default `hub_repo_name`), which the card's title and sampling code name.
    ``num_processes``: the processes the run trained on (the batch of a step, and `--scale_lr`'s factor, count them)."""
    repo_id = repo_id or hub_repo_name(args)
    data = args.train_data_dir or args.dataset_name  # `load_dataset` takes a local folder too
    data = data and (os.path.basename(os.path.normpath(data)) if args.train_data_dir else shared_name(data))
    space = f"latent space of `{shared_name(task.vae_path)}`" if task.vae_path else "pixel space"
    total = args.train_batch_size * num_processes * args.gradient_accumulation_steps  # samples per optimisation step
    lines = [
        f"# {repo_id}",
        "",
        f"A **{task.method}** diffusion model trained with diffusers-stages on its Accelerate training scripts.",
        "",
        task.description(),
        "",
        "## Training settings",
        "",
        f"- data: {data}, {args.resolution}x{args.resolution}, {space}"
        + (", class-conditional (last class embedding = unconditional)" if args.class_conditional else ""),
        f"- noise schedule: {_schedule_text(args, task.scheduler_config)}",
        (
            f"- {steps} optimisation steps, batch {args.train_batch_size} per device x {num_processes} "
            f"{'process' if num_processes == 1 else 'processes'} x {args.gradient_accumulation_steps} accumulation "
            f"({total} per step), AdamW lr {args.learning_rate:g}{f' x {total} (`--scale_lr`)' if args.scale_lr else ''} "
            f"({args.lr_scheduler}"
            # diffusers' constant schedule ignores `--lr_warmup_steps` (text-to-image's default 500 included)
            + ("" if args.lr_scheduler == "constant" else f", {args.lr_warmup_steps} warm-up steps")
            + ")"
        ),
        f"- mixed precision: {mixed_precision}, EMA: {'yes' if args.use_ema else 'no'}, seed {args.seed}",
    ]
    return "\n".join(lines + _usage_and_samples(task.usage(repo_id), has_grid))


def assembled_experts_card_text(
    args: argparse.Namespace, pipeline, has_grid: bool, repo_id: str | None = None, base: str | None = None
) -> str:
    """The card of `--assemble_experts`: the method, the experts and their intervals, the assembled runs' shared
    settings, how to sample and the sample grid, as the training runs' cards (``repo_id`` as `model_card_text`;
    ``base``: the pipeline folder whose experts the runs replaced, if any)."""
    repo_id = repo_id or hub_repo_name(args)
    experts = pipeline.experts
    config = experts.expert(0).config
    num_class_embeds = config.get("num_class_embeds")
    size = config.get("sample_size")
    space = f"latent space of a `{type(pipeline.vae).__name__}`" if pipeline.vae is not None else "pixel space"
    parameters = [sum(p.numel() for p in experts.expert(s).parameters()) for s in range(experts.num_stages)]
    lines = [
        f"# {repo_id}",
        "",
        "A **multi-architecture multi-expert** diffusion model (MEME, Lee et al., AAAI 2024) assembled with "
        + (
            f"diffusers-stages from {len(args.assemble_experts)} runs of its Accelerate training script, one "
            "independent denoiser per interval of the noise schedule, each trained in its own run."
            if base is None
            else f"diffusers-stages from the ExpertRoutingPipeline `{shared_name(base)}`, its experts replaced by those of "
            f"{len(args.assemble_experts) - 1} run(s) of its Accelerate training script (one expert each): one "
            "independent denoiser per interval of the noise schedule."
        ),
        "",
        stage_table(experts.partition),
        "",
        "## Settings",
        "",
        "- experts (clean end first): "
        + ", ".join(f"`{type(experts.expert(s)).__name__}` {n / 1e6:.2f}M" for s, n in enumerate(parameters)),
        f"- data: {size}x{size} samples in {space}"
        + (
            f", class-conditional ({num_data_classes(num_class_embeds)} classes + the null label)"
            if num_class_embeds
            else ""
        ),
        f"- noise schedule: `{type(pipeline.scheduler).__name__}`, {pipeline.scheduler.config.num_train_timesteps} "
        f"training steps, prediction type `{experts.config.prediction_type}`",
        f"- sample grid: {args.num_sample_images} samples, {args.num_inference_steps} steps, seed {args.seed} + the "
        "image's index",
    ]
    usage = pipeline_usage(
        "ExpertRoutingPipeline", repo_id, bool(num_class_embeds), first_class_name(pipeline.config.get("id2label"))
    )
    return "\n".join(lines + _usage_and_samples(usage, has_grid))


def first_class_name(id2label: dict[str, str] | None) -> str | None:
    """The name a card samples class 0 by: its first synonym (as DiT's), unless another class has it too (ImageNet's
    "crane"); None: by its index."""
    first = (id2label or {}).get("0", "").split(",")[0].strip()
    return first if first in label_ids(id2label or {}) else None


def pipeline_usage(
    pipeline_class: str, repo_id: str, class_conditional: bool, class_name: str | None = None
) -> list[str]:
    """A card's sampling code (lines) for a folder of the package's ``pipeline_class``; a class-conditional one
    samples class ``class_name`` by its name (the pipeline's `id2label`) where that is plain printable text, else
    class 0."""
    labels = "batch_size=1"
    if class_conditional:
        plain = class_name is not None and class_name.isprintable() and "`" not in class_name  # a data folder's name
        labels = f"class_labels=pipe.get_label_ids([{class_name!r}])" if plain else "class_labels=[0]"
    return [
        f"from diffusers_stages import {pipeline_class}",
        "",
        f'pipe = {pipeline_class}.from_pretrained("{repo_id}")  # runs no code from the repository',
        f"image = pipe({labels}).images[0]",
    ]


def _usage_and_samples(usage: list[str], has_grid: bool) -> list[str]:
    """The card's install text, sampling code ``usage`` and its sample grid."""
    lines = [
        "",
        "## Usage",
        "",
        INSTALL_TEXT,
        "",
        "```python",
        *usage,
        "```",
    ]
    if has_grid:
        lines += ["", "## Samples", "", "![samples](sample_grid.png)"]
    return lines


def _schedule_text(args: argparse.Namespace, source: dict | None) -> str:
    """The noise schedule trained with: a fine-tuned source's scheduler config, else the arguments'."""
    if source is not None:
        kind = f"{source.get('_class_name')}, {source.get('num_train_timesteps')} steps, {source.get('beta_schedule')}"
        return f"{kind}, prediction type `{source.get('prediction_type', 'epsilon')}`"
    kind = (
        "EDM (sigma)"
        if args.boundary_units == "sigma"
        else f"DDPM, {args.num_train_timesteps} steps, {args.ddpm_beta_schedule}"
    )
    return f"{kind}, prediction type `{args.prediction_type}`"


def create_hub_repo(args: argparse.Namespace, accelerator: Accelerator | None = None) -> str:
    """`--push_to_hub`: create (or find) the repository before any training, so that a run that cannot push (offline,
    no token, no right to the namespace) stops before it trains instead of after. The repository is `--hub_model_id`,
    else named after `--output_dir` (`hub_repo_name`, as diffusers' scripts). Returns its id as the Hub gives it
    (``name`` is ``<user>/name``), for the model card.

    Of a run of several processes (``accelerator``) only the main process contacts the Hub, as in diffusers' scripts;
    the others wait for its answer (the repository id, or why it could not be created) and stop with the same
    `ValueError` where it failed. Without ``accelerator`` (one process) it creates the repository itself."""
    repo_id = failure = None
    if accelerator is None or accelerator.is_main_process:
        try:
            repo_id = _create_hub_repo(args)
        except ValueError as error:
            failure = str(error)
    if accelerator is not None and accelerator.num_processes > 1:  # every process joins: the main one answers
        repo_id, failure = broadcast_object_list([repo_id, failure], from_process=0)
    if failure is not None:
        raise ValueError(failure)
    return repo_id


def _create_hub_repo(args: argparse.Namespace) -> str:
    """`create_hub_repo` of one process: the repository id, or a `ValueError` that says why it cannot be created."""
    name = hub_repo_name(args)
    try:
        if args.hub_local_dir:
            return LocalHubApi(args.hub_local_dir).create_repo(name, exist_ok=True).repo_id
        url = create_repo(name, exist_ok=True, private=args.hub_private_repo, token=args.hub_token)
    except Exception as error:  # noqa: BLE001 (offline, HTTP 401/403, network errors: all stop the run here, named)
        flag = "`--hub_model_id`" if args.hub_model_id is not None else "(named after `--output_dir`)"
        raise ValueError(
            f"`--push_to_hub`: cannot create the Hub repository {flag} {name!r} "
            f"({error_summary(error)}). Check the network and `hf auth login` / `--hub_token`, or drop "
            "`--push_to_hub`; nothing was trained."
        ) from None
    return url.repo_id
