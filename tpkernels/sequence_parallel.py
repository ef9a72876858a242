"""Sequence parallelism's collectives: the activations between blocks as sequence shards.

Along a sequence dim of L positions (W ranks; rank r holds L_r of them, its `torch.chunk(full, W, dim)[r]`,
the layout of `distributed.shard`):

    gather_sequence(x [.., L_r, ..])          forward: all-gather -> [.., L, ..]
                                              backward: reduce-scatter of dX -> [.., L_r, ..]
    reduce_scatter_sequence(p [.., L, ..])    forward: reduce-scatter of partials -> [.., L_r, ..]
                                              backward: all-gather of dY -> [.., L, ..]

One all-gather and one reduce-scatter move the bytes of one all-reduce; between them the activations
are 1/W of their size. `sequence_sizes` checks that the ranks' shards fit together before any of them
collectively moves data (one small all-gather, a host sync: `nn.set_sequence_length` states the length
instead). The chunked pair (`gather_sequence_chunk`, `reduce_scatter_sequence_chunk`) serves the
overlapped schedules (`overlap`). Process groups, world size 1 and debugging as in `distributed`.
"""
import torch

from tpkernels.distributed import (MAX_DIMS, all_gather_dim, all_gather_dim0, before_collective, get_world_size,
                                   group_handle, pad_dim0, rank_shapes, reduce_scatter_dim, reduce_scatter_dim0,
                                   shard_sizes, unwaited)

__all__ = ["gather_sequence", "gather_sequence_chunk", "reduce_scatter_sequence", "reduce_scatter_sequence_chunk",
           "sequence_sizes"]


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
    group = group_handle(process_group)
    if x.dim() > MAX_DIMS:
        raise ValueError(f"{name}: at most {MAX_DIMS} dims, got a {x.dim()}-d input")
    shapes = [shape for shape, _ in rank_shapes(x, group, kind="shape_exchange")]
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


# _GatherSequence and _ReduceScatterSequence have one shape on purpose: they are conjugates, each one's
# forward the other's backward (as _GatherFrom and _ScatterTo, and the chunked pair below).
class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, dim, group):
        ctx.sizes, ctx.dim, ctx.group = sizes, dim, group
        return all_gather_dim(x, sizes, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim(grad, ctx.sizes, ctx.dim, ctx.group), None, None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, sizes, dim, group):
        ctx.sizes, ctx.dim, ctx.group = sizes, dim, group
        return reduce_scatter_dim(partial, sizes, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, ctx.sizes, ctx.dim, ctx.group), None, None, None


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
    return _GatherSequence.apply(x, list(sizes), dim, group_handle(process_group))


def reduce_scatter_sequence(partial, sequence_dim=-2, process_group=None):
    """Sum the ranks' partials and keep this rank's slice of the sequence (`shard`); backward
    all-gathers the gradient. Returns [.., L_r, ..]."""
    world = get_world_size(process_group)
    if world == 1:
        return partial
    dim = _normalize_dim("reduce_scatter_sequence", sequence_dim, partial.dim())
    return _ReduceScatterSequence.apply(partial, shard_sizes(partial.shape[dim], world), dim, group_handle(process_group))


# ---------------------------------------------------------------------------------------------------
# Chunked collectives for comm/compute overlap. Each returns its result un-waited (torch's
# AsyncCollectiveTensor; on gloo, waited: `unwaited`): the collective runs while the caller computes
# the next chunk, and the first use of the result waits for it. The bytes of the chunks add up to the
# unchunked collective's.


class _GatherChunkAsync(torch.autograd.Function):
    """[w, ...] on each rank -> [W * w, ...]: rank r's chunk at rows r*w:(r+1)*w. Backward reduce-scatters."""

    @staticmethod
    def forward(ctx, chunk, group):
        ctx.group = group
        chunk = chunk.contiguous()
        before_collective("all_gather", chunk, group)
        return unwaited(all_gather_dim0(chunk, 0, group), group)

    @staticmethod
    def backward(ctx, grad):  # un-waited too: the other chunks' backward GEMMs run meanwhile
        grad = grad.contiguous()
        before_collective("reduce_scatter", grad, ctx.group)
        return unwaited(reduce_scatter_dim0(grad, "sum", 0, ctx.group), ctx.group), None


class _ReduceScatterChunkAsync(torch.autograd.Function):
    """[W * w, ...] partials -> [w, ...]: the sum of every rank's rows r*w:(r+1)*w for r = this rank."""

    @staticmethod
    def forward(ctx, partial, group):
        ctx.group = group
        partial = partial.contiguous()
        before_collective("reduce_scatter", partial, group)
        return unwaited(reduce_scatter_dim0(partial, "sum", 0, group), group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        before_collective("all_gather", grad, ctx.group)
        return unwaited(all_gather_dim0(grad, 0, ctx.group), ctx.group), None


def gather_sequence_chunk(chunk, width, process_group=None):
    """All-gather one chunk of this rank's sequence shard (dim 0), padded to `width` rows: returns
    [W * width, ...] un-waited; its backward reduce-scatters the gradient."""
    padded = pad_dim0(chunk, width)
    if get_world_size(process_group) == 1:
        return padded
    return _GatherChunkAsync.apply(padded, group_handle(process_group))


def reduce_scatter_sequence_chunk(partial, process_group=None):
    """Reduce-scatter [W * width, ...] partials (rank r's rows at r*width) into this rank's [width, ...],
    un-waited; its backward all-gathers the gradient."""
    if get_world_size(process_group) == 1:
        return partial
    return _ReduceScatterChunkAsync.apply(partial, group_handle(process_group))
