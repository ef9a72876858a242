"""The decode variant of `_matmul_kernel`: split K, so that a few output tiles still cover every SM.

    C[M, N] = epilogue(A[M, K] @ B[K, N]), the same epilogues as `matmul._matmul_kernel`

At decode sizes (M of 1 to 256) the output is a handful of tiles, and one program per tile leaves most
SMs idle while the weights stream through a few. Here the grid is (tile, split): program (t, s) runs
the plain mainloop over its own contiguous range of K-tiles and stores its fp32 partial tile in a
workspace, then bumps the tile's arrival counter. The program that arrives last (the counter says
SPLIT_K - 1 before its add) sums the SPLIT_K partials in split order 0, 1, ..., SPLIT_K - 1, whoever
wrote them and whenever they arrived, so the result is bitwise the same every run; it then runs the
whole epilogue once and resets the counter to 0 for the next call.

No program waits for another: the last one to arrive does the work, whatever the schedule (the
interpreter's sequential one included). The interpreter runs a tile's programs in order, so there the
last split's program would always reduce; SPLIT_ORDER (`launch.splitk_order`) remaps which split each
program computes, so that tests make other splits' programs the reducer and check the bits are the same.
A gated epilogue (`matmul.GLU`) keeps two partials per split, gate then up. The counters start at 0 when the launcher allocates them, and
every call leaves them at 0, so no launch clears them. Ordering on a GPU: a CTA barrier, then the
arrival as an acq_rel atomic at GPU scope, publishes the partials of the whole CTA before the count
and makes the others' visible to the last program, which reads them from L2 (`.cg`), never from a
possibly stale L1.

Rows at or past M and columns at or past N are neither stored in the workspace nor read back: at
M = 1 a partial costs BLOCK_N * 4 bytes of traffic, not BLOCK_M * BLOCK_N * 4.
"""
import triton
import triton.language as tl

from tpkernels.kernels.matmul import _epilogue, _tile_id_to_pids, _tile_product


# The family's parameter list is written out in each of its three kernels, on purpose (a kept duplicate):
# a kernel's constexprs are its own parameters, one each. Grouped in a tuple, the epilogue's switches would
# be specialized as runtime values, its branches compiled in; the launchers pass the list flat, by name
# (`bound.bind`), and `benchmarks/compile_report.py` types it by name. Add a parameter to all three.
@triton.jit
def _matmul_splitk_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, bias_ptr, residual_ptr, preact_ptr, z_ptr, a_scale_ptr, b_scale_ptr, c_scale_ptr,
    amax_ptr, workspace_ptr, counter_ptr,
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
    # which split each program computes (`settings.splitk_order`, a debug setting): 0 program s computes
    # split s, 1 reversed, 2 rotated by half; so that another program than split SPLIT_K - 1's arrives last
    SPLIT_ORDER: tl.constexpr,
):
    tile_id = tl.program_id(0)
    SPLIT_K = tl.num_programs(1)
    split = tl.program_id(1)
    tl.static_assert(SPLIT_ORDER >= 0 and SPLIT_ORDER <= 2, "SPLIT_ORDER is 0 (in order), 1 (reversed) or 2 (rotated)")
    if SPLIT_ORDER == 1:
        split = SPLIT_K - 1 - split
    elif SPLIT_ORDER == 2:
        split = (split + SPLIT_K // 2) % SPLIT_K
    pid_m, pid_n = _tile_id_to_pids(tile_id, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    if INT64_OFFSETS:
        tile_id = tile_id.to(tl.int64)
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    # This split's K range: whole K-tiles, the same count for every split but the last (the launcher
    # chooses SPLIT_K so that none is empty; an empty one would add a zero partial).
    k_tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_start = split * k_tiles_per_split * BLOCK_K
    k_length = tl.minimum(K - k_start, k_tiles_per_split * BLOCK_K)
    GATED: tl.constexpr = ACTIVATION >= 4
    acc, acc_up = _tile_product(a_ptr, b_ptr, pid_m, pid_n, M, N, k_start, k_length, stride_am, stride_ak,
                                stride_bk, stride_bn, GATED, INPUT_PRECISION, INT64_OFFSETS, EMULATE_BF16,
                                BLOCK_M, BLOCK_N, BLOCK_K)

    # The partial of (tile, split) at workspace[tile, split], a dense [BLOCK_M, BLOCK_N] fp32 block (two,
    # gate then up, when GATED).
    PARTS: tl.constexpr = 2 if GATED else 1
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    in_bounds = (pid_m * BLOCK_M + rows < M)[:, None] & (pid_n * BLOCK_N + cols < N)[None, :]
    block = rows[:, None] * BLOCK_N + cols[None, :]
    tile_workspace = workspace_ptr + tile_id * SPLIT_K * (PARTS * BLOCK_M * BLOCK_N)
    split_workspace = tile_workspace + split * (PARTS * BLOCK_M * BLOCK_N)
    tl.store(split_workspace + block, acc, mask=in_bounds)
    if GATED:
        tl.store(split_workspace + BLOCK_M * BLOCK_N + block, acc_up, mask=in_bounds)
    tl.debug_barrier()  # every thread's partial is stored before the arrival below publishes them
    arrived = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        total = tl.load(tile_workspace + block, mask=in_bounds, other=0.0, cache_modifier=".cg")
        for s in range(1, SPLIT_K):
            total += tl.load(tile_workspace + s * (PARTS * BLOCK_M * BLOCK_N) + block, mask=in_bounds, other=0.0,
                             cache_modifier=".cg")
        total_up = total
        if GATED:
            up_workspace = tile_workspace + BLOCK_M * BLOCK_N
            total_up = tl.load(up_workspace + block, mask=in_bounds, other=0.0, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                total_up += tl.load(up_workspace + s * (2 * BLOCK_M * BLOCK_N) + block, mask=in_bounds, other=0.0,
                                    cache_modifier=".cg")
        tl.store(counter_ptr + tile_id, 0)  # the next call, ordered after this one on the stream, starts at 0
        _epilogue(total, total_up, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N,
                  c=(c_ptr, stride_cm, stride_cn), bias_ptr=bias_ptr, residual=(residual_ptr, stride_rm, stride_rn),
                  preact=(preact_ptr, stride_pm, stride_pn), z=(z_ptr, stride_zm, stride_zn),
                  scales=(a_scale_ptr, b_scale_ptr, c_scale_ptr, amax_ptr),
                  ACTIVATION=ACTIVATION, GRAD_ACTIVATION=GRAD_ACTIVATION, HAS_BIAS=HAS_BIAS,
                  HAS_RESIDUAL=HAS_RESIDUAL, STORE_PREACT=STORE_PREACT, SCALED=SCALED, QUANTIZE=QUANTIZE,
                  STORE_AMAX=STORE_AMAX, EMULATE_BF16=EMULATE_BF16,
                  C_IS_DESCRIPTOR=False, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EPILOGUE_SUBTILE=EPILOGUE_SUBTILE)
