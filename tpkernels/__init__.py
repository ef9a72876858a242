"""tpkernels: fused Triton kernels for tensor-parallel transformer MLPs.

    y = gelu(x @ W1.T) @ W2.T, with W1 split by output features (column) and W2 by input features (row):
    each rank computes linear_gelu(x, W1_r) with no communication, then linear_partial(h_r, W2_r), and
    one all-reduce sums the partials. The gated MLP of Llama, Mistral, Qwen, Gemma and Phi-3,
    down(act(x @ Wg.T) * (x @ Wu.T)), splits gate and up by the same rows: linear_glu / glu_mlp_shard,
    TensorParallelGatedMLP.
"""
from tpkernels import distributed, fp8
from tpkernels.fp8 import FP8Recipe
from tpkernels.kernels import MatmulConfig
from tpkernels.nn import (ColumnParallelLinear, RowParallelLinear, TensorParallelGatedMLP, TensorParallelMLP,
                          set_sequence_length)
from tpkernels.checkpoint import empty_parameters, load_sharded, save_sharded
from tpkernels.ops import (backends, glu_mlp_shard, linear_gelu, linear_glu, linear_partial, mlp_shard, pin_config,
                           sync_autotuning)
from tpkernels.parallelize import ParallelizeReport, parallelize

__version__ = "0.1.0"
__all__ = [
    "ColumnParallelLinear",
    "FP8Recipe",
    "MatmulConfig",
    "ParallelizeReport",
    "RowParallelLinear",
    "backends",
    "TensorParallelGatedMLP",
    "TensorParallelMLP",
    "distributed",
    "empty_parameters",
    "fp8",
    "glu_mlp_shard",
    "linear_gelu",
    "linear_glu",
    "linear_partial",
    "load_sharded",
    "mlp_shard",
    "parallelize",
    "pin_config",
    "save_sharded",
    "set_sequence_length",
    "sync_autotuning",
]
