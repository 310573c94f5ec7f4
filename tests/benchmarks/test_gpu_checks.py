"""`benchmarks/gpu_checks.py` on CPU: the sections run, float16 and bfloat16 stay close to float32, a compiled
pipeline gives the eager images and compiles nothing in its second run, fused decoders read their stacks as views,
match the per-stage path and survive a safetensors round trip, and the synchronisation check says it was skipped
rather than passing without CUDA."""

import json
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import gpu_checks  # noqa: E402


def test_the_sections_run_and_report_on_cpu(tmp_path):
    args = gpu_checks.parse_args(["--device", "cpu", "--quick", "--output_dir", str(tmp_path)])
    pipes = gpu_checks.build_pipelines(quick=True)
    assert gpu_checks.synchronisations(pipes, args)[0]["check"].startswith("skipped")
    rows = gpu_checks.precisions(pipes, args)
    assert [row["check"] for row in rows[:3]] == [
        f"MultiStagePipeline, {d}" for d in ("float32", "float16", "bfloat16")
    ]
    assert all(row["finite"] and row["max_abs_diff_to_float32"] < 0.1 for row in rows)
    (compiled,) = gpu_checks.compilation({"DualBackbonePipeline": pipes["DualBackbonePipeline"]}, args)
    assert compiled["graphs_first_run"] >= 2 and compiled["graphs_second_run"] == 0  # both backbones, once each
    assert compiled["max_abs_diff_to_eager"] < 1e-5
    written = []
    gpu_checks.report(rows, str(tmp_path), written, gpu_checks.run_header(args))
    assert os.path.exists(tmp_path / "gpu_checks.json") and len(written) == 9


def test_the_results_file_records_the_command_and_the_machine(tmp_path):
    # the file is what comes back from a lent GPU: without the command, device and versions its figures cannot be
    # told apart from another run's (run_evidence.py's results.json records the same header)
    argv = ["--device", "cpu", "--quick", "--steps", "3", "--output_dir", str(tmp_path)]
    args = gpu_checks.parse_args(argv)
    gpu_checks.report(
        [{"section": "sync", "check": "a", "result": 1.0}], str(tmp_path), [], gpu_checks.run_header(args)
    )
    with open(tmp_path / "gpu_checks.json", encoding="utf-8") as f:
        saved = json.load(f)
    header = saved["header"]
    assert header["command"] == "python benchmarks/gpu_checks.py " + " ".join(argv)
    assert "CPU" in header["machine"] and torch.__version__ in header["machine"]
    assert {"diffusers_stages", "diffusers", "torch"} <= set(header["versions"]) and header["date"].endswith("UTC")
    assert saved["results"] == [{"section": "sync", "check": "a", "result": 1.0}]


def test_the_fused_decoder_section_checks_results_layout_and_saving():
    args = gpu_checks.parse_args(["--device", "cpu", "--quick"])
    rows = gpu_checks.fused_decoders(gpu_checks.build_pipelines(quick=True), args)
    difference, views, saved = (row["result"] for row in rows)
    assert difference < 1e-5
    count, total = views.split(" of ")
    assert count == total and int(total) > 0
    count, total = saved.split(" equal")[0].split(" of ")
    assert count == total and int(total) > 0


def test_the_fused_decoder_section_runs_after_the_compile_section():
    # compiled decoders do not fuse: the section checks an uncompiled copy, as `main` runs it after compilation
    args = gpu_checks.parse_args(["--device", "cpu", "--quick"])
    pipes = gpu_checks.build_pipelines(quick=True)
    gpu_checks.networks(pipes["MultiStagePipeline"])[0].compile_stages(backend="eager")
    difference, views, _ = (row["result"] for row in gpu_checks.fused_decoders(pipes, args))
    assert difference < 1e-5 and views.split(" of ")[0] == views.split(" of ")[1]


