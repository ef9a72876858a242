"""One benchmark harness: ops x providers x shapes x dtypes x GELU forms, each provider checked against
fp64 before it is timed, in shuffled rounds with paired ratios; JSON lines, a markdown table and a plot.

    python benchmarks/run.py --plan headline --out DIR      # a GPU: the points that decide things, < 5 min
    python benchmarks/run.py --plan headline --dry-run      # its points and predicted duration, then stop
    python benchmarks/run.py --out DIR                     # a GPU: the full suite
    python benchmarks/run.py --smoke --out DIR             # the CPU smoke run (the default without a GPU)
    python benchmarks/run.py --cpu-results --out DIR       # the CPU backends as results, no interpreter
    python benchmarks/run.py --ops column_fwd --providers tpkernels torch_mm --dtypes bfloat16 --gelu none \\
        --shapes 2048,4096,8192 --rounds 7 --out DIR

Ops (per-rank shapes; M tokens, K input features, N output features of the shard):
    column_fwd  h = gelu(x @ w.T + b)                  x [M, K], w [N, K]
    row_fwd     p = x @ w.T + b + residual, fp32 out    x [M, K], w [N, K], residual [M, N] fp32
    column_bwd  dX, dW, db of column_fwd, given dY (the forward's graph is built outside the timing)
    mlp_shard   forward and backward of one rank's column [N, K] and row [K, N] shards
    tp_mlp      a TensorParallelMLP step (forward and backward) over the process group: world size 1
                in-process, more under torchrun (gloo on CPU, NCCL on GPUs); rank 0 writes
GELU is `--gelu tanh` (the default: cuBLASLt's epilogue has only the tanh form) or `none` (exact, the
modules' default), per point.

Providers: tpkernels (backend="auto"); tpkernels_triton (backend="triton", on CUDA); tpkernels_cublaslt
and tpkernels_cpu (the native extension's, where built); tpkernels_cpu_packed (tpkernels_cpu with its
packed-weight cache in use: `extension.cpu_weight_cache`), tpkernels_packed (auto with it); eager
(autograd over the unfused ops, doing the same work as ours: the row stage's GEMM in fp32 plus the fp32
residual); torch_mm (the GEMMs alone: a lower bound that skips the epilogue; row rows also give it plus
the epilogue's extra bytes at the measured bandwidth); compile (torch.compile of eager); cublaslt (torch._addmm_activation, CUDA, tanh GELU);
tpkernels_overlap, tpkernels_sp, tpkernels_sp_overlap (tp_mlp: TensorParallelMLP with overlap=True,
sequence_parallel=True, both). Test providers, only when asked for: wrong (eager with an error planted)
and no_residual (the row stage without its residual): the fp64 check must refuse both.

Method. Every provider's output is compared with an fp64 reference by the 2x-eager rule before it is
timed; a wrong one is reported and not timed. One timer for every point and provider on a GPU: a CUDA
graph of a batch of calls that rotate over enough copies of the operands that the working set exceeds
three times the L2, so every call reads from HBM and no host time is inside ("graph"; the row's
`copies` says how many, and `compile` keeps one, since each copy would recompile); a provider that
cannot be captured is timed the same way with events around the calls ("events", which counts host
time when the host is slower). Each point runs `--rounds` rounds (5 on a GPU, 2 on the CPU), the
providers in a new shuffled order each round, on the same tensors; a row keeps its per-round times, and
its ratio to every other provider is computed round by round: `ratio_vs_<provider>` is their median and
`ratio_vs_<provider>_band` their [min, max]. A target is met or missed only when the whole band is on one
side of it; otherwise it is within noise. host_us is the median CPU time of one call issued without
waiting for the device (200 calls over the rounds on a GPU). Each row also says what ran (`config`: the
kernel and tile, or the library path), the SM clock and power sampled while it ran (null on the CPU),
the floor's peak and bandwidth, the git sha and whether the tree was dirty. Smoke rows are labelled
(device "cpu (triton interpreter)") and are never written under benchmarks/results/; `--cpu-results`
rows name the CPU (model, cores, threads) and are results, with a CPU auto table beside them.
"""
import argparse
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

import torch  # noqa: E402

if not torch.cuda.is_available() and "--cpu-results" not in sys.argv:
    # Without a GPU the kernels run under the interpreter, which triton reads as it decorates them; CPU
    # results time the CPU backends in their normal state, without it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import tpkernels  # noqa: E402
from tpkernels import autotune, extension, launch, ops  # noqa: E402

OPS = ("column_fwd", "row_fwd", "column_bwd", "mlp_shard", "tp_mlp", "gated_fwd")
PROVIDERS = ("tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "tpkernels_cpu", "tpkernels_cpu_packed",
             "tpkernels_packed", "eager", "torch_mm", "compile",
             "cublaslt", "tpkernels_overlap", "tpkernels_sp", "tpkernels_sp_overlap", "tpkernels_pointer",
             "tpkernels_splitk", "tpkernels_tma", "tpkernels_fp8", "fp8_unfused", "scaled_mm")
# The fp8 providers (`--dtypes fp8`), held to the unfused fp8 path's error.
FP8_PROVIDERS = ("tpkernels_fp8", "fp8_unfused", "scaled_mm")
# The Triton backend on one kernel by name (GPU, the forward ops): what the kernel table is measured from.
KERNEL_PROVIDERS = {"tpkernels_pointer": "pointer", "tpkernels_splitk": "splitk", "tpkernels_tma": "tma"}
TEST_PROVIDERS = ("wrong", "no_residual")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "fp8": torch.float8_e4m3fn}  # fp8: e4m3 compute over bf16 master tensors (FP8Op)
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GELU_FORMS = ("tanh", "none")

# The suites. Column (K, N) per shard and row (K, N) per shard, M tokens per rank.
COLUMN_KN = [(4096, 8192), (4096, 2048), (8192, 14336), (8192, 3584), (12288, 6144)]
ROW_KN = [(2048, 4096), (3584, 8192), (6144, 12288)]
M_VALUES = [1, 16, 64, 128, 256, 512, 2048, 8192, 16384]
SMOKE_SHAPES = [(16, 32, 48), (40, 64, 32)]
# The headline plan: the points that decide the backend table, the kernel choice and the targets, sized
# to fit a short GPU slot. (op, M, K, N, dtype, gelu).
_BF16, _FP8 = "bfloat16", "fp8"
HEADLINE = (
    [("column_fwd", M, 4096, 2048, _BF16, "tanh") for M in (1, 64, 256, 8192)]
    + [("column_fwd", M, 4096, 8192, _BF16, "tanh") for M in (1, 64, 256, 2048, 8192)]
    + [("row_fwd", M, 3584, 8192, _BF16, "tanh") for M in (1, 256, 8192)]
    + [("column_bwd", M, 4096, 8192, _BF16, "tanh") for M in (256, 8192)]
    + [("mlp_shard", M, 4096, 3584, _BF16, "tanh") for M in (256, 8192)]
    + [("column_fwd", M, 4096, 8192, _BF16, "none") for M in (16, 8192)]
    + [("tp_mlp", 4096, 4096, 16384, _BF16, "tanh")]
    # fp8 (issue 18's targets): the MLP step, the column forward against the bare fp8 GEMM, decode
    + [("mlp_shard", 8192, 4096, 3584, _FP8, "tanh")]
    + [("column_fwd", M, 4096, 8192, _FP8, "tanh") for M in (16, 8192)]
    # the gated MLP's column stage (silu(x Wg) * (x Wu), N = F_r): Llama-3-8B and -70B at TP 8, decode and prefill
    + [("gated_fwd", M, 4096, 1792, _BF16, "none") for M in (1, 64, 2048, 8192)]
    + [("gated_fwd", M, 8192, 3584, _BF16, "none") for M in (1, 64, 8192)]
)
# `--cpu-results`: the CPU backends as real results on the machine at hand, decode and prefill shapes,
# fp32 and bf16, both GELU forms (exact: the modules' default) and the row stage with fp32 partials.
CPU_RESULTS = ([("column_fwd", M, K, N, dt, gelu) for dt in ("float32", "bfloat16") for gelu in ("none", "tanh")
                for M, K, N in ((1, 4096, 2048), (16, 4096, 2048), (64, 1024, 4096), (512, 1024, 4096))]
               + [("row_fwd", M, K, N, dt, "none") for dt in ("float32", "bfloat16")
                  for M, K, N in ((1, 2048, 4096), (64, 1024, 4096), (512, 1024, 4096))]
               # the gated column stage (auto is eager on plain CPU tensors): Llama-3-8B's TP 8 shard, and prefill
               + [("gated_fwd", M, K, N, dt, "none") for dt in ("float32", "bfloat16")
                  for M, K, N in ((1, 4096, 1792), (16, 4096, 1792), (512, 1024, 2048))])
