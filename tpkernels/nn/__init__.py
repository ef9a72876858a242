"""Drop-in tensor-parallel layers over torch.distributed, running the fused kernels.

The package: `linear` (ColumnParallelLinear, RowParallelLinear), `mlp` (TensorParallelMLP), `gated`
(TensorParallelGatedMLP), and what they share, `common` (options, sequence lengths, the collectives
around an MLP's shards, fp8 set-up).

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
from tpkernels.nn.common import set_sequence_length
from tpkernels.nn.gated import TensorParallelGatedMLP
from tpkernels.nn.linear import ColumnParallelLinear, RowParallelLinear
from tpkernels.nn.mlp import TensorParallelMLP

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "TensorParallelGatedMLP", "TensorParallelMLP",
           "set_sequence_length"]
