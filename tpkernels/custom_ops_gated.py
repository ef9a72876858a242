"""The `torch.library` custom ops of the gated MLP (Llama's, Gemma's, Phi-3's), with fakes and autograd.

2-D inputs, already checked (the public functions in `ops` check and reshape). Per-rank shapes, with F the
rank's share of the hidden features (rank r holds gate rows and up rows of the same features):

    fused_glu           x [M, K], gate [F, K], up [F, K], biases [F] -> (h [M, F], gu [M, 2F])
                        h = act(x @ gate.T + b_gate) * (x @ up.T + b_up)
    glu_mlp_shard       the same, then the row stage: w2 [N, F] -> (partial [M, N], h, gu)
                        partial = h @ w2.T (+ b2 + residual where `owner`)

One launch makes h: the kernel reads each x tile once for both products, and act * up runs in its
epilogue (`kernels.GLU`). It reads gate and up as one [2F, K] operand whose up rows lie F rows past the gate
rows; where they are not so laid out in memory (two separate allocations), the forward concatenates them
first (a copy of the weights: `TensorParallelGatedMLP` keeps its two shards in one buffer so that it never
pays it).

Backward. The forward keeps g and u (gu = [g | u], M x 2F values in x's dtype) when a gradient is needed,
as the GELU layers keep z: recomputing them would cost the forward's 4 M F K flops again, reading them back
costs 4 M F bytes. Then

    dGU     [dG | dU] = [dH * u * act'(g), dH * act(g)]     glu_mlp_shard: in the epilogue of the GEMM that
                                                           makes dH = dY @ W2 (dH never goes to memory);
                                                           fused_glu: one elementwise pass (`launch.dgelu`)
    dgrad   dX = dGU @ [Wg; Wu]                             one GEMM (two, the second accumulating, when
                                                           gate and up are not one buffer)
    wgrad   [dWg; dWu] = dGU.T @ X                          one GEMM into a [2F, K] buffer, returned as
                                                           its two halves
    db      [dbg | dbu] = the column sums of dGU
"""
from typing import Optional

import torch
from torch import Tensor

from tpkernels import launch, reference
from tpkernels.custom_ops import fused_linear_inference
from tpkernels.kernels import GLU, IDENTITY

__all__ = ["adjacent", "fused_glu_impl", "glu_mlp_shard_impl"]


def adjacent(gate, up):
    """Whether up lies right after gate in one buffer (up = rows F to 2F of a [2F, ...] tensor whose
    first F rows are gate), so that the kernels read both as one operand."""
    if gate.shape != up.shape or gate.stride() != up.stride() or gate.dtype != up.dtype or gate.device != up.device:
        return False
    if gate.numel() == 0:
        return True
    return (gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
            and up.storage_offset() == gate.storage_offset() + gate.shape[0] * gate.stride(0))


def _pair(gate, up):
    """(the gate operand whose up half lies F rows further, whether that needed a copy)."""
    if adjacent(gate, up):
        return gate, False
    return torch.cat([gate, up])[: gate.shape[0]], True


def _gated_forward(x, gate, up, gate_bias, up_bias, activation, store):
    """(h, gu or None) on the Triton kernels: one launch, no autograd."""
    F = gate.shape[0]
    weight, _ = _pair(gate, up)
    bias = None
    if gate_bias is not None:
        bias, _ = _pair(gate_bias.contiguous(), up_bias.contiguous())
    h = x.new_empty((x.shape[0], F))
    gu = x.new_empty((x.shape[0], 2 * F)) if store else None
    launch.linear(x, weight, h, bias=bias, preact=None if gu is None else gu[:, :F], activation=GLU + activation)
    return h, gu


def fused_glu_impl(
    x: Tensor, gate: Tensor, up: Tensor, gate_bias: Optional[Tensor], up_bias: Optional[Tensor], activation: int,
    store: bool,
) -> tuple[Tensor, Tensor]:
    """(act(x @ gate.T + gate_bias) * (x @ up.T + up_bias), gu): gu = [g | u] when `store`, else empty."""
    if not launch.runs_triton(x):
        with torch.no_grad():
            g, u = torch.nn.functional.linear(x, gate, gate_bias), torch.nn.functional.linear(x, up, up_bias)
            return reference.activation(g, activation) * u, (torch.cat([g, u], 1) if store else x.new_empty(0))
    h, gu = _gated_forward(x, gate, up, gate_bias, up_bias, activation, store)
    return h, (x.new_empty(0) if gu is None else gu)


_fused_glu = torch.library.custom_op("tpkernels::fused_glu", mutates_args=())(fused_glu_impl)


