"""Comm/compute overlap: the chunked schedules of the tensor-parallel modules, and when to use them.

A module with overlap=True (or "auto", once the performance model predicts a gain) splits its tokens
into OVERLAP_CHUNKS chunks and leaves each chunk's collective un-waited (`distributed`'s chunked
collectives and `wait=False`), so that it runs while another chunk's GEMMs do; the first use waits.
The chunks' collectives move exactly the bytes of the unchunked one. Per rank, W ranks:

    column_sequence  all-gather x [L_r, ..] in chunks; fn runs on each chunk as it arrives
    row_sequence     fn(x) in chunks of the sequence, each chunk reduce-scattered while the next runs
    mlp_sequence     both: gather chunk c + 1 and reduce-scatter chunk c - 1 while chunk c runs fn
    rows             fn(x) in chunks of rows, each chunk's all-reduce (forward, reduce_out) and its
                     input gradient's all-reduce (backward, copy_in) in flight while the next chunk runs

`overlapping` decides: True forces the chunked path (at world size 1 too, to measure its cost); "auto"
takes it on CUDA tensors from `overlap_break_even` tokens on, a prediction of `tpkernels.perfmodel` for
OVERLAP_MACHINE and OVERLAP_CHUNKS as they are at the call.
"""
import functools

import torch

from tpkernels import perfmodel
from tpkernels.distributed import copy_to, pad_dim0, reduce_from, shard_sizes
from tpkernels.sequence_parallel import gather_sequence_chunk, reduce_scatter_sequence_chunk

__all__ = ["OVERLAP_CHUNKS", "OVERLAP_MACHINE", "column_sequence", "mlp_sequence", "overlap_break_even",
           "overlapping", "row_sequence", "rows", "sequence_chunks"]


# Chunks of the overlapped path: each chunk's collective runs while the next chunk's GEMMs do.
OVERLAP_CHUNKS = 4
# The machine `overlap="auto"` asks the performance model about: a key of tpkernels.perfmodel.MACHINES or
# a tpkernels.perfmodel.Machine. Read at every call, as OVERLAP_CHUNKS is.
OVERLAP_MACHINE = perfmodel.DEFAULT_MACHINE


def overlap_break_even(hidden, ffn, world, element_size):
    """The tokens from which overlap="auto" takes the chunked path, for OVERLAP_MACHINE and OVERLAP_CHUNKS
    as they are now (None: never)."""
    return _break_even(hidden, ffn, world, element_size, perfmodel.machine(OVERLAP_MACHINE), OVERLAP_CHUNKS)


@functools.cache
def _break_even(hidden, ffn, world, element_size, machine, chunks):
    return perfmodel.break_even_m(hidden, ffn, world, machine, element_size, chunks=chunks)


def overlapping(overlap, x, tokens, hidden, ffn, world):
    """Whether this call takes the chunked path. True forces it (also at world size 1, to measure its
    cost); "auto" takes it on CUDA tensors from the performance model's break-even M on."""
    if overlap != "auto":
        return bool(overlap)
    if world == 1 or not x.is_cuda:
        return False
    even = overlap_break_even(hidden, ffn, world, x.element_size())
    return even is not None and tokens >= even


