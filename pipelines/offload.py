"""Stage-aware offload: only the running stage's network (a decoder, an expert, a backbone) on the accelerator.

A staged model holds more parameters than one model call runs (MEME's experts, every decoder of a multi-stage
U-Net). `StageOffload` keeps everything else (a shared encoder, the VAE) on the execution device, every stage
network on the offload device, and moves a stage network in when its first call starts, the previous one out. The
moves are made by accelerate hooks on the stage networks (`ModelHook`, `add_hook_to_module`), so the sampling loop
holds no `.to()` call: it only hands over the run's order of stages (`plan`), from which the network of the next
stage is prefetched right after the last call before a switch (on CUDA on a side stream, overlapping that call).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import send_to_device
from diffusers import DiffusionPipeline
from diffusers.hooks import apply_group_offloading
from diffusers.utils.torch_utils import get_device

from ..models.checks import check_device

DEFAULT_NUM_INFERENCE_STEPS = 50  # `StagedDiffusionPipeline.__call__`'s default
CPU = torch.device("cpu")  # `enable_group_offload`'s default offload device, as diffusers'


class StageNetworkHook(ModelHook):
    """The accelerate hook of one stage network: it asks `StageOffload` to make ``unit`` the resident network before
    every forward, and to prefetch the next one after it."""

    def __init__(self, offload: StageOffload, unit: int):
        super().__init__()
        self.offload, self.unit = offload, unit

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.offload.activate(self.unit)
        device = self.offload.device
        return tuple(_send_in_place(arg, device) for arg in args), send_to_device(kwargs, device)

    def post_forward(self, module: torch.nn.Module, output):
        self.offload.after_call(self.unit)
        return output


class StageOffload:
    r"""
    Keeps one stage network (plus, right before a switch, the next one) on ``device`` and the others on
    ``offload_device``; what is not a stage network stays on ``device``.

    Args:
        components (`list[torch.nn.Module]`): the pipeline's model components (stage networks included).
        networks (`list[torch.nn.Module]`): the network of each stage (stage 0 first); a network that serves several
            stages is one unit.
        device (`torch.device`): the execution device.
        offload_device (`torch.device`): where the stage networks wait.
        prefetch (`bool`): move the next stage's network in after the last call before a switch (the peak then holds
            two stage networks for the length of that call).
    """

    def __init__(
        self,
        components: Sequence[torch.nn.Module],
        networks: Sequence[torch.nn.Module],
        device: torch.device,
        offload_device: torch.device,
        prefetch: bool = True,
    ):
        self.device, self.offload_device, self.prefetch = device, offload_device, prefetch
        self.components = list(components)
        self.units: list[torch.nn.Module] = []
        self.unit_of_stage: list[int] = []
        for network in networks:
            known = [k for k, unit in enumerate(self.units) if unit is network]
            if not known:
                self.units.append(network)
            self.unit_of_stage.append(known[0] if known else len(self.units) - 1)
        self.resident: set[int] = set()  # units on `device`
        self.pending: set[int] = set()  # prefetched units whose copy may still run on the side stream
        self.plan: list[int] | None = None  # the units of this run's model calls, in order
        self.cursor = 0
        self.stream = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None

        # 1. everything but the stage networks on the execution device; the stage networks offloaded, with hooks
        for component in self.components:
            _place_outside(component, {id(unit) for unit in self.units}, device)
        for k, unit in enumerate(self.units):
            self._move(k, onload=False)
            add_hook_to_module(unit, StageNetworkHook(self, k))

    # ----------------------------------------------------------------------------------------------------------
    def set_plan(self, stages: Sequence[int]) -> None:
        """The stages of the coming run's model calls, in order (the pipeline's ``expert_schedule``)."""
        self.plan, self.cursor = [self.unit_of_stage[s] for s in stages], 0

    def activate(self, unit: int) -> None:
        """Before a call of ``unit``: every other unit out, ``unit`` in (waiting for its prefetch, if any)."""
        if self.plan is not None and (self.cursor >= len(self.plan) or self.plan[self.cursor] != unit):
            self.plan = None  # a call the plan did not announce: no prefetch for the rest of this run
        for other in sorted(self.resident - {unit}):
            self._move(other, onload=False)
        if unit not in self.resident:
            self._move(unit, onload=True)
        self._wait(unit)

    def after_call(self, unit: int) -> None:
        """After a call of ``unit`` (its work queued): prefetch the next call's unit when the stage switches."""
        if self.plan is None:
            return
        self.cursor += 1
        upcoming = self.plan[self.cursor] if self.cursor < len(self.plan) else None
        if self.prefetch and upcoming is not None and upcoming != unit and upcoming not in self.resident:
            if self.stream is None:
                self._move(upcoming, onload=True)
                return
            with torch.cuda.stream(self.stream):
                self._move(upcoming, onload=True, non_blocking=True)
            self.pending.add(upcoming)

    def offload_all(self) -> None:
        """Every stage network back to the offload device (the end of a run)."""
        for unit in sorted(self.resident):
            self._move(unit, onload=False)
        self.plan = None

    def remove(self) -> None:
        """Remove the hooks, with the whole pipeline on the offload device (as it was before offloading)."""
        self.offload_all()
        for unit in self.units:
            remove_hook_from_module(unit)
        for component in self.components:
            _place_outside(component, {id(unit) for unit in self.units}, self.offload_device)

    # ----------------------------------------------------------------------------------------------------------
    def _move(self, unit: int, onload: bool, non_blocking: bool = False) -> None:
        """The one place a stage network moves: onto the execution device (``onload``) or off it."""
        if not onload:
            self._wait(unit)  # a prefetch still copying in must finish before the copy out
        self.units[unit].to(self.device if onload else self.offload_device, non_blocking=non_blocking)
        (self.resident.add if onload else self.resident.discard)(unit)

    def _wait(self, unit: int) -> None:
        """Make the compute stream wait for ``unit``'s prefetch; its tensors, allocated on the side stream, are
        marked as used by the compute stream so that freeing them later waits for it."""
        if unit not in self.pending:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for tensor in [*self.units[unit].parameters(), *self.units[unit].buffers()]:
            tensor.data.record_stream(current)
        self.pending.discard(unit)


