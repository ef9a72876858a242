"""Host overhead of the public functions: the Python and dispatcher time one call costs before its
kernels run. Each call runs once for real (which binds its launches, `bound.Bound`); then the launcher
of every bound launch, the compiled kernel's own launch (the interpreter's kernel call on the CPU), is
replaced by a no-op, so that the whole Python path, triton's part of it included, is counted and no
device or interpreter time is. Runs anywhere; on the CPU it takes the launch path CUDA tensors take
(TRITON_INTERPRET=1 routes CPU tensors to the kernels). Launches that are not bound (the dGELU pass of a
standalone layer's backward) have their kernel object stubbed instead.

    python benchmarks/host_overhead.py            # a table of microseconds per call
    python benchmarks/host_overhead.py --profile  # and cProfile's top entries for linear_gelu
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import tpkernels  # noqa: E402
from tpkernels import bound, launch, ops  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_launch(*args):
    return None


def _calls(device):
    # Decode-sized: the host path does not depend on the sizes, and the warm-up runs the kernels.
    x = torch.randn(4, 256, device=device)
    w1 = torch.randn(128, 256, device=device)
    b1 = torch.randn(128, device=device)
    w2 = torch.randn(256, 128, device=device)
    b2 = torch.randn(256, device=device)
    h = torch.randn(4, 128, device=device)
    xg, w1g, b1g, w2g, b2g = (t.clone().requires_grad_() for t in (x, w1, b1, w2, b2))

    def train_step():
        out = tpkernels.mlp_shard(xg, w1g, b1g, w2g, b2g)
        torch.autograd.grad(out, (xg, w1g, b1g, w2g, b2g), torch.ones_like(out))

    tiny_x, tiny_w = torch.randn(1, 1, device=device), torch.randn(1, 1, device=device)
    return {
        "yardstick: torch.mm of 1 x 1 (torch's own host path)": lambda: torch.mm(tiny_x, tiny_w),
        "linear_gelu (inference)": lambda: tpkernels.linear_gelu(x, w1, b1),
        "linear_partial (inference)": lambda: tpkernels.linear_partial(h, w2, b2),
        "mlp_shard (inference)": lambda: tpkernels.mlp_shard(x, w1, b1, w2, b2),
        "mlp_shard forward + backward": train_step,
    }


def measure(fn, rounds=9, seconds=0.1):
    """(median, min) microseconds per call over `rounds` rounds of `seconds` each: the median for the
    table, the min as the path's cost without the machine's interruptions."""
    for _ in range(20):
        fn()
    per_call = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            calls += 1
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_call), min(per_call)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if not ops.INTERPRETED and not torch.cuda.is_available():
        sys.exit("set TRITON_INTERPRET=1 before triton is imported (the default here) or run on a GPU")
    device = "cuda" if torch.cuda.is_available() and not ops.INTERPRETED else "cpu"
    setattr(launch, "_dgelu_kernel", _NoLaunch())  # not bound: stubbed where launch looks it up
    calls = _calls(device)
    for fn in calls.values():
        fn()  # binds every launch of the call
    entries = list(bound.BOUND.values())
    for entry in entries:
        entry.launcher = _no_launch
    print(f"{len(entries)} bound launches, their launchers stubbed")
    print("| call | host us per call, median (min) of 9 rounds; compiled launch stubbed | / yardstick |\n"
          "| --- | --- | --- |")
    yardstick = None
    for name, fn in calls.items():
        median, least = measure(fn)
        yardstick = yardstick or median
        print(f"| {name} | {median:.1f} ({least:.1f}) | {median / yardstick:.1f} |")
    if len(bound.BOUND) != len(entries):
        sys.exit("a launch was bound during the measurement: its kernel ran, and the numbers above count it")
    if args.profile:
        fn = calls["linear_gelu (inference)"]
        profile = cProfile.Profile()
        profile.runcall(lambda: [fn() for _ in range(2000)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
