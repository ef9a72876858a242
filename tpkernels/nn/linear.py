"""ColumnParallelLinear and RowParallelLinear, and their shared base: one sharded `nn.Linear` each."""
import math

import torch
from torch import nn

from tpkernels import overlap as chunked  # the chunked (overlapped) schedules; `overlap` is an option
from tpkernels.distributed import (copy_to, gather_from, get_rank, get_world_size, group_of, reduce_from, scatter_to,
                                   shard, shard_range)
from tpkernels.sequence_parallel import gather_sequence, reduce_scatter_sequence
from tpkernels.dtensor import DeviceMesh, DTensor, is_dtensor, local, locals_of, mesh_of, parameter, placement
from tpkernels.fp8 import LINEAR_TENSORS, fp8_linear
from tpkernels.initialization import init_linear_shard
from tpkernels.ops import linear_gelu, linear_partial
from tpkernels.nn.common import (_ACTIVATION_CODES, _ACTIVATIONS, _check_backend, _check_parallel_options,
                                 _parallel_repr, _sequence_dim, _sequence_lengths, _set_fp8)


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
