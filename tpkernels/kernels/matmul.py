"""One tiled matmul with a constexpr prologue and epilogue, and GELU as `tl` functions.

    C[M, N] = epilogue(prologue(A)[M, K] @ B[K, N])

    prologue(A) = A                          GRAD_ACTIVATION == IDENTITY
                = A * act'(Z)                otherwise (Z has A's shape: the saved pre-activation)
    epilogue(P) = act(P + bias) + residual   each term optional; P + bias may also be stored

Every operand is a strided view, so the same kernel serves all the launches of a linear layer:

    forward        A = x [M, K]        B = w.T [K, N]     C = y [M, N]
    dX             A = dY [M, N]       B = w [N, K]       C = dX [M, K]    (prologue: dY * act'(z))
    dW (and db)    A = dY.T [N, M]     B = x [M, K]       C = dW [N, K]    (db = row sums of A)

The accumulator is fp32; bias, activation and residual are applied to it and it is cast once, at the
store. Row sums (`STORE_ROWSUM`) are taken over the prologue's fp32 output, so db costs no extra pass.
"""
import triton
import triton.language as tl

from triton.runtime.interpreter import InterpretedFunction

# ACTIVATION / GRAD_ACTIVATION codes.
IDENTITY = 0
GELU = 1  # exact: 0.5 x (1 + erf(x / sqrt 2))
GELU_TANH = 2  # torch's tanh approximation

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
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        x = _gelu(x)
    elif ACTIVATION == 2:
        x = _gelu_tanh(x)
    return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        g = _gelu_grad(x)
    else:
        g = _gelu_tanh_grad(x)
    return g


@triton.jit
def _round_to_bf16(x):
    # Under the interpreter an fp32 -> bf16 cast truncates (triton#11584). Rounding to nearest even
    # by hand first makes the truncation exact. NaN keeps its own bits.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _cast_for_store(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    if EMULATE_BF16:
        if dtype == tl.bfloat16:
            x = _round_to_bf16(x)
    return x.to(dtype)


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, bias_ptr, residual_ptr, preact_ptr, z_ptr, rowsum_ptr,
    # sizes (the buckets only key the autotuner)
    M, N, K, M_BUCKET, N_BUCKET, K_BUCKET,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_rm, stride_rn, stride_pm, stride_pn, stride_zm, stride_zk,
    # epilogue and prologue
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_PREACT: tl.constexpr, GRAD_ACTIVATION: tl.constexpr, STORE_ROWSUM: tl.constexpr,
    # numerics
    INPUT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    # At least one column of programs, so that row sums are written even when N == 0.
    num_pid_n = tl.maximum(tl.cdiv(N, BLOCK_N), 1)
    # Grouped order: GROUP_M row blocks share their B tiles in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    if INT64_OFFSETS:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        if INT64_OFFSETS:
            offs_k = offs_k.to(tl.int64)
        mask_k = offs_k < K
        mask_a = mask_m[:, None] & mask_k[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=mask_a, other=0.0)
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if GRAD_ACTIVATION != 0:
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_k[None, :] * stride_zk, mask=mask_a, other=0.0)
            a = a.to(tl.float32) * _activation_grad(z.to(tl.float32), GRAD_ACTIVATION)
        if STORE_ROWSUM:
            row_acc += tl.sum(a.to(tl.float32), axis=1)
        if EMULATE_BF16:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)

    if STORE_ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m, row_acc, mask=mask_m)

    mask_c = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if STORE_PREACT:
        preact = _cast_for_store(acc, preact_ptr.dtype.element_ty, EMULATE_BF16)
        tl.store(preact_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn, preact, mask=mask_c)
    acc = _activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask_c, other=0.0
        )
        acc += residual.to(tl.float32)
    c = _cast_for_store(acc, c_ptr.dtype.element_ty, EMULATE_BF16)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, c, mask=mask_c)


# Set when TRITON_INTERPRET=1 was in the environment as triton decorated the kernel: CPU tensors can
# then run it. Tests read this flag rather than the environment, which may have changed since.
INTERPRETED = isinstance(_matmul_kernel, InterpretedFunction)
