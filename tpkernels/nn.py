"""Drop-in tensor-parallel layers over torch.distributed, running the fused kernels.

Per-rank shapes, for W ranks and rank r; F_r is rank r's share of F features in `torch.chunk`'s layout
(`tpkernels.distributed.shard_sizes`: ceil(F / W), the last ranks' shorter):

    ColumnParallelLinear  x [..., K] -> h_shard_n [..., N_r]   ([..., N] with gather_output=True)
        weight_shard_n [N_r, K], bias_shard_n [N_r]
        forward   h_r = act(x @ W_r.T + b_r)                     no collective (copy_to)
        backward  dX = all-reduce_r((dH_r * act'(z_r)) @ W_r)    one all-reduce

    RowParallelLinear  x_shard_k [..., K_r] ([..., K] with input_is_parallel=False) -> y [..., N]
        weight_shard_k [N, K_r], bias [N] replicated and added once, by rank 0's epilogue
        forward   y = all-reduce_r(x_r @ W_r.T (+ b on rank 0))  one all-reduce (reduce_from)
        backward  dX_r = dY @ W_r, dW_r = dY.T @ x_r, db = sum(dY) on every rank; no collective

    TensorParallelMLP  column with fused GELU, then row: one all-reduce forward, one backward. Both
        shards run as one op (`ops.mlp_shard`), whose backward puts gelu'(z) in the epilogue of the
        GEMM that makes dH: dZ_r = (dY @ W2_r) * gelu'(z_r), then plain GEMMs.

Initialisation: a module draws only its shard of what the dense `nn.Linear` would draw (the CPU
generator, in chunks of rows; `_init_linear_shard`), so after the same `torch.manual_seed(s)` on every
rank the sharded model equals slicing a dense CPU model built under that seed (`reference.MLP` for the
MLP: fc1, then fc2), and no rank allocates a dense weight. On the meta device nothing is drawn. `from_linear` / `from_dense` shard an existing model.
Parameters: with torch.distributed initialised, each weight and bias is a DTensor on the tensor-parallel
mesh (`tpkernels.dtensor`: Shard(0) for the column layer's, Shard(1) for the row weight, Replicate for the
row bias), and the kernels run on its local tensor. So `state_dict()` holds DTensors, which
torch.distributed.checkpoint saves and reshards to any world size, the optimizer's state follows, and
FSDP2's `fully_shard(mesh=mesh["dp"])` goes on top. `full_state_dict()` gathers the dense state dict (a
collective: call it on every rank), and `load_full_state_dict()` loads a dense one into the shards.
"""
import math

import torch
from torch import nn

from tpkernels import overlap as chunked  # the chunked (overlapped) schedules; `overlap` is an option
from tpkernels.distributed import (copy_to, gather_from, gather_sequence, get_rank, get_world_size, group_of,
                                   reduce_from, reduce_scatter_sequence, scatter_to, sequence_sizes, shard,
                                   shard_range, shard_sizes)
from tpkernels.dtensor import DeviceMesh, DTensor, is_dtensor, local, locals_of, mesh_of, parameter, placement
from tpkernels.fp8 import (LINEAR_TENSORS, MLP_TENSORS, FP8Scaling, check_recipe, fp8_glu_mlp_shard, fp8_linear,
                           fp8_mlp_shard)
