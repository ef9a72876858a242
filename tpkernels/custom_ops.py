"""The `torch.library` custom ops of the fused layers, with fake implementations and autograd.

2-D inputs, already checked (the public functions in `ops` check and reshape). Per-rank shapes:

    fused_linear          x [M, K], weight [N, K], bias [N], residual [M, N] -> (out [M, N], preact [M, N])
                          out = act(x @ W.T + b) + residual, b and residual only on the owner rank
    fused_linear_out      the same without an activation, written into the caller's `out`
    fused_linear_backward (dX, dW, db)
    mlp_shard             x [M, K], w1 [H_r, K], w2 [N, H_r] -> (partial [M, N], h [M, H_r], z [M, H_r])
    mlp_shard_backward    (dX, dW1, db1, dW2, db2)

Gradients, with z = x @ W.T + b the pre-activation and act' its derivative (identity: 1):

    dZ      dZ = dY * act'(z), db = sum_M dZ   one elementwise pass (`launch.dgelu`; db: per-row-block
                                               sums, then summed)
    dgrad   dX = dZ @ W                        a plain GEMM
    wgrad   dW = dZ.T @ X                      a plain GEMM
    mlp     dZ1 = (dY @ W2) * act'(z1)         one GEMM with the dGELU epilogue: no separate pass; db1
                                               is then a reduction of dZ1

The forward stores z (in x's dtype, as eager autograd does) only when a gradient is needed: re-reading
M x N values in the backward is far cheaper than recomputing the 2 M N K flops of x @ W.T.

Each op runs the Triton kernels where they can run (`launch.runs_triton`) and `tpkernels.reference`
elsewhere. The native extension's ops (`extension`) get the same fakes and autograd here.
"""
from typing import Optional

import torch
from torch import Tensor

from tpkernels import extension, launch, reference
from tpkernels.kernels import IDENTITY

__all__ = ["fused_linear_impl", "fused_linear_inference", "mlp_shard_impl", "native_linear"]


def fused_linear_impl(
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
    if not launch.runs_triton(x):
        return reference.fused_linear(x, weight, bias, residual, activation, owner, out_dtype, store_preact)
    preact = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device) if store_preact \
        else x.new_empty(0)
    return fused_linear_inference(x, weight, bias, residual, activation, owner, out_dtype,
                                  preact if store_preact else None), preact


def fused_linear_inference(x, weight, bias, residual, activation, owner, out_dtype, preact=None):
    """act(x @ weight.T + bias) + residual on the Triton kernels (bias and residual only where `owner`),
    with no autograd: the body of `fused_linear`, and what an inference call in plain eager runs
    directly (`ops.direct_call_ok`). `preact`, when given, receives x @ weight.T + bias."""
    shape = (x.shape[0], weight.shape[0])
    out = x.new_empty(shape) if out_dtype == x.dtype else x.new_empty(shape, dtype=out_dtype)
    launch.linear(x, weight, out, bias=bias.contiguous() if owner and bias is not None else None,
                  residual=residual if owner else None, preact=preact, activation=activation)
    return out


_fused_linear = torch.library.custom_op("tpkernels::fused_linear", mutates_args=())(fused_linear_impl)

_CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def native_linear(x, weight, bias, residual, activation, owner, out_dtype, store_preact):
    """The extension's `epilogue_linear` with no autograd. On CPU tensors it goes straight to the CPU
    kernel, past the op's Python autograd kernel, which adds ~10 us a call (as much as oneDNN's own host
    cost at decode). Only for calls whose autograd has nothing to do: inside `mlp_shard`'s op or
    inference calls that `ops.direct_call_ok` admits."""
    op = torch.ops.tpkernels.epilogue_linear.default
    if x.device.type == "cpu":
        return op.redispatch(_CPU_KERNEL, x, weight, bias, residual, activation, owner, out_dtype, store_preact)
    return op(x, weight, bias, residual, activation, owner, out_dtype, store_preact)


@_fused_linear.register_fake
def _fused_linear_fake(x, weight, bias, residual, activation, owner, out_dtype, store_preact):
    out = x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
    return out, (torch.empty_like(out, dtype=x.dtype) if store_preact else x.new_empty(0))


