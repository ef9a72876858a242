"""Launching the matmul family on strided 2-D views: kernel and config choice, autotuning, and the
autotuners' sync across ranks. No `torch.library` here (`custom_ops` wraps these) and no input checks
(the public functions in `ops` check before anything launches).

    matmul(a, b, c, ...)   c = act(a @ b + bias) * act'(z) + residual    a [M, K], b [K, N], c [M, N]
    linear(x, w, out, ...) the same with b = w.T, without building the view on the hot path
    dgelu(grad, z, ...)    dZ = dY * act'(z), and db = the column sums of dZ, in one elementwise pass

Gated activations (`kernels.GLU` + act): `linear(x, gate, out, activation=GLU + act)` computes
act(x @ gate.T + b_gate) * (x @ up.T + b_up), where `gate` [F, K] is the first F rows of a [2F, K] weight
[gate; up] (up lies F rows further in memory, and so does the bias's up half), in one launch that reads
each x tile once for both; `matmul(dy, w2, dg, z=g, grad_activation=GLU + act)` writes dG into dg and dU F
columns further (dg and g: the first F columns of [M, 2F] tensors). The TMA kernel runs the gated forward
(its B descriptor covers the whole [2F, K]; one tile, `configs.GATED_TMA_TILES`); the gated gradient runs on
the pointer or split-K kernel.

Kernel choice (`kernel_for`): on a GPU, the kernel table's entry for the shape (`kernel_table.json`,
written by a GPU run), else the rule (`rule_kernel`): the split-K kernel (`kernels.matmul_splitk`) at
decode sizes, where one program per output tile would leave SMs idle; the persistent TMA kernel
(`kernels.matmul_tma`) on Hopper for 16-bit operands and output whose views a descriptor can cover,
above `TMA_MIN_M` rows; the pointer kernel otherwise. GPU launches autotune (one autotuner per kernel
kind and compute capability, keyed on power-of-two size buckets and the operand layout); the
interpreter runs `INTERPRETER_CONFIG`, and "auto" there always means the pointer kernel (tests choose
the others by name). `pin_config` and `use_matmul_kernel` change that for a block: they are context
variables, so each thread and asyncio task sees its own setting.

The hot path: the first call of a launch key (`bound.launch_key`: device, dtypes, shapes, strides, pointer
alignment, epilogue, the block's settings) takes the full path above and binds what it launched
(`bound.Bound`); later calls of the key go straight to the compiled kernel's launcher (for the TMA
kernel, with descriptors made per call from the operands and the block shapes the first call chose).
`precompiling` compiles instead of launching, for a benchmark's cold cache.
"""
import contextlib
import functools

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from tpkernels import autotune, bound, tables
from tpkernels.workspace import splitk_workspace
from tpkernels.autotune import AUTOTUNERS, autotuner, bucket, set_block_shapes
from tpkernels.kernels import (
    DGELU_BLOCK_M,
    DGELU_BLOCK_N,
    DGELU_NUM_WARPS,
    GLU,
    IDENTITY,
    INTERPRETED,
    INTERPRETER_CONFIG,
    MatmulConfig,
    _dgelu_kernel,
    _matmul_kernel,
    _matmul_splitk_kernel,
    _matmul_tma_persistent_kernel,
    split_k,
    splitk_configs,
)
from tpkernels.settings import (
    MATMUL_KERNEL,
    MATMUL_KERNELS,
    PINNED_CONFIG,
    PRECOMPILING,
    SPLITK_ORDER,
    picked,
    pin_config,
    precompiling,
    record,
    record_launches,
    splitk_order,
    use_matmul_kernel,
)

__all__ = ["AUTOTUNERS", "MATMUL_KERNELS", "autotuner", "dgelu", "kernel_for", "linear", "matmul", "pin_config",
           "precompiling", "record_launches", "runs_triton", "splitk_order", "sync_autotuning", "use_matmul_kernel",
           "use_tma"]

INT32_LIMIT = 2**31

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# "auto" launches the persistent TMA kernel only above this many rows. Measured on an H200 (bf16 column
# forward, K = 4096; benchmarks/results/NVIDIA-H200-2026-11-25-kernel-choice.jsonl):
# at M <= 64 its 128-row tiles left it 1.4 to 2.2x slower than the pointer kernel's small-M configs, at
# M = 128 they tied, and from M = 256 up the TMA kernel was 2 to 15% faster (one pass, no noise bands).
TMA_MIN_M = 128

