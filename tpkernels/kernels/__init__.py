"""Pure Triton code: the tiled matmul family (pointer, persistent TMA, split-K), GELU as `tl` functions, the fp8
quantize and scale-update kernels, and the config lists."""
from tpkernels.kernels.configs import (
    matmul_configs,
    DGELU_BLOCK_M,
    DGELU_BLOCK_N,
    DGELU_NUM_WARPS,
    GATED_TMA_TILES,
    GPU_CONFIGS,
    INTERPRETER_CONFIG,
    MAX_SPLIT_K,
    SPLITK_CONFIGS,
    TMA_CONFIGS,
    MatmulConfig,
    epilogue_slices,
    prune,
    shared_memory_limit,
    split_k,
    splitk_configs,
)
from tpkernels.kernels.matmul import GELU, GELU_TANH, GLU, IDENTITY, INTERPRETED, SILU, _dgelu_kernel, _matmul_kernel
from tpkernels.kernels.fp8 import _quantize_kernel, _scale_update_kernel
from tpkernels.kernels.matmul_splitk import _matmul_splitk_kernel
from tpkernels.kernels.matmul_tma import _matmul_tma_persistent_kernel

__all__ = [
    "DGELU_BLOCK_M",
    "DGELU_BLOCK_N",
    "DGELU_NUM_WARPS",
    "GATED_TMA_TILES",
    "GELU",
    "GELU_TANH",
    "GLU",
    "GPU_CONFIGS",
    "IDENTITY",
    "INTERPRETED",
    "INTERPRETER_CONFIG",
    "MAX_SPLIT_K",
    "SPLITK_CONFIGS",
    "MatmulConfig",
    "SILU",
    "TMA_CONFIGS",
    "_dgelu_kernel",
    "_matmul_kernel",
    "_matmul_splitk_kernel",
    "_matmul_tma_persistent_kernel",
    "_quantize_kernel",
    "_scale_update_kernel",
    "epilogue_slices",
    "matmul_configs",
    "prune",
    "shared_memory_limit",
    "split_k",
    "splitk_configs",
]
