"""Conjugate collectives of the feature dim as autograd functions, shard arithmetic, and process-group helpers.

Each pair is one collective forward and its adjoint backward (per-rank shapes, W ranks, F_r = the
rank's share of F features, `torch.chunk(full, W)[r]`: DTensor's `Shard` layout, see `shard_sizes`):

    copy_to(x [..., F])        forward: identity                 backward: all-reduce of dX
    reduce_from(p [..., F])    forward: all-reduce of partials   backward: identity
    gather_from(h [..., F_r])  forward: all-gather -> [..., F]   backward: keep this rank's F_r slice
    scatter_to(x [..., F])     forward: keep this rank's F_r     backward: all-gather -> [..., F]

Sequence parallelism's pairs build on the helpers here (`all_gather_dim`, `reduce_scatter_dim`) and live
in `sequence_parallel`. All take an explicit `process_group` (None: the default group, or a 1-D DeviceMesh:
its group) and return their input untouched at
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

__all__ = ["MAX_DIMS", "all_gather_dim", "before_collective", "copy_to", "count_collectives", "gather_from", "get_rank",
           "get_world_size", "group_handle", "group_of", "pad_dim0", "rank_shapes", "reduce_from", "reduce_scatter_dim",
           "scatter_to", "shard", "shard_range", "shard_sizes", "unwaited"]

DEBUG_ENV = "TPKERNELS_DEBUG_COLLECTIVES"
# all_gather_single replaced all_gather_tensor in newer torch; both gather along dim 0.
all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
reduce_scatter_dim0 = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
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


def group_handle(process_group):
    group = group_of(process_group)
    return dist.group.WORLD if group is None else group


def get_world_size(process_group=None):
    """The group's size; 1 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group_handle(process_group))


def get_rank(process_group=None):
    """This process's rank in the group; 0 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group_handle(process_group))


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


def before_collective(kind, t, group):
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
MAX_DIMS = 8


def rank_shapes(t, group, kind=None):
    """Every rank's (shape, dtype code) of t, by rank: one small all-gather (counted as `kind` if given).
    t has at most MAX_DIMS dims."""
    mine = torch.tensor([t.dim(), _DTYPE_CODES.get(t.dtype, -1), *t.shape] + [0] * (MAX_DIMS - t.dim()),
                        dtype=torch.int64, device=t.device)
    if kind is not None:
        before_collective(kind, mine, group)
    metas = funcol.wait_tensor(all_gather_dim0(mine, 0, group)).view(dist.get_world_size(group), -1).tolist()
    return [(tuple(meta[2:2 + meta[0]]), meta[1]) for meta in metas]


def _check_same_on_every_rank(kind, t, group):
    if t.dim() > MAX_DIMS:
        raise ValueError(f"{DEBUG_ENV}: cannot check a {t.dim()}-d tensor (at most {MAX_DIMS} dims)")
    metas = rank_shapes(t, group)
    if any(meta != metas[0] for meta in metas):
        described = []
        for rank, (shape, code) in enumerate(metas):
            dtype = next((d for d, c in _DTYPE_CODES.items() if c == code), "other")
            described.append(f"rank {rank}: {shape} {dtype}")
        raise ValueError(
            f"{kind}: the ranks' tensors differ, so the collective would hang or mix buffers: "
            + "; ".join(described)
        )


def unwaited(result, group):
    """A collective's result left un-waited (torch's AsyncCollectiveTensor: the first use waits), where the
    group's backend can carry several collectives in flight. Gloo on CPU tensors is waited at once: with
    several of its all-gathers in flight, the overlapped MLP corrupted the heap in a stress run (torch
    2.13, "malloc(): unaligned tcache chunk detected"), and gloo's threads compete with the CPU's compute
    anyway. Gloo on CUDA tensors (the GPU tests' ranks) stays un-waited, as NCCL does."""
    return funcol.wait_tensor(result) if dist.get_backend(group) == "gloo" and not result.is_cuda else result


def _all_reduce(t, group, wait=True):
    """The sum over the group; un-waited (see `unwaited`) unless `wait`."""
    before_collective("all_reduce", t, group)
    reduced = funcol.all_reduce(t.contiguous(), "sum", group)
    return funcol.wait_tensor(reduced) if wait else unwaited(reduced, group)


def _split_last_dim(t, group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    start, stop = shard_range(t.shape[-1], world, rank)
    return t[..., start:stop].contiguous()


def pad_dim0(t, rows):
    """t with zero rows appended along dim 0 up to `rows` (uneven shards travel padded to the longest)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def all_gather_dim(t, sizes, dim, group):
    """Concatenate every rank's t (sizes[r] long along dim, sizes allowed to differ) along dim."""
    width = max(sizes)
    padded = pad_dim0(t.movedim(dim, 0), width).contiguous()
    before_collective("all_gather", padded, group)
    gathered = funcol.wait_tensor(all_gather_dim0(padded, 0, group))
    pieces = [gathered[r * width:r * width + size] for r, size in enumerate(sizes)]
    return torch.cat(pieces).movedim(0, dim)


def reduce_scatter_dim(t, sizes, dim, group):
    """Sum t over the ranks and keep this rank's slice along dim (sizes[rank] long)."""
    width = max(sizes)
    parts = torch.split(t.movedim(dim, 0), sizes)
    padded = torch.cat([pad_dim0(part, width) for part in parts]).contiguous()
    before_collective("reduce_scatter", padded, group)
    mine = funcol.wait_tensor(reduce_scatter_dim0(padded, "sum", 0, group))
    return mine[:sizes[dist.get_rank(group)]].movedim(0, dim).contiguous()


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
        return all_gather_dim(shard, sizes, shard.dim() - 1, group)

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
        return all_gather_dim(grad, ctx.sizes, grad.dim() - 1, ctx.group), None


def copy_to(x, process_group=None, *, wait=True):
    """Enter a column-parallel region: identity forward, all-reduce of the input gradient backward.

    wait=False leaves that all-reduce un-waited (for one chunk of rows: it runs while the other chunks'
    backward GEMMs do)."""
    if get_world_size(process_group) == 1:
        return x
    return _CopyTo.apply(x, group_handle(process_group), wait)


def reduce_from(partial, process_group=None, *, wait=True):
    """Leave a row-parallel region: all-reduce (sum) of the partials forward, identity backward.

    wait=False returns the sum un-waited (for one chunk of a chunked, overlapped row stage: the first
    use waits)."""
    if get_world_size(process_group) == 1:
        return partial
    return _ReduceFrom.apply(partial, group_handle(process_group), wait)


def gather_from(shard, features, process_group=None):
    """All-gather column shards [..., F_r] into [..., features]; backward keeps this rank's slice.

    Args:
        shard: this rank's `shard(full, world_size, rank, -1)` (torch.chunk's layout).
        features: the full width F, so that uneven shards are reassembled exactly.
    """
    world = get_world_size(process_group)
    if world == 1:
        return shard
    return _GatherFrom.apply(shard, shard_sizes(features, world), group_handle(process_group))


def scatter_to(x, process_group=None):
    """Keep this rank's slice of the last dim (`shard`); backward all-gathers the gradient."""
    if get_world_size(process_group) == 1:
        return x
    return _ScatterTo.apply(x, group_handle(process_group))