# "auto" launches the split-K kernel when a grid of SPLITK_RULE_TILE tiles would not fill one wave of
# SMs and K holds at least SPLITK_MIN_K_TILES such K-tiles: at decode sizes the time is the weights'
# streaming, and an idle SM streams nothing. A rule from the arithmetic of the grid, not yet from a GPU
# table (benchmarks/NOTES.md holds its predictions).
SPLITK_RULE_TILE = (64, 64, 64)
SPLITK_MIN_K_TILES = 8
# fp8 GEMMs this long in K promote each K-tile's product into the fp32 accumulator (`kernels.matmul._dot`):
# Hopper's fp8 wgmma keeps fewer mantissa bits while it accumulates, and the error grows with K. The
# backward's wgrad sums over the tokens (K = M), so a training step of 4096 tokens or more promotes there too.
FP8_PROMOTE_K = 4096


def sync_autotuning(process_group=None):
    """Make every rank of the group use rank 0's autotuned configs (a collective: call it on every rank).

    See `autotune.sync_autotuning`; the launches bound so far, which hold this rank's own picks, are
    dropped, so the next call of each shape launches with rank 0's.

    Args:
        process_group: the tensor-parallel group; None is the default group.

    Returns:
        The number of (kernel, shape) entries taken from rank 0.
    """
    taken = autotune.sync_autotuning(process_group)
    bound.BOUND.clear()
    return taken


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
    return kernel_for(a, b, c, residual) == "tma"


def _tma_possible(a, b, c, residual):
    if a.dtype not in (torch.float16, torch.bfloat16) or c.dtype != a.dtype:
        return False
    if residual is not None and residual.untyped_storage().data_ptr() == c.untyped_storage().data_ptr():
        return False  # in place (out=residual): the autotuner must restore c, which a descriptor hides
    return tma_layout(a) is not None and tma_layout(b) is not None and tma_layout(c) == "rows"


def splitk_pays(m, n, k, programs):
    """The rule "auto" follows on a GPU: split K when a grid of SPLITK_RULE_TILE tiles leaves SMs idle
    (fewer tiles than `programs`, the SM count) and K has at least SPLITK_MIN_K_TILES of its K-tiles."""
    bm, bn, bk = SPLITK_RULE_TILE
    return triton.cdiv(m, bm) * triton.cdiv(n, bn) < programs and k >= SPLITK_MIN_K_TILES * bk


def rule_kernel(m, n, k, programs, capability, tma_possible):
    """The kernel the readable rule picks where the kernel table has no entry: split-K where
    `splitk_pays`, the TMA kernel on Hopper above TMA_MIN_M rows where its descriptors can cover the
    operands, the pointer kernel otherwise."""
    if splitk_pays(m, n, k, programs):
        return "splitk"
    if m > TMA_MIN_M and capability[0] == 9 and tma_possible:
        return "tma"
    return "pointer"


# kernel_table.json: the kernel a GPU run measured fastest, per (operand layout, dtype, M bucket, N, K),
# where its paired ratio band to each other kernel lay wholly below 1 and the rule picks another
# (`benchmarks/run.py --plan headline` writes it). Shapes it does not list follow `rule_kernel`.
KERNEL_TABLE = tables.load(tables.KERNEL_TABLE)
_KERNEL_CHOICES = tables.kernel_choices(KERNEL_TABLE)


def table_kernel(layout, dtype, m, n, k):
    """The kernel table's entry for this layout (`layout_code`), dtype and shape, or None."""
    return _KERNEL_CHOICES.get((layout, str(dtype).replace("torch.", ""), bucket(m), n, k))


def kernel_for(a, b, c, residual):
    """The kernel `matmul` runs for these operands: "tma", "splitk" or "pointer". "auto" on a GPU takes
    the kernel table's entry for the shape, else `rule_kernel`; under the interpreter, the pointer kernel."""
    choice = MATMUL_KERNEL.get()
    if choice == "splitk" or choice == "pointer":
        return choice
    if choice == "tma":
        return "tma" if _tma_possible(a, b, c, residual) else "pointer"
    if not a.is_cuda or INTERPRETED:
        return "pointer"
    M, K = a.shape
    N = b.shape[1]
    listed = table_kernel(layout_code(a, b), a.dtype, M, N, K)
    if listed == "tma":
        return "tma" if _tma_possible(a, b, c, residual) else "pointer"
    if listed is not None:
        return listed
    return rule_kernel(M, N, K, num_sms(a.device.index), device_capability(a.device.index),
                       _tma_possible(a, b, c, residual))


def layout_code(a, b):
    """The operands' layout for the autotune key: 0 row-major, 1 column-major, 2 neither, for a plus 3x
    for b (the forward x @ w.T is 0 + 3 * 1 = 3; dX = dZ @ w is 0)."""
    def one(t):
        return 0 if t.stride(1) == 1 else 1 if t.stride(0) == 1 else 2

    return one(a) + 3 * one(b)


