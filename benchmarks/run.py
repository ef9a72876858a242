"""One benchmark harness: ops x providers x shapes x dtypes, each provider checked against fp64 before it
is timed, written as JSON lines, a markdown table and a plot.

    python benchmarks/run.py --out DIR                     # a GPU: the full suite, headline points first
    python benchmarks/run.py --smoke --out DIR             # the CPU smoke run (the default without a GPU)
    python benchmarks/run.py --ops column_fwd --providers tpkernels torch_mm --dtypes bfloat16 \\
        --shapes 2048,4096,8192 --max-seconds 300 --out DIR

Ops (per-rank shapes; M tokens, K input features, N output features of the shard):
    column_fwd  h = gelu_tanh(x @ w.T + b)           x [M, K], w [N, K]
    row_fwd     p = x @ w.T + b + residual, fp32      x [M, K], w [N, K], residual [M, N] fp32
    column_bwd  dX, dW, db of column_fwd, given dY and the stored pre-activation z
    mlp_shard   forward and backward of one rank's column [N, K] and row [K, N] shards
    tp_mlp      a TensorParallelMLP step (forward and backward) over the process group: world size 1
                in-process, more under torchrun (gloo on CPU, NCCL on GPUs); rank 0 writes
GELU is the tanh form everywhere, so that cuBLASLt's epilogue (tanh only) compares like with like.

Providers: tpkernels (backend="auto"); tpkernels_triton (backend="triton", on CUDA); tpkernels_cublaslt
and tpkernels_cpu (the native extension's cuBLASLt and C++ backends, where built); eager (F.linear + F.gelu, autograd); torch_mm (the GEMMs alone: the floor);
compile (torch.compile(mode="max-autotune-no-cudagraphs") of eager; the default mode on the CPU); cublaslt
(torch._addmm_activation(..., use_gelu=True), CUDA only); tpkernels_overlap, tpkernels_sp and
tpkernels_sp_overlap (tp_mlp only: TensorParallelMLP with overlap=True, sequence_parallel=True, both; the
sequence-parallel ones take and give this rank's tokens, and are checked against that slice); wrong (eager
with an error planted, only when asked for: the correctness gate must refuse it).

Method: every provider's output is compared with an fp64 reference by the 2x-eager rule before it is
timed; a wrong one is reported and not timed. On a GPU, `triton.testing.do_bench` (L2 flushed between
runs) gives the median, min and max, and points with M <= 256 are timed as CUDA graph replays; the
autotuner settles during the correctness run, before timing. host_us is the CPU time of one call
outside a graph. The floor of a point is max(FLOPs / peak, bytes / bandwidth), with peak and bandwidth
measured in the same run (a large torch.mm and a device copy); pct_of_floor = floor / time.
CPU rows are labelled (device "cpu ...") and are never written under benchmarks/results/.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the kernels run under the interpreter, which triton reads as it decorates them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import tpkernels  # noqa: E402
from tpkernels import extension, ops  # noqa: E402

OPS = ("column_fwd", "row_fwd", "column_bwd", "mlp_shard", "tp_mlp")
PROVIDERS = ("tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "tpkernels_cpu", "eager", "torch_mm", "compile",
             "cublaslt", "tpkernels_overlap", "tpkernels_sp", "tpkernels_sp_overlap")
TEST_PROVIDERS = ("wrong",)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# The suites. Column (K, N) per shard and row (K, N) per shard, M tokens per rank (issue 8's targets).
COLUMN_KN = [(4096, 8192), (4096, 2048), (8192, 14336), (8192, 3584), (12288, 6144)]
ROW_KN = [(2048, 4096), (3584, 8192), (6144, 12288)]
M_VALUES = [1, 16, 64, 128, 256, 512, 2048, 8192, 16384]
HEADLINE = [("column_fwd", 8192, 4096, 8192), ("column_bwd", 8192, 4096, 8192), ("row_fwd", 8192, 3584, 8192),
            ("mlp_shard", 8192, 4096, 3584), ("column_fwd", 64, 4096, 8192), ("row_fwd", 64, 3584, 8192)]
SMOKE_SHAPES = [(16, 32, 48), (40, 64, 32)]


# ---------------------------------------------------------------------------------------------------
# Ops: inputs, fp64 reference, work counts, and each provider's callable


def _randn(*shape, dtype, device, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


class Op:
    """One benchmarked computation. `run(provider)` returns a zero-argument callable giving the output
    (a tensor or a tuple), or None when the provider does not apply; `reference()` is the same in fp64."""

    floor_like = False  # torch_mm computes only the GEMMs: it is checked against `gemm_reference`

    def __init__(self, M, K, N, dtype, device):
        self.M, self.K, self.N, self.dtype, self.device = M, K, N, dtype, device

    def view_for(self, provider, outputs):
        """The part of the (reference or eager) outputs that `provider` computes: all of them, but for
        providers that hold a shard."""
        return outputs


def _gelu(t):
    return F.gelu(t, approximate="tanh")


class ColumnForward(Op):
    def __init__(self, *args):
        super().__init__(*args)
        M, K, N, dt, dev = self.M, self.K, self.N, self.dtype, self.device
        self.x = _randn(M, K, dtype=dt, device=dev)
        self.w = _randn(N, K, dtype=dt, device=dev, scale=K**-0.5)
        self.b = _randn(N, dtype=dt, device=dev)

    def flops(self):
        return 2 * self.M * self.N * self.K

    def bytes(self):
        return (self.M * self.K + self.N * self.K + self.N + self.M * self.N) * self.x.element_size()

    def reference(self):
        return _gelu(F.linear(self.x.double(), self.w.double(), self.b.double()))

    def gemm_reference(self):
        return self.x.double() @ self.w.double().t()

    def run(self, provider):
        x, w, b = self.x, self.w, self.b

        def eager():
            return _gelu(F.linear(x, w, b))

        return {
            "tpkernels": lambda: tpkernels.linear_gelu(x, w, b, approximate="tanh"),
            **_native(lambda backend: (lambda: tpkernels.linear_gelu(x, w, b, approximate="tanh", backend=backend)), x),
            "eager": eager,
            "wrong": lambda: eager() * 1.1,
            "torch_mm": lambda: x @ w.t(),
            "compile": _compiled(eager),
            "cublaslt": (lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)) if x.is_cuda else None,
        }.get(provider)


class RowForward(ColumnForward):
    def __init__(self, *args):
        super().__init__(*args)
        self.r = _randn(self.M, self.N, dtype=torch.float32, device=self.device)

    def bytes(self):
        return super().bytes() + self.M * self.N * (4 + 4 - self.x.element_size())  # fp32 residual and out

    def reference(self):
        return F.linear(self.x.double(), self.w.double(), self.b.double()) + self.r.double()

    def run(self, provider):
        x, w, b, r = self.x, self.w, self.b, self.r

        def eager():
            return F.linear(x, w, b).float() + r

        return {
            "tpkernels": lambda: tpkernels.linear_partial(x, w, b, residual=r, out_dtype=torch.float32),
            **_native(lambda backend: (lambda: tpkernels.linear_partial(x, w, b, residual=r, out_dtype=torch.float32,
                                                                        backend=backend)), x),
            "eager": eager,
            "wrong": lambda: eager() + 0.5,
            "torch_mm": lambda: x @ w.t(),
            "compile": _compiled(eager),
        }.get(provider)


class ColumnBackward(ColumnForward):
    """dX, dW and db of h = gelu_tanh(x @ w.T + b), given dY [M, N] and the stored z [M, N]."""

    def __init__(self, *args):
        super().__init__(*args)
        self.dy = _randn(self.M, self.N, dtype=self.dtype, device=self.device)
        self.z = F.linear(self.x, self.w, self.b)

    def flops(self):
        return 4 * self.M * self.N * self.K

    def bytes(self):
        e = self.x.element_size()
        return (2 * self.M * self.N + 2 * (self.M * self.K + self.N * self.K) + self.N) * e

    def reference(self):
        x, w, dy, z = (t.double() for t in (self.x, self.w, self.dy, self.z))
        dz = torch.ops.aten.gelu_backward(dy, z, approximate="tanh")
        return dz @ w, dz.t() @ x, dz.sum(0)

    def gemm_reference(self):
        x, w, dy = (t.double() for t in (self.x, self.w, self.dy))
        return dy @ w, dy.t() @ x

    def run(self, provider):
        x, w, dy, z = self.x, self.w, self.dy, self.z

        def eager():
            dz = torch.ops.aten.gelu_backward(dy, z, approximate="tanh")
            return dz @ w, dz.t() @ x, dz.sum(0, dtype=torch.float32).to(x.dtype)

        def fused():
            return torch.ops.tpkernels.fused_linear_backward(dy, x, w, z, ops.GELU_TANH, True, True, True)

        return {
            "tpkernels": fused,
            **_native(lambda backend: (fused if backend == "triton" else lambda: torch.ops.tpkernels.epilogue_linear_backward(
                dy, x, w, z, ops.GELU_TANH, True, True, True)), x),
            "eager": eager,
            "wrong": lambda: tuple(t * 1.1 for t in eager()),
            "torch_mm": lambda: (dy @ w, dy.t() @ x),
            "compile": _compiled(eager),
        }.get(provider)


class MLPShard(Op):
    """Forward and backward of one rank's shards: w1 [N, K] (column), w2 [K, N] (row), x [M, K]."""

    def __init__(self, *args):
        super().__init__(*args)
        M, K, N, dt, dev = self.M, self.K, self.N, self.dtype, self.device
        self.x = _randn(M, K, dtype=dt, device=dev, requires_grad=True)
        self.w1 = _randn(N, K, dtype=dt, device=dev, scale=K**-0.5, requires_grad=True)
        self.b1 = _randn(N, dtype=dt, device=dev, requires_grad=True)
        self.w2 = _randn(K, N, dtype=dt, device=dev, scale=N**-0.5, requires_grad=True)
        self.b2 = _randn(K, dtype=dt, device=dev, requires_grad=True)
        self.dy = _randn(M, K, dtype=dt, device=dev)
        self.params = (self.x, self.w1, self.b1, self.w2, self.b2)

    def flops(self):
        return 3 * 2 * (2 * self.M * self.N * self.K)  # two GEMMs forward, four backward

    def bytes(self):
        e = self.x.element_size()
        return (4 * self.M * self.K + 4 * self.N * self.K + 3 * self.M * self.N) * e

    def _step(self, forward, params):
        out = forward(*params)
        return (out, *torch.autograd.grad(out, params, self.dy.to(out.dtype)))

    def reference(self):
        params = [p.detach().double().requires_grad_() for p in self.params]
        return self._step(_eager_mlp, params)

    def gemm_reference(self):
        x, w1, w2, dy = (t.detach().double() for t in (self.x, self.w1, self.w2, self.dy))
        h = x @ w1.t()
        dh = dy @ w2
        return h @ w2.t(), dh @ w1, dh.t() @ x, dy.t() @ h

    def run(self, provider):
        params = self.params
        x, w1, w2, dy = (t.detach() for t in (self.x, self.w1, self.w2, self.dy))

        def gemms():
            h = x @ w1.t()
            dh = dy @ w2
            return h @ w2.t(), dh @ w1, dh.t() @ x, dy.t() @ h

        compiled = _compiled(_eager_mlp)
        def native(backend):
            return lambda: self._step(lambda *p: tpkernels.mlp_shard(*p, approximate="tanh", backend=backend), params)

        return {
            "tpkernels": lambda: self._step(_fused_mlp, params),
            **_native(native, self.x),
            "eager": lambda: self._step(_eager_mlp, params),
            "wrong": lambda: tuple(t * 1.1 for t in self._step(_eager_mlp, params)),
            "torch_mm": gemms,
            "compile": None if compiled is None else (lambda: self._step(compiled, params)),
        }.get(provider)