def offloaded_on_error(call: Callable) -> Callable:
    """Decorates a pipeline's ``__call__``: a run stopped by an exception (a callback raising, Ctrl-C) ends as a
    finished one does under `enable_stage_offload`, every stage network back on the offload device, so that no
    prefetch is still copying (on its side stream) when the pipeline is saved, cast or read next."""

    @functools.wraps(call)
    def run(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        except BaseException:
            if self._stage_offload is not None:
                self._stage_offload.offload_all()
            raise

    return run


class StageOffloadMixin:
    """What `StagedDiffusionPipeline` adds to diffusers' offloading: `enable_stage_offload` (only the running stage's
    network on the accelerator) and the refusals that keep it apart from diffusers' own offload modes. The pipeline
    hands the hooks each run's stage order (`expert_schedule`) from its sampling loop."""

    _stage_offload: StageOffload | None = None

    def stage_network(self, stage: int) -> torch.nn.Module:
        """The module only ``stage`` runs: its decoder when the stages share an encoder (``decoders[stage]`` of a
        multi-stage U-Net, which the pipeline calls with ``stage_index=stage``), else its whole denoiser (an expert, a
        backbone; one that is itself a multi-stage U-Net routes among its own decoders, which are not the pipeline's
        stages)."""
        model, kwargs = self.stage_denoiser(stage)
        decoders = getattr(model, "decoders", None)
        shared = kwargs.get("stage_index") == stage and isinstance(decoders, torch.nn.ModuleList)
        return decoders[stage] if shared else model

    def enable_stage_offload(
        self,
        device: torch.device | str | None = None,
        offload_device: torch.device | str = "cpu",
        prefetch: bool = True,
    ) -> None:
        r"""
        Keep only the running stage's network (a decoder, an expert, a backbone) on the accelerator: the others wait
        on ``offload_device`` and each moves in when its stage starts, the previous one out, by accelerate hooks on
        the networks. Everything else (a shared encoder, the VAE) stays on ``device``. Peak accelerator memory is
        then the rest of the pipeline plus the largest stage network; with ``prefetch`` the next stage's network is
        moved in during the last call before a switch (on CUDA on a side stream, overlapping that call), so for that
        call two stage networks are resident. Images are the same as without offload.

        It replaces `enable_model_cpu_offload` (which moves whole components, every stage network at once) and is
        refused with it, with `enable_sequential_cpu_offload`, with group offloading and with a ``device_map``. Move
        the pipeline (``pipe.to(device)``; a dtype alone may change) and copy it with `from_pipe` only after
        `disable_stage_offload` (or `remove_all_hooks`, which removes these hooks too): the hooks track where each
        network is, and both are refused before (so is `enable_stage_offload` of another pipeline built on the same
        networks).

        Args:
            device (`torch.device` or `str`, *optional*): the execution device; defaults to the accelerator found
                (as `enable_model_cpu_offload`). ``"cpu"`` is accepted (the moves then cost nothing; for tests).
            offload_device (`torch.device` or `str`, defaults to `"cpu"`): where the waiting networks are kept.
            prefetch (`bool`, defaults to `True`): move the next stage's network in ahead of the switch.
        """
        if not isinstance(prefetch, bool):
            raise ValueError(f"`prefetch` must be a bool, got {prefetch!r}.")
        self.check_components()  # a component swapped in since construction, before its networks are hooked
        hooks = {name: getattr(component, "_hf_hook", None) for name, component in self.components.items()}
        hooked = [name for name, hook in hooks.items() if hook is not None and not isinstance(hook, StageNetworkHook)]
        # a device map of one device (`from_pretrained(folder, device_map="cpu")`) places nothing, as diffusers reads it
        if hooked or getattr(self, "_all_hooks", None) or self._is_pipeline_device_mapped():
            raise ValueError(
                "`enable_stage_offload` cannot be combined with `enable_model_cpu_offload`, "
                f"`enable_sequential_cpu_offload` or a `device_map` (hooked components: {hooked or 'none'}, "
                f"device map: {self.hf_device_map}): call `remove_all_hooks()` / `reset_device_map()` first."
            )
        if self._maybe_raise_error_if_group_offload_active():
            raise ValueError(
                "`enable_stage_offload` cannot be combined with group offloading (`enable_group_offload`, "
                "`apply_group_offloading`), which moves the same weights by its own hooks (diffusers refuses its "
                "model and sequential offload with it too): load the pipeline again without group offloading."
            )
        if device is None and get_device() == "cpu":
            raise ValueError(
                "`device` must be given on a machine without an accelerator, got None (`device='cpu'` runs the "
                "hooks on the CPU, where the moves cost nothing)."
            )
        device = check_device(get_device() if device is None else device, "device")
        offload_device = check_device(offload_device, "offload_device")
        if device.type not in ("cpu", "mps") and device.index is None:
            device = torch.device(device.type, torch.get_device_module(device.type).current_device())
        networks = self._stage_networks()
        own = self._stage_offload
        foreign = [
            f"stage {stage} ({type(network).__name__})"
            for stage, network in enumerate(networks)
            if hasattr(network, "_hf_hook")
            and not (isinstance(network._hf_hook, StageNetworkHook) and network._hf_hook.offload is own)
        ]
        if foreign:
            raise ValueError(
                f"`enable_stage_offload` cannot hook {', '.join(foreign)}: these stage networks are offloaded by "
                "another pipeline built on them (or carry other accelerate hooks), which would lose track of them. "
                "Call `disable_stage_offload()` (or `remove_all_hooks()`) on that pipeline first."
            )
        self.disable_stage_offload()  # enabling again replaces the hooks
        self._stage_offload = StageOffload(self._model_components(), networks, device, offload_device, prefetch)

    def _stage_networks(self, num_stages: int | None = None) -> list[torch.nn.Module]:
        """The network of each stage (`stage_network`), stage 0 first (``num_stages``: a partition's, already
        resolved)."""
        num_stages = self._num_stages() if num_stages is None else num_stages
        return [self.stage_network(stage) for stage in range(num_stages)]

    def _num_stages(self) -> int:
        """How many stages the pipeline routes among, whatever the step count: its partition's for the sampling
        default (a subclass whose partition depends on the step count, as `DualBackbonePipeline`'s step fraction,
        says its number of stages without one: the default may be a count its scheduler refuses)."""
        return self.resolve_partition(DEFAULT_NUM_INFERENCE_STEPS).num_stages

    def _model_components(self) -> list[torch.nn.Module]:
        """The pipeline's components that are modules (what `StageOffload` places)."""
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    def _plan_stage_offload(self, stages: Sequence[int], num_stages: int) -> None:
        """Under `enable_stage_offload`, hand the hooks the coming run's stages (``expert_schedule``'s, of its
        partition's ``num_stages``), after hooking the pipeline again if a component was swapped in since
        (``pipe.unet = ...``, which diffusers registers unchecked): its networks are then offloaded too, and the
        replaced one is left unhooked on the offload device. Called by the sampling loop."""
        offload = self._stage_offload
        if offload is None:
            return
        hooked = [offload.units[unit] for unit in offload.unit_of_stage]
        if not _same_modules(hooked, self._stage_networks(num_stages)) or not _same_modules(
            offload.components, self._model_components()
        ):
            self.enable_stage_offload(offload.device, offload.offload_device, offload.prefetch)
        self._stage_offload.set_plan(stages)

    def disable_stage_offload(self) -> None:
        """Remove the hooks of `enable_stage_offload`, leaving the whole pipeline on the offload device (move it with
        ``pipe.to(...)``)."""
        if self._stage_offload is not None:
            self._stage_offload.remove()
            self._stage_offload = None

    @property
    def _execution_device(self) -> torch.device:
        if self._stage_offload is not None:
            return self._stage_offload.device
        return super()._execution_device

    def maybe_free_model_hooks(self) -> None:
        """As diffusers', and, under `enable_stage_offload`, the last stage network back to the offload device."""
        super().maybe_free_model_hooks()
        if self._stage_offload is not None:
            self._stage_offload.offload_all()

    def remove_all_hooks(self) -> None:
        """As diffusers' (the hooks of `enable_model_cpu_offload` and `enable_sequential_cpu_offload`), and those of
        `enable_stage_offload` too (see `disable_stage_offload`)."""
        self.disable_stage_offload()
        super().remove_all_hooks()

    def to(self, *args, **kwargs) -> StageOffloadMixin:
        """As diffusers' `DiffusionPipeline.to`; under `enable_stage_offload` a dtype may change, but a device move is
        a `ValueError` (the hooks decide where each stage network is)."""
        device = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        if self._stage_offload is not None and device is not None:
            raise ValueError(
                f"`pipe.to(device)` cannot be combined with `enable_stage_offload` (got device {device!r}; the hooks "
                f"keep the pipeline on {self._stage_offload.device} and the waiting stage networks on "
                f"{self._stage_offload.offload_device}): call `disable_stage_offload()` first."
            )
        return super().to(*args, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> StageOffloadMixin:
        """As diffusers' `from_pipe`, refused for a pipeline under `enable_stage_offload`: the stage networks the new
        pipeline would share carry that pipeline's hooks."""
        if getattr(pipeline, "_stage_offload", None) is not None:
            raise ValueError(
                "`from_pipe` cannot copy a pipeline with `enable_stage_offload`: its stage networks, which the new "
                "pipeline would share, carry its hooks. Call `pipeline.disable_stage_offload()` first, then "
                "`enable_stage_offload` on the pipeline you sample with."
            )
        return super().from_pipe(pipeline, **kwargs)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """As diffusers', refused under `enable_stage_offload`; a ``device`` this machine lacks, or a ``gpu_id`` that
        is not an index, is a `ValueError` before anything moves."""
        self._refuse_with_stage_offload("enable_model_cpu_offload")
        _check_offload_arguments(gpu_id, device)
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """As diffusers', refused under `enable_stage_offload`; a ``device`` this machine lacks, or a ``gpu_id`` that
        is not an index, is a `ValueError` before anything moves."""
        self._refuse_with_stage_offload("enable_sequential_cpu_offload")
        _check_offload_arguments(gpu_id, device)
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_group_offload(
        self,
        onload_device: torch.device,
        offload_device: torch.device = CPU,
        offload_type: str = "block_level",
        num_blocks_per_group: int | None = None,
        non_blocking: bool = False,
        use_stream: bool = False,
        record_stream: bool = False,
        low_cpu_mem_usage: bool = False,
        offload_to_disk_path: str | None = None,
        exclude_modules: str | list[str] | None = None,
    ) -> None:
        """As diffusers', refused under `enable_stage_offload`; with ``offload_to_disk_path`` each component writes
        its groups under its own sub-folder (``<offload_to_disk_path>/<component>``): diffusers names a group's file
        after the group's name inside its component, so the two backbones of one architecture (`DualBackbonePipeline`)
        shared files and one sampled with the other's weights."""
        self._refuse_with_stage_offload("enable_group_offload")
        options = {
            "onload_device": onload_device,
            "offload_device": offload_device,
            "offload_type": offload_type,
            "num_blocks_per_group": num_blocks_per_group,
            "non_blocking": non_blocking,
            "use_stream": use_stream,
            "record_stream": record_stream,
            "low_cpu_mem_usage": low_cpu_mem_usage,
        }
        if offload_to_disk_path is None:
            super().enable_group_offload(**options, exclude_modules=exclude_modules)
            return
        # diffusers' loop over the components, each given its own folder
        excluded = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules or [])
        for name, component in self.components.items():
            if name in excluded or not isinstance(component, torch.nn.Module):
                continue
            folder = os.path.join(offload_to_disk_path, name)
            if hasattr(component, "enable_group_offload"):
                component.enable_group_offload(**options, offload_to_disk_path=folder)
            else:
                apply_group_offloading(module=component, **options, offload_to_disk_path=folder)
        for name in excluded:  # kept on the execution device, as diffusers keeps them
            if isinstance(getattr(self, name, None), torch.nn.Module):
                getattr(self, name).to(onload_device)

    def _refuse_with_stage_offload(self, method: str) -> None:
        if self._stage_offload is not None:
            raise ValueError(
                f"`{method}` cannot be combined with `enable_stage_offload`, which already keeps one stage network "
                "on the accelerator at a time: call `disable_stage_offload()` first."
            )


def _check_offload_arguments(gpu_id: int | None, device: torch.device | str | None) -> None:
    """diffusers' offload arguments: ``gpu_id`` None or an index, ``device`` None or a device this machine has
    (diffusers accepts a missing accelerator until the first call, and reads a bad ``gpu_id`` as part of a device
    string)."""
    if gpu_id is not None and (isinstance(gpu_id, bool) or not isinstance(gpu_id, int) or gpu_id < 0):
        raise ValueError(f"`gpu_id` must be a non-negative integer (the accelerator's index) or None, got {gpu_id!r}.")
    if device is not None:
        check_device(device, "device")


def _same_modules(first: Sequence[torch.nn.Module], second: Sequence[torch.nn.Module]) -> bool:
    """Whether ``first`` and ``second`` hold the same module objects, in the same order."""
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))


def _send_in_place(value, device: torch.device):
    """``value`` on ``device`` (`send_to_device`), a list in place: a network that empties a list it is handed (a
    decoder its skips, each freed once read) then empties the caller's, not a copy that leaves the caller's list
    holding every tensor to the end of the call."""
    if isinstance(value, list):
        value[:] = [send_to_device(item, device) for item in value]
        return value
    return send_to_device(value, device)


def _place_outside(module: torch.nn.Module, skip: set[int], device: torch.device) -> None:
    """Move ``module``'s parameters and buffers to ``device``, except those of the submodules in ``skip`` (ids)."""
    if id(module) in skip:
        return
    module._apply(lambda tensor: tensor.to(device), recurse=False)
    for child in module.children():
        _place_outside(child, skip, device)
