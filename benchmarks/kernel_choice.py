"""Which Triton kernel to launch, and what a launch costs the host: the pointer kernel against the
persistent TMA kernel, autotuned and with a pinned config, next to torch.mm, on the same tensors.

For each (M, K, N) it times the column forward (bias + tanh GELU, bf16) as CUDA graph replays (device
time only), and the host time of one call outside a graph on a shape small enough that the host is the
bottleneck. Then cProfile's top entries for one host-bound call show where the host time goes.
GPU only; writes JSON lines (one per variant and shape) and the profile to --out.

    python benchmarks/kernel_choice.py --out DIR
    python benchmarks/kernel_choice.py --out DIR --shapes 1,4096,2048 512,4096,8192
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time

import torch
import triton
import triton.testing

import tpkernels
from tpkernels import ops
from tpkernels.kernels.configs import HOPPER_CONFIGS, SMALL_M_CONFIGS

DEFAULT_SHAPES = ["1,4096,2048", "16,4096,2048", "64,4096,2048", "256,4096,2048", "1,4096,8192",
                  "16,4096,8192", "64,4096,8192", "128,4096,8192", "256,4096,8192", "512,4096,8192",
                  "2048,4096,8192"]


def host_us(fn, calls=200):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def variants():
    """(name, context factory): the kernels and how their config is chosen."""
    import contextlib

    def both(kernel, config=None):
        def enter():
            stack = contextlib.ExitStack()
            stack.enter_context(ops.use_matmul_kernel(kernel))
            if config is not None:
                stack.enter_context(ops.pin_config(config))
            return stack
        return enter

    return [("tma autotuned", both("tma")), ("pointer autotuned", both("pointer")),
            ("tma pinned", both("tma", HOPPER_CONFIGS[0])), ("pointer pinned", both("pointer", SMALL_M_CONFIGS[0]))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    parser.add_argument("--calls", type=int, default=200, help="calls per host-time reading and profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or ops.INTERPRETED:
        sys.exit("kernel_choice.py needs a GPU (and TRITON_INTERPRET unset)")
    os.makedirs(args.out, exist_ok=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    common = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  git_sha=sha, command="python benchmarks/kernel_choice.py " + " ".join(argv or sys.argv[1:]))
    rows = []
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    for i, (M, K, N) in enumerate(shapes):
        torch.manual_seed(i)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), w.double(), b.double()),
                                       approximate="tanh")
        wt = w.t()
        measured = {"torch_mm": triton.testing.do_bench_cudagraph(lambda: torch.mm(x, wt), rep=50)}
        for name, context in variants():
            with context():
                def fn():
                    return tpkernels.linear_gelu(x, w, b, approximate="tanh", backend="triton")
                err = (fn().double() - ref).abs().max().item()  # tunes, and checks the variant runs right
                ms = triton.testing.do_bench_cudagraph(fn, rep=50)
                rows.append(dict(common, op="column_fwd", M=M, K=K, N=N, dtype="bfloat16", variant=name, ms=ms,
                                 vs_torch_mm=ms / measured["torch_mm"], max_abs_err=err,
                                 host_us=host_us(fn, args.calls)))
        rows.append(dict(common, op="column_fwd", M=M, K=K, N=N, dtype="bfloat16", variant="torch_mm",
                         ms=measured["torch_mm"], vs_torch_mm=1.0, host_us=host_us(lambda: torch.mm(x, wt), args.calls)))
        for r in rows[-5:]:
            print(f"M={M:5d} K={K} N={N:5d} {r['variant']:18s} {r['ms'] * 1e3:8.1f} us  x{r['vs_torch_mm']:.2f}"
                  f"  host {r['host_us']:6.1f} us", flush=True)
    with open(os.path.join(args.out, "kernel_choice.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    # Where one host-bound call's time goes, for each kernel.
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    report = io.StringIO()
    for kernel in ("tma", "pointer"):
        with ops.use_matmul_kernel(kernel):
            def fn():
                return tpkernels.linear_gelu(x, w, b, approximate="tanh", backend="triton")
            fn()
            print(f"== {kernel}: host {host_us(fn, args.calls):.1f} us per call (64x1024x512)", file=report)
            profile = cProfile.Profile()
            profile.runcall(lambda: [fn() for _ in range(args.calls)])
            torch.cuda.synchronize()
            pstats.Stats(profile, stream=report).sort_stats("tottime").print_stats(25)
    with open(os.path.join(args.out, "host_profile.txt"), "w") as f:
        f.write(report.getvalue())
    print(report.getvalue()[:6000])


if __name__ == "__main__":
    main()
