"""The Python blocks of README.md and examples/*/README.md run as written, top to bottom.

Each README's blocks run in order, each in a fresh namespace (a block may not use a name defined in another one), in
one temporary working folder per README (a block may read what an earlier block of the same README wrote), offline.
What the example READMEs' training commands (bash blocks, hours of training) write is stood in for by tiny pipelines
of the same classes at the same paths. A block fenced ```python no-run is not run as written; each is listed in
`NO_RUN` with the reason and run on a local stand-in for what it would download.

The prose's API names are checked too: every `diffusers_stages.<module>.<name>` and `<PackageClass>.<attribute>` exists.
So are the READMEs' links (anchors and files) and README.md's repository-layout table against the tree.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DModel

from diffusers_stages import ExpertRoutingModel, ExpertRoutingPipeline, MultiStagePipeline, MultiStageUNet2DModel
from diffusers_stages.models import EarlyExitUViT2DModel
from tests.conftest import TINY_UNET

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(?:python|py)(?P<tags>[^\n]*)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)
SD_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CIN_ID = '"cin-staged"'


@dataclass
class Block:
    readme: str
    line: int
    tags: tuple[str, ...]
    code: str

    def __str__(self) -> str:
        return f"{self.readme}:{self.line}"


def python_blocks(readme: str) -> list[Block]:
    """The README's ```python (and ```py) blocks, in order, with the words after the language (``no-run``)."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    return [
        Block(readme, text.count("\n", 0, m.start()) + 1, tuple(m["tags"].split()), m["code"])
        for m in FENCE.finditer(text)
    ]


# ---------------------------------------------------------------------------------------------------------------
# what the example READMEs' training commands write, in tiny: the same classes at the same paths
def _multistage_run(tmp_path: Path, components: dict) -> None:
    torch.manual_seed(0)
    unet = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(442, 631))
    MultiStagePipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "multistage-cifar10")


def _experts_run(tmp_path: Path, components: dict) -> None:
    torch.manual_seed(0)
    experts = ExpertRoutingModel([UNet2DModel(**TINY_UNET) for _ in range(4)], stage_boundaries=(250, 500, 750))
    ExpertRoutingPipeline(experts=experts, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "meme-ffhq64")


def _dual_backbone_runs(tmp_path: Path, components: dict) -> None:
    torch.manual_seed(0)
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path / "run-shallow" / "shallow")
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path / "run-deep" / "deep")
    DDPMScheduler().save_pretrained(tmp_path / "run-deep" / "scheduler")
    early_exit = EarlyExitUViT2DModel(sample_size=8, hidden_size=16, num_layers=3, num_attention_heads=2)
    pipe = ExpertRoutingPipeline(
        experts=ExpertRoutingModel([early_exit], stage_boundaries=()), scheduler=DDPMScheduler()
    )
    pipe.save_pretrained(tmp_path / "adadiff-uvit-cifar10")


def _stable_diffusion(tmp_path: Path, components: dict) -> None:
    StableDiffusionPipeline(**components).save_pretrained(tmp_path / "sd-stand-in")


def _class_context(tmp_path: Path, components: dict) -> None:
    """What the `cin-mul256` conversion writes, in tiny: a cross-attention staged U-Net and 1001 class contexts."""
    from diffusers import DDIMScheduler

    from diffusers_stages import ClassContextEmbedding, MultiStageUNet2DConditionModel

    torch.manual_seed(0)
    unet = MultiStageUNet2DConditionModel.from_unet(components["unet"], stage_boundaries=(442, 631))
    embedder = ClassContextEmbedding(num_class_embeds=1001, cross_attention_dim=unet.config.cross_attention_dim)
    pipe = MultiStagePipeline(unet=unet, scheduler=DDIMScheduler(), class_embedder=embedder)
    pipe.save_pretrained(tmp_path / "cin-stand-in")


