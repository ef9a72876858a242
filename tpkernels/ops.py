"""Fused linear layers: launchers, `torch.library` custom ops with fake implementations, autograd, and
the backend choice.

Per-rank shapes (M is the product of x's leading dims):

    linear_gelu     x [..., K], weight_shard_n [N_r, K], bias_shard_n [N_r]       -> h_shard_n [..., N_r]
                    h = gelu(x @ W.T + b)                                   (column stage, no collective)
    linear_partial  x_shard_k [..., K_r], weight_shard_k [N, K_r], bias [N] -> partial [..., N]
                    p = x @ W.T (+ b + residual on the owner rank only)     (row stage, then all-reduce)
    mlp_shard       both: x [..., K], w1 [H_r, K], w2 [N, H_r]              -> partial [..., N]

Gradients, with z = x @ W.T + b the pre-activation and act' its derivative (identity: 1):

    dZ      dZ = dY * act'(z), db = sum_M dZ   one elementwise pass (db: per-row-block sums, then summed)
    dgrad   dX = dZ @ W                        a plain GEMM
    wgrad   dW = dZ.T @ X                      a plain GEMM
    mlp     dZ1 = (dY @ W2) * act'(z1)         one GEMM with the dGELU epilogue: no separate pass

The forward stores z (in x's dtype, as eager autograd does) only when a gradient is needed: re-reading
M x N values in the backward is far cheaper than recomputing the 2 M N K flops of x @ W.T.

Backends (`backend=`): "triton" (these kernels: CUDA tensors, or CPU tensors under the interpreter when
TRITON_INTERPRET=1 was set before triton was imported), "cublaslt" and "cpu" (the native extension
`tpkernels._C`, where built), "eager" (`tpkernels.reference`); "auto" picks by `_auto_backend`.
"""
import contextlib
import functools
import importlib.util
import inspect
import json
import math
import os
from typing import Optional

import torch
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from tpkernels import reference
from tpkernels.kernels import (
    DGELU_BLOCK_M,
    DGELU_BLOCK_N,
    DGELU_NUM_WARPS,
    GELU,
    GELU_TANH,
    IDENTITY,
    INTERPRETED,
    INTERPRETER_CONFIG,
    TMA_CONFIGS,
    MatmulConfig,
    _dgelu_kernel,
    _matmul_kernel,
    _matmul_tma_persistent_kernel,
    matmul_configs,
    prune,
)

__all__ = ["BACKENDS", "MatmulConfig", "backends", "linear_gelu", "linear_partial", "mlp_shard", "pin_config",
           "sync_autotuning", "use_matmul_kernel"]

try:  # the native extension registers tpkernels::epilogue_linear(_backward) for CPU (and CUDA if built)
    from tpkernels import _C  # noqa: F401

    _EXTENSION_ERROR = None
except ImportError as _error:
    _C = None
    if importlib.util.find_spec("tpkernels._C") is None:
        _EXTENSION_ERROR = ("no tpkernels._C in the install: build it with `pip install --no-build-isolation -e .` "
                            "(`-v` shows why a build failed; TPKERNELS_BUILD_EXT=1 makes it an error)")
    else:
        _EXTENSION_ERROR = f"{type(_error).__name__}: {_error}"

_APPROXIMATE = {"none": GELU, "tanh": GELU_TANH}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_LIMIT = 2**31
_pinned_config = None
_MATMUL_KERNELS = ("auto", "pointer", "tma")
_matmul_kernel_choice = "auto"


# ---------------------------------------------------------------------------------------------------
# Launchers


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


@contextlib.contextmanager
def use_matmul_kernel(kernel):
    """Run every matmul inside the block on one kernel: "auto" (the persistent TMA kernel on Hopper where
    the operands allow it, the pointer kernel elsewhere), "pointer", or "tma" (wherever the operands
    allow it, the interpreter included). For tests and benchmarks.

    Args:
        kernel: "auto", "pointer" or "tma".
    """
    global _matmul_kernel_choice
    if kernel not in _MATMUL_KERNELS:
        raise ValueError(f"use_matmul_kernel: kernel must be one of {', '.join(_MATMUL_KERNELS)}, got {kernel!r}")
    previous, _matmul_kernel_choice = _matmul_kernel_choice, kernel
    try:
        yield
    finally:
        _matmul_kernel_choice = previous


def _bucket(n):
    # Autotune keys on powers of two, so a new sequence length reuses the tuning of its bucket.
    return 1 << (max(n, 1) - 1).bit_length()


_AUTOTUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "ACTIVATION", "GRAD_ACTIVATION", "HAS_RESIDUAL", "STORE_PREACT"]


def _device_shared_memory(device_index):
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _matmul_config(triton_config):
    kw = triton_config.kwargs
    return MatmulConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], triton_config.num_warps,
                        triton_config.num_stages, kw["EPILOGUE_SUBTILE"])


def _pruner(operand, store_operand=None):
    """An early_config_prune that keeps the configs fitting the device's shared memory (`prune`)."""

    def early_config_prune(configs, named_args, **kwargs):
        a = named_args[operand]
        a = getattr(a, "base", a)  # a TensorDescriptor holds its tensor as .base
        store = getattr(named_args[store_operand], "base", None) if store_operand else None
        grad_activation = kwargs.get("GRAD_ACTIVATION", named_args.get("GRAD_ACTIVATION", IDENTITY)) != IDENTITY
        kept = prune([_matmul_config(c) for c in configs], a.element_size(), _device_shared_memory(a.device.index),
                     store_element_size=0 if store is None else store.element_size(),
                     grad_activation=grad_activation)
        return [c for c in configs if _matmul_config(c) in kept]

    return early_config_prune


# Every autotuner this process made, by name, for `sync_autotuning`.
_AUTOTUNERS = {}
_AUTOTUNE_CAN_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


def _autotune(name, kernel, **options):
    # Tuned configs persist across runs in triton's cache, keyed by the kernel, triton's version, the
    # device and the autotune key (TPKERNELS_AUTOTUNE_CACHE=0 turns that off).
    if _AUTOTUNE_CAN_CACHE:
        options["cache_results"] = os.environ.get("TPKERNELS_AUTOTUNE_CACHE", "1") != "0"
    tuner = triton.autotune(key=_AUTOTUNE_KEY, **options)(kernel)
    _AUTOTUNERS[name] = tuner
    return tuner


@functools.cache
def _autotuned_pointer_kernel(capability):
    return _autotune(
        f"matmul-sm{capability[0]}{capability[1]}", _matmul_kernel,
        configs=[c.to_triton() for c in matmul_configs(capability)],
        prune_configs_by={"early_config_prune": _pruner("a_ptr")},
        # The output may be the residual itself (in-place add); tuning runs must not compound it.
        restore_value=["c_ptr"],
    )


