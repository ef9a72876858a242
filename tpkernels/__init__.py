"""tpkernels: fused Triton kernels for tensor-parallel transformer MLPs.

    y = gelu(x @ W1.T) @ W2.T, with W1 split by output features (column) and W2 by input features (row):
    each rank computes linear_gelu(x, W1_r) with no communication, then linear_partial(h_r, W2_r), and
    one all-reduce sums the partials.
"""
from tpkernels import distributed, fp8
from tpkernels.fp8 import FP8Recipe
from tpkernels.kernels import MatmulConfig
from tpkernels.nn import ColumnParallelLinear, RowParallelLinear, TensorParallelMLP
from tpkernels.checkpoint import empty_parameters, load_sharded, save_sharded
from tpkernels.ops import backends, linear_gelu, linear_partial, mlp_shard, pin_config, sync_autotuning
from tpkernels.parallelize import ParallelizeReport, parallelize

__version__ = "0.1.0"
__all__ = [
    "ColumnParallelLinear",
    "FP8Recipe",
    "MatmulConfig",
    "ParallelizeReport",
    "RowParallelLinear",
    "backends",
    "TensorParallelMLP",
    "distributed",
    "empty_parameters",
    "fp8",
    "linear_gelu",
    "linear_partial",
    "load_sharded",
    "mlp_shard",
    "parallelize",
    "pin_config",
    "save_sharded",
    "sync_autotuning",
]