@_fused_glu.register_fake
def _(x, gate, up, gate_bias, up_bias, activation, store):
    return x.new_empty((x.shape[0], gate.shape[0])), x.new_empty((x.shape[0], 2 * gate.shape[0]) if store else (0,))


def _input_grads(dgu, x, gate, up, needs, db32=None):
    """(dX, [dWg; dWu], [dbg | dbu]) from dGU = [dG | dU] [M, 2F], each empty when not needed; `db32`, where
    given, is dGU's fp32 column sums already made (by the pass that made dGU)."""
    need_dx, need_dw, need_db = needs
    dx, dw, db = (x.new_empty(0) for _ in range(3))
    F = gate.shape[0]
    if need_db:
        db = (dgu.sum(0, dtype=torch.float32) if db32 is None else db32).to(x.dtype)
    if not launch.runs_triton(x):
        weight = torch.cat([gate, up])
        return (dgu @ weight if need_dx else dx), (dgu.t() @ x if need_dw else dw), db
    if need_dx:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        if adjacent(gate, up):
            launch.matmul(dgu, gate.as_strided((2 * F, gate.shape[1]), gate.stride()), dx)
        else:  # two GEMMs, the second adding into the first's output: no copy of the weights
            launch.matmul(dgu[:, :F], gate, dx)
            launch.matmul(dgu[:, F:], up, dx, residual=dx)
    if need_dw:
        dw = x.new_empty((2 * F, x.shape[1]))
        launch.matmul(dgu.t(), x, dw)
    return dx, dw, db


@torch.library.custom_op("tpkernels::fused_glu_backward", mutates_args=())
def _fused_glu_backward(
    grad: Tensor, x: Tensor, gate: Tensor, up: Tensor, gu: Tensor, activation: int, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, [dWg; dWu] [2F, K], [dbg | dbu] [2F]) of `fused_glu`, each empty when `needs` says not wanted:
    dGU and its column sums in one elementwise pass, then one GEMM each for dX and dW."""
    if launch.runs_triton(x):
        dgu, db32 = launch.dgelu(grad.to(x.dtype), gu, GLU + activation, needs[2])
        return _input_grads(dgu, x, gate, up, needs, db32)
    return _input_grads(reference.glu_backward(grad, gu, activation), x, gate, up, needs)


@_fused_glu_backward.register_fake
def _(grad, x, gate, up, gu, activation, needs):
    shapes = (x.shape, (2 * gate.shape[0], gate.shape[1]), (2 * gate.shape[0],))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _halves(t, F):
    return (None, None) if t is None else (t[:F], t[F:])


def _glu_setup_context(ctx, inputs, output):
    x, gate, up, gate_bias, up_bias, activation, store = inputs
    ctx.save_for_backward(x, gate, up, output[1])
    ctx.activation, ctx.stored = activation, store


def _glu_backward(ctx, grad_h, grad_gu):
    x, gate, up, gu = ctx.saved_tensors
    if not ctx.stored:
        raise RuntimeError("tpkernels::fused_glu ran with store=False, so it cannot be differentiated; call "
                           "tpkernels.linear_glu, which stores g and u when a gradient is needed")
    need_dx, need_dg, need_du, need_dbg, need_dbu = ctx.needs_input_grad[:5]
    needs = [need_dx, need_dg or need_du, need_dbg or need_dbu]
    dx, dw, db = torch.ops.tpkernels.fused_glu_backward(grad_h, x, gate, up, gu, ctx.activation, needs)
    F = gate.shape[0]
    dg, du = _halves(dw if needs[1] else None, F)
    dbg, dbu = _halves(db if needs[2] else None, F)
    return dx if need_dx else None, dg, du, dbg, dbu, None, None


_fused_glu.register_autograd(_glu_backward, setup_context=_glu_setup_context)


def glu_mlp_shard_impl(
    x: Tensor, gate: Tensor, up: Tensor, gate_bias: Optional[Tensor], up_bias: Optional[Tensor], w2: Tensor,
    b2: Optional[Tensor], residual: Optional[Tensor], activation: int, owner: bool, out_dtype: torch.dtype,
    store: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(partial, h, gu): h = act(x @ gate.T + b_gate) * (x @ up.T + b_up), partial = h @ w2.T (+ b2 +
    residual where `owner`); h and gu = [g | u] are what the backward needs (empty unless `store`)."""
    if not launch.runs_triton(x):
        h, gu = fused_glu_impl(x, gate, up, gate_bias, up_bias, activation, store)
        with torch.no_grad():
            out, _ = reference.fused_linear(h, w2, b2, residual, IDENTITY, owner, out_dtype, False)
        return out, (h if store else x.new_empty(0)), gu
    h, gu = _gated_forward(x, gate, up, gate_bias, up_bias, activation, store)
    out = fused_linear_inference(h, w2, b2, residual, IDENTITY, owner, out_dtype)
    return out, (h if store else x.new_empty(0)), (x.new_empty(0) if gu is None else gu)


