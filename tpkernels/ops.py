"""Fused linear layers: launchers, `torch.library` custom ops with fake implementations, autograd.

Per-rank shapes (M is the product of x's leading dims):

    linear_gelu     x [..., K], weight_shard_n [N_r, K], bias_shard_n [N_r]       -> h_shard_n [..., N_r]
                    h = gelu(x @ W.T + b)                                   (column stage, no collective)
    linear_partial  x_shard_k [..., K_r], weight_shard_k [N, K_r], bias [N] -> partial [..., N]
                    p = x @ W.T (+ b + residual on the owner rank only)     (row stage, then all-reduce)

Gradients, with z = x @ W.T + b the pre-activation and act' its derivative (identity: 1):

    dgrad   dX = (dY * act'(z)) @ W            one launch, act' fused into the A-tile load
    wgrad   dW = (dY * act'(z)).T @ X          one launch; db = column sums of dY * act'(z), taken
            db = sum_M (dY * act'(z))          from the same tiles, so db costs no pass of its own

The forward stores z (in x's dtype, as eager autograd does) only when a gradient is needed: re-reading
M x N values in the backward is far cheaper than recomputing the 2 M N K flops of x @ W.T.

Dispatch: CUDA tensors run the Triton kernel. CPU tensors run the same kernel under the Triton
interpreter when TRITON_INTERPRET=1 was set before triton was imported, and the eager reference
(`tpkernels.reference`) otherwise.
"""
import contextlib
import functools
import math
from typing import Optional

import torch
import triton
from torch import Tensor

from tpkernels import reference
from tpkernels.kernels import (
    GELU,
    GELU_TANH,
    GPU_CONFIGS,
    IDENTITY,
    INTERPRETED,
    INTERPRETER_CONFIG,
    MatmulConfig,
    _matmul_kernel,
)

__all__ = ["MatmulConfig", "linear_gelu", "linear_partial", "pin_config"]

_APPROXIMATE = {"none": GELU, "tanh": GELU_TANH}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_LIMIT = 2**31
_pinned_config = None


# ---------------------------------------------------------------------------------------------------
# Launcher


@contextlib.contextmanager
def pin_config(config):
    """Launch every kernel inside the block with one `MatmulConfig` instead of autotuning.

    Args:
        config: a `tpkernels.MatmulConfig`, e.g. one of `tpkernels.kernels.GPU_CONFIGS`.
    """
    global _pinned_config
    if not isinstance(config, MatmulConfig):
        raise TypeError(f"pin_config takes a tpkernels.MatmulConfig, got {type(config).__name__}")
    previous, _pinned_config = _pinned_config, config
    try:
        yield
    finally:
        _pinned_config = previous


def _bucket(n):
    # Autotune keys on powers of two, so a new sequence length reuses the tuning of its bucket.
    return triton.next_power_of_2(max(n, 1))


@functools.cache
def _autotuned_kernel():
    return triton.autotune(
        configs=[config.to_triton() for config in GPU_CONFIGS],
        key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "ACTIVATION", "GRAD_ACTIVATION", "STORE_ROWSUM"],
        # The output may be the residual itself (in-place add); tuning runs must not compound it.
        restore_value=["c_ptr"],
    )(_matmul_kernel)


def _last_offset(t):
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)


def _strides(t):
    return (0, 0) if t is None else t.stride()


def _launch(a, b, c, *, bias=None, residual=None, preact=None, z=None, rowsum=None,
            activation=IDENTITY, grad_activation=IDENTITY):
    """c = act(prologue(a) @ b + bias) + residual, for strided views a [M, K], b [K, N], c [M, N].

    `preact` [M, N] receives a @ b + bias; `z` [M, K] turns the prologue into a * act'(z); `rowsum`
    [M] (fp32) receives the row sums of the prologue's output.
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0:
        return
    operands = [t for t in (a, b, c, residual, preact, z) if t is not None]
    emulate_bf16 = INTERPRETED and b.dtype == torch.bfloat16
    tf32 = a.is_cuda and torch.backends.cuda.matmul.allow_tf32
    args = (
        a, b, c,
        *(c if t is None else t for t in (bias, residual, preact, z, rowsum)),
        M, N, K, _bucket(M), _bucket(N), _bucket(K),
        *a.stride(), *b.stride(), *c.stride(), *_strides(residual), *_strides(preact), *_strides(z),
    )
    meta = dict(
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        STORE_PREACT=preact is not None,
        GRAD_ACTIVATION=grad_activation,
        STORE_ROWSUM=rowsum is not None,
        INPUT_PRECISION="ieee" if b.dtype == torch.float32 and not tf32 else "tf32",
        INT64_OFFSETS=any(_last_offset(t) >= _INT32_LIMIT for t in operands),
        EMULATE_BF16=emulate_bf16,
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * max(1, triton.cdiv(N, meta["BLOCK_N"])),)

    config = _pinned_config or (None if a.is_cuda and not INTERPRETED else INTERPRETER_CONFIG)
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        if config is None:
            _autotuned_kernel()[grid](*args, **meta)
        else:
            _matmul_kernel[grid](
                *args, **meta, **config.kwargs(), num_warps=config.num_warps, num_stages=config.num_stages
            )


def _runs_triton(t):
    return t.is_cuda or (t.device.type == "cpu" and INTERPRETED)


# ---------------------------------------------------------------------------------------------------
# Custom ops (2-D, checked inputs; the public functions below check and reshape)


@torch.library.custom_op("tpkernels::fused_linear", mutates_args=())
def _fused_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    activation: int,
    owner: bool,
    out_dtype: torch.dtype,
    store_preact: bool,
) -> tuple[Tensor, Tensor]:
    """(act(x @ weight.T + bias) + residual, preact); bias and residual only where `owner`."""
    if not _runs_triton(x):
        return reference.fused_linear(x, weight, bias, residual, activation, owner, out_dtype, store_preact)
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=out_dtype, device=x.device)
    preact = torch.empty_like(out, dtype=x.dtype) if store_preact else x.new_empty(0)
    _launch(
        x, weight.t(), out,
        bias=bias.contiguous() if owner and bias is not None else None,
        residual=residual if owner else None,
        preact=preact if store_preact else None,
        activation=activation,
    )
    return out, preact


@_fused_linear.register_fake
def _(x, weight, bias, residual, activation, owner, out_dtype, store_preact):
    out = x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
    return out, (torch.empty_like(out, dtype=x.dtype) if store_preact else x.new_empty(0))


@torch.library.custom_op("tpkernels::fused_linear_out", mutates_args=("out",))
def _fused_linear_out(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], owner: bool, out: Tensor
) -> None:
    """out = x @ weight.T (+ bias + residual where `owner`), written into the caller's buffer."""
    if not _runs_triton(x):
        out.copy_(reference.fused_linear(x, weight, bias, residual, IDENTITY, owner, out.dtype, False)[0])
        return
    _launch(
        x, weight.t(), out,
        bias=bias.contiguous() if owner and bias is not None else None,
        residual=residual if owner else None,
    )


