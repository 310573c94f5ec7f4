"""The training commands of README.md and examples/*/README.md parse as written: every `examples/*/train_*.py` command
of a bash block (placeholders such as `<same arguments>` or `...` aside) goes through its script's own `parse_args`,
which runs every check that needs no training. The data folder is the README's `./images` (sklearn's digits) whatever
folder a command names, and a command for a GPU (`--mixed_precision fp16`) is checked as on a GPU.

Every other command the READMEs name (benchmarks, conversions, `diffusers-stages ...`, `python -m diffusers_stages...`,
in bash blocks and in inline code) names a script that exists and only options its parser has. README.md's conversions
of diffusers pipelines run as written, on tiny folders of the names they read."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusers_stages.demo.methods import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
BASH = re.compile(r"^[ \t]*```(?:bash|sh|shell)\n(?P<code>.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)  # in lists too
FENCE = re.compile(r"^\s*```.*?^\s*```", re.MULTILINE | re.DOTALL)  # any fenced block (some are indented in lists)
SCRIPT = re.compile(r"(examples/\w+/train_\w+\.py)")
READMES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("examples/*/README.md"))]


def training_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, script, argv)`` of every complete training command in the READMEs' bash blocks."""
    commands = []
    for readme in READMES:
        text = (ROOT / readme).read_text(encoding="utf-8")
        for block in BASH.finditer(text):
            lines = re.sub(r"\\\n\s*", " ", block["code"]).splitlines()  # join continued lines
            for line in lines:
                line = line.split("#")[0].strip()
                match = SCRIPT.search(line)
                if not match or re.search(r"<[^>]+>|\.\.\.|\$|\[", line):
                    continue  # a placeholder, a shell loop variable or optional arguments: not a runnable command
                argv = shlex.split(line[match.end() :])
                where = f"{readme}:{text.count(chr(10), 0, block.start()) + 1}"
                commands.append((where, match[1], argv))
    return commands


def _script(path: str):
    spec = importlib.util.spec_from_file_location(f"readme_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = training_commands()


def test_the_readmes_have_training_commands():
    scripts = {script for _, script, _ in COMMANDS}
    assert {"examples/multistage/train_multistage.py", "examples/experts/train_experts.py",
            "examples/dual_backbone/train_dual_backbone.py"} <= scripts  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The README's `./images`: sklearn's digits as an image folder, written once for every command."""
    digits = load_digits()
    folder = tmp_path_factory.mktemp("readme") / "images"
    return Path(write_image_folder((digits.images * 255 / 16).round().astype(np.uint8), digits.target, str(folder)))


def _write_source(script: str, path: str, resolution: int | None, request) -> None:
    """A tiny pipeline of the class the command fine-tunes: Stable Diffusion's, a `DualBackbonePipeline`, an
    `ExpertRoutingPipeline`, or a converted `MultiStagePipeline`, its pixel networks sized for the command's
    `--resolution` (fine-tuning refuses a resolution its source's networks were not made for)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DModel

    from diffusers_stages import (
        DualBackbonePipeline,
        ExpertRoutingModel,
        ExpertRoutingPipeline,
        MultiStagePipeline,
        MultiStageUNet2DModel,
    )
    from tests.conftest import TINY_UNET

    if resolution is not None:
        TINY_UNET = {**TINY_UNET, "sample_size": resolution}
    if script.endswith("train_text_to_image.py"):
        StableDiffusionPipeline(**request.getfixturevalue("tiny_sd_components")).save_pretrained(path)
    elif script.endswith("train_dual_backbone.py"):
        DualBackbonePipeline(
            shallow=UNet2DModel(**TINY_UNET), deep=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()
        ).save_pretrained(path)
    elif script.endswith("train_experts.py"):
        experts = ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=(500,))
        ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler()).save_pretrained(path)
    else:
        unet = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(442, 631))
        MultiStagePipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)


