#!/usr/bin/env bash
# compute-sanitizer over the kernel calls of tests/sanitize_calls.py (every kernel and epilogue, edge tiles,
# strided views, the TMA kernel, the dGELU pass, fp8): memcheck over all of them, racecheck and synccheck
# over the split-K calls (programs that meet through an arrival counter). Exits 1 on any report, a failed
# check or a missing tool; a log per tool lands in OUTDIR.
#
#   bash tests/gpu_sanitize.sh OUTDIR
set -uo pipefail
out="${1:?usage: bash tests/gpu_sanitize.sh OUTDIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ! command -v compute-sanitizer > /dev/null; then
    echo "gpu_sanitize: compute-sanitizer is not on PATH (it ships with the CUDA toolkit)" >&2
    exit 1
fi
status=0
run() {  # run TOOL [--only TEXT]: one sanitizer pass, its log, its verdict
    local tool="$1"
    shift
    # --error-exitcode makes any report fail the pass; triton's own JIT runs inside it as well.
    compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
        python tests/sanitize_calls.py "$@" > "$out/sanitize-$tool.log" 2>&1
    local rc=$?
    echo "== $tool: exit $rc ($(grep -c '^ok: ' "$out/sanitize-$tool.log") calls ok)"
    tail -n 3 "$out/sanitize-$tool.log"
    [ "$rc" = 0 ] || status=1
}
run memcheck
run racecheck --only splitk
run synccheck --only splitk
exit "$status"