@torch.library.custom_op("tpkernels::fused_linear_out", mutates_args=("out",))
def _fused_linear_out(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], owner: bool, out: Tensor
) -> None:
    """out = x @ weight.T (+ bias + residual where `owner`), written into the caller's buffer."""
    if not launch.runs_triton(x):
        out.copy_(reference.fused_linear(x, weight, bias, residual, IDENTITY, owner, out.dtype, False)[0])
        return
    launch.linear(x, weight, out, bias=bias.contiguous() if owner and bias is not None else None,
                  residual=residual if owner else None)


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
    """(dX, dW, db) of `fused_linear`, each empty when not needed: dZ = dY * act'(z) and db in one
    elementwise pass (or db as a reduction of dY), then dX = dZ @ W and dW = dZ.T @ X as plain GEMMs."""
    if not launch.runs_triton(x):
        grads = reference.fused_linear_backward(grad, x, weight, preact, activation, need_dx, need_dw, need_db)
        return tuple(x.new_empty(0) if g is None else g for g in grads)
    # Outputs of a custom op may not alias each other: one empty tensor each.
    dx, dw, db = (x.new_empty(0) for _ in range(3))
    # fp32 partials come back as an fp32 gradient: db sums it as it is, the GEMMs run in x's dtype.
    if activation != IDENTITY:
        dz, db32 = launch.dgelu(grad, preact, activation, need_db)
    else:
        dz, db32 = grad.to(x.dtype), (grad.sum(0, dtype=torch.float32) if need_db else None)
    if need_db:
        db = db32.to(x.dtype)
    dx, dw = _dgrad_wgrad(dz, x, weight, need_dx, need_dw, dx, dw)
    return dx, dw, db


def _dgrad_wgrad(dz, x, weight, need_dx, need_dw, dx, dw):
    """dX = dZ @ W and dW = dZ.T @ X as plain GEMMs, where needed (else dx and dw as given)."""
    if need_dx:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        launch.matmul(dz, weight, dx)
    if need_dw:
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
        launch.matmul(dz.t(), x, dw)
    return dx, dw


@_fused_linear_backward.register_fake
def _fused_linear_backward_fake(grad, x, weight, preact, activation, need_dx, need_dw, need_db):
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


def _backward(ctx, grad_out, grad_preact, backward_op=None):
    # bias and residual get their gradient on every rank, owner or not: they are replicated across
    # the ranks of the sum, dY is the same on each, and replicas must stay identical after a step.
    x, weight, preact = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dresidual = ctx.needs_input_grad[:4]
    if ctx.activation != IDENTITY and preact is None:
        raise RuntimeError(
            "tpkernels: a fused linear ran with store_preact=False, so its activation cannot be "
            "differentiated; call tpkernels.linear_gelu, which stores it when a gradient is needed"
        )
    backward_op = backward_op or torch.ops.tpkernels.fused_linear_backward
    dx, dw, db = backward_op(grad_out, x, weight, preact, ctx.activation, need_dx, need_dw, need_db)
    dresidual = grad_out.to(ctx.residual_dtype) if need_dresidual else None
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db if need_db else None,
        dresidual,
        None, None, None, None,
    )


_fused_linear.register_autograd(_backward, setup_context=_setup_context)


if extension.LOADED:
    # The native ops have the Triton ops' contract: the same fakes, the same autograd.
    torch.library.register_fake("tpkernels::epilogue_linear")(_fused_linear_fake)
    torch.library.register_fake("tpkernels::epilogue_linear_backward")(_fused_linear_backward_fake)

    @torch.library.register_fake("tpkernels::epilogue_dgelu_linear")
    def _(grad, weight, preact, activation, need_db):
        return torch.empty_like(preact), preact.new_empty(preact.shape[1] if need_db else 0)
    torch.library.register_autograd(
        "tpkernels::epilogue_linear",
        lambda ctx, grad_out, grad_preact: _backward(ctx, grad_out, grad_preact,
                                                     torch.ops.tpkernels.epilogue_linear_backward),
        setup_context=_setup_context,
    )


