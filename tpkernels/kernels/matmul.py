"""The tiled matmul family: a plain GEMM mainloop with constexpr epilogues, and GELU as `tl` functions.

    C[M, N] = epilogue(A[M, K] @ B[K, N])

    epilogue(P) = act(P + bias) * act'(Z) + residual      each term optional
                  P + bias may also be stored (the pre-activation z of the forward)

The mainloop is the tutorial GEMM's and nothing else: two tile loads and one `tl.dot` per K-tile, so A
stays in shared memory and feeds wgmma directly. Everything else happens once per tile, on the fp32
accumulator, cast once at the store. The epilogue splits the tile into a tuple of slices along N
(`configs.epilogue_slices`: EPILOGUE_SUBTILE, twice that for dGELU) and runs one function over them with
`tl.static_range`, so that its temporaries (GELU, the stored pre-activation, residual) never hold the
whole tile live.

Every operand is a strided view, so the same kernel serves every launch of a linear layer:

    forward        A = x [M, K]            B = w.T [K, N]      C = y [M, N]    (bias, act, z, residual)
    dX             A = dZ [M, N]           B = w [N, K]        C = dX [M, K]
    dW             A = dZ.T [N, M]         B = x [M, K]        C = dW [N, K]
    dH of the MLP  A = dY [M, N2]          B = w2 [N2, H]      C = dZ [M, H]   (epilogue * gelu'(z))

`_dgelu_kernel` is the one elementwise pass for a standalone layer's backward: dZ = dY * act'(z), with
the column sums of dZ (db) reduced per row block in the same pass. No K loop contains a reduction or a
prologue. `_matmul_tma_persistent_kernel` (matmul_tma.py) is the Hopper variant of `_matmul_kernel`.
"""
import triton
import triton.language as tl

from triton.runtime.interpreter import InterpretedFunction

from tpkernels.kernels.configs import epilogue_slices

# ACTIVATION / GRAD_ACTIVATION codes.
IDENTITY = 0
GELU = 1  # exact: 0.5 x (1 + erf(x / sqrt 2))
GELU_TANH = 2  # torch's tanh approximation
SILU = 3  # x * sigmoid(x)
# GLU + an activation code: the gated forms. ACTIVATION = GLU + act makes C = act(A @ B_gate + b_gate) *
# (A @ B_up + b_up), where B_gate is the [K, N] operand B and B_up lies N columns further (b + N * stride_bn:
# the rows F to 2F of a [2F, K] weight [gate; up]), its bias N further too; a stored pre-activation holds g
# and, N columns further, u. GRAD_ACTIVATION = GLU + act takes C's product as dH and z as [g | u] (u N
# columns further), and stores dG = dH * u * act'(g) in C and dU = dH * act(g) N columns further.
GLU = 4

# Globals a kernel reads must be tl.constexpr instances (an annotation alone fails to compile). Keep
# them right of a tensor in products: the interpreter cannot multiply a constexpr by a tensor.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _tanh(x):
    # exp of a non-positive number never overflows, so large |x| gives +-1, never inf / inf = NaN.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))


@triton.jit
def _gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
    pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return cdf + x * pdf


@triton.jit
def _gelu_tanh(x):
    t = _tanh(x * _SQRT_2_OVER_PI * (1.0 + x * x * _KAPPA))
    return 0.5 * x * (1.0 + t)


@triton.jit
def _gelu_tanh_grad(x):
    x2 = x * x
    t = _tanh(x * _SQRT_2_OVER_PI * (1.0 + x2 * _KAPPA))
    du_dx = (1.0 + x2 * (3.0 * _KAPPA)) * _SQRT_2_OVER_PI
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx


@triton.jit
def _sigmoid(x):
    # exp(-x) overflows to inf for x below about -88: 1 / inf is 0, never NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _silu(x):
    return x * _sigmoid(x)


@triton.jit
def _silu_grad(x):
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    tl.static_assert(ACTIVATION >= 0 and ACTIVATION <= 3,
                     "ACTIVATION is IDENTITY (0), GELU (1), GELU_TANH (2) or SILU (3)")
    if ACTIVATION == 1:
        x = _gelu(x)
    elif ACTIVATION == 2:
        x = _gelu_tanh(x)
    elif ACTIVATION == 3:
        x = _silu(x)
    return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    # IDENTITY has no gradient epilogue: the caller skips the multiply instead of multiplying by 1.
    tl.static_assert(ACTIVATION >= 1 and ACTIVATION <= 3, "a gradient epilogue is GELU (1), GELU_TANH (2) or SILU (3)")
    if ACTIVATION == 1:
        g = _gelu_grad(x)
    elif ACTIVATION == 2:
        g = _gelu_tanh_grad(x)
    else:
        g = _silu_grad(x)
    return g


