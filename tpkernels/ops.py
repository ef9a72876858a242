"""The public fused functions, their input checks, and the backend each call runs on.

Per-rank shapes (M is the product of x's leading dims):

    linear_gelu     x [..., K], weight_shard_n [N_r, K], bias_shard_n [N_r]       -> h_shard_n [..., N_r]
                    h = gelu(x @ W.T + b)                                   (column stage, no collective)
    linear_partial  x_shard_k [..., K_r], weight_shard_k [N, K_r], bias [N] -> partial [..., N]
                    p = x @ W.T (+ b + residual on the owner rank only)     (row stage, then all-reduce)
    mlp_shard       both: x [..., K], w1 [H_r, K], w2 [N, H_r]              -> partial [..., N]
    linear_glu      x [..., K], weight [2F_r, K] = [gate_r; up_r], bias [2F_r]    -> h_shard_n [..., F_r]
                    h = act(x @ Wg.T + bg) * (x @ Wu.T + bu)                (gated column stage)
    glu_mlp_shard   both, gated: x [..., K], gate and up [F_r, K], w2 [N, F_r]  -> partial [..., N]

Every check runs before anything launches. The ops, their fakes and autograd are in `custom_ops`; the
launchers and kernel choice in `launch`.

Backends (`backend=`): "triton" (these kernels: CUDA tensors, or CPU tensors under the interpreter when
TRITON_INTERPRET=1 was set before triton was imported), "cublaslt" and "cpu" (the native extension
`tpkernels._C`, where built), "eager" (`tpkernels.reference`); "auto" picks by `auto_backend`.
"""
import functools
import math

import torch
import torch.nn.functional as F
import triton

from tpkernels import custom_ops, custom_ops_gated, extension, reference, tables
from tpkernels.kernels import GELU, GELU_TANH, IDENTITY, INTERPRETED, SILU, MatmulConfig
from tpkernels.launch import pin_config, runs_triton, sync_autotuning, use_matmul_kernel

__all__ = ["BACKENDS", "GATED_ACTIVATIONS", "MatmulConfig", "auto_backend", "backends", "glu_mlp_shard", "linear_gelu",
           "linear_glu", "linear_partial", "mlp_shard", "pin_config", "sync_autotuning", "use_matmul_kernel"]

