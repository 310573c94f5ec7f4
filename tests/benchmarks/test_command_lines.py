"""The benchmark scripts' command lines: a step count, batch size or repeat count below 1, a device torch does not
know or this machine lacks, or an unknown compile backend is a usage error (exit 2) naming the option, before any
model is built (they were tracebacks from deep inside a run: ZeroDivisionError, CUDA's AttributeError, ...)."""

import ast
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import (  # noqa: E402
    bench_experts,
    bench_multistage,
    bench_offload,
    bench_planning,
    bench_text_to_image,
    gpu_checks,
    run_evidence,
)


def _parse(script, argv):
    if script is bench_experts:  # reads sys.argv in `main`
        sys.argv = ["bench_experts.py", *argv]
        return bench_experts.main()
    if script is bench_offload:
        return bench_offload.main(argv)
    if script is bench_planning:
        return bench_planning.parse_args(argv)
    return script.parse_args(argv)


SCRIPTS = {
    bench_experts: ["--steps", "--batch_size", "--repeats", "--threads", "--timing_batch", "--evidence_steps"],
    bench_multistage: ["--width", "--resolution", "--steps", "--train_batch", "--repeats", "--threads"],
    bench_offload: ["--steps", "--batch_size", "--repeats", "--threads"],
    bench_planning: ["--num_images", "--num_samples", "--num_levels", "--repeats", "--budget_steps"],
    bench_text_to_image: ["--latent_size", "--steps", "--train_batch", "--repeats", "--routing_repeats"],
    gpu_checks: ["--steps", "--batch_size", "--repeats"],
    run_evidence: ["--budget_steps"],
}
BAD_DEVICES = ["gpu", "cuda:99"] if torch.cuda.is_available() else ["gpu", "cuda"]


@pytest.mark.parametrize("script", list(SCRIPTS), ids=lambda s: s.__name__.split(".")[-1])
def test_bad_numbers_and_devices_are_usage_errors(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for option in SCRIPTS[script]:
        for value in ("0", "-3", "two"):
            with pytest.raises(SystemExit) as exit_:
                _parse(script, [option, value])
            assert exit_.value.code == 2
            assert f"argument {option}: must be an integer >= 1, got '{value}'" in capsys.readouterr().err
    for device in BAD_DEVICES:
        with pytest.raises(SystemExit):
            _parse(script, ["--device", device])
        error = capsys.readouterr().err
        assert "argument --device:" in error and repr(device) in error


def test_run_evidence_refuses_fewer_than_two_samples_per_score(capsys):
    # --num_eval_samples 1 passed the command line and the run then failed in the metric's floor with a ValueError
    # naming `images` (a Frechet distance needs two samples), not the option
    assert run_evidence.parse_args(["--quick", "--num_eval_samples", "2"]).num_eval_samples == 2
    for value in ("1", "0", "-3", "two"):
        with pytest.raises(SystemExit) as exit_:
            run_evidence.parse_args(["--quick", "--num_eval_samples", value])
        error = capsys.readouterr().err
        assert (
            exit_.value.code == 2 and f"argument --num_eval_samples: must be an integer >= 2, got '{value}'" in error
        )


def test_zero_means_skip_where_documented(capsys):
    assert bench_planning.build_parser().parse_args(["--large", "0"]).large == 0
    with pytest.raises(SystemExit):
        bench_planning.build_parser().parse_args(["--large", "-1"])
    assert "argument --large: must be an integer >= 0, got '-1'" in capsys.readouterr().err


def test_an_unknown_compile_backend_is_a_usage_error(capsys):
    assert gpu_checks.parse_args(["--device", "cpu", "--quick"]).backend == "eager"
    with pytest.raises(SystemExit):
        gpu_checks.parse_args(["--device", "cpu", "--backend", "no_such_backend"])
    assert "--backend must be a torch.compile backend" in capsys.readouterr().err


def test_the_default_device_is_one_this_machine_has():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for script in (bench_multistage, bench_text_to_image, gpu_checks, run_evidence):
        assert script.parse_args([]).device == expected


def test_the_scripts_import_the_package_before_putting_the_repository_root_on_the_path():
    # the checkout's `diffusers_stages` folder lacks `pipelines` (setup.py maps it in at install): first on the path,
    # it would shadow a regular (not editable) install, as on a GPU machine where gpu_session.sh installs the package
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = False
        for node in tree.body:
            if isinstance(node, ast.Expr) and "sys.path.insert" in ast.unparse(node):
                assert imported, f"{name} puts the repository root on sys.path before importing diffusers_stages"
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [getattr(node, "module", "")]
            imported |= isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (m or "").split(".")[0] == "diffusers_stages" for m in modules
            )