def _captioned(images: Path, tmp_path: Path) -> Path:
    """The README's `captioned` folder: some of the digits with a metadata.jsonl of `text` captions."""
    folder = tmp_path / "captioned"
    folder.mkdir()
    lines = []
    for index, image in enumerate(sorted(images.glob("*/*.png"))[:8]):
        shutil.copy(image, folder / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "text": f"a digit {image.parent.name}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    return folder


@pytest.mark.parametrize("where, script, argv", COMMANDS, ids=[where for where, _, _ in COMMANDS])
def test_training_command_parses_as_written(where, script, argv, images, tmp_path, monkeypatch, request):
    argv = list(argv)
    monkeypatch.chdir(tmp_path)
    if "--pretrained_model_name_or_path" in argv:  # the pipeline it fine-tunes, in tiny, at the path it names
        resolution = int(argv[argv.index("--resolution") + 1]) if "--resolution" in argv else None
        _write_source(script, argv[argv.index("--pretrained_model_name_or_path") + 1], resolution, request)
    if "--train_data_dir" in argv:
        data = _captioned(images, tmp_path) if script.endswith("train_text_to_image.py") else images
        argv[argv.index("--train_data_dir") + 1] = str(data)
    if "--mixed_precision" in argv and argv[argv.index("--mixed_precision") + 1] == "fp16":
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    args = _script(script).parse_args(argv)
    assert args.output_dir == argv[argv.index("--output_dir") + 1]


def test_every_fp16_command_says_what_a_cpu_runs_instead():
    """The set-up needs no GPU, and fp16 is refused without one: a block with an fp16 training command (under "One
    CPU or one GPU") says what to pass on a CPU."""
    blocks = [(readme, block["code"]) for readme in READMES
              for block in BASH.finditer((ROOT / readme).read_text(encoding="utf-8"))]  # fmt: skip
    fp16 = [(readme, code) for readme, code in blocks if "--mixed_precision fp16" in code]
    assert fp16
    silent = [readme for readme, code in fp16 if "# on a CPU: --mixed_precision bf16 or no instead" not in code]
    assert not silent, silent


# ---------------------------------------------------------------------------------------------------------------
# every command the READMEs name (bash blocks, placeholders included, and inline code): its options exist
COMMAND = re.compile(
    r"(?<![\w/.-])(?P<path>(?:benchmarks|conversion|examples/\w+)/\w+\.py)"
    r"|python -m (?P<module>diffusers_stages(?:\.\w+)+)(?![.\w<])"
    r"|diffusers-stages[ -](?P<command>demo|plan|switch|convert (?P<conversion>\w+))(?![\w-])"
)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*")
# scripts of other projects a README names for comparison, not this repository's
ELSEWHERE = {"examples/unconditional_image_generation/train_unconditional.py"}


def _command_target(match: re.Match) -> tuple[str, str]:
    """``("path", script)`` or ``("module", module)``: what the command runs."""
    from diffusers_stages import cli

    if match["path"]:
        return "path", match["path"]
    if match["module"]:
        return "module", match["module"]
    if match["conversion"]:
        return "module", f"diffusers_stages.conversion.{match['conversion']}"
    return "module", cli.COMMANDS[match["command"]].module


def command_mentions() -> list[tuple[str, tuple[str, str], list[str]]]:
    """``(where, target, options)`` of every command line of the READMEs' bash blocks (a comment line right after a
    command run directly gives more of its options: ``# or --shallow DIR ...``; after `accelerate launch` or `torchrun`
    it names the launcher's) and of every inline code span naming a command (spans may wrap a line)."""
    mentions = []
    for readme in READMES:
        text = (ROOT / readme).read_text(encoding="utf-8")
        for block in BASH.finditer(text):
            line_number = text.count("\n", 0, block.start()) + 2
            last = None
            for line in re.sub(r"\\\n\s*", " ", block["code"]).splitlines():
                match = COMMAND.search(line)
                if match and match["path"] not in ELSEWHERE:
                    mention = (f"{readme}:{line_number}", _command_target(match), OPTION.findall(line[match.end() :]))
                    mentions.append(mention)
                    last = None if re.search(r"accelerate launch|torchrun", line) else mention
                elif last and line.lstrip().startswith("#"):
                    last[2].extend(OPTION.findall(line))
                else:
                    last = None
                line_number += 1
        prose = FENCE.sub(lambda fence: "\n" * fence[0].count("\n"), text)  # blocks out, line numbers kept
        for span in re.finditer(r"`([^`]+)`", prose):
            match = COMMAND.search(span[1])
            if match and match["path"] not in ELSEWHERE:
                where = f"{readme}:{prose.count(chr(10), 0, span.start()) + 1}"
                mentions.append((where, _command_target(match), OPTION.findall(span[1][match.end() :])))
    return mentions


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def parser_of(kind: str, target: str) -> argparse.ArgumentParser:
    """The parser a script or module parses its command line with: run as `__main__`, stopped at its first parse."""

    def capture(parser, args=None, namespace=None):
        raise _Parsed(parser)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture),
        mock.patch.object(sys, "argv", [target]),
    ):
        try:
            if kind == "path":
                runpy.run_path(str(ROOT / target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{target} parsed no command line")


MENTIONS = command_mentions()


def test_the_readmes_name_commands_of_every_kind():
    targets = {target for _, target, _ in MENTIONS}
    assert ("module", "diffusers_stages.plan") in targets and ("module", "diffusers_stages.switch") in targets
    assert {
        ("module", f"diffusers_stages.conversion.{name}") for name in ("unet_to_multistage", "multistage_to_unet")
    } <= targets
    assert ("path", "benchmarks/run_evidence.py") in targets and ("path", "benchmarks/bench_multistage.py") in targets


def test_every_script_a_readme_names_exists():
    missing = [(where, name) for where, (kind, name), _ in MENTIONS if kind == "path" and not (ROOT / name).is_file()]
    assert not missing, missing


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy: a conversion imported first
@pytest.mark.parametrize("target", sorted({target for _, target, _ in MENTIONS}), ids=lambda target: target[1])
def test_every_option_a_readme_names_for_a_command_exists(target):
    parser = parser_of(*target)
    assert parser.format_help().startswith("usage:")  # `--help` works (a bare `%` in a help text breaks it)
    options = set(parser._option_string_actions)
    missing = [(where, option) for where, named, found in MENTIONS if named == target for option in found
               if option not in options]  # fmt: skip
    assert not missing, f"{target[1]} has no such option: {missing}"


# ---------------------------------------------------------------------------------------------------------------
# the README's conversions of diffusers pipelines run as written, on tiny DDPM folders of the names they give (the
# `original_*` conversions need the authors' checkpoints; tests/conversion builds those from their names and shapes)
PIPELINE_CONVERSIONS = ("unet_to_multistage", "multistage_to_unet", "pipelines_to_experts")
CONVERSION = re.compile(r"python -m diffusers_stages\.conversion\.(\w+)(?P<args>.*)")


def conversion_commands() -> list[tuple[str, list[str]]]:
    """``(name, argv)`` of every complete pipeline conversion command of README.md's bash blocks, in order."""
    commands = []
    for block in BASH.finditer((ROOT / "README.md").read_text(encoding="utf-8")):
        for line in re.sub(r"\\\n\s*", " ", block["code"]).splitlines():
            match = CONVERSION.search(line.split("#")[0])
            if match and match[1] in PIPELINE_CONVERSIONS and not re.search(r"<[^>]+>|\.\.\.", line):
                commands.append((match[1], shlex.split(match["args"])))
    return commands


def _sources(argv: list[str]) -> list[str]:
    """The folders a conversion command reads (``--source`` or ``--sources``)."""
    for option in ("--source", "--sources"):
        if option in argv:
            start = argv.index(option) + 1
            end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
            return argv[start:end]
    return []


def test_the_readmes_pipeline_conversion_commands_run_as_written(tmp_path, monkeypatch):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from tests.conftest import TINY_UNET

    commands = conversion_commands()
    assert {name for name, _ in commands} == set(PIPELINE_CONVERSIONS)
    monkeypatch.chdir(tmp_path)
    for seed, (name, argv) in enumerate(commands):
        for source in _sources(argv):
            if not Path(source).exists():  # a trained pipeline of the user's, unless an earlier command wrote it
                torch.manual_seed(seed)
                DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler()).save_pretrained(source)
        module = importlib.import_module(f"diffusers_stages.conversion.{name}")
        module.run(module.main, module.parse_args, argv)  # --verify: a difference above tolerance fails here
        assert (tmp_path / argv[argv.index("--output_path") + 1]).is_dir()


def test_the_planning_rules_table_gives_the_command_that_measured_it():
    # the table of boundary rules states its draws (K) beside the command that reproduces it: the command must
    # plan with that K (the script's default is 128; the table was measured at 64 and differs at 128)
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_planning

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    claim = re.search(r"The two rules disagree.*?K=(\d+).*?`python (benchmarks/bench_planning\.py[^`]*)`", text, re.S)
    assert claim, "README.md lost the table of the two boundary rules"
    args = bench_planning.parse_args(shlex.split(re.sub(r"\s+", " ", claim[2]))[1:])
    assert args.compare and args.num_samples == int(claim[1]), (claim[1], claim[2])
