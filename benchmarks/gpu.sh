#!/usr/bin/env bash
# One command for a GPU visit or a GPU runner: install, the GPU tests, then the benchmark plan (by default
# `run.py --plan headline`: the points that decide the backend table, the kernel choice and the targets,
# in shuffled rounds with paired ratios), and optionally the kernel choice, the rest of the test suite and
# an ncu profile. Each step has its own time budget: install 120 s, GPU tests 240 (JUnit and durations;
# 450 cases, the CUDA rank setups included), the sanitizer 60, the benchmarks 270, about 11.5 minutes in
# all. On a 10-minute slot run it as two commands back to back:
#   BENCH_S=0 bash benchmarks/gpu.sh OUTDIR
#   GPU_TESTS_S=0 SANITIZE_S=0 bash benchmarks/gpu.sh OUTDIR/bench   # the install again (a fresh machine)
# Everything lands in OUTDIR (a log per step, results.jsonl, table.md, plot.png, and <device>-<date>.jsonl
# ready to commit under benchmarks/results/; the GPU tests' JUnit file and summary for tests/results/).
#
#   bash benchmarks/gpu.sh OUTDIR
#   BENCH_PLAN=full BENCH_S=500 bash benchmarks/gpu.sh OUTDIR      # the whole suite instead of the plan
#   TESTS_S=120 NCU_S=40 bash benchmarks/gpu.sh OUTDIR             # other budgets; 0 skips a step
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
# The GPU tests first, then the sanitizer and the headline benchmarks, then (budgets 0 by default) the
# rest of the suite (gloo ranks, the compile gate) and a profile. GATE_S runs the compile gate under the
# device's triton on its own (CI already runs it for 3.6 and 3.9).
INSTALL_S="${INSTALL_S:-120}" GPU_TESTS_S="${GPU_TESTS_S:-240}" SANITIZE_S="${SANITIZE_S:-60}"
BENCH_S="${BENCH_S:-270}" TESTS_S="${TESTS_S:-0}"
NCU_S="${NCU_S:-0}" GATE_S="${GATE_S:-0}" OVERLAP_S="${OVERLAP_S:-0}" KERNEL_CHOICE_S="${KERNEL_CHOICE_S:-0}"
BENCH_PLAN="${BENCH_PLAN:-headline}"
status=0

step() {  # step NAME BUDGET_S COMMAND...: run with a budget, log to OUTDIR/NAME.log, note the outcome
    local name="$1" budget="$2"
    shift 2
    if [ "$budget" = "0" ]; then echo "== $name: skipped (budget 0)"; return 0; fi
    echo "== $name (budget ${budget}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$budget" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start))s$([ $rc = 124 ] && echo ' (budget spent)')"
    [ $rc = 0 ] || status=1
    return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
  python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
  git rev-parse --short HEAD; } > "$out/environment.log" 2>&1
cat "$out/environment.log"

# The native extension (cuBLASLt) is built here; if that fails or overruns, install without it and go on.
step install "$INSTALL_S" env TPKERNELS_BUILD_EXT=1 python -m pip install -v --no-deps --no-build-isolation -e . ||
    step install_without_extension 60 env TPKERNELS_BUILD_EXT=0 python -m pip install --no-deps --no-build-isolation -e . ||
    exit 1
python -c "import json, tpkernels; print(json.dumps(tpkernels.backends(), indent=1))" > "$out/backends.log" 2>&1
cat "$out/backends.log"
# The GPU tests autotune as they go; with pytest-xdist (the GPU image has it) 8 workers share the compiles.
parallel=()
python -c "import xdist" 2> /dev/null && parallel=(-n 8 -p no:benchmark)
step gpu_tests "$GPU_TESTS_S" python -m pytest tests -m gpu -q -rs -p no:cacheprovider --durations=15 \
    --junitxml "$out/junit-gpu.xml" ${parallel[@]+"${parallel[@]}"}
# The JUnit file and its one-line summary (device, versions, sha, counts, seconds), named to be committed
# under tests/results/.
if [ -f "$out/junit-gpu.xml" ]; then
    tests_name="$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" |
        tr -c 'A-Za-z0-9._\n-' '-')-$(date -u +%Y-%m-%d)"
    cp "$out/junit-gpu.xml" "$out/$tests_name-gpu-tests.xml"
    python tests/junit_summary.py "$out/junit-gpu.xml" | tee "$out/$tests_name-gpu-tests.txt"
    echo "tests: commit $out/$tests_name-gpu-tests.{xml,txt} under tests/results/"
fi
# compute-sanitizer over every kernel's calls (memcheck; racecheck and synccheck on split-K).
step sanitize "$SANITIZE_S" bash tests/gpu_sanitize.sh "$out"
# The plan prints its predicted duration first. torch.compile's max-autotune spends a minute a shape: the
# full suite leaves it out unless BENCH_PROVIDERS names it.
if [ "$BENCH_PLAN" = "headline" ]; then
    bench=(python benchmarks/run.py --plan headline --out "$out")
else
    bench=(python benchmarks/run.py --out "$out")
    BENCH_PROVIDERS="${BENCH_PROVIDERS:-tpkernels tpkernels_triton tpkernels_cublaslt eager torch_mm cublaslt}"
fi
# shellcheck disable=SC2206
[ -n "${BENCH_PROVIDERS:-}" ] && bench+=(--providers $BENCH_PROVIDERS)
step bench "$BENCH_S" "${bench[@]}" --max-seconds "$((BENCH_S - 60 > 30 ? BENCH_S - 60 : 30))"
if [ -f "$out/results.jsonl" ]; then
    device="$(python -c "import json, sys; print(json.loads(open(sys.argv[1]).readline())['device'])" "$out/results.jsonl")"
    name="$(echo "$device" | tr -c 'A-Za-z0-9._\n-' '-')-$(date -u +%Y-%m-%d)"
    if [[ "$device" == cpu* ]]; then
        echo "results: CPU rows (no GPU here): $out/results.jsonl is a smoke run, not a result to commit"
    else
        cp "$out/results.jsonl" "$out/$name.jsonl"
        echo "results: $out/$name.jsonl (commit it under benchmarks/results/ with table.md and plot.png)"
    fi
fi
# The overlapped and sequence-parallel TensorParallelMLP at world size 1 at more sizes (the plan has one),
# chunked path forced on: what chunking costs when there is nothing to overlap.
step overlap "$OVERLAP_S" python benchmarks/run.py --ops tp_mlp --out "$out/overlap" \
    --max-seconds "$((OVERLAP_S > 30 ? OVERLAP_S - 15 : OVERLAP_S))" \
    --providers tpkernels tpkernels_overlap tpkernels_sp tpkernels_sp_overlap eager \
    --shapes 2048,4096,16384 8192,4096,16384 512,4096,16384
step kernel_choice "$KERNEL_CHOICE_S" python benchmarks/kernel_choice.py --out "$out/kernel-choice"
step tests "$TESTS_S" python -m pytest tests -m "not gpu" -q -p no:cacheprovider
step compile_gate "$GATE_S" python benchmarks/compile_report.py --gate --quiet --json "$out/compile_gate.jsonl"
if command -v ncu > /dev/null; then
    step ncu "$NCU_S" ncu --target-processes all --kernel-name regex:_matmul --launch-skip 20 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
        python benchmarks/run.py --ops column_fwd --providers tpkernels --shapes 8192,4096,8192 --out "$out/ncu-run"
fi
echo "gpu.sh: $([ $status = 0 ] && echo 'every step passed' || echo 'a step failed: see its log') -> $out"
exit $status