# ---------------------------------------------------------------------------------------------------
# The split-K kernel's grid


def _splitk_extent(m, n, k, configs, programs):
    """(workspace elements, tiles) that every config among `configs` fits in."""
    elements = tiles = 0
    for config in configs:
        count = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        splits = split_k(m, n, k, config, programs)
        elements = max(elements, count * splits * config.block_m * config.block_n)
        tiles = max(tiles, count)
    return elements, tiles


# Programs a split-K grid aims at under the interpreter, which has no SMs: enough that test-sized
# shapes split.
INTERPRETER_PROGRAMS = 16


# ---------------------------------------------------------------------------------------------------
# Launchers


def matmul(a, b, c, *, bias=None, residual=None, preact=None, z=None, activation=IDENTITY, grad_activation=IDENTITY,
           scales=None):
    """c = act(a @ b + bias) * act'(z) + residual, for strided views a [M, K], b [K, N], c [M, N].

    `preact` [M, N] receives a @ b + bias; `z` [M, N] is the pre-activation whose derivative scales the
    product (the dGELU epilogue). a and b share one dtype (fp8 ones may mix e4m3 and e5m2).

    `scales` (fp8): None or (a_scale, b_scale, c_scale, amax), one-element fp32 tensors or None: the product
    times a_scale * b_scale (the operands' dequantizing scales) before the epilogue; c (fp8) stored times
    c_scale, saturated; amax raised to the largest |result| (before c_scale).

    The first call of a launch key (`bound.launch_key`) takes the full path: kernel choice, autotuning,
    triton's specialization and compile. It binds what it launched (`bound.Bound`), and later calls of the key
    go straight to the compiled kernel's launcher.
    """
    _launch(a, b, b.shape, b.stride(), False, c, bias, residual, preact, z, activation, grad_activation, scales)


def linear(x, weight, out, *, bias=None, residual=None, preact=None, activation=IDENTITY, scales=None):
    """out = act(x @ weight.T + bias) + residual: `matmul(x, weight.t(), out, ...)`, without building the
    transposed view on the bound path. x [M, K], weight [N, K] (nn.Linear's layout), out [M, N]."""
    rows, cols = weight.stride()
    _launch(x, weight, (weight.shape[1], weight.shape[0]), (cols, rows), True, out, bias, residual, preact, None,
            activation, IDENTITY, scales)


def _launch(a, b, b_shape, b_stride, b_transposed, c, bias, residual, preact, z, activation, grad_activation, scales):
    """matmul's body: b is the operand [K, N] (shape b_shape, strides b_stride), or with `b_transposed`
    the tensor whose .t() it is."""
    M = a.shape[0]
    if M == 0 or b_shape[1] == 0:
        return
    if scales is not None and scales[3] is not None:
        scales = (*scales[:3], scales[3].view(torch.int32))  # the kernel's atomic max runs on the fp32 bits
    key = bound.launch_key(a, b, b_shape, b_stride, c, bias, residual, preact, z, activation, grad_activation, scales)
    launcher = bound.BOUND.get(key)
    if launcher is not None and not PRECOMPILING.get():
        launcher(a, b, c, bias, residual, preact, z, scales)
        return
    if b_transposed:
        b = b.t()
    assert a.dtype == b.dtype or (a.dtype in FP8_DTYPES and b.dtype in FP8_DTYPES), \
        f"matmul: operands {a.dtype} and {b.dtype}"  # fp8 may mix formats (e5m2 gradients, e4m3 weights)
    launcher = _first_launch(a, b, c, bias, residual, preact, z, activation, grad_activation, scales)
    if launcher is not None:  # None while precompiling
        if len(bound.BOUND) >= bound.BOUND_LIMIT:
            bound.BOUND.clear()
        bound.BOUND[key] = launcher