from tpkernels.initialization import init_linear_shard
from tpkernels.kernels import GELU, GELU_TANH, IDENTITY
from tpkernels.custom_ops_gated import adjacent
from tpkernels.ops import BACKENDS, GATED_ACTIVATIONS, glu_mlp_shard, linear_gelu, linear_partial, mlp_shard

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "TensorParallelGatedMLP", "TensorParallelMLP",
           "set_sequence_length"]

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
    exchanged and checked on every rank (`distributed.sequence_sizes`: one small all-gather and a host sync)."""
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


class _ParallelLinear(nn.Module):
    """Shared by both layers: the shard of a dense [out_features, in_features] weight along `shard_dim`."""

    shard_dim = None  # 0: output features (column), 1: input features (row)

    def __init__(self, in_features, out_features, bias, process_group, device, dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # a DeviceMesh given is kept, so that FSDP2 finds the TP mesh's parent (the 2-D mesh) on the DTensors
        self.device_mesh = process_group if isinstance(process_group, DeviceMesh) else None
        self.process_group = group_of(process_group)
        self.world_size = get_world_size(process_group)
        self.rank = get_rank(process_group)
        sharded = out_features if self.shard_dim == 0 else in_features
        # torch.chunk's layout leaves the last ranks empty when F <= (W - 1) * ceil(F / W) (F = 9 on
        # 4 ranks: 3, 3, 3, 0). An empty shard is a valid DTensor piece; its rank runs the eager ops, which
        # take empty operands as they are (`_kernel_backend`), and contributes nothing to the sum.
        self.shard_start, self.shard_stop = shard_range(sharded, self.world_size, self.rank)
        weight, bias = init_linear_shard(in_features, out_features, bias, self.shard_dim, self.shard_start,
                                          self.shard_stop, device, dtype)
        self._set_parameter("weight", weight)
        self._set_parameter("bias", bias)

    def _set_parameter(self, kind, value, requires_grad=True):
        """Hold this rank's shard `value` of the weight or bias as the layer's parameter (a DTensor where
        torch.distributed is initialised), or None."""
        if value is None:
            self.register_parameter(kind, None)
            return
        shape = (self.out_features, self.in_features) if kind == "weight" else (self.out_features,)
        setattr(self, kind, parameter(value, self._mesh(value.device), placement(self.shard_dim, kind), shape,
                                      requires_grad))

    def _mesh(self, device):
        """The mesh of this layer's DTensors for values on `device`: the DeviceMesh given, or one over the group."""
        return mesh_of(self.device_mesh or self.process_group, device)

    @property
    def _kernel_backend(self):
        """The backend of this rank's calls: eager for an empty shard (the kernels are not launched on
        empty operands), else the layer's."""
        return self.backend if self.shard_stop > self.shard_start else "eager"

    def use_fp8(self, recipe):
        """Run this layer with fp8 (e4m3) input and weight from now on, scaled by `recipe` (a
        `tpkernels.FP8Recipe`, fresh amax history), or again in the weights' dtype (None)."""
        _set_fp8(self, recipe, LINEAR_TENSORS, self.weight.device)

    def _check_full_width(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input has {x.shape[-1]} features (shape {tuple(x.shape)}) "
                f"but in_features={self.in_features}"
            )

    def _shard(self, t, dim):
        return t.narrow(dim, self.shard_start, self.shard_stop - self.shard_start)

    def _shard_bias(self, bias):
        return self._shard(bias, 0) if self.shard_dim == 0 else bias

    @classmethod
    def _from_linear(cls, linear, **options):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear takes an nn.Linear, got {type(linear).__name__}")
        # Built on the meta device, so no memory or random numbers are spent on weights that are replaced.
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                     dtype=linear.weight.dtype, **options)
        module.load_full_state_dict(linear.state_dict())
        return module

    @torch.no_grad()
    def load_full_state_dict(self, state_dict):
        """Load a dense nn.Linear's state dict ({"weight": [N, K], "bias": [N]}) into this rank's shards."""
        weight = state_dict["weight"]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{type(self).__name__}: weight has shape {tuple(weight.shape)} but this layer is "
                f"[out_features={self.out_features}, in_features={self.in_features}]"
            )
        if (self.bias is None) != (state_dict.get("bias") is None):
            raise ValueError(f"{type(self).__name__}: bias={self.bias is not None} but the state dict "
                             f"{'lacks' if self.bias is not None else 'has'} one")
        self._assign("weight", self._shard(weight, self.shard_dim))
        if self.bias is not None:
            self._assign("bias", self._shard_bias(state_dict["bias"]))

    def _assign(self, name, value):
        """Set this rank's shard of the weight or bias to `value` (its local shape)."""
        param = getattr(self, name)
        if param.is_meta:  # built on the meta device (from_linear, empty_parameters): take the value as it is
            self._set_parameter(name, value.detach().clone(memory_format=torch.contiguous_format),
                                param.requires_grad)
        else:
            local(param).copy_(value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A DTensor parameter loads a DTensor, or a dense tensor (sliced here). A plain tensor of this rank's
        # shard shape is refused: state dicts of these layers hold DTensors, and plain shards under one name
        # are what torch.distributed.checkpoint collapses to one rank's copy.
        for kind in ("weight", "bias"):
            param, value = getattr(self, kind), state_dict.get(prefix + kind)
            if not is_dtensor(param) or value is None or is_dtensor(value):
                continue
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {prefix}{kind} is a plain tensor of shape "
                    f"{tuple(value.shape)}, but this layer's {kind} is a DTensor of global shape "
                    f"{tuple(param.shape)} (rank {self.rank}'s shard {tuple(local(param).shape)}). Load a "
                    f"state dict saved from this layer (it holds DTensors; torch.distributed.checkpoint "
                    f"reshards it), or the dense tensor (load_full_state_dict)")
            if param.device_mesh.ndim != 1:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {prefix}{kind} is a plain tensor, but this layer's "
                    f"{kind} is sharded over a {param.device_mesh.ndim}-D mesh (FSDP2 over tensor parallel); load "
                    f"with torch.distributed.checkpoint.state_dict.set_model_state_dict, which reshards")
            piece = value if param.placements[0].is_replicate() else shard(value, self.world_size, self.rank,
                                                                          param.placements[0].dim)
            if param.is_meta:  # load_state_dict(..., assign=True) into a layer built on meta: the values' device
                mesh = self._mesh(piece.device)
            else:
                mesh, piece = param.device_mesh, piece.to(param.device)
            state_dict[prefix + kind] = DTensor.from_local(piece, mesh, param.placements, run_check=False,
                                                           shape=param.shape, stride=param.stride())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def full_state_dict(self):
        """The dense nn.Linear's state dict, gathered from every rank (call it on every rank)."""
        if is_dtensor(self.weight):  # any placements: FSDP2's dp x tp ones included
                # copies: full_tensor() of a Replicate (or one-rank) DTensor is the live parameter itself
            return {name: param.full_tensor().clone() for name, param in (("weight", self.weight), ("bias", self.bias))
                    if param is not None}
        if self.shard_dim == 0:
            weight = gather_from(self.weight.t(), self.out_features, self.process_group).t()
        else:
            weight = gather_from(self.weight, self.in_features, self.process_group)
        state = {"weight": weight.contiguous()}
        if self.bias is not None:
            bias = self.bias
            if self.shard_dim == 0:
                bias = gather_from(bias, self.out_features, self.process_group)
            state["bias"] = bias.clone()
        return state

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}/{self.world_size}, "
                f"shard=[{self.shard_start}:{self.shard_stop}] of dim {self.shard_dim}")


