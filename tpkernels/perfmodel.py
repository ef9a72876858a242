"""A performance model of one tensor-parallel MLP step, and when comm/compute overlap pays.

Per rank, for W ranks, M tokens, model width K and hidden width H (each rank holds H / W):

    forward    column GEMM  M x K x H/W    row GEMM  M x H/W x K    all-reduce of y   [M, K]
    backward   four GEMMs of the same sizes                         all-reduce of dX  [M, K]

GEMM time is a roofline: max(2 M N K / peak, bytes moved / bandwidth), or a measured time where the
caller passes one. A collective is alpha-beta, in NCCL's bus-bandwidth terms (nccl-tests' convention):

    all-reduce of S bytes           alpha + S * 2 (W - 1) / W / bus_bandwidth
    all-gather, reduce-scatter      alpha + S * (W - 1) / W / bus_bandwidth   (S the gathered size)

A gated MLP (`gated=True`: Llama's down(act(x @ Wg.T) * (x @ Wu.T))) has a column stage twice as wide:
gate and up, M x K x 2H/W in one launch, and its backward's column GEMMs are twice as wide too. Unfused,
that stage is one merged GEMM writing [g | u] and an elementwise act(g) * u pass: `gated_column_times`.

Overlap splits M into C chunks and pipelines each chunk's GEMM with the previous chunk's collective:
with g and c a chunk's GEMM and collective times, the pair costs g + (C - 1) max(g, c) + c, against
G + (alpha + S-term) without chunks. Chunks pay alpha and a launch each, and small chunks run their
GEMMs further below peak (the roofline at M / C rows), so below some M overlap loses: `break_even_m`.

The machines below are assumptions, not measurements, each overridable:
- H100 SXM: 989 TFLOP/s dense bf16 and 3.35 TB/s HBM3 (NVIDIA's H100 datasheet). NVLink 4 carries
  450 GB/s each way per GPU; large all-reduces on 8 GPUs reach a few hundred GB/s of NCCL bus
  bandwidth, taken here as 360 GB/s, with 15 us latency.
- Across nodes on InfiniBand NDR (400 Gb/s, 50 GB/s per GPU): 40 GB/s of bus bandwidth, 30 us latency.
- 5 us of launch overhead per extra chunk.
No multi-GPU run has measured the collectives yet (one GPU so far), so these stay assumptions: pass a
Machine with your own figures (`--bus-bandwidth`, `--latency-us` of `python -m tpkernels model`; `tpkernels.overlap.OVERLAP_MACHINE`
for overlap="auto").
"""
import dataclasses
import math

__all__ = ["DEFAULT_MACHINE", "MACHINES", "Machine", "break_even_m", "gated_column_times", "predict", "strategy_times"]


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    peak_flops: float  # dense, in the step's dtype, FLOP/s
    memory_bandwidth: float  # bytes/s
    bus_bandwidth: float  # NCCL bus bandwidth of the tensor-parallel group, bytes/s
    latency: float  # seconds per collective
    launch_overhead: float = 5e-6  # seconds per extra chunk


MACHINES = {
    "h100-nvlink": Machine("H100 SXM, NVLink (one node)", 989e12, 3.35e12, 360e9, 15e-6),
    "h100-ib": Machine("H100 SXM, InfiniBand NDR (across nodes)", 989e12, 3.35e12, 40e9, 30e-6),
}
# The machine the package asks about when nobody names one: overlap="auto" (`tpkernels.overlap.OVERLAP_MACHINE`
# starts as this) and the strategy table of `python -m tpkernels`.
DEFAULT_MACHINE = "h100-nvlink"


def machine(name_or_machine):
    """A `Machine`, from itself or from its key in MACHINES."""
    if isinstance(name_or_machine, Machine):
        return name_or_machine
    if name_or_machine not in MACHINES:
        raise ValueError(f"unknown machine {name_or_machine!r}: use one of {', '.join(sorted(MACHINES))} or a "
                         f"tpkernels.perfmodel.Machine")
    return MACHINES[name_or_machine]


def gemm_time(m, n, k, machine, element_size=2):
    """Roofline time of an [m, k] @ [k, n] GEMM: each operand read once, the output written once."""
    flops = 2 * m * n * k
    moved = (m * k + k * n + m * n) * element_size
    return max(flops / machine.peak_flops, moved / machine.memory_bandwidth)


def all_reduce_time(nbytes, world, machine):
    if world == 1:
        return 0.0
    return machine.latency + nbytes * 2 * (world - 1) / world / machine.bus_bandwidth


def gather_time(nbytes, world, machine):
    """An all-gather (or reduce-scatter) whose whole, gathered (or unreduced) tensor is nbytes."""
    if world == 1:
        return 0.0
    return machine.latency + nbytes * (world - 1) / world / machine.bus_bandwidth


