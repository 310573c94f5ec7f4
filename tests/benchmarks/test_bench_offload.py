"""`benchmarks/bench_offload.py` runs end to end on CPU (the stage offload modes only; no timing is asserted)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.bench_offload import main


@pytest.mark.slow  # about 20 s of sampling on a shared CPU
def test_runs_on_cpu(capsys):
    results = main(["--device", "cpu", "--steps", "2", "--batch_size", "1", "--repeats", "1"])
    assert list(results) == ["stage_offload", "stage_offload_no_prefetch"]
    assert all(peak is None and seconds > 0 for peak, seconds in results.values())
    assert "4 experts:" in capsys.readouterr().out


def test_each_mode_is_printed_as_ratios_to_the_resident_pipeline_of_the_same_run():
    # the modes' peaks and times were printed alone: the project's benchmarks print ratios to a baseline of the run
    from benchmarks.bench_offload import ratios_to_resident

    results = {"resident": (100.0, 2.0), "model_cpu_offload": (50.0, 3.0), "stage_offload": (25.0, 2.5)}
    assert ratios_to_resident(results) == [
        "model_cpu_offload / resident: peak memory 0.500, time 1.500",
        "stage_offload / resident: peak memory 0.250, time 1.250",
    ]
    assert ratios_to_resident({"stage_offload": (None, 1.0)}) == []  # CPU: no resident baseline measured


def test_threads_sets_torch_s_cpu_threads_before_anything_is_built(monkeypatch):
    # it had no --threads: on a shared 2-core machine its CPU run took 3.2 s per 1-step run at torch's 2 threads
    # against 0.05 s at one
    import torch

    from benchmarks import bench_offload

    seen = []

    def built():
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_offload, "meme_pipeline", built)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            main(["--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]


def test_an_accelerator_without_a_peak_memory_reading_gets_time_ratios():
    # on MPS or XPU every mode runs (the resident pipeline too) but only CUDA reports a peak: the ratios divided
    # None by None and the run ended in a TypeError after measuring everything
    from benchmarks.bench_offload import ratios_to_resident

    results = {"resident": (None, 2.0), "model_cpu_offload": (None, 3.0), "stage_offload": (None, 2.5)}
    assert ratios_to_resident(results) == [
        "model_cpu_offload / resident: peak memory n/a (CUDA only), time 1.500",
        "stage_offload / resident: peak memory n/a (CUDA only), time 1.250",
    ]
