"""The `diffusers-stages` command: one entry point with subcommands, in the style of `accelerate` and `hf`.

```bash
diffusers-stages demo                              # the main job: plan, train, sample and score on sklearn digits
diffusers-stages plan --train_data_dir ./images    # stage boundaries from your data (= diffusers-stages-plan)
diffusers-stages switch --pipeline ./dual          # the dual-backbone switch (= diffusers-stages-switch)
diffusers-stages convert unet_to_multistage ...    # a conversion script (= python -m diffusers_stages.conversion.X)
diffusers-stages <command> --help                  # that command's own options
```

Every subcommand hands its remaining arguments to the ``main(argv)`` of its module, so the older entry points
(`diffusers-stages-plan`, `diffusers-stages-switch`, ``python -m diffusers_stages.<module>``) keep working unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

PROG = "diffusers-stages"


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``entry`` function takes ``argv``, and one line of help."""

    module: str
    help: str
    entry: str = "main"

    def run(self, prog: str, argv: list[str]) -> int:
        entry: Callable = getattr(importlib.import_module(self.module), self.entry)
        with _program_name(prog):
            status = entry(argv)
        return status if isinstance(status, int) else 0


COMMANDS = {
    "demo": Command(
        "diffusers_stages.demo",
        "the main job on sklearn digits (no download): plan stages, train a UNet2DModel baseline (its training "
        "FLOPs are the budget B) and the three methods (multi-stage U-Net on B, shallow backbone on B/4, experts on "
        "B/2), sample, score (FD-classifier), write pipelines, grids, a plot and REPORT.md",
    ),
    "plan": Command(
        "diffusers_stages.plan",
        "stage boundaries (and decoder widths) from your training images, Zhang et al.'s optimal-denoiser method",
    ),
    "switch": Command(
        "diffusers_stages.switch", "recommend a dual-backbone switch point from measured denoising errors", "cli"
    ),
}
CONVERSIONS = {
    "unet_to_multistage": "a UNet2DModel / DDPM / DDIM / LDM folder -> MultiStagePipeline (decoders copy the up path); "
    "a Stable Diffusion (XL) folder -> the same pipeline with a staged unet",
    "multistage_to_unet": "one stage of a MultiStagePipeline -> a plain UNet2DModel (of a staged Stable Diffusion "
    "unet: a UNet2DConditionModel)",
    "original_multistage": "a checkpoint of the authors' multi-stage code (LDM fork) -> MultiStagePipeline",
    "original_multistage_edm": "a checkpoint of the authors' EDM multi-stage model -> MultiStagePipeline",
    "original_multistage_ncsnpp": "a checkpoint of the authors' score_sde NCSN++ multi-stage model -> MultiStagePipeline",
    "pipelines_to_experts": "several single-model pipelines -> ExpertRoutingPipeline or DualBackbonePipeline",
}