def sequence_chunks(sizes, chunks):
    """Each rank's shard split by `torch.tensor_split` into `chunks` pieces: [[L_{r,c} for r] for c],
    and the chunks' padded widths max_r L_{r,c} (their sum is max_r L_r: chunking adds no bytes)."""
    # tensor_split's sizes: a chunking inside one rank, not a layout, so every chunk gets rows while any remain
    per_rank = [[length // chunks + (c < length % chunks) for c in range(chunks)] for length in sizes]
    lengths = [[per_rank[r][c] for r in range(len(sizes))] for c in range(chunks)]
    return lengths, [max(column) for column in lengths]


def _gather_chunks(x, sizes, dim, group, rank):
    """Issue the all-gathers of this rank's sequence shard in OVERLAP_CHUNKS chunks (dim moved to 0),
    un-waited: [(chunk index, [W * width, ...])], with the chunks' lengths and widths."""
    lengths, widths = sequence_chunks(sizes, OVERLAP_CHUNKS)
    own = torch.split(x.movedim(dim, 0), [lengths[c][rank] for c in range(OVERLAP_CHUNKS)])
    # Every chunk a slice of one padded tensor, at its own offset (see _own_rows)
    padded = torch.cat([pad_dim0(own[c], widths[c]) for c in range(OVERLAP_CHUNKS)])
    starts = [sum(widths[:c]) for c in range(OVERLAP_CHUNKS)]
    gathered = [(c, gather_sequence_chunk(padded[starts[c]:starts[c] + widths[c]], widths[c], group))
                for c in range(OVERLAP_CHUNKS) if widths[c]]
    return gathered, lengths, widths


def _own_rows(reduced, lengths, rank):
    """This rank's rows of each reduced chunk [(c, [width_c, ...])], concatenated.

    The chunks are joined first and then sliced, so that every collective's input, forward and backward,
    is a slice of one tensor at its own offset. A rank whose shard is short keeps no rows of several
    chunks; sliced one by one, their gradients would be identical zero tensors, and under torch.compile
    identical all-gathers of them are one (AOT autograd merges common subexpressions): that rank would
    issue fewer collectives than the others, and every rank would wait forever."""
    joined = torch.cat([part for _, part in reduced])
    starts = [sum(part.shape[0] for _, part in reduced[:i]) for i in range(len(reduced))]
    return torch.cat([joined[start:start + lengths[c][rank]] for (c, _), start in zip(reduced, starts)])


def column_sequence(x, sizes, dim, group, rank, fn):
    """fn(all-gather(x)) in chunks: each chunk's GEMM runs while the next chunks are still arriving."""
    gathered, lengths, widths = _gather_chunks(x, sizes, dim, group, rank)
    outs = {c: fn(g) for c, g in gathered}
    pieces = [outs[c][r * widths[c]:r * widths[c] + lengths[c][r]]
              for r in range(len(sizes)) for c in range(OVERLAP_CHUNKS) if widths[c]]
    return torch.cat(pieces).movedim(0, dim)


def row_sequence(x, dim, group, world, rank, fn):
    """reduce-scatter(fn(x)) along the sequence in chunks: a chunk's reduce-scatter runs while the next
    chunk's GEMM does."""
    sizes = shard_sizes(x.shape[dim], world)
    lengths, widths = sequence_chunks(sizes, OVERLAP_CHUNKS)
    regions = torch.split(x.movedim(dim, 0), sizes)
    pieces = [torch.split(region, [lengths[c][r] for c in range(OVERLAP_CHUNKS)]) for r, region in enumerate(regions)]
    reduced = []
    for c, width in enumerate(widths):
        if width:
            chunk = torch.cat([pad_dim0(pieces[r][c], width) for r in range(world)])
            reduced.append((c, reduce_scatter_sequence_chunk(fn(chunk), group)))
    return _own_rows(reduced, lengths, rank).movedim(0, dim)


def rows(x, group, fn, copy_in=False, reduce_out=True):
    """fn(x) in chunks of rows. With reduce_out (a row stage last), all-reduce(fn(x)): a chunk's all-reduce
    runs while the next chunk's GEMM does. With copy_in (a column stage first), each chunk's input
    gradient is all-reduced in the backward while the other chunks' backward GEMMs run."""
    flat = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # an empty shard's x too
    parts = []
    for part in torch.tensor_split(flat, OVERLAP_CHUNKS):
        if part.shape[0]:
            out = fn(copy_to(part, group, wait=False) if copy_in else part)
            parts.append(reduce_from(out, group, wait=False) if reduce_out else out)
    if not parts:  # no rows: one call, for the output's shape
        out = fn(copy_to(flat, group) if copy_in else flat)
        parts = [reduce_from(out, group) if reduce_out else out]
    out = torch.cat(parts)
    return out.view(*x.shape[:-1], out.shape[-1])


def mlp_sequence(x, sizes, dim, group, rank, fn):
    """reduce-scatter(fn(all-gather(x))) along the sequence in chunks: chunk c + 1 is gathered and chunk
    c - 1 reduce-scattered while chunk c runs fn. A gathered chunk is already in the padded per-rank
    layout its reduce-scatter takes, so nothing is reordered."""
    gathered, lengths, _ = _gather_chunks(x, sizes, dim, group, rank)
    reduced = [(c, reduce_scatter_sequence_chunk(fn(g), group)) for c, g in gathered]
    return _own_rows(reduced, lengths, rank).movedim(0, dim)
