"""The optional native extension `tpkernels._C`: whether it loaded, and for which devices.

It registers `tpkernels::epilogue_linear`, `epilogue_linear_backward` and `epilogue_dgelu_linear` with
kernels for CPU (C++) and, where built with nvcc, CUDA (cuBLASLt epilogues). `custom_ops` gives them
their fakes and autograd; `ops` offers them as backends "cpu" and "cublaslt".
"""
import importlib.util

import torch

try:
    from tpkernels import _C  # noqa: F401  (importing it registers the ops)

    ERROR = None
except ImportError as _error:
    _C = None
    if importlib.util.find_spec("tpkernels._C") is None:
        ERROR = ("no tpkernels._C in the install: build it with `pip install --no-build-isolation -e .` "
                 "(`-v` shows why a build failed; TPKERNELS_BUILD_EXT=1 makes it an error)")
    else:
        ERROR = f"{type(_error).__name__}: {_error}"

LOADED = _C is not None

# Read once: torch.compile traces the backend choice, and a dispatcher query would break its graph.
_KERNELS = {
    device: LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("tpkernels::epilogue_linear", key)
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def has(device_type):
    """Whether the native extension has kernels for this device type ("cpu" or "cuda")."""
    return _KERNELS.get(device_type, False)


def status():
    """One line: what was built, or why nothing was."""
    if not LOADED:
        return f"not built or not importable: {ERROR}"
    return "built for " + " and ".join(kind for kind in ("cpu", "cuda") if has(kind))