def mlp_shard_impl(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    residual: Optional[Tensor],
    activation: int,
    owner: bool,
    out_dtype: torch.dtype,
    store_for_backward: bool,
    native: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(partial, h, z): z = x @ w1.T + b1, h = act(z), partial = h @ w2.T (+ b2 + residual where `owner`).

    h and z are what the backward needs (empty unless `store_for_backward`), as eager autograd keeps them.
    `native` runs the native extension's kernels (cuBLASLt or C++) instead of Triton's.
    """
    if native:
        h, z = native_linear(x, w1, b1, None, activation, True, x.dtype, store_for_backward)
        out, _ = native_linear(h, w2, b2, residual, IDENTITY, owner, out_dtype, False)
        return out, (h if store_for_backward else x.new_empty(0)), z
    if not launch.runs_triton(x):
        return reference.mlp_shard(x, w1, b1, w2, b2, residual, activation, owner, out_dtype, store_for_backward)
    z = x.new_empty((x.shape[0], w1.shape[0])) if store_for_backward else None
    h = fused_linear_inference(x, w1, b1, None, activation, True, x.dtype, z)
    out = fused_linear_inference(h, w2, b2, residual, IDENTITY, owner, out_dtype)
    return out, (h if store_for_backward else x.new_empty(0)), (z if store_for_backward else x.new_empty(0))


_mlp_shard = torch.library.custom_op("tpkernels::mlp_shard", mutates_args=())(mlp_shard_impl)


@_mlp_shard.register_fake
def _(x, w1, b1, w2, b2, residual, activation, owner, out_dtype, store_for_backward, native):
    hidden = (x.shape[0], w1.shape[0]) if store_for_backward else (0,)
    return x.new_empty((x.shape[0], w2.shape[0]), dtype=out_dtype), x.new_empty(hidden), x.new_empty(hidden)


@torch.library.custom_op("tpkernels::mlp_shard_backward", mutates_args=())
def _mlp_shard_backward(
    grad: Tensor, x: Tensor, w1: Tensor, w2: Tensor, h: Tensor, z: Tensor, activation: int, needs: list[bool],
    native: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dX, dW1, db1, dW2, db2) of `mlp_shard`, each empty when `needs` says it is not wanted.

    dZ = (dY @ W2) * act'(z) is one GEMM with the dGELU epilogue, so dH never goes to memory; then
    dX = dZ @ W1, dW1 = dZ.T @ X and dW2 = dY.T @ H are plain GEMMs, and db1, db2 reductions of dZ, dY.
    `native`: the same with the extension's ops (on CUDA, cuBLASLt's DGELU_BGRAD gives dZ and db1).
    """
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
    if native:
        empty = x.new_empty(0)
        _, dw2, db2 = torch.ops.tpkernels.epilogue_linear_backward(grad, h, w2, None, IDENTITY, False, need_dw2, need_db2)
        dx, dw1, db1 = empty, empty.clone(), empty.clone()
        if need_dx or need_dw1 or need_db1:
            dz, db1 = torch.ops.tpkernels.epilogue_dgelu_linear(grad, w2, z, activation, need_db1)
            dx, dw1, _ = torch.ops.tpkernels.epilogue_linear_backward(dz, x, w1, None, IDENTITY, need_dx, need_dw1, False)
        return dx, dw1, db1, dw2, db2
    if not launch.runs_triton(x):
        grads = reference.mlp_shard_backward(grad, x, w1, w2, h, z, activation, needs)
        return tuple(x.new_empty(0) if g is None else g for g in grads)
    dx, dw1, db1, dw2, db2 = (x.new_empty(0) for _ in range(5))
    if need_db2:
        db2 = grad.sum(0, dtype=torch.float32).to(x.dtype)
    grad = grad.to(x.dtype)  # an fp32 gradient of fp32 partials: the GEMMs run in x's dtype
    if need_dw2:
        dw2 = torch.empty_like(w2, memory_format=torch.contiguous_format)
        launch.matmul(grad.t(), h, dw2)
    if need_dx or need_dw1 or need_db1:
        dz = torch.empty_like(z, memory_format=torch.contiguous_format)
        launch.matmul(grad, w2, dz, z=z, grad_activation=activation)
        if need_db1:
            db1 = dz.sum(0, dtype=torch.float32).to(x.dtype)
        dx, dw1 = _dgrad_wgrad(dz, x, w1, need_dx, need_dw1, dx, dw1)
    return dx, dw1, db1, dw2, db2


@_mlp_shard_backward.register_fake
def _(grad, x, w1, w2, h, z, activation, needs, native):
    shapes = (x.shape, w1.shape, (w1.shape[0],), w2.shape, (w2.shape[0],))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _mlp_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, activation, owner, out_dtype, store_for_backward, native = inputs
    _, h, z = output
    ctx.save_for_backward(x, w1, w2, h, z)
    ctx.activation = activation
    ctx.stored = store_for_backward
    ctx.native = native
    ctx.residual_dtype = None if residual is None else residual.dtype


def _mlp_backward(ctx, grad_out, grad_h, grad_z):
    # As in fused_linear: b2 and the residual get sum(dY) and dY on every rank, owner or not.
    x, w1, w2, h, z = ctx.saved_tensors
    need_dx, need_dw1, need_db1, need_dw2, need_db2, need_dresidual = ctx.needs_input_grad[:6]
    if not ctx.stored:
        raise RuntimeError("tpkernels::mlp_shard ran with store_for_backward=False, so it cannot be "
                           "differentiated; call tpkernels.mlp_shard, which stores h and z when a gradient is needed")
    needs = [need_dx, need_dw1, need_db1, need_dw2, need_db2]
    grads = torch.ops.tpkernels.mlp_shard_backward(grad_out, x, w1, w2, h, z, ctx.activation, needs, ctx.native)
    dx, dw1, db1, dw2, db2 = (g if need else None for g, need in zip(grads, needs))
    dresidual = grad_out.to(ctx.residual_dtype) if need_dresidual else None
    return dx, dw1, db1, dw2, db2, dresidual, None, None, None, None, None


_mlp_shard.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)
