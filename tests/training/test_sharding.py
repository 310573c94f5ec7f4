"""Sharded training: the shipped FSDP config wraps each decoder (each block) as a unit through the models'
``_no_split_modules``, and a sharded network's gathered weights are written as a plain `save_pretrained` folder.

Accelerate runs FSDP on GPUs only, so the config is resolved here as `accelerate launch` resolves it (launch
arguments -> environment -> plugin -> wrap policy), and the sharding itself is torch's FSDP2 (`fully_shard`) on CPU
with gloo: one process in the fast tests, two in the slow one.
"""

import argparse
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from diffusers_stages import (
    IUNet2DModel,
    MultiStageDDPMppUNet2DModel,
    MultiStageUNet2DConditionModel,
    MultiStageUNet2DModel,
    UViT2DModel,
)
from diffusers_stages.training.sharding import (
    check_sharded_run,
    check_sharding_launched,
    gathered_networks,
    plain_network,
)
from tests.conftest import TINY_UNET
from tests.models.test_iunet import TINY as IUNET
from tests.models.test_unet_multistage_ddpmpp import TINY as DDPMPP
from tests.models.test_uvit import TINY as UVIT

CONFIG = Path(__file__).parents[2] / "examples" / "accelerate_configs" / "fsdp.yaml"


def _multistage():
    return MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(442, 631))


MODELS = {  # (a tiny model, its module list that must be wrapped unit by unit)
    "multistage": (_multistage, "decoders"),
    "ddpmpp": (lambda: MultiStageDDPMppUNet2DModel(**DDPMPP), "decoders"),
    "condition": (lambda: MultiStageUNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, cross_attention_dim=8,
        attention_head_dim=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), stage_boundaries=(500,)), "decoders"),
    "uvit": (lambda: UViT2DModel(**UVIT), "blocks"),
    "iunet": (lambda: IUNet2DModel(**IUNET), None),
}  # fmt: skip


def wrap_policy(model, monkeypatch):
    """The wrap policy `accelerate launch --config_file fsdp.yaml` gives ``model`` (as `Accelerator.prepare` asks)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIG), "train.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap is None  # the model's list decides
    return fsdp2_prepare_auto_wrap_policy(plugin, model)


@pytest.mark.parametrize("name", list(MODELS))
def test_config_wraps_each_no_split_module(name, monkeypatch):
    build, container = MODELS[name]
    model = build()
    policy = wrap_policy(model, monkeypatch)
    wrapped = [module for module in model.modules() if policy(module)]
    assert wrapped and {type(m).__name__ for m in wrapped} <= set(model._no_split_modules)
    if container is not None:  # every decoder (transformer block) is a unit of its own
        assert all(any(m is unit for m in wrapped) for unit in getattr(model, container))
    if name == "multistage":
        assert wrapped == list(model.decoders)


@pytest.fixture
def process_group():
    """A one-process gloo group (FSDP2 on CPU)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _shard(model) -> torch.nn.Module:
    for decoder in model.decoders:
        fully_shard(decoder)
    return fully_shard(model)


def _train_step(model, batch: torch.Tensor, timesteps: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient (Adam would amplify noise)
    model(batch, timesteps).sample.pow(2).mean().backward()
    optimizer.step()


def test_gathered_weights_save_as_a_plain_folder(process_group, tmp_path):
    torch.manual_seed(0)
    model = _shard(_multistage())
    _train_step(model, torch.randn(3, 3, 8, 8), torch.tensor([100, 500, 900]))
    assert isinstance(model, FSDPModule) and isinstance(model.conv_in.weight, torch.distributed.tensor.DTensor)

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = plain_network(model, state_dict)
    assert type(plain) is MultiStageUNet2DModel and not isinstance(plain, FSDPModule)
    assert all(plain.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state_dict.items())  # not copied

    # what the checkpoint hooks and the final save call: Accelerate's FSDP2 gathering (its options), on the main process
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP, is_main_process=True, unwrap_model=lambda m: m,
        get_state_dict=lambda m: get_model_state_dict(
            m, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        ),
    )  # fmt: skip
    (gathered,) = gathered_networks(accelerator, ["unet"], [model]).values()
    assert type(gathered) is MultiStageUNet2DModel
    assert all(torch.equal(gathered.state_dict()[k], v) for k, v in state_dict.items())
    plain.save_pretrained(tmp_path)
    assert "diffusion_pytorch_model.safetensors" in os.listdir(tmp_path)

    loaded = MultiStageUNet2DModel.from_pretrained(tmp_path)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([100, 500, 900])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, model(x, t).sample)  # the trained, sharded network's output


