"""What every staged model shares: a partition of the noise schedule, input checks, the routing of a batch to
per-stage networks (decoders or experts), and a saved folder that diffusers' `AutoModel` can load."""

from __future__ import annotations

import inspect
import json
import numbers
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    CROSS_ATTENTION_PROCESSORS,
    AttnAddedKVProcessor,
    AttnProcessor,
)
from torch import nn

from ..partition import TimestepPartition
from ..routing import dispatch_by_stage, fits_padding
from .checks import check_class_labels, check_sample, per_sample_timesteps
from .decoders import fused_decoders, stack_decoder_storage
from .loading import reexport_source

PACKAGE = __name__.split(".")[0]


RECOMPILES_PER_REGION = 8  # `compile_stages`: torch's default `recompile_limit`, allowed to every region


def refuse_grouped_offload(model: nn.Module, networks: str, args: tuple, kwargs: dict) -> None:
    """A `ValueError` where ``enable_group_offload(*args, **kwargs)`` of ``model`` (diffusers' `ModelMixin` method)
    asks for block-level groups of several blocks: diffusers groups the blocks of each top-level `ModuleList`, and
    loads a group when its first block runs, so ``networks`` (the model's `ModuleList` of which a call runs some
    members only: the stages' decoders or experts, the exit heads) would run another member on weights not loaded
    (on an accelerator: left on the offload device). Streams make diffusers use groups of one: those pass."""
    from diffusers.models.modeling_utils import ModelMixin

    try:
        options = inspect.signature(ModelMixin.enable_group_offload).bind(model, *args, **kwargs)
    except TypeError:  # diffusers names the argument
        return
    options.apply_defaults()
    blocks, options = options.arguments["num_blocks_per_group"], options.arguments
    if options["offload_type"] == "block_level" and blocks not in (None, 1) and not options["use_stream"]:
        raise ValueError(
            f"`num_blocks_per_group`={blocks!r} would put several of {type(model).__name__}'s `{networks}` in one "
            "offload group, loaded only when its first member runs, while a call runs some of them only: pass "
            "num_blocks_per_group=1 (each its own group), or offload_type='leaf_level'."
        )


class StageCompileMixin:
    """`compile_stages`: regional `torch.compile` of a model with one network per stage (see there)."""

    def compile_regions(self) -> list[nn.Module]:
        """The regions `compile_stages` compiles: each child module with parameters, and each member with parameters
        of a child `nn.ModuleList` (the encoder's blocks; the decoders or experts, one region per stage); not single
        layers of `torch.nn` (a convolution alone: nothing to fuse, and `torch.compile` runs them as they are). A
        member that is itself a staged model (a multi-stage expert) gives its own regions, so that its routing stays
        eager too."""
        regions = []
        for child in self.children():
            members = list(child) if isinstance(child, nn.ModuleList) else [child]
            for m in members:
                if isinstance(m, StageCompileMixin):
                    regions += m.compile_regions()
                elif (
                    m is not None
                    and next(m.parameters(), None) is not None
                    and not type(m).__module__.startswith("torch.nn.")
                ):
                    regions.append(m)
        return regions

    def compile_stages(self, warmup: Mapping[str, Any] | None = None, **compile_kwargs) -> StageCompileMixin:
        r"""
        Compile the model region by region (diffusers' regional compilation, as `compile_repeated_blocks`): each
        block of the shared part and each stage's network (decoder, expert) is compiled on its own with
        `nn.Module.compile`, while `forward` (the input checks and the routing) stays eager. A change of stage then
        calls a network that is already compiled, instead of recompiling the whole model for each stage (and each
        batch size), and a mixed batch runs each stage's compiled network on its own samples. Networks of one
        structure share their compiled graphs (`torch.compile` guards on parameter shapes, not identities), so
        identical decoders compile once.

        Tailored networks of different widths compile once each, and each again for some new inputs (a batch of 1, a
        batch over 15, a batch whose samples times channels pass 15 in FIR resampling, a first change of
        batch size without ``dynamic=True``). The compiled graphs of all regions of
        one class are cached on their shared ``forward``, so that many stages never hit
        ``torch._dynamo.config.recompile_limit`` (then the later stages would run uncompiled, silently), it and
        ``accumulated_recompile_limit`` are raised to torch's default (8) times the largest number of regions of one
        ``forward``, if they are lower: each region may recompile as often as one compiled alone.

        Args:
            warmup (`dict`, *optional*): keyword arguments of `forward` (``sample``, ``timestep``, ...): with them,
                every stage is compiled up front, by one call per stage with ``stage_index`` set (without
                gradients). Without them, each region compiles on its first call.
            compile_kwargs: arguments of `torch.compile` (``backend``, ``mode``, ``dynamic``, ...), for every region;
                one it does not take, or refuses (an unknown backend or mode), is a `ValueError` before anything is
                compiled.

        Returns:
            The model itself.

        Example:

        ```py
        >>> import torch
        >>> from diffusers_stages import MultiStageUNet2DModel
        >>> model = MultiStageUNet2DModel(
        ...     sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        ... ).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> model = model.compile_stages(warmup={"sample": x, "timestep": 500}, backend="eager")
        >>> model(x, torch.tensor([10, 900])).sample.shape  # two stages, two compiled decoders, no recompilation
        torch.Size([2, 3, 8, 8])

        ```
        """
        arguments = set(inspect.signature(self.forward).parameters) - {"stage_index"}
        if warmup is not None and (not isinstance(warmup, Mapping) or not set(warmup) <= arguments):
            raise ValueError(
                "`warmup` must be a dict of `forward`'s keyword arguments without `stage_index` (every stage is warmed "
                f"up in turn), got {type(warmup).__name__ if not isinstance(warmup, Mapping) else sorted(warmup)}."
            )
        _check_compile_kwargs(compile_kwargs)
        fused = [
            name for name, m in self.named_modules() if getattr(m, "_fused_decoders_max_padding", None) is not None
        ]
        if fused:  # this model's or a staged expert's: named, since disabling them on this model would not do
            calls = ", ".join(f"`{_attribute_path(name)}.disable_fused_decoders()`" for name in fused)
            raise ValueError(
                "`compile_stages` compiles each decoder on its own, which the fused pass cannot run (every mixed batch "
                f"would be decoded stage by stage): call {calls} first, or do not compile."
            )
        regions = self.compile_regions()
        # 1. room for each region's recompiles: the regions of one `forward` share its cache (dynamo keys on code)
        needed = RECOMPILES_PER_REGION * max(Counter(type(region).forward for region in regions).values(), default=0)
        for limit in ("recompile_limit", "accumulated_recompile_limit"):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), needed))
        # 2. compile each region in place; the routing stays eager and picks among the compiled networks
        for region in regions:
            region.compile(**compile_kwargs)
        # 3. warm-up: compile every stage now, one call per stage
        if warmup is not None:
            with torch.no_grad():
                for stage in range(self.num_stages):
                    self(**warmup, stage_index=stage)
        return self


