"""Compile the matmul kernel for NVIDIA targets on any machine, and report what the compiler made of it.

Triton ships ptxas and cuobjdump, so no GPU is needed: this catches code the interpreter accepts but the
compiler rejects, and answers the first profiling questions offline: matrix instructions (wgmma on
Hopper, mma.sync on Ampere), async copies, shared memory, registers and spills. Each variant is
specialised as the JIT would specialise a real launch of that mode on contiguous tensors with
16-divisible sizes (unit strides become constants, the rest are marked divisible by 16).

    python benchmarks/compile_report.py            # every launch mode x dtype x target, one config
    python benchmarks/compile_report.py --all-configs --json report.json

Run it without TRITON_INTERPRET (the interpreter replaces the kernel with a Python function).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py compiles for GPUs: run it without TRITON_INTERPRET=1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpkernels.kernels import GELU, GPU_CONFIGS, IDENTITY, _matmul_kernel

SIZES = ("M", "N", "K", "M_BUCKET", "N_BUCKET", "K_BUCKET")
UNUSED = "unused"
# Strides per launch mode as (a, b, c, residual, preact, z): "1" is a unit stride, "D" a stride
# divisible by 16, UNUSED an operand the mode does not read (the launcher passes 0 strides).
MODES = {
    "column_fwd": dict(strides=(("D", "1"), ("1", "D"), ("D", "1"), UNUSED, ("D", "1"), UNUSED),
                       meta=dict(ACTIVATION=GELU, HAS_BIAS=True, STORE_PREACT=True)),
    "row_fwd": dict(strides=(("D", "1"), ("1", "D"), ("D", "1"), ("D", "1"), UNUSED, UNUSED),
                    meta=dict(HAS_BIAS=True, HAS_RESIDUAL=True)),
    "dgrad": dict(strides=(("D", "1"), ("D", "1"), ("D", "1"), UNUSED, UNUSED, ("D", "1")),
                  meta=dict(GRAD_ACTIVATION=GELU)),
    "wgrad": dict(strides=(("1", "D"), ("D", "1"), ("D", "1"), UNUSED, UNUSED, ("1", "D")),
                  meta=dict(GRAD_ACTIVATION=GELU, STORE_ROWSUM=True)),
}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
TARGETS = {"sm90": 90, "sm80": 80}


def _tools_dir():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_variant(mode, dtype, capability, config):
    names = _matmul_kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    meta = dict(ACTIVATION=IDENTITY, HAS_BIAS=False, HAS_RESIDUAL=False, STORE_PREACT=False,
                GRAD_ACTIVATION=IDENTITY, STORE_ROWSUM=False, INT64_OFFSETS=False, EMULATE_BF16=False,
                INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    meta.update(MODES[mode]["meta"])
    meta.update(config.kwargs())
    stride_names = ["stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn",
                    "stride_rm", "stride_rn", "stride_pm", "stride_pn", "stride_zm", "stride_zk"]
    pairs = MODES[mode]["strides"]
    stride_spec = dict(zip(stride_names, [s for pair in pairs for s in (("D", "D") if pair == UNUSED else pair)]))
    for index, name in enumerate(names):
        if name in meta:
            signature[name], constexprs[(index,)] = "constexpr", meta[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name == "rowsum_ptr" else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif stride_spec.get(name) == "1":
            signature[name], constexprs[(index,)] = "constexpr", 1
        else:
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=_matmul_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    start = time.time()
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ptx = kernel.asm["ptx"]
    report = dict(
        mode=mode, dtype=dtype, target=f"sm{capability}", config=str(config), block_m=config.block_m,
        compile_s=round(time.time() - start, 2),
        shared_bytes=kernel.metadata.shared,
        wgmma="wgmma.mma_async" in ptx,
        mma_sync="mma.sync" in ptx,
        cp_async=ptx.count("cp.async"),
        tma="cp.async.bulk.tensor" in ptx,
    )
    report.update(_resource_usage(kernel.asm["cubin"]))
    return report


def _resource_usage(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_tools_dir(), "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(usage.get("REG", -1)), "stack_bytes": int(usage.get("STACK", -1)),
            "local_bytes": int(usage.get("LOCAL", -1))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--all-configs", action="store_true", help="every GPU config, not just the first")
    parser.add_argument("--json", help="write the reports to this file as JSON lines")
    args = parser.parse_args(argv)

    configs = GPU_CONFIGS if args.all_configs else GPU_CONFIGS[:1]
    variants = [(m, d, t, c) for t in args.targets for d in args.dtypes for m in args.modes for c in configs]
    reports, failures = [], 0
    print(f"{'mode':<11}{'dtype':<6}{'target':<7}{'config':<58}{'smem':>7}{'regs':>6}{'spill':>6}  mma")
    for number, (mode, dtype, target, config) in enumerate(variants, 1):
        try:
            r = compile_variant(mode, dtype, TARGETS[target], config)
        except Exception as error:  # report every failing variant, then fail
            failures += 1
            print(f"[{number}/{len(variants)}] {mode} {dtype} {target} {config}: FAILED {error}", file=sys.stderr)
            continue
        reports.append(r)
        mma = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "none"
        print(f"{mode:<11}{dtype:<6}{target:<7}{r['config']:<58}{r['shared_bytes']:>7}{r['registers']:>6}"
              f"{r['local_bytes']:>6}  {mma}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in reports)
    print(f"{len(reports)} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
