"""The `torch.library` custom ops of fp8 (`tpkernels.fp8`), with fake implementations: what torch.compile sees.

Per call, 2-D operands (the functions in `fp8` check and reshape); q(t, s) = saturate(t * s) in fp8:

    fp8_quantize      t [M, N], scale [1] -> q [M, N]
    fp8_quantize_amax the same, and amax [1] raised to max |t| (mutated)
    fp8_scale_update  history [L, n], scale [n], scale_inv [n], fmax [n]    the delayed-scaling step (mutated)
    fp8_linear        x_q [M, K], w_q [N, K] (gated: [2F, K]), their inverse scales
                      -> (act(x_q @ w_q.T * s + bias) [M, N] (gated: act(g) * u, [M, F]), preact)
                      an fp8 out_dtype is quantized with out_scale, and amax raised to max |out| (mutated)
    fp8_gemm          a_q [M, K], b_q [K, N] (K-major), their inverse scales -> a_q @ b_q * s [M, N]
                      (* act'(z); gated: z = [g | u] and the result [dG | dU], [M, 2N])
    fp8_quantize_grad t [M, N], a layer's scaling handle and tensor name -> (q [M, N] in e5m2, scale_inv [1]):
                      a gradient quantized with that tensor's scale as it is when the backward runs, its
                      amax raised; the op reads and writes the layer's buffers itself (`SCALINGS`)
    fp8_snapshot      t -> a copy of t (a scale buffer's view the backward reads as the forward saw it)
    fp8_dgelu         grad [M, N], z [M, N] -> (dZ = grad * act'(z) in z's dtype, db = its column sums in
                      fp32, or an empty tensor unless need_db): the fp8 linear's backward, before dZ's
                      quantization (`launch.dgelu`, one pass)

The amax and the history are buffers of the layer's `FP8Scaling` (views of them), mutated in place as the
kernels do: torch.compile functionalizes the mutation. No op has autograd of its own: `fp8`'s autograd
functions call them in their forward and backward, treating the quantizers as identity.

Eager callers run an op's body directly (`run`): the dispatcher's path of a Python op that mutates costs
~40 us a call on the host, more than the launch.

`use_triton`: the caller's backend asked for the kernels ("auto", "triton"); they run where
`launch.runs_triton` says they can, and the torch path of `reference` elsewhere (the "eager" backend).
"""
import contextlib
import itertools
import weakref
from typing import Optional

import torch
import triton
from torch import Tensor

from tpkernels import launch, reference
from tpkernels.kernels import GLU, IDENTITY, INTERPRETED, _quantize_kernel, _scale_update_kernel

__all__ = ["OPS", "QUANTIZE_BLOCK", "SCALINGS", "dgelu_impl", "gemm_impl", "linear_impl", "quantize_amax_impl",
           "quantize_grad_impl", "quantize_impl", "register", "scale_update_impl", "run", "snapshot_impl"]

QUANTIZE_BLOCK = (32, 128)


# op name -> (the op, its body)
OPS = {}


def _op(name, impl, mutates_args=()):
    """`impl` registered as the op `tpkernels::<name>`, kept with it for `run`."""
    op = torch.library.custom_op(f"tpkernels::{name}", mutates_args=mutates_args)(impl)
    OPS[name] = (op, impl)
    return op


def run(name, *args):
    """The op `tpkernels::<name>` under torch.compile, which traces it; its body in eager. Only from code that
    handles autograd itself (`fp8`'s autograd functions): the body has none."""
    op, impl = OPS[name]
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


def _device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _quantize(t, scale, amax, dtype, use_triton):
    q = torch.empty(t.shape, dtype=dtype, device=t.device)
    if not (use_triton and launch.runs_triton(t)):
        if amax is not None and t.numel():
            amax.copy_(torch.maximum(amax, t.detach().abs().amax().float()))
        q.copy_(reference.fp8_quantize(t, scale, dtype))
        return q
    M, N = t.shape
    if M and N:
        grid = (triton.cdiv(M, QUANTIZE_BLOCK[0]), triton.cdiv(N, QUANTIZE_BLOCK[1]))
        with _device(t):
            launch.elementwise(_quantize_kernel, grid, (t, q, scale, q if amax is None else amax.view(torch.int32)),
                               (M, N, *t.stride(), *q.stride()),
                               dict(STORE_AMAX=amax is not None, INT64_OFFSETS=launch._needs_int64((t, q)),
                                    EMULATE_BF16=INTERPRETED, BLOCK_M=QUANTIZE_BLOCK[0], BLOCK_N=QUANTIZE_BLOCK[1]),
                               t.device, line="fp8 quantize")
    return q