_APPROXIMATE = {"none": GELU, "tanh": GELU_TANH}
# The gated forms' activations: Llama, Mistral and Qwen's SiLU (SwiGLU), Gemma's tanh GELU (GeGLU), exact GELU.
GATED_ACTIVATIONS = {"silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Backends

BACKENDS = ("auto", "triton", "cublaslt", "cpu", "eager")
# Read once: torch.compile traces the backend choice. backend_table.json: CUDA, written by the harness
# from a GPU run; backend_table_cpu.json: CPU tensors, from `run.py --cpu-results` on a CPU machine.
_TABLES = {device: tables.load(name) for device, name in tables.BACKEND_TABLES.items()}
_BACKEND_TABLE, _CPU_TABLE = _TABLES["cuda"], _TABLES["cpu"]
_NOTHING, _NO_CPU_EXTENSION, _NO_CUBLASLT = frozenset(), frozenset({"cpu"}), frozenset({"cublaslt"})


def _rule_lookup(table_name, dtype, M, activation, unavailable, packed=False, weight_elements=0):
    """The backend of the table's first rule matching (dtype, M, activation) whose backend is not in
    `unavailable` (a frozenset). A rule with "packed" applies only in that state of the CPU backend's
    packed-weight cache (`extension.cpu_weight_cache`); one with "min_weight_elements" only to weights of
    at least that many elements (K x N: the smallest it was measured at; below, host costs decide)."""
    name = str(dtype).replace("torch.", "")
    for rule in _TABLES[table_name]["rules"]:
        if rule["backend"] not in unavailable and tables.rule_matches(rule, name, M, activation, packed,
                                                                      weight_elements):
            return rule["backend"]
    return None


_cached_rule_lookup = functools.lru_cache(maxsize=4096)(_rule_lookup)  # on every eager call's host path


def _first_rule(*key):
    # torch.compile traces the plain lookup (it would warn about, and skip, the cache wrapper anyway).
    return _rule_lookup(*key) if torch.compiler.is_compiling() else _cached_rule_lookup(*key)


def auto_backend(device_type, dtype, M, N, K, activation):
    """What backend="auto" runs: on CUDA the first matching rule of the GPU table (cuBLASLt only where the
    extension has CUDA kernels), else Triton; on CPU tensors Triton under the interpreter, else the CPU
    table's first matching rule for the packed-weight cache's state (the extension only where it was
    measured faster than eager in that state), else eager. A pure function of the shape, the dtype, the
    build and that setting, so every rank of a group that sets it alike chooses alike."""
    if device_type == "cpu":
        if INTERPRETED:
            return "triton"  # how the CPU tests reach the Triton code
        unavailable = _NOTHING if extension.has("cpu") else _NO_CPU_EXTENSION
        return _first_rule("cpu", dtype, M, activation, unavailable, extension.weight_cache_on(), N * K) or "eager"
    if device_type != "cuda":
        return "eager"
    unavailable = _NOTHING if extension.has("cuda") else _NO_CUBLASLT
    return _first_rule("cuda", dtype, M, activation, unavailable) or "triton"


def _resolve_backend(name, backend, x, N, K, activation):
    """The backend a call runs on, after checking that the one asked for can run it."""
    M = x.shape[0] if x.dim() == 2 else math.prod(x.shape[:-1])
    if backend == "auto":
        return auto_backend(x.device.type, x.dtype, M, N, K, activation)
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "cpu" and not (x.device.type == "cpu" and extension.has("cpu")):
        raise ValueError(f"{name}: backend='cpu' needs CPU tensors (x is on {x.device}) and the native extension "
                         f"({extension.status()}); see tpkernels.backends()")
    if backend == "cublaslt":
        if not (x.is_cuda and extension.has("cuda")):
            raise ValueError(f"{name}: backend='cublaslt' needs CUDA tensors (x is on {x.device}) and the "
                             f"extension's CUDA part ({extension.status()}); see tpkernels.backends()")
        if activation == GELU:
            raise ValueError(f"{name}: backend='cublaslt' has only the tanh GELU; pass approximate='tanh' or "
                             f"another backend (exact GELU runs on triton)")
    if backend == "triton" and not runs_triton(x):
        raise ValueError(f"{name}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                         f"before triton is imported; x is on {x.device}")
    return backend


def backends():
    """What was built and what each op runs by default.

    Returns:
        {"extension": status, "triton": status, "table" and "cpu_table": the auto tables' sources,
        "cpu_weight_cache": the CPU backend's packed weights (`extension.cpu_weight_cache`) or None,
        "auto": {"<device> <dtype> M=<M>": {op: backend}}} for M = 1 and 4096 (K = N = 4096), bf16 on
        CUDA, fp32 and bf16 on the CPU.
    """
    devices = {"cpu": (torch.float32, torch.bfloat16)}
    if torch.cuda.is_available():
        devices["cuda"] = (torch.bfloat16,)
    auto = {}
    for device, dtypes in devices.items():
        for dtype in dtypes:
            for M in (1, 4096):
                auto[f"{device} {str(dtype)[6:]} M={M}"] = {
                    "linear_gelu (exact)": auto_backend(device, dtype, M, 4096, 4096, GELU),
                    "linear_gelu (tanh)": auto_backend(device, dtype, M, 4096, 4096, GELU_TANH),
                    "linear_partial": auto_backend(device, dtype, M, 4096, 4096, IDENTITY),
                }
    return {
        "extension": extension.status(),
        "triton": f"{triton.__version__}" + (" (interpreter: TRITON_INTERPRET=1)" if INTERPRETED else ""),
        "table": _BACKEND_TABLE["source"],
        "cpu_table": _CPU_TABLE["source"],
        "cpu_weight_cache": extension.cpu_weight_cache() if extension.has("cpu") else None,
        "auto": auto,
    }


def _linear(name, x, weight, bias, residual, activation, owner, out_dtype, backend):
    """The one dispatch point of linear_gelu and linear_partial (2-D x): returns act(x @ W.T + b) + r."""
    N, K = weight.shape
    chosen = _resolve_backend(name, backend, x, N, K, activation)
    store = _needs_grad(x, weight, bias, residual)
    if chosen == "eager":
        if residual is None and out_dtype == x.dtype and (owner or bias is None):  # the plain unfused call
            return reference.activation(F.linear(x, weight, bias if owner else None), activation)
        return reference.fused_linear(x, weight, bias, residual, activation, owner, out_dtype, False)[0]
    if not store and chosen in ("triton", "cpu") and direct_call_ok(x, weight, bias, residual):
        if chosen == "cpu":
            return custom_ops.native_linear(x, weight, bias, residual, activation, owner, out_dtype, False)[0]
        return custom_ops.fused_linear_inference(x, weight, bias, residual, activation, owner, out_dtype)
    op = torch.ops.tpkernels.fused_linear if chosen == "triton" else torch.ops.tpkernels.epilogue_linear
    return op(x, weight, bias, residual, activation, owner, out_dtype, store)[0]


# ---------------------------------------------------------------------------------------------------
# Public API


def _check_tensor(name, arg, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")


def _check_linear(name, x, weight, bias):
    # The common case in a few attribute reads (this runs on every call's host path); anything unusual
    # takes the detailed checks, which raise with the numbers.
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        dtype, x_shape, w_shape = x.dtype, x.shape, weight.shape
        if (dtype in _DTYPES and weight.dtype == dtype and len(w_shape) == 2 and x_shape
                and x_shape[-1] == w_shape[1] and weight.device == x.device):
            if bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == dtype
                                and bias.shape == (w_shape[0],) and bias.device == x.device):
                return
    _refuse_linear(name, x, weight, bias)


def _refuse_linear(name, x, weight, bias):
    _check_tensor(name, "x", x)
    _check_tensor(name, "weight", weight)
    if bias is not None:
        _check_tensor(name, "bias", bias)
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: x.dtype is {x.dtype}; supported dtypes are float16, bfloat16 and float32")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: {arg}.dtype is {t.dtype} but x.dtype is {x.dtype}; cast them to one dtype")
    if weight.dim() != 2:
        raise ValueError(
            f"{name}: weight must be 2-D [out_features, in_features] like nn.Linear.weight, "
            f"got shape {tuple(weight.shape)}"
        )
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: x has in_features={x.shape[-1] if x.dim() else 'none (0-d)'} (its last dim, shape "
            f"{tuple(x.shape)}) but weight {tuple(weight.shape)} has in_features={weight.shape[1]}; "
            f"weight is [out_features, in_features] like nn.Linear.weight"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{name}: bias has shape {tuple(bias.shape)} but weight has out_features={weight.shape[0]}; "
            f"expected ({weight.shape[0]},)"
        )
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: x is on {x.device} but {arg} is on {t.device}; move them to one device")


def _rows(t):
    # [..., F] -> [M, F] without copying when the layout allows; F may be 0.
    return t.unsqueeze(0) if t.dim() == 1 else t.flatten(0, -2)


def _needs_grad(*tensors):
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any(genexpr): this runs on every call's host path
            if t is not None and t.requires_grad:
                return True
    return False


def direct_call_ok(*tensors):
    """Whether an inference call may run a custom op's Python implementation directly, skipping the
    dispatcher: not under torch.compile, export, a dispatch or function mode (FakeTensor, FlopCounter)
    or a functorch transform, and only plain tensors. The dispatcher costs about half of a call's host
    time (benchmarks/NOTES.md, "Host overhead"); everything that traces or transforms still sees the op."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    # A functorch-wrapped tensor lives inside a transform: with none active, no tensor needs the check.
    transformed = torch._C._functorch.maybe_current_level() is not None
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor
                              or (transformed and torch._C._functorch.is_functorch_wrapped_tensor(t))):
            return False
    return True


def linear_gelu(x, weight, bias=None, approximate="none", *, backend="auto"):
    """`F.gelu(F.linear(x, weight, bias), approximate=approximate)` in one launch: the column stage.

    Args:
        x: [..., in_features], float16, bfloat16 or float32.
        weight: [out_features, in_features] (a column shard [N_r, K] in tensor parallelism).
        bias: [out_features] or None.
        approximate: "none" for exact (erf) GELU, "tanh" for torch's tanh approximation.
        backend: "auto" (see `tpkernels.backends()`), "triton", "cublaslt" (tanh GELU, CUDA, the
            native extension), "cpu" (the native extension's CPU kernels) or "eager".

    Returns:
        [..., out_features] in x's dtype. Differentiable in x, weight and bias.
    """
    if approximate not in _APPROXIMATE:
        raise ValueError(f"linear_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    _check_linear("linear_gelu", x, weight, bias)
    if x.dim() == 2:
        return _linear("linear_gelu", x, weight, bias, None, _APPROXIMATE[approximate], True, x.dtype, backend)
    out = _linear("linear_gelu", _rows(x), weight, bias, None, _APPROXIMATE[approximate], True, x.dtype, backend)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_partial(x, weight, bias=None, *, residual=None, owner=True, out_dtype=None, out=None, backend="auto"):
    """One rank's partial sum `x @ weight.T`, with bias and residual added once: the row stage.

    The epilogue applies only linear operations, so summing the partials of all ranks (one
    all-reduce) gives `F.linear(x_full, weight_full, bias) + residual`.

    Args:
        x: [..., in_features] (a row shard x_shard_k [..., K_r]), float16, bfloat16 or float32.
        weight: [out_features, in_features] (a row shard [N, K_r]).
        bias: [out_features] or None. Added only where `owner` is True.
        residual: [..., out_features] in x's dtype or `out_dtype`, or None. Added only where `owner`.
        owner: whether this rank adds the once-per-sum terms (bias, residual). Exactly one rank of
            the sum should pass True. The gradients of bias and residual are sum(dY) and dY on every
            rank, owner or not: they are replicated parameters, and their replicas stay identical.
        out_dtype: None (x's dtype) or torch.float32, for fp32 partials and an exact-as-possible
            all-reduce.
        out: optional [..., out_features] buffer to write into (e.g. the all-reduce buffer). It may
            be `residual` itself; it must not overlap x or weight. Like torch's `out=` arguments, it
            does not support autograd. The Triton kernel writes into it; the other backends compute
            the result, then copy it in.
        backend: as in `linear_gelu`.

    Returns:
        [..., out_features] partial sum (`out` when given).
    """
    name = "linear_partial"
    _check_linear(name, x, weight, bias)
    if out is not None:
        _check_tensor(name, "out", out)
        if out_dtype is None:
            out_dtype = out.dtype
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name}: out_dtype is {out_dtype}; use None (x's dtype, {x.dtype}) or torch.float32")
    if residual is None and out is None and x.dim() == 2:  # the common call, on the shortest host path
        return _linear(name, x, weight, bias, None, IDENTITY, bool(owner), out_dtype, backend)
    out_shape = (*x.shape[:-1], weight.shape[0])
    for arg, t, dtypes in (("residual", residual, (x.dtype, out_dtype)), ("out", out, (out_dtype,))):
        if t is None:
            continue
        _check_tensor(name, arg, t)
        if tuple(t.shape) != out_shape:
            raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)} but the output is {out_shape}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: {arg}.dtype is {t.dtype}; expected one of {', '.join(map(str, dtypes))}")
        if t.device != x.device:
            raise ValueError(f"{name}: x is on {x.device} but {arg} is on {t.device}; move them to one device")
    owner = bool(owner)
    if out is None:
        if x.dim() == 2:  # already rows (and so is the residual, of the output's shape)
            return _linear(name, x, weight, bias, residual, IDENTITY, owner, out_dtype, backend)
        result = _linear(name, _rows(x), weight, bias, None if residual is None else _rows(residual), IDENTITY,
                         owner, out_dtype, backend)
        return result.view(out_shape)

    if _needs_grad(x, weight, bias, residual):
        raise ValueError(
            f"{name}: out= does not support autograd, and an input requires grad; drop out= when training"
        )
    for arg, t in (("x", x), ("weight", weight)):
        if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            raise ValueError(f"{name}: out shares memory with {arg}; the kernel would read what it overwrites")
    if residual is not None and out.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr():
        if out.data_ptr() != residual.data_ptr() or out.stride() != residual.stride():
            raise ValueError(f"{name}: out overlaps residual without being the same view; pass out=residual")
    rows = math.prod(out_shape[:-1])
    try:
        out_rows = out.view(rows, weight.shape[0])
    except RuntimeError:
        raise ValueError(
            f"{name}: out (shape {out_shape}, strides {out.stride()}) cannot be viewed as "
            f"[{rows}, {weight.shape[0]}] rows without a copy; pass a contiguous buffer"
        ) from None
    residual_rows = None if residual is None else _rows(residual)
    chosen = _resolve_backend(name, backend, x, weight.shape[0], weight.shape[1], IDENTITY)
    if chosen == "triton":
        torch.ops.tpkernels.fused_linear_out(_rows(x), weight, bias, residual_rows, owner, out_rows)
    else:  # eager or the extension: computed, then copied into the caller's buffer
        out_rows.copy_(_linear(name, _rows(x), weight, bias, residual_rows, IDENTITY, owner, out_dtype, chosen))
    return out


def _check_partial_output(name, x, w2, residual, out_dtype):
    """(out_dtype, out_shape) of an MLP shard's partial sum [..., N], with its residual checked against them."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name}: out_dtype is {out_dtype}; use None (x's dtype, {x.dtype}) or torch.float32")
    out_shape = (*x.shape[:-1], w2.shape[0])
    if residual is not None:
        _check_tensor(name, "residual", residual)
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)} but the output is {out_shape}")
        if residual.dtype not in (x.dtype, out_dtype):
            raise TypeError(f"{name}: residual.dtype is {residual.dtype}; expected {x.dtype} or {out_dtype}")
        if residual.device != x.device:
            raise ValueError(f"{name}: x is on {x.device} but residual is on {residual.device}")
    return out_dtype, out_shape


