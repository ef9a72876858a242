"""Tile configurations: the GPU autotune lists, their shared-memory pruning, and the interpreter's config.

Every list here is compiled for sm_90a and sm_80 by `benchmarks/compile_report.py`, whose gate (run in
CI) fails if a Hopper config of a 16-bit kernel spills, serializes its wgmma, or grows its mainloop past
1.5x a plain Triton GEMM's. The choices below are the ones that passed it under triton 3.6 and 3.9.
"""
from dataclasses import dataclass

import triton


@triton.constexpr_function
def epilogue_slices(subtile, grad_activation):
    """How many slices along N the epilogue of a tile runs in: the config's EPILOGUE_SUBTILE (1, 2 or 4),
    and twice that, at most 4, for the dGELU epilogue, which keeps z, erf and exp live besides the
    accumulator. The one statement of the rule: the kernels call it at compile time, and the launchers
    and the shared-memory estimate on the host (a TMA store of C is block_n / slices wide)."""
    return min(4, subtile * 2) if grad_activation else subtile


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    epilogue_subtile: int = 1  # the epilogue runs on this many slices of the tile along N: 1, 2 or 4

    def kwargs(self):
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "GROUP_M": self.group_m, "EPILOGUE_SUBTILE": self.epilogue_subtile}

    @classmethod
    def from_triton(cls, config):
        kw = config.kwargs
        return cls(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], config.num_warps, config.num_stages,
                   kw["EPILOGUE_SUBTILE"])

    def to_triton(self, pre_hook=None):
        return triton.Config(self.kwargs(), num_warps=self.num_warps, num_stages=self.num_stages,
                             pre_hook=pre_hook)

    def epilogue_slices(self, grad_activation):
        """How many slices the epilogue runs in (`epilogue_slices`)."""
        return epilogue_slices(self.epilogue_subtile, bool(grad_activation))

    def shared_bytes(self, element_size, store_element_size=0, slices=1, b_tiles=1):
        """Shared memory the kernel needs: num_stages buffers of an A and `b_tiles` B tiles (2 for the gated
        kernel's gate and up), and for a TMA store the staging buffer of one epilogue slice of C
        (`store_element_size` bytes an element). The
        compiler may add scratch; the compile report holds what it allocates to the device's limit for
        every config this estimate keeps."""
        pipeline = self.num_stages * (self.block_m + b_tiles * self.block_n) * self.block_k * element_size
        return pipeline + self.block_m * (self.block_n // slices) * store_element_size


# Tables of tiles: the lists below look alike on purpose, one row a config the autotuner may try.
# The config lists below are alike in shape on purpose (a kept duplicate): they are data, one tile a line.
HOPPER_CONFIGS = (
    # 128-row tiles for two warpgroups of 64-row wgmma; the epilogue in slices of at most 64 fp32
    # values per thread (triton 3.6 serializes wgmma (C7515) or spills above that).
    MatmulConfig(128, 256, 64, num_warps=8, num_stages=3, epilogue_subtile=4),
    MatmulConfig(128, 128, 64, num_warps=8, num_stages=4, epilogue_subtile=2),
    MatmulConfig(128, 128, 64, num_warps=4, num_stages=4, epilogue_subtile=2),
    MatmulConfig(64, 256, 64, num_warps=4, num_stages=4, epilogue_subtile=2),
    MatmulConfig(128, 64, 64, num_warps=4, num_stages=4),
    MatmulConfig(64, 128, 64, num_warps=4, num_stages=4),
)
SMALL_M_CONFIGS = (
    # Decode-sized M: few rows, long K tiles. The narrow, deep ones keep enough weight bytes in flight
    # when N / BLOCK_N is too few programs to fill the SMs (a decode step of a narrow shard).
    MatmulConfig(16, 32, 256, num_warps=4, num_stages=4),
    MatmulConfig(16, 64, 256, num_warps=4, num_stages=4),
    MatmulConfig(16, 64, 128, num_warps=4, num_stages=3),
    MatmulConfig(16, 128, 128, num_warps=4, num_stages=3),
    MatmulConfig(32, 64, 128, num_warps=4, num_stages=4),
    MatmulConfig(64, 64, 64, num_warps=4, num_stages=4),
)
AMPERE_CONFIGS = (
    # Shallower K tiles fit Ampere's smaller shared memory.
    MatmulConfig(128, 128, 32, num_warps=4, num_stages=4),
    MatmulConfig(128, 64, 32, num_warps=4, num_stages=4),
    MatmulConfig(64, 128, 32, num_warps=4, num_stages=4),
    MatmulConfig(64, 64, 32, num_warps=4, num_stages=5),
)
SPLITK_CONFIGS = (
    # The split-K kernel's tiles (decode): few rows, and narrow enough along N that the grid's tiles times
    # its splits make about one wave of SMs. Each split then streams its own slice of the weights.
    MatmulConfig(16, 64, 128, num_warps=4, num_stages=4),
    MatmulConfig(16, 128, 128, num_warps=4, num_stages=3),
    MatmulConfig(32, 64, 128, num_warps=4, num_stages=3),
    MatmulConfig(64, 64, 64, num_warps=4, num_stages=4),
)
GPU_CONFIGS = HOPPER_CONFIGS + SMALL_M_CONFIGS + AMPERE_CONFIGS


def matmul_configs(capability):
    """The pointer kernel's autotune candidates on a device of this compute capability."""
    return (HOPPER_CONFIGS if capability[0] >= 9 else AMPERE_CONFIGS) + SMALL_M_CONFIGS


def splitk_configs(capability):
    """The split-K kernel's autotune candidates (the same on every target: their shared memory fits sm_80's)."""
    return SPLITK_CONFIGS


# The split-K kernel splits K at most this many ways: past it the partials' traffic (M x N x 4 bytes a
# split, written and read back) grows while the grid already covers the SMs.
MAX_SPLIT_K = 16


def split_k(m, n, k, config, programs):
    """How many ways the split-K kernel splits K for this shape and tile: enough that tiles x splits
    reaches `programs` (the SM count: one wave), at most MAX_SPLIT_K and the number of K-tiles, and
    never leaving a split without K-tiles (so the count is rounded to what an even share of K-tiles
    gives)."""
    tiles = -(-m // config.block_m) * -(-n // config.block_n)
    k_tiles = max(1, -(-k // config.block_k))
    wanted = max(1, min(programs // tiles, MAX_SPLIT_K, k_tiles))
    per_split = -(-k_tiles // wanted)
    return -(-k_tiles // per_split)


# The persistent TMA kernel (Hopper only, 16-bit operands and output): one program per SM, and the
# Hopper configs with 128-row tiles (two warpgroups of 64-row wgmma).
TMA_CONFIGS = tuple(c for c in HOPPER_CONFIGS if c.block_m == 128)

# The elementwise dGELU pass (dZ = dY * gelu'(z), with per-row-block column sums for db). BLOCK_M is
# fixed, not tuned: it sets the number of partial column sums the launcher allocates.
DGELU_BLOCK_M = 32
DGELU_BLOCK_N = 128
DGELU_NUM_WARPS = 4

# Shared memory a block may opt into, by compute capability: 227 KB on H100 / H200, 163 KB on A100;
# consumer Ampere and Ada have 99 KB. On a device the launcher asks the driver instead.
SHARED_MEMORY_LIMIT = {(9, 0): 232448, (8, 0): 166912, (8, 7): 166912}
SHARED_MEMORY_LIMIT_FALLBACK = 101376


def shared_memory_limit(capability):
    return SHARED_MEMORY_LIMIT.get(tuple(capability), SHARED_MEMORY_LIMIT_FALLBACK)


# The gated forward (`kernels.GLU`) holds two fp32 accumulators. A tile whose two take more than 128 of a
# thread's registers spills or serializes its wgmma (128x128 on 4 warps: 1092 bytes of spill under triton 3.9),
# and these small-M tiles spilled 8 bytes in benchmarks/compile_report.py's gated_fwd rows, which pass the
# compile gate without them.
GATED_SPILLS = (MatmulConfig(16, 64, 128, num_warps=4, num_stages=3), MatmulConfig(16, 128, 128, num_warps=4, num_stages=3))


# The persistent TMA kernel's gated forward: its one tile that passed the compile gate under triton 3.6
# and 3.9 (128x64 on 4 warps ran a mainloop 1.53x the plain GEMM's under 3.6; its mainloop is not
# flattened with the tile loop, which serialized the wgmma of both tiles, C7515).
GATED_TMA_TILES = (MatmulConfig(128, 128, 64, num_warps=8, num_stages=4, epilogue_subtile=2),)


def two_accumulators_fit(config):
    """Whether two fp32 accumulators of the tile take at most 128 registers a thread."""
    return 2 * config.block_m * config.block_n // (32 * config.num_warps) <= 128


def gated_fits(config):
    """Whether the gated forward may run this tile: two accumulators fit (`two_accumulators_fit`), and not
    among GATED_SPILLS."""
    return two_accumulators_fit(config) and config not in GATED_SPILLS


# A promoted fp8 GEMM (`matmul._dot`, "fp8_promoted") holds a second accumulator for each K-tile's product,
# and waits for its wgmma before adding it (ptxas C7517, the promotion itself). Under triton 3.9 these
# tiles, whose two accumulators fit, still serialized their wgmma (C7514); those that do not fit spilled.
PROMOTED_SERIALIZES = (MatmulConfig(128, 64, 64, num_warps=4, num_stages=4),)


def promoted_fits(config):
    """Whether a promoted fp8 GEMM may run this tile."""
    return two_accumulators_fit(config) and config not in PROMOTED_SERIALIZES


def prune(configs, element_size, limit, store_element_size=0, grad_activation=False, gated=False, promoted=False):
    """The configs whose shared memory fits `limit` bytes (operands of `element_size` bytes; a TMA store
    of C elements of `store_element_size`; two B tiles when `gated`, and only tiles that `gated_fits`; only
    tiles that `promoted_fits` when `promoted`); the smallest when none does, so that a launch has a config."""
    def need(c):
        return c.shared_bytes(element_size, store_element_size, c.epilogue_slices(grad_activation),
                              2 if gated else 1)

    if gated:
        configs = [c for c in configs if gated_fits(c)] or list(configs)
    if promoted:
        configs = [c for c in configs if promoted_fits(c)] or list(configs)

    kept = [c for c in configs if need(c) <= limit]
    return kept or [min(configs, key=need)]


# The interpreter runs one program at a time in numpy, so a small fixed tile that still exercises the
# edge masks of test-sized shapes, and the split epilogue.
INTERPRETER_CONFIG = MatmulConfig(32, 32, 32, group_m=4, num_warps=4, num_stages=1, epilogue_subtile=2)