def _first_launch(a, b, c, bias, residual, preact, z, activation, grad_activation, scales):
    """The full launch path; returns the launch bound for its key, or None (precompiling, or a stand-in
    for a kernel)."""
    M, K = a.shape
    N = b.shape[1]
    operands = [t for t in (a, b, c, residual, preact, z) if t is not None]
    tf32 = a.is_cuda and bound.allow_tf32()  # as the launch key reads it
    a_scale, b_scale, c_scale, amax = (None,) * 4 if scales is None else scales
    if (a_scale is None) != (b_scale is None) or (c_scale is not None) != (c.dtype in FP8_DTYPES):
        raise ValueError(f"matmul: a_scale and b_scale come together, and c_scale exactly when c is fp8 "
                         f"(c is {c.dtype}, scales given: {[s is not None for s in (a_scale, b_scale, c_scale)]})")
    fp8 = b.dtype in FP8_DTYPES or c.dtype in FP8_DTYPES
    meta = dict(
        ACTIVATION=activation,
        GRAD_ACTIVATION=grad_activation,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        STORE_PREACT=preact is not None,
        SCALED=a_scale is not None,
        QUANTIZE=c_scale is not None,
        STORE_AMAX=amax is not None,
        INPUT_PRECISION=("fp8_promoted" if fp8 and a.dtype in FP8_DTYPES and K >= FP8_PROMOTE_K
                         else "ieee" if b.dtype == torch.float32 and not tf32 else "tf32"),
        INT64_OFFSETS=_needs_int64(operands),
        # the interpreter's bf16 and fp8 casts truncate: rounded by hand there (`matmul._cast_for_store`)
        EMULATE_BF16=INTERPRETED and (b.dtype == torch.bfloat16 or fp8),
        LAYOUT=layout_code(a, b),
    )
    # Absent epilogue operands are passed as c: a valid pointer the constexpr flags never read.
    epilogue = (*(c if t is None else t for t in (bias, residual, preact, z, a_scale, b_scale, c_scale, amax)),)
    sizes = (M, N, K, bucket(M), bucket(N), bucket(K))
    config = PINNED_CONFIG.get() or (None if a.is_cuda and not INTERPRETED else INTERPRETER_CONFIG)
    kind = kernel_for(a, b, c, residual)
    if kind == "tma" and grad_activation >= GLU:
        kind = "pointer"  # the TMA kernel has no gated gradient epilogue (dU goes through a pointer)
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        if kind == "tma":
            return _matmul_tma(a, b, c, epilogue, sizes, residual, preact, z, meta, config)
        strides = (*a.stride(), *b.stride(), *c.stride(), *_strides(residual), *_strides(preact), *_strides(z))
        if kind == "splitk":
            return _matmul_splitk(a, b, c, epilogue, sizes, strides, meta, config)
        args = (a, b, c, *epilogue, *sizes, *strides)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        compiled, ran = _run_kernel("pointer", _matmul_kernel, config, grid, args, meta, a.device)
        if ran is None:
            return None  # precompiling
        line = record("pointer", ran)
        return bound.bind(_matmul_kernel, compiled, a.device, grid(ran.kwargs()), args, meta, ran, line)


def _matmul_splitk(a, b, c, epilogue, sizes, strides, meta, config):
    M, N, K = sizes[:3]
    programs = num_sms(a.device.index) if a.is_cuda and not INTERPRETED else INTERPRETER_PROGRAMS
    candidates = splitk_configs(device_capability(a.device.index)) if config is None else (config,)
    elements, tiles = _splitk_extent(M, N, K, candidates, programs)
    if meta["ACTIVATION"] >= GLU:
        elements *= 2  # a gate and an up partial per split
    workspace, counters = splitk_workspace(a.device, elements, tiles)
    meta = dict(meta, INT64_OFFSETS=meta["INT64_OFFSETS"] or elements >= INT32_LIMIT, SPLIT_ORDER=SPLITK_ORDER.get())
    args = (a, b, c, *epilogue, workspace, counters, *sizes, *strides)

    def grid(meta):
        tile = MatmulConfig(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"])
        return (triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n), split_k(M, N, K, tile, programs))

    compiled, ran = _run_kernel("splitk", _matmul_splitk_kernel, config, grid, args, meta, a.device)
    if ran is None:
        return None  # precompiling
    line = record("splitk", ran, f" split={split_k(M, N, K, ran, programs)}")
    return bound.bind(_matmul_splitk_kernel, compiled, a.device, grid(ran.kwargs()), args, meta, ran, line,
                 workspace=(elements, tiles))


def _run_kernel(kind, kernel, config, grid, args, meta, device, prepare=None):
    """(what the launch returned, the MatmulConfig it ran): `kernel` on the pinned `config`, or through
    its autotuner when `config` is None. `prepare(config)`, if given, readies the arguments for a config
    (the autotuner's configs carry it as their pre_hook). While `precompiling`, nothing runs: every
    config the launch could take is compiled instead (in parallel under triton's AsyncCompileMode), and
    it returns (None, None)."""
    if config is None:
        tuner = autotuner(kind, device_capability(device.index))
        if not PRECOMPILING.get():
            return tuner[grid](*args, **meta), picked(tuner)
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            candidates = [MatmulConfig.from_triton(c) for c in tuner.prune_configs(meta)]
        finally:
            tuner.nargs = None
    elif not PRECOMPILING.get():
        if prepare is not None:
            prepare(config)
        return kernel[grid](*args, **meta, **config.kwargs(), num_warps=config.num_warps,
                            num_stages=config.num_stages), config
    else:
        candidates = [config]
    for candidate in candidates:
        if prepare is not None:
            prepare(candidate)
        kernel.warmup(*args, grid=grid, **meta, **candidate.kwargs(), num_warps=candidate.num_warps,
                      num_stages=candidate.num_stages)
    return None, None