def mlp_shard(x, w1, b1, w2, b2, *, approximate="none", residual=None, owner=True, out_dtype=None, backend="auto"):
    """One rank's share of `fc2(gelu(fc1(x)))`: the column stage, then the row stage's partial sum.

    Per-rank shapes: x [..., K], w1 = weight_shard_n [H_r, K], b1 [H_r], w2 = weight_shard_k [N, H_r],
    b2 [N] -> partial [..., N]. Summing the partials of all ranks (one all-reduce) gives the MLP.
    Forward is two fused launches (`linear_gelu`, `linear_partial`). Backward fuses across the two
    layers: dZ = (dY @ W2) * gelu'(z) in one GEMM's epilogue, then plain GEMMs for dX, dW1 and dW2.

    Args:
        x, w1, b1, w2, b2: as above, one dtype (float16, bfloat16 or float32); b1 and b2 may be None.
        approximate: "none" (exact GELU) or "tanh".
        residual, owner, out_dtype: as in `linear_partial`: b2 and residual only where `owner`.
        backend: as in `linear_gelu`. Every backend but "eager" runs both stages as one op with the
            backward above (on "cublaslt", dZ and db1 come from one DGELU_BGRAD matmul).

    Returns:
        [..., N] partial sum, differentiable in every tensor argument.
    """
    name = "mlp_shard"
    if approximate not in _APPROXIMATE:
        raise ValueError(f"{name}: approximate must be 'none' or 'tanh', got {approximate!r}")
    _check_linear(name, x, w1, b1)
    _check_tensor(name, "w2", w2)
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"{name}: w2 has shape {tuple(w2.shape)} but w1 {tuple(w1.shape)} makes "
                         f"{w1.shape[0]} hidden features; w2 must be [out_features, {w1.shape[0]}]")
    if not (w2.dtype == x.dtype and w2.device == x.device and (b2 is None or (
            isinstance(b2, torch.Tensor) and b2.dtype == x.dtype and b2.shape == (w2.shape[0],)
            and b2.device == x.device))):  # the common case in a few reads; else the checks with the numbers
        _refuse_linear(name, x.new_empty((0, w1.shape[0])), w2, b2)  # w2 and b2 against the hidden width
    out_dtype, out_shape = _check_partial_output(name, x, w2, residual, out_dtype)
    chosen = _resolve_backend(name, backend, x, w1.shape[0], w1.shape[1], _APPROXIMATE[approximate])
    if chosen == "eager":
        h = reference.linear_gelu(x, w1, b1, approximate)
        return reference.linear_partial(h, w2, b2, residual=residual, owner=owner, out_dtype=out_dtype)
    store = _needs_grad(x, w1, b1, w2, b2, residual)
    rows = x.dim() == 2  # then so is the residual, and the output needs no view
    args = (x if rows else _rows(x), w1, b1, w2, b2, residual if rows or residual is None else _rows(residual),
            _APPROXIMATE[approximate], bool(owner), out_dtype, store, chosen != "triton")
    if not store and direct_call_ok(x, w1, b1, w2, b2, residual):
        out, _, _ = custom_ops.mlp_shard_impl(*args)
    else:
        out, _, _ = torch.ops.tpkernels.mlp_shard(*args)
    return out if rows else out.view(out_shape)



