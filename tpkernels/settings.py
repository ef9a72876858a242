"""Per-thread launch settings: the pinned config, the kernel choice, launch recording and precompiling.

Each is a context variable set by a context manager, so each thread and asyncio task sees its own
setting. `launch` reads them on its full path; `bound` reads the first two into every launch key.
"""
import contextlib
import contextvars

from tpkernels.kernels import MatmulConfig

__all__ = ["MATMUL_KERNELS", "SPLITK_ORDERS", "pin_config", "precompiling", "record_launches", "splitk_order",
           "use_matmul_kernel"]

MATMUL_KERNELS = ("auto", "pointer", "tma", "splitk")
PINNED_CONFIG = contextvars.ContextVar("tpkernels_pinned_config", default=None)
MATMUL_KERNEL = contextvars.ContextVar("tpkernels_matmul_kernel", default="auto")
RECORDED = contextvars.ContextVar("tpkernels_recorded_launches", default=None)
PRECOMPILING = contextvars.ContextVar("tpkernels_precompiling", default=False)
# The split-K kernel's program-to-split map (its SPLIT_ORDER constexpr), a debug setting.
SPLITK_ORDERS = {"in order": 0, "reversed": 1, "rotated": 2}
SPLITK_ORDER = contextvars.ContextVar("tpkernels_splitk_order", default=0)


@contextlib.contextmanager
def _setting(var, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def pin_config(config):
    """Launch every kernel inside the block with one `MatmulConfig` instead of autotuning.

    Args:
        config: a `tpkernels.MatmulConfig`, e.g. one of `tpkernels.kernels.GPU_CONFIGS`.
    """
    if not isinstance(config, MatmulConfig):
        raise TypeError(f"pin_config takes a tpkernels.MatmulConfig, got {type(config).__name__}")
    return _setting(PINNED_CONFIG, config)


def use_matmul_kernel(kernel):
    """Run every matmul inside the block on one kernel: "auto" (`launch.kernel_for`'s choice), "pointer", "tma"
    (wherever the operands allow it, the interpreter included; the pointer kernel elsewhere) or "splitk"
    (every shape). For tests and benchmarks.

    Args:
        kernel: "auto", "pointer", "tma" or "splitk".
    """
    if kernel not in MATMUL_KERNELS:
        raise ValueError(f"use_matmul_kernel: kernel must be one of {', '.join(MATMUL_KERNELS)}, got {kernel!r}")
    return _setting(MATMUL_KERNEL, kernel)


def splitk_order(order):
    """Remap which split each split-K program computes, inside the block: "in order" (program s computes
    split s, the default), "reversed" (split W - 1 - s) or "rotated" (split (s + W // 2) mod W). Programs of
    a tile then arrive in another order, so another split's program is the last to arrive and reduces:
    under the interpreter, which runs programs in order, this is how a test makes every split a reducer.
    The sum's order is fixed (splits 0, 1, ..., W - 1, whoever reduces), so every order gives the same bits.

    Args:
        order: "in order", "reversed" or "rotated".
    """
    if order not in SPLITK_ORDERS:
        raise ValueError(f"splitk_order: order must be one of {', '.join(map(repr, SPLITK_ORDERS))}, got {order!r}")
    return _setting(SPLITK_ORDER, SPLITK_ORDERS[order])


@contextlib.contextmanager
def record_launches():
    """Collect, inside the block, one line per kernel launched: the kernel ("pointer", "tma", "splitk",
    "dgelu"), the config it ran (the autotuner's pick, or the pinned one) and, for split-K, the split.
    For benchmarks: what a row measured."""
    launches = []
    token = RECORDED.set(launches)
    try:
        yield launches
    finally:
        RECORDED.reset(token)


def picked(config):
    """The MatmulConfig a launch ran: the pinned one, or an autotuner's pick for its latest launch."""
    if config is None or isinstance(config, MatmulConfig):
        return config
    picked = getattr(config, "best_config", None)
    return None if picked is None else MatmulConfig.from_triton(picked)


def record(kind, config, suffix=""):
    """Record a launch (`record_launches`); returns its line."""
    config = picked(config)
    line = kind if config is None else (f"{kind} {config.block_m}x{config.block_n}x{config.block_k} "
                                        f"warps={config.num_warps} stages={config.num_stages} "
                                        f"subtile={config.epilogue_subtile}{suffix}")
    launches = RECORDED.get()
    if launches is not None:
        launches.append(line)
    return line


@contextlib.contextmanager
def precompiling():
    """Inside the block, GPU launches compile every config they could run and launch nothing: outputs
    are left unwritten. With triton's `AsyncCompileMode(executor)` around it, the compiles run on the
    executor in parallel, and leaving that block waits for them. For benchmarks on a cold cache."""
    token = PRECOMPILING.set(True)
    try:
        yield
    finally:
        PRECOMPILING.reset(token)