def quantize_impl(t: Tensor, scale: Tensor, dtype: torch.dtype, use_triton: bool) -> Tensor:
    return _quantize(t, scale, None, dtype, use_triton)


def quantize_amax_impl(t: Tensor, scale: Tensor, amax: Tensor, dtype: torch.dtype, use_triton: bool) -> Tensor:
    return _quantize(t, scale, amax, dtype, use_triton)


# Two ops, with and without the amax: in an op returning one tensor, an optional mutated argument that is
# None tripped inductor (torch 2.13, "getitem is not an OpOverload"); fp8_linear, which returns two, compiles
# with its amax None (the fp8 layers' compile test)
_fp8_quantize = _op("fp8_quantize", quantize_impl)
_fp8_quantize_amax = _op("fp8_quantize_amax", quantize_amax_impl, mutates_args=("amax",))


@_fp8_quantize.register_fake
def _(t, scale, dtype, use_triton):
    return torch.empty(t.shape, dtype=dtype, device=t.device)


@_fp8_quantize_amax.register_fake
def _(t, scale, amax, dtype, use_triton):
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def scale_update_impl(history: Tensor, scale: Tensor, scale_inv: Tensor, fmax: Tensor, margin: int,
                      most_recent: bool) -> None:
    # A forward run inside a backward pass is activation checkpointing's recompute: the step has started.
    if torch._C._current_graph_task_id() != -1:
        return
    length, count = history.shape
    if launch.runs_triton(history):
        with _device(history):
            launch.elementwise(_scale_update_kernel, (1,), (history, scale, scale_inv, fmax), (),
                               dict(LENGTH=length, COUNT=count, MARGIN=margin, MOST_RECENT=most_recent,
                                    BLOCK_L=triton.next_power_of_2(length), BLOCK_C=triton.next_power_of_2(count)),
                               history.device, line="fp8 scale update")
        return
    amax = history[0] if most_recent else history.amax(0)
    usable = (amax > 0) & torch.isfinite(amax)
    new = torch.where(usable, fmax / torch.where(usable, amax, 1.0) / 2.0 ** margin, scale)
    new = new.clamp(max=torch.finfo(torch.float32).max)  # as the kernel: a subnormal amax overflows
    scale.copy_(new)
    scale_inv.copy_(1.0 / new)
    history.copy_(torch.roll(history, 1, 0))
    history[0].zero_()


_fp8_scale_update = _op("fp8_scale_update", scale_update_impl, mutates_args=("history", "scale", "scale_inv"))


@_fp8_scale_update.register_fake
def _(history, scale, scale_inv, fmax, margin, most_recent):
    return None


def linear_impl(x_q: Tensor, x_scale_inv: Tensor, w_q: Tensor, w_scale_inv: Tensor, bias: Optional[Tensor],
                activation: int, out_dtype: torch.dtype, preact_dtype: Optional[torch.dtype],
                out_scale: Optional[Tensor], amax: Optional[Tensor], gated: bool,
                use_triton: bool) -> tuple[Tensor, Tensor]:
    rows, features = x_q.shape[0], w_q.shape[0]
    preact = x_q.new_empty(0) if preact_dtype is None else x_q.new_empty((rows, features), dtype=preact_dtype)
    if not (use_triton and launch.runs_triton(x_q)):
        out, z, tile_amax = reference.fp8_linear(x_q, x_scale_inv, w_q, w_scale_inv, bias, activation, out_dtype,
                                                 out_scale, gated=gated)
        if preact_dtype is not None:
            preact.copy_(z)
        if amax is not None:
            amax.copy_(torch.maximum(amax, tile_amax))
        return out, preact
    store = None if preact_dtype is None else preact
    if gated:  # the kernel takes the gate halves; the up halves lie F rows (columns of preact) further
        features //= 2
        w_q, activation = w_q[:features], GLU + activation
        bias = None if bias is None else bias[:features]
        store = None if store is None else store[:, :features]
    out = torch.empty((rows, features), dtype=out_dtype, device=x_q.device)
    launch.linear(x_q, w_q, out, bias=None if bias is None else bias.contiguous(), preact=store,
                  activation=activation, scales=(x_scale_inv, w_scale_inv, out_scale, amax))
    return out, preact