@triton.jit
def _round_to_bf16(x):
    # Under the interpreter an fp32 -> bf16 cast truncates (triton#11584). Rounding to nearest even
    # by hand first makes the truncation exact. NaN keeps its own bits.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _fp8_bits(x, MANTISSA: tl.constexpr, BIAS: tl.constexpr):
    # The interpreter's fp32 -> fp8 cast truncates and mishandles fp8 subnormals, so under it the code
    # is built by hand: round to nearest even on the fp32 bits (normal range) or at the subnormal
    # quantum, 2^(1 - BIAS - MANTISSA) (adding 2^23 quanta rounds there in fp32). x is within the format's
    # range (the caller saturates) or NaN, which becomes the format's NaN code 0x7F.
    DROP: tl.constexpr = 23 - MANTISSA
    magnitude = tl.abs(x)
    bits = magnitude.to(tl.uint32, bitcast=True)
    normal = ((bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) >> DROP) - ((127 - BIAS) << MANTISSA)
    quanta = tl.exp2((BIAS + MANTISSA - 1) * 1.0)  # 1 / the subnormal quantum
    magic = 8388608.0 / quanta  # 2^23 quanta
    subnormal = (((magnitude + magic) - magic) * quanta).to(tl.uint32)
    code = tl.where(magnitude < tl.exp2((1 - BIAS) * 1.0), subnormal, normal)
    code = tl.where(x != x, 0x7F, code) | ((x.to(tl.uint32, bitcast=True) >> 31) << 7)
    return code.to(tl.uint8)


