"""Launching the matmul family on strided 2-D views: kernel and config choice, autotuning, and the
autotuners' sync across ranks. No `torch.library` here (`custom_ops` wraps these) and no input checks
(the public functions in `ops` check before anything launches).

    matmul(a, b, c, ...)   c = act(a @ b + bias) * act'(z) + residual    a [M, K], b [K, N], c [M, N]
    dgelu(grad, z, ...)    dZ = dY * act'(z), and db = the column sums of dZ, in one elementwise pass

Kernel choice: the persistent TMA kernel (`kernels.matmul_tma`) on Hopper for 16-bit operands and
output whose views a descriptor can cover, above `TMA_MIN_M` rows; the pointer kernel otherwise. GPU
launches autotune (one autotuner per kernel kind and compute capability, keyed on power-of-two size
buckets); the interpreter runs `INTERPRETER_CONFIG`. `pin_config` and `use_matmul_kernel` change that
for a block: they are context variables, so each thread and asyncio task sees its own setting.
"""
import contextlib
import contextvars
import functools
import inspect
import os
import threading

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from tpkernels.kernels import (
    DGELU_BLOCK_M,
    DGELU_BLOCK_N,
    DGELU_NUM_WARPS,
    IDENTITY,
    INTERPRETED,
    INTERPRETER_CONFIG,
    TMA_CONFIGS,
    MatmulConfig,
    _dgelu_kernel,
    _matmul_kernel,
    _matmul_tma_persistent_kernel,
    epilogue_slices,
    matmul_configs,
    prune,
)

__all__ = ["MATMUL_KERNELS", "autotuner", "dgelu", "matmul", "pin_config", "record_launches", "runs_triton",
           "sync_autotuning", "use_matmul_kernel", "use_tma"]

INT32_LIMIT = 2**31
MATMUL_KERNELS = ("auto", "pointer", "tma")
_PINNED_CONFIG = contextvars.ContextVar("tpkernels_pinned_config", default=None)
_MATMUL_KERNEL = contextvars.ContextVar("tpkernels_matmul_kernel", default="auto")
_RECORDED = contextvars.ContextVar("tpkernels_recorded_launches", default=None)

# "auto" launches the persistent TMA kernel only above this many rows. Measured on an H200 (bf16 column
# forward, K = 4096; benchmarks/results/NVIDIA-H200-2026-11-25-kernel-choice.jsonl):
# at M <= 64 its 128-row tiles left it 1.4 to 2.2x slower than the pointer kernel's small-M configs, at
# M = 128 they tied, and from M = 256 up the TMA kernel was 2 to 15% faster (one pass, no noise bands).
TMA_MIN_M = 128


@contextlib.contextmanager
def _setting(var, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def pin_config(config):
    """Launch every kernel inside the block with one `MatmulConfig` instead of autotuning.

    Args:
        config: a `tpkernels.MatmulConfig`, e.g. one of `tpkernels.kernels.GPU_CONFIGS`.
    """
    if not isinstance(config, MatmulConfig):
        raise TypeError(f"pin_config takes a tpkernels.MatmulConfig, got {type(config).__name__}")
    return _setting(_PINNED_CONFIG, config)


def use_matmul_kernel(kernel):
    """Run every matmul inside the block on one kernel: "auto" (the persistent TMA kernel on Hopper where
    the operands allow it, the pointer kernel elsewhere), "pointer", or "tma" (wherever the operands
    allow it, the interpreter included). For tests and benchmarks.

    Args:
        kernel: "auto", "pointer" or "tma".
    """
    if kernel not in MATMUL_KERNELS:
        raise ValueError(f"use_matmul_kernel: kernel must be one of {', '.join(MATMUL_KERNELS)}, got {kernel!r}")
    return _setting(_MATMUL_KERNEL, kernel)


@contextlib.contextmanager
def record_launches():
    """Collect, inside the block, one line per kernel launched: the kernel ("pointer", "tma", "dgelu") and
    the config it ran (the autotuner's pick, or the pinned one). For benchmarks: what a row measured."""
    launches = []
    token = _RECORDED.set(launches)
    try:
        yield launches
    finally:
        _RECORDED.reset(token)


def _record(kind, config):
    launches = _RECORDED.get()
    if launches is not None:
        if not isinstance(config, MatmulConfig):  # an autotuner: the config it picked for this launch
            config = getattr(config, "best_config", None)
            config = None if config is None else MatmulConfig.from_triton(config)
        launches.append(kind if config is None else
                        f"{kind} {config.block_m}x{config.block_n}x{config.block_k} warps={config.num_warps} "
                        f"stages={config.num_stages} subtile={config.epilogue_subtile}")


# ---------------------------------------------------------------------------------------------------
# Autotuning


def _bucket(n):
    # Autotune keys on powers of two, so a new sequence length reuses the tuning of its bucket.
    return 1 << (max(n, 1) - 1).bit_length()


AUTOTUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "ACTIVATION", "GRAD_ACTIVATION", "HAS_RESIDUAL", "STORE_PREACT"]
_AUTOTUNE_CAN_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


