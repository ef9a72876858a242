"""Tile configurations: the GPU autotune list, and the one fixed config the interpreter runs."""
from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self):
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m}

    def to_triton(self):
        return triton.Config(self.kwargs(), num_warps=self.num_warps, num_stages=self.num_stages)


GPU_CONFIGS = (
    # Hopper first: large tiles, deep pipelines, 8 warps for the 128 x 256 tile.
    MatmulConfig(128, 256, 64, num_warps=8, num_stages=3),
    MatmulConfig(256, 128, 64, num_warps=8, num_stages=3),
    MatmulConfig(128, 128, 64, num_warps=8, num_stages=4),
    MatmulConfig(128, 128, 64, num_warps=4, num_stages=4),
    MatmulConfig(64, 256, 64, num_warps=4, num_stages=4),
    MatmulConfig(128, 64, 64, num_warps=4, num_stages=4),
    MatmulConfig(64, 128, 64, num_warps=4, num_stages=4),
    # Decode-sized M: few rows, long K tiles.
    MatmulConfig(16, 64, 128, num_warps=4, num_stages=4),
    MatmulConfig(16, 128, 128, num_warps=4, num_stages=3),
    MatmulConfig(32, 64, 128, num_warps=4, num_stages=4),
    MatmulConfig(64, 64, 64, num_warps=4, num_stages=4),
    # Ampere: shallower K tiles fit its smaller shared memory.
    MatmulConfig(128, 128, 32, num_warps=4, num_stages=4),
    MatmulConfig(128, 64, 32, num_warps=4, num_stages=4),
    MatmulConfig(64, 128, 32, num_warps=4, num_stages=4),
    MatmulConfig(64, 64, 32, num_warps=4, num_stages=5),
)

# The interpreter runs one program at a time in numpy, so a small fixed tile that still exercises the
# edge masks of test-sized shapes.
INTERPRETER_CONFIG = MatmulConfig(32, 32, 32, group_m=4, num_warps=4, num_stages=1)