def _set_block_shapes(nargs):
    # Descriptors are built before the autotuner picks a tile; each config sets their block shapes.
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bk, bm] if nargs["A_TRANS"] else [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_TRANS"] else [bk, bn]
    slices = min(4, nargs["EPILOGUE_SUBTILE"] * 2) if nargs["GRAD_ACTIVATION"] else nargs["EPILOGUE_SUBTILE"]
    nargs["c_desc"].block_shape = [bm, bn // slices]


@functools.cache
def _autotuned_tma_kernel():
    return _autotune(
        "matmul-tma", _matmul_tma_persistent_kernel,
        configs=[c.to_triton(pre_hook=_set_block_shapes) for c in TMA_CONFIGS],
        prune_configs_by={"early_config_prune": _pruner("a_desc", store_operand="c_desc")},
    )


def _config_identity(config):
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def sync_autotuning(process_group=None):
    """Make every rank of the group use rank 0's autotuned configs (a collective: call it on every rank).

    The autotuner times configs on each rank, and ranks may pick differently; a different tile sums in a
    different order, so replicated results (the row bias's gradient, say) would differ in their last
    bits. Call this after a warm-up step, which tunes every shape the model uses: each rank then takes
    rank 0's config for every shape rank 0 has tuned. Tuned configs also persist across runs in
    triton's cache (`TPKERNELS_AUTOTUNE_CACHE=0` turns that off).

    Args:
        process_group: the tensor-parallel group; None is the default group.

    Returns:
        The number of (kernel, shape) entries taken from rank 0.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_world_size(group) == 1:
        return 0
    entries = [[(name, key, _config_identity(config)) for name, tuner in sorted(_AUTOTUNERS.items())
                for key, config in tuner.cache.items()]]
    dist.broadcast_object_list(entries, src=dist.get_global_rank(group, 0), group=group)
    taken = 0
    for name, key, identity in entries[0]:
        tuner = _AUTOTUNERS.get(name)
        if tuner is None:  # rank 0 ran a kernel this rank has not: make its autotuner now
            if name == "matmul-tma":
                tuner = _autotuned_tma_kernel()
            else:
                tuner = _autotuned_pointer_kernel((int(name[-2]), int(name[-1])))
        config = next((c for c in tuner.configs if _config_identity(c) == identity), None)
        if config is None:
            raise RuntimeError(f"sync_autotuning: rank 0's config {identity} for {name} is not among this rank's; "
                               f"every rank must run the same tpkernels and triton")
        tuner.cache[key] = config
        taken += 1
    return taken


@functools.cache
def _capability(device_index):
    return torch.cuda.get_device_capability(device_index)


def _is_hopper(device_index):
    return _capability(device_index)[0] == 9


@functools.cache
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _last_offset(t):
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)


def _needs_int64(tensors):
    # Offsets need 64 bits once an operand spans 2**31 elements. Spans are bounded by storage sizes,
    # which are cheap to read, so the exact offset is computed only for the rare huge operand.
    return any(t.untyped_storage().nbytes() >= _INT32_LIMIT * t.element_size() and _last_offset(t) >= _INT32_LIMIT
               for t in tensors)


def _strides(t):
    return (0, 0) if t is None else t.stride()


def _tma_layout(t):
    """How a TMA descriptor can cover the 2-D view t: "rows" (unit column stride), "cols" (unit row
    stride: the descriptor covers t.T), or None (misaligned base or stride, or no unit stride)."""
    size = t.element_size()
    if t.data_ptr() % 16:
        return None
    if t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0:
        return "rows"
    if t.stride(0) == 1 and (t.stride(1) * size) % 16 == 0:
        return "cols"
    return None


# "auto" launches the persistent TMA kernel only above this many rows. Measured on an H200 (bf16 column
# forward, K = 4096; benchmarks/results/NVIDIA-H200-2026-11-25-kernel-choice.jsonl): at M <= 64 its
# 128-row tiles leave it 1.4 to 2.2x slower than the pointer kernel's small-M configs, at M = 128 they
# tie, and from M = 256 up the TMA kernel is 2 to 15% faster.
_TMA_MIN_M = 128


def _use_tma(a, b, c, residual):
    if _matmul_kernel_choice == "pointer" or a.dtype not in (torch.float16, torch.bfloat16) or c.dtype != a.dtype:
        return False
    if _matmul_kernel_choice == "auto" and not (a.is_cuda and not INTERPRETED and _is_hopper(a.device.index)
                                                and a.shape[0] > _TMA_MIN_M):
        return False
    if residual is not None and residual.untyped_storage().data_ptr() == c.untyped_storage().data_ptr():
        return False  # in place (out=residual): the autotuner must restore c, which a descriptor hides
    return _tma_layout(a) is not None and _tma_layout(b) is not None and _tma_layout(c) == "rows"


def _launch(a, b, c, *, bias=None, residual=None, preact=None, z=None, activation=IDENTITY,
            grad_activation=IDENTITY):
    """c = act(a @ b + bias) * act'(z) + residual, for strided views a [M, K], b [K, N], c [M, N].

    `preact` [M, N] receives a @ b + bias; `z` [M, N] is the pre-activation whose derivative scales the
    product (the dGELU epilogue). a and b share one dtype.
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    assert a.dtype == b.dtype, f"_launch: operands {a.dtype} and {b.dtype}"
    operands = [t for t in (a, b, c, residual, preact, z) if t is not None]
    tf32 = a.is_cuda and torch.backends.cuda.matmul.allow_tf32
    meta = dict(
        ACTIVATION=activation,
        GRAD_ACTIVATION=grad_activation,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        STORE_PREACT=preact is not None,
        INPUT_PRECISION="ieee" if b.dtype == torch.float32 and not tf32 else "tf32",
        INT64_OFFSETS=_needs_int64(operands),
        EMULATE_BF16=INTERPRETED and b.dtype == torch.bfloat16,
    )
    epilogue = (*(c if t is None else t for t in (bias, residual, preact, z)),)
    sizes = (M, N, K, _bucket(M), _bucket(N), _bucket(K))
    config = _pinned_config or (None if a.is_cuda and not INTERPRETED else INTERPRETER_CONFIG)
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        if _use_tma(a, b, c, residual):
            _launch_tma(a, b, c, epilogue, sizes, residual, preact, z, meta, config)
            return
        args = (a, b, c, *epilogue, *sizes,
                *a.stride(), *b.stride(), *c.stride(), *_strides(residual), *_strides(preact), *_strides(z))

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        if config is None:
            _autotuned_pointer_kernel(_capability(a.device.index))[grid](*args, **meta)
        else:
            _matmul_kernel[grid](*args, **meta, **config.kwargs(), num_warps=config.num_warps,
                                 num_stages=config.num_stages)


def _launch_tma(a, b, c, epilogue, sizes, residual, preact, z, meta, config):
    a_trans = _tma_layout(a) == "cols"
    b_trans = _tma_layout(b) == "cols"
    # Placeholder block shapes: the config (a pre_hook when autotuning) sets the real ones.
    a_desc = TensorDescriptor.from_tensor(a.t() if a_trans else a, [1, 1])
    b_desc = TensorDescriptor.from_tensor(b.t() if b_trans else b, [1, 1])
    c_desc = TensorDescriptor.from_tensor(c, [1, 1])
    num_sms = _num_sms(a.device.index) if a.is_cuda else 4
    M, N = sizes[0], sizes[1]
    args = (a_desc, b_desc, c_desc, *epilogue, *sizes, *_strides(residual), *_strides(preact), *_strides(z))
    meta = dict(meta, A_TRANS=a_trans, B_TRANS=b_trans, NUM_SMS=num_sms)

    def grid(meta):
        return (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    if config is None:
        _autotuned_tma_kernel()[grid](*args, **meta)
        return
    _set_block_shapes(dict(a_desc=a_desc, b_desc=b_desc, c_desc=c_desc, **meta, **config.kwargs()))
    _matmul_tma_persistent_kernel[grid](*args, **meta, **config.kwargs(), num_warps=config.num_warps,
                                        num_stages=config.num_stages)


def _dgelu(grad, z, activation, need_db):
    """(dZ, db): dZ = grad * act'(z) in z's dtype, and db = its column sums (fp32 per row block, then
    summed), from one elementwise pass; db is None unless `need_db`."""
    M, N = grad.shape
    dz = torch.empty((M, N), dtype=z.dtype, device=z.device)
    row_blocks = triton.cdiv(M, DGELU_BLOCK_M)
    colsum = torch.empty((row_blocks, N), dtype=torch.float32, device=z.device) if need_db else dz
    if M and N:
        operands = (grad, z, dz)
        grid = (row_blocks, triton.cdiv(N, DGELU_BLOCK_N))
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            _dgelu_kernel[grid](
                grad, z, dz, colsum, M, N, *grad.stride(), *z.stride(), *dz.stride(),
                GRAD_ACTIVATION=activation, STORE_COLSUM=need_db,
                INT64_OFFSETS=_needs_int64(operands),
                EMULATE_BF16=INTERPRETED and z.dtype == torch.bfloat16,
                BLOCK_M=DGELU_BLOCK_M, BLOCK_N=DGELU_BLOCK_N, num_warps=DGELU_NUM_WARPS,
            )
    if not need_db:
        return dz, None
    db = colsum.sum(0) if M else torch.zeros(N, dtype=torch.float32, device=z.device)
    return dz, db


def _runs_triton(t):
    return t.is_cuda or (t.device.type == "cpu" and INTERPRETED)


# ---------------------------------------------------------------------------------------------------
# Custom ops (2-D, checked inputs; the public functions below check and reshape)


def _fused_linear_impl(
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


_fused_linear = torch.library.custom_op("tpkernels::fused_linear", mutates_args=())(_fused_linear_impl)


@_fused_linear.register_fake
def _fused_linear_fake(x, weight, bias, residual, activation, owner, out_dtype, store_preact):
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
    """(dX, dW, db) of `fused_linear`, each empty when not needed: dZ = dY * act'(z) and db in one
    elementwise pass (or db as a reduction of dY), then dX = dZ @ W and dW = dZ.T @ X as plain GEMMs."""
    if not _runs_triton(x):
        grads = reference.fused_linear_backward(grad, x, weight, preact, activation, need_dx, need_dw, need_db)
        return tuple(x.new_empty(0) if g is None else g for g in grads)
    # Outputs of a custom op may not alias each other: one empty tensor each.
    dx, dw, db = (x.new_empty(0) for _ in range(3))
    # fp32 partials come back as an fp32 gradient: db sums it as it is, the GEMMs run in x's dtype.
    if activation != IDENTITY:
        dz, db32 = _dgelu(grad, preact, activation, need_db)
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
        _launch(dz, weight, dx)
    if need_dw:
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
        _launch(dz.t(), x, dw)
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


if _C is not None:
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


def _mlp_shard_impl(
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
        h, z = torch.ops.tpkernels.epilogue_linear(x, w1, b1, None, activation, True, x.dtype, store_for_backward)
        out, _ = torch.ops.tpkernels.epilogue_linear(h, w2, b2, residual, IDENTITY, owner, out_dtype, False)
        return out, (h if store_for_backward else x.new_empty(0)), z
    if not _runs_triton(x):
        return reference.mlp_shard(x, w1, b1, w2, b2, residual, activation, owner, out_dtype, store_for_backward)
    h = torch.empty((x.shape[0], w1.shape[0]), dtype=x.dtype, device=x.device)
    z = torch.empty_like(h) if store_for_backward else x.new_empty(0)
    _launch(x, w1.t(), h, bias=None if b1 is None else b1.contiguous(), preact=z if store_for_backward else None,
            activation=activation)
    out = torch.empty((x.shape[0], w2.shape[0]), dtype=out_dtype, device=x.device)
    _launch(h, w2.t(), out, bias=b2.contiguous() if owner and b2 is not None else None,
            residual=residual if owner else None)
    return out, (h if store_for_backward else x.new_empty(0)), z


_mlp_shard = torch.library.custom_op("tpkernels::mlp_shard", mutates_args=())(_mlp_shard_impl)


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
    if not _runs_triton(x):
        grads = reference.mlp_shard_backward(grad, x, w1, w2, h, z, activation, needs)
        return tuple(x.new_empty(0) if g is None else g for g in grads)
    dx, dw1, db1, dw2, db2 = (x.new_empty(0) for _ in range(5))
    if need_db2:
        db2 = grad.sum(0, dtype=torch.float32).to(x.dtype)
    grad = grad.to(x.dtype)  # an fp32 gradient of fp32 partials: the GEMMs run in x's dtype
    if need_dw2:
        dw2 = torch.empty_like(w2, memory_format=torch.contiguous_format)
        _launch(grad.t(), h, dw2)
    if need_dx or need_dw1 or need_db1:
        dz = torch.empty_like(z, memory_format=torch.contiguous_format)
        _launch(grad, w2, dz, z=z, grad_activation=activation)
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


# ---------------------------------------------------------------------------------------------------
# Backends

BACKENDS = ("auto", "triton", "cublaslt", "cpu", "eager")
_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_table.json")


with open(_TABLE_PATH) as _table_file:
    _BACKEND_TABLE = json.load(_table_file)
# Read once: torch.compile traces the backend choice, and a dispatcher query would break its graph.
_EXTENSION_KERNELS = {
    device: _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("tpkernels::epilogue_linear", key)
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def _backend_table():
    return _BACKEND_TABLE


def _extension_has(device_type):
    """Whether the native extension has kernels for this device type ("cpu" or "cuda")."""
    return _EXTENSION_KERNELS.get(device_type, False)


def _auto_backend(device_type, dtype, M, N, K, activation):
    """What backend="auto" runs: the committed table's first matching rule on CUDA, else the CPU order.
    A pure function of the shape, the dtype and the build, so every rank of a group chooses alike."""
    if device_type == "cpu":
        if INTERPRETED:
            return "triton"  # how the CPU tests reach the Triton code
        return "cpu" if _extension_has("cpu") else "eager"
    if device_type != "cuda":
        return "eager"
    for rule in _backend_table()["rules"]:
        if (str(dtype).replace("torch.", "") in rule.get("dtypes", [str(dtype).replace("torch.", "")])
                and activation in rule.get("activations", [activation])
                and rule.get("min_m", 0) <= M and M <= rule.get("max_m", M)):
            backend = rule["backend"]
            if backend == "cublaslt" and not _extension_has("cuda"):
                continue
            return backend
    return "triton"


def _resolve_backend(name, backend, x, N, K, activation):
    """The backend a call runs on, after checking that the one asked for can run it."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    M = math.prod(x.shape[:-1])
    if backend == "auto":
        return _auto_backend(x.device.type, x.dtype, M, N, K, activation)
    if backend == "cpu" and not (x.device.type == "cpu" and _extension_has("cpu")):
        raise ValueError(f"{name}: backend='cpu' needs CPU tensors (x is on {x.device}) and the native extension "
                         f"({_extension_status()}); see tpkernels.backends()")
    if backend == "cublaslt":
        if not (x.is_cuda and _extension_has("cuda")):
            raise ValueError(f"{name}: backend='cublaslt' needs CUDA tensors (x is on {x.device}) and the "
                             f"extension's CUDA part ({_extension_status()}); see tpkernels.backends()")
        if activation == GELU:
            raise ValueError(f"{name}: backend='cublaslt' has only the tanh GELU; pass approximate='tanh' or "
                             f"another backend (exact GELU runs on triton)")
    if backend == "triton" and not _runs_triton(x):
        raise ValueError(f"{name}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                         f"before triton is imported; x is on {x.device}")
    return backend


def _extension_status():
    if _C is None:
        return f"not built or not importable: {_EXTENSION_ERROR}"
    parts = [kind for kind in ("cpu", "cuda") if _extension_has(kind)]
    return "built for " + " and ".join(parts)


def backends():
    """What was built and what each op runs by default.

    Returns:
        {"extension": status, "triton": status, "table": the auto table's source, "auto": {device:
        {op: backend}}} for a bf16 call with M=4096 (CUDA) and an fp32 call (CPU).
    """
    devices = {"cpu": torch.float32}
    if torch.cuda.is_available():
        devices["cuda"] = torch.bfloat16
    auto = {}
    for device, dtype in devices.items():
        auto[device] = {
            "linear_gelu (exact)": _auto_backend(device, dtype, 4096, 4096, 4096, GELU),
            "linear_gelu (tanh)": _auto_backend(device, dtype, 4096, 4096, 4096, GELU_TANH),
            "linear_partial": _auto_backend(device, dtype, 4096, 4096, 4096, IDENTITY),
        }
    return {
        "extension": _extension_status(),
        "triton": f"{triton.__version__}" + (" (interpreter: TRITON_INTERPRET=1)" if INTERPRETED else ""),
        "table": _backend_table()["source"],
        "auto": auto,
    }


def _linear(name, x, weight, bias, residual, activation, owner, out_dtype, backend):
    """The one dispatch point of linear_gelu and linear_partial (2-D x): returns act(x @ W.T + b) + r."""
    N, K = weight.shape
    chosen = _resolve_backend(name, backend, x, N, K, activation)
    store = _needs_grad(x, weight, bias, residual)
    if chosen == "eager":
        return reference.fused_linear(x, weight, bias, residual, activation, owner, out_dtype, False)[0]
    if chosen == "triton" and not store and _direct_call_ok(x, weight, bias, residual):
        return _fused_linear_impl(x, weight, bias, residual, activation, owner, out_dtype, False)[0]
    op = torch.ops.tpkernels.fused_linear if chosen == "triton" else torch.ops.tpkernels.epilogue_linear
    return op(x, weight, bias, residual, activation, owner, out_dtype, store)[0]


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


def _direct_call_ok(*tensors):
    """Whether an inference call may run a custom op's Python implementation directly, skipping the
    dispatcher: not under torch.compile, export, a dispatch or function mode (FakeTensor, FlopCounter)
    or a functorch transform, and only plain tensors. The dispatcher costs about half of a call's host
    time (benchmarks/NOTES.md, "Host overhead"); everything that traces or transforms still sees the op."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    return all(t is None or (type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t))
               for t in tensors)


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
            does not support autograd. Runs on the Triton kernel (or eager on a CPU without the interpreter).
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
    torch.ops.tpkernels.fused_linear_out(
        _rows(x), weight, bias, None if residual is None else _rows(residual), owner, out_rows
    )
    return out


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
    _check_linear(name, x.new_empty((0, w1.shape[0])), w2, b2)  # w2 and b2 against the hidden width
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
    chosen = _resolve_backend(name, backend, x, w1.shape[0], w1.shape[1], _APPROXIMATE[approximate])
    if chosen == "eager":
        h = reference.linear_gelu(x, w1, b1, approximate)
        return reference.linear_partial(h, w2, b2, residual=residual, owner=owner, out_dtype=out_dtype)
    store = _needs_grad(x, w1, b1, w2, b2, residual)
    args = (_rows(x), w1, b1, w2, b2, None if residual is None else _rows(residual), _APPROXIMATE[approximate],
            bool(owner), out_dtype, store, chosen != "triton")
    if not store and _direct_call_ok(x, w1, b1, w2, b2, residual):
        out, _, _ = _mlp_shard_impl(*args)
    else:
        out, _, _ = torch.ops.tpkernels.mlp_shard(*args)
    return out.view(out_shape)

