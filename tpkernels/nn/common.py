"""What the tensor-parallel layers share: option checks, sequence lengths (stated or exchanged), the
collectives around an MLP's shards (plain, sequence-parallel, overlapped), and fp8 set-up."""
import math

from tpkernels import overlap as chunked  # the chunked (overlapped) schedules; `overlap` is an option
from tpkernels.distributed import copy_to, reduce_from, shard_sizes
from tpkernels.sequence_parallel import gather_sequence, reduce_scatter_sequence, sequence_sizes
from tpkernels.fp8 import FP8Scaling, check_recipe
from tpkernels.kernels import GELU, GELU_TANH, IDENTITY
from tpkernels.ops import BACKENDS

_ACTIVATIONS = {None: None, "gelu": "none", "gelu_tanh": "tanh"}  # activation -> GELU's `approximate`
_ACTIVATION_CODES = {None: IDENTITY, "gelu": GELU, "gelu_tanh": GELU_TANH}


def _check_parallel_options(name, sequence_parallel, sequence_dim, overlap):
    # Checked at construction, alike on every rank.
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"{name}: sequence_parallel must be True or False, got {sequence_parallel!r}")
    if not isinstance(sequence_dim, int) or isinstance(sequence_dim, bool):
        raise TypeError(f"{name}: sequence_dim must be an int, got {sequence_dim!r}")
    if not (overlap is False or overlap is True or overlap == "auto"):
        raise ValueError(f"{name}: overlap must be False, True or 'auto', got {overlap!r}")


def _sequence_dim(name, sequence_dim, x):
    """sequence_dim as a non-negative dim of x, which must not be the feature (last) dim."""
    ndim = x.dim()
    if not -ndim <= sequence_dim < ndim or sequence_dim % ndim == ndim - 1:
        raise ValueError(f"{name}: sequence_dim={sequence_dim} is out of range for a {ndim}-d input of shape "
                         f"{tuple(x.shape)}: it must name one of its first {ndim - 1} dims (the last holds features)")
    return sequence_dim % ndim


def _parallel_repr(module):
    if not module.sequence_parallel and module.overlap is False:
        return ""
    return (f", sequence_parallel={module.sequence_parallel}, sequence_dim={module.sequence_dim}, "
            f"overlap={module.overlap!r}")


def _check_backend(name, backend):
    # Checked at construction, on every rank alike; whether the backend can run an input is checked per call.
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _sequence_lengths(module, x, dim, column, name):
    """Every rank's sequence shard length: from the stated full length (`module.sequence_length`, see
    `set_sequence_length`: no collective, no host sync) with this rank's own length checked, or else
    exchanged and checked on every rank (`sequence_parallel.sequence_sizes`: one small all-gather and a host sync)."""
    if module.sequence_length is None:
        return sequence_sizes(x, dim, column.process_group, name)
    sizes = shard_sizes(module.sequence_length, column.world_size)
    if x.shape[dim] != sizes[column.rank]:
        # raised on this rank only: the others, whose shards fit, go on into the all-gather and wait there
        # until the group's timeout. The stated length trades the exchanged check for a graph-capturable step.
        raise ValueError(f"{name}: sequence_length={module.sequence_length} gives rank {column.rank} "
                         f"{sizes[column.rank]} positions along dim {dim} (torch.chunk's layout over "
                         f"{column.world_size} ranks), but its input has {x.shape[dim]} (shape {tuple(x.shape)}); "
                         f"set sequence_length to the full length, or None to exchange the lengths")
    return sizes


def set_sequence_length(model, length):
    """State the full sequence length of every sequence-parallel module in `model` (itself included): their
    forwards then take every rank's shard length from it, with no shape exchange (a collective and a host
    sync per layer), so a step can be captured in a CUDA graph and compiled without a graph break. Each
    rank checks its own shard's length; a rank whose shard does not fit raises, and the others then wait
    in the all-gather until the group's timeout, so state it only where every rank's input has it.
    None goes back to the exchanged, checked lengths.

    Returns:
        How many modules took it.
    """
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
        raise ValueError(f"set_sequence_length: length must be None or an int >= 0, got {length!r}")
    count = 0
    for module in model.modules():
        if hasattr(module, "sequence_length") and getattr(module, "sequence_parallel", False):
            module.sequence_length = length
            count += 1
    return count


def _set_fp8(module, recipe, tensors, device):
    """module.fp8 = recipe, with a fresh `FP8Scaling` of `tensors` as module.fp8_scaling (none for None)."""
    check_recipe(type(module).__name__, recipe, module.backend)
    module.fp8 = recipe
    if recipe is None:
        if "fp8_scaling" in module._modules:
            del module.fp8_scaling
    else:
        module.fp8_scaling = FP8Scaling(recipe, tensors, device)


def _around_shards(mlp, x, column, shards):
    """An MLP's output from `shards(rows)`, one rank's partial sum of its rows of x, with the collectives
    around it: copy-to in and reduce-from out, as sequence shards (all-gather in, reduce-scatter out) with
    `mlp.sequence_parallel`, and in chunks whose collectives overlap the others' GEMMs with `mlp.overlap`.
    `column` is the MLP's first (column-parallel) layer: its group, rank and widths."""
    group, world, name = column.process_group, column.world_size, type(mlp).__name__
    if mlp.sequence_parallel:
        dim = _sequence_dim(name, mlp.sequence_dim, x)
        sizes = _sequence_lengths(mlp, x, dim, column, name)
        tokens = sum(sizes) * math.prod([x.shape[i] for i in range(x.dim() - 1) if i != dim])  # alike on every rank
        if chunked.overlapping(mlp.overlap, x, tokens, column.in_features, column.out_features, world):
            return chunked.mlp_sequence(x, sizes, dim, group, column.rank, shards).to(x.dtype)
        partial = shards(gather_sequence(x, sizes, dim, group))
        return reduce_scatter_sequence(partial, dim, group).to(x.dtype)
    if chunked.overlapping(mlp.overlap, x, x.shape[:-1].numel(), column.in_features, column.out_features, world):
        return chunked.rows(x, group, shards, copy_in=True).to(x.dtype)
    if world == 1:
        return shards(x).to(x.dtype)
    return reduce_from(shards(copy_to(x, group)), group).to(x.dtype)