@_fused_linear_out.register_fake
def _(x, weight, bias, residual, owner, out):
    return None


@torch.library.custom_op("tpkernels::fused_linear_backward", mutates_args=())
def _fused_linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    preact: Optional[Tensor],
    activation: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) of `fused_linear`, each empty when not needed."""
    if not _runs_triton(x):
        grads = reference.fused_linear_backward(grad, x, weight, preact, activation, need_dx, need_dw, need_db)
        return tuple(x.new_empty(0) if g is None else g for g in grads)
    # Outputs of a custom op may not alias each other: one empty tensor each.
    dx, dw, db = (x.new_empty(0) for _ in range(3))
    z = None if activation == IDENTITY else preact
    if need_dx:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        _launch(grad, weight, dx, z=z, grad_activation=activation)
    if need_dw:
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
        rowsum = torch.empty(weight.shape[0], dtype=torch.float32, device=x.device) if need_db else None
        _launch(grad.t(), x, dw, z=None if z is None else z.t(), rowsum=rowsum, grad_activation=activation)
        if need_db:
            db = rowsum.to(x.dtype)
    elif need_db:
        # A frozen weight with a trainable bias: no wgrad launch to ride along with.
        db = reference.fused_linear_backward(grad, x, weight, preact, activation, False, False, True)[2]
    return dx, dw, db


@_fused_linear_backward.register_fake
def _(grad, x, weight, preact, activation, need_dx, need_dw, need_db):
    return (
        torch.empty_like(x) if need_dx else x.new_empty(0),
        torch.empty_like(weight) if need_dw else x.new_empty(0),
        x.new_empty(weight.shape[0]) if need_db else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, owner, out_dtype, store_preact = inputs
    # Without a stored pre-activation an activation cannot be differentiated: backward refuses.
    preact = output[1] if activation != IDENTITY and store_preact else None
    ctx.save_for_backward(x, weight, preact)
    ctx.activation = activation
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad_out, grad_preact):
    # bias and residual get their gradient on every rank, owner or not: they are replicated across
    # the ranks of the sum, dY is the same on each, and replicas must stay identical after a step.
    x, weight, preact = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dresidual = ctx.needs_input_grad[:4]
    if ctx.activation != IDENTITY and preact is None:
        raise RuntimeError(
            "tpkernels::fused_linear ran with store_preact=False, so its activation cannot be "
            "differentiated; call tpkernels.linear_gelu, which stores it when a gradient is needed"
        )
    dx, dw, db = torch.ops.tpkernels.fused_linear_backward(
        grad_out, x, weight, preact, ctx.activation, need_dx, need_dw, need_db
    )
    dresidual = grad_out.to(ctx.residual_dtype) if need_dresidual else None
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db if need_db else None,
        dresidual,
        None, None, None, None,
    )


_fused_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public API


def _check_tensor(name, arg, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")


def _check_linear(name, x, weight, bias):
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
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_gelu(x, weight, bias=None, approximate="none"):
    """`F.gelu(F.linear(x, weight, bias), approximate=approximate)` in one launch: the column stage.

    Args:
        x: [..., in_features], float16, bfloat16 or float32.
        weight: [out_features, in_features] (a column shard [N_r, K] in tensor parallelism).
        bias: [out_features] or None.
        approximate: "none" for exact (erf) GELU, "tanh" for torch's tanh approximation.

    Returns:
        [..., out_features] in x's dtype. Differentiable in x, weight and bias.
    """
    if approximate not in _APPROXIMATE:
        raise ValueError(f"linear_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    _check_linear("linear_gelu", x, weight, bias)
    out, _ = torch.ops.tpkernels.fused_linear(
        _rows(x), weight, bias, None, _APPROXIMATE[approximate], True, x.dtype, _needs_grad(x, weight, bias)
    )
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_partial(x, weight, bias=None, *, residual=None, owner=True, out_dtype=None, out=None):
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
            does not support autograd.

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
        result, _ = torch.ops.tpkernels.fused_linear(
            _rows(x), weight, bias, None if residual is None else _rows(residual), IDENTITY, owner, out_dtype, False
        )
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
    torch.ops.tpkernels.fused_linear_out(
        _rows(x), weight, bias, None if residual is None else _rows(residual), owner, out_rows
    )
    return out