TRAINING_OUTPUTS = {
    "examples/multistage/README.md": _multistage_run,
    "examples/experts/README.md": _experts_run,
    "examples/dual_backbone/README.md": _dual_backbone_runs,
}
# blocks not run as written: a text that identifies the block -> (why, stand-in writer, {text: replacement})
NO_RUN = {
    SD_ID: (
        "downloads Stable Diffusion 1.5 (several GB); run on a tiny local SD folder instead",
        _stable_diffusion,
        {SD_ID: "sd-stand-in"},
    ),
    CIN_ID: (
        "needs the 669M-parameter converted `cin-mul256` checkpoint; run on a tiny folder of the same classes instead",
        _class_context,
        {CIN_ID: '"cin-stand-in"', "num_inference_steps=20": "num_inference_steps=2"},
    ),
}
READMES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("examples/*/README.md"))]


def _no_run_entry(block: Block) -> str:
    keys = [key for key in NO_RUN if key in block.code]
    assert len(keys) == 1, f"{block}: a no-run block must be listed (once) in NO_RUN with its reason, found {keys}"
    return keys[0]


def _run(block: Block, tmp_path: Path, components: dict, steps: int | None = None) -> None:
    code = (
        block.code if steps is None else block.code.replace("num_inference_steps=50", f"num_inference_steps={steps}")
    )
    if "no-run" in block.tags:
        _, write_stand_in, replacements = NO_RUN[_no_run_entry(block)]
        write_stand_in(tmp_path, components)
        for text, replacement in replacements.items():
            code = code.replace(text, replacement)
    exec(compile(code, str(block), "exec"), {"__name__": "__main__"})  # a fresh namespace per block


@pytest.fixture
def readme_env(tmp_path, monkeypatch):
    """An empty working folder, offline (a block that would download fails instead)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_readme_has_its_blocks_found():
    blocks = {readme: python_blocks(readme) for readme in READMES}
    assert all(blocks.values()), {readme: len(b) for readme, b in blocks.items()}
    assert set(TRAINING_OUTPUTS) <= set(READMES)


def test_no_run_blocks_are_few_and_justified():
    no_run = [block for readme in READMES for block in python_blocks(readme) if "no-run" in block.tags]
    assert sorted(_no_run_entry(block) for block in no_run) == sorted(NO_RUN)
    assert len(no_run) <= 2  # keep it small: a block that cannot run as written is a block readers cannot trust


def _run_main_readme(folder: Path, components: dict, steps: int | None) -> None:
    for block in python_blocks("README.md"):
        _run(block, folder, components, steps)
    assert os.path.isfile(folder / "my-multistage" / "model_index.json")
    assert os.path.isfile(folder / "meme-pipe" / "experts" / "config.json")
    assert os.path.isfile(folder / "sd-multistage" / "model_index.json")


def test_main_readme_blocks_run_in_order_with_fewer_steps(readme_env, tiny_sd_components):
    """As written, except 2 sampling steps where a block says 50 (about 2 minutes less on 2 CPU cores)."""
    _run_main_readme(readme_env, tiny_sd_components, steps=2)


@pytest.mark.slow
def test_main_readme_blocks_run_in_order(readme_env, tiny_sd_components):
    _run_main_readme(readme_env, tiny_sd_components, steps=None)


@pytest.mark.parametrize("readme", sorted(TRAINING_OUTPUTS))
def test_example_readme_blocks_run_after_their_training_commands(readme_env, readme):
    TRAINING_OUTPUTS[readme](readme_env, {})
    for block in python_blocks(readme):
        _run(block, readme_env, {})


# ---------------------------------------------------------------------------------------------------------------
# the names the READMEs' prose gives: `diffusers_stages.<module>.<name>` and `<PackageClass>.<attribute>` exist
def _readme_texts() -> str:
    return "".join((ROOT / readme).read_text(encoding="utf-8") for readme in READMES)


def _resolve(dotted: str):
    """The object a dotted name names (its longest importable module, then attributes); AttributeError if none."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for part in parts[end:]:
            obj = getattr(obj, part)
        return obj
    raise AttributeError(dotted)


