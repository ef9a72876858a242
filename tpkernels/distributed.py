"""Conjugate collectives as autograd functions, shard arithmetic, and process-group helpers.

Each pair is one collective forward and its adjoint backward (per-rank shapes, W ranks, F_r = the
rank's share of F features, `torch.chunk(full, W)[r]`: DTensor's `Shard` layout, see `shard_sizes`):

    copy_to(x [..., F])        forward: identity                 backward: all-reduce of dX
    reduce_from(p [..., F])    forward: all-reduce of partials   backward: identity
    gather_from(h [..., F_r])  forward: all-gather -> [..., F]   backward: keep this rank's F_r slice
    scatter_to(x [..., F])     forward: keep this rank's F_r     backward: all-gather -> [..., F]

and for sequence parallelism, along a sequence dim of L positions (rank r holds L_r of them, its
`torch.chunk(full, W, dim)[r]`, the same layout):

    gather_sequence(x [.., L_r, ..])          forward: all-gather -> [.., L, ..]
                                              backward: reduce-scatter of dX -> [.., L_r, ..]
    reduce_scatter_sequence(p [.., L, ..])    forward: reduce-scatter of partials -> [.., L_r, ..]
                                              backward: all-gather of dY -> [.., L, ..]

One all-gather and one reduce-scatter move the bytes of one all-reduce; between them the activations
are 1/W of their size. `sequence_sizes` checks that the ranks' shards fit together before any of them
collectively moves data.

All take an explicit `process_group` (None: the default group, or a 1-D DeviceMesh: its group) and return their input untouched at
world size 1 or when torch.distributed is not initialised. The collectives are torch's traceable
functional collectives, so `torch.compile(fullgraph=True)` keeps them in the graph: NCCL for CUDA
tensors, gloo for CPU ones, whatever backend the group was created with.

Debugging: with TPKERNELS_DEBUG_COLLECTIVES=1 in the environment, every collective first gathers each
rank's shape and dtype and raises a ValueError naming them when they differ, instead of hanging or
reducing mismatched buffers (eager mode only: it is skipped while torch.compile traces).
"""
import contextlib
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["copy_to", "count_collectives", "gather_from", "gather_sequence", "gather_sequence_chunk", "get_rank",
           "get_world_size", "group_of", "reduce_from", "reduce_scatter_sequence", "reduce_scatter_sequence_chunk", "scatter_to",
           "sequence_sizes", "shard", "shard_range", "shard_sizes"]

DEBUG_ENV = "TPKERNELS_DEBUG_COLLECTIVES"
# all_gather_single replaced all_gather_tensor in newer torch; both gather along dim 0.
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter_dim0 = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
_counters = []


# ---------------------------------------------------------------------------------------------------
# Process groups and shards


def group_of(process_group):
    """The ProcessGroup that `process_group` names: a ProcessGroup as it is, None (the default group) as
    None, and a 1-D DeviceMesh (`mesh["tp"]`) as its group."""
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(f"tpkernels takes a 1-D DeviceMesh (the tensor-parallel dimension, mesh['tp']), "
                             f"got a {process_group.ndim}-D mesh of shape {tuple(process_group.shape)} with dims "
                             f"{process_group.mesh_dim_names}")
        return process_group.get_group()
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be None, a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(process_group).__name__}")
    return process_group


def _group(process_group):
    group = group_of(process_group)
    return dist.group.WORLD if group is None else group


def get_world_size(process_group=None):
    """The group's size; 1 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(_group(process_group))


def get_rank(process_group=None):
    """This process's rank in the group; 0 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(_group(process_group))


