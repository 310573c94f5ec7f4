#!/usr/bin/env bash
# One prepared run for a session that is lent a GPU (issue 16's GPU items), in about 8 minutes on one H200:
#   OUT=benchmarks/results/gpu bash benchmarks/gpu_session.sh
# Not run yet (no GPU has been lent to this project's sessions): the settings are estimates, sized by per-step time
# limits; each step writes its own file under $OUT as it finishes, so a step cut by its limit loses only itself.
# The package must import on the GPU machine, which cannot download anything (carry the virtual environment, and
# name its interpreter: PYTHON=.venv/bin/python; default: `python` on the PATH).
set -uo pipefail
out="${OUT:-benchmarks/results/gpu}"
python="${PYTHON:-python}"
mkdir -p "$out"

step() {  # step NAME SECONDS SCRIPT ARGS...: run one benchmark under its own time limit, output to $out/NAME.md
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $python $*"
    timeout "$limit" "$python" "$@" >"$out/$name.md" 2>&1
    echo "   exit $? ($(tail -n 1 "$out/$name.md"))"
}

"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
step gpu_checks 150 benchmarks/gpu_checks.py --device cuda --output_dir "$out"
step bench_offload 60 benchmarks/bench_offload.py --device cuda --steps 20 --repeats 3
step bench_multistage 90 benchmarks/bench_multistage.py --device cuda --sections overhead mixed pipeline \
    --width 32 --resolution 16 --repeats 5 --steps 10
step bench_experts 60 benchmarks/bench_experts.py --device cuda --repeats 3 --evidence_preset none
step evidence 120 benchmarks/run_evidence.py --preset gpu --budget_steps 300 --num_eval_samples 1000 \
    --output_dir "$out/evidence"