def test_sharded_runs_refuse_what_they_cannot_do():
    PartialState()  # Accelerate's logging needs its state
    sharded = SimpleNamespace(distributed_type=DistributedType.FSDP)
    args = argparse.Namespace(use_ema=False, save_model_epochs=None)
    check_sharded_run(sharded, args, ["unet"])
    check_sharded_run(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), args, ["deep", "shallow"])
    with pytest.raises(ValueError, match=r"trains one network .* got \['deep', 'shallow'\]: .*--backbones"):
        check_sharded_run(sharded, args, ["deep", "shallow"])
    with pytest.raises(ValueError, match="`--use_ema` cannot be used in a sharded"):
        check_sharded_run(sharded, argparse.Namespace(use_ema=True, save_model_epochs=None), ["unet"])
    with pytest.raises(ValueError, match="`--save_model_epochs` 2 cannot be used in a sharded"):
        check_sharded_run(sharded, argparse.Namespace(use_ema=False, save_model_epochs=2), ["unet"])
    with pytest.raises(ValueError, match="`--fused_decoders` cannot be used in a sharded"):
        check_sharded_run(sharded, argparse.Namespace(use_ema=False, save_model_epochs=None, fused_decoders=True),
                          ["unet"])  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
def _two_process_step(rank: int, port: int, folder: str) -> None:
    """Rank ``rank`` of a 2-process FSDP2 step on its half of a batch; rank 0 writes the gathered network."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = _shard(_multistage())
    batch, timesteps = _batch()
    half = slice(3 * rank, 3 * rank + 3)
    _train_step(model, batch[half], timesteps[half])
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain_network(model, state_dict).save_pretrained(folder)
    dist.destroy_process_group()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 8, 8, generator=generator), torch.tensor([100, 500, 900, 200, 600, 950])


@pytest.mark.slow
def test_two_processes_train_as_one_on_the_whole_batch(tmp_path):
    """2 CPU processes of FSDP2 (gloo) take the step one process takes on both halves (gradients averaged)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_process_step, args=(port, str(tmp_path)), nprocs=2)
    sharded = MultiStageUNet2DModel.from_pretrained(tmp_path)

    torch.manual_seed(0)
    reference = _multistage()
    batch, timesteps = _batch()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    losses = [reference(batch[h], timesteps[h]).sample.pow(2).mean() for h in (slice(0, 3), slice(3, 6))]
    (sum(losses) / 2).backward()  # the mean of the two processes' losses, as FSDP averages their gradients
    optimizer.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_an_fsdp_launch_that_accelerate_does_not_shard_is_refused(tmp_path, monkeypatch):
    # `accelerate launch --config_file fsdp.yaml` on CPU: Accelerate runs FSDP on GPUs only, so with
    # `ACCELERATE_USE_CPU=true` (which the launch error advised) every process trained the whole network (DDP)
    # without a word, and without it the error named only the process count
    from accelerate.state import AcceleratorState, GradientState

    from diffusers_stages.training.loop import _accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets from the FSDP config
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(logger="none", gradient_accumulation_steps=1, mixed_precision="no",
                              output_dir=str(tmp_path), logging_dir="logs")  # fmt: skip
    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(ValueError, match=r"FSDP .*fsdp\.yaml.* Accelerate runs `NO`, unsharded: .*on GPUs only"):
            _accelerator(args, SimpleNamespace(find_unused_parameters=False))
        with pytest.raises(ValueError, match="Accelerate runs `MULTI_CPU`, unsharded"):  # `ACCELERATE_USE_CPU=true`
            check_sharding_launched(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
        check_sharding_launched(SimpleNamespace(distributed_type=DistributedType.FSDP))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize("scheme", ["per_batch", "per_rank"])
def test_a_sharded_run_refuses_stage_sampling_that_leaves_a_decoder_out_on_some_process(scheme):
    # each decoder is an FSDP unit whose weights every process gathers together when it runs: with one stage per
    # batch or per process, the processes ran different decoders, paired each other's gatherings (silently wrong
    # weights where the decoders have one shape) and failed at the first checkpoint
    PartialState()
    sharded = SimpleNamespace(distributed_type=DistributedType.FSDP)
    args = argparse.Namespace(use_ema=False, save_model_epochs=None, stage_sampling=scheme)
    with pytest.raises(
        ValueError, match=f"`--stage_sampling {scheme}` cannot be used in a sharded .*`--stage_sampling mixed`"
    ):
        check_sharded_run(sharded, args, ["unet"])
    check_sharded_run(
        sharded, argparse.Namespace(use_ema=False, save_model_epochs=None, stage_sampling="mixed"), ["unet"]
    )
    check_sharded_run(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), args, ["unet"])  # DDP: allowed


def test_a_sharded_run_refuses_a_batch_smaller_than_the_stage_count():
    # every process must run every decoder at every step; a batch of 2 over 3 stages leaves one out, not the same
    # one on every process
    PartialState()
    sharded = SimpleNamespace(distributed_type=DistributedType.FSDP)
    args = argparse.Namespace(use_ema=False, save_model_epochs=None, stage_sampling="mixed", train_batch_size=2)
    with pytest.raises(ValueError, match=r"`--train_batch_size` 2 .*3 stages.*`--stage_sampling mixed`"):
        check_sharded_run(sharded, args, ["unet"], num_stages=3)
    check_sharded_run(sharded, args, ["unet"], num_stages=2)
    check_sharded_run(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), args, ["unet"], num_stages=3)