# ---------------------------------------------------------------------------------------------------
# The gated forms


def _gated_activation(name, activation):
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {', '.join(map(repr, GATED_ACTIVATIONS))}, "
                         f"got {activation!r}")
    return GATED_ACTIVATIONS[activation]


def _gated_backend(name, backend, x):
    """The backend of a gated call: "triton" or "eager". The native extension has no gated epilogue, so
    "auto" on CPU tensors (without the interpreter) runs eager, the fastest measured there."""
    if backend == "auto":
        return "triton" if x.is_cuda or (x.device.type == "cpu" and INTERPRETED) else "eager"
    if backend in ("cublaslt", "cpu"):
        raise ValueError(f"{name}: backend={backend!r} has no gated (act(gate) * up) epilogue; use 'triton', "
                         f"'eager' or 'auto'")
    return _resolve_backend(name, backend, x, 1, 1, IDENTITY)


def _check_gated(name, x, gate, up, gate_bias, up_bias):
    """gate and up [F, K] of x's dtype and device, their biases [F] or both None."""
    _check_linear(name, x, gate, gate_bias)
    _check_tensor(name, "up", up)
    if up.dtype != gate.dtype or up.device != gate.device:
        raise TypeError(f"{name}: up is {up.dtype} on {up.device} but gate is {gate.dtype} on {gate.device}")
    if tuple(up.shape) != tuple(gate.shape):
        raise ValueError(f"{name}: up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}; they hold "
                         f"the same hidden features")
    if (gate_bias is None) != (up_bias is None):
        raise ValueError(f"{name}: gate and up both have a bias or both lack one")
    if up_bias is not None:
        _check_linear(name, x, up, up_bias)


