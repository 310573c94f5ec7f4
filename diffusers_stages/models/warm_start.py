"""Warm starts of the multi-stage U-Nets from a pretrained diffusers U-Net: the state-dict mapping (every decoder a
copy of the source's up path) and the model built from the source's config, whose output equals the source's."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from diffusers.models.modeling_utils import ModelMixin

from .checks import disk_offload_path
from .loading import (
    FUSED_PROJECTIONS,  # what `fuse_qkv_projections` adds (`unfuse_qkv_projections` keeps them)
    constructor_options,
)

DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")
FREEU = ("s1", "s2", "b1", "b2")  # what `enable_freeu` sets on each up block (neither config nor weights)


def unet_state_dict_to_multistage(state_dict: dict[str, torch.Tensor], num_stages: int) -> dict[str, torch.Tensor]:
    """Map a `UNet2DModel` state dict onto a `MultiStageUNet2DModel` whose decoders all copy the up path."""
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(DECODER_PREFIXES):
            for s in range(num_stages):
                converted[f"decoders.{s}.{key}"] = value.clone()
        else:
            converted[key] = value
    return converted


def refuse_loaded_adapters(model: torch.nn.Module, name: str, lora_advice: str, ip_adapter_advice: str) -> None:
    """A `ValueError` where ``model`` (the argument ``name``) has LoRA adapters or an IP-Adapter loaded, for the
    conversions that copy its weights by name: its LoRA-wrapped layers have other state-dict names
    (``to_q.base_layer.weight``), and an IP-Adapter's image projection and processors are not part of the U-Net's
    architecture, so the adapters would be lost or misplaced. The message ends with ``lora_advice`` or
    ``ip_adapter_advice``."""
    adapters = getattr(model, "peft_config", None)
    if adapters:
        raise ValueError(f"`{name}` has LoRA adapters loaded ({sorted(adapters)}): {lora_advice}.")
    if getattr(model.config, "encoder_hid_dim_type", None) == "ip_image_proj":  # set by `load_ip_adapter`
        raise ValueError(
            f"`{name}` has an IP-Adapter loaded (its image projection and processors are not part of the U-Net's "
            f"architecture): {ip_adapter_advice}."
        )


def warm_start(
    cls: type[ModelMixin],
    source_class: type[ModelMixin],
    unet: ModelMixin,
    stage_boundaries: Sequence[float],
    boundary_units: str,
    num_train_timesteps: int | None,
) -> ModelMixin:
    """A multi-stage ``cls`` built from ``unet``'s config whose encoder is ``unet``'s down path and whose decoders
    are copies of its up path (``unet`` must be a ``source_class``), on ``unet``'s device and dtype and in its mode
    (a source from ``from_pretrained`` is in eval mode: dropout then stays off, as in the source), with its fused
    projections and FreeU settings, if any."""
    if not isinstance(unet, source_class):
        message = f"`unet` must be a diffusers {source_class.__name__}, got {type(unet).__name__}."
        raise ValueError(message)  # noqa: TRY004
    refuse_loaded_adapters(
        unet,
        "unet",
        "build the staged model from the plain U-Net and load the LoRA into it afterwards (`pipe.load_lora_weights` "
        "takes the source's LoRA), or bake the LoRA in first with `unet.fuse_lora()` and `unet.unload_lora()`",
        "build the staged model from the plain U-Net (`pipe.unload_ip_adapter()` first) and load the IP-Adapter into "
        "it afterwards (`pipe.load_ip_adapter` takes the source's IP-Adapter)",
    )
    path = disk_offload_path(unet)
    if path is not None:  # its state dict holds placeholders, which every stage would copy
        raise ValueError(
            f"`from_unet` cannot copy `unet`: group offloading to disk (`offload_to_disk_path`={path!r}) keeps its "
            "weights in that folder's files and leaves uninitialised placeholders in the model. Build the staged "
            "model before `enable_group_offload(offload_to_disk_path=...)`, or load the U-Net again without it."
        )
    source_state = unet.state_dict()
    # plain tensors only: a tensor subclass (a wrapper around another tensor's storage) may report meta and hold weights
    weightless = [name for name, tensor in source_state.items() if tensor.is_meta and type(tensor) is torch.Tensor]
    if weightless:  # the staged model is filled from these: it would be as weightless, silently
        raise ValueError(
            f"`unet` has weights on the meta device ({weightless[0]!r} and {len(weightless) - 1} more): they are not "
            "loaded or are offloaded (`init_empty_weights`, a `device_map` offload, "
            "`enable_sequential_cpu_offload`). Build the staged model from a U-Net loaded without offloading."
        )
    config = constructor_options(source_class, unet.config)  # the source's architecture, no keys diffusers ignored
    unet_steps = config.pop("num_train_timesteps", None)
    if num_train_timesteps is None:  # anything given (a 0 too) goes to the model's check as given
        num_train_timesteps = unet_steps or 1000
    elif config.get("time_embedding_type") == "learned" and num_train_timesteps != unet_steps:
        raise ValueError(
            f"`num_train_timesteps`={num_train_timesteps!r} differs from the source's {unet_steps}, the length of its "
            f"learned time embedding (`time_embedding_type`='learned': one row per training timestep); leave it out."
        )
    # built without weights (no random initialisation, no float32 copy in host memory: SDXL's U-Net with three
    # stages would take about 22 GB), then given memory in the source's dtype on its device and filled from it
    with torch.device("meta"):
        model = cls(
            **config,
            num_train_timesteps=num_train_timesteps,
            # a sequence as a tuple; anything else (a number, a string) as given, for the model's check to name it
            stage_boundaries=tuple(stage_boundaries)
            if isinstance(stage_boundaries, Iterable) and not isinstance(stage_boundaries, str)
            else stage_boundaries,
            boundary_units=boundary_units,
        )
        # cast while still weightless: `torch.nn.Module.to`, as `ModelMixin.to(dtype)` warns of float32 modules
        torch.nn.Module.to(model, dtype=unet.dtype)
    model = model.to_empty(device=unet.device)
    # a fused source: its q/k/v projections are copied, and the copy fused again if the source runs fused
    state_dict = {k: v for k, v in source_state.items() if not any(p in k for p in FUSED_PROJECTIONS)}
    model.load_state_dict(unet_state_dict_to_multistage(state_dict, model.num_stages), strict=True)
    processors = getattr(unet, "attn_processors", {}).values()
    if any(type(processor).__name__.startswith("Fused") for processor in processors):
        model.fuse_qkv_projections()
    # FreeU enabled on the source's up blocks: on every decoder's copy of them too
    for index, block in enumerate(getattr(unet, "up_blocks", [])):
        for name in FREEU:
            if getattr(block, name, None) is not None:
                for decoder in model.decoders:
                    setattr(decoder.up_blocks[index], name, getattr(block, name))
    model.train(unet.training)
    return model