def test_a_failing_section_is_a_row_and_the_sections_after_it_still_run(tmp_path, monkeypatch):
    # one device run has a few minutes: a section that fails (an inductor error, say) must not end it
    ran = []

    def fails(pipes, args):
        raise RuntimeError("boom")

    def section(name):
        return lambda pipes, args: ran.append((name, *pipes)) or [{"section": name, "check": "ok", "result": 1.0}]

    monkeypatch.setattr(gpu_checks, "build_pipelines", lambda quick: {"A": None, "B": None})
    monkeypatch.setattr(gpu_checks, "synchronisations", fails)
    for name in ("precisions", "fused_decoders", "compilation"):
        monkeypatch.setattr(gpu_checks, name, section(name))
    args = gpu_checks.parse_args(["--device", "cpu", "--quick", "--output_dir", str(tmp_path)])
    rows = gpu_checks.main(args)
    # the cheap sections first; compilation last, one pipeline at a time (each row written as it ends)
    assert ran == [("precisions", "A", "B"), ("fused_decoders", "A", "B"), ("compilation", "A"), ("compilation", "B")]
    with open(tmp_path / "gpu_checks.json", encoding="utf-8") as f:
        assert json.load(f)["results"] == rows
    assert rows[0]["section"] == "sync" and rows[0]["error"] == "RuntimeError: boom" and len(rows) == 5


def test_the_sync_section_on_a_stand_in_cuda_counts_only_synchronisation_warnings(monkeypatch):
    from tests.fake_cuda import fake_cuda

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)  # a CPU-only torch has none
    args = gpu_checks.parse_args(["--device", "cpu", "--quick"])
    args.device = "cuda"
    pipes = gpu_checks.build_pipelines(quick=True)
    for name in ("MultiStagePipeline", "ExpertRoutingPipeline"):  # a warning other than CUDA's, in every forward
        gpu_checks.networks(pipes[name])[0].register_forward_pre_hook(
            lambda *_: warnings.warn("not a sync", stacklevel=2)
        )
    with fake_cuda():
        rows = gpu_checks.synchronisations(pipes, args)
    assert [row["result"] for row in rows] == ["no synchronisation", 0] * 2
    assert modes == ["error", "default", "warn", "default"] * 2


def test_a_run_stopped_while_writing_keeps_the_rows_written_before(tmp_path, monkeypatch):
    # gpu_session.sh stops this script at its time limit, perhaps while gpu_checks.json is being rewritten: the rows
    # of the sections finished before must stay readable
    written, header = [], gpu_checks.run_header(gpu_checks.parse_args(["--device", "cpu", "--quick"]))
    gpu_checks.report([{"section": "sync", "check": "a", "result": 1.0}], str(tmp_path), written, header)
    before = (tmp_path / "gpu_checks.json").read_bytes()

    def stopped(value, f, **kwargs):
        f.write('{"header": {"comm')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", stopped)
    with pytest.raises(KeyboardInterrupt):
        gpu_checks.report([{"section": "precision", "check": "b", "result": 2.0}], str(tmp_path), written, header)
    assert (tmp_path / "gpu_checks.json").read_bytes() == before and os.listdir(tmp_path) == ["gpu_checks.json"]


def test_a_precision_run_that_fails_leaves_the_pipeline_in_float32_on_the_cpu(monkeypatch):
    # the section's error is one row, and the sections after it use the same pipelines: the fused and compile
    # sections must not measure a float16 copy left on the device by a failed half-precision run
    args = gpu_checks.parse_args(["--device", "cpu", "--quick"])
    pipes = gpu_checks.build_pipelines(quick=True)
    sample = gpu_checks.sample

    def fails_in_float16(pipe, args):
        if gpu_checks.networks(pipe)[0].dtype == torch.float16:
            raise RuntimeError("no float16 kernel")
        return sample(pipe, args)

    monkeypatch.setattr(gpu_checks, "sample", fails_in_float16)
    with pytest.raises(RuntimeError, match="float16"):
        gpu_checks.precisions({"MultiStagePipeline": pipes["MultiStagePipeline"]}, args)
    assert {(p.dtype, p.device.type) for p in pipes["MultiStagePipeline"].unet.parameters()} == {
        (torch.float32, "cpu")
    }