CPU_RESULTS_PROVIDERS = ("tpkernels", "tpkernels_packed", "tpkernels_cpu", "tpkernels_cpu_packed", "eager", "torch_mm")
HEADLINE_PROVIDERS = ("tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm", "cublaslt",
                      "tpkernels_overlap", "tpkernels_pointer", "tpkernels_splitk", "tpkernels_tma", "tpkernels_fp8",
                      "fp8_unfused", "scaled_mm")
# Datasheet dense peaks (FLOP/s) by device name and dtype, for the floor; a device not listed uses the
# run's own large torch.mm. Bandwidth is always the run's own measured copy.
PEAK_FLOPS = {("H100", torch.bfloat16): 989e12, ("H100", torch.float16): 989e12, ("H100", torch.float32): 67e12,
              ("H200", torch.bfloat16): 989e12, ("H200", torch.float16): 989e12, ("H200", torch.float32): 67e12,
              ("H100", torch.float8_e4m3fn): 1979e12, ("H200", torch.float8_e4m3fn): 1979e12}


# ---------------------------------------------------------------------------------------------------
# Ops: inputs, fp64 reference, work counts, and each provider's callable


def _randn(*shape, dtype, device, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _linear_fp32(x, w):
    """x @ w.T accumulated and returned in fp32 without rounding to x's dtype: what the row stage's
    unfused eager path must compute to do our work. cuBLAS writes fp32 directly where torch has
    mm's out_dtype (CUDA); elsewhere the operands are upcast (exact for 16-bit inputs)."""
    if x.is_cuda and x.dtype != torch.float32:
        try:
            return torch.mm(x, w.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return x.float() @ w.float().t()


class Op:
    """One benchmarked computation. `run(provider)` returns a zero-argument callable giving the output
    (a tensor or a tuple), or None when the provider does not apply; `reference()` is the same in fp64.
    `fresh()` is the same computation on new tensors (the timer rotates over such copies)."""

    rotatable = True

    def __init__(self, M, K, N, dtype, device, gelu="tanh"):
        self.M, self.K, self.N, self.dtype, self.device, self.gelu = M, K, N, dtype, device, gelu

    def fresh(self):
        return type(self)(self.M, self.K, self.N, self.dtype, self.device, self.gelu)

    def act(self, t):
        return F.gelu(t, approximate=self.gelu)

    def view_for(self, provider, outputs):
        """The part of the (reference or eager) outputs that `provider` computes: all of them, but for
        providers that hold a shard."""
        return outputs

    def extra_epilogue_bytes(self):
        """Bytes our epilogue moves beyond a bare GEMM's (for the torch_mm lower bound plus them)."""
        return 0


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
        return self.act(F.linear(self.x.double(), self.w.double(), self.b.double()))

    def gemm_reference(self):
        return self.x.double() @ self.w.double().t()

    def run(self, provider):
        x, w, b, gelu = self.x, self.w, self.b, self.gelu

        def eager():
            return self.act(F.linear(x, w, b))

        return {
            "tpkernels": lambda: tpkernels.linear_gelu(x, w, b, approximate=gelu),
            **_native(lambda backend: (lambda: tpkernels.linear_gelu(x, w, b, approximate=gelu, backend=backend)),
                      x, gelu),
            **_kernel_choices(lambda: tpkernels.linear_gelu(x, w, b, approximate=gelu, backend="triton"), x,
                              self.M),
            "eager": eager,
            "wrong": lambda: eager() * 1.1,
            "torch_mm": lambda: x @ w.t(),
            "compile": _compiled(eager),
            "cublaslt": ((lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
                         if x.is_cuda and gelu == "tanh" else None),
        }.get(provider)


class RowForward(ColumnForward):
    def __init__(self, *args):
        super().__init__(*args)
        self.r = _randn(self.M, self.N, dtype=torch.float32, device=self.device)

    def bytes(self):
        return super().bytes() + self.extra_epilogue_bytes()

    def extra_epilogue_bytes(self):
        return self.M * self.N * (4 + 4 - self.x.element_size())  # fp32 out instead of 16-bit, fp32 residual read

    def reference(self):
        return F.linear(self.x.double(), self.w.double(), self.b.double()) + self.r.double()

    def run(self, provider):
        x, w, b, r = self.x, self.w, self.b, self.r

        def eager():  # the same work as ours: the GEMM in fp32, then bias and the fp32 residual
            return _linear_fp32(x, w) + b.float() + r

        return {
            "tpkernels": lambda: tpkernels.linear_partial(x, w, b, residual=r, out_dtype=torch.float32),
            **_native(lambda backend: (lambda: tpkernels.linear_partial(x, w, b, residual=r, out_dtype=torch.float32,
                                                                        backend=backend)), x, "none"),
            **_kernel_choices(lambda: tpkernels.linear_partial(x, w, b, residual=r, out_dtype=torch.float32,
                                                               backend="triton"), x, self.M),
            "eager": eager,
            "wrong": lambda: eager() + 0.5,
            "no_residual": lambda: _linear_fp32(x, w) + b.float(),
            "torch_mm": lambda: x @ w.t(),
            "compile": _compiled(eager),
        }.get(provider)


class ColumnBackward(ColumnForward):
    """dX, dW and db of h = gelu(x @ w.T + b), given dY [M, N] and the stored z [M, N]. Eager is autograd's
    own backward of the unfused forward, whose graph is built once, outside the timing."""

    def __init__(self, *args):
        super().__init__(*args)
        self.dy = _randn(self.M, self.N, dtype=self.dtype, device=self.device)
        self.z = F.linear(self.x, self.w, self.b)
        self.leaves = tuple(t.detach().clone().requires_grad_() for t in (self.x, self.w, self.b))
        self.h = self.act(F.linear(*self.leaves))

    def flops(self):
        return 4 * self.M * self.N * self.K

    def bytes(self):
        e = self.x.element_size()
        return (2 * self.M * self.N + 2 * (self.M * self.K + self.N * self.K) + self.N) * e

    def reference(self):
        x, w, dy, z = (t.double() for t in (self.x, self.w, self.dy, self.z))
        dz = torch.ops.aten.gelu_backward(dy, z, approximate=self.gelu)
        return dz @ w, dz.t() @ x, dz.sum(0)

    def gemm_reference(self):
        x, w, dy = (t.double() for t in (self.x, self.w, self.dy))
        return dy @ w, dy.t() @ x

    def run(self, provider):
        x, w, dy, z = self.x, self.w, self.dy, self.z
        code = ops.GELU_TANH if self.gelu == "tanh" else ops.GELU

        def eager():
            return torch.autograd.grad(self.h, self.leaves, dy, retain_graph=True)

        def fused():
            return torch.ops.tpkernels.fused_linear_backward(dy, x, w, z, code, True, True, True)

        def native(backend):
            if backend == "triton":
                return fused
            return lambda: torch.ops.tpkernels.epilogue_linear_backward(dy, x, w, z, code, True, True, True)

        return {
            "tpkernels": fused,
            **_native(native, x, self.gelu),
            "eager": eager,
            "wrong": lambda: tuple(t * 1.1 for t in eager()),
            "torch_mm": lambda: (dy @ w, dy.t() @ x),
            "compile": None,  # a compiled backward needs its compiled forward: mlp_shard times that pair
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

    def _eager(self, x, w1, b1, w2, b2):
        return F.linear(self.act(F.linear(x, w1, b1)), w2, b2)

    def reference(self):
        params = [p.detach().double().requires_grad_() for p in self.params]
        return self._step(self._eager, params)

    def gemm_reference(self):
        x, w1, w2, dy = (t.detach().double() for t in (self.x, self.w1, self.w2, self.dy))
        h = x @ w1.t()
        dh = dy @ w2
        return h @ w2.t(), dh @ w1, dh.t() @ x, dy.t() @ h

    def run(self, provider):
        params, gelu = self.params, self.gelu
        x, w1, w2, dy = (t.detach() for t in (self.x, self.w1, self.w2, self.dy))

        def gemms():
            h = x @ w1.t()
            dh = dy @ w2
            return h @ w2.t(), dh @ w1, dh.t() @ x, dy.t() @ h

        def fused(backend):
            return lambda: self._step(lambda *p: tpkernels.mlp_shard(*p, approximate=gelu, backend=backend), params)

        compiled = _compiled(self._eager)
        return {
            "tpkernels": fused("auto"),
            **_native(fused, self.x, gelu),
            "eager": lambda: self._step(self._eager, params),
            "wrong": lambda: tuple(t * 1.1 for t in self._step(self._eager, params)),
            "torch_mm": gemms,
            "compile": None if compiled is None else (lambda: self._step(compiled, params)),
        }.get(provider)


class TPMLP(MLPShard):
    """A TensorParallelMLP step over the default process group: K model width, N the whole hidden width
    (each rank holds N / world of it), against the dense eager MLP."""

    rotatable = False  # modules, not tensors: one copy (its weights alone exceed the L2 at real sizes)

    def __init__(self, M, K, N, dtype, device, gelu="tanh"):
        Op.__init__(self, M, K, N, dtype, device, gelu)
        torch.manual_seed(0)  # the same dense weights on every rank
        self.dense = tpkernels.reference.MLP(K, N, approximate=gelu, device=device, dtype=dtype)
        self.tp = {
            options: tpkernels.TensorParallelMLP.from_dense(self.dense.fc1, self.dense.fc2, approximate=gelu,
                                                            sequence_parallel=options[0], overlap=options[1])
            for options in ((False, False), (False, True), (True, False), (True, True))
        }
        self.x = _randn(M, K, dtype=dtype, device=device, requires_grad=True)
        self.dy = _randn(M, K, dtype=dtype, device=device)
        self.world = tpkernels.distributed.get_world_size()
        rank = tpkernels.distributed.get_rank()
        # sequence parallel: this rank's tokens in and out
        self.x_shard = tpkernels.distributed.shard(self.x.detach(), self.world, rank).clone().requires_grad_()
        self.dy_shard = tpkernels.distributed.shard(self.dy, self.world, rank)
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
            return [tpkernels.distributed.shard(t, self.world, self.rank) for t in outputs]
        return outputs

    def reference(self):
        dense64 = tpkernels.reference.MLP(self.K, self.N, approximate=self.gelu, dtype=torch.float64)
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


class FP8Op(Op):
    """`--dtypes fp8`: bf16 master tensors; our fp8 path (tpkernels_fp8), the unfused fp8 path
    (fp8_unfused: torch._scaled_mm in fp32, then bias, GELU, amax and the casts in torch ops, the same
    scales), the bare fp8 GEMM (scaled_mm: torch._scaled_mm of the quantized operands, a floor that skips
    the epilogue and the quantization of x), and the bf16 providers (tpkernels, eager, torch_mm) on the
    master tensors. The fp8 providers are held to 2x fp8_unfused's error against fp64, the others to 2x
    bf16 eager's. The scales are set by one step before anything runs, as in training."""

    bf16 = None  # the bf16 op of the same point

    def __init__(self, M, K, N, dtype, device, gelu="tanh"):
        super().__init__(M, K, N, torch.bfloat16, device, gelu)
        self.label_dtype = dtype
        self.master = self.bf16(M, K, N, torch.bfloat16, device, gelu)
        self.scaling = tpkernels.fp8.FP8Scaling(tpkernels.FP8Recipe(), tpkernels.fp8.MLP_TENSORS, device)
        self.scaling.update(torch.device(device))
        self.forward("auto")()  # the step that records the amax the scales come from
        self.scaling.update(torch.device(device))

    def fresh(self):
        return type(self)(self.M, self.K, self.N, self.label_dtype, self.device, self.gelu)

    def flops(self):
        return self.master.flops()

    def bytes(self):
        return self.master.bytes() // 2  # the GEMM operands in e4m3: about half of bf16's bytes

    def reference(self):
        return self.master.reference()

    def gemm_reference(self):
        return self.master.gemm_reference()

    def quantized(self, name, t):
        return self.scaling.weight(name, t.detach(), "auto")

    def _bare_operands(self):
        return self.quantized("x_bare", self.master.x) + self.quantized("w_bare", self.master.w)

    def scaled_mm(self):
        x_q, x_scale_inv, w_q, w_scale_inv = self._bare_operands()
        return lambda: tpkernels.reference.fp8_matmul(x_q, x_scale_inv, w_q.t(), w_scale_inv, torch.bfloat16)

    def scaled_mm_reference(self):
        x_q, x_scale_inv, w_q, w_scale_inv = (t.double() for t in self._bare_operands())
        return (x_q * x_scale_inv) @ (w_q * w_scale_inv).t()

    def run(self, provider):
        if provider in ("tpkernels_fp8", "fp8_unfused"):
            return self.forward("auto" if provider == "tpkernels_fp8" else "eager")
        if provider == "scaled_mm":
            return self.scaled_mm()
        if provider in ("tpkernels", "eager", "torch_mm"):
            return self.master.run(provider)
        return None


class FP8ColumnForward(FP8Op):
    bf16 = ColumnForward

    def forward(self, backend):
        m, code = self.master, ops.GELU_TANH if self.gelu == "tanh" else ops.GELU
        return lambda: tpkernels.fp8.fp8_linear(m.x, m.w, m.b, self.scaling, activation=code, backend=backend)


class FP8RowForward(FP8Op):
    """The row stage in fp8: p = x @ w.T + b in fp32 partials (no residual: the fp8 path takes none). Its
    fp64 reference and bf16 providers are the column op's without GELU, with fp32 output."""

    class bf16(ColumnForward):
        def reference(self):
            return F.linear(self.x.double(), self.w.double(), self.b.double())

        def run(self, provider):
            x, w, b = self.x, self.w, self.b
            return {"tpkernels": lambda: tpkernels.linear_partial(x, w, b, out_dtype=torch.float32),
                    "eager": lambda: _linear_fp32(x, w) + b.float(),
                    "torch_mm": lambda: x @ w.t()}.get(provider)

    def forward(self, backend):
        m = self.master
        return lambda: tpkernels.fp8.fp8_linear(m.x, m.w, m.b, self.scaling, out_dtype=torch.float32, backend=backend)


class FP8MLPShard(FP8Op):
    bf16 = MLPShard

    def forward(self, backend):
        m, code = self.master, ops.GELU_TANH if self.gelu == "tanh" else ops.GELU
        return lambda: m._step(lambda *p: tpkernels.fp8.fp8_mlp_shard(*p, self.scaling, activation=code,
                                                                      backend=backend), m.params)

    def scaled_mm(self):
        return None  # a forward and backward: the fp8 GEMM floor is the column op's


class GatedForward(ColumnForward):
    """The gated MLP's column stage, h = silu(x @ Wg.T) * (x @ Wu.T), N = F (the hidden features of the
    shard): w is [2N, K] = [gate; up], as Llama's gate_proj and up_proj at one rank. Eager is the fair unfused
    path: one merged GEMM (cuBLAS) writing [g | u], then silu(g) * u; torch_mm is that GEMM alone."""

    def __init__(self, M, K, N, dtype, device, gelu="none"):
        Op.__init__(self, M, K, N, dtype, device, gelu)
        self.x = _randn(M, K, dtype=dtype, device=device)
        self.w = _randn(2 * N, K, dtype=dtype, device=device, scale=K**-0.5)
        self.b = None

    def act(self, t):
        g, u = t.chunk(2, dim=-1)
        return F.silu(g) * u

    def flops(self):
        return 2 * self.M * 2 * self.N * self.K

    def bytes(self):
        return (self.M * self.K + 2 * self.N * self.K + self.M * self.N) * self.x.element_size()

    def reference(self):
        return self.act(self.x.double() @ self.w.double().t())

    def run(self, provider):
        x, w = self.x, self.w

        def eager():
            return self.act(x @ w.t())

        return {
            "tpkernels": lambda: tpkernels.linear_glu(x, w),
            "tpkernels_triton": (lambda: tpkernels.linear_glu(x, w, backend="triton")) if x.is_cuda else None,
            "eager": eager,
            "wrong": lambda: eager() * 1.1,
            "torch_mm": lambda: x @ w.t(),
            "compile": _compiled(eager),
        }.get(provider)


OP_CLASSES = {"column_fwd": ColumnForward, "row_fwd": RowForward, "column_bwd": ColumnBackward,
              "mlp_shard": MLPShard, "tp_mlp": TPMLP, "gated_fwd": GatedForward}
FP8_OP_CLASSES = {"column_fwd": FP8ColumnForward, "row_fwd": FP8RowForward, "mlp_shard": FP8MLPShard}
FP8 = torch.float8_e4m3fn


def make_op(op_name, M, K, N, dtype, device, gelu):
    """The op of a point; None for an op with no fp8 form at dtype fp8 (column_bwd, tp_mlp)."""
    if dtype == FP8:
        cls = FP8_OP_CLASSES.get(op_name)
        return None if cls is None else cls(M, K, N, dtype, device, gelu)
    return OP_CLASSES[op_name](M, K, N, dtype, device, gelu)


def _native(make, x, gelu):
    """The explicit-backend providers that can run on x's device and GELU form: {name: callable}."""
    providers = {"tpkernels_triton": make("triton")} if x.is_cuda else {}
    backend = "cublaslt" if x.is_cuda else "cpu"
    if extension.has(x.device.type) and not (backend == "cublaslt" and gelu == "none"):  # cuBLASLt: tanh only
        providers[f"tpkernels_{backend}"] = make(backend)
    if backend == "cpu" and extension.has("cpu"):
        providers["tpkernels_cpu_packed"] = _with_packed_weights(make("cpu"))
        if not ops.INTERPRETED:  # auto is Triton there: the tpkernels row already times it
            providers["tpkernels_packed"] = _with_packed_weights(make("auto"))
    return providers


def _with_packed_weights(fn):
    """fn with the CPU backend's packed-weight cache in use for the call: the run turns the cache on and
    pauses it (`main`), so every other provider runs the plain weight. The two toggles are timed with
    the call (a few microseconds, against it)."""
    def call():
        extension.pause_weight_cache(False)
        try:
            return fn()
        finally:
            extension.pause_weight_cache(True)
    return call


# The kernel providers run at decode sizes, where the kernel choice is open; above, the TMA / pointer
# choice rests on the kernel-choice run of 2026-11-25 (launch.TMA_MIN_M), and the slot is short.
KERNEL_CHOICE_MAX_M = 256


def _kernel_choices(fn, x, M):
    """`fn` (a call on the Triton backend) on each kernel by name, as KERNEL_PROVIDERS: {name: callable}.
    GPU only, M <= KERNEL_CHOICE_MAX_M: under the interpreter the kernels are the tests' business. The
    kernel is chosen as the call is made (or captured into a graph), so the setting wraps the call."""
    if not x.is_cuda or M > KERNEL_CHOICE_MAX_M:
        return {}

    def on(kernel):
        def run():
            with launch.use_matmul_kernel(kernel):
                return fn()
        return run

    return {name: on(kernel) for name, kernel in KERNEL_PROVIDERS.items()}


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


def paired_ratios(rows):
    """Give every timed row of one point `ratio_vs_<other>` (the median of the per-round ratios of its
    time to the other provider's) and `ratio_vs_<other>_band` ([min, max] of them)."""
    timed = [r for r in rows if r["ms_rounds"]]
    for r in timed:
        for other in timed:
            if other is r or len(other["ms_rounds"]) != len(r["ms_rounds"]):
                continue
            ratios = [a / b for a, b in zip(r["ms_rounds"], other["ms_rounds"])]
            r[f"ratio_vs_{other['provider']}"] = statistics.median(ratios)
            r[f"ratio_vs_{other['provider']}_band"] = [min(ratios), max(ratios)]


def verdict(band, limit, at_most=True):
    """"met" or "missed" when the whole band [lo, hi] is on one side of `limit`, else "within noise".
    at_most: the target is ratio <= limit (else ratio >= limit)."""
    lo, hi = band
    if at_most:
        return "met" if hi <= limit else "missed" if lo > limit else "within noise"
    return "met" if lo >= limit else "missed" if hi < limit else "within noise"


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


# ---------------------------------------------------------------------------------------------------
# Suites, records, output


def suite(ops_wanted, shapes, smoke, dtypes, gelus, plan=None):
    """The (op, M, K, N, dtype, gelu) points to run."""
    if plan == "headline":
        return [p for p in HEADLINE if p[0] in ops_wanted]
    if plan == "cpu-results":
        return [p for p in CPU_RESULTS if p[0] in ops_wanted]
    if shapes or smoke:
        base = [(op, *shape) for op in ops_wanted for shape in (shapes or SMOKE_SHAPES)]
    else:
        base = []
        for op in ops_wanted:
            kn = ROW_KN if op == "row_fwd" else COLUMN_KN
            if op == "mlp_shard":  # (K model width, N hidden shard) of the column shapes
                kn = [(k, n) for k, n in COLUMN_KN if n < k] or COLUMN_KN
            if op == "tp_mlp":
                kn = [(4096, 16384)]
            base += [(op, M, K, N) for K, N in kn for M in M_VALUES]
    # row_fwd has no GELU, gated_fwd runs SiLU: one form of each
    return [(*p, dtype, gelu) for p in base for dtype in dtypes
            for gelu in (gelus if p[0] not in ("row_fwd", "gated_fwd") else gelus[:1])]


# Providers that apply per op on a GPU, and the distinct autotuned launches (keys) of one of our calls.
_APPLIES = {"column_fwd": {"tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm", "compile",
                           "cublaslt", *KERNEL_PROVIDERS},
            "row_fwd": {"tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm", "compile",
                        *KERNEL_PROVIDERS},
            "column_bwd": {"tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm"},
            "mlp_shard": {"tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm", "compile"},
            "tp_mlp": {"tpkernels", "tpkernels_overlap", "tpkernels_sp", "tpkernels_sp_overlap", "eager"},
            # the kernel providers time no gated point (the slot is short): the gated row records its kernel
            "gated_fwd": {"tpkernels", "tpkernels_triton", "eager", "torch_mm", "compile"}}
_APPLIES_FP8 = {"column_fwd": {"tpkernels", "eager", "torch_mm", *FP8_PROVIDERS},
                "row_fwd": {"tpkernels", "eager", "torch_mm", *FP8_PROVIDERS},
                "mlp_shard": {"tpkernels", "eager", "torch_mm", "tpkernels_fp8", "fp8_unfused"}}
_AUTOTUNED_LAUNCHES = {"column_fwd": 1, "row_fwd": 1, "column_bwd": 2, "mlp_shard": 6, "tp_mlp": 6, "gated_fwd": 1}


def predicted_seconds(points, providers, rounds, host_calls):
    """(seconds on a GPU with a warm triton cache, kernel compiles a cold cache adds). Assumed costs: 20 s
    to start (imports, ceilings); per point, 2 s of autotuning benchmarks per autotuned launch of the
    first of our providers, and as much again for each kernel provider (each kernel tunes its own); 0.3 s
    per provider for its check and 0.3 s for its graph capture; per round 3 replays of about 1 ms plus
    telemetry; host calls at 0.2 ms. A cold cache compiles every config the autotuner tries (15 per
    launch and specialization, and per kernel provider), about 1.5 s each."""
    total, compiles, seen, tuned = 20.0, 0, set(), set()
    for op, M, K, N, dtype, gelu in points:
        applies = _APPLIES_FP8.get(op, set()) if dtype == FP8 else _APPLIES[op]
        applying = [p for p in providers if p in applies and not (p == "cublaslt" and gelu == "none")
                    and not (p == "tpkernels_cublaslt" and gelu == "none" and op != "row_fwd")
                    and not (p in KERNEL_PROVIDERS and M > KERNEL_CHOICE_MAX_M)]
        # The paths our providers tune: at an fp8 point the bf16 one (tuned already if the plan has its
        # bf16 twin: the autotuner keeps its picks) and the fp8 one.
        paths = [(dtype, p) for p in applying if p == "tpkernels_fp8" or p in KERNEL_PROVIDERS]
        if any(p.startswith("tpkernels") and p not in FP8_PROVIDERS for p in applying):
            paths.append((torch.bfloat16 if dtype == FP8 else dtype, "tpkernels"))
        for path_dtype, provider in paths:
            if (op, M, K, N, path_dtype, gelu, provider) in tuned:
                continue
            tuned.add((op, M, K, N, path_dtype, gelu, provider))
            total += 2.0 * _AUTOTUNED_LAUNCHES[op]
            specialization = (op, path_dtype, gelu, M == 1, M > 128, provider)  # M = 1, TMA compile apart
            if specialization not in seen:
                seen.add(specialization)
                compiles += 15 * _AUTOTUNED_LAUNCHES[op]
        total += len(applying) * (0.6 + rounds * 0.01 + host_calls * 2e-4)
    return total, compiles


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
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                           text=True).stdout.strip()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif ops.INTERPRETED:
        name = "cpu (triton interpreter)"
    else:
        name = f"cpu {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__, git_sha=sha, git_dirty=bool(dirty),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv))


def cpu_model():
    """The CPU's model name (lscpu's "Model name"), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return "unknown model"


_LIBRARY_PATHS = {
    "eager": "aten, unfused (autograd)", "torch_mm": "aten mm alone (lower bound: no epilogue)",
    "compile": "torch.compile of eager", "cublaslt": "torch._addmm_activation (cuBLASLt GELU epilogue)",
    "tpkernels_cublaslt": "tpkernels._C cuBLASLt epilogues",
    "tpkernels_cpu": "tpkernels._C oneDNN GEMM, epilogue as its post-ops",
    "tpkernels_cpu_packed": "tpkernels._C as tpkernels_cpu, on the packed-weight cache's copy",
    "tpkernels_packed": "backend=auto with the packed-weight cache on",
    "wrong": "planted error", "no_residual": "planted: skips the residual",
}


def describe(provider, launches):
    """What a provider ran: for our Triton paths the kernels and tiles of one call (`launches`, recorded
    during its check), else the library path."""
    if provider in _LIBRARY_PATHS:
        return _LIBRARY_PATHS[provider]
    if not launches:
        return "no Triton launch (eager fallback or the extension)"
    counts = {}
    for line in launches:
        counts[line] = counts.get(line, 0) + 1
    return "; ".join(f"{n} x {line}" if n > 1 else line for line, n in counts.items())


def markdown(rows):
    lines = ["| op | M | K | N | dtype | gelu | provider | timer | ms (round min-max) | TFLOP/s | % of floor | host us "
             "| / tpkernels (band) | / torch_mm (band) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ratio(r, other):
        if f"ratio_vs_{other}" not in r:
            return "-"
        lo, hi = r[f"ratio_vs_{other}_band"]
        return f"{r[f'ratio_vs_{other}']:.3g} ({lo:.3g}-{hi:.3g})"

    for r in rows:
        head = f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['dtype']} | {r['gelu']} | {r['provider']} |"
        if r["ms"] is None:
            lines.append(f"{head} | {r['status']} | | | | | | |")
            continue
        name = r["provider"] + (" (lower bound)" if r["provider"] == "torch_mm" else "")
        head = head.replace(f"| {r['provider']} |", f"| {name} |")
        lines.append(f"{head} {r['timer']} | {r['ms']:.4g} ({r['ms_min']:.4g}-{r['ms_max']:.4g}) | {r['tflops']:.3g} | "
                     f"{r['pct_of_floor']:.1f} | {r['host_us']:.1f} | {ratio(r, 'tpkernels')} | {ratio(r, 'torch_mm')} |")
    return "\n".join(lines)


# (name, op, numerator, denominator, which rows, limit, at_most): each is judged per point on the band
# of the paired ratio numerator / denominator.
TARGETS = [
    ("column fwd tpkernels / torch_mm <= 1.0, M <= 64", "column_fwd", "tpkernels", "torch_mm",
     lambda r: r["M"] <= 64, 1.0, True),
    ("column fwd eager / tpkernels >= 1.2, M <= 64", "column_fwd", "eager", "tpkernels", lambda r: r["M"] <= 64, 1.2,
     False),
    ("column fwd tpkernels / torch_mm <= 1.05, M >= 2048", "column_fwd", "tpkernels", "torch_mm",
     lambda r: r["M"] >= 2048, 1.05, True),
    ("row fwd tpkernels / tpkernels_cublaslt <= 1.0, M <= 16", "row_fwd", "tpkernels", "tpkernels_cublaslt",
     lambda r: r["M"] <= 16, 1.0, True),
    # Issue 17, the Triton kernels themselves at decode ("tpkernels" may run cuBLASLt there, by the table).
    ("column fwd Triton / torch_mm <= 1.0, M <= 64", "column_fwd", "tpkernels_triton", "torch_mm",
     lambda r: r["M"] <= 64, 1.0, True),
    ("column fwd eager / Triton >= 1.2, M <= 64", "column_fwd", "eager", "tpkernels_triton", lambda r: r["M"] <= 64,
     1.2, False),
    ("row fwd Triton / tpkernels_cublaslt <= 1.0, M <= 16", "row_fwd", "tpkernels_triton", "tpkernels_cublaslt",
     lambda r: r["M"] <= 16, 1.0, True),
    ("split-K / pointer kernel <= 1.0, M <= 64", None, "tpkernels_splitk", "tpkernels_pointer",
     lambda r: r["M"] <= 64, 1.0, True),
    ("column bwd tpkernels / eager <= 1.0", "column_bwd", "tpkernels", "eager", lambda r: True, 1.0, True),
    # Issue 18, fp8 (rows of --dtypes fp8: "eager" and "torch_mm" there are bf16's).
    ("fp8 mlp_shard / bf16 eager <= 1 / 1.5, M >= 8192", "mlp_shard", "tpkernels_fp8", "eager",
     lambda r: r["M"] >= 8192, 1 / 1.5, True),
    ("fp8 mlp_shard / unfused fp8 <= 1 / 1.1, M >= 8192", "mlp_shard", "tpkernels_fp8", "fp8_unfused",
     lambda r: r["M"] >= 8192, 1 / 1.1, True),
    ("fp8 column fwd / bare scaled_mm <= 1.1, M >= 2048", "column_fwd", "tpkernels_fp8", "scaled_mm",
     lambda r: r["M"] >= 2048, 1.1, True),
    ("fp8 decode / bf16 torch_mm <= 1 / 1.6, M <= 16", None, "tpkernels_fp8", "torch_mm", lambda r: r["M"] <= 16,
     1 / 1.6, True),
    ("mlp_shard tpkernels / eager <= 1.0", "mlp_shard", "tpkernels", "eager", lambda r: True, 1.0, True),
]
CPU_TARGETS = [
    ("eager / auto >= 1.0", None, "eager", "tpkernels", lambda r: True, 1.0, False),
    ("eager / auto >= 1.0, packed-weight cache on", None, "eager", "tpkernels_packed", lambda r: True, 1.0, False),
    ("eager / extension >= 1.1, M >= 64, fp32", "column_fwd", "eager", "tpkernels_cpu",
     lambda r: r["M"] >= 64 and r["dtype"] == "float32", 1.1, False),
]


def targets(rows):
    """The targets, judged per point on the paired ratio's band: met, missed, or within noise."""
    if all(r["cpu"] for r in rows) and all("interpreter" in r["device"] for r in rows):
        return "CPU smoke run (the interpreter): the targets are for GPU rows and CPU results, and none are here."
    checks = CPU_TARGETS if all(r["cpu"] for r in rows) else TARGETS
    lines = ["| target | point | ratio (band) | verdict |", "| --- | --- | --- | --- |"]
    for name, op, num, den, keep, limit, at_most in checks:
        for r in rows:
            fp8_row = r["dtype"] == str(FP8).replace("torch.", "")
            if fp8_row != (num in FP8_PROVIDERS):
                continue  # an fp8 point's bf16 providers are its baselines, judged at their own bf16 points
            if (op is None or r["op"] == op) and r["provider"] == num and keep(r) and f"ratio_vs_{den}" in r:
                band = r[f"ratio_vs_{den}_band"]
                lines.append(f"| {name} | {r['op']} M={r['M']} K={r['K']} N={r['N']} {r['dtype']} {r['gelu']} | "
                             f"{r[f'ratio_vs_{den}']:.3f} ({band[0]:.3f}-{band[1]:.3f}) | {verdict(band, limit, at_most)} |")
    lines += _decode_targets(rows)
    return "\n".join(lines) if len(lines) > 2 else "No row has the providers the targets compare."


# Issue 17's two targets that are not paired time ratios.
STREAMING_TARGET = 0.85  # the Triton column forward at N = 8192, M <= 64: this share of the run's copy bandwidth
HOST_TARGET = 1.5  # the Triton path's host time per call against torch.mm's, same point and run


def _decode_targets(rows):
    """Weight streaming (bytes over time against the run's copy bandwidth; the band from the fastest and
    slowest round) and host time (medians only: no band) at the decode points, for the Triton backend."""
    lines = []
    if all(r["cpu"] for r in rows):
        return lines
    mm_host = {(r["op"], r["M"], r["K"], r["N"], r["dtype"], r["gelu"]): r["host_us"] for r in rows
               if r["provider"] == "torch_mm" and r["host_us"]}
    for r in rows:
        if r["provider"] != "tpkernels_triton" or not r["ms"] or r["M"] > 64:
            continue
        point = f"{r['op']} M={r['M']} K={r['K']} N={r['N']} {r['dtype']} {r['gelu']}"
        if r["op"] == "column_fwd" and r["N"] == 8192:
            share = [r["gbps"] * r["ms"] / ms / r["bandwidth_gbps"] for ms in (r["ms_max"], r["ms_min"])]
            lines.append(f"| weight streaming >= {STREAMING_TARGET:.0%} of copy bandwidth | {point} | "
                         f"{r['gbps'] / r['bandwidth_gbps']:.3f} ({share[0]:.3f}-{share[1]:.3f}) | "
                         f"{verdict(share, STREAMING_TARGET, at_most=False)} |")
        mm = mm_host.get((r["op"], r["M"], r["K"], r["N"], r["dtype"], r["gelu"]))
        if mm:
            ratio = r["host_us"] / mm
            lines.append(f"| host time / torch_mm's <= {HOST_TARGET} (medians, no band) | {point} | {ratio:.3f} | "
                         f"{'met' if ratio <= HOST_TARGET else 'missed'} |")
    return lines


def _rules_from_bands(rows, provider, baseline, backend, default, keep):
    """(rules, measured shapes): per dtype and activation (column_fwd: its GELU form; row_fwd: none),
    `backend` from each measured M where `provider`'s paired ratio to `baseline` has its whole band below
    1 at every measured shape of that M, up to the next measured M; then `default` for everything else."""
    wins, shapes = {}, set()
    for r in rows:
        activation = {"column_fwd": {"tanh": ops.GELU_TANH, "none": ops.GELU}.get(r["gelu"]),
                      "row_fwd": ops.IDENTITY}.get(r["op"])
        band = r.get(f"ratio_vs_{baseline}_band")
        if r["provider"] != provider or activation is None or band is None or not keep(r):
            continue
        shapes.add((r["op"], r["M"], r["K"], r["N"], r["dtype"]))
        wins.setdefault((r["dtype"], activation), {}).setdefault(r["M"], []).append(band[1] < 1.0)
    rules = []
    for (dtype, activation), by_m in sorted(wins.items()):
        ms = sorted(by_m)
        for i, M in enumerate(ms):
            if all(by_m[M]):
                rule = {"dtypes": [dtype], "activations": [activation], "min_m": M, "backend": backend}
                if i + 1 < len(ms):
                    rule["max_m"] = ms[i + 1] - 1
                rules.append(rule)
    rules.append({"backend": default})
    return rules, ", ".join(f"{op} M={M} K={K} N={N} {dt}" for op, M, K, N, dt in sorted(shapes))


def _table(rules, measured, env, scope, rule):
    return {"source": f"measured: {env['device']}, {env['date']}, git {env['git_sha']}"
                      f"{' (dirty)' if env['git_dirty'] else ''}, `{env['command']}`",
            "shapes": f"measured at {measured}; the M ranges are applied to every K and N{scope} (extrapolated)",
            "rule": rule, "rules": rules}


def backend_table(rows, env):
    """The `tpkernels/backend_table.json` these GPU rows argue for: cuBLASLt only where its paired ratio
    to Triton lies wholly below 1 at every measured shape of an M; a tie or a loss keeps Triton. The
    file says which shapes were measured, and that the others are extrapolated."""
    rules, measured = _rules_from_bands(rows, "tpkernels_cublaslt", "tpkernels_triton", "cublaslt", "triton",
                                        keep=lambda r: not r["cpu"])
    return _table(rules, measured, env, "", "cuBLASLt where its paired ratio band to Triton lies wholly below 1 at "
                                            "every measured shape of that M; otherwise Triton")


def cpu_backend_table(rows, env):
    """The `tpkernels/backend_table_cpu.json` these CPU rows argue for: the extension ("cpu") only where
    its paired ratio to eager lies wholly below 1 at every measured shape of an M, in rules for the
    packed-weight cache off (tpkernels_cpu's rows) and on (tpkernels_cpu_packed's); eager elsewhere."""
    rules, measured = [], ""
    # Below the smallest measured weight the extension's host cost (~27 us a call against eager's ~13)
    # can outweigh its GEMM: its rules stop there.
    smallest = min((r["K"] * r["N"] for r in rows if r["provider"] == "tpkernels_cpu"), default=0)
    for provider, packed in (("tpkernels_cpu", False), ("tpkernels_cpu_packed", True)):
        wins, shapes = _rules_from_bands(rows, provider, "eager", "cpu", None, keep=lambda r: True)
        measured = measured or shapes
        rules += [{**rule, "packed": packed, "min_weight_elements": smallest}
                  for rule in wins if rule["backend"] == "cpu"]
    return _table(rules + [{"backend": "eager"}], measured, env,
                  f" with at least {smallest} weight elements (K x N), and every CPU",
                  "the extension where its paired ratio band to eager lies wholly below 1 at every measured shape "
                  "of that M, with the packed-weight cache off (\"packed\": false: tpkernels_cpu's rows) or on "
                  "(true: tpkernels_cpu_packed's), for weights of at least the smallest measured K x N; otherwise "
                  "eager")


def kernel_table(rows, env, sms=None, capability=None):
    """The `tpkernels/kernel_table.json` these GPU rows argue for: at each measured forward point, the
    kernel with the lowest median time (as its row's recorded launches name it) when its paired ratio
    band to each other kernel's row lies wholly below 1 and `launch.rule_kernel` would pick another."""
    by_point, entries = {}, []
    for r in rows:
        if r["provider"] in KERNEL_PROVIDERS and r["ms"] and not r["cpu"] and r["op"] in ("column_fwd", "row_fwd"):
            by_point.setdefault((r["op"], r["M"], r["K"], r["N"], r["dtype"], r["gelu"]), []).append(r)
    if sms is None:  # the run's device
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        capability = torch.cuda.get_device_capability(torch.cuda.current_device())
    for (op, M, K, N, dtype, gelu), group in sorted(by_point.items()):
        ran = {(r["config"] or "").split()[0]: r for r in group}  # a "tma" row may have run the pointer kernel
        best = min(group, key=lambda r: r["ms"])
        kernel = (best["config"] or "").split()[0]
        wins = all(best.get(f"ratio_vs_{r['provider']}_band", [2, 2])[1] < 1 for r in group if r is not best)
        if kernel in KERNEL_PROVIDERS.values() and wins and kernel != launch.rule_kernel(M, N, K, sms, capability,
                                                                                         "tma" in ran):
            entry = {"layout": 3, "dtype": dtype, "m_bucket": autotune.bucket(M), "n": N, "k": K, "kernel": kernel}
            if entry not in entries:
                entries.append(entry)
    measured = ", ".join(f"{op} M={M} K={K} N={N} {dt} {g}" for op, M, K, N, dt, g in sorted(by_point))
    return {"source": f"measured: {env['device']}, {env['date']}, git {env['git_sha']}"
                      f"{' (dirty)' if env['git_dirty'] else ''}, `{env['command']}`; at {measured}",
            "rule": launch.KERNEL_TABLE["rule"], "entries": entries}


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
                lines.setdefault((r["provider"], r["K"], r["N"], r["dtype"], r["gelu"]), []).append((r["M"], r["tflops"]))
        for (provider, K, N, dtype, gelu), points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{provider} K={K} N={N} {dtype} {gelu}")
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


def precompile(points, providers, device):
    """Compile, in parallel, every kernel and config our providers' calls at these points could launch
    (`launch.precompiling` under triton's AsyncCompileMode, a thread per core): on a cold cache the
    compiles are most of a run, and one at a time they would not fit a short GPU slot. Nothing runs; a
    call that fails here fails again, reported, at its point. Returns (calls, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    start, calls = time.time(), 0
    with ThreadPoolExecutor(os.cpu_count() or 4) as executor:
        with AsyncCompileMode(executor, ignore_errors=True), launch.precompiling():
            for op_name, M, K, N, dtype, gelu in points:
                op = make_op(op_name, M, K, N, dtype, device, gelu)
                for provider in (providers if op is not None else ()):
                    fn = op.run(provider) if provider.startswith("tpkernels") else None
                    if fn is None:
                        continue
                    try:
                        fn()
                        calls += 1
                    except Exception:  # noqa: BLE001 (reported when the point runs)
                        pass
                del op
    return calls, time.time() - start


def run_point(point, providers, device, env, ceilings, rounds, host_calls, seed, l2_bytes, cpu_calls=2):
    """Every provider's row at one point: checked, then timed in `rounds` shuffled rounds."""
    op_name, M, K, N, dtype, gelu = point
    op = make_op(op_name, M, K, N, dtype, device, gelu)
    if op is None:
        return []
    peak, peak_source = peak_flops(env["device"], dtype, ceilings[0])
    bandwidth = ceilings[1]
    floor_s = max(op.flops() / peak, op.bytes() / bandwidth)
    copies = None
    rows, timers = {}, {}
    for provider in providers:
        row = dict(op=op_name, provider=provider, M=M, K=K, N=N, dtype=str(dtype).replace("torch.", ""), gelu=gelu,
                   world_size=tpkernels.distributed.get_world_size(), cpu=device.type == "cpu", status=None,
                   timer=None, rounds=0, ms_rounds=[], order_rounds=[], ms=None, ms_min=None, ms_max=None,
                   tflops=None, gbps=None, pct_of_floor=None, host_us=None, config=None, floor_ms=floor_s * 1e3,
                   peak_tflops=peak / 1e12, peak_source=peak_source, bandwidth_gbps=bandwidth / 1e9,
                   sm_clock_mhz=None, power_w=None, **env)
        rows[provider] = row
        fn = op.run(provider)
        if fn is None:
            row["status"] = "n/a"
            continue
        try:  # the check also autotunes and compiles, before any timing; its one call is what a row ran
            with launch.record_launches() as launches:
                problem = check(op, provider, fn)
        except Exception as error:  # a provider that cannot run this point is reported, not fatal
            problem = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        if problem:
            row["status"] = problem if problem.startswith("failed") else f"wrong: {problem}"
            continue
        row["config"] = describe(provider, launches)
        if copies is None:
            copies = rotation(op, device, l2_bytes)
        # torch.compile guards on the tensors its closure captures: one compiled copy, not a recompile per
        # copy (past dynamo's recompile limit it would fall back to eager unseen). Its row says so.
        mine = copies[:1] if provider == "compile" else copies
        timers[provider] = make_timer([c.run(provider) for c in mine], device, floor_s * 1e3, cpu_calls)
        row.update(status="ok", timer=timers[provider].name, copies=len(mine))
    order_rng = random.Random(seed)
    samples = {p: [] for p in timers}
    for _ in range(rounds):
        order = list(timers)
        order_rng.shuffle(order)
        for position, provider in enumerate(order):
            rows[provider]["ms_rounds"].append(timers[provider].measure())
            rows[provider]["order_rounds"].append(position)
            samples[provider].append(telemetry(slow_ok=False))
    for provider in timers:
        if not any(c is not None for c, _ in samples[provider]):  # no NVML: one nvidia-smi sample, after its rounds
            samples[provider].append(telemetry())
        fn = op.run(provider)
        host = [t for _ in range(rounds) for t in host_times_us(fn, max(1, host_calls // rounds))]
        ms_rounds = rows[provider]["ms_rounds"]
        ms = statistics.median(ms_rounds)
        clocks = [c for c, _ in samples[provider] if c is not None]
        powers = [w for _, w in samples[provider] if w is not None]
        rows[provider].update(rounds=len(ms_rounds), ms=ms, ms_min=min(ms_rounds), ms_max=max(ms_rounds),
                              tflops=op.flops() / (ms * 1e-3) / 1e12, gbps=op.bytes() / (ms * 1e-3) / 1e9,
                              pct_of_floor=100 * floor_s / (ms * 1e-3), host_us=statistics.median(host),
                              sm_clock_mhz=statistics.median(clocks) if clocks else None,
                              power_w=statistics.median(powers) if powers else None)
        if provider == "torch_mm" and op.extra_epilogue_bytes():
            # the bare GEMM plus the bytes our epilogue adds, at this run's copy bandwidth
            rows[provider]["ms_with_epilogue_bytes"] = ms + op.extra_epilogue_bytes() / bandwidth * 1e3
    paired_ratios(list(rows.values()))
    return list(rows.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS + TEST_PROVIDERS,
                        help="default: every provider (the headline plan: its own list)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="default: bfloat16 on a GPU, float32 and float16 on the CPU")
    parser.add_argument("--gelu", nargs="+", choices=GELU_FORMS, default=["tanh"],
                        help="GELU forms: tanh (cuBLASLt's, the default) and/or none (exact, the modules' default)")
    parser.add_argument("--shapes", nargs="+", help="M,K,N triples, or 'smoke'; default: the suite")
    parser.add_argument("--plan", choices=["headline"], help="a fixed set of points (it sets dtypes and GELU per point)")
    parser.add_argument("--no-precompile", action="store_true",
                        help="on a GPU, compile each kernel when its point first runs it, one at a time, instead "
                             "of a point's kernels in parallel before it runs")
    parser.add_argument("--dry-run", action="store_true", help="print the points and the predicted duration, then stop")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter (the CPU default)")
    parser.add_argument("--cpu-results", action="store_true",
                        help="the CPU backends as results on this machine, without the interpreter: decode and "
                             "prefill shapes, fp32 and bf16, written with the CPU's name; also a CPU auto table")
    parser.add_argument("--rounds", type=int, help="rounds per point (default: 5 on a GPU, 2 on the CPU)")
    parser.add_argument("--host-calls", type=int, help="calls timed for host_us (default: 200 on a GPU, 2 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="the shuffles' seed")
    parser.add_argument("--out", help="folder for results.jsonl, table.md, plot.png (default: a new temp folder)")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="start no new point after this many seconds")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available() and not args.cpu_results
    if args.cpu_results:
        if ops.INTERPRETED:
            parser.error("--cpu-results times the CPU backends in their normal state: unset TRITON_INTERPRET")
        if args.plan:
            parser.error("--cpu-results is a plan of its own; drop --plan")
        args.plan = "cpu-results"
    default_providers = {"headline": HEADLINE_PROVIDERS, "cpu-results": CPU_RESULTS_PROVIDERS}.get(args.plan, PROVIDERS)
    providers = args.providers or list(default_providers)
    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else (
        [torch.bfloat16] if on_gpu else [torch.float32, torch.float16])
    rounds = args.rounds or (5 if on_gpu or args.cpu_results else 2)
    host_calls = args.host_calls or (200 if on_gpu else 10 if args.cpu_results else 2)
    if rounds < 1 or host_calls < 1:
        parser.error(f"--rounds ({rounds}) and --host-calls ({host_calls}) must be at least 1")
    smoke = args.smoke or (not on_gpu and args.plan is None)
    points = suite(args.ops, parse_shapes(args.shapes), smoke, dtypes, args.gelu, args.plan)
    points = [(op, M, K, N, DTYPES[dt] if isinstance(dt, str) else dt, gelu) for op, M, K, N, dt, gelu in points]
    predicted, compiles = predicted_seconds(points, providers, rounds, host_calls)
    print(f"{len(points)} points x {len(providers)} providers, {rounds} rounds each")
    if args.dry_run:
        for op, M, K, N, dtype, gelu in points:
            print(f"  {op} M={M} K={K} N={N} {str(dtype)[6:]} gelu={gelu}")
    if not args.cpu_results:
        print(f"predicted: {predicted:.0f} s on a GPU with a warm triton cache; a cold one adds about {compiles} "
              f"kernel compiles (~{1.5 * compiles:.0f} s one at a time; the run compiles each point's in parallel "
              f"before it, a gain not yet measured on the GPU machines)", flush=True)
    if args.dry_run:
        return 0

    _init_distributed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.manual_seed(0)
    out = args.out or tempfile.mkdtemp(prefix="tpkernels-bench-")
    if device.type == "cpu" and not args.cpu_results and os.path.realpath(out).startswith(os.path.realpath(RESULTS)):
        parser.error(f"--out {out}: smoke rows are never written under {RESULTS}; results there are GPU runs and "
                     f"--cpu-results")
    os.makedirs(out, exist_ok=True)
    env = environment(device)
    ceilings = measure_ceilings(device)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if on_gpu else 0
    if rank == 0:
        print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}"
              f"{' (dirty)' if env['git_dirty'] else ''} | torch.mm {ceilings[0] / 1e12:.3g} TFLOP/s, copy "
              f"{ceilings[1] / 1e9:.3g} GB/s | {len(points)} points -> {out}", flush=True)
    cache_before = None
    if device.type == "cpu" and "tpkernels_cpu_packed" in providers and extension.has("cpu"):
        # On for tpkernels_cpu_packed's calls, paused for every other provider's (`_with_packed_weights`).
        cache_before = extension.cpu_weight_cache()
        extension.cpu_weight_cache(enabled=True)
        extension.pause_weight_cache(True)
    rows, start = [], time.time()
    progress = _progress(total=len(points), disable=rank != 0)
    for index, point in enumerate(points):
        if time.time() - start > args.max_seconds:
            if rank == 0:
                print(f"--max-seconds {args.max_seconds:g} reached: {index} of {len(points)} points done", flush=True)
            break
        op, M, K, N, dtype, gelu = point
        progress.set_description(f"{op} M={M} K={K} N={N} {str(dtype)[6:]} {gelu}")
        if on_gpu and not args.no_precompile:  # point by point, so that --max-seconds still bounds the run
            precompile([point], providers, device)
        rows += run_point(point, providers, device, env, ceilings, rounds, host_calls, args.seed + index, l2_bytes,
                          cpu_calls=None if args.cpu_results else 2)
        progress.update()
    progress.close()
    if cache_before is not None:
        extension.cpu_weight_cache(enabled=cache_before["enabled"])
    if rank != 0:
        return 0
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = markdown(rows)
    summary = targets(rows)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}"
                f"{' (dirty)' if env['git_dirty'] else ''} | {env['date']}\n\n`{env['command']}`\n\n"
                f"torch.mm {ceilings[0] / 1e12:.4g} TFLOP/s, copy {ceilings[1] / 1e9:.4g} GB/s; {rounds} rounds a point; "
                f"torch_mm is a lower bound (no epilogue)\n\n{table}\n\n## Targets\n\n{summary}\n")
    plotted = plot(rows, os.path.join(out, "plot.png"))
    if not all(r["cpu"] for r in rows) and any(r["provider"] == "tpkernels_cublaslt" and r["ms"] for r in rows):
        with open(os.path.join(out, "backend_table.json"), "w") as f:
            json.dump(backend_table(rows, env), f, indent=2)
        print(f"backend table from these rows: {out}/backend_table.json (commit it as tpkernels/backend_table.json)")
    if any(r["provider"] in KERNEL_PROVIDERS and r["ms"] for r in rows):
        with open(os.path.join(out, "kernel_table.json"), "w") as f:
            json.dump(kernel_table(rows, env), f, indent=2)
        print(f"kernel table from these rows: {out}/kernel_table.json (commit it as tpkernels/kernel_table.json)")
    if args.cpu_results:
        with open(os.path.join(out, "backend_table_cpu.json"), "w") as f:
            json.dump(cpu_backend_table(rows, env), f, indent=2)
        print(f"CPU auto table from these rows: {out}/backend_table_cpu.json (commit it as tpkernels/backend_table_cpu.json)")
    print(table)
    print(summary)
    wrong = [r for r in rows if r["status"].startswith(("wrong", "failed"))]
    print(f"{len(rows)} rows, {sum(r['status'] == 'ok' for r in rows)} timed, {len(wrong)} wrong or failed -> "
          f"{out}/results.jsonl, table.md{', plot.png' if plotted else ''}; {time.time() - start:.0f} s")
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