def _eager_mlp(x, w1, b1, w2, b2):
    return F.linear(_gelu(F.linear(x, w1, b1)), w2, b2)


def _fused_mlp(x, w1, b1, w2, b2):
    return tpkernels.mlp_shard(x, w1, b1, w2, b2, approximate="tanh")


class TPMLP(MLPShard):
    """A TensorParallelMLP step over the default process group: K model width, N the whole hidden width
    (each rank holds N / world of it), against the dense eager MLP."""

    def __init__(self, M, K, N, dtype, device):
        Op.__init__(self, M, K, N, dtype, device)
        torch.manual_seed(0)  # the same dense weights on every rank
        self.dense = tpkernels.reference.MLP(K, N, approximate="tanh", device=device, dtype=dtype)
        self.tp = {
            options: tpkernels.TensorParallelMLP.from_dense(self.dense.fc1, self.dense.fc2, approximate="tanh",
                                                            sequence_parallel=options[0], overlap=options[1])
            for options in ((False, False), (False, True), (True, False), (True, True))
        }
        self.x = _randn(M, K, dtype=dtype, device=device, requires_grad=True)
        self.dy = _randn(M, K, dtype=dtype, device=device)
        self.world = tpkernels.distributed.get_world_size()
        rank = tpkernels.distributed.get_rank()
        # sequence parallel: this rank's tokens in and out
        self.x_shard = torch.tensor_split(self.x.detach(), self.world)[rank].clone().requires_grad_()
        self.dy_shard = torch.tensor_split(self.dy, self.world)[rank]
        self.rank = rank

    def flops(self):
        return 6 * 2 * self.M * self.K * self.N // self.world

    def bytes(self):
        e = self.x.element_size()
        return (4 * self.M * self.K + 4 * self.N * self.K // self.world + 3 * self.M * self.N // self.world) * e

    def _module_step(self, module, sequence_parallel=False):
        x, dy = (self.x_shard, self.dy_shard) if sequence_parallel else (self.x, self.dy)
        out = module(x)
        (dx,) = torch.autograd.grad(out, (x,), dy)
        return out, dx

    def view_for(self, provider, outputs):
        if provider.startswith("tpkernels_sp"):
            return [torch.tensor_split(t, self.world)[self.rank] for t in outputs]
        return outputs

    def reference(self):
        dense64 = tpkernels.reference.MLP(self.K, self.N, approximate="tanh", dtype=torch.float64)
        dense64.load_state_dict({k: v.double() for k, v in self.dense.state_dict().items()})
        x = self.x.detach().double().requires_grad_()
        out = dense64.to(self.device)(x)
        return out, torch.autograd.grad(out, (x,), self.dy.double())[0]

    def run(self, provider):
        return {
            "tpkernels": lambda: self._module_step(self.tp[False, False]),
            "tpkernels_overlap": lambda: self._module_step(self.tp[False, True]),
            "tpkernels_sp": lambda: self._module_step(self.tp[True, False], sequence_parallel=True),
            "tpkernels_sp_overlap": lambda: self._module_step(self.tp[True, True], sequence_parallel=True),
            "eager": lambda: self._module_step(self.dense),
            "wrong": lambda: tuple(t * 1.1 for t in self._module_step(self.dense)),
        }.get(provider)


OP_CLASSES = {"column_fwd": ColumnForward, "row_fwd": RowForward, "column_bwd": ColumnBackward,
              "mlp_shard": MLPShard, "tp_mlp": TPMLP}


def _native(make, x):
    """The explicit-backend providers that can run on x's device: {name: callable}."""
    providers = {"tpkernels_triton": make("triton")} if x.is_cuda else {}
    backend = "cublaslt" if x.is_cuda else "cpu"
    if extension.has(x.device.type):
        providers[f"tpkernels_{backend}"] = make(backend)
    return providers


def _compiled(fn):
    # On the CPU (the smoke run) the default mode: max-autotune there benchmarks C++ GEMM templates for
    # minutes, and CPU rows are not results anyway.
    mode = "max-autotune-no-cudagraphs" if torch.cuda.is_available() else "default"
    return torch.compile(fn, mode=mode, dynamic=False)


# ---------------------------------------------------------------------------------------------------
# Checking and timing


def _flatten(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check(op, provider, fn):
    """None when fn's output passes the 2x-eager rule against fp64 (torch_mm: against the GEMMs alone),
    else why not. The eager error is measured on the same inputs."""
    got = _flatten(fn())
    if provider == "torch_mm":  # the floor is eager's own GEMM: held to the fp64 GEMMs within atol alone
        ref = _flatten(op.gemm_reference())
        eager = [r.double() for r in ref]
    else:
        ref = op.view_for(provider, _flatten(op.reference()))
        eager = op.view_for(provider, _flatten(op.run("eager")()))
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


def time_gpu(fn, graph):
    if graph:
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=50, quantiles=[0.5, 0.0, 1.0])
            return tuple(ms)
        except Exception:  # not capturable (a host sync or an allocation capture forbids): time it plainly
            pass
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0, 1.0]))