def device_shared_memory(device_index):
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def pruner(operand, store_operand=None):
    """An early_config_prune that keeps the configs fitting the device's shared memory (`prune`)."""

    def early_config_prune(configs, named_args, **kwargs):
        a = named_args[operand]
        a = getattr(a, "base", a)  # a TensorDescriptor holds its tensor as .base
        store = getattr(named_args[store_operand], "base", None) if store_operand else None
        grad_activation = kwargs.get("GRAD_ACTIVATION", named_args.get("GRAD_ACTIVATION", IDENTITY)) != IDENTITY
        kept = prune([MatmulConfig.from_triton(c) for c in configs], a.element_size(),
                     device_shared_memory(a.device.index),
                     store_element_size=0 if store is None else store.element_size(), grad_activation=grad_activation)
        return [c for c in configs if MatmulConfig.from_triton(c) in kept]

    return early_config_prune


def make_autotuner(kernel, **options):
    # Tuned configs persist across runs in triton's cache, keyed by the kernel, triton's version, the
    # device and the autotune key (TPKERNELS_AUTOTUNE_CACHE=0 turns that off).
    if _AUTOTUNE_CAN_CACHE:
        options["cache_results"] = os.environ.get("TPKERNELS_AUTOTUNE_CACHE", "1") != "0"
    return triton.autotune(key=AUTOTUNE_KEY, **options)(kernel)


