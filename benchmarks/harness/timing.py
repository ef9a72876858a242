"""Checking and timing: the fp64 check before a provider is timed, the timers (CUDA graphs over rotated
operands, events, the CPU's), host time, telemetry, and the run's ceilings."""
import math
import statistics
import subprocess
import time

import torch
import triton

from harness.cases import ATOL, FP8_PROVIDERS


# Datasheet dense peaks (FLOP/s) by device name and dtype, for the floor; a device not listed uses the
# run's own large torch.mm. Bandwidth is always the run's own measured copy.
PEAK_FLOPS = {("H100", torch.bfloat16): 989e12, ("H100", torch.float16): 989e12, ("H100", torch.float32): 67e12,
              ("H200", torch.bfloat16): 989e12, ("H200", torch.float16): 989e12, ("H200", torch.float32): 67e12,
              ("H100", torch.float8_e4m3fn): 1979e12, ("H200", torch.float8_e4m3fn): 1979e12}


def _flatten(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check(op, provider, fn):
    """None when fn's output passes the 2x-eager rule against fp64 (torch_mm: against the GEMMs alone),
    else why not. The eager error is measured on the same inputs."""
    got = _flatten(fn())
    if provider == "torch_mm":  # the floor is eager's own GEMM: held to the fp64 GEMMs within atol alone
        ref = _flatten(op.gemm_reference())
        eager = [r.double() for r in ref]
    elif provider == "scaled_mm":  # the fp8 floor: the fp64 GEMM of the operands it multiplies, rounded to bf16
        ref = [op.scaled_mm_reference()]
        eager = [ref[0].to(torch.bfloat16)]
    else:
        baseline = "fp8_unfused" if provider in FP8_PROVIDERS else "eager"
        if not hasattr(op, "_checked"):
            op._checked = {}
        if baseline not in op._checked:  # the same fp64 reference and baseline outputs for every provider
            op._checked[baseline] = _flatten(op.reference()), _flatten(op.run(baseline)())
        ref, eager = (op.view_for(provider, outputs) for outputs in op._checked[baseline])
    if len(got) != len(ref):
        return f"{len(got)} outputs, expected {len(ref)}"
    for index, (g, e, r) in enumerate(zip(got, eager, ref)):
        g, e, r = (t.detach().double().cpu() for t in (g, e, r))
        if g.shape != r.shape:
            return f"output {index}: shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        if not torch.isfinite(g).all():
            return f"output {index}: non-finite values"
        err = (g - r).abs().max().item()
        limit = 2 * (e - r).abs().max().item() + ATOL[op.dtype] * max(1.0, r.abs().max().item())
        if err > limit:
            return f"output {index}: max error {err:.3e} > 2 x eager's + atol = {limit:.3e}"
    return None


class GraphTimer:
    """Device time of one call: a CUDA graph of `batch` calls rotating over `fns` (one per copy of the
    operands), replayed between two events. Raises where the calls cannot be captured."""

    name = "graph"

    def __init__(self, fns, batch):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs warm calls: allocator pools, lazy init
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph, self.batch = torch.cuda.CUDAGraph(), batch
        with torch.cuda.graph(self.graph):
            for i in range(batch):
                fns[i % len(fns)]()
        self.graph.replay()
        torch.cuda.synchronize()

    def measure(self, replays=3):
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / self.batch)
        return statistics.median(times)


class EventTimer:
    """The same rotation, issued from the host between two events: for calls a graph cannot capture."""

    name = "events"

    def __init__(self, fns, batch):
        self.fns, self.batch = fns, batch

    def measure(self, replays=3):
        times = []
        for _ in range(replays):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(self.batch):
                self.fns[i % len(self.fns)]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / self.batch)
        return statistics.median(times)


class CpuTimer:
    """Wall time of one call on the CPU: the median of `calls` calls a round (2 in the smoke run; for
    CPU results, enough calls for about 0.2 s, at least 5)."""

    name = "cpu"

    def __init__(self, fns, calls):
        self.fn, self.calls = fns[0], calls

    def measure(self, replays=None):
        times = []
        for _ in range(replays or self.calls):
            t0 = time.perf_counter()
            self.fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def make_timer(fns, device, floor_ms, cpu_calls=2):
    """A GraphTimer where the calls can be captured, else an EventTimer (CpuTimer on the CPU); the batch
    keeps one replay near a millisecond of work and covers every copy of the operands."""
    if device.type != "cuda":
        if cpu_calls is None:  # CPU results: calibrate on one call
            t0 = time.perf_counter()
            fns[0]()
            cpu_calls = min(200, max(5, math.ceil(0.2 / max(time.perf_counter() - t0, 1e-6))))
        return CpuTimer(fns, cpu_calls)
    batch = max(len(fns), min(512, math.ceil(1.0 / max(floor_ms, 1e-3))))
    try:
        return GraphTimer(fns, batch)
    except Exception:  # a host sync, a CPU tensor or a collective that capture forbids
        torch.cuda.synchronize()
        return EventTimer(fns, batch)


def rotation(op, device, l2_bytes):
    """The op and enough fresh copies that one pass over them reads more than three times the L2."""
    if device.type != "cuda" or not op.rotatable:
        return [op]
    copies = min(64, max(1, math.ceil(3 * l2_bytes / max(op.bytes(), 1))))
    return [op] + [op.fresh() for _ in range(copies - 1)]


def host_times_us(fn, calls):
    """CPU time of each of `calls` calls issued back to back without waiting for the device, in us."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return times


_NVML = [None]  # whether torch.cuda's NVML queries work here (None: not tried yet)


def telemetry(slow_ok=True):
    """(SM clock in MHz, power in W) now, through NVML (torch.cuda); where NVML is missing, through
    nvidia-smi if `slow_ok` (tens of ms a call), else (None, None). Always (None, None) on the CPU."""
    if not torch.cuda.is_available():
        return None, None
    if _NVML[0] is not False:
        try:
            sample = float(torch.cuda.clock_rate()), torch.cuda.power_draw() / 1000.0
            _NVML[0] = True
            return sample
        except Exception:  # no pynvml
            _NVML[0] = False
    if not slow_ok:
        return None, None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                              f"--id={torch.cuda.current_device()}"], capture_output=True, text=True, timeout=10)
        clock, power = (float(v) for v in out.stdout.strip().split(","))
        return clock, power
    except Exception:
        return None, None


def measure_ceilings(device):
    """(peak FLOP/s of a large torch.mm, bandwidth in bytes/s of a large copy), measured now."""
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: a @ a, rep=200)
        src = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200)
        return 2 * 8192**3 / (ms * 1e-3), 2 * src.numel() / (copy_ms * 1e-3)
    a = torch.randn(512, 512)
    ms = CpuTimer([lambda: a @ a], 5).measure()
    src = torch.empty(2**26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = CpuTimer([lambda: dst.copy_(src)], 5).measure()
    return 2 * 512**3 / (ms * 1e-3), 2 * src.numel() / (copy_ms * 1e-3)


def peak_flops(device_name, dtype, measured):
    """(peak FLOP/s for the floor, its source): the datasheet's for a known device, else the run's torch.mm."""
    for (name, dt), peak in PEAK_FLOPS.items():
        if name in device_name and dt == dtype:
            return peak, f"{name} datasheet, dense {str(dtype)[6:]}"
    return measured, "this run's largest torch.mm (bf16)"