def time_cpu(fn, seconds=0.5, max_reps=20):
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def host_overhead_us(fn, calls=20):
    """CPU time of one call outside a graph: the calls are issued without waiting for the device."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


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
    ms, _, _ = time_cpu(lambda: a @ a, seconds=0.3)
    src = torch.empty(2**26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms, _, _ = time_cpu(lambda: dst.copy_(src), seconds=0.3)
    return 2 * 512**3 / (ms * 1e-3), 2 * src.numel() / (copy_ms * 1e-3)


# ---------------------------------------------------------------------------------------------------
# Suites, records, output


def suite(ops_wanted, shapes, smoke):
    """The (op, M, K, N) points to run, headline points first."""
    if shapes or smoke:
        return [(op, *shape) for op in ops_wanted for shape in (shapes or SMOKE_SHAPES)]
    points = [p for p in HEADLINE if p[0] in ops_wanted]
    for op in ops_wanted:
        kn = ROW_KN if op == "row_fwd" else COLUMN_KN
        if op == "mlp_shard":  # (K model width, N hidden shard) of the column shapes
            kn = [(k, n) for k, n in COLUMN_KN if n < k] or COLUMN_KN
        if op == "tp_mlp":
            kn = [(4096, 16384)]
        points += [(op, M, K, N) for K, N in kn for M in M_VALUES if (op, M, K, N) not in points]
    return points


def parse_shapes(values):
    shapes = []
    for value in values or []:
        if value == "smoke":
            shapes += SMOKE_SHAPES
            continue
        try:
            M, K, N = (int(v) for v in value.split(","))
        except ValueError:
            raise SystemExit(f"--shapes: {value!r} is not M,K,N (three integers) nor 'smoke'") from None
        shapes.append((M, K, N))
    return shapes


def environment(device):
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu (triton interpreter)" if ops.INTERPRETED else "cpu (eager fallback)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__,
                git_sha=sha + ("-dirty" if dirty else ""), date=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"), command=" ".join([os.path.basename(sys.executable)] + sys.argv))


def markdown(rows):
    lines = ["| op | M | K | N | dtype | provider | ms (min-max) | TFLOP/s | GB/s | % of floor | host us | vs tpkernels |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fused = {(r["op"], r["M"], r["K"], r["N"], r["dtype"]): r["ms"] for r in rows
             if r["provider"] == "tpkernels" and r["ms"] is not None}
    for r in rows:
        if r["ms"] is None:
            lines.append(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['dtype']} | {r['provider']} | "
                         f"{r['status']} | | | | | |")
            continue
        base = fused.get((r["op"], r["M"], r["K"], r["N"], r["dtype"]))
        ratio = f"{r['ms'] / base:.3g}x" if base else "-"
        lines.append(
            f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['dtype']} | {r['provider']} | "
            f"{r['ms']:.4g} ({r['ms_min']:.4g}-{r['ms_max']:.4g}) | {r['tflops']:.3g} | {r['gbps']:.3g} | "
            f"{r['pct_of_floor']:.1f} | {r['host_us']:.1f} | {ratio} |")
    return "\n".join(lines)


def targets(rows):
    """Issue 8's targets, each with its measured ratios (GPU rows only)."""
    if all(r["cpu"] for r in rows):
        return "CPU run: the targets are for GPU rows (bf16 on an H100 or H200), and none are here."
    timed = {(r["op"], r["M"], r["K"], r["N"], r["dtype"], r["provider"]): r["ms"] for r in rows
             if r["ms"] and not r["cpu"]}

    def ratios(op, num, den, keep=lambda M, K: True):
        out = []
        for (o, M, K, N, dt, p), ms in timed.items():
            other = timed.get((o, M, K, N, dt, den))
            if o == op and p == num and other and keep(M, K):
                out.append(ms / other)
        return out

    checks = [
        ("column fused / torch_mm <= 1.05, M >= 2048", ratios("column_fwd", "tpkernels", "torch_mm", lambda M, K: M >= 2048), 1.05, "max"),
        ("column fused / torch_mm <= 1.15, M <= 256", ratios("column_fwd", "tpkernels", "torch_mm", lambda M, K: M <= 256), 1.15, "max"),
        ("eager / fused >= 1.08, K = 4096, M >= 2048", [1 / r for r in ratios("column_fwd", "tpkernels", "eager", lambda M, K: K == 4096 and M >= 2048)], 1.08, "min"),
        ("eager / fused >= 1.3, M <= 64", [1 / r for r in ratios("column_fwd", "tpkernels", "eager", lambda M, K: M <= 64)], 1.3, "min"),
        ("fused / compile <= 1.0 on 80% of points", ratios("column_fwd", "tpkernels", "compile"), 1.0, "80%"),
        ("fused / cublaslt <= 1.0 on half", ratios("column_fwd", "tpkernels", "cublaslt"), 1.0, "50%"),
        ("row fused / torch_mm <= 1.05, M >= 2048", ratios("row_fwd", "tpkernels", "torch_mm", lambda M, K: M >= 2048), 1.05, "max"),
        ("column backward fused / eager <= 0.9", ratios("column_bwd", "tpkernels", "eager"), 0.9, "max"),
    ]
    lines = ["| target | points | measured | met |", "| --- | --- | --- | --- |"]
    for name, values, limit, how in checks:
        if not values:
            lines.append(f"| {name} | 0 | - | no data |")
            continue
        if how == "max":
            measured, met = max(values), max(values) <= limit
        elif how == "min":
            measured, met = min(values), min(values) >= limit
        else:
            share = sum(v <= limit for v in values) / len(values)
            measured, met = share, share >= float(how[:-1]) / 100
        lines.append(f"| {name} | {len(values)} | {measured:.3f} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def backend_table(rows, env):
    """The `tpkernels/backend_table.json` these GPU rows argue for: per dtype, activation (column_fwd:
    tanh GELU, row_fwd: none) and measured M, cuBLASLt where it beat Triton on most (K, N) points; each
    rule covers M from its point up to the next measured M."""
    timed = {(r["op"], r["M"], r["K"], r["N"], r["dtype"], r["provider"]): r["ms"] for r in rows
             if r["ms"] and not r["cpu"]}
    votes = {}
    for (op, M, K, N, dtype, provider), ms in timed.items():
        activation = {"column_fwd": ops.GELU_TANH, "row_fwd": ops.IDENTITY}.get(op)
        other = timed.get((op, M, K, N, dtype, "tpkernels_triton"))
        if provider == "tpkernels_cublaslt" and activation is not None and other:
            votes.setdefault((dtype, activation), {}).setdefault(M, []).append(ms < other)
    rules = []
    for (dtype, activation), by_m in sorted(votes.items()):
        ms = sorted(by_m)
        for i, M in enumerate(ms):
            if sum(by_m[M]) * 2 > len(by_m[M]):
                rule = {"dtypes": [dtype], "activations": [activation], "min_m": M, "backend": "cublaslt"}
                if i + 1 < len(ms):
                    rule["max_m"] = ms[i + 1] - 1
                rules.append(rule)
    rules.append({"backend": "triton"})
    return {"source": f"measured: {env['device']}, {env['date']}, git {env['git_sha']}, `{env['command']}`",
            "rules": rules}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["ms"]]
    op_names = [o for o in OPS if any(r["op"] == o for r in timed)]
    if not op_names:
        return False
    fig, axes = plt.subplots(1, len(op_names), figsize=(5 * len(op_names), 4), squeeze=False)
    for ax, op in zip(axes[0], op_names):
        lines = {}
        for r in timed:
            if r["op"] == op:
                lines.setdefault((r["provider"], r["K"], r["N"], r["dtype"]), []).append((r["M"], r["tflops"]))
        for (provider, K, N, dtype), points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{provider} K={K} N={N} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(op)
        ax.legend(fontsize=6)
    fig.suptitle(f"{rows[0]['device']} | torch {rows[0]['torch']} | triton {rows[0]['triton']} | {rows[0]['git_sha']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------
# Main


def _init_distributed():
    if "RANK" not in os.environ or torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS + TEST_PROVIDERS)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="default: bfloat16 on a GPU, float32 and float16 on the CPU")
    parser.add_argument("--shapes", nargs="+", help="M,K,N triples, or 'smoke'; default: the suite")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter (the CPU default)")
    parser.add_argument("--out", help="folder for results.jsonl, table.md, plot.png (default: a new temp folder)")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="start no new point after this many seconds")
    args = parser.parse_args(argv)

    _init_distributed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    smoke = args.smoke or device.type == "cpu"
    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else (
        [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.float16])
    out = args.out or tempfile.mkdtemp(prefix="tpkernels-bench-")
    if device.type == "cpu" and os.path.realpath(out).startswith(os.path.realpath(RESULTS)):
        parser.error(f"--out {out}: CPU rows are never written under {RESULTS}; results there are GPU runs")
    os.makedirs(out, exist_ok=True)
    env = environment(device)
    peak, bandwidth = measure_ceilings(device)
    points = [(op, M, K, N, dtype) for op, M, K, N in suite(args.ops, parse_shapes(args.shapes), smoke)
              for dtype in dtypes]
    if rank == 0:
        print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']} | "
              f"peak {peak / 1e12:.3g} TFLOP/s, copy {bandwidth / 1e9:.3g} GB/s | {len(points)} points -> {out}",
              flush=True)
    rows, start = [], time.time()
    progress = _progress(total=len(points) * len(args.providers), disable=rank != 0)
    for op_name, M, K, N, dtype in points:
        if time.time() - start > args.max_seconds:
            if rank == 0:
                print(f"--max-seconds {args.max_seconds:g} reached: {len(rows)} rows done, the rest skipped", flush=True)
            break
        op = OP_CLASSES[op_name](M, K, N, dtype, device)
        floor_s = max(op.flops() / peak, op.bytes() / bandwidth)
        for provider in args.providers:
            progress.set_description(f"{op_name} M={M} K={K} N={N} {str(dtype)[6:]} {provider}")
            row = dict(op=op_name, provider=provider, M=M, K=K, N=N, dtype=str(dtype).replace("torch.", ""),
                       world_size=tpkernels.distributed.get_world_size(), cpu=device.type == "cpu", ms=None,
                       ms_min=None, ms_max=None, tflops=None, gbps=None, pct_of_floor=None, host_us=None,
                       floor_ms=floor_s * 1e3, **env)
            fn = op.run(provider)
            if fn is None:
                row["status"] = "n/a"
            else:
                try:
                    problem = check(op, provider, fn)  # also runs the autotuner and compiles, before timing
                except Exception as error:  # a provider that cannot run this point is reported, not fatal
                    problem = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                if problem:
                    row["status"] = f"wrong: {problem}" if not problem.startswith("failed") else problem
                else:
                    if device.type == "cuda":
                        ms, ms_min, ms_max = time_gpu(fn, graph=M <= 256)
                    else:
                        ms, ms_min, ms_max = time_cpu(fn)
                    row.update(status="ok", ms=ms, ms_min=ms_min, ms_max=ms_max,
                               tflops=op.flops() / (ms * 1e-3) / 1e12, gbps=op.bytes() / (ms * 1e-3) / 1e9,
                               pct_of_floor=100 * floor_s / (ms * 1e-3), host_us=host_overhead_us(fn))
            rows.append(row)
            progress.update()
    progress.close()
    if rank != 0:
        return 0
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = markdown(rows)
    summary = targets(rows)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']} | {env['date']}\n\n"
                f"`{env['command']}`\n\npeak {peak / 1e12:.4g} TFLOP/s (torch.mm), copy {bandwidth / 1e9:.4g} GB/s\n\n"
                f"{table}\n\n## Targets\n\n{summary}\n")
    plotted = plot(rows, os.path.join(out, "plot.png"))
    if not all(r["cpu"] for r in rows) and any(r["provider"] == "tpkernels_cublaslt" and r["ms"] for r in rows):
        with open(os.path.join(out, "backend_table.json"), "w") as f:
            json.dump(backend_table(rows, env), f, indent=2)
        print(f"backend table from these rows: {out}/backend_table.json (commit it as tpkernels/backend_table.json)")
    print(table)
    print(summary)
    wrong = [r for r in rows if r["status"].startswith(("wrong", "failed"))]
    print(f"{len(rows)} rows, {sum(r['status'] == 'ok' for r in rows)} timed, {len(wrong)} wrong or failed -> "
          f"{out}/results.jsonl, table.md{', plot.png' if plotted else ''}")
    return 0


def _progress(total, disable):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=disable, dynamic_ncols=True)
    except ImportError:  # the benchmarks extra brings tqdm; without it, a line per point
        class Lines:
            def __init__(self):
                self.done = 0

            def set_description(self, text):
                if not disable:
                    print(f"[{self.done + 1}/{total}] {text}", flush=True)

            def update(self):
                self.done += 1

            def close(self):
                pass

        return Lines()


if __name__ == "__main__":
    sys.exit(main())