def shard_sizes(features, world_size):
    """Sizes of `torch.chunk` into `world_size` parts, the layout of DTensor's `Shard`: ceil(F / W) each,
    the last ranks' shards shorter, and empty once the features run out (F = 9 on 4 ranks: 3, 3, 3, 0).
    One layout for parameters and sequence shards alike, so that torch.distributed.checkpoint, FSDP2 and
    DTensor's own layers read them as they are."""
    width = -(-features // world_size) if world_size else 0
    return [max(0, min(width, features - r * width)) for r in range(world_size)]


def shard_range(features, world_size, rank):
    """(start, stop) of rank's slice, matching `torch.chunk(t, world_size, dim)[rank]` (empty past the end)."""
    width = -(-features // world_size)
    start = min(rank * width, features)
    return start, min(start + width, features)


def shard(t, world_size, rank, dim=0):
    """Rank's shard of t along dim: `torch.chunk(t, world_size, dim)[rank]`, or an empty slice where
    torch.chunk gives fewer pieces."""
    start, stop = shard_range(t.shape[dim], world_size, rank)
    return t.narrow(dim, start, stop - start)


# ---------------------------------------------------------------------------------------------------
# Instrumented collectives


class CollectiveCounts:
    """What the collectives issued inside `count_collectives()` moved, as seen from this rank.

    `records` holds one dict per collective: kind ("all_reduce", "all_gather", "reduce_scatter", or
    "shape_exchange": sequence parallelism's check of the ranks' shard shapes), payload_bytes (the
    tensor this rank contributes), sent_bytes (what this rank sends under the ring algorithm:
    2 (W-1)/W x payload for an all-reduce, (W-1)/W x payload for a reduce-scatter, (W-1) x payload
    for an all-gather) and shape.
    """

    def __init__(self):
        self.records = []

    def count(self, kind=None):
        return sum(1 for r in self.records if kind is None or r["kind"] == kind)

    @property
    def sent_bytes(self):
        return sum(r["sent_bytes"] for r in self.records)


@contextlib.contextmanager
def count_collectives():
    """Record every collective this process issues inside the block (eager mode), backward ones included."""
    counts = CollectiveCounts()
    _counters.append(counts)
    try:
        yield counts
    finally:
        _counters.remove(counts)


def _before_collective(kind, t, group):
    if torch.compiler.is_compiling():
        return
    world = dist.get_world_size(group)
    payload = t.numel() * t.element_size()
    if kind == "all_reduce":
        sent = 2 * (world - 1) * payload // world
    elif kind == "reduce_scatter":  # payload: the whole padded input; each rank keeps 1/W of the sum
        sent = (world - 1) * payload // world
    else:  # all_gather, shape_exchange: payload is this rank's contribution
        sent = (world - 1) * payload
    for counts in _counters:
        counts.records.append(dict(kind=kind, payload_bytes=payload, sent_bytes=sent, shape=tuple(t.shape)))
    if os.environ.get(DEBUG_ENV) == "1":
        _check_same_on_every_rank(kind, t, group)


_DTYPE_CODES = {dtype: code for code, dtype in enumerate(
    (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32))}
_MAX_DIMS = 8


def _rank_shapes(t, group, kind=None):
    """Every rank's (shape, dtype code) of t, by rank: one small all-gather (counted as `kind` if given).
    t has at most _MAX_DIMS dims."""
    mine = torch.tensor([t.dim(), _DTYPE_CODES.get(t.dtype, -1), *t.shape] + [0] * (_MAX_DIMS - t.dim()),
                        dtype=torch.int64, device=t.device)
    if kind is not None:
        _before_collective(kind, mine, group)
    metas = funcol.wait_tensor(_all_gather_dim0(mine, 0, group)).view(dist.get_world_size(group), -1).tolist()
    return [(tuple(meta[2:2 + meta[0]]), meta[1]) for meta in metas]


def _check_same_on_every_rank(kind, t, group):
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"{DEBUG_ENV}: cannot check a {t.dim()}-d tensor (at most {_MAX_DIMS} dims)")
    metas = _rank_shapes(t, group)
    if any(meta != metas[0] for meta in metas):
        described = []
        for rank, (shape, code) in enumerate(metas):
            dtype = next((d for d, c in _DTYPE_CODES.items() if c == code), "other")
            described.append(f"rank {rank}: {shape} {dtype}")
        raise ValueError(
            f"{kind}: the ranks' tensors differ, so the collective would hang or mix buffers: "
            + "; ".join(described)
        )


def _unwaited(result, group):
    """A collective's result left un-waited (torch's AsyncCollectiveTensor: the first use waits), where the
    group's backend can carry several collectives in flight. Gloo on CPU tensors is waited at once: with
    several of its all-gathers in flight, the overlapped MLP corrupted the heap in a stress run (torch
    2.13, "malloc(): unaligned tcache chunk detected"), and gloo's threads compete with the CPU's compute
    anyway. Gloo on CUDA tensors (the GPU tests' ranks) stays un-waited, as NCCL does."""
    return funcol.wait_tensor(result) if dist.get_backend(group) == "gloo" and not result.is_cuda else result


def _all_reduce(t, group, wait=True):
    """The sum over the group; un-waited (see `_unwaited`) unless `wait`."""
    _before_collective("all_reduce", t, group)
    reduced = funcol.all_reduce(t.contiguous(), "sum", group)
    return funcol.wait_tensor(reduced) if wait else _unwaited(reduced, group)


def _split_last_dim(t, group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    start, stop = shard_range(t.shape[-1], world, rank)
    return t[..., start:stop].contiguous()


def pad_dim0(t, rows):
    """t with zero rows appended along dim 0 up to `rows` (uneven shards travel padded to the longest)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _all_gather_dim(t, sizes, dim, group):
    """Concatenate every rank's t (sizes[r] long along dim, sizes allowed to differ) along dim."""
    width = max(sizes)
    padded = pad_dim0(t.movedim(dim, 0), width).contiguous()
    _before_collective("all_gather", padded, group)
    gathered = funcol.wait_tensor(_all_gather_dim0(padded, 0, group))
    pieces = [gathered[r * width:r * width + size] for r, size in enumerate(sizes)]
    return torch.cat(pieces).movedim(0, dim)


def _reduce_scatter_dim(t, sizes, dim, group):
    """Sum t over the ranks and keep this rank's slice along dim (sizes[rank] long)."""
    width = max(sizes)
    parts = torch.split(t.movedim(dim, 0), sizes)
    padded = torch.cat([pad_dim0(part, width) for part in parts]).contiguous()
    _before_collective("reduce_scatter", padded, group)
    mine = funcol.wait_tensor(_reduce_scatter_dim0(padded, "sum", 0, group))
    return mine[:sizes[dist.get_rank(group)]].movedim(0, dim).contiguous()


def _normalize_dim(name, dim, ndim):
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}: sequence_dim={dim} is out of range for a {ndim}-d input "
                         f"(valid: {-ndim} to {ndim - 1})")
    return dim % ndim


