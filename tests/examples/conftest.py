"""Fixtures of the training-script tests: a tiny class-labelled image folder, tiny model arguments, script loading."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = {
    "multistage": os.path.join(REPO, "examples", "multistage", "train_multistage.py"),
    "experts": os.path.join(REPO, "examples", "experts", "train_experts.py"),
    "dual_backbone": os.path.join(REPO, "examples", "dual_backbone", "train_dual_backbone.py"),
}
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instrumented_run.py")
# the U-Net shape of the scripts' tiny models: refused where a source gives the shape (`--model_config`, a pretrained
# folder, U-ViT backbones), so those runs take `TINY_RUN` (the rest of `TINY`) and their own shape
TINY_SHAPE = [
    "--block_out_channels",
    "8,16",
    "--layers_per_block",
    "1",
    "--norm_num_groups",
    "4",
    "--attention_head_dim",
    "4",
]
TINY_RUN = [
    "--resolution",
    "8",
    "--train_batch_size",
    "4",
    "--save_images_steps",
    "1000",
    "--num_sample_images",
    "4",
    "--num_inference_steps",
    "3",
    "--logger",
    "none",
    "--lr_warmup_steps",
    "1",
]
TINY = [*TINY_RUN[:2], *TINY_SHAPE, *TINY_RUN[2:]]


def finetune_args(image_folder: str, source: str, out: str, *extra: str) -> list[str]:
    """A one-step run fine-tuning ``source`` (`--pretrained_model_name_or_path`) on the tiny images into ``out``, at the
    full learning rate from that step on (a warm-up step would leave the weights as they were)."""
    return [*TINY_RUN, "--train_data_dir", image_folder, "--output_dir", out, "--pretrained_model_name_or_path", source,
            "--max_train_steps", "1", "--lr_warmup_steps", "0", "--learning_rate", "1e-3", *extra]  # fmt: skip


def weights_changed(before: str, after: str) -> bool:
    """Whether the weights (`diffusion_pytorch_model.safetensors`) of model folder ``after`` differ from those of
    ``before``, which must name the same tensors (the same architecture)."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")) for folder in (before, after))
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def assert_usage_error(script, argv: list[str], message: str, capsys) -> None:
    """``script``'s `parse_args(argv)` exits with a usage error (code 2) that says ``message``."""
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def assert_refused_before_training(script, argv: list[str], message: str) -> None:
    """``argv`` parse, but the run is a ValueError that says ``message`` (a check of the data, read by the run)."""
    args = script.parse_args(argv)
    with pytest.raises(ValueError) as error:
        script.main(args)
    assert message in str(error.value)


def load_script(name: str):
    """Import an example script as a module (its `parse_args` and `main`)."""
    spec = importlib.util.spec_from_file_location(f"train_{name}_script", SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    """24 scikit-learn digits (classes 0-2) as 8x8 RGB PNGs in one sub-folder per class."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    picked = [i for i in range(len(digits.target)) if digits.target[i] < 3][:24]
    for i in picked:
        os.makedirs(root / str(digits.target[i]), exist_ok=True)
        pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(root / str(digits.target[i]) / f"{i}.png")
    return str(root)


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    """Each in-process run builds its own Accelerator, with no network, on one thread (as the subprocesses: tiny
    models run far faster on one thread on a busy machine, and every run of a comparison uses the same kernels)."""
    import huggingface_hub.constants
    import torch
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def train(script, args: list[str]) -> str:
    """Parse and train in this process, as `python train_<task>.py ARGS` would."""
    return script.main(script.parse_args(args))


def run_subprocess(command: list[str]) -> subprocess.CompletedProcess:
    """``python COMMAND`` in a fresh process (one thread, offline, several processes on CPU allowed)."""
    return subprocess.run(
        [sys.executable, *command], env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False
    )


def subprocess_env() -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))
    }
    env.update(
        HF_HUB_OFFLINE="1",
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([REPO, *sys.path]),
    )
    return env


@pytest.fixture(scope="session")
def examples():
    """This module's helpers, for the test files (the tests import with `--import-mode=importlib`)."""
    return sys.modules[__name__]