@triton.jit
def _cast_for_store(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    if EMULATE_BF16:
        if dtype == tl.bfloat16:
            x = _round_to_bf16(x)
        elif dtype == tl.float8e4nv:
            return _fp8_bits(x, 3, 7).to(dtype, bitcast=True)
        elif dtype == tl.float8e5:
            return _fp8_bits(x, 2, 15).to(dtype, bitcast=True)
    return x.to(dtype)


@triton.jit
def _saturate(x, dtype: tl.constexpr):
    # Clamp to the largest finite value of the fp8 format, as TransformerEngine's casts do: inf and
    # overflow saturate, NaN stays NaN (both comparisons are false).
    tl.static_assert(dtype == tl.float8e4nv or dtype == tl.float8e5, "a scaled output is float8_e4m3fn or float8_e5m2")
    FMAX: tl.constexpr = 448.0 if dtype == tl.float8e4nv else 57344.0
    return tl.where(x > FMAX, FMAX, tl.where(x < -FMAX, -FMAX, x))


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    if EMULATE_BF16:
        # The interpreter's bf16 dot multiplies raw bits (triton#11584); bf16 -> fp32 is exact.
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif INPUT_PRECISION == "fp8_promoted":
        # Hopper's fp8 wgmma accumulates in reduced precision: each K-tile's product goes into a fresh
        # accumulator, added to acc in fp32 (`launch.FP8_PROMOTE_K` says when).
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=a.shape[1])
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _tile_id_to_pids(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks share their B tiles in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _split_n(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right halves of a [BLOCK_M, BLOCK_N] tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _halves(acc, HALVES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile as a tuple of HALVES (1 or 2) slices along N, left to right."""
    tl.static_assert(HALVES == 1 or HALVES == 2, "a tile splits into 1 or 2 halves")
    if HALVES == 1:
        parts = (acc,)
    else:
        left, right = _split_n(acc, BLOCK_M, BLOCK_N)
        parts = (left, right)
    return parts


@triton.jit
def _epilogue(
    acc, acc_up, start_m, start_n, M, N,
    c, bias_ptr, residual, preact, z, scales,
    ACTIVATION: tl.constexpr, GRAD_ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STORE_PREACT: tl.constexpr, SCALED: tl.constexpr, QUANTIZE: tl.constexpr,
    STORE_AMAX: tl.constexpr, EMULATE_BF16: tl.constexpr,
    C_IS_DESCRIPTOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
):
    """act(acc + bias) * act'(z) + residual for the [BLOCK_M, BLOCK_N] fp32 accumulator of the tile at
    (start_m, start_n), stored through a pointer or, with C_IS_DESCRIPTOR, a TMA descriptor. With a gated
    ACTIVATION (GLU + act), act(acc + bias) * (acc_up + bias_up); with a gated GRAD_ACTIVATION, dG and dU
    from the dH in acc (see GLU). acc_up is acc itself when the activation is not gated.

    It runs on `epilogue_slices(EPILOGUE_SUBTILE, dGELU or gated)` slices along N, one at a time, so that
    its temporaries never hold the whole tile live. Each 2-D operand (c, residual, preact, z) travels as
    (pointer, stride along M, stride along N), so its strides cannot be given to another; callers pass
    every argument after N by keyword.

    FP8 (`scales` = pointers to the fp32 scalars a_scale, b_scale, c_scale and amax): SCALED multiplies
    the accumulator by a_scale * b_scale (the operands' dequantizing scales) before anything else;
    QUANTIZE stores the result times c_scale, saturated to the fp8 format's range; STORE_AMAX raises
    amax to the tile's largest |result| (before c_scale) with one atomic max per tile, over the fp32 bits
    as int32, which order non-negative floats alike and let a NaN win, as torch's amax does.
    """
    c_ptr, stride_cm, stride_cn = c
    a_scale_ptr, b_scale_ptr, c_scale_ptr, amax_ptr = scales
    GATED: tl.constexpr = ACTIVATION >= 4
    GATED_GRAD: tl.constexpr = GRAD_ACTIVATION >= 4
    tl.static_assert(not (QUANTIZE and C_IS_DESCRIPTOR), "a TMA store of C is 16-bit")
    tl.static_assert(not (GATED_GRAD and C_IS_DESCRIPTOR), "the gated gradient epilogue stores dU through a pointer")
    tl.static_assert(not (GATED_GRAD and (HAS_RESIDUAL or QUANTIZE or STORE_AMAX or GATED)),
                     "the gated gradient epilogue has no residual, fp8 store or activation")
    if SCALED:
        ab_scale = tl.load(a_scale_ptr) * tl.load(b_scale_ptr)
    if QUANTIZE:
        c_scale = tl.load(c_scale_ptr)
    if STORE_AMAX:
        tile_amax = tl.zeros((), dtype=tl.int32)
    residual_ptr, stride_rm, stride_rn = residual
    preact_ptr, stride_pm, stride_pn = preact
    z_ptr, stride_zm, stride_zn = z
    # The up half lies N columns past the gate half in every gated operand (64-bit: 2N columns may pass 2^31).
    n_64 = tl.cast(N, tl.int64)
    SLICES: tl.constexpr = epilogue_slices(EPILOGUE_SUBTILE, GRAD_ACTIVATION != 0 or GATED)
    tl.static_assert(SLICES == 1 or SLICES == 2 or SLICES == 4, "the epilogue runs in 1, 2 or 4 slices")
    SLICE_N: tl.constexpr = BLOCK_N // SLICES
    # `tl.split` halves a tile statically, so 4 slices are the halves of each half, and each half is split
    # only when its turn comes (the other half's quarters are not yet live).
    HALVES: tl.constexpr = 1 if SLICES == 1 else 2
    halves = _halves(acc, HALVES, BLOCK_M, BLOCK_N)
    if GATED:
        halves_up = _halves(acc_up, HALVES, BLOCK_M, BLOCK_N)
    for h in tl.static_range(HALVES):
        quarters = _halves(halves[h], SLICES // HALVES, BLOCK_M, BLOCK_N // HALVES)
        if GATED:
            quarters_up = _halves(halves_up[h], SLICES // HALVES, BLOCK_M, BLOCK_N // HALVES)
        for q in tl.static_range(SLICES // HALVES):
            out = quarters[q]
            if GATED:
                up = quarters_up[q]
            if SCALED:
                out = out * ab_scale
                if GATED:
                    up = up * ab_scale
            slice_n = start_n + (h * (SLICES // HALVES) + q) * SLICE_N
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_n = slice_n + tl.arange(0, SLICE_N)
            mask_n = offs_n < N
            mask = (offs_m < M)[:, None] & mask_n[None, :]
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
                out += bias.to(tl.float32)[None, :]
                if GATED:
                    up += tl.load(bias_ptr + n_64 + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if STORE_PREACT:
                preact_ptrs = preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
                tl.store(preact_ptrs, _cast_for_store(out, preact_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)
                if GATED:
                    tl.store(preact_ptrs + n_64 * stride_pn, _cast_for_store(up, preact_ptr.dtype.element_ty,
                                                                            EMULATE_BF16), mask=mask)
            out = _activation(out, ACTIVATION % 4)
            if GATED:
                out = out * up
            if GRAD_ACTIVATION != 0:
                z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
                zs = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
                if GATED_GRAD:  # out is dH: dU = dH * act(g) N columns on, dG = dH * u * act'(g) here
                    us = tl.load(z_ptrs + n_64 * stride_zn, mask=mask, other=0.0).to(tl.float32)
                    du = out * _activation(zs, GRAD_ACTIVATION % 4)
                    tl.store(c_ptr + offs_m[:, None] * stride_cm + (n_64 + offs_n)[None, :] * stride_cn,
                             _cast_for_store(du, c_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)
                    out = out * us
                out = out * _activation_grad(zs, GRAD_ACTIVATION % 4)
            if HAS_RESIDUAL:
                res = tl.load(residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask,
                              other=0.0)
                out += res.to(tl.float32)
            if STORE_AMAX:
                magnitude = tl.where(mask, tl.abs(out), 0.0).to(tl.int32, bitcast=True)
                tile_amax = tl.maximum(tile_amax, tl.max(tl.max(magnitude, axis=1), axis=0))
            if QUANTIZE:
                out = _saturate(out * c_scale, c_ptr.dtype.element_ty)
            if C_IS_DESCRIPTOR:  # descriptor coordinates are 32-bit, whatever width the pointer offsets use
                stored = _cast_for_store(out, c_ptr.dtype, EMULATE_BF16)
                c_ptr.store([start_m.to(tl.int32), slice_n.to(tl.int32)], stored)
            else:
                stored = _cast_for_store(out, c_ptr.dtype.element_ty, EMULATE_BF16)
                tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, stored, mask=mask)
    if STORE_AMAX:
        tl.atomic_max(amax_ptr, tile_amax)  # amax's int32 view (the launcher passes it)


@triton.jit
def _tile_product(a_ptr, b_ptr, pid_m, pid_n, M, N, k_start, k_length,
                  stride_am, stride_ak, stride_bk, stride_bn, GATED: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr, EMULATE_BF16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 product of the tile (pid_m, pid_n) over K from k_start, k_length long: A's rows of the tile
    times B's columns. The pointer kernel runs it over all of K, the split-K kernel over its split.
    Returns (acc, acc_up): with GATED, acc_up is the product with B's columns N further on (the up half),
    sharing each loaded A tile; else acc twice."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Clamped rather than masked: edge rows and columns read valid memory and are never stored, so the
    # loads need only the K mask, as in the tutorial GEMM. The hints restore the contiguity the clamp
    # hides, so that an operand whose unit stride is along M or N (dZ.T, w) still loads in 16-byte
    # vectors by cp.async: an aligned vector either lies inside the row or starts past its end and is
    # clamped whole to the row's start.
    offs_am = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < M, offs_m, 0), BLOCK_M), BLOCK_M)
    offs_bn = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64_OFFSETS:
        offs_k = offs_k.to(tl.int64)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + (k_start + offs_k)[:, None] * stride_bk + offs_bn[None, :] * stride_bn

    # The plain GEMM's mainloop (benchmarks/plain_gemm.py repeats it on purpose, as the yardstick).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up_offset = tl.cast(N, tl.int64) * stride_bn
    for k_remaining in range(k_length, 0, -BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_remaining, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        acc = _dot(a, b, acc, INPUT_PRECISION, EMULATE_BF16)
        if GATED:
            b_up = tl.load(b_ptrs + up_offset, mask=offs_k[:, None] < k_remaining, other=0.0)
            acc_up = _dot(a, b_up, acc_up, INPUT_PRECISION, EMULATE_BF16)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if not GATED:
        acc_up = acc
    return acc, acc_up


# The family's parameter list is written out in each of its three kernels, on purpose (a kept duplicate):
# a kernel's constexprs are its own parameters, one each. Grouped in a tuple, the epilogue's switches would
# be specialized as runtime values, its branches compiled in; the launchers pass the list flat, by name
# (`bound.bind`), and `benchmarks/compile_report.py` types it by name. Add a parameter to all three.
@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, bias_ptr, residual_ptr, preact_ptr, z_ptr, a_scale_ptr, b_scale_ptr, c_scale_ptr,
    amax_ptr,
    # sizes (the buckets only key the autotuner)
    M, N, K, M_BUCKET, N_BUCKET, K_BUCKET,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_rm, stride_rn, stride_pm, stride_pn, stride_zm, stride_zn,
    # epilogue
    ACTIVATION: tl.constexpr, GRAD_ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STORE_PREACT: tl.constexpr,
    # fp8 (`_epilogue`): scale by a_scale * b_scale, quantize C with c_scale, record amax
    SCALED: tl.constexpr, QUANTIZE: tl.constexpr, STORE_AMAX: tl.constexpr,
    # numerics
    INPUT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    # the operands' layout (`launch.layout_code`): it only keys the autotuner, as a constexpr, which no
    # generated code sees (a runtime argument, even unused, moved a dgrad config into spilling)
    LAYOUT: tl.constexpr,
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
):
    pid_m, pid_n = _tile_id_to_pids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    if INT64_OFFSETS:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    acc, acc_up = _tile_product(a_ptr, b_ptr, pid_m, pid_n, M, N, 0, K, stride_am, stride_ak, stride_bk,
                                stride_bn, ACTIVATION >= 4, INPUT_PRECISION, INT64_OFFSETS, EMULATE_BF16,
                                BLOCK_M, BLOCK_N, BLOCK_K)

    _epilogue(acc, acc_up, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N,
              c=(c_ptr, stride_cm, stride_cn), bias_ptr=bias_ptr, residual=(residual_ptr, stride_rm, stride_rn),
              preact=(preact_ptr, stride_pm, stride_pn), z=(z_ptr, stride_zm, stride_zn),
              scales=(a_scale_ptr, b_scale_ptr, c_scale_ptr, amax_ptr),
              ACTIVATION=ACTIVATION, GRAD_ACTIVATION=GRAD_ACTIVATION, HAS_BIAS=HAS_BIAS, HAS_RESIDUAL=HAS_RESIDUAL,
              STORE_PREACT=STORE_PREACT, SCALED=SCALED, QUANTIZE=QUANTIZE, STORE_AMAX=STORE_AMAX,
              EMULATE_BF16=EMULATE_BF16, C_IS_DESCRIPTOR=False,
              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EPILOGUE_SUBTILE=EPILOGUE_SUBTILE)


@triton.jit
def _elementwise_block(M, N, INT64_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] block of an elementwise pass over [M, N] at program (pid_m, pid_n):
    (pid_m, its row offsets, its column offsets, the column mask, the block's mask)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if INT64_OFFSETS:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    return pid_m, offs_m, offs_n, mask_n, (offs_m < M)[:, None] & mask_n[None, :]


@triton.jit
def _dgelu_kernel(
    # pointers
    dy_ptr, z_ptr, dz_ptr, colsum_ptr,
    # sizes
    M, N,
    # strides
    stride_dym, stride_dyn, stride_zm, stride_zn, stride_dzm, stride_dzn,
    # constexprs
    GRAD_ACTIVATION: tl.constexpr, STORE_COLSUM: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dZ = dY * act'(z), and colsum[pid_m, n] = sum of this row block's dZ[:, n] in fp32 (for db).

    With a gated GRAD_ACTIVATION (GLU + act): z is [g | u] and dZ is [dG | dU], each u and dU N columns
    past g and dG, colsum 2N wide: dG = dY * u * act'(g), dU = dY * act(g)."""
    GATED: tl.constexpr = GRAD_ACTIVATION >= 4
    pid_m, offs_m, offs_n, mask_n, mask = _elementwise_block(M, N, INT64_OFFSETS, BLOCK_M, BLOCK_N)
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
    z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
    dz_ptrs = dz_ptr + offs_m[:, None] * stride_dzm + offs_n[None, :] * stride_dzn
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    dz = dy.to(tl.float32) * _activation_grad(z, GRAD_ACTIVATION % 4)
    if GATED:
        n_64 = tl.cast(N, tl.int64)
        u = tl.load(z_ptrs + n_64 * stride_zn, mask=mask, other=0.0).to(tl.float32)
        du = tl.where(mask, dy.to(tl.float32) * _activation(z, GRAD_ACTIVATION % 4), 0.0)
        tl.store(dz_ptrs + n_64 * stride_dzn, _cast_for_store(du, dz_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)
        dz = dz * u
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptrs, _cast_for_store(dz, dz_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)
    if STORE_COLSUM:
        COLUMNS: tl.constexpr = 2 if GATED else 1
        colsum_ptrs = colsum_ptr + pid_m * (COLUMNS * N) + offs_n
        tl.store(colsum_ptrs, tl.sum(dz, axis=0), mask=mask_n)
        if GATED:
            tl.store(colsum_ptrs + N, tl.sum(du, axis=0), mask=mask_n)


# Set when TRITON_INTERPRET=1 was in the environment as triton decorated the kernel: CPU tensors can
# then run it. Tests read this flag rather than the environment, which may have changed since.
INTERPRETED = isinstance(_matmul_kernel, InterpretedFunction)
