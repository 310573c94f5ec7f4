"""`benchmarks/gpu_session.sh`: valid bash, and every option it passes is one its benchmark script accepts (a GPU
session's few minutes must not end in a usage error)."""

import os
import re
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
        if line.startswith("step "):
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
    ]
    # the scripts' own parsers, all started at once (each import of torch and diffusers takes seconds)
    helps = [
        subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for script, _ in found
    ]
    for (script, options), process in zip(found, helps):
        usage, _ = process.communicate()
        assert process.returncode == 0, script
        known = set(re.findall(r"--[a-z_]+", usage))
        assert set(options) <= known, (script, set(options) - known)