def _attribute_path(name: str) -> str:
    """A submodule's name as code reaches it from the model: ``experts.1`` -> ``model.experts[1]``."""
    return "model" + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".") if part)


def _check_compile_kwargs(compile_kwargs: dict[str, Any]) -> None:
    """`compile_stages`' ``compile_kwargs`` as `torch.compile` would take them, else a `ValueError` naming them."""
    known = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(compile_kwargs) - known)
    if unknown:
        raise ValueError(
            f"`compile_stages` got {unknown}, which are not arguments of `torch.compile` {sorted(known)}."
        )
    try:
        # torch checks ``backend``, ``mode`` and ``options`` here; nothing compiles
        torch.compile(_uncompiled, **compile_kwargs)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"`torch.compile` refuses {compile_kwargs!r} (`compile_stages`' arguments): {error}"
        ) from error


def _uncompiled() -> None:
    """What `_check_compile_kwargs` wraps (never called)."""


DEFAULT_MAX_PADDING = 0.25  # `enable_fused_decoders`: the share of padding rows a fused pass may add


class StagedModelMixin(StageCompileMixin):
    r"""
    Mixin of the package's staged models: one network (a decoder, an expert) per stage of a [`TimestepPartition`].

    A model sets ``self.partition`` in its ``__init__`` (from its ``_check_config``) and routes in its ``forward``
    with [`~StagedModelMixin.route`] (any per-stage callable) or [`~StagedModelMixin.decode`] (per-stage decoders that
    share an encoder's output).
    """

    partition: TimestepPartition
    _supports_fused_decoders: bool = False  # decoders with a channel-packed form (`enable_fused_decoders`)
    _fused_decoders_max_padding: float | None = None  # `None`: fused decoders off

    # ---- saving: diffusers' `auto_map` convention -------------------------------------------------------------
    @classmethod
    def _auto_map_module(cls) -> str | None:
        """The file (without ``.py``) that a saved folder's ``auto_map`` names: the class's module, for the package's
        own classes; `None` (no ``auto_map``) for subclasses defined elsewhere."""
        return cls.__module__.rsplit(".", 1)[-1] if cls.__module__.split(".")[0] == PACKAGE else None

    def to_json_string(self) -> str:
        """The config as `config.json` holds it, with ``auto_map`` (``{"AutoModel": "<file>.<class>"}``): what
        `diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)` follows to this class."""
        config = json.loads(super().to_json_string())
        module = self._auto_map_module()
        if module is not None:
            config["auto_map"] = {"AutoModel": f"{module}.{type(self).__name__}"}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write `config.json` and the re-export file its ``auto_map`` names (an import of the installed class).
        Loading through the package's own classes never reads that file."""
        module = self._auto_map_module()
        if module is not None and not os.path.isfile(save_directory):
            os.makedirs(save_directory, exist_ok=True)
            with open(os.path.join(save_directory, f"{module}.py"), "w", encoding="utf-8") as f:
                f.write(reexport_source(type(self).__module__, type(self).__name__))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        """As diffusers', without the ``auto_map`` entry (it is for `AutoModel`, not a constructor argument)."""
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)

    _stage_networks = "decoders"  # the attribute holding one network per stage

    def enable_group_offload(self, *args, **kwargs) -> None:
        """diffusers' `enable_group_offload` (same arguments), refusing block-level groups of several blocks, which
        would group the stages' networks (see `refuse_grouped_offload`)."""
        refuse_grouped_offload(self, self._stage_networks, args, kwargs)
        super().enable_group_offload(*args, **kwargs)

    @property
    def num_stages(self) -> int:
        """The number of stages (decoders, experts)."""
        return self.partition.num_stages

    def check_inputs(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        stage_index: int | None,
        in_channels: int | None = None,
        multiple_of: int = 1,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Check ``sample`` (of ``dtype``, the dtype of the layer that reads it, when given) and ``timestep`` (values
        only on the routed path, ``stage_index=None``: see `diffusers_stages.models.checks`) and return one timestep
        per sample."""
        check_sample(sample, in_channels, multiple_of=multiple_of, dtype=dtype)
        return per_sample_timesteps(timestep, sample.shape[0], sample.device, check_values=stage_index is None)

    def check_labels(
        self,
        class_labels: torch.Tensor | None,
        batch: int,
        stage_index: int | None,
        num_labels: int | None,
        one_hot: bool = False,
    ) -> None:
        """Check ``class_labels`` against the model's ``class_embedding`` (values only on the routed path)."""
        conditional = getattr(self, "class_embedding", None) is not None
        check_class_labels(class_labels, batch, conditional, num_labels, stage_index is None, one_hot=one_hot)

    def route(
        self,
        timesteps: torch.Tensor,
        stage_index: int | None,
        run_stage: Callable[[int, object], torch.Tensor],
        inputs: object,
        fuse: Callable[[list[int]], Callable[[object], torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        """Run ``run_stage(stage, stage_inputs)`` for each stage on the rows of ``inputs`` that are its own, or the
        one pass ``fuse`` offers (see `dispatch_by_stage`)."""
        return dispatch_by_stage(self.partition, timesteps, stage_index, run_stage, inputs, fuse=fuse)

    def enable_fused_decoders(self, max_padding: float = DEFAULT_MAX_PADDING) -> None:
        r"""
        Decode a mixed batch in one pass through all its stages' decoders, where they have one architecture (same
        modules and parameter shapes: what `from_unet` gives and training from it keeps): the decoders run as one
        network whose channels are theirs side by side (a convolution of all stages is one grouped convolution, a
        group norm one group norm of every stage's groups, a linear layer one batched matrix product; see
        `diffusers_stages.models.packed_decoders`). The pass reads every decoder's parameters stacked on a stage
        axis: this call lays each name's tensors out as rows of one storage (`stack_decoder_storage`; the model's
        `.to()` and casts keep that layout), so the stack is a view of them rather than a copy per forward. It stays
        inside autograd, so gradients reach each decoder, and an optimizer step, a load or a write through
        ``param.data`` is seen by the next call; nothing is added to the state dict. Where the layout is gone (a
        load with ``assign=True``, a `copy.deepcopy`), the tensors are copied into a stack in each forward instead:
        same results, slower. A cast of a laid-out model (``.half()``, ``.to(torch.bfloat16)``) holds each old stack
        until every decoder's copy of it is cast, so it briefly needs the decoders' memory in both dtypes. Outputs
        and gradients are the per-stage path's (to float rounding).

        Each stage's rows are padded to the largest stage count (repeating its last sample), so a batch is fused
        only when that padding adds at most ``max_padding`` of the batch. Otherwise, and with ``stage_index``, a
        batch in one stage, decoders of different architectures, hooks on a decoder (`enable_stage_offload`,
        layerwise casting), compiled decoders (`compile_stages`; it and this call refuse each other), attention
        processors other than diffusers' `AttnProcessor2_0`/`AttnProcessor`, FreeU, or gradient checkpointing while computing gradients, the
        per-stage path runs unchanged. Dropout draws different random numbers than the per-stage path.

        It is off by default because grouped convolutions cost more per FLOP than one convolution over the whole
        batch, which wins back per-decoder overhead only for small decoders. On CPU (one thread), the small benchmark
        model (16x16, widths (32, 64)) decodes a mixed batch of 16 in 0.59-0.99x the per-stage time at 3-16
        stages (a training step at 8 stages: 0.74-0.83x), but a wider model (widths (64, 128, 128), 32x32) 4 stages
        at batch 16 in 0.92-1.08x, depending on the run (`benchmarks/bench_multistage.py --sections mixed`). Not
        measured on a GPU.

        Args:
            max_padding (`float`, defaults to 0.25): the largest share of padding rows (relative to the batch) a
                fused pass may add; 0 fuses only batches split evenly over the stages present.
        """
        if not self._supports_fused_decoders:
            raise ValueError(
                f"`enable_fused_decoders` is not supported by {type(self).__name__}: its decoders have no "
                "channel-packed form (only `MultiStageUNet2DModel`'s do)."
            )
        if isinstance(max_padding, bool) or not isinstance(max_padding, numbers.Real) or not max_padding >= 0:
            raise ValueError(f"`max_padding` must be a number >= 0, got {max_padding!r}.")
        if any(getattr(decoder, "_compiled_call_impl", None) is not None for decoder in self.decoders):
            raise ValueError(
                "`enable_fused_decoders`: the decoders are compiled (`compile_stages`), and compiled decoders run on "
                "their own, so no batch would be fused: enable it on a model that is not compiled."
            )
        self._fused_decoders_max_padding = float(max_padding)
        stack_decoder_storage(self.decoders)

    def _apply(self, fn, *args, **kwargs):
        # `.to()`, `.half()`, `.cuda()`...: new tensors per parameter; lay fused decoders out as one stack again
        module = super()._apply(fn, *args, **kwargs)
        if self._fused_decoders_max_padding is not None:
            stack_decoder_storage(self.decoders)
        return module

    def disable_fused_decoders(self) -> None:
        """Decode mixed batches stage by stage again (the default; see `enable_fused_decoders`)."""
        self._fused_decoders_max_padding = None

    def decode(
        self,
        hidden: torch.Tensor,
        skips: Sequence[torch.Tensor],
        emb: torch.Tensor,
        timesteps: torch.Tensor,
        stage_index: int | None,
    ) -> torch.Tensor:
        """Decode a shared encoder's output (``hidden``, ``skips``, embedding ``emb``) with ``self.decoders``: each
        stage's decoder on its own samples only (the whole batch when one stage holds it). A list of ``skips`` is
        emptied: a decoder frees each skip once it has read it (as `UNet2DModel` does), which the caller's list
        would otherwise keep alive."""

        def run_decoder(stage: int, inputs: list) -> torch.Tensor:
            return self.decoders[stage](*inputs)

        def fuse(counts: list[int]) -> Callable[[list], torch.Tensor] | None:
            # fused only when asked for, within the padding allowed, and for decoders of one architecture
            present = [stage for stage, count in enumerate(counts) if count]
            limit = self._fused_decoders_max_padding
            if limit is None or not fits_padding(counts, limit):
                return None
            run = fused_decoders([self.decoders[stage] for stage in present])
            return (lambda inputs: run(*inputs)) if run is not None else None

        inputs = [hidden, list(skips), emb]
        if isinstance(skips, list):
            skips.clear()
        return self.route(timesteps, stage_index, run_decoder, inputs, fuse=fuse)

    def set_default_attn_processor(self) -> None:
        """Use diffusers' default attention implementation in every decoder or expert, as diffusers' U-Nets do (the
        model must also be an `AttentionMixin`); custom processors of other kinds are a `ValueError`."""
        kinds = {type(processor) for processor in self.attn_processors.values()}
        if kinds <= set(ADDED_KV_ATTENTION_PROCESSORS):
            processor = AttnAddedKVProcessor()
        elif kinds <= set(CROSS_ATTENTION_PROCESSORS):
            processor = AttnProcessor()
        else:
            names = sorted(kind.__name__ for kind in kinds)
            raise ValueError(f"`set_default_attn_processor` needs default attention processors, got {names}.")
        self.set_attn_processor(processor)