_fp8_linear = _op("fp8_linear", linear_impl, mutates_args=("amax",))


@_fp8_linear.register_fake
def _(x_q, x_scale_inv, w_q, w_scale_inv, bias, activation, out_dtype, preact_dtype, out_scale, amax, gated,
      use_triton):
    rows, features = x_q.shape[0], w_q.shape[0]
    preact = x_q.new_empty(0) if preact_dtype is None else x_q.new_empty((rows, features), dtype=preact_dtype)
    return x_q.new_empty((rows, features // 2 if gated else features), dtype=out_dtype), preact


def gemm_impl(a_q: Tensor, a_scale_inv: Tensor, b_q: Tensor, b_scale_inv: Tensor, z: Optional[Tensor],
              grad_activation: int, gated: bool, out_dtype: torch.dtype, use_triton: bool) -> Tensor:
    features = b_q.shape[1]
    out = torch.empty((a_q.shape[0], 2 * features if gated else features), dtype=out_dtype, device=a_q.device)
    if not (use_triton and launch.runs_triton(a_q)):
        acc = reference.fp8_matmul(a_q, a_scale_inv, b_q, b_scale_inv)
        if gated:
            acc = reference.glu_backward(acc, z, grad_activation)
        elif grad_activation != IDENTITY:
            acc = reference.activation_backward(acc, z.float(), grad_activation)
        out.copy_(acc)
        return out
    c = out
    if gated:  # the kernel writes dG into the first half of out and dU N columns further
        c, z, grad_activation = out[:, :features], z[:, :features], GLU + grad_activation
    launch.matmul(a_q, b_q, c, z=z, grad_activation=grad_activation, scales=(a_scale_inv, b_scale_inv, None, None))
    return out


_fp8_gemm = _op("fp8_gemm", gemm_impl)


@_fp8_gemm.register_fake
def _(a_q, a_scale_inv, b_q, b_scale_inv, z, grad_activation, gated, out_dtype, use_triton):
    features = b_q.shape[1]
    return a_q.new_empty((a_q.shape[0], 2 * features if gated else features), dtype=out_dtype)


def dgelu_impl(grad: Tensor, z: Tensor, activation: int, need_db: bool, use_triton: bool) -> tuple[Tensor, Tensor]:
    if use_triton and launch.runs_triton(grad):
        dz, db = launch.dgelu(grad, z, activation, need_db)
    else:
        dz = reference.activation_backward(grad.to(z.dtype), z, activation)
        db = dz.sum(0, dtype=torch.float32) if need_db else None
    return dz, (z.new_empty(0, dtype=torch.float32) if db is None else db)


_fp8_dgelu = _op("fp8_dgelu", dgelu_impl)


@_fp8_dgelu.register_fake
def _(grad, z, activation, need_db, use_triton):
    return torch.empty_like(z), z.new_empty(z.shape[1] if need_db else 0, dtype=torch.float32)


# handle -> a layer's FP8Scaling. A backward quantizes its gradients with the scales current when it runs and
# raises their amax: reached through a handle, not as tensors, since a compiled backward's tensors are saved by
# the forward, and the next forward's scale update (gradient accumulation, pipeline schedules) rewrites them.
SCALINGS = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def register(scaling):
    """A handle for `scaling` (an FP8Scaling: `slot(name)` gives its (scale, scale_inv, amax) views)."""
    handle = next(_HANDLES)
    SCALINGS[handle] = scaling
    return handle


def quantize_grad_impl(t: Tensor, handle: int, name: str, dtype: torch.dtype,
                       use_triton: bool) -> tuple[Tensor, Tensor]:
    scale, scale_inv, amax = SCALINGS[handle].slot(name)
    return _quantize(t, scale, amax, dtype, use_triton), scale_inv.clone()


# No mutated arguments: the buffers it writes are the layer's, reached through the handle
_fp8_quantize_grad = _op("fp8_quantize_grad", quantize_grad_impl)


@_fp8_quantize_grad.register_fake
def _(t, handle, name, dtype, use_triton):
    return torch.empty(t.shape, dtype=dtype, device=t.device), t.new_empty(1, dtype=torch.float32)


def snapshot_impl(t: Tensor) -> Tensor:
    return t.clone()


# An op, not `clone()`: compiled, a clone of a buffer that an in-place update then rewrites may be elided
_fp8_snapshot = _op("fp8_snapshot", snapshot_impl)


@_fp8_snapshot.register_fake
def _(t):
    return torch.empty_like(t)