def sequence_sizes(x, sequence_dim, process_group=None, name="sequence_sizes"):
    """The lengths of every rank's sequence shard along `sequence_dim`, checked to fit together.

    One small all-gather of every rank's shape (counted as "shape_exchange"). Every rank gets the same
    shapes, so every rank raises the same ValueError, before any collective moves data, when the shards
    are not `torch.chunk(full, world_size, sequence_dim)` of one tensor: a shard of the wrong
    length, or other dims that differ.

    Returns:
        [L_0, ..., L_{W-1}]; sum(...) is the full length.
    """
    world = get_world_size(process_group)
    dim = _normalize_dim(name, sequence_dim, x.dim())
    if world == 1:
        return [x.shape[dim]]
    group = _group(process_group)
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"{name}: at most {_MAX_DIMS} dims, got a {x.dim()}-d input")
    shapes = [shape for shape, _ in _rank_shapes(x, group, kind="shape_exchange")]
    lengths = [shape[dim] if len(shape) > dim else -1 for shape in shapes]
    expected = shard_sizes(max(sum(lengths), 0), world)
    others = {shape[:dim] + shape[dim + 1:] for shape in shapes}
    if len(others) > 1 or lengths != expected:
        described = "; ".join(f"rank {r}: {shape}" for r, shape in enumerate(shapes))
        raise ValueError(
            f"{name}: with sequence_parallel=True rank r must hold tpkernels.distributed.shard(x, {world}, r, "
            f"dim={sequence_dim}) of one tensor (torch.chunk's layout), so the shards along dim {dim} must be {expected} "
            f"long (for {sum(lengths)} positions) and every other dim equal; got {described}"
        )
    return lengths


# ---------------------------------------------------------------------------------------------------
# Conjugate pairs


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, wait):
        ctx.group, ctx.wait = group, wait
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group, ctx.wait), None, None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group, wait):
        return _all_reduce(partial, group, wait)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, sizes, group):
        ctx.group = group
        return _all_gather_dim(shard, sizes, shard.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None, None


class _ScatterTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.sizes = shard_sizes(x.shape[-1], dist.get_world_size(group))
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, ctx.sizes, grad.dim() - 1, ctx.group), None


def copy_to(x, process_group=None, *, wait=True):
    """Enter a column-parallel region: identity forward, all-reduce of the input gradient backward.

    wait=False leaves that all-reduce un-waited (for one chunk of rows: it runs while the other chunks'
    backward GEMMs do)."""
    if get_world_size(process_group) == 1:
        return x
    return _CopyTo.apply(x, _group(process_group), wait)


def reduce_from(partial, process_group=None, *, wait=True):
    """Leave a row-parallel region: all-reduce (sum) of the partials forward, identity backward.

    wait=False returns the sum un-waited (for one chunk of a chunked, overlapped row stage: the first
    use waits)."""
    if get_world_size(process_group) == 1:
        return partial
    return _ReduceFrom.apply(partial, _group(process_group), wait)


def gather_from(shard, features, process_group=None):
    """All-gather column shards [..., F_r] into [..., features]; backward keeps this rank's slice.

    Args:
        shard: this rank's `shard(full, world_size, rank, -1)` (torch.chunk's layout).
        features: the full width F, so that uneven shards are reassembled exactly.
    """
    world = get_world_size(process_group)
    if world == 1:
        return shard
    return _GatherFrom.apply(shard, shard_sizes(features, world), _group(process_group))