def linear_glu(x, weight, bias=None, *, activation="silu", backend="auto"):
    """`act(g) * u` with `[g, u] = F.linear(x, weight, bias).chunk(2, -1)`, in one launch: the gated
    MLP's column stage (SwiGLU with "silu", GeGLU with "gelu_tanh").

    Args:
        x: [..., in_features], float16, bfloat16 or float32.
        weight: [2F, in_features] holding [gate; up]: rows 0 to F-1 are the gate's, rows F to 2F-1 the
            up's (in tensor parallelism, one rank's [gate_r; up_r]: the same features of both).
        bias: [2F] ([gate bias; up bias]) or None.
        activation: "silu", "gelu" (exact) or "gelu_tanh".
        backend: "auto" (Triton on CUDA tensors or under the interpreter, else eager), "triton" or "eager".

    Returns:
        [..., F] in x's dtype. Differentiable in x, weight and bias.
    """
    name = "linear_glu"
    code = _gated_activation(name, activation)
    _check_linear(name, x, weight, bias)
    if weight.shape[0] % 2:
        raise ValueError(f"{name}: weight has {weight.shape[0]} rows, an odd number; it holds [gate; up], 2F rows "
                         f"of {weight.shape[1]} in_features")
    F_ = weight.shape[0] // 2
    gate, up = weight[:F_], weight[F_:]
    gate_bias, up_bias = (None, None) if bias is None else (bias[:F_], bias[F_:])
    return _glu(name, x, gate, up, gate_bias, up_bias, code, backend)


