"""Stage-aware offload: only the running stage's network (a decoder, an expert, a backbone) on the accelerator.

A staged model holds more parameters than one model call runs (MEME's experts, every decoder of a multi-stage
U-Net). `StageOffload` keeps everything else (a shared encoder, the VAE) on the execution device, every stage
network on the offload device, and moves a stage network in when its first call starts, the previous one out. The
moves are made by accelerate hooks on the stage networks (`ModelHook`, `add_hook_to_module`), so the sampling loop
holds no `.to()` call: it only hands over the run's order of stages (`plan`), from which the network of the next
stage is prefetched right after the last call before a switch (on CUDA on a side stream, overlapping that call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import send_to_device


class StageNetworkHook(ModelHook):
    """The accelerate hook of one stage network: it asks `StageOffload` to make ``unit`` the resident network before
    every forward, and to prefetch the next one after it."""

    def __init__(self, offload: StageOffload, unit: int):
        super().__init__()
        self.offload, self.unit = offload, unit

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.offload.activate(self.unit)
        return send_to_device(args, self.offload.device), send_to_device(kwargs, self.offload.device)

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


def _place_outside(module: torch.nn.Module, skip: set[int], device: torch.device) -> None:
    """Move ``module``'s parameters and buffers to ``device``, except those of the submodules in ``skip`` (ids)."""
    if id(module) in skip:
        return
    module._apply(lambda tensor: tensor.to(device), recurse=False)
    for child in module.children():
        _place_outside(child, skip, device)
