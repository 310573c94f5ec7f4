"""Sharded training (FSDP through Accelerate, `examples/accelerate_configs/fsdp.yaml`) of a network that does not fit
one device, saved as plain `save_pretrained` folders.

Accelerate wraps each module class a network lists in ``_no_split_modules`` as its own FSDP unit (a decoder of a
multi-stage U-Net, a transformer block), the rest in the root unit. Accelerate's own checkpoint files hold the
shards (for resuming); the checkpoint hooks and the final save gather the full weights onto the main process and write
them with `save_pretrained`, as an unsharded run does.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, parse_flag_from_env
from diffusers.models.modeling_utils import ModelMixin

logger = get_logger(__name__)


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run shards its networks (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def check_sharding_launched(accelerator: Accelerator) -> None:
    """Refuse a launch that asks for FSDP (`accelerate launch` with an FSDP config sets ``ACCELERATE_USE_FSDP``) which
    Accelerate does not shard: it runs FSDP on GPUs only, and elsewhere (CPU) would train the whole network on every
    process without a word."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and not is_sharded(accelerator):
        raise ValueError(
            "The launch asks for sharded training (FSDP: an FSDP config such as "
            "examples/accelerate_configs/fsdp.yaml sets ACCELERATE_USE_FSDP) but Accelerate runs "
            f"`{accelerator.distributed_type.value}`, unsharded: it shards with FSDP on GPUs only. Launch on GPUs, or "
            "without the FSDP config (on CPU: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes 2 ...`, each process holding the whole network)."
        )


def check_sharded_run(
    accelerator: Accelerator, args: argparse.Namespace, names: Sequence[str], num_stages: int = 1
) -> None:
    """Refuse what a sharded run cannot do, naming the option; a no-op without FSDP. ``num_stages``: the stage decoders of
    the network trained (`TrainingTask.decoders`), every one of which every process must run at every step."""
    if not is_sharded(accelerator):
        return
    if len(names) != 1:
        raise ValueError(
            f"A sharded (FSDP) run trains one network (Accelerate prepares one model with FSDP2), got {list(names)}: "
            "train one network per run (`--expert_index` for experts, `--backbones shallow|deep` for a dual "
            "backbone) and assemble them afterwards."
        )
    if args.use_ema:
        raise ValueError(
            "`--use_ema` cannot be used in a sharded (FSDP) run: the EMA keeps a full copy of every weight on every "
            "process, which is what sharding avoids."
        )
    if getattr(args, "fused_decoders", False):
        raise ValueError(
            "`--fused_decoders` cannot be used in a sharded (FSDP) run: each decoder is its own FSDP unit, gathered "
            "by its own hooks when it runs, which a fused pass over all decoders would bypass; drop it."
        )
    scheme = getattr(args, "stage_sampling", "mixed")
    if scheme != "mixed":
        raise ValueError(
            f"`--stage_sampling {scheme}` cannot be used in a sharded (FSDP) run: each decoder is an FSDP unit whose "
            "weights all processes gather together when it runs, so every process must run every decoder at every "
            "step, but with one stage per batch or per process they run different ones. Use `--stage_sampling "
            "mixed` (the default)."
        )
    batch_size = getattr(args, "train_batch_size", None)
    if batch_size is not None and batch_size < num_stages:
        raise ValueError(
            f"`--train_batch_size` {batch_size} is smaller than the {num_stages} stages, so with `--stage_sampling "
            "mixed` each batch leaves some decoder out, not the same one on every process; but in a sharded (FSDP) "
            "run every process must run every decoder at every step (each is an FSDP unit gathered together). Pass "
            f"`--train_batch_size` {num_stages} or more (`--gradient_accumulation_steps` keeps the samples per "
            "optimisation step)."
        )
    if args.save_model_epochs is not None:
        raise ValueError(
            f"`--save_model_epochs` {args.save_model_epochs} cannot be used in a sharded (FSDP) run: every "
            "checkpoint holds the network as a `save_pretrained` folder already (`--checkpointing_steps`)."
        )
    logger.info(
        "Sharded (FSDP) run: no sample grids are drawn (sampling would gather the network on one process); sample "
        "the saved pipeline, with `enable_stage_offload()` if it does not fit one device.",
        main_process_only=True,
    )


def plain_network(network: ModelMixin, state_dict: dict[str, torch.Tensor]) -> ModelMixin:
    """A new, unsharded instance of ``network``'s class and config holding ``state_dict`` (the full weights gathered
    from a sharded network): built on the meta device and given the tensors themselves, so nothing is copied."""
    with init_empty_weights():
        plain = plain_class(network).from_config(network.config)
    plain.load_state_dict(state_dict, strict=True, assign=True)
    return plain


def plain_class(network: ModelMixin) -> type[ModelMixin]:
    """The class of ``network`` itself: FSDP2 subclasses a sharded network's class."""
    return next(c for c in type(network).__mro__ if not _is_fsdp_class(c))


def gathered_networks(
    accelerator: Accelerator, names: Sequence[str], models: Sequence[torch.nn.Module]
) -> dict[str, ModelMixin | None]:
    """The prepared ``models`` by name as plain networks: the unwrapped networks themselves, or, in a sharded run,
    new instances holding the gathered full weights on the main process (None on the others). In a sharded run every
    process must call this (the gathering is a collective)."""
    networks = {}
    for name, model in zip(names, models):
        network = accelerator.unwrap_model(model)
        if is_sharded(accelerator):
            state_dict = accelerator.get_state_dict(model)  # the full weights, on the main process
            network = plain_network(network, state_dict) if accelerator.is_main_process else None
        networks[name] = network
    return networks


def _is_fsdp_class(cls: type) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return issubclass(cls, FSDPModule)
