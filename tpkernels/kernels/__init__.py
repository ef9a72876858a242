"""Pure Triton code: the tiled matmul family, GELU as `tl` functions, and the config lists."""
from tpkernels.kernels.configs import GPU_CONFIGS, INTERPRETER_CONFIG, MatmulConfig
from tpkernels.kernels.matmul import GELU, GELU_TANH, IDENTITY, INTERPRETED, _matmul_kernel

__all__ = [
    "GELU",
    "GELU_TANH",
    "GPU_CONFIGS",
    "IDENTITY",
    "INTERPRETED",
    "INTERPRETER_CONFIG",
    "MatmulConfig",
    "_matmul_kernel",
]
