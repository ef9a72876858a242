"""Host overhead of the public functions: the Python and dispatcher time one call costs before its
kernels run, measured with every Triton launch replaced by a no-op, so that no device (and no
interpreter) time is counted. Runs anywhere; on the CPU it takes the launch path CUDA tensors take
(TRITON_INTERPRET=1 routes CPU tensors to the kernels).

    python benchmarks/host_overhead.py            # a table of microseconds per call
    python benchmarks/host_overhead.py --profile  # and cProfile's top entries for linear_gelu
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import tpkernels  # noqa: E402
from tpkernels import launch, ops  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _calls(device):
    x = torch.randn(64, 1024, device=device)
    w1 = torch.randn(512, 1024, device=device)
    b1 = torch.randn(512, device=device)
    w2 = torch.randn(1024, 512, device=device)
    b2 = torch.randn(1024, device=device)
    h = torch.randn(64, 512, device=device)
    xg, w1g, b1g, w2g, b2g = (t.clone().requires_grad_() for t in (x, w1, b1, w2, b2))

    def train_step():
        out = tpkernels.mlp_shard(xg, w1g, b1g, w2g, b2g)
        torch.autograd.grad(out, (xg, w1g, b1g, w2g, b2g), torch.ones_like(out))

    return {
        "linear_gelu (inference)": lambda: tpkernels.linear_gelu(x, w1, b1),
        "linear_partial (inference)": lambda: tpkernels.linear_partial(h, w2, b2),
        "mlp_shard (inference)": lambda: tpkernels.mlp_shard(x, w1, b1, w2, b2),
        "mlp_shard forward + backward": train_step,
    }


def measure(fn, seconds=0.5):
    for _ in range(20):
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if not ops.INTERPRETED and not torch.cuda.is_available():
        sys.exit("set TRITON_INTERPRET=1 before triton is imported (the default here) or run on a GPU")
    device = "cuda" if torch.cuda.is_available() and not ops.INTERPRETED else "cpu"
    for name in ("_matmul_kernel", "_matmul_tma_persistent_kernel", "_dgelu_kernel"):
        setattr(launch, name, _NoLaunch())  # the launchers look the kernels up in launch
    with ops.pin_config(tpkernels.MatmulConfig(64, 64, 32)):
        print("| call | host us per call (launches stubbed) |\n| --- | --- |")
        for name, fn in _calls(device).items():
            print(f"| {name} | {measure(fn):.1f} |")
        if args.profile:
            fn = _calls(device)["linear_gelu (inference)"]
            profile = cProfile.Profile()
            profile.runcall(lambda: [fn() for _ in range(2000)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