def test_a_synchronisation_names_the_line_that_made_it(monkeypatch):
    # on the GPU the row is all a session gets: "synchronised" must say where, so it can be fixed without a rerun
    from tests.fake_cuda import fake_cuda

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    args = gpu_checks.parse_args(["--device", "cpu", "--quick"])
    args.device = "cuda"
    pipes = gpu_checks.build_pipelines(quick=True)

    def synchronises(*_):  # as torch does under set_sync_debug_mode: an error under "error", a warning under "warn"
        if modes and modes[-1] == "error":
            raise RuntimeError(gpu_checks.SYNC_WARNING)
        if modes and modes[-1] == "warn":
            warnings.warn(gpu_checks.SYNC_WARNING, stacklevel=1)

    line = synchronises.__code__.co_firstlineno
    for name in ("MultiStagePipeline", "ExpertRoutingPipeline"):
        gpu_checks.networks(pipes[name])[0].register_forward_pre_hook(synchronises)
    with fake_cuda():
        rows = gpu_checks.synchronisations(pipes, args)
    assert rows[0]["result"].startswith(f"synchronised at benchmarks/test_gpu_checks.py:{line + 2}: ")
    assert rows[1]["result"] == 1 and rows[1]["where"] == f"benchmarks/test_gpu_checks.py:{line + 4} x1"


def test_a_check_that_fails_sets_the_exit_status_and_is_named_last(tmp_path, monkeypatch, capsys):
    # NaN images in float16, a second compiled run that compiled again, a synchronising `stage_index` forward or a
    # safetensors round trip that lost decoders were table rows only: the script exited 0 and gpu_session.sh's last
    # line said "failed: none"
    bad = {
        "sync": [
            {
                "section": "sync",
                "check": "MultiStagePipeline: forward with stage_index",
                "result": "synchronised at a.py:1",
            },
            {"section": "sync", "check": "MultiStagePipeline: routed forward, synchronisations", "result": 2},
        ],
        "precision": [
            {"section": "precision", "check": "MultiStagePipeline, float32", "finite": True},
            {"section": "precision", "check": "MultiStagePipeline, float16", "finite": False},
        ],
        "fused": [
            {"section": "fused", "check": "fused vs per-stage mixed batch, max abs diff", "result": 1e-6},
            {"section": "fused", "check": "parameter stacks the fused pass reads as views", "result": "70 of 74"},
            {
                "section": "fused",
                "check": "safetensors save_model/load_model round trip",
                "result": "200 of 292 equal",
            },
        ],
        "compile": [{"section": "compile", "check": "A (inductor)", "graphs_first_run": 3, "graphs_second_run": 1}],
    }
    assert gpu_checks.failed_checks([row for rows in bad.values() for row in rows]) == [
        "MultiStagePipeline: forward with stage_index",
        "MultiStagePipeline, float16",
        "parameter stacks the fused pass reads as views",
        "safetensors save_model/load_model round trip",
        "A (inductor)",
    ]
    good = [
        {"section": "sync", "check": "MultiStagePipeline: forward with stage_index", "result": "no synchronisation"},
        {"section": "sync", "check": "skipped: set_sync_debug_mode needs CUDA", "result": None},
        {"section": "fused", "check": "parameter stacks the fused pass reads as views", "result": "74 of 74"},
        {"section": "fused", "check": "safetensors save_model/load_model round trip", "result": "292 of 292 equal"},
        {"section": "compile", "check": "A (inductor)", "graphs_first_run": 3, "graphs_second_run": 0},
    ]
    assert gpu_checks.failed_checks(good) == []
    # main names them on its last line (the end of the output is what a session sees first)
    monkeypatch.setattr(gpu_checks, "build_pipelines", lambda quick: {"A": None})
    monkeypatch.setattr(gpu_checks, "synchronisations", lambda pipes, args: bad["sync"])
    monkeypatch.setattr(gpu_checks, "precisions", lambda pipes, args: bad["precision"])
    monkeypatch.setattr(gpu_checks, "fused_decoders", lambda pipes, args: good[2:4])
    monkeypatch.setattr(gpu_checks, "compilation", lambda pipes, args: good[4:])
    rows = gpu_checks.main(gpu_checks.parse_args(["--device", "cpu", "--quick", "--output_dir", str(tmp_path)]))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "failed checks: MultiStagePipeline: forward with stage_index; MultiStagePipeline, float16"
    assert gpu_checks.failed_checks(rows) == [
        "MultiStagePipeline: forward with stage_index",
        "MultiStagePipeline, float16",
    ]
