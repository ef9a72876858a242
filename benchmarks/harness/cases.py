"""The timed cases: each op's inputs, fp64 reference, work counts, and every provider's callable."""
import torch
import torch.nn.functional as F

import tpkernels
from tpkernels import extension, launch, ops


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
