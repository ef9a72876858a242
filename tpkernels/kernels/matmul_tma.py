"""The Hopper variant of `_matmul_kernel`: persistent, TMA descriptors for the operands and for C.

    C[M, N] = epilogue(A[M, K] @ B[K, N]), the same epilogues as `matmul._matmul_kernel`

One program per SM walks the output tiles in grouped order. Its loop over (tile, K-tile) pairs is
flattened (`tl.range(..., flatten=True)`), so the software pipeline keeps loading the next tile's
operands while the epilogue of the current one runs. A and B arrive by TMA (`a_desc.load`), each in the
layout it has in memory: A_TRANS means the descriptor covers A.T ([K, M] row-major, as dZ is for dW =
dZ.T @ X), B_TRANS means it covers B.T ([N, K] row-major, as an nn.Linear weight is for the forward).
C leaves by TMA stores of EPILOGUE_SUBTILE slices; bias, residual, the stored pre-activation and z stay
pointer accesses, as they are read or written once per tile.

Descriptors need 16-byte aligned bases and row strides and a unit inner stride; the launcher checks and
runs `_matmul_kernel` otherwise.

The gated forward (`matmul.GLU` + act) loads a second B tile N columns on (the up rows of a [2N, K] weight,
which the launcher's descriptor covers whole) into a second accumulator; the gated gradient epilogue has no
form here (it stores dU through a pointer).
"""
import triton
import triton.language as tl

from tpkernels.kernels.matmul import _dot, _epilogue, _tile_id_to_pids


# The family's parameter list is written out in each of its three kernels, on purpose (a kept duplicate):
# a kernel's constexprs are its own parameters, one each. Grouped in a tuple, the epilogue's switches would
# be specialized as runtime values, its branches compiled in; the launchers pass the list flat, by name
# (`bound.bind`), and `benchmarks/compile_report.py` types it by name. Add a parameter to all three.
@triton.jit
def _matmul_tma_persistent_kernel(
    # descriptors and pointers
    a_desc, b_desc, c_desc, bias_ptr, residual_ptr, preact_ptr, z_ptr, a_scale_ptr, b_scale_ptr, c_scale_ptr,
    amax_ptr,
    # sizes (the buckets only key the autotuner)
    M, N, K, M_BUCKET, N_BUCKET, K_BUCKET,
    # strides of the pointer operands
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
    # layouts and tiling
    A_TRANS: tl.constexpr, B_TRANS: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
):
    # The gated forward's two accumulators, re-zeroed per tile inside a flattened (tile, K) loop, serialized
    # its wgmma (ptxas C7515); the gated form runs the two loops apart.
    FLATTEN: tl.constexpr = ACTIVATION < 4
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    GATED: tl.constexpr = ACTIVATION >= 4
    # The epilogue's own tile counter: sharing the loop's makes the flattened pipeline's life harder.
    tile_id_c = tl.program_id(0) - NUM_SMS
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_id_to_pids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_am = pid_m * BLOCK_M
        offs_bn = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            offs_k = ki * BLOCK_K
            if A_TRANS:
                a = a_desc.load([offs_k, offs_am]).T
            else:
                a = a_desc.load([offs_am, offs_k])
            if B_TRANS:
                b = b_desc.load([offs_bn, offs_k]).T
            else:
                b = b_desc.load([offs_k, offs_bn])
            acc = _dot(a, b, acc, INPUT_PRECISION, EMULATE_BF16)
            if GATED:
                if B_TRANS:
                    b_up = b_desc.load([offs_bn + N, offs_k]).T
                else:
                    b_up = b_desc.load([offs_k, offs_bn + N])
                acc_up = _dot(a, b_up, acc_up, INPUT_PRECISION, EMULATE_BF16)
        if not GATED:
            acc_up = acc

        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_id_to_pids(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        if INT64_OFFSETS:  # descriptor coordinates are 32-bit; the epilogue's pointer offsets may not be
            pid_m = pid_m.to(tl.int64)
            pid_n = pid_n.to(tl.int64)
        _epilogue(acc, acc_up, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N,
                  c=(c_desc, 0, 0), bias_ptr=bias_ptr, residual=(residual_ptr, stride_rm, stride_rn),
                  preact=(preact_ptr, stride_pm, stride_pn), z=(z_ptr, stride_zm, stride_zn),
                  scales=(a_scale_ptr, b_scale_ptr, c_scale_ptr, amax_ptr),
                  ACTIVATION=ACTIVATION, GRAD_ACTIVATION=GRAD_ACTIVATION, HAS_BIAS=HAS_BIAS,
                  HAS_RESIDUAL=HAS_RESIDUAL, STORE_PREACT=STORE_PREACT, SCALED=SCALED, QUANTIZE=QUANTIZE,
                  STORE_AMAX=STORE_AMAX, EMULATE_BF16=EMULATE_BF16,
                  C_IS_DESCRIPTOR=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EPILOGUE_SUBTILE=EPILOGUE_SUBTILE)
