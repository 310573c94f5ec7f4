#!/usr/bin/env bash
# One prepared run for a session that is lent a GPU (issue 16's GPU items), in about 7 minutes on one H200:
#   bash benchmarks/gpu_session.sh
# Files go to $OUT: on the lent machine the device tool sets it, and only files under it come back (never pass
# OUT=benchmarks/...: the files would stay on that machine); elsewhere the default is the checkout's
# benchmarks/results/gpu. Each
# step's exit status and the end of its output are also printed, so that the tool's output tail holds the results.
# Not run yet (no GPU has been lent to this project's sessions): the settings are estimates, sized by per-step time
# limits (415 s in all, plus the install and checks below); each step writes its own file under $OUT as it runs
# (unbuffered), so a step that fails or is cut by its limit loses only itself; the last line names the steps that
# failed, and the exit status is then 1. With the 10 s each step may take to stop after its limit (465 s), the install
# and the checks, a run can take 8 minutes: leave the device tool's timeout_s at its default (600), not 420.
# The GPU machine cannot download anything. Its interpreter (PYTHON, default python3) needs torch; where the package
# does not import there, the checkout's package is copied into a temporary folder (no build step), with the wheels in
# $WHEELS (default benchmarks/wheels, git-ignored: the lent machine lacks only diffusers, so before the run
# `pip download --no-deps diffusers==0.42.1 -d benchmarks/wheels` where there is a network, and carry that folder).
# Files: gpu_checks.json and one NAME.md per step, and the evidence run's results.json as evidence_results.json
# (its report is in evidence.md), and session.md: the date, the device and torch version, and each step's command
# and exit status (what made the other files); 8 files in all.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)" || exit 1  # the repository root: the steps' paths are relative to it
# the defaults are the checkout's; a relative OUT, WHEELS or PYTHON (with a slash) is where the script was started
out="${OUT:-$root/benchmarks/results/gpu}"
wheels="${WHEELS:-$root/benchmarks/wheels}"
python="${PYTHON:-python3}"
[[ $wheels == /* ]] || wheels="$PWD/$wheels"
[[ $python != */* || $python == /* ]] || python="$PWD/$python"
mkdir -p "$out" && out="$(cd "$out" && pwd)" || exit 1
cd "$root" || exit 1
session="$out/session.md"  # what made the files: the step scripts print few of their options
printf '# benchmarks/gpu_session.sh, %s\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$session"
export PYTHONUNBUFFERED=1         # a step killed by its limit keeps what it printed
failed=()

step() {  # step NAME SECONDS SCRIPT ARGS...: run one benchmark under its own time limit, output to $out/NAME.md
    local name=$1 limit=$2 status
    shift 2
    echo "== $name (limit ${limit} s): $python $*"
    timeout -k 10 "$limit" "$python" "$@" >"$out/$name.md" 2>&1
    status=$?
    case $status in
        0) echo "   exit 0" ;;
        124 | 137) echo "   exit $status: stopped at its ${limit} s limit (what it finished is in $name.md)" ;;
        *) echo "   exit $status: failed (its error is at the end of $name.md)" ;;
    esac
    tail -c 2000 "$out/$name.md" | sed 's/^/   | /'  # the end of its output: its results, or its error
    echo "- \`$python $*\`: exit $status" >>"$session"
    [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}

# -P: the package as installed, not the checkout's folder of the same name (which lacks its pipelines)
if ! "$python" -P -c "import diffusers_stages.pipelines" 2>/dev/null; then
    site="$(mktemp -d)"
    # the lent GPU machine has no diffusers: its wheel, downloaded beforehand, in benchmarks/wheels (the default)
    # the package laid out as setup.py installs it (pipelines/ and conversion/ inside it), copied: building the
    # checkout would need setuptools with bdist_wheel there; pip only unpacks the wheels (--no-compile: seconds)
    echo "== the checkout's package and $wheels/*.whl into $site (no index, no build)"
    { cp -R diffusers_stages "$site/" && cp -R pipelines "$site/diffusers_stages/pipelines" \
        && cp -R conversion "$site/diffusers_stages/conversion"; } || { echo "copying the package failed"; exit 1; }
    if compgen -G "$wheels/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl \
            || { echo "installing $wheels/*.whl failed"; exit 1; }
    else
        echo "no wheels in $wheels (WHEELS=folder of .whl files, e.g. \`pip download --no-deps diffusers==0.42.1\`)"
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -P -c "import torch, diffusers_stages.pipelines; assert torch.cuda.is_available(), 'no CUDA device'
print(torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee -a "$session" \
    || { echo "needs CUDA and the package's requirements (carry missing wheels: WHEELS=folder)"; exit 1; }

echo >>"$session"
step gpu_checks 150 benchmarks/gpu_checks.py --device cuda --output_dir "$out"
step bench_offload 45 benchmarks/bench_offload.py --device cuda --steps 20 --repeats 3
step bench_multistage 75 benchmarks/bench_multistage.py --device cuda --sections overhead mixed pipeline \
    --width 32 --resolution 16 --repeats 5 --steps 10 --decoder_counts 2 4 16
step bench_experts 45 benchmarks/bench_experts.py --device cuda --repeats 3 --evidence_preset none
# the GPU preset (shortened) needs Fashion-MNIST on that machine; else the quick preset (scikit-learn's digits)
evidence="$(mktemp -d)"
if "$python" -c "from benchmarks.evidence.data import ensure_fashion_mnist; ensure_fashion_mnist()" 2>/dev/null; then
    step evidence 100 benchmarks/run_evidence.py --preset gpu --budget_steps 300 --num_eval_samples 1000 \
        --output_dir "$evidence"
else
    step evidence 100 benchmarks/run_evidence.py --quick --output_dir "$evidence"
fi
cp "$evidence"/*/results.json "$out/evidence_results.json" 2>/dev/null  # saved after each comparison
echo "failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