# The two layers' signatures and Args read alike on purpose: one set of options for both sides of a sum.
class ColumnParallelLinear(_ParallelLinear):
    """`nn.Linear` split by output features, with (bias +) GELU fused into the matmul.

    Args:
        in_features, out_features, bias: as nn.Linear; rank r keeps rows
            `shard(range(out_features), world_size, r)` (torch.chunk's layout) of the weight and bias.
        activation: None, "gelu" (exact, erf) or "gelu_tanh", applied per shard in the kernel.
        gather_output: all-gather the shards into [..., out_features] (one collective forward).
        sequence_parallel: the input is this rank's shard of the sequence along `sequence_dim`,
            `shard(x, world_size, rank, sequence_dim)` (torch.chunk's layout); the
            layer all-gathers it (backward: reduce-scatters its gradient) and outputs the full sequence.
        sequence_dim: the sequence dim of the input: -2 is tokens for [T, H] and the sequence for [B, S, H].
        overlap: False, True or "auto": run the GEMM in chunks of rows, each chunk's collective
            overlapping another chunk's GEMMs: with sequence_parallel, the input's all-gather (each chunk's
            GEMM runs as it arrives); without, the backward all-reduce of the input gradient. "auto" does
            so on CUDA where `tpkernels.perfmodel` predicts a gain.
        process_group: the tensor-parallel group: a ProcessGroup, a 1-D DeviceMesh (`mesh["tp"]`: under
            FSDP2 pass the mesh), or None, the default group.
        device, dtype: as nn.Linear.
        backend: the kernels' backend, as in `tpkernels.linear_gelu` ("auto" by default).
        fp8: None, or a `tpkernels.FP8Recipe`: x and the weight shard in e4m3 (`tpkernels.fp8`).
    """

    shard_dim = 0

    def __init__(self, in_features, out_features, bias=True, *, activation=None, gather_output=False,
                 sequence_parallel=False, sequence_dim=-2, overlap=False, process_group=None, device=None,
                 dtype=None, backend="auto", fp8=None):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ColumnParallelLinear: unknown activation {activation!r}; use None, 'gelu' or 'gelu_tanh'")
        _check_backend("ColumnParallelLinear", backend)
        _check_parallel_options("ColumnParallelLinear", sequence_parallel, sequence_dim, overlap)
        super().__init__(in_features, out_features, bias, process_group, device, dtype)
        self.activation = activation
        self._approximate = _ACTIVATIONS[activation]
        self.gather_output = gather_output
        self.sequence_parallel, self.sequence_dim, self.overlap = sequence_parallel, sequence_dim, overlap
        self.sequence_length = None  # the full length, where stated (`set_sequence_length`)
        self.backend = backend
        self.use_fp8(fp8)

    @classmethod
    def from_linear(cls, linear, *, activation=None, gather_output=False, sequence_parallel=False, sequence_dim=-2,
                    overlap=False, process_group=None, backend="auto", fp8=None):
        """Shard an existing nn.Linear (identical on every rank) by output features."""
        return cls._from_linear(linear, activation=activation, gather_output=gather_output,
                                sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, overlap=overlap,
                                process_group=process_group, backend=backend, fp8=fp8)

    def _shard_forward(self, x):
        params = self._parameters  # as in TensorParallelMLP.forward: no attribute search per call
        weight, bias = locals_of(params["weight"], params["bias"])
        if self.fp8 is not None:
            return fp8_linear(x, weight, bias, self.fp8_scaling, activation=_ACTIVATION_CODES[self.activation],
                              backend=self._kernel_backend)
        if self.activation is None:  # owner=True: a plain linear
            return linear_partial(x, weight, bias, backend=self._kernel_backend)
        return linear_gelu(x, weight, bias, approximate=self._approximate, backend=self._kernel_backend)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            self._check_full_width(x)
        if self.fp8 is None and self.activation is not None and not (self.sequence_parallel or self.gather_output
                                                                     or self.overlap is not False):
            # the common path, as TensorParallelMLP's: nothing per call beyond the op and the collective
            params = self._parameters
            weight, bias = locals_of(params["weight"], params["bias"])
            return linear_gelu(copy_to(x, self.process_group) if self.world_size > 1 else x, weight, bias,
                               approximate=self._approximate, backend=self._kernel_backend)
        if self.fp8 is not None:
            self.fp8_scaling.update(x.device)  # once per step, before any chunk quantizes
        if self.sequence_parallel:
            dim = _sequence_dim("ColumnParallelLinear", self.sequence_dim, x)
            sizes = _sequence_lengths(self, x, dim, self, "ColumnParallelLinear")
            tokens = sum(sizes) * math.prod([x.shape[i] for i in range(x.dim() - 1) if i != dim])  # alike on every rank
            if chunked.overlapping(self.overlap, x, tokens, self.in_features, self.out_features, self.world_size):
                h = chunked.column_sequence(x, sizes, dim, self.process_group, self.rank, self._shard_forward)
            else:
                h = self._shard_forward(gather_sequence(x, sizes, dim, self.process_group))
        elif self.overlap is not False and chunked.overlapping(self.overlap, x, x.shape[:-1].numel(),
                                                               self.in_features, self.out_features, self.world_size):
            # The forward needs no collective; the backward all-reduces each chunk's input gradient
            # while the other chunks' backward GEMMs run.
            h = chunked.rows(x, self.process_group, self._shard_forward, copy_in=True, reduce_out=False)
        else:  # the group's size read once, at construction: a decode step pays no lookup per layer
            h = self._shard_forward(copy_to(x, self.process_group) if self.world_size > 1 else x)
        if self.gather_output:
            h = gather_from(h, self.out_features, self.process_group)
        return h

    def extra_repr(self):
        return (f"{super().extra_repr()}, activation={self.activation}, gather_output={self.gather_output}"
                + _parallel_repr(self))


