"""The benchmarks' shared measuring helpers (`benchmarks/measure.py`): exact FLOP counts, and call counts of the
interleaved timing (no assertion on how long anything takes)."""

import doctest
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import benchmarks.measure
from benchmarks.measure import count_flops, interleaved_medians, interleaved_times


def test_count_flops_of_a_matmul_and_its_backward():
    a, b = torch.ones(3, 5, requires_grad=True), torch.ones(5, 7)
    flops, result = count_flops(lambda: a @ b)
    assert flops == 2 * 3 * 5 * 7 and torch.equal(result, torch.full((3, 7), 5.0))
    flops, _ = count_flops(lambda: (a @ b).sum().backward())
    assert flops == 2 * (2 * 3 * 5 * 7)  # forward, and the gradient of `a` (`b` needs none)
    assert count_flops(lambda: "no tensors") == (0, "no tensors")


@pytest.mark.parametrize("warmup, warmup_before_each", [(1, 0), (0, 0), (2, 1)])
def test_interleaved_medians_calls_in_rounds(warmup, warmup_before_each):
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or sum(range(1000))) for name in ("a", "b", "c")}
    medians = interleaved_medians(fns, repeats=3, warmup=warmup, warmup_before_each=warmup_before_each)
    assert list(medians) == ["a", "b", "c"] and all(seconds > 0 for seconds in medians.values())
    timed_round = [name for name in fns for _ in range(warmup_before_each + 1)]
    assert calls == ["a", "b", "c"] * warmup + timed_round * 3
    with pytest.raises(ValueError, match="repeats"):
        interleaved_medians(fns, repeats=0)


def test_paired_differences_alternate_the_order_and_subtract_the_baseline_per_round():
    calls, ticks = [], iter(range(1000))
    cost = {"a": 1, "b": 3}

    def clock() -> float:  # a fake clock: each call of `name` takes cost[name] ticks
        return float(next(ticks) if not calls else sum(cost[n] for n in calls))

    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    differences = interleaved_medians(fns, repeats=4, warmup=0, clock=clock, baseline="a")
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert differences == {"a": 0.0, "b": 2.0}
    calls.clear()
    with pytest.raises(ValueError, match="baseline"):
        interleaved_medians(fns, repeats=1, baseline="c")
    assert calls == []  # refused before the warm-up runs anything


def test_interleaved_times_keeps_every_timed_call_for_the_spread_of_the_repeats():
    # the medians alone hid a job that slowed 2 of a method's 3 repeats: every repeat's time is kept, in round order
    calls, ticks = [], iter(range(1000))
    cost = {"a": [1, 5, 2], "b": [3, 3, 4]}  # the ticks of each timed call of `name`, in turn

    def clock() -> float:
        return float(next(ticks) if not calls else sum(cost[n][calls[:i].count(n)] for i, n in enumerate(calls)))

    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = interleaved_times(fns, repeats=3, warmup=0, clock=clock)
    assert times == {"a": [1.0, 5.0, 2.0], "b": [3.0, 3.0, 4.0]}
    calls.clear()
    ticks = iter(range(1000))
    assert interleaved_medians(fns, repeats=3, warmup=0, clock=clock) == {"a": 2.0, "b": 3.0}  # the same runs' medians
    with pytest.raises(ValueError, match="repeats"):
        interleaved_times(fns, repeats=0)


def test_docstring_examples():
    assert doctest.testmod(benchmarks.measure, optionflags=doctest.ELLIPSIS).failed == 0


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda"])
def test_every_accelerator_is_synchronized_around_a_timed_call(device, monkeypatch):
    # `--device mps` (or xpu) passes the benchmarks' device check, but only CUDA was synchronized: the clock then
    # stopped when the kernels were queued, not run, and the medians and ratios measured launches only
    synced = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: synced.append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(torch.device(device)))
    interleaved_times({"a": lambda: None}, repeats=2, device=device, warmup=0)
    assert synced == [torch.device(device)] * 4  # before and after each of the two timed calls
    synced.clear()
    interleaved_times({"a": lambda: None}, repeats=2, device="cpu", warmup=0)
    assert synced == []