def _matmul_tma(a, b, c, epilogue, sizes, residual, preact, z, meta, config):
    a_trans = tma_layout(a) == "cols"
    b_trans = tma_layout(b) == "cols"
    if meta["ACTIVATION"] >= GLU:  # the gated forward: B's descriptor covers gate and up, [K, 2N]
        b = b.as_strided((b.shape[0], 2 * b.shape[1]), b.stride())
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

    def prepare(config):
        set_block_shapes(dict(a_desc=a_desc, b_desc=b_desc, c_desc=c_desc, **meta, **config.kwargs()))

    compiled, ran = _run_kernel("tma", _matmul_tma_persistent_kernel, config, grid, args, meta, a.device, prepare)
    if ran is None:
        return None  # precompiling
    line = record("tma", ran)
    prepare(ran)  # the block shapes of the config that ran, whatever the autotuner tried last
    return bound.bind(_matmul_tma_persistent_kernel, compiled, a.device, grid(ran.kwargs()), args, meta, ran, line,
                      descriptors=(a_desc, b_desc, c_desc))


def dgelu(grad, z, activation, need_db):
    """(dZ, db): dZ = grad * act'(z) in z's dtype, and db = its column sums (fp32 per row block, then
    summed), from one elementwise pass; db is None unless `need_db`. Gated (`GLU` + act): z is [g | u]
    [M, 2N] and dZ is [dG | dU] (`kernels.matmul._dgelu_kernel`), db 2N long."""
    M, N = grad.shape
    columns = 2 * N if activation >= GLU else N
    dz = torch.empty((M, columns), dtype=z.dtype, device=z.device)
    row_blocks = triton.cdiv(M, DGELU_BLOCK_M)
    colsum = torch.empty((row_blocks, columns), dtype=torch.float32, device=z.device) if need_db else dz
    if M and N:
        grid = (row_blocks, triton.cdiv(N, DGELU_BLOCK_N))
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            elementwise(_dgelu_kernel, grid, (grad, z, dz, colsum), (M, N, *grad.stride(), *z.stride(), *dz.stride()),
                        dict(GRAD_ACTIVATION=activation, STORE_COLSUM=need_db, INT64_OFFSETS=_needs_int64((grad, z, dz)),
                             EMULATE_BF16=INTERPRETED and z.dtype == torch.bfloat16, BLOCK_M=DGELU_BLOCK_M,
                             BLOCK_N=DGELU_BLOCK_N),
                        z.device, num_warps=DGELU_NUM_WARPS,
                        line=f"dgelu {DGELU_BLOCK_M}x{DGELU_BLOCK_N} warps={DGELU_NUM_WARPS}")
    if not need_db:
        return dz, None
    db = colsum.sum(0) if M else torch.zeros(columns, dtype=torch.float32, device=z.device)
    return dz, db


def elementwise(kernel, grid, tensors, scalars, meta, device, num_warps=4, line=None):
    """One launch of a one-config kernel (the dGELU pass, fp8's quantize and scale update): the full JIT
    path at its key's first call, then the bound launch (`bound.BOUND`), as the GEMMs. `tensors` are the
    kernel's first arguments, then `scalars`, then the constexprs `meta`; `line` is what
    `record_launches` records (default: the kernel's name). Call it on the launch's device."""
    if PRECOMPILING.get():
        kernel.warmup(*tensors, *scalars, grid=grid, **meta, num_warps=num_warps)
        return
    key = bound.elementwise_key(kernel, device, grid, tensors, scalars, meta)
    launcher = bound.BOUND.get(key)
    if launcher is not None:
        launcher(*tensors)
        return
    compiled = kernel[grid](*tensors, *scalars, **meta, num_warps=num_warps)
    line = record(line or getattr(kernel, "__name__", str(kernel)).strip("_"), None)
    launcher = bound.bind_elementwise(kernel, compiled, device, grid, tensors, scalars, meta, line)
    if launcher is not None:
        if len(bound.BOUND) >= bound.BOUND_LIMIT:
            bound.BOUND.clear()
        bound.BOUND[key] = launcher
