"""Pure Triton code: the tiled matmul family, GELU as `tl` functions, and the config lists."""
from tpkernels.kernels.configs import (
    matmul_configs,
    DGELU_BLOCK_M,
    DGELU_BLOCK_N,
    DGELU_NUM_WARPS,
    GPU_CONFIGS,
    INTERPRETER_CONFIG,
    TMA_CONFIGS,
    MatmulConfig,
    epilogue_slices,
    prune,
    shared_memory_limit,
)
from tpkernels.kernels.matmul import GELU, GELU_TANH, IDENTITY, INTERPRETED, _dgelu_kernel, _matmul_kernel
from tpkernels.kernels.matmul_tma import _matmul_tma_persistent_kernel

__all__ = [
    "DGELU_BLOCK_M",
    "DGELU_BLOCK_N",
    "DGELU_NUM_WARPS",
    "GELU",
    "GELU_TANH",
    "GPU_CONFIGS",
    "IDENTITY",
    "INTERPRETED",
    "INTERPRETER_CONFIG",
    "MatmulConfig",
    "TMA_CONFIGS",
    "_dgelu_kernel",
    "_matmul_kernel",
    "_matmul_tma_persistent_kernel",
    "epilogue_slices",
    "matmul_configs",
    "prune",
    "shared_memory_limit",
]