def test_other_bad_values_are_usage_errors(capsys, monkeypatch, tmp_path):
    # they were tracebacks once the models were built (a ValueError of the pipeline, of get_preset) or after the run
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for value in ("0", "1", "1.5", "nan", "two"):
        with pytest.raises(SystemExit) as exit_:
            _parse(bench_experts, ["--switch_step_fraction", value])
        assert exit_.value.code == 2
        assert f"argument --switch_step_fraction: must be a number in (0, 1), got '{value}'" in capsys.readouterr().err
    for argv in (["--budget_fd", "--preset", "bogus"], ["--plot", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_:
            _parse(bench_planning, argv)
        assert exit_.value.code == 2 and f"argument {argv[-2]}" in capsys.readouterr().err


def test_bench_planning_refuses_options_its_mode_would_ignore(capsys):
    # --budget_steps 50 without --budget_fd ran the timing benchmark and ignored it; --compare --budget_fd ran one
    for argv, message in (
        (["--budget_steps", "50"], "--budget_steps"),
        (["--preset", "gpu"], "--preset"),
        (["--preset", "quick"], "--preset"),  # the default's name was accepted and ignored
        (["--compare", "--budget_fd"], "--compare"),
    ):
        with pytest.raises(SystemExit) as exit_:
            bench_planning.parse_args(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert bench_planning.parse_args(["--budget_fd", "--budget_steps", "50"]).budget_steps == 50
    assert bench_planning.parse_args(["--budget_fd"]).preset == "quick"  # the documented default


def test_run_evidence_refuses_a_comparison_named_twice(capsys):
    # --comparisons 1,1 ran comparison 1 twice and wrote each of its rows twice into the table
    assert run_evidence.parse_args(["--comparisons", "3, 1"]).comparisons == ("3", "1")
    with pytest.raises(SystemExit) as exit_:
        run_evidence.parse_args(["--comparisons", "1,1"])
    assert exit_.value.code == 2 and "--comparisons" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--steps", "--evidence_steps"])
def test_bench_experts_refuses_a_single_step(option, capsys, monkeypatch):
    # one step passed --steps' check, then the dual backbone's step-fraction switch stopped the run in a traceback
    # once sections 1 (and 2) had built their models
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exit_:
        _parse(bench_experts, [option, "1"])
    assert exit_.value.code == 2 and f"{option} must be at least 2" in capsys.readouterr().err


@pytest.mark.parametrize("script", [gpu_checks, run_evidence], ids=lambda s: s.__name__.split(".")[-1])
def test_an_output_folder_that_is_a_file_is_a_usage_error(script, capsys, tmp_path):
    # gpu_checks ran its first section, run_evidence loaded the data and the metric's classifier (training it where
    # not cached), before a FileExistsError / NotADirectoryError traceback when the first result was written
    results = tmp_path / "results.json"
    results.write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--device", "cpu", "--output_dir", str(results)])
    assert exit_.value.code == 2 and "argument --output_dir:" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a folder inside a file
        script.parse_args(["--device", "cpu", "--output_dir", str(results / "sub")])
    with pytest.raises(SystemExit):  # '' was taken as the current folder
        script.parse_args(["--device", "cpu", "--output_dir", ""])
    assert results.read_text() == "{}"
    (tmp_path / "old" / "results").mkdir(parents=True)  # a folder holding a `results` folder (as benchmarks/ does)
    for folder in (tmp_path / "new", tmp_path / "new" / "deeper", tmp_path / "old"):
        assert script.parse_args(["--device", "cpu", "--output_dir", str(folder)]).output_dir == str(folder)


def test_bench_planning_refuses_a_grid_the_planner_cannot_take(capsys):
    # --num_levels 2 passed its check (an integer >= 1); each worker then loaded the data and stopped in the
    # planner's ValueError, after which the run failed with "The worker planning ... failed"
    for levels in ("1", "2", "1001"):
        with pytest.raises(SystemExit) as exit_:
            bench_planning.parse_args(["--num_levels", levels])
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and "argument --num_levels:" in error and f"got {levels}" in error
    assert bench_planning.parse_args(["--num_levels", "3"]).num_levels == 3


def test_run_evidence_report_only_needs_saved_results_of_the_preset(capsys, tmp_path):
    # a folder without <preset>/results.json (another preset's, or none) ended in a FileNotFoundError traceback
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "results.json").write_text("{}")
    assert run_evidence.parse_args(["--report_only", "--quick", "--output_dir", str(tmp_path)]).report_only
    for argv, option in (
        (["--report_only", "--output_dir", str(tmp_path)], "--output_dir"),  # the default preset's are not there
        (["--report_only"], "--output_dir"),
    ):
        with pytest.raises(SystemExit) as exit_:
            run_evidence.parse_args(argv)
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and f"--report_only needs {option}" in error


def test_run_evidence_report_only_refuses_the_options_of_a_run(capsys, tmp_path):
    # --report_only rewrites the report of the saved results: --budget_steps, --num_eval_samples, --comparisons,
    # --device and --cache_dir were accepted and ignored without a word (the report showed the saved run's settings)
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "results.json").write_text("{}")
    base = ["--report_only", "--quick", "--output_dir", str(tmp_path)]
    for option, value in (
        ("--budget_steps", "300"),
        ("--num_eval_samples", "100"),
        ("--comparisons", "1"),
        ("--device", "cpu"),
        ("--cache_dir", str(tmp_path)),
    ):
        with pytest.raises(SystemExit) as exit_:
            run_evidence.parse_args([*base, option, value])
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and f"{option} is not used with --report_only" in error, (option, error)
    # without --report_only the defaults stay
    args = run_evidence.parse_args(["--quick"])
    assert args.comparisons == ("1", "2", "3") and args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args.cache_dir == os.path.expanduser("~/.cache/diffusers-stages/evidence")


@pytest.mark.parametrize(
    ("script", "quick"),
    [(bench_multistage, {"repeats": 3, "steps": 5}), (bench_text_to_image, {"repeats": 2, "steps": 4, "routing_repeats": 20}),
     (gpu_checks, {"steps": 2, "batch_size": 2, "repeats": 1})],
    ids=lambda s: s.__name__.split(".")[-1] if hasattr(s, "__name__") else "",
)  # fmt: skip
def test_quick_sets_what_the_command_line_leaves_out(script, quick):
    # --quick overwrote the options given with it: `--quick --repeats 1` ran 3 repeats
    assert {name: getattr(script.parse_args(["--device", "cpu", "--quick"]), name) for name in quick} == quick
    for name, value in quick.items():
        given = script.parse_args(["--device", "cpu", "--quick", f"--{name}", str(value + 1)])
        assert getattr(given, name) == value + 1
        assert all(getattr(given, other) == quick[other] for other in quick if other != name)


def test_bench_planning_refuses_options_the_other_modes_would_ignore(capsys, tmp_path):
    # --compare --plot drew nothing, --budget_fd --dataset fashion-mnist scored the preset's digits, and --budget_fd
    # --large / --compare --repeats did nothing: each ran without a word
    plot = str(tmp_path / "plan.png")
    for argv, option in (
        (["--compare", "--plot", plot], "--plot"),
        (["--compare", "--repeats", "3"], "--repeats"),
        (["--budget_fd", "--dataset", "fashion-mnist"], "--dataset"),
        (["--budget_fd", "--large", "0"], "--large"),
        (["--budget_fd", "--num_levels", "30"], "--num_levels"),
    ):
        with pytest.raises(SystemExit) as exit_:
            bench_planning.parse_args(argv)
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and f"{option} is not used with {argv[0]}" in error
    assert bench_planning.parse_args(["--compare", "--dataset", "digits", "--num_levels", "30"]).num_levels == 30
    assert bench_planning.parse_args(["--dataset", "digits", "--plot", plot, "--large", "0"]).plot == plot


def test_run_evidence_refuses_quick_with_another_preset(capsys):
    # --quick --preset gpu ran the quick preset without a word
    assert run_evidence.parse_args([]).preset == "default"
    assert run_evidence.parse_args(["--quick"]).preset == run_evidence.parse_args(["--preset", "quick"]).preset
    assert run_evidence.parse_args(["--quick", "--preset", "quick"]).preset == "quick"
    for preset in ("gpu", "default"):
        with pytest.raises(SystemExit) as exit_:
            run_evidence.parse_args(["--quick", "--preset", preset])
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and f"--quick is --preset quick, got --preset {preset}" in error


@pytest.mark.parametrize("option", ["--timing_batch", "--evidence_steps"])
def test_bench_experts_refuses_section_3_options_with_no_section_3(option, capsys, monkeypatch):
    # --evidence_preset none skips section 3, whose batch and steps these set: they were accepted and ignored
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exit_:
        _parse(bench_experts, ["--evidence_preset", "none", option, "8"])
    assert exit_.value.code == 2 and f"{option} sets section 3, which --evidence_preset none skips" in (
        capsys.readouterr().err
    )


def test_run_evidence_refuses_a_cache_folder_that_cannot_be_one(capsys, tmp_path):
    # a file, a path inside one, or '' was a FileExistsError / NotADirectoryError / FileNotFoundError traceback out of
    # `os.makedirs` once the data were loaded
    (tmp_path / "file").write_text("x")
    for value in (str(tmp_path / "file"), str(tmp_path / "file" / "sub"), ""):
        with pytest.raises(SystemExit) as exit_:
            run_evidence.parse_args(["--quick", "--cache_dir", value])
        assert exit_.value.code == 2 and "argument --cache_dir:" in capsys.readouterr().err
    assert run_evidence.parse_args(["--quick", "--cache_dir", str(tmp_path / "new")]).cache_dir == str(
        tmp_path / "new"
    )