def test_every_dotted_package_name_a_readme_gives_exists():
    names = set(re.findall(r"diffusers_stages(?:\.[A-Za-z_]\w*)+", _readme_texts()))
    names = {name for name in names if not name.endswith(".py")}  # a re-export file's name, not an import path
    assert len(names) > 10
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except AttributeError:
            missing.append(name)
    assert not missing, missing


def test_every_attribute_a_readme_names_of_a_package_class_exists():
    import diffusers_stages
    from diffusers_stages import models, pipelines, planning, training

    spaces = (diffusers_stages, models, pipelines, planning, training)
    named = set(re.findall(r"\b([A-Z][A-Za-z0-9]+)\.([a-z_]\w*)\b", _readme_texts()))
    classes = {
        name: getattr(space, name) for space in spaces for name in dir(space) if isinstance(getattr(space, name), type)
    }
    checked = [(cls, attribute) for cls, attribute in named if cls in classes]
    assert len(checked) > 10
    missing = [f"{cls}.{attribute}" for cls, attribute in sorted(checked) if not hasattr(classes[cls], attribute)]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------------------------
# the repository-layout table: every path it names exists, and every part of the package is in it
def _layout_rows() -> list[tuple[list[Path], list[str]]]:
    """``(paths of the first cell, names of the second cell)`` per row; a first-cell name without a folder lies beside
    the cell's first path (`diffusers_stages/conventions.py`, `loss.py`)."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Repository layout", 1)[1]
    rows = []
    for first, second in re.findall(r"^\| (`[^|]*`) \| (.*) \|$", section, re.MULTILINE):
        names = re.findall(r"`([^`]+)`", first)
        base = Path(names[0].rstrip("/")).parent
        paths = [ROOT / names[0]] + [ROOT / (name if "/" in name.rstrip("/") else base / name) for name in names[1:]]
        rows.append((paths, re.findall(r"`([\w/*.-]+\.(?:py|yaml)|[\w-]+/)`", second)))
    return rows


def test_every_path_the_layout_table_names_exists():
    rows = _layout_rows()
    assert len(rows) > 10
    missing = [str(path.relative_to(ROOT)) for paths, _ in rows for path in paths if not path.exists()]
    for paths, names in rows:  # a file a row's text names lies in that row's folder (or is a path from the root)
        folders = [path for path in paths if path.is_dir()] + [ROOT]
        missing += [name for name in names if not any(list(folder.glob(name)) for folder in folders)]
    assert not missing, missing


def test_the_layout_table_names_every_module_and_folder_of_the_package():
    named = {path.resolve() for paths, _ in _layout_rows() for path in paths}
    parts = [p for p in (ROOT / "diffusers_stages").iterdir() if p.suffix == ".py" and p.name != "__init__.py"]
    parts += [p for p in (ROOT / "diffusers_stages").iterdir() if (p / "__init__.py").is_file()]
    parts += [ROOT / folder for folder in ("pipelines", "conversion", "examples", "benchmarks", "tests")]
    unnamed = sorted(str(p.relative_to(ROOT)) for p in parts if p.resolve() not in named)
    assert not unnamed, unnamed


def _github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("readme", READMES)
def test_every_link_of_a_readme_leads_somewhere(readme):
    text = (ROOT / readme).read_text(encoding="utf-8")
    prose = re.sub(
        r"^\s*```.*?^\s*```", "", text, flags=re.MULTILINE | re.DOTALL
    )  # a `#` in a code block is no heading
    anchors = {_github_anchor(line.lstrip("#")) for line in prose.splitlines() if line.startswith("#")}
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links or readme != "README.md"
    broken = [link for link in links if link.startswith("#") and link[1:] not in anchors]
    broken += [
        link
        for link in links
        if not link.startswith(("#", "http://", "https://"))
        and not (ROOT / readme).parent.joinpath(link.split("#")[0]).exists()
    ]
    assert not broken, broken
