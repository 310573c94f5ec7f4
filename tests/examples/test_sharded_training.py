"""`accelerate launch --config_file examples/accelerate_configs/fsdp.yaml --num_processes 2` of a training script:
Accelerate's FSDP2 (switched on over gloo, as Accelerate does on GPUs only) writes checkpoints and a pipeline whose
`save_pretrained` weights are those of the same unsharded (DDP) run, and resumes bit for bit."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffusers_stages import MultiStagePipeline

WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                      "accelerate_configs", "fsdp.yaml")  # fmt: skip


def _launch(examples, args: list[str], sharded: bool, check: bool = True):
    runner = [examples.RUNNER, "--fsdp-on-cpu"] if sharded else []
    launch = ["--config_file", CONFIG] if sharded else ["--multi_gpu"]
    result = examples.run_subprocess(
        ["-m", "accelerate.commands.launch", *launch, "--num_processes", "2", *runner, examples.SCRIPTS["multistage"],
         *args]
    )  # fmt: skip
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def _same(a: str, b: str, exact: bool = True) -> bool:
    """Whether two weight files hold the same tensors: bit for bit, or to float rounding (``exact=False``: FSDP and
    DDP average the processes' gradients by other collectives, about 1e-6 apart after 3 steps)."""
    x, y = load_file(a), load_file(b)
    close = torch.equal if exact else lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-5)
    return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)


@pytest.mark.slow  # three launches of two processes: about 2 minutes on 2 busy CPU cores
def test_a_sharded_run_saves_and_resumes_as_an_unsharded_one(examples, image_folder, tmp_path):
    args = [*examples.TINY, "--train_data_dir", image_folder, "--max_train_steps", "3", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "2"]  # fmt: skip
    sharded, plain = str(tmp_path / "sharded"), str(tmp_path / "plain")
    result = _launch(examples, [*args, "--output_dir", sharded], sharded=True)
    assert "Sharded (FSDP) run" in result.stderr
    _launch(examples, [*args, "--output_dir", plain], sharded=False)

    # Accelerate's shards to resume from, and the gathered network as a plain folder, equal to the unsharded run's
    assert sorted(f for f in os.listdir(sharded) if f.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert {"pytorch_model_fsdp_0", "optimizer_0", "unet"} <= set(os.listdir(os.path.join(sharded, "checkpoint-2")))
    for folder in ("", "checkpoint-2", "checkpoint-3"):
        assert _same(os.path.join(sharded, folder, WEIGHTS), os.path.join(plain, folder, WEIGHTS), exact=False), folder
    MultiStagePipeline.from_pretrained(sharded)  # a plain pipeline folder

    # resumed from checkpoint-2 (sharded), the last step is the uninterrupted run's
    resumed = str(tmp_path / "resumed")
    shutil.copytree(sharded, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoint-3"))
    os.remove(os.path.join(resumed, WEIGHTS))
    refused = _launch(examples, [*args, "--output_dir", resumed, "--resume_from_checkpoint", "latest", "--dropout",
                                 "0.1"], sharded=True, check=False)  # fmt: skip
    assert "holds a `unet` of another configuration (`dropout` 0.0 there, 0.1 now)" in refused.stderr  # was resumed
    result = _launch(examples, [*args, "--output_dir", resumed, "--resume_from_checkpoint", "latest"], sharded=True)
    assert "Resuming from " + os.path.join(resumed, "checkpoint-2") in result.stdout + result.stderr
    for folder in ("", "checkpoint-3"):
        assert _same(os.path.join(sharded, folder, WEIGHTS), os.path.join(resumed, folder, WEIGHTS)), folder