def _glu(name, x, gate, up, gate_bias, up_bias, code, backend):
    chosen = _gated_backend(name, backend, x)
    if chosen == "eager":
        return reference.glu(x, gate, up, gate_bias, up_bias, code)
    rows = x if x.dim() == 2 else _rows(x)
    if not _needs_grad(x, gate, up, gate_bias, up_bias) and direct_call_ok(x, gate, up, gate_bias, up_bias):
        h, _ = custom_ops_gated.fused_glu_impl(rows, gate, up, gate_bias, up_bias, code, False)
    else:
        store = _needs_grad(x, gate, up, gate_bias, up_bias)
        h, _ = torch.ops.tpkernels.fused_glu(rows, gate, up, gate_bias, up_bias, code, store)
    return h if x.dim() == 2 else h.view(*x.shape[:-1], gate.shape[0])


def glu_mlp_shard(x, gate, up, gate_bias, up_bias, w2, b2, *, activation="silu", residual=None, owner=True,
                  out_dtype=None, backend="auto"):
    """One rank's share of `down(act(gate(x)) * up(x))`: the gated column stage, then the row stage's
    partial sum. Summing the partials of all ranks (one all-reduce) gives the gated MLP.

    Per-rank shapes: x [..., K], gate and up [F_r, K] (the same hidden features of both), their biases
    [F_r] or None, w2 [N, F_r], b2 [N] or None -> partial [..., N]. The forward is two launches (the gated
    one, then `linear_partial`'s); the backward puts act and its derivative in the epilogue of the GEMM
    that makes dH: [dG | dU] = [dH * u * act'(g), dH * act(g)], then one GEMM each for dX, [dWg; dWu], dW2.

    Args:
        activation: "silu", "gelu" or "gelu_tanh".
        residual, owner, out_dtype: as in `linear_partial`: b2 and residual only where `owner`.
        backend: as in `linear_glu`.

    Returns:
        [..., N] partial sum, differentiable in every tensor argument.
    """
    name = "glu_mlp_shard"
    code = _gated_activation(name, activation)
    _check_gated(name, x, gate, up, gate_bias, up_bias)
    _check_tensor(name, "w2", w2)
    if w2.dim() != 2 or w2.shape[1] != gate.shape[0]:
        raise ValueError(f"{name}: w2 has shape {tuple(w2.shape)} but gate {tuple(gate.shape)} makes "
                         f"{gate.shape[0]} hidden features; w2 must be [out_features, {gate.shape[0]}]")
    _check_linear(name, x.new_empty((0, gate.shape[0])), w2, b2)
    out_dtype, out_shape = _check_partial_output(name, x, w2, residual, out_dtype)
    chosen = _gated_backend(name, backend, x)
    if chosen == "eager":
        h = reference.glu(x, gate, up, gate_bias, up_bias, code)
        return reference.linear_partial(h, w2, b2, residual=residual, owner=owner, out_dtype=out_dtype)
    store = _needs_grad(x, gate, up, gate_bias, up_bias, w2, b2, residual)
    rows = x.dim() == 2
    args = (x if rows else _rows(x), gate, up, gate_bias, up_bias, w2, b2,
            residual if rows or residual is None else _rows(residual), code, bool(owner), out_dtype, store)
    if not store and direct_call_ok(x, gate, up, gate_bias, up_bias, w2, b2, residual):
        out, _, _ = custom_ops_gated.glu_mlp_shard_impl(*args)
    else:
        out, _, _ = torch.ops.tpkernels.glu_mlp_shard(*args)
    return out if rows else out.view(out_shape)
