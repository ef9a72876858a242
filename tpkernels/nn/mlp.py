"""TensorParallelMLP: a column layer with GELU fused, then a row layer, run as one op per rank."""
from torch import nn

from tpkernels.distributed import copy_to, reduce_from
from tpkernels.dtensor import locals_of
from tpkernels.fp8 import MLP_TENSORS, FP8Scaling, check_recipe, fp8_mlp_shard
from tpkernels.ops import mlp_shard
from tpkernels.nn.common import _ACTIVATION_CODES, _around_shards, _check_backend, _check_parallel_options
from tpkernels.nn.linear import ColumnParallelLinear, RowParallelLinear


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
