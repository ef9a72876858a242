"""Autotuning: one autotuner per kernel kind and compute capability, keyed on power-of-two size buckets
and the operand layout, its configs pruned to the device's shared memory; and the autotuners' sync
across ranks (`sync_autotuning`).
"""
import inspect
import os
import threading

import triton

from tpkernels.kernels import (
    GATED_TMA_TILES,
    GLU,
    IDENTITY,
    TMA_CONFIGS,
    MatmulConfig,
    _matmul_kernel,
    _matmul_splitk_kernel,
    _matmul_tma_persistent_kernel,
    epilogue_slices,
    matmul_configs,
    prune,
    splitk_configs,
)

__all__ = ["AUTOTUNERS", "autotuner", "sync_autotuning"]


def bucket(n):
    # Autotune keys on powers of two, so a new sequence length reuses the tuning of its bucket.
    return 1 << (max(n, 1) - 1).bit_length()


# LAYOUT (`layout_code`) keeps apart launches of one size bucket whose operands lie differently in
# memory: the NT forward and the NN dX of a layer want different tiles. INPUT_PRECISION keeps apart a
# promoted fp8 GEMM (K >= launch.FP8_PROMOTE_K) and an unpromoted one of the same K bucket (2049 to 4096):
# the promoted one may run only the tiles `configs.promoted_fits`.
AUTOTUNE_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "LAYOUT", "ACTIVATION", "GRAD_ACTIVATION", "HAS_RESIDUAL",
                "STORE_PREACT", "INPUT_PRECISION"]
_AUTOTUNE_CAN_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


def device_shared_memory(device_index):
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def pruner(operand, store_operand=None, gated_tiles=None):
    """An early_config_prune that keeps the configs fitting the device's shared memory (`prune`); for a
    gated launch, only `gated_tiles` where given (the TMA kernel's)."""

    def early_config_prune(configs, named_args, **kwargs):
        a = named_args[operand]
        a = getattr(a, "base", a)  # a TensorDescriptor holds its tensor as .base
        store = getattr(named_args[store_operand], "base", None) if store_operand else None
        grad_activation = kwargs.get("GRAD_ACTIVATION", named_args.get("GRAD_ACTIVATION", IDENTITY)) != IDENTITY
        gated = kwargs.get("ACTIVATION", named_args.get("ACTIVATION", IDENTITY)) >= GLU
        promoted = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION")) == "fp8_promoted"
        candidates = [MatmulConfig.from_triton(c) for c in configs]
        if gated and gated_tiles is not None:
            candidates = [c for c in candidates if c in gated_tiles] or candidates
        kept = prune(candidates, a.element_size(),
                     device_shared_memory(a.device.index),
                     store_element_size=0 if store is None else store.element_size(),
                     grad_activation=grad_activation or gated, gated=gated,  # gated: the dGELU's slices too
                     promoted=promoted)
        return [c for c in configs if MatmulConfig.from_triton(c) in kept]

    return early_config_prune


def make_autotuner(kernel, **options):
    # Tuned configs persist across runs in triton's cache, keyed by the kernel, triton's version, the
    # device and the autotune key (TPKERNELS_AUTOTUNE_CACHE=0 turns that off).
    if _AUTOTUNE_CAN_CACHE:
        options["cache_results"] = os.environ.get("TPKERNELS_AUTOTUNE_CACHE", "1") != "0"
    return triton.autotune(key=AUTOTUNE_KEY, **options)(kernel)


def set_block_shapes(nargs):
    # Descriptors are built before the autotuner picks a tile; each config sets their block shapes.
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bk, bm] if nargs["A_TRANS"] else [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_TRANS"] else [bk, bn]
    slices = epilogue_slices(nargs["EPILOGUE_SUBTILE"], nargs["GRAD_ACTIVATION"] != IDENTITY or nargs["ACTIVATION"] >= GLU)
    nargs["c_desc"].block_shape = [bm, bn // slices]


# Every autotuner this process made, by (kernel kind, compute capability): what `sync_autotuning` sends.
AUTOTUNERS = {}
_AUTOTUNERS_LOCK = threading.Lock()


def autotuner(kind, capability):
    """The autotuned kernel of this kind ("pointer", "tma" or "splitk") for devices of this compute capability."""
    key = (kind, tuple(capability))
    with _AUTOTUNERS_LOCK:
        if key not in AUTOTUNERS:
            if kind == "pointer":
                AUTOTUNERS[key] = make_autotuner(
                    _matmul_kernel, configs=[c.to_triton() for c in matmul_configs(key[1])],
                    prune_configs_by={"early_config_prune": pruner("a_ptr")},
                    # The output may be the residual itself (in-place add); tuning runs must not compound it.
                    restore_value=["c_ptr"])
            elif kind == "splitk":
                AUTOTUNERS[key] = make_autotuner(
                    _matmul_splitk_kernel, configs=[c.to_triton() for c in splitk_configs(key[1])],
                    prune_configs_by={"early_config_prune": pruner("a_ptr")}, restore_value=["c_ptr"])
            elif kind == "tma":
                AUTOTUNERS[key] = make_autotuner(
                    _matmul_tma_persistent_kernel, configs=[c.to_triton(pre_hook=set_block_shapes) for c in TMA_CONFIGS],
                    prune_configs_by={"early_config_prune": pruner("a_desc", store_operand="c_desc",
                                                                   gated_tiles=GATED_TMA_TILES)})
            else:
                raise ValueError(f"autotuner: kind must be 'pointer', 'tma' or 'splitk', got {kind!r}")
        return AUTOTUNERS[key]


def config_identity(config):
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def sync_autotuning(process_group=None):
    """Make every rank of the group use rank 0's autotuned configs (a collective: call it on every rank).

    The autotuner times configs on each rank, and ranks may pick differently; a different tile sums in a
    different order, so replicated results (the row bias's gradient, say) would differ in their last
    bits. Call this after a warm-up step, which tunes every shape the model uses: each rank then takes
    rank 0's config for every shape rank 0 has tuned. Tuned configs also persist across runs in
    triton's cache (`TPKERNELS_AUTOTUNE_CACHE=0` turns that off).

    Args:
        process_group: the tensor-parallel group (a ProcessGroup or a 1-D DeviceMesh); None is the default
            group.

    Returns:
        The number of (kernel, shape) entries taken from rank 0.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(process_group, DeviceMesh):  # a 1-D mesh (mesh["tp"]) stands for its group
        process_group = process_group.get_group()
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_world_size(group) == 1:
        return 0
    with _AUTOTUNERS_LOCK:
        mine = sorted(AUTOTUNERS.items())
    entries = [[(kind_capability, key, config_identity(config)) for kind_capability, tuner in mine
                for key, config in tuner.cache.items()]]
    dist.broadcast_object_list(entries, src=dist.get_global_rank(group, 0), group=group)
    for (kind, capability), key, identity in entries[0]:
        tuner = autotuner(kind, capability)  # made here if rank 0 ran a kernel this rank has not
        config = next((c for c in tuner.configs if config_identity(c) == identity), None)
        if config is None:
            raise RuntimeError(f"sync_autotuning: rank 0's config {identity} for the {kind} kernel on sm_"
                               f"{capability[0]}{capability[1]} is not among this rank's; every rank must run "
                               f"the same tpkernels and triton")
        tuner.cache[key] = config
    return len(entries[0])
