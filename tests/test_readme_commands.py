"""The training commands of README.md and examples/*/README.md parse as written: every `examples/*/train_*.py` command
of a bash block (placeholders such as `<same arguments>` or `...` aside) goes through its script's own `parse_args`,
which runs every check that needs no training. The data folder is the README's `./images` (sklearn's digits) whatever
folder a command names, and a command for a GPU (`--mixed_precision fp16`) is checked as on a GPU."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusers_stages.demo.methods import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
BASH = re.compile(r"^```(?:bash|sh|shell)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)
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


@pytest.mark.parametrize("where, script, argv", COMMANDS, ids=[where for where, _, _ in COMMANDS])
def test_training_command_parses_as_written(where, script, argv, images, tmp_path, monkeypatch):
    argv = list(argv)
    monkeypatch.chdir(tmp_path)
    if "--assemble_experts" in argv:
        pytest.skip("assembles the folders of earlier runs")
    if "--pretrained_model_name_or_path" in argv:
        pytest.skip("fine-tunes the output of the conversion command before it")
    if "--train_data_dir" in argv:
        argv[argv.index("--train_data_dir") + 1] = str(images)
    if "--mixed_precision" in argv and argv[argv.index("--mixed_precision") + 1] == "fp16":
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    args = _script(script).parse_args(argv)
    assert args.output_dir == argv[argv.index("--output_dir") + 1]
