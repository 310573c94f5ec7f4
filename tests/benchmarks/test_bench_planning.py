"""`benchmarks/bench_planning.py` installs nothing: missing data is an error that says what to install, and the
paper's decoder ratios are fitted to a sampling budget."""

import argparse
import os
import subprocess
import sys

import pytest
from diffusers import DDIMScheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import benchmarks.bench_planning as bench
from diffusers_stages import TimestepPartition
from diffusers_stages.planning.budget import expected_flops


def test_missing_fashion_mnist_stops_with_instructions_and_runs_no_command(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the benchmark ran a command: {args}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(bench, "FASHION_TRAIN", str(tmp_path / "missing.gz"))
    with pytest.raises(SystemExit, match="missing: install Debian's dataset-fashion-mnist"):
        bench.load_data("fashion-mnist", 10)
    assert bench.load_data("digits", 5).shape == (5, 1, 8, 8)  # bundled with scikit-learn


def test_paper_ratios_are_scaled_to_fit_the_budget(tiny_unet_kwargs):
    config, partition, scheduler = dict(tiny_unet_kwargs), TimestepPartition([442, 631]), DDIMScheduler()
    budget = expected_flops(config, partition, [(8, 16)] * 3, 4, scheduler)
    widths = bench.paper_widths_at_budget(config, partition, budget, 4, scheduler)
    assert widths[0] > widths[1] > widths[2] and expected_flops(config, partition, widths, 4, scheduler) <= budget


def test_a_row_reports_the_images_it_planned_on_when_the_data_set_has_fewer():
    # scikit-learn's digits hold 1,797 images: a run asked for 10,000 plans on those and must say so
    args = argparse.Namespace(device="cpu", dataset="digits", num_levels=4, num_samples=2, repeats=1, plot=None)
    row = bench.measure(10_000, 0, args)
    assert row["num_images"] == row["chunk_size"] == 1797


def test_the_main_run_says_what_to_install_before_starting_any_worker(monkeypatch, tmp_path):
    # the rows run in worker processes: a missing data set was their error, captured and dropped, and the run ended
    # in a CalledProcessError traceback without the instructions
    def refuse(*args, **kwargs):
        raise AssertionError(f"the benchmark ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(bench, "FASHION_TRAIN", str(tmp_path / "missing.gz"))
    monkeypatch.setattr(sys, "argv", ["bench_planning.py", "--num_images", "10", "--large", "0"])
    with pytest.raises(SystemExit, match="missing: install Debian's dataset-fashion-mnist"):
        bench.main()


def test_a_failing_worker_shows_its_error_and_stops_with_a_message(monkeypatch):
    calls = []

    def failing_worker(command, **kwargs):
        calls.append(kwargs)
        return subprocess.CompletedProcess(command, 1, stdout="")

    monkeypatch.setattr(subprocess, "run", failing_worker)
    monkeypatch.setattr(
        sys, "argv", ["bench_planning.py", "--dataset", "digits", "--num_images", "10", "--large", "0"]
    )
    with pytest.raises(SystemExit, match="exit status 1"):
        bench.main()
    # the worker's stderr goes to the terminal (its error message), only its stdout (the row) is read
    assert len(calls) == 1 and "stderr" not in calls[0] and not calls[0].get("capture_output")


def test_a_cuda_run_waits_for_and_reads_the_device_it_planned_on(monkeypatch):
    # with --device cuda:1 the clock waited for (and the peak was read of) the current device, cuda:0
    from types import SimpleNamespace

    seen = []
    monkeypatch.setattr(bench, "plan_stages", lambda *args, **kwargs: SimpleNamespace(fractions=[0.3, 0.6]))
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda device=None: seen.append(("sync", device)))
    monkeypatch.setattr(
        bench.torch.cuda, "max_memory_allocated", lambda device=None: seen.append(("peak", device)) or 0
    )
    args = argparse.Namespace(device="cuda:1", dataset="digits", num_levels=4, num_samples=2, repeats=1, plot=None)
    bench.measure(10, 0, args)
    assert seen and all(bench.torch.device(device) == bench.torch.device("cuda:1") for _, device in seen)


def test_a_plot_stopped_while_writing_leaves_the_file_that_was_there(monkeypatch, tmp_path):
    # --plot was written in place by matplotlib: a run stopped while saving (a time limit, Ctrl-C) left a truncated PNG
    path = tmp_path / "plan.png"
    path.write_bytes(b"the earlier plot")

    def stopped(plan, target, title=None):
        with open(target, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "plot_plan", stopped)
    args = argparse.Namespace(device="cpu", dataset="digits", num_levels=4, num_samples=2, repeats=1, plot=str(path))
    with pytest.raises(KeyboardInterrupt):
        bench.measure(20, 0, args)
    assert path.read_bytes() == b"the earlier plot" and os.listdir(tmp_path) == ["plan.png"]
