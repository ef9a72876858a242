"""The optional native extension `tpkernels._C`: whether it loaded, and for which devices.

It registers `tpkernels::epilogue_linear`, `epilogue_linear_backward` and `epilogue_dgelu_linear` with
kernels for CPU (C++: oneDNN's GEMM with the epilogue as its post-ops, on weights packed once per
version) and, where built with nvcc, CUDA (cuBLASLt epilogues). `custom_ops` gives them their fakes and
autograd; `ops` offers them as backends "cpu" and "cublaslt". `cpu_weight_cache` reads and sets the CPU
kernels' packed-weight cache.
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


_CACHE_FIELDS = ("max_bytes", "bytes", "weights", "hits", "packs", "refused")


def cpu_weight_cache(max_bytes=None):
    """The CPU backend's packed weights: copies of weights in oneDNN's blocked layout, one per weight view
    and dtype, made on first use and again after each in-place write to the weight (an optimizer step,
    `load_state_dict`), and dropped when the weight is freed. A weight that would take the cache past
    `max_bytes` runs unpacked (oneDNN reorders it on every call, as eager's GEMM does).

    Args:
        max_bytes: None reads the cache; an int sets its budget in bytes (default: a quarter of the
            machine's memory) and drops what no longer fits; 0 empties it and turns it off.

    Returns:
        {"max_bytes", "bytes" (held now), "weights" (copies held), "hits", "packs", "refused" (over budget)}.
    """
    if not has("cpu"):
        raise RuntimeError(f"cpu_weight_cache: the native extension has no CPU kernels ({status()})")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"cpu_weight_cache: max_bytes must be None or an int >= 0, got {max_bytes!r}")
    return dict(zip(_CACHE_FIELDS, torch.ops.tpkernels.cpu_weight_cache(-1 if max_bytes is None else max_bytes)))
