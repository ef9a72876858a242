"""TensorParallelGatedMLP: Llama's, Mistral's, Qwen's, Gemma's and Phi-3's MLP, gate and up split by the same
rows, their local shards one buffer."""
import torch
from torch import nn

from tpkernels.dtensor import is_dtensor, locals_of, parameter, placement
from tpkernels.fp8 import MLP_TENSORS, fp8_glu_mlp_shard
from tpkernels.custom_ops_gated import adjacent
from tpkernels.ops import GATED_ACTIVATIONS, glu_mlp_shard
from tpkernels.nn.common import _around_shards, _check_backend, _check_parallel_options, _parallel_repr, _set_fp8
from tpkernels.nn.linear import ColumnParallelLinear, RowParallelLinear


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