class RowParallelLinear(_ParallelLinear):
    """`nn.Linear` split by input features; one all-reduce sums the partials, the bias added once.

    Args:
        in_features, out_features, bias: as nn.Linear; rank r keeps columns
            `shard(range(in_features), world_size, r)` of the weight. The bias is replicated;
            rank 0's kernel epilogue adds it, and its gradient is sum(dY) on every rank.
        input_is_parallel: the input is already this rank's shard [..., in_r] (the output of a
            ColumnParallelLinear); False splits a full-width input [..., in_features] here.
        reduce_dtype: None (the input's dtype) or torch.float32, to all-reduce fp32 partials and
            round once after the sum.
        sequence_parallel: reduce-scatter the partial sums along `sequence_dim` instead of all-reducing
            them: the output is this rank's `shard(y, world_size, rank, sequence_dim)`
            (backward: all-gather of its gradient). The bias is still added once.
        sequence_dim: the sequence dim of the input and output (-2 by default).
        overlap: False, True or "auto": run the GEMM in chunks, each chunk's all-reduce (or
            reduce-scatter) overlapping the next chunk's GEMM; "auto" does so on CUDA where
            `tpkernels.perfmodel` predicts a gain.
        process_group: the tensor-parallel group: a ProcessGroup, a 1-D DeviceMesh (`mesh["tp"]`: under
            FSDP2 pass the mesh), or None, the default group.
        device, dtype: as nn.Linear.
        backend: the kernels' backend, as in `tpkernels.linear_gelu` ("auto" by default).
        fp8: None, or a `tpkernels.FP8Recipe`: the input and weight shards in e4m3, the input's scale per rank.
    """

    shard_dim = 1

    def __init__(self, in_features, out_features, bias=True, *, input_is_parallel=True, reduce_dtype=None,
                 sequence_parallel=False, sequence_dim=-2, overlap=False, process_group=None, device=None,
                 dtype=None, backend="auto", fp8=None):
        _check_backend("RowParallelLinear", backend)
        _check_parallel_options("RowParallelLinear", sequence_parallel, sequence_dim, overlap)
        super().__init__(in_features, out_features, bias, process_group, device, dtype)
        self.input_is_parallel = input_is_parallel
        self.reduce_dtype = reduce_dtype
        self.sequence_parallel, self.sequence_dim, self.overlap = sequence_parallel, sequence_dim, overlap
        self.backend = backend
        self.use_fp8(fp8)

    @classmethod
    def from_linear(cls, linear, *, input_is_parallel=True, reduce_dtype=None, sequence_parallel=False,
                    sequence_dim=-2, overlap=False, process_group=None, backend="auto", fp8=None):
        """Shard an existing nn.Linear (identical on every rank) by input features."""
        return cls._from_linear(linear, input_is_parallel=input_is_parallel, reduce_dtype=reduce_dtype,
                                sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, overlap=overlap,
                                process_group=process_group, backend=backend, fp8=fp8)

    def forward(self, x):
        in_r = self.shard_stop - self.shard_start
        if self.input_is_parallel and x.shape[-1] != in_r:
            raise ValueError(
                f"RowParallelLinear: input has {x.shape[-1]} features (shape {tuple(x.shape)}) but rank "
                f"{self.rank}'s shard takes {in_r} of in_features={self.in_features}; pass "
                f"input_is_parallel=False to feed full-width inputs"
            )
        if not self.input_is_parallel:
            self._check_full_width(x)
        dim = _sequence_dim("RowParallelLinear", self.sequence_dim, x) if self.sequence_parallel else None
        if not self.input_is_parallel:
            x = scatter_to(x, self.process_group)

        if self.fp8 is not None:
            self.fp8_scaling.update(x.device)

        weight, bias = locals_of(self._parameters["weight"], self._parameters["bias"])

        def partial(rows):
            if self.fp8 is not None:
                return fp8_linear(rows, weight, bias, self.fp8_scaling, owner=self.rank == 0,
                                  out_dtype=self.reduce_dtype, backend=self._kernel_backend)
            return linear_partial(rows, weight, bias, owner=self.rank == 0, out_dtype=self.reduce_dtype,
                                  backend=self._kernel_backend)

        group = self.process_group
        if chunked.overlapping(self.overlap, x, x.shape[:-1].numel(), self.out_features, self.in_features, self.world_size):
            if self.sequence_parallel:
                return chunked.row_sequence(x, dim, group, self.world_size, self.rank, partial).to(x.dtype)
            return chunked.rows(x, group, partial).to(x.dtype)
        if self.sequence_parallel:
            return reduce_scatter_sequence(partial(x), dim, group).to(x.dtype)
        return (reduce_from(partial(x), group) if self.world_size > 1 else partial(x)).to(x.dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, input_is_parallel={self.input_is_parallel}" + _parallel_repr(self)


class TensorParallelMLP(nn.Module):
    """`fc2(gelu(fc1(x)))` with fc1 column-parallel (GELU fused) and fc2 row-parallel.

    One all-reduce forward (fc2's partial sums) and one backward (fc1's input gradient).

    Args:
        in_features, hidden_features: fc1 is [hidden, in]; hidden is split across ranks.
        out_features: fc2's outputs; None means in_features.
        bias: both layers get a bias.
        approximate: "none" (exact GELU) or "tanh".
        reduce_dtype: None or torch.float32, see RowParallelLinear.
        sequence_parallel: input and output are this rank's `shard` of the sequence
            along `sequence_dim`: one all-gather in, one reduce-scatter out (the bytes of one
            all-reduce), and the activations between blocks are 1/W of their size.
        sequence_dim: the sequence dim of input and output (-2 by default).
        overlap: False, True or "auto": run both shards in chunks of the sequence (or of the rows), each
            chunk's collectives overlapping another chunk's GEMMs; "auto" does so on CUDA from the
            break-even M of `tpkernels.perfmodel` on.
        process_group, device, dtype, backend: as the layers.
        fp8: None, or a `tpkernels.FP8Recipe`: x, h and both weight shards in e4m3 (`tpkernels.fp8`): the
            column kernel quantizes h in its epilogue, with a per-rank scale, and the row kernel reads it;
            the amax histories of x and h are the buffer `fp8_scaling.amax_history`.
    """

    def __init__(self, in_features, hidden_features, out_features=None, bias=True, *, approximate="none",
                 reduce_dtype=None, sequence_parallel=False, sequence_dim=-2, overlap=False, process_group=None,
                 device=None, dtype=None, backend="auto", fp8=None):
        super().__init__()
        activation = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
        if activation is None:
            raise ValueError(f"TensorParallelMLP: approximate must be 'none' or 'tanh', got {approximate!r}")
        _check_backend("TensorParallelMLP", backend)
        check_recipe("TensorParallelMLP", fp8, backend)
        _check_parallel_options("TensorParallelMLP", sequence_parallel, sequence_dim, overlap)
        out_features = in_features if out_features is None else out_features
        self.approximate = approximate
        self.backend = backend
        self.sequence_parallel, self.sequence_dim, self.overlap = sequence_parallel, sequence_dim, overlap
        self.sequence_length = None  # the full length, where stated (`set_sequence_length`)
        parallel = dict(sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, overlap=overlap)
        self.fc1 = ColumnParallelLinear(in_features, hidden_features, bias, activation=activation, **parallel,
                                        process_group=process_group, device=device, dtype=dtype, backend=backend)
        self.fc2 = RowParallelLinear(hidden_features, out_features, bias, reduce_dtype=reduce_dtype, **parallel,
                                     process_group=process_group, device=device, dtype=dtype, backend=backend)
        self.fp8 = fp8
        if fp8 is not None:
            self.fp8_scaling = FP8Scaling(fp8, MLP_TENSORS, device)

    @property
    def _kernel_backend(self):
        return self.backend if self.fc1.shard_stop > self.fc1.shard_start else "eager"  # as the layers'

    @classmethod
    def from_dense(cls, fc1, fc2, *, approximate="none", reduce_dtype=None, sequence_parallel=False,
                   sequence_dim=-2, overlap=False, process_group=None, backend="auto", fp8=None):
        """Shard a dense MLP's two nn.Linear layers (identical on every rank)."""
        for name, linear in (("fc1", fc1), ("fc2", fc2)):
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"TensorParallelMLP.from_dense: {name} must be an nn.Linear, got {type(linear).__name__}")
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"TensorParallelMLP.from_dense: fc1.out_features={fc1.out_features} but "
                             f"fc2.in_features={fc2.in_features}")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("TensorParallelMLP.from_dense: fc1 and fc2 must both have a bias or both lack one")
        module = cls(fc1.in_features, fc1.out_features, fc2.out_features, fc1.bias is not None,
                     approximate=approximate, reduce_dtype=reduce_dtype, sequence_parallel=sequence_parallel,
                     sequence_dim=sequence_dim, overlap=overlap, process_group=process_group,
                     device="meta", dtype=fc1.weight.dtype, backend=backend, fp8=fp8)
        module.load_full_state_dict({f"{name}.{k}": v for name, layer in (("fc1", fc1), ("fc2", fc2))
                                     for k, v in layer.state_dict().items()})
        return module

    def forward(self, x):
        # One op for both shards, so that the backward fuses across them: dZ = (dY @ W2_r) * gelu'(z_r)
        # in one GEMM's epilogue. The collectives are the layers' own: copy_to in, reduce_from out.
        fc1, fc2 = self._modules["fc1"], self._modules["fc2"]  # no attribute search: see below
        if x.shape[-1] != fc1.in_features:
            fc1._check_full_width(x)
        group, world = fc1.process_group, fc1.world_size
        # the parameters read from the tables nn.Module's attribute lookup would search (FSDP2 swaps its
        # unsharded parameters in there too): a decode step reads them on every layer
        first, second = fc1._parameters, fc2._parameters
        w1, b1, w2, b2 = locals_of(first["weight"], first["bias"], second["weight"], second["bias"])
        if self.fp8 is None and not self.sequence_parallel and self.overlap is False:
            # The common path (decode's every layer), with nothing per call beyond the op and the
            # collectives: host time is a decode step's budget.
            partial = mlp_shard(copy_to(x, group) if world > 1 else x, w1, b1, w2, b2, approximate=self.approximate,
                                owner=fc2.rank == 0, out_dtype=fc2.reduce_dtype, backend=self._kernel_backend)
            out = reduce_from(partial, group) if world > 1 else partial
            return out if out.dtype == x.dtype else out.to(x.dtype)
        if self.fp8 is not None:
            self.fp8_scaling.update(x.device)  # once per step, before any chunk quantizes

        def shards(rows):
            if self.fp8 is not None:
                return fp8_mlp_shard(rows, w1, b1, w2, b2, self.fp8_scaling,
                                     activation=_ACTIVATION_CODES[fc1.activation], owner=fc2.rank == 0,
                                     out_dtype=fc2.reduce_dtype, backend=self._kernel_backend)
            return mlp_shard(rows, w1, b1, w2, b2, approximate=self.approximate, owner=fc2.rank == 0,
                             out_dtype=fc2.reduce_dtype, backend=self._kernel_backend)

        return _around_shards(self, x, fc1, shards)

    def full_state_dict(self):
        """The dense MLP's state dict ("fc1.weight", ...), gathered from every rank (call it on every rank)."""
        return {f"{name}.{k}": v for name in ("fc1", "fc2") for k, v in getattr(self, name).full_state_dict().items()}

    def load_full_state_dict(self, state_dict):
        """Load a dense MLP's state dict ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias") into the shards."""
        for name in ("fc1", "fc2"):
            prefix = f"{name}."
            getattr(self, name).load_full_state_dict(
                {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            )


def _pack_after_load(module, incompatible_keys):
    module._pack()


def _storage_local(param):
    """The tensor that holds a parameter's values on this rank: a DTensor's local tensor, or the parameter."""
    return param._local_tensor if is_dtensor(param) else param


class TensorParallelGatedMLP(nn.Module):
    """`down_proj(act(gate_proj(x)) * up_proj(x))`, the MLP of Llama, Mistral, Qwen (SiLU), Gemma (tanh GELU)
    and Phi-3, with gate and up column-parallel over the same hidden features and down row-parallel.

    Per rank, F_r = rank r's `shard` of the hidden features F:

        gate_proj  ColumnParallelLinear  weight [F_r, K]   Shard(0)  \\  one [2F_r, K] buffer: the kernel reads
        up_proj    ColumnParallelLinear  weight [F_r, K]   Shard(0)  /  each x tile once for both
        down_proj  RowParallelLinear     weight [N, F_r]   Shard(1)
        forward    y = all-reduce_r(down_r(act(x @ gate_r.T) * (x @ up_r.T)))      one all-reduce
        backward   [dG | dU] in the epilogue of dH = dY @ down_r, then one GEMM each for dX, [dWg; dWu], dWd

    The product is elementwise, so it commutes with splitting the hidden features, as GELU does; gate and up
    must be split by the same rows. Each is its own DTensor (`Shard(0)` of its own [F, K]), never one merged
    [2F, K] tensor: resharding a merged [gate; up] into W consecutive pieces would pair gate features with
    the wrong up features. The two local shards live in one buffer, gate rows then up rows, so that the
    kernel reads them as one operand; where something replaces them with separate tensors (FSDP2's
    unsharded parameters), the forward copies them together first, and stays correct.

    Args:
        in_features, hidden_features: gate_proj and up_proj are [hidden, in]; hidden is split across ranks
            (it need not divide by the world size: torch.chunk's layout).
        out_features: down_proj's outputs; None means in_features.
        bias: all three layers get a bias (Llama's have none).
        activation: "silu" (Llama, Mistral, Qwen, Phi-3), "gelu_tanh" (Gemma) or "gelu" (exact).
        reduce_dtype, sequence_parallel, sequence_dim, overlap, process_group, device, dtype, backend: as
            `TensorParallelMLP`'s.
        fp8: None, or a `tpkernels.FP8Recipe`: x, h and the weights in e4m3 (`tpkernels.fp8.fp8_glu_mlp_shard`):
            gate and up quantized together (one scale), h = act(g) * u quantized in the gated kernel's epilogue
            with a per-rank scale; the histories are the buffer `fp8_scaling.amax_history`.
    """

    def __init__(self, in_features, hidden_features, out_features=None, bias=False, *, activation="silu",
                 reduce_dtype=None, sequence_parallel=False, sequence_dim=-2, overlap=False, process_group=None,
                 device=None, dtype=None, backend="auto", fp8=None):
        super().__init__()
        name = "TensorParallelGatedMLP"
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {', '.join(map(repr, GATED_ACTIVATIONS))}, "
                             f"got {activation!r}")
        _check_backend(name, backend)
        if backend in ("cublaslt", "cpu"):
            raise ValueError(f"{name}: backend={backend!r} has no gated epilogue; use 'auto', 'triton' or 'eager'")
        _check_parallel_options(name, sequence_parallel, sequence_dim, overlap)
        out_features = in_features if out_features is None else out_features
        self.activation, self.backend = activation, backend
        self.sequence_parallel, self.sequence_dim, self.overlap = sequence_parallel, sequence_dim, overlap
        self.sequence_length = None  # the full length, where stated (`set_sequence_length`)
        # how full_state_dict names gate and up: "separate" (gate_proj, up_proj) or a merged name (Phi-3's
        # "gate_up_proj", [gate; up] in one tensor); from_merged sets it
        self.checkpoint_merged = None
        self.checkpoint_up_first = False  # the merged tensor's halves: [gate; up], or [up; gate] when True
        layer = dict(process_group=process_group, device=device, dtype=dtype, backend=backend)
        parallel = dict(sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, overlap=overlap)
        # built in this order so that, after one manual_seed, the shards equal slicing reference.GatedMLP
        self.gate_proj = ColumnParallelLinear(in_features, hidden_features, bias, **parallel, **layer)
        self.up_proj = ColumnParallelLinear(in_features, hidden_features, bias, **parallel, **layer)
        self.down_proj = RowParallelLinear(hidden_features, out_features, bias, reduce_dtype=reduce_dtype, **parallel,
                                           **layer)
        self._pack()
        self.register_load_state_dict_post_hook(_pack_after_load)  # a module-level function: picklable
        self.use_fp8(fp8)

    def use_fp8(self, recipe):
        """Run the block with fp8 (e4m3) x, h and weights from now on, scaled by `recipe` (a fresh amax
        history), or again in the weights' dtype (None)."""
        _set_fp8(self, recipe, MLP_TENSORS, self.gate_proj.weight.device)

    @property
    def _kernel_backend(self):
        return self.backend if self.gate_proj.shard_stop > self.gate_proj.shard_start else "eager"  # as the layers'

    @torch.no_grad()
    def _pack(self):
        """Put this rank's gate and up shards (weight, and bias) in one buffer, gate rows then up rows, where
        they are separate tensors: the kernel then reads them as one [2F_r, K] operand, with no copy per call.
        Each parameter keeps its identity (an optimizer built before a `.to()` still holds the block's
        parameters) and its attributes: `torch.utils.swap_tensors` gives it a view of the buffer. A parameter
        with a gradient or hooks is left as it is (a swap would move them off it), and so is one a swap is
        refused for (autograd's graph still references it): the shards then stay apart and the forward copies
        them together per call, slower and never wrong."""
        for kind in ("weight", "bias"):
            gate, up = self.gate_proj._parameters[kind], self.up_proj._parameters[kind]
            if gate is None or up is None or (is_dtensor(gate) and gate.device_mesh.ndim != 1):
                continue  # FSDP2 (a 2-D mesh) owns the storage of its parameters
            g, u = _storage_local(gate), _storage_local(up)
            if g.is_meta or g.device != u.device or g.dtype != u.dtype or g.shape != u.shape or adjacent(g, u):
                continue
            if any(p.grad is not None or p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
                   for p in (gate, up)):
                continue
            buffer = torch.cat([g, u])
            rows = g.shape[0]
            for layer, param, piece in ((self.gate_proj, gate, buffer[:rows]), (self.up_proj, up, buffer[rows:])):
                if is_dtensor(param):
                    packed = parameter(piece, layer._mesh(piece.device), placement(0, kind), param.shape,
                                       param.requires_grad)
                else:
                    packed = nn.Parameter(piece, requires_grad=param.requires_grad)
                try:
                    torch.utils.swap_tensors(param, packed)
                except RuntimeError:
                    break
                # the swap moved the parameter's own Python attributes to `packed`: they come back
                for key, value in packed.__dict__.items():
                    param.__dict__.setdefault(key, value)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() give each parameter its own new tensor: pack them again.
        result = super()._apply(fn, *args, **kwargs)
        self._pack()
        return result

    @classmethod
    def from_dense(cls, gate_proj, up_proj, down_proj, *, activation="silu", reduce_dtype=None,
                   sequence_parallel=False, sequence_dim=-2, overlap=False, process_group=None, backend="auto", fp8=None):
        """Shard a dense gated MLP's three nn.Linear layers (identical on every rank)."""
        layers = (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj))
        for name, linear in layers:
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"TensorParallelGatedMLP.from_dense: {name} must be an nn.Linear, got "
                                f"{type(linear).__name__}")
        if gate_proj.weight.shape != up_proj.weight.shape:
            raise ValueError(f"TensorParallelGatedMLP.from_dense: gate_proj is {tuple(gate_proj.weight.shape)} but "
                             f"up_proj is {tuple(up_proj.weight.shape)}; they must match")
        if gate_proj.out_features != down_proj.in_features:
            raise ValueError(f"TensorParallelGatedMLP.from_dense: gate_proj.out_features={gate_proj.out_features} but "
                             f"down_proj.in_features={down_proj.in_features}")
        biases = {linear.bias is not None for _, linear in layers}
        if len(biases) != 1:
            raise ValueError("TensorParallelGatedMLP.from_dense: gate_proj, up_proj and down_proj must all have a "
                             "bias or all lack one")
        module = cls(gate_proj.in_features, gate_proj.out_features, down_proj.out_features, biases.pop(),
                     activation=activation, reduce_dtype=reduce_dtype, sequence_parallel=sequence_parallel,
                     sequence_dim=sequence_dim, overlap=overlap, process_group=process_group, device="meta",
                     dtype=gate_proj.weight.dtype, backend=backend, fp8=fp8)
        module.load_full_state_dict({f"{name}.{k}": v for name, linear in layers for k, v in linear.state_dict().items()})
        return module

    @classmethod
    def from_merged(cls, gate_up_proj, down_proj, *, name="gate_up_proj", up_first=False, activation="silu",
                    **options):
        """Shard a dense gated MLP whose gate and up are one nn.Linear `gate_up_proj` of 2F outputs, gate rows
        first (Phi-3's; `up_first=True`: up rows first): each rank takes its gate rows and the same features'
        up rows, never a consecutive piece of the merged weight. `full_state_dict` then gives the merged
        tensor under `name` again, and `tpkernels.load_sharded` / `save_sharded` read and write it so."""
        for arg, linear in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"TensorParallelGatedMLP.from_merged: {arg} must be an nn.Linear, got "
                                f"{type(linear).__name__}")
        if gate_up_proj.out_features % 2 or gate_up_proj.out_features // 2 != down_proj.in_features:
            raise ValueError(f"TensorParallelGatedMLP.from_merged: gate_up_proj has {gate_up_proj.out_features} "
                             f"outputs ([gate; up]: 2F) but down_proj takes {down_proj.in_features} (F)")
        if (gate_up_proj.bias is None) != (down_proj.bias is None):
            raise ValueError("TensorParallelGatedMLP.from_merged: gate_up_proj and down_proj must both have a bias "
                             "or both lack one")
        module = cls(gate_up_proj.in_features, down_proj.in_features, down_proj.out_features,
                     down_proj.bias is not None, activation=activation, device="meta",
                     dtype=gate_up_proj.weight.dtype, **options)
        module.checkpoint_merged, module.checkpoint_up_first = name, up_first
        module.load_full_state_dict({f"{layer}.{k}": v for layer, linear in ((name, gate_up_proj), ("down_proj", down_proj))
                                     for k, v in linear.state_dict().items()})
        return module

    def forward(self, x):
        gate_proj, up_proj, down_proj = self._modules["gate_proj"], self._modules["up_proj"], self._modules["down_proj"]
        if x.shape[-1] != gate_proj.in_features:
            gate_proj._check_full_width(x)
        first, second, third = gate_proj._parameters, up_proj._parameters, down_proj._parameters
        gate, gate_bias, up, up_bias, w2, b2 = locals_of(first["weight"], first["bias"], second["weight"],
                                                         second["bias"], third["weight"], third["bias"])
        owner, backend = down_proj.rank == 0, self._kernel_backend
        if self.fp8 is not None:
            self.fp8_scaling.update(x.device)  # once per step, before any chunk quantizes

        def shards(rows):
            if self.fp8 is not None:
                return fp8_glu_mlp_shard(rows, gate, up, gate_bias, up_bias, w2, b2, self.fp8_scaling,
                                         activation=GATED_ACTIVATIONS[self.activation], owner=owner,
                                         out_dtype=down_proj.reduce_dtype, backend=backend)
            return glu_mlp_shard(rows, gate, up, gate_bias, up_bias, w2, b2, activation=self.activation, owner=owner,
                                 out_dtype=down_proj.reduce_dtype, backend=backend)

        return _around_shards(self, x, gate_proj, shards)

    def full_state_dict(self):
        """The dense block's state dict, gathered from every rank (call it on every rank): "gate_proj.weight",
        "up_proj.weight", "down_proj.weight" (and biases), or the merged "gate_up_proj.weight" [2F, K] for a
        block built `from_merged`."""
        state = {f"{name}.{k}": v for name in ("gate_proj", "up_proj", "down_proj")
                 for k, v in getattr(self, name).full_state_dict().items()}
        if self.checkpoint_merged:
            for kind in ("weight", "bias"):
                if f"gate_proj.{kind}" in state:
                    halves = [state.pop(f"gate_proj.{kind}"), state.pop(f"up_proj.{kind}")]
                    state[f"{self.checkpoint_merged}.{kind}"] = torch.cat(halves[::-1] if self.checkpoint_up_first
                                                                          else halves)
        return state

    def load_full_state_dict(self, state_dict):
        """Load a dense gated block's state dict into the shards: gate_proj, up_proj and down_proj's tensors,
        or a merged [gate; up] tensor under `checkpoint_merged`'s name ("gate_up_proj") and down_proj's."""
        state = dict(state_dict)
        merged = self.checkpoint_merged or "gate_up_proj"
        for kind in ("weight", "bias"):
            value = state.pop(f"{merged}.{kind}", None)
            if value is not None:
                halves = value.chunk(2)
                state[f"gate_proj.{kind}"], state[f"up_proj.{kind}"] = halves[::-1] if self.checkpoint_up_first else halves
        for name in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"{name}."
            getattr(self, name).load_full_state_dict({k[len(prefix):]: v for k, v in state.items()
                                                      if k.startswith(prefix)})
        self._pack()

    def extra_repr(self):
        return f"activation={self.activation!r}" + _parallel_repr(self)
