"""FP8 helpers beside the matmul family: quantizing a tensor, and the delayed-scaling update.

    q = saturate(x * scale) in fp8         amax = max(amax, max |x|)          (`_quantize_kernel`)

    per tensor j of a layer's state, from its amax history [LENGTH, COUNT] (row 0 the newest):
        amax_j = max over the history (or row 0 alone)                         (`_scale_update_kernel`)
        scale_j = fmax_j / amax_j / 2^MARGIN where amax_j is positive and finite, else unchanged: a window
                  holding a NaN (an overflowed step's amax) keeps the previous scale until the NaN leaves it,
                  on the GPU as under the interpreter and in the torch path (tl.max alone would skip the NaN
                  on a GPU, as maxnum does, and propagate it under the interpreter)
                  (fmax_j: the largest value of tensor j's format, 448 for e4m3, 57344 for e5m2),
                  at most FP32_MAX: a subnormal amax (1e-39) would make it inf, and inf * 0 = NaN
        scale_inv_j = 1 / scale_j;   the history moves down a row and row 0 starts again at 0

The matmul kernels apply the scales in their epilogue (`matmul._epilogue`: SCALED, QUANTIZE,
STORE_AMAX); these two cover what no GEMM produces: the layer's input, the weights, and the update
between steps, on the device, so that no step waits on the host.
"""
import triton
import triton.language as tl

from tpkernels.kernels.matmul import _cast_for_store, _elementwise_block, _saturate

FP32_MAX = tl.constexpr(3.4028234663852886e38)  # the largest finite float32: the cap on a scale


@triton.jit
def _quantize_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr, amax_ptr,
    # sizes
    M, N,
    # strides
    stride_xm, stride_xn, stride_qm, stride_qn,
    # constexprs
    STORE_AMAX: tl.constexpr, INT64_OFFSETS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """q = saturate(x * scale) in q's fp8 dtype; amax (its int32 view) raised to this block's max |x|."""
    _, offs_m, offs_n, _, mask = _elementwise_block(M, N, INT64_OFFSETS, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if STORE_AMAX:
        magnitude = tl.where(mask, tl.abs(x), 0.0).to(tl.int32, bitcast=True)
        tl.atomic_max(amax_ptr, tl.max(tl.max(magnitude, axis=1), axis=0))
    q = _saturate(x * tl.load(scale_ptr), q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_n[None, :] * stride_qn,
             _cast_for_store(q, q_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit
def _scale_update_kernel(
    # pointers
    history_ptr, scale_ptr, scale_inv_ptr, fmax_ptr,
    # constexprs
    LENGTH: tl.constexpr, COUNT: tl.constexpr, MARGIN: tl.constexpr,
    MOST_RECENT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: every tensor's new scale from its amax history, then the history moved down a row."""
    rows = tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_C)
    in_cols = cols < COUNT
    mask = (rows < LENGTH)[:, None] & in_cols[None, :]
    history = tl.load(history_ptr + rows[:, None] * COUNT + cols[None, :], mask=mask, other=0.0)
    if MOST_RECENT:
        amax = tl.sum(tl.where((rows == 0)[:, None], history, 0.0), axis=0)  # a NaN in row 0 stays NaN
        has_nan = amax != amax
    else:
        amax = tl.max(history, axis=0)
        has_nan = tl.max((history != history).to(tl.int32), axis=0) > 0  # counted, not compared: the same everywhere
    # Row r takes row r - 1; row 0 starts again at 0.
    above = tl.load(history_ptr + (rows - 1)[:, None] * COUNT + cols[None, :], mask=mask & (rows >= 1)[:, None],
                    other=0.0)
    old = tl.load(scale_ptr + cols, mask=in_cols, other=1.0)
    fmax = tl.load(fmax_ptr + cols, mask=in_cols, other=1.0)
    usable = (amax > 0.0) & (amax < float("inf")) & ~has_nan
    scale = tl.where(usable, fmax / tl.where(usable, amax, 1.0) / tl.exp2(MARGIN * 1.0), old)
    scale = tl.minimum(scale, FP32_MAX)
    tl.debug_barrier()  # every thread has read the history before any row is overwritten
    tl.store(history_ptr + rows[:, None] * COUNT + cols[None, :], above, mask=mask)
    tl.store(scale_ptr + cols, scale, mask=in_cols)
    tl.store(scale_inv_ptr + cols, 1.0 / scale, mask=in_cols)
