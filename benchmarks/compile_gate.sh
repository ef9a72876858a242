#!/usr/bin/env bash
# The compile gate (compile_report.py --gate: sm_90a, bf16 and fp8, every kernel, mode and Hopper
# config) under triton versions other than the installed one, each installed into a folder of its own
# and put first on PYTHONPATH (compiling needs no GPU and no matching torch).
#
#   bash benchmarks/compile_gate.sh              # triton 3.6.0, the GPU machines' version
#   bash benchmarks/compile_gate.sh 3.6.0 3.7.1
set -euo pipefail
cd "$(dirname "$0")/.."
for version in "${@:-3.6.0}"; do
    target="${TMPDIR:-/tmp}/tpkernels-triton-$version"
    if [ ! -f "$target/triton/__init__.py" ]; then
        python -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" "triton==$version"
    fi
    echo "compile gate, triton $version"
    PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" python benchmarks/compile_report.py --gate --quiet \
        --json "${TMPDIR:-/tmp}/compile-gate-triton-$version.jsonl"
done
