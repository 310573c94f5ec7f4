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
