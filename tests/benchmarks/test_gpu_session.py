"""`benchmarks/gpu_session.sh`: valid bash, and every option it passes is one its benchmark script accepts (a GPU
session's few minutes must not end in a usage error)."""

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SESSION = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


def steps() -> list[tuple[str, list[str]]]:
    """``(script, options)`` of each `step` line (continuations joined)."""
    with open(SESSION, encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.strip().startswith("step "):
            words = line.split()
            found.append((words[3], [w for w in words[4:] if w.startswith("--")]))
    return found


def test_the_session_script_is_valid_bash_and_passes_known_options():
    subprocess.run(["bash", "-n", SESSION], check=True)
    found = steps()
    assert [script for script, _ in found] == [
        "benchmarks/gpu_checks.py",
        "benchmarks/bench_offload.py",
        "benchmarks/bench_multistage.py",
        "benchmarks/bench_experts.py",
        "benchmarks/run_evidence.py",
        "benchmarks/run_evidence.py",  # with Fashion-MNIST there, and without
    ]
    # the scripts' own parsers, each once, all started at once (each import of torch and diffusers takes seconds)
    helps = {
        script: subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for script in dict.fromkeys(script for script, _ in found)
    }
    usages = {script: process.communicate()[0] for script, process in helps.items()}
    for script, options in found:
        assert helps[script].returncode == 0, script
        known = set(re.findall(r"--[a-z_]+", usages[script]))
        assert set(options) <= known, (script, set(options) - known)


# an interpreter standing in for python on the GPU machine: logs its arguments, fails bench_offload.py
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
    *bench_offload.py*) echo "offload broke"; exit 3 ;;
    *ensure_fashion_mnist*) exit 1 ;;
    *) echo "ran in $PWD, PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-unset}" ;;
esac
"""


def test_a_failing_step_keeps_its_output_and_the_later_steps_run_and_the_exit_status_says_so(tmp_path):
    python, out, calls = tmp_path / "python", tmp_path / "out", tmp_path / "calls"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "CALLS": str(calls)}
    result = subprocess.run(["bash", SESSION], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "bench_offload" in result.stdout.splitlines()[-1]  # the summary names the step that failed
    assert (out / "bench_offload.md").read_text() == "offload broke\n"
    # and on stdout, which the device tool returns even where the files under $OUT do not come back
    assert "== bench_offload" in result.stdout and "   exit 3: failed" in result.stdout
    assert "   | offload broke" in result.stdout
    for name in ("gpu_checks", "bench_multistage", "bench_experts", "evidence"):
        # from the repository root (the scripts' relative paths), unbuffered (a step cut by its limit keeps its output)
        assert (out / f"{name}.md").read_text() == f"ran in {ROOT}, PYTHONUNBUFFERED=1\n", name
    # no Fashion-MNIST there: the evidence step runs the quick preset (digits, from scikit-learn), not a failure
    evidence = calls.read_text().splitlines()[-1]
    assert "run_evidence.py" in evidence and "--quick" in evidence
    # session.md records what made the files: the date, the interpreter's device line, and each step's command
    # and exit status (the NAME.md files hold only the scripts' output, which for most of them names no option)
    session = (out / "session.md").read_text()
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", session) and f"ran in {ROOT}" in session
    assert f"`{python} benchmarks/bench_offload.py --device cuda --steps 20 --repeats 3`: exit 3" in session
    assert f"`{python} benchmarks/gpu_checks.py --device cuda --output_dir {out}`: exit 0" in session
    assert "benchmarks/run_evidence.py --quick" in session


# an interpreter where the package does not import until it is on PYTHONPATH, and whose pip cannot build a source
# tree (no setuptools with `bdist_wheel` there, as in an interpreter without the `wheel` package), only install wheels
BARE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
    *"import diffusers_stages.pipelines"*|*"import torch, diffusers_stages.pipelines"*)
        [ -f "${PYTHONPATH%%:*}/diffusers_stages/pipelines/__init__.py" ] || exit 1
        echo "fake GPU" ;;
    *"-m pip install"*" .") echo "error: invalid command 'bdist_wheel'"; exit 1 ;;
    *"-m pip install"*) ;;
    *ensure_fashion_mnist*) exit 1 ;;
    *) echo "ran with PYTHONPATH=$PYTHONPATH" ;;
esac
"""