def strategy_times(tokens, in_features, hidden, out_features, world, machine, element_size=2):
    """Predicted forward seconds per rank of the four ways `python -m tpkernels` runs y = MLP(x), M tokens:

        a  column -> all-gather [M, H] -> GELU -> column -> all-gather [M, N]
        b  row -> all-reduce [M, H] -> GELU -> row -> all-reduce [M, N]
        c  column (GELU fused) -> row -> all-reduce [M, N]                 (TensorParallelMLP)
        d  all-gather [M, K] -> column (GELU fused) -> row -> reduce-scatter [M, N]   (sequence parallel)
    """
    M, K, H, N, W, b = tokens, in_features, hidden, out_features, world, element_size

    def gemm(m, n, k):
        return gemm_time(m, n, k, machine, b)

    def share(features):
        return math.ceil(features / W)

    return {
        "a": gemm(M, share(H), K) + gather_time(M * H * b, W, machine) + gemm(M, share(N), H)
        + gather_time(M * N * b, W, machine),
        "b": gemm(M, H, share(K)) + all_reduce_time(M * H * b, W, machine) + gemm(M, N, share(H))
        + all_reduce_time(M * N * b, W, machine),
        "c": gemm(M, share(H), K) + gemm(M, N, share(H)) + all_reduce_time(M * N * b, W, machine),
        "d": gather_time(M * K * b, W, machine) + gemm(M, share(H), K) + gemm(M, N, share(H))
        + gather_time(M * N * b, W, machine),
    }


def gated_column_times(tokens, hidden, ffn, world, machine, element_size=2, launch=3e-6):
    """Predicted seconds of a gated MLP's column stage on one rank, F_r = ceil(ffn / world):

        fused    one launch: M x K x 2F_r, x read once, h [M, F_r] written           (tpkernels.linear_glu)
        unfused  one merged GEMM writing [g | u] [M, 2F_r], then act(g) * u: reads 2 M F_r, writes M F_r,
                 and a second launch (`launch` seconds, a kernel's fixed cost)         (the fair eager baseline)
    """
    shard = math.ceil(ffn / world)
    b = element_size
    gemm = gemm_time(tokens, 2 * shard, hidden, machine, b)
    fused = max(2 * tokens * 2 * shard * hidden / machine.peak_flops,
                (tokens * hidden + 2 * shard * hidden + tokens * shard) * b / machine.memory_bandwidth)
    elementwise = 3 * tokens * shard * b / machine.memory_bandwidth
    return dict(fused=fused, unfused=gemm + launch + elementwise)


def _pipelined(gemm, collective, chunks, m, machine):
    """A GEMM whose output a collective reduces, in `chunks` pipelined pieces; gemm(rows) gives a GEMM
    time, collective(rows) a collective time."""
    if chunks <= 1:
        return gemm(m) + collective(m)
    rows = math.ceil(m / chunks)
    g = gemm(rows) + machine.launch_overhead
    c = collective(rows)
    return g + (chunks - 1) * max(g, c) + c


def predict(tokens, hidden, ffn, world, machine, element_size=2, chunks=None, gemm_times=None, gated=False):
    """Predicted seconds of one TP MLP step on each rank.

    Args:
        tokens, hidden, ffn: M, the model width K and the MLP's hidden width H (the whole, not a shard).
        world: ranks in the tensor-parallel group.
        machine: a `Machine`.
        element_size: bytes per element of activations, weights and the reduced tensors.
        chunks: overlap chunks (None: the world size, at least 2).
        gemm_times: optional {"column": s, "row": s} measured forward GEMM times at this M (the backward's
            four GEMMs are taken as twice the forward's two).
        gated: a gated MLP: the column stage (gate and up) and its backward GEMMs are twice as wide.

    Returns:
        dict with forward and step (forward + backward) times, each without and with overlap, and the
        share of communication in the step without overlap.
    """
    shard = math.ceil(ffn / world)
    width = 2 * shard if gated else shard  # the column stage's outputs: gate and up, or fc1
    chunks = chunks or max(2, world)
    scale = 1.0
    if gemm_times:
        scale = (gemm_times["column"] + gemm_times["row"]) / (
            gemm_time(tokens, width, hidden, machine, element_size) + gemm_time(tokens, hidden, shard, machine, element_size))

    def column(m):
        return scale * gemm_time(m, width, hidden, machine, element_size)

    def row(m):
        return scale * gemm_time(m, hidden, shard, machine, element_size)

    def reduce(m):
        return all_reduce_time(m * hidden * element_size, world, machine)

    forward = column(tokens) + row(tokens) + reduce(tokens)
    forward_overlap = column(tokens) + _pipelined(row, reduce, chunks if world > 1 else 1, tokens, machine)
    # backward: dH and dW2 from the row layer, then dX (reduced) and dW1 from the column layer
    backward = row(tokens) + column(tokens) + column(tokens) + row(tokens) + reduce(tokens)
    backward_overlap = row(tokens) + column(tokens) + row(tokens) + _pipelined(
        column, reduce, chunks if world > 1 else 1, tokens, machine)
    communication = 2 * reduce(tokens)
    return dict(world=world, tokens=tokens, chunks=chunks, forward=forward, forward_overlap=forward_overlap,
                step=forward + backward, step_overlap=forward_overlap + backward_overlap,
                communication_share=communication / (forward + backward))


def break_even_m(hidden, ffn, world, machine, element_size=2, chunks=None, max_tokens=1 << 20, gated=False):
    """The smallest power-of-two M from which chunked overlap beats no overlap for the step (and stays
    ahead up to max_tokens), or None when it never does (world size 1: nothing to overlap)."""
    if world == 1:
        return None
    m, found = 1, None
    while m <= max_tokens:
        p = predict(m, hidden, ffn, world, machine, element_size, chunks, gated=gated)
        if p["step_overlap"] < p["step"]:
            found = m if found is None else found
        else:
            found = None
        m *= 2
    return found
