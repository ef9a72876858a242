"""Conjugate collectives as autograd functions, shard arithmetic, and process-group helpers.

Each pair is one collective forward and its adjoint backward (per-rank shapes, W ranks, F_r = the
rank's share of F features under `torch.tensor_split`):

    copy_to(x [..., F])        forward: identity                 backward: all-reduce of dX
    reduce_from(p [..., F])    forward: all-reduce of partials   backward: identity
    gather_from(h [..., F_r])  forward: all-gather -> [..., F]   backward: keep this rank's F_r slice
    scatter_to(x [..., F])     forward: keep this rank's F_r     backward: all-gather -> [..., F]

All take an explicit `process_group` (None: the default group) and return their input untouched at
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

__all__ = [
    "copy_to",
    "count_collectives",
    "gather_from",
    "get_rank",
    "get_world_size",
    "reduce_from",
    "scatter_to",
    "shard_range",
    "shard_sizes",
]

DEBUG_ENV = "TPKERNELS_DEBUG_COLLECTIVES"
# all_gather_single replaced all_gather_tensor in newer torch; both gather along dim 0.
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_counters = []


# ---------------------------------------------------------------------------------------------------
# Process groups and shards


def _group(process_group):
    return dist.group.WORLD if process_group is None else process_group


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
    """Sizes of `torch.tensor_split` into `world_size` parts: the first `features % world_size` are one larger."""
    base, extra = divmod(features, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_range(features, world_size, rank):
    """(start, stop) of rank's slice, matching `torch.tensor_split(t, world_size, dim)[rank]`."""
    sizes = shard_sizes(features, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# ---------------------------------------------------------------------------------------------------
# Instrumented collectives


class CollectiveCounts:
    """What the collectives issued inside `count_collectives()` moved, as seen from this rank.

    `records` holds one dict per collective: kind, payload_bytes (the tensor this rank contributes),
    sent_bytes (what this rank sends under the ring algorithm: 2 (W-1)/W x payload for an all-reduce,
    (W-1) x payload for an all-gather) and shape.
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
    sent = 2 * (world - 1) * payload // world if kind == "all_reduce" else (world - 1) * payload
    for counts in _counters:
        counts.records.append(dict(kind=kind, payload_bytes=payload, sent_bytes=sent, shape=tuple(t.shape)))
    if os.environ.get(DEBUG_ENV) == "1":
        _check_same_on_every_rank(kind, t, group)


_DTYPE_CODES = {dtype: code for code, dtype in enumerate(
    (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32))}
_MAX_DIMS = 8


def _check_same_on_every_rank(kind, t, group):
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"{DEBUG_ENV}: cannot check a {t.dim()}-d tensor (at most {_MAX_DIMS} dims)")
    mine = [t.dim(), _DTYPE_CODES.get(t.dtype, -1), *t.shape] + [0] * (_MAX_DIMS - t.dim())
    world = dist.get_world_size(group)
    gathered = [torch.empty(len(mine), dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.int64, device=t.device), group=group)
    metas = [g.tolist() for g in gathered]
    if any(meta != mine for meta in metas):
        described = []
        for rank, meta in enumerate(metas):
            dtype = next((d for d, c in _DTYPE_CODES.items() if c == meta[1]), "other")
            described.append(f"rank {rank}: {tuple(meta[2:2 + meta[0]])} {dtype}")
        raise ValueError(
            f"{kind}: the ranks' tensors differ, so the collective would hang or mix buffers: "
            + "; ".join(described)
        )


def _all_reduce(t, group):
    _before_collective("all_reduce", t, group)
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


def _all_gather_last_dim(t, sizes, group):
    """Concatenate every rank's [..., sizes[r]] along the last dim, sizes being allowed to differ."""
    width = max(sizes)
    padded = torch.nn.functional.pad(t, (0, width - t.shape[-1])).unsqueeze(0).contiguous()
    _before_collective("all_gather", padded, group)
    gathered = funcol.wait_tensor(_all_gather_dim0(padded, 0, group))
    return torch.cat([gathered[r, ..., :size] for r, size in enumerate(sizes)], dim=-1)


def _split_last_dim(t, group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    start, stop = shard_range(t.shape[-1], world, rank)
    return t[..., start:stop].contiguous()


# ---------------------------------------------------------------------------------------------------
# Conjugate pairs


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group):
        return _all_reduce(partial, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, sizes, group):
        ctx.group = group
        return _all_gather_last_dim(shard, sizes, group)

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
        return _all_gather_last_dim(grad, ctx.sizes, ctx.group), None


def copy_to(x, process_group=None):
    """Enter a column-parallel region: identity forward, all-reduce of the input gradient backward."""
    if get_world_size(process_group) == 1:
        return x
    return _CopyTo.apply(x, _group(process_group))


def reduce_from(partial, process_group=None):
    """Leave a row-parallel region: all-reduce (sum) of the partials forward, identity backward."""
    if get_world_size(process_group) == 1:
        return partial
    return _ReduceFrom.apply(partial, _group(process_group))


def gather_from(shard, features, process_group=None):
    """All-gather column shards [..., F_r] into [..., features]; backward keeps this rank's slice.

    Args:
        shard: this rank's `torch.tensor_split(full, world_size, -1)[rank]`.
        features: the full width F, so that uneven shards are reassembled exactly.
    """
    world = get_world_size(process_group)
    if world == 1:
        return shard
    return _GatherFrom.apply(shard, shard_sizes(features, world), _group(process_group))


def scatter_to(x, process_group=None):
    """Keep this rank's `tensor_split` slice of the last dim; backward all-gathers the gradient."""
    if get_world_size(process_group) == 1:
        return x
    return _ScatterTo.apply(x, _group(process_group))