def _set_block_shapes(nargs):
    # Descriptors are built before the autotuner picks a tile; each config sets their block shapes.
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bk, bm] if nargs["A_TRANS"] else [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_TRANS"] else [bk, bn]
    slices = epilogue_slices(nargs["EPILOGUE_SUBTILE"], nargs["GRAD_ACTIVATION"] != IDENTITY)
    nargs["c_desc"].block_shape = [bm, bn // slices]


# Every autotuner this process made, by (kernel kind, compute capability): what `sync_autotuning` sends.
AUTOTUNERS = {}
_AUTOTUNERS_LOCK = threading.Lock()


def autotuner(kind, capability):
    """The autotuned kernel of this kind ("pointer" or "tma") for devices of this compute capability."""
    key = (kind, tuple(capability))
    with _AUTOTUNERS_LOCK:
        if key not in AUTOTUNERS:
            if kind == "pointer":
                AUTOTUNERS[key] = make_autotuner(
                    _matmul_kernel, configs=[c.to_triton() for c in matmul_configs(key[1])],
                    prune_configs_by={"early_config_prune": pruner("a_ptr")},
                    # The output may be the residual itself (in-place add); tuning runs must not compound it.
                    restore_value=["c_ptr"])
            elif kind == "tma":
                AUTOTUNERS[key] = make_autotuner(
                    _matmul_tma_persistent_kernel, configs=[c.to_triton(pre_hook=_set_block_shapes) for c in TMA_CONFIGS],
                    prune_configs_by={"early_config_prune": pruner("a_desc", store_operand="c_desc")})
            else:
                raise ValueError(f"autotuner: kind must be 'pointer' or 'tma', got {kind!r}")
        return AUTOTUNERS[key]


def config_identity(config):
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
    with _AUTOTUNERS_LOCK:
        mine = sorted(AUTOTUNERS.items())
    entries = [[(kind_capability, key, config_identity(config)) for kind_capability, tuner in mine
                for key, config in tuner.cache.items()]]
    dist.broadcast_object_list(entries, src=dist.get_global_rank(group, 0), group=group)
    for (kind, capability), key, identity in entries[0]:
        tuner = autotuner(kind, capability)  # made here if rank 0 ran a kernel this rank has not
        config = next((c for c in tuner.configs if config_identity(c) == identity), None)
        if config is None:
            raise RuntimeError(f"sync_autotuning: rank 0's config {identity} for the {kind} kernel on sm_"
                               f"{capability[0]}{capability[1]} is not among this rank's; every rank must run "
                               f"the same tpkernels and triton")
        tuner.cache[key] = config
    return len(entries[0])


# ---------------------------------------------------------------------------------------------------
# Devices and layouts


@functools.cache
def device_capability(device_index):
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def runs_triton(t):
    """Whether the Triton kernels can run on t's device: CUDA, or CPU under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and INTERPRETED)


def last_offset(t):
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)


def _needs_int64(tensors):
    # Offsets need 64 bits once an operand spans 2**31 elements. Spans are bounded by storage sizes,
    # which are cheap to read, so the exact offset is computed only for the rare huge operand.
    return any(t.untyped_storage().nbytes() >= INT32_LIMIT * t.element_size() and last_offset(t) >= INT32_LIMIT
               for t in tensors)


def _strides(t):
    return (0, 0) if t is None else t.stride()


def tma_layout(t):
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


def use_tma(a, b, c, residual):
    """Whether `matmul` runs the persistent TMA kernel for these operands."""
    choice = _MATMUL_KERNEL.get()
    if choice == "pointer" or a.dtype not in (torch.float16, torch.bfloat16) or c.dtype != a.dtype:
        return False
    if choice == "auto" and not (a.is_cuda and not INTERPRETED and device_capability(a.device.index)[0] == 9
                                 and a.shape[0] > TMA_MIN_M):
        return False
    if residual is not None and residual.untyped_storage().data_ptr() == c.untyped_storage().data_ptr():
        return False  # in place (out=residual): the autotuner must restore c, which a descriptor hides
    return tma_layout(a) is not None and tma_layout(b) is not None and tma_layout(c) == "rows"


# ---------------------------------------------------------------------------------------------------
# Launchers


def matmul(a, b, c, *, bias=None, residual=None, preact=None, z=None, activation=IDENTITY, grad_activation=IDENTITY):
    """c = act(a @ b + bias) * act'(z) + residual, for strided views a [M, K], b [K, N], c [M, N].

    `preact` [M, N] receives a @ b + bias; `z` [M, N] is the pre-activation whose derivative scales the
    product (the dGELU epilogue). a and b share one dtype.
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    assert a.dtype == b.dtype, f"matmul: operands {a.dtype} and {b.dtype}"
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
    # Absent epilogue operands are passed as c: a valid pointer the constexpr flags never read.
    epilogue = (*(c if t is None else t for t in (bias, residual, preact, z)),)
    sizes = (M, N, K, _bucket(M), _bucket(N), _bucket(K))
    config = _PINNED_CONFIG.get() or (None if a.is_cuda and not INTERPRETED else INTERPRETER_CONFIG)
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        if use_tma(a, b, c, residual):
            _matmul_tma(a, b, c, epilogue, sizes, residual, preact, z, meta, config)
            return
        args = (a, b, c, *epilogue, *sizes,
                *a.stride(), *b.stride(), *c.stride(), *_strides(residual), *_strides(preact), *_strides(z))

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        if config is None:
            config = autotuner("pointer", device_capability(a.device.index))  # _record reads its pick
            config[grid](*args, **meta)
        else:
            _matmul_kernel[grid](*args, **meta, **config.kwargs(), num_warps=config.num_warps,
                                 num_stages=config.num_stages)
        _record("pointer", config)


def _matmul_tma(a, b, c, epilogue, sizes, residual, preact, z, meta, config):
    a_trans = tma_layout(a) == "cols"
    b_trans = tma_layout(b) == "cols"
    # Placeholder block shapes: the config (a pre_hook when autotuning) sets the real ones.
    a_desc = TensorDescriptor.from_tensor(a.t() if a_trans else a, [1, 1])
    b_desc = TensorDescriptor.from_tensor(b.t() if b_trans else b, [1, 1])
    c_desc = TensorDescriptor.from_tensor(c, [1, 1])
    sms = num_sms(a.device.index) if a.is_cuda else 4
    M, N = sizes[0], sizes[1]
    args = (a_desc, b_desc, c_desc, *epilogue, *sizes, *_strides(residual), *_strides(preact), *_strides(z))
    meta = dict(meta, A_TRANS=a_trans, B_TRANS=b_trans, NUM_SMS=sms)

    def grid(meta):
        return (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    if config is None:
        config = autotuner("tma", device_capability(a.device.index))  # _record reads its pick
        config[grid](*args, **meta)
    else:
        _set_block_shapes(dict(a_desc=a_desc, b_desc=b_desc, c_desc=c_desc, **meta, **config.kwargs()))
        _matmul_tma_persistent_kernel[grid](*args, **meta, **config.kwargs(), num_warps=config.num_warps,
                                            num_stages=config.num_stages)
    _record("tma", config)


def dgelu(grad, z, activation, need_db):
    """(dZ, db): dZ = grad * act'(z) in z's dtype, and db = its column sums (fp32 per row block, then
    summed), from one elementwise pass; db is None unless `need_db`."""
    M, N = grad.shape
    dz = torch.empty((M, N), dtype=z.dtype, device=z.device)
    row_blocks = triton.cdiv(M, DGELU_BLOCK_M)
    colsum = torch.empty((row_blocks, N), dtype=torch.float32, device=z.device) if need_db else dz
    if M and N:
        grid = (row_blocks, triton.cdiv(N, DGELU_BLOCK_N))
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            _dgelu_kernel[grid](
                grad, z, dz, colsum, M, N, *grad.stride(), *z.stride(), *dz.stride(),
                GRAD_ACTIVATION=activation, STORE_COLSUM=need_db,
                INT64_OFFSETS=_needs_int64((grad, z, dz)),
                EMULATE_BF16=INTERPRETED and z.dtype == torch.bfloat16,
                BLOCK_M=DGELU_BLOCK_M, BLOCK_N=DGELU_BLOCK_N, num_warps=DGELU_NUM_WARPS,
            )
        _record(f"dgelu {DGELU_BLOCK_M}x{DGELU_BLOCK_N} warps={DGELU_NUM_WARPS}", None)
    if not need_db:
        return dz, None
    db = colsum.sum(0) if M else torch.zeros(N, dtype=torch.float32, device=z.device)
    return dz, db
