#!/usr/bin/env bash
# Compile the CUDA source that holds the cuBLASLt calls (csrc/cuda/cublaslt_epilogue.cu, which needs
# only the CUDA runtime and cuBLASLt headers) for sm_90a and sm_80, on any machine with nvcc: CI's
# check of the native CUDA backend. cublasLt.h comes from the nvidia-cublas wheel (headers only are
# kept). The torch binding (csrc/cuda/ops_cuda.cpp) needs a CUDA build of torch and is compiled by
# setup.py on GPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc > /dev/null; then
    echo "check_cuda.sh: no nvcc on PATH: skipped"
    [ "${CI:-}" = "true" ] && exit 1 || exit 0
fi
include="${TMPDIR:-/tmp}/tpkernels-cublas-include"
if [ ! -f "$include/cublasLt.h" ]; then
    wheel_dir="$(mktemp -d)"
    python -m pip download --quiet --disable-pip-version-check --no-deps -d "$wheel_dir" "nvidia-cublas>=13,<14"
    python - "$wheel_dir" "$include" <<'PY'
import os, sys, zipfile
wheel_dir, include = sys.argv[1], sys.argv[2]
os.makedirs(include, exist_ok=True)
(wheel,) = [os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir) if f.endswith(".whl")]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if "/include/" in name and name.endswith(".h"):
            with open(os.path.join(include, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PY
    rm -rf "$wheel_dir"
fi
out="$(mktemp -d)"
for arch in "compute_90a,code=sm_90a" "compute_80,code=sm_80"; do
    nvcc -std=c++17 -O3 -gencode="arch=$arch" -I"$include" -c csrc/cuda/cublaslt_epilogue.cu -o "$out/cublaslt.o"
    echo "check_cuda.sh: csrc/cuda/cublaslt_epilogue.cu compiles for ${arch##*=} ($(nvcc --version | tail -1))"
done
rm -rf "$out"
