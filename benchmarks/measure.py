"""Measuring helpers shared by every benchmark: FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (the
library's `diffusers_stages.evaluation.count_flops`), and wall times (each call's, or their medians) of callables
timed in interleaved rounds.

The scripts put the repository root on ``sys.path`` and import this as ``benchmarks.measure``, as the
``benchmarks.evidence`` package does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from diffusers_stages.cli import check_output_file, write_atomically
from diffusers_stages.evaluation import count_flops  # the library's; re-exported for the benchmarks
from diffusers_stages.models.checks import check_device

__all__ = [
    "count_flops",
    "default_device",
    "device_option",
    "interleaved_medians",
    "integer_at_least",
    "interleaved_times",
    "non_negative_int",
    "open_fraction",
    "output_file",
    "output_folder",
    "positive_int",
    "write_json",
    "write_text",
]


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (a step count, a batch size, repeats), else a usage error naming it."""
    return integer_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0 (0: skip), else a usage error naming it."""
    return integer_at_least(text, 0)


def integer_at_least(text: str, low: int) -> int:
    """``text`` as an integer >= ``low``, else an `argparse.ArgumentTypeError` saying so (for an argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """An argparse ``type``: a number strictly between 0 and 1 (a share of the steps), else a usage error."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:  # nan too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


def output_file(text: str) -> str:
    """An argparse ``type``: a file path that can be written (not a folder; see the package's `check_output_file`),
    checked before the run rather than when its result is written."""
    try:
        check_output_file(text, "path")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def output_folder(text: str) -> str:
    """An argparse ``type``: a folder that results can be written into (created where missing; not a file, nor a
    path inside one), checked before the run rather than when its first result is written. An empty path is
    refused (it would be the current folder, unasked)."""
    if not text:
        raise argparse.ArgumentTypeError("must name a folder, got ''")
    path = os.path.abspath(text)
    while not os.path.exists(path) and os.path.dirname(path) != path:  # the nearest part that is there
        path = os.path.dirname(path)
    if not os.path.isdir(path):  # the folder is a file, or lies inside one
        raise argparse.ArgumentTypeError(f"must be a folder that can be written (or created), got {text!r}")
    return text


def device_option(text: str) -> str:
    """An argparse ``type``: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``; see the library's
    `check_device`), else a usage error."""
    try:
        check_device(text, "--device")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def default_device() -> str:
    """The benchmarks' default ``--device``: ``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_text(path: str, text: str) -> None:
    """Write a results file atomically: a run stopped while writing it (a time limit, Ctrl-C) leaves the file as it
    was before, not truncated."""

    def write(partial: str) -> None:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)


def write_json(path: str, value: object) -> None:
    """Write ``value`` as indented JSON to ``path`` atomically (see `write_text`)."""

    def write(partial: str) -> None:
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)

    write_atomically(path, write)


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` before the clock is read: accelerators run asynchronously (CUDA, MPS,
    XPU, ...; the benchmarks' ``--device`` takes any this machine has), so without it a call's time would be its
    kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)  # the accelerator's own (torch >= 2.6, the package's floor)


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    warmup_before_each: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    baseline: str | None = None,
) -> dict[str, float]:
    """Median wall time in seconds of each callable over ``repeats`` timed calls, timed in interleaved rounds
    (A, B, C, A, B, C, ...) so that drifts in machine load hit all of them alike: the medians of `interleaved_times`,
    which takes the same arguments (and keeps every call's time, for the spread of the repeats).

    Returns:
        ``{name: median seconds of one call}``, in the order of ``fns`` (with ``baseline``: the median of the
        per-round differences from that callable's time).

    Example:

    ```py
    >>> medians = interleaved_medians({"a": lambda: sum(range(1000)), "b": lambda: sorted(range(1000))}, repeats=3)
    >>> list(medians), all(seconds > 0 for seconds in medians.values())
    (['a', 'b'], True)

    ```
    """
    times = interleaved_times(fns, repeats, device, warmup, warmup_before_each, clock, baseline)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    warmup_before_each: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    baseline: str | None = None,
) -> dict[str, list[float]]:
    """Wall time in seconds of every timed call of each callable, timed in interleaved rounds (A, B, C, A, B, C, ...)
    so that drifts in machine load hit all of them alike; `interleaved_medians` gives their medians. Their spread
    shows what the medians hide: a job that started during one callable's calls slows only its repeats.

    Args:
        fns: the callables by name, each called without arguments.
        repeats: timed calls of each callable (rounds).
        device: where the callables run; on an accelerator (CUDA, MPS, XPU, ...) the device is synchronized before
            the clock starts and stops.
        warmup: untimed rounds (interleaved the same way) before the first timed one.
        warmup_before_each: untimed calls of a callable right before each of its timed calls, so that every timed
            call follows a call of the same callable (a cache-warm measurement).
        clock: the clock read around each call; ``time.process_time`` gives this process's CPU seconds instead of
            wall seconds (steadier on a shared machine, where wall time also counts the time other jobs hold the
            cores).
        baseline: the name of one callable: then each value is the per-round *difference* from that callable's time
            (paired, the rounds alternating forward and reverse order), whose median resolves differences far below
            the spread of the times themselves.

    Returns:
        ``{name: [seconds of each timed call, round by round]}``, in the order of ``fns``.
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1, got {repeats}.")
    if baseline is not None and baseline not in fns:
        raise ValueError(f"`baseline` must name one of {list(fns)}, got {baseline!r}.")
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(repeats):
        items = list(fns.items())
        for name, fn in items if baseline is None or round_index % 2 == 0 else items[::-1]:
            for _ in range(warmup_before_each):
                fn()
            _synchronize(device)  # the clock must not count work queued before this call
            start = clock()
            fn()
            _synchronize(device)
            times[name].append(clock() - start)
    if baseline is not None:
        base = times[baseline]
        return {name: [a - b for a, b in zip(values, base)] for name, values in times.items()}
    return times
