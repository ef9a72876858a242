"""The optional native extension `tpkernels._C`: whether it loaded, and for which devices.

It registers `tpkernels::epilogue_linear`, `epilogue_linear_backward` and `epilogue_dgelu_linear` with
kernels for CPU (C++: oneDNN's GEMM with the epilogue as its post-ops; with the packed-weight cache on,
on weights packed once per version) and, where built with nvcc, CUDA (cuBLASLt epilogues). `custom_ops`
gives them their fakes and autograd; `ops` offers them as backends "cpu" and "cublaslt".
`cpu_weight_cache` reads and sets the CPU kernels' packed-weight cache.
"""
import importlib.util
import os

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


_CACHE_FIELDS = ("enabled", "max_bytes", "bytes", "weights", "hits", "packs", "refused")
_weight_cache_on = False  # a mirror of the C++ flag for backend="auto" (torch.compile reads it, no op call)
_CACHE_ENV = "TPKERNELS_CPU_WEIGHT_CACHE"  # "1" turns the cache on at import (a serving process's switch)


def weight_cache_on():
    """Whether the CPU backend's packed-weight cache is on (`cpu_weight_cache`)."""
    return _weight_cache_on


def cpu_weight_cache(enabled=None, max_bytes=None):
    """The CPU backend's packed weights: copies of weights in oneDNN's blocked layout, one per weight view
    and dtype, made on first use and again after each in-place write to the weight, and dropped when the
    weight is freed. oneDNN then skips the weight's repack that every unpacked call pays (eager's GEMM
    too): the gain is largest at decode, in bf16, and for the row stage's fp32 partials of bf16 operands
    (whose weight is widened once per version instead of per call). The copies cost their bytes in memory.

    Off by default; TPKERNELS_CPU_WEIGHT_CACHE=1 in the environment turns it on at import. Turn it on
    only where every write to a weight moves its version counter: optimizer steps, `load_state_dict`, and
    in-place ops on the weight itself do; a write through `.data` (`w.data.copy_(...)`, used by some
    optimizers and EMA updates) does not, and would leave a stale copy. Inference on fixed weights is
    the case it is for. backend="auto" follows the CPU table's rules for the cache's state.

    Args:
        enabled: True turns it on; False turns it off and frees the copies; None leaves it.
        max_bytes: the copies' budget in bytes (default: a quarter of the machine's memory); a weight that
            would take them past it runs unpacked. Setting a smaller budget frees the copies. None leaves it.

    Returns:
        {"enabled", "max_bytes", "bytes" (held now), "weights" (copies held), "hits", "packs",
        "refused" (weights over the budget, run unpacked)}.
    """
    if not has("cpu"):
        raise RuntimeError(f"cpu_weight_cache: the native extension has no CPU kernels ({status()})")
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"cpu_weight_cache: enabled must be None, True or False, got {enabled!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"cpu_weight_cache: max_bytes must be None or an int >= 0, got {max_bytes!r}")
    return _weight_cache_call(-1 if enabled is None else int(enabled), -1 if max_bytes is None else max_bytes)


def _weight_cache_call(state, max_bytes):
    global _weight_cache_on
    report = dict(zip(_CACHE_FIELDS, torch.ops.tpkernels.cpu_weight_cache(state, max_bytes)))
    _weight_cache_on = report["enabled"] == 1
    report["enabled"] = _weight_cache_on
    return report


def pause_weight_cache(paused):
    """For benchmarks that time one weight both ways: True stops using the copies and keeps them; False
    uses them again. Only with the cache on; the copies stay valid only while no weight is written."""
    if not (_weight_cache_on or torch.ops.tpkernels.cpu_weight_cache(-1, -1)[0] == 2):
        raise RuntimeError("pause_weight_cache: the packed-weight cache is off; turn it on first")
    _weight_cache_call(2 if paused else 1, -1)


_cache_env = os.environ.get(_CACHE_ENV, "0").strip()
if _cache_env not in ("0", "1", ""):
    raise ValueError(f"{_CACHE_ENV}={_cache_env!r}: use 1 (the CPU backend's packed-weight cache on) or 0 (off)")
if _cache_env == "1" and has("cpu"):
    cpu_weight_cache(enabled=True)