def test_where_the_package_does_not_import_it_is_assembled_without_a_build_step(tmp_path):
    # the fallback was `pip install --no-build-isolation .`, which needs setuptools' `bdist_wheel` (or the `wheel`
    # package) on the GPU machine: without it the session ended before its first step
    python, out, calls, wheels = tmp_path / "python", tmp_path / "out", tmp_path / "calls", tmp_path / "wheels"
    python.write_text(BARE_PYTHON)
    python.chmod(0o755)
    wheels.mkdir()
    (wheels / "diffusers-0.42.1-py3-none-any.whl").write_text("")
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "CALLS": str(calls), "WHEELS": str(wheels)}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", SESSION], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    site = (out / "gpu_checks.md").read_text().removeprefix("ran with PYTHONPATH=").strip().split(":")[0]
    assert any(
        "pip install" in line and "diffusers-0.42.1-py3-none-any.whl" in line
        for line in calls.read_text().splitlines()
    )
    # the package as setup.py lays it out, importable from there (pipelines/ and conversion/ inside it)
    found = subprocess.run(
        [
            sys.executable,
            "-P",
            "-c",
            "import diffusers_stages.pipelines as p, diffusers_stages.conversion as c; "
            "print(p.__file__); print(c.__file__)",
        ],
        env={**os.environ, "PYTHONPATH": site},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(site) for path in found), (site, found)
    shutil.rmtree(site)  # the script's temporary folder (on the GPU machine, left for the session's end)


def test_without_wheels_given_the_checkouts_wheels_are_installed(tmp_path):
    # the lent GPU machine has no diffusers, and its session runs the script without WHEELS: the session ended at the
    # import check. The default is now the checkout's benchmarks/wheels (a copy of the checkout here: its own wheel)
    checkout, out, calls, python = tmp_path / "checkout", tmp_path / "out", tmp_path / "calls", tmp_path / "python"
    for folder in ("benchmarks/wheels", "diffusers_stages", "pipelines", "conversion"):
        (checkout / folder).mkdir(parents=True)
    for package in ("diffusers_stages", "pipelines", "conversion"):
        (checkout / package / "__init__.py").write_text("")
    shutil.copy(SESSION, checkout / "benchmarks")
    (checkout / "benchmarks" / "wheels" / "diffusers-0.42.1-py3-none-any.whl").write_text("")
    python.write_text(BARE_PYTHON)
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "CALLS": str(calls)}
    env.pop("PYTHONPATH", None)
    env.pop("WHEELS", None)
    result = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh"], cwd=checkout, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (install,) = [line for line in calls.read_text().splitlines() if "-m pip install" in line]
    assert "--no-index --no-deps --no-compile" in install  # no byte-compiling diffusers' 1,000 files: seconds
    assert install.endswith("benchmarks/wheels/diffusers-0.42.1-py3-none-any.whl")


def test_started_from_another_folder_the_defaults_are_the_checkouts_and_given_paths_are_the_callers(tmp_path):
    # `bash path/to/benchmarks/gpu_session.sh` from another folder wrote its files to that folder's
    # benchmarks/results/gpu, not the checkout's, and looked for WHEELS=wheels and PYTHON=bin/python in the checkout
    # (the script changes into it before reading them), not where they were given
    checkout, here = tmp_path / "checkout", tmp_path / "here"
    for package in ("diffusers_stages", "pipelines", "conversion"):
        (checkout / package).mkdir(parents=True)
        (checkout / package / "__init__.py").write_text("")
    (checkout / "benchmarks").mkdir()
    shutil.copy(SESSION, checkout / "benchmarks")
    (here / "wheels").mkdir(parents=True)
    (here / "wheels" / "diffusers-0.42.1-py3-none-any.whl").write_text("")
    (here / "bin").mkdir()
    (here / "bin" / "python").write_text(BARE_PYTHON)
    (here / "bin" / "python").chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PYTHON": "bin/python", "WHEELS": "wheels", "CALLS": str(calls)}
    for name in ("PYTHONPATH", "OUT"):
        env.pop(name, None)
    result = subprocess.run(
        ["bash", str(checkout / "benchmarks" / "gpu_session.sh")], cwd=here, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (checkout / "benchmarks" / "results" / "gpu" / "gpu_checks.md").is_file()
    assert not (here / "benchmarks").exists()
    (install,) = [line for line in calls.read_text().splitlines() if "-m pip install" in line]
    assert install.endswith(f"{here}/wheels/diffusers-0.42.1-py3-none-any.whl")


def test_the_steps_limits_with_their_stopping_grace_fit_the_device_tools_default_limit():
    # a session has one try of about 15 device minutes, its machine's start included, and the device tool stops a
    # command at its timeout_s (default 600): the limits, with the 10 s each step may take to stop after its own
    # (`timeout -k 10 LIMIT`), a minute for the install and the checks and a minute to spare, must fit in it
    with open(SESSION, encoding="utf-8") as f:
        text = f.read()
    assert 'timeout -k 10 "$limit"' in text
    limits = {}
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip().startswith("step "):
            name, limit = line.split()[1:3]
            limits[name] = max(limits.get(name, 0), int(limit))  # the evidence step: one of two commands runs
    assert set(limits) == {"gpu_checks", "bench_offload", "bench_multistage", "bench_experts", "evidence"}
    assert sum(limit + 10 for limit in limits.values()) + 60 <= 600 - 60