@contextlib.contextmanager
def _program_name(prog: str) -> Iterator[None]:
    """Usage and error lines of a delegated parser name the subcommand (argparse reads ``sys.argv[0]``)."""
    saved = sys.argv[0] if sys.argv else ""
    if not sys.argv:
        sys.argv.append(saved)
    sys.argv[0] = prog
    try:
        yield
    finally:
        sys.argv[0] = saved


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` of the package's commands: the description as written (its example commands stay runnable when
    copied), and each option's default where it has one that its help does not state itself (no `(default: None)`
    beside an option whose help says what it defaults to, or that has none)."""

    def _format_action(self, action: argparse.Action) -> str:
        off = action.default is None or action.default is False or action.default == argparse.SUPPRESS  # (0 is shown)
        if not action.help and action.option_strings and not off:
            action = copy.copy(action)  # argparse shows a default only beside a help text
            action.help = "Default: %(default)s."
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def check_input_file(path: str | None, option: str, json_object: bool = False) -> None:
    """Refuse, before any work, an input file that is missing, not a file, unreadable, or (``json_object``) not a JSON
    object: a `ValueError` naming ``option`` and the path."""
    if path is None:
        return
    if os.path.isdir(path):  # e.g. a model folder, as the training scripts' `--model_config` takes one
        raise ValueError(f"`{option}` {path!r} {_config_file_hint(path)}")
    if not os.path.isfile(path):
        raise ValueError(f"`{option}` {path!r} is not a file.")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f) if json_object else f.read(1)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"`{option}` {path!r} cannot be read: {type(error).__name__}: {error}") from None
    if json_object and not isinstance(loaded, dict):
        raise ValueError(f"`{option}` {path!r} holds JSON but not an object (a config): {type(loaded).__name__}.")


def _config_file_hint(folder: str) -> str:
    """What to give instead of ``folder`` where a config file is asked: its ``config.json``, or those of the models
    of a pipeline folder."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return f"is a folder: give its config.json ({os.path.join(folder, 'config.json')})."
    configs = sorted(os.path.join(folder, name, "config.json") for name in os.listdir(folder)
                     if os.path.isfile(os.path.join(folder, name, "config.json")))  # fmt: skip
    if os.path.isfile(os.path.join(folder, "model_index.json")) and configs:
        return f"is a pipeline folder: give the config.json of one of its models ({', '.join(configs)})."
    return "is a folder, not a file."


def refuse_empty_folder(path: str, option: str) -> None:
    """An empty folder path is a `ValueError` naming ``option``: it names no folder (joined with a file name, it
    reads the current folder's file)."""
    if path == "":
        raise ValueError(f"`{option}` must name a folder, got ''.")


def check_model_folder(path: str, option: str) -> None:
    """Refuse, before any work, a model folder without a readable ``config.json`` (`check_input_file`) or a pipeline
    folder given for one of its models (`refuse_pipeline_folder`)."""
    refuse_empty_folder(path, option)
    refuse_pipeline_folder(path, option)
    check_input_file(os.path.join(path, "config.json"), option, json_object=True)


def refuse_folder_of_folders(path: str, option: str, file: str) -> None:
    """A folder without ``file`` whose sub-folders hold one (a one-backbone training run: ``shallow/``,
    ``scheduler/``) is a `ValueError` naming ``option`` and the sub-folders to give instead."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, file)):
        return
    inner = sorted(os.path.join(path, name) for name in os.listdir(path)
                   if os.path.isfile(os.path.join(path, name, file)))  # fmt: skip
    if len(inner) == 1:
        raise ValueError(f"`{option}` {path!r} holds no {file}, but its sub-folder {inner[0]} holds one: give it.")
    if inner:
        raise ValueError(
            f"`{option}` {path!r} holds no {file}, but its sub-folders do: give one of {', '.join(inner)}."
        )


def refuse_pipeline_folder(path: str, option: str) -> None:
    """A pipeline folder (``model_index.json``, no ``config.json``) given for one of its models is a `ValueError`
    naming ``option`` and the folders of its models."""
    if not os.path.isfile(os.path.join(path, "model_index.json")) or os.path.exists(os.path.join(path, "config.json")):
        return
    models = sorted(os.path.join(path, name) for name in os.listdir(path)
                    if os.path.isfile(os.path.join(path, name, "config.json")))  # fmt: skip
    raise ValueError(
        f"`{option}` {path!r} is a pipeline folder: give the folder of one of its models ({', '.join(models)})."
    )


def check_seed(seed: int, option: str = "--seed") -> None:
    """Refuse, before any work, a seed outside [0, 2**32): what the training loop's seeding (NumPy's) accepts, and
    every command takes the same (torch's generators overflow past 64 bits). A `ValueError` naming ``option`` and
    the value."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"`{option}` must be in [0, 2**32), got {seed}.")


def check_output_file(path: str | os.PathLike | None, option: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: a folder (existing, or a path ending in a
    separator), or a folder part that is a file (the missing folders are created when writing). A `ValueError` naming
    ``option`` and the path."""
    if path is None:
        return
    path = os.fspath(path)  # a `pathlib.Path` too, as the writes take
    if path == "" or path.endswith(("/", os.sep)) or os.path.isdir(path):  # "new/": a folder, even before it exists
        raise ValueError(f"`{option}` {path!r} is a folder (or empty): give a file path.")
    parent = existing_ancestor(path)
    if not is_writable_folder(parent):
        raise ValueError(f"`{option}` {path!r} cannot be written: {parent!r} is not a writable folder.")


# file extensions of image formats other than PNG (matplotlib's and Pillow's common ones): a plot path ending in one
# would hold PNG bytes under another format's name
OTHER_IMAGE_EXTENSIONS = frozenset(
    ".bmp .eps .gif .jpeg .jpg .pdf .pgf .ps .raw .rgba .svg .svgz .tif .tiff .webp".split()
)


def check_png_path(path: str | os.PathLike | None, option: str) -> None:
    """Refuse, before any work, a path for a PNG plot whose extension names another image format (``plot.pdf``): a
    `ValueError` naming ``option`` and the path. A ``.png`` path (any case) or one without such an extension is
    taken."""
    if path is None:
        return
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension in OTHER_IMAGE_EXTENSIONS:
        raise ValueError(
            f"`{option}` {os.fspath(path)!r} names a {extension} file, but the plot is a PNG: give a .png path."
        )


def existing_ancestor(path: str | os.PathLike) -> str:
    """The nearest folder above ``path`` (made absolute) that exists, or a file there: what must take the folders
    that writing ``path`` creates."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def is_writable_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that files and folders can be created in (writable and searchable)."""
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def make_parent_folder(path: str | os.PathLike) -> str | os.PathLike:
    """Create the folders of an output file path (see `check_output_file`); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> str | os.PathLike:
    """Write the file ``path`` with ``write(temporary path)`` beside it, then rename it into place: a failed or
    interrupted write leaves no half file, and a file already at ``path`` as it was. Its folders are created."""
    partial = f"{make_parent_folder(path)}.partial-{os.getpid()}"
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.lexists(partial):
            os.remove(partial)
    return path


def load_saved_folder(path: str, option: str, scheduler: bool = False):
    """A saved model folder (``config.json``) or, with ``scheduler``, a scheduler folder (``scheduler_config.json``),
    loaded with the class its config names: one of diffusers-stages' models or a diffusers class (no code is run from
    the folder). Anything else is a `ValueError` naming ``option`` and the path."""
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    import diffusers_stages

    from .models.loading import exported_class, load_scheduler, load_strictly

    refuse_empty_folder(path, option)
    config_file = os.path.join(path, "scheduler_config.json" if scheduler else "config.json")
    if not scheduler:
        refuse_pipeline_folder(path, option)  # (it names the models of a pipeline folder)
    refuse_folder_of_folders(path, option, os.path.basename(config_file))
    if scheduler:
        check_input_file(config_file, option, json_object=True)
    else:
        check_model_folder(path, option)
    with open(config_file, encoding="utf-8") as f:
        name = json.load(f).get("_class_name")
    cls = exported_class(name, SchedulerMixin if scheduler else ModelMixin, (diffusers_stages, diffusers))
    if cls is None:
        kind = "a diffusers scheduler" if scheduler else "a diffusers or diffusers-stages model"
        raise ValueError(f"`{option}` {path!r}: `_class_name` {name!r} of {config_file!r} is not {kind}.")
    return load_scheduler(cls, path, f"`{option}` {path!r}") if scheduler else load_strictly(cls, path)


def _version() -> str:
    """This package's version and those of the two it runs on (as installed: nothing is imported for it)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"{PROG} {__version__} (diffusers {installed('diffusers')}, torch {installed('torch')})"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: it only names the subcommands (each parses its own arguments)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Stage-wise diffusion models for diffusers: multi-stage U-Nets, expert routing, dual backbone.",
        epilog="conversions (diffusers-stages convert <name> --help):\n"
        + "\n".join(f"  {name:<25} {text}" for name, text in CONVERSIONS.items())
        + f"\n\nStart with `{PROG} demo`; `{PROG} <command> --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version(), help="show the versions and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, command in COMMANDS.items():
        subparsers.add_parser(name, help=command.help, add_help=False)
    subparsers.add_parser("convert", help="convert checkpoints: `convert <name> ...` (names below)", add_help=False)
    return parser