_glu_mlp_shard = torch.library.custom_op("tpkernels::glu_mlp_shard", mutates_args=())(glu_mlp_shard_impl)


@_glu_mlp_shard.register_fake
def _(x, gate, up, gate_bias, up_bias, w2, b2, residual, activation, owner, out_dtype, store):
    F = gate.shape[0]
    return (x.new_empty((x.shape[0], w2.shape[0]), dtype=out_dtype), x.new_empty((x.shape[0], F) if store else (0,)),
            x.new_empty((x.shape[0], 2 * F) if store else (0,)))


@torch.library.custom_op("tpkernels::glu_mlp_shard_backward", mutates_args=())
def _glu_mlp_shard_backward(
    grad: Tensor, x: Tensor, gate: Tensor, up: Tensor, w2: Tensor, h: Tensor, gu: Tensor, activation: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dX, [dWg; dWu], [dbg | dbu], dW2, db2) of `glu_mlp_shard`, each empty when `needs` says not wanted.

    [dG | dU] comes out of the epilogue of the GEMM dY @ W2 (dH never goes to memory); then one GEMM each
    for dX, [dWg; dWu] and dW2, and column sums for the biases."""
    need_dx, need_dw, need_db, need_dw2, need_db2 = needs
    dw2, db2 = x.new_empty(0), x.new_empty(0)
    if need_db2:
        db2 = grad.sum(0, dtype=torch.float32).to(x.dtype)
    grad = grad.to(x.dtype)  # an fp32 gradient of fp32 partials: the GEMMs run in x's dtype
    triton = launch.runs_triton(x)
    if need_dw2:
        if triton:
            dw2 = torch.empty_like(w2, memory_format=torch.contiguous_format)
            launch.matmul(grad.t(), h, dw2)
        else:
            dw2 = grad.t() @ h
    if not (need_dx or need_dw or need_db):
        empty = x.new_empty(0)
        return empty, empty.clone(), empty.clone(), dw2, db2
    F = gate.shape[0]
    if triton:
        dgu = x.new_empty((x.shape[0], 2 * F))
        launch.matmul(grad, w2, dgu[:, :F], z=gu[:, :F], grad_activation=GLU + activation)
    else:
        dgu = reference.glu_backward(grad @ w2, gu, activation)
    dx, dw, db = _input_grads(dgu, x, gate, up, needs[:3])
    return dx, dw, db, dw2, db2


@_glu_mlp_shard_backward.register_fake
def _(grad, x, gate, up, w2, h, gu, activation, needs):
    F = gate.shape[0]
    shapes = (x.shape, (2 * F, gate.shape[1]), (2 * F,), w2.shape, (w2.shape[0],))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _glu_mlp_setup_context(ctx, inputs, output):
    x, gate, up, gate_bias, up_bias, w2, b2, residual, activation, owner, out_dtype, store = inputs
    _, h, gu = output
    ctx.save_for_backward(x, gate, up, w2, h, gu)
    ctx.activation, ctx.stored = activation, store
    ctx.residual_dtype = None if residual is None else residual.dtype


def _glu_mlp_backward(ctx, grad_out, grad_h, grad_gu):
    # As in mlp_shard: b2 and the residual get sum(dY) and dY on every rank, owner or not.
    x, gate, up, w2, h, gu = ctx.saved_tensors
    if not ctx.stored:
        raise RuntimeError("tpkernels::glu_mlp_shard ran with store=False, so it cannot be differentiated; call "
                           "tpkernels.glu_mlp_shard, which stores h, g and u when a gradient is needed")
    need_dx, need_dg, need_du, need_dbg, need_dbu, need_dw2, need_db2, need_dresidual = ctx.needs_input_grad[:8]
    needs = [need_dx, need_dg or need_du, need_dbg or need_dbu, need_dw2, need_db2]
    dx, dw, db, dw2, db2 = torch.ops.tpkernels.glu_mlp_shard_backward(grad_out, x, gate, up, w2, h, gu,
                                                                      ctx.activation, needs)
    F = gate.shape[0]
    dg, du = _halves(dw if needs[1] else None, F)
    dbg, dbu = _halves(db if needs[2] else None, F)
    dresidual = grad_out.to(ctx.residual_dtype) if need_dresidual else None
    return (dx if need_dx else None, dg, du, dbg, dbu, dw2 if need_dw2 else None, db2 if need_db2 else None,
            dresidual, None, None, None, None)


_glu_mlp_shard.register_autograd(_glu_mlp_backward, setup_context=_glu_mlp_setup_context)
