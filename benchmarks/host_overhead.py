"""Host overhead of the public functions: the Python and dispatcher time one call costs before its
kernels run. Each call runs once for real (which binds its launches, `bound.Bound`); then the launcher
of every bound launch, the compiled kernel's own launch (the interpreter's kernel call on the CPU), is
replaced by a no-op, so that the whole Python path, triton's part of it included, is counted and no
device or interpreter time is. Runs anywhere; on the CPU it takes the launch path CUDA tensors take
(TRITON_INTERPRET=1 routes CPU tensors to the kernels). Every launch is bound: the GEMMs', and those of
the one-config kernels (the dGELU pass, fp8's quantize and scale update).

The modules are timed beside the functions they call, at world size 1 with torch.distributed
initialised (gloo, one rank), so that their parameters are DTensors as in a distributed run: the
module's host time over the function's is what the layer, the DTensor parameters and the collectives'
world-size-1 bypass cost per call (target: at most 1.3x).

    python benchmarks/host_overhead.py            # a table of microseconds per call
    python benchmarks/host_overhead.py --profile  # and cProfile's top entries for linear_gelu
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import tpkernels  # noqa: E402
from tpkernels import bound, launch, ops  # noqa: E402


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

    torch.manual_seed(0)
    column = tpkernels.ColumnParallelLinear(256, 128, activation="gelu", device=device)
    mlp = tpkernels.TensorParallelMLP(256, 128, device=device)
    # fp8: decode on fixed weights (their e4m3 copies cached), and a training step (quantized once a step)
    mlp_fp8_serving = tpkernels.TensorParallelMLP(256, 128, device=device,
                                                  fp8=tpkernels.FP8Recipe(cache_weights=True))
    mlp_fp8 = tpkernels.TensorParallelMLP(256, 128, device=device, fp8=tpkernels.FP8Recipe())

    def fp8_train_step():
        out = mlp_fp8(xg)
        torch.autograd.grad(out, [xg, *mlp_fp8.parameters()], torch.ones_like(out))

    def no_grad(fn, *args, **kwargs):
        def call():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return call

    tiny_x, tiny_w = torch.randn(1, 1, device=device), torch.randn(1, 1, device=device)
    return {
        "yardstick: torch.mm of 1 x 1 (torch's own host path)": lambda: torch.mm(tiny_x, tiny_w),
        "linear_gelu (inference)": lambda: tpkernels.linear_gelu(x, w1, b1),
        "linear_partial (inference)": lambda: tpkernels.linear_partial(h, w2, b2),
        "mlp_shard (inference)": lambda: tpkernels.mlp_shard(x, w1, b1, w2, b2),
        "mlp_shard forward + backward": train_step,
        # a module's inference runs under no_grad (its parameters need gradients); so do the functions
        # it is compared with, on the same tensors' sizes
        "linear_gelu (no grad)": no_grad(tpkernels.linear_gelu, x, w1, b1),
        "ColumnParallelLinear(gelu) (ws 1, no grad)": no_grad(column, x),
        "mlp_shard (no grad)": no_grad(tpkernels.mlp_shard, x, w1, b1, w2, b2),
        "TensorParallelMLP (ws 1, no grad)": no_grad(mlp, x),
        "TensorParallelMLP fp8, cached weights (ws 1, no grad)": no_grad(mlp_fp8_serving, x),
        "TensorParallelMLP fp8 forward + backward (ws 1)": fp8_train_step,
    }


# (module, the function it calls): the module's host time over the function's, stated beside the table
MODULE_RATIOS = {"ColumnParallelLinear(gelu) (ws 1, no grad)": "linear_gelu (no grad)",
                 "TensorParallelMLP (ws 1, no grad)": "mlp_shard (no grad)"}


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


def ratio_band(fn, baseline, rounds=21, seconds=0.05):
    """fn's host time over baseline's, in interleaved rounds (each round times both, alternating which
    goes first): (first quartile, median, third quartile) of the rounds' ratios. A target is met when the
    third quartile is under it, missed when the first is over, and within noise otherwise."""
    ratios = []
    for index in range(rounds):
        pair = (fn, baseline) if index % 2 == 0 else (baseline, fn)
        times = {}
        for f in pair:
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                f()
                calls += 1
            times[f] = (time.perf_counter() - start) / calls
        ratios.append(times[fn] / times[baseline])
    low, median, high = statistics.quantiles(ratios, n=4)
    return low, median, high


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if not ops.INTERPRETED and not torch.cuda.is_available():
        sys.exit("set TRITON_INTERPRET=1 before triton is imported (the default here) or run on a GPU")
    device = "cuda" if torch.cuda.is_available() and not ops.INTERPRETED else "cpu"
    import torch.distributed as dist

    init = os.path.join(tempfile.mkdtemp(), "init")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    calls = _calls(device)
    for fn in calls.values():
        fn()  # binds every launch of the call
    entries = list(bound.BOUND.values())
    for entry in entries:
        entry.launcher = _no_launch
    print(f"{len(entries)} bound launches, their launchers stubbed")
    print("| call | host us per call, median (min) of 9 rounds; compiled launch stubbed | / yardstick |\n"
          "| --- | --- | --- |")
    yardstick, medians = None, {}
    for name, fn in calls.items():
        median, least = measure(fn)
        yardstick = yardstick or median
        medians[name] = median
        print(f"| {name} | {median:.1f} ({least:.1f}) | {median / yardstick:.1f} |")
    for module, function in MODULE_RATIOS.items():
        low, median, high = ratio_band(calls[module], calls[function])
        verdict = "met" if high <= 1.3 else "missed" if low > 1.3 else "within noise of"
        print(f"{module} / {function}: {median:.2f}x (quartiles {low:.2f} to {high:.2f} of 21 interleaved "
              f"rounds): {verdict} the 1.3x target")
    if len(bound.BOUND) != len(entries):
        sys.exit("a launch was bound during the measurement: its kernel ran, and the numbers above count it")
    if args.profile:
        fn = calls["linear_gelu (inference)"]
        profile = cProfile.Profile()
        profile.runcall(lambda: [fn() for _ in range(2000)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