def convert(argv: list[str]) -> int:
    """`diffusers-stages convert <name> ...`: run ``diffusers_stages.conversion.<name>`` on the remaining arguments."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} convert",
        description="Convert checkpoints; each conversion takes its own options (`convert <name> --help`).",
    )
    parser.add_argument("name", choices=sorted(CONVERSIONS), help="the conversion script")
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv)  # --help, or a usage error naming the choices
    parser.parse_args(argv[:1])
    module = importlib.import_module(f"diffusers_stages.conversion.{argv[0]}")
    from diffusers_stages.conversion.common import run

    with _program_name(f"{PROG} convert {argv[0]}"):
        run(module.main, module.parse_args, argv[1:])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``diffusers-stages <command> [args]`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    command, rest = argv[0], argv[1:]
    if command == "convert":
        return convert(rest)
    if command == "train":  # a natural guess: training is the example scripts' (a checkout's `examples/`)
        choices = ", ".join(repr(name) for name in (*COMMANDS, "convert"))
        parser.error(
            f"argument <command>: invalid choice: 'train' (choose from {choices}): training runs through the example "
            "scripts of a checkout, `accelerate launch examples/multistage/train_multistage.py ...` (also "
            "examples/experts/train_experts.py and examples/dual_backbone/train_dual_backbone.py; README, Training "
            "with Accelerate)."
        )
    if command not in COMMANDS:
        parser.parse_args(argv[:1])  # --help or -h print the help; anything else is a usage error
        return 2
    return COMMANDS[command].run(f"{PROG} {command}", rest)


if __name__ == "__main__":
    sys.exit(main())