def scatter_to(x, process_group=None):
    """Keep this rank's slice of the last dim (`shard`); backward all-gathers the gradient."""
    if get_world_size(process_group) == 1:
        return x
    return _ScatterTo.apply(x, _group(process_group))


# _GatherSequence and _ReduceScatterSequence have one shape on purpose: they are conjugates, each one's
# forward the other's backward (as _GatherFrom and _ScatterTo, and the chunked pair below).
class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, dim, group):
        ctx.sizes, ctx.dim, ctx.group = sizes, dim, group
        return _all_gather_dim(x, sizes, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim(grad, ctx.sizes, ctx.dim, ctx.group), None, None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, sizes, dim, group):
        ctx.sizes, ctx.dim, ctx.group = sizes, dim, group
        return _reduce_scatter_dim(partial, sizes, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, ctx.sizes, ctx.dim, ctx.group), None, None, None


def gather_sequence(x, sizes, sequence_dim=-2, process_group=None):
    """All-gather sequence shards into the full sequence; backward reduce-scatters the gradient.

    Args:
        x: this rank's shard, `shard(full, world_size, rank, sequence_dim)`.
        sizes: every rank's shard length (`sequence_sizes`).
        sequence_dim: the sequence dim of x.
    """
    if get_world_size(process_group) == 1:
        return x
    dim = _normalize_dim("gather_sequence", sequence_dim, x.dim())
    return _GatherSequence.apply(x, list(sizes), dim, _group(process_group))


def reduce_scatter_sequence(partial, sequence_dim=-2, process_group=None):
    """Sum the ranks' partials and keep this rank's slice of the sequence (`shard`); backward
    all-gathers the gradient. Returns [.., L_r, ..]."""
    world = get_world_size(process_group)
    if world == 1:
        return partial
    dim = _normalize_dim("reduce_scatter_sequence", sequence_dim, partial.dim())
    return _ReduceScatterSequence.apply(partial, shard_sizes(partial.shape[dim], world), dim, _group(process_group))


# ---------------------------------------------------------------------------------------------------
# Chunked collectives for comm/compute overlap. Each returns its result un-waited (torch's
# AsyncCollectiveTensor; on gloo, waited: `_unwaited`): the collective runs while the caller computes
# the next chunk, and the first use of the result waits for it. The bytes of the chunks add up to the
# unchunked collective's.


class _GatherChunkAsync(torch.autograd.Function):
    """[w, ...] on each rank -> [W * w, ...]: rank r's chunk at rows r*w:(r+1)*w. Backward reduce-scatters."""

    @staticmethod
    def forward(ctx, chunk, group):
        ctx.group = group
        chunk = chunk.contiguous()
        _before_collective("all_gather", chunk, group)
        return _unwaited(_all_gather_dim0(chunk, 0, group), group)

    @staticmethod
    def backward(ctx, grad):  # un-waited too: the other chunks' backward GEMMs run meanwhile
        grad = grad.contiguous()
        _before_collective("reduce_scatter", grad, ctx.group)
        return _unwaited(_reduce_scatter_dim0(grad, "sum", 0, ctx.group), ctx.group), None


class _ReduceScatterChunkAsync(torch.autograd.Function):
    """[W * w, ...] partials -> [w, ...]: the sum of every rank's rows r*w:(r+1)*w for r = this rank."""

    @staticmethod
    def forward(ctx, partial, group):
        ctx.group = group
        partial = partial.contiguous()
        _before_collective("reduce_scatter", partial, group)
        return _unwaited(_reduce_scatter_dim0(partial, "sum", 0, group), group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        _before_collective("all_gather", grad, ctx.group)
        return _unwaited(_all_gather_dim0(grad, 0, ctx.group), ctx.group), None


def gather_sequence_chunk(chunk, width, process_group=None):
    """All-gather one chunk of this rank's sequence shard (dim 0), padded to `width` rows: returns
    [W * width, ...] un-waited; its backward reduce-scatters the gradient."""
    padded = pad_dim0(chunk, width)
    if get_world_size(process_group) == 1:
        return padded
    return _GatherChunkAsync.apply(padded, _group(process_group))


def reduce_scatter_sequence_chunk(partial, process_group=None):
    """Reduce-scatter [W * width, ...] partials (rank r's rows at r*width) into this rank's [width, ...],
    un-waited; its backward all-gathers the gradient."""
    if get_world_size(process_group) == 1:
        return partial
    return _ReduceScatterChunkAsync.apply(partial, _group(process_group))
