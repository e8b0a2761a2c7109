"""A paged KV pool: preallocated key/value memory in fixed-size blocks, shared by reference count.

Token ``i`` of a sequence lives in slot ``blocks[i // block_size] * block_size + i % block_size``
of every layer's key and value tensors. Blocks are allocated from a free list and returned when
their last reference is released, so usage is back to zero once every sequence and every kept
stream prefix is gone (``tests/lm_service/test_batched_engine.py`` checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.errors import ResourceExhausted


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Key + value bytes of one token over every layer."""
        return (
            2
            * self.layers
            * self.kv_heads
            * self.head_dim
            * torch.tensor([], dtype=self.dtype).element_size()
        )


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or MemAvailable on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


class KVPool:
    def __init__(self, geometry: KVGeometry, num_blocks: int, block_size: int, device: torch.device) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one token")
        self.geometry = geometry
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (geometry.layers, num_blocks * block_size, geometry.kv_heads, geometry.head_dim)
        # Zeroed: padded attention reads masked slots, and 0 * NaN from stale memory would be NaN.
        self.k = torch.zeros(shape, dtype=geometry.dtype, device=device)
        self.v = torch.zeros(shape, dtype=geometry.dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks

    @classmethod
    def from_budget(
        cls, geometry: KVGeometry, budget_bytes: int, block_size: int, device: torch.device
    ) -> KVPool:
        blocks = budget_bytes // (geometry.bytes_per_token * block_size)
        if blocks < 1:
            raise ResourceExhausted(
                f"a KV budget of {budget_bytes / 2**20:.1f} MiB holds not even one block of {block_size} tokens "
                f"({geometry.bytes_per_token} bytes per token)"
            )
        return cls(geometry, int(blocks), block_size, device)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ResourceExhausted(f"the KV pool has {len(self._free)} free blocks, {n} needed")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is free"
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} released twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def copy_block(self, src: int, dst: int, tokens: int) -> None:
        """Copy the first ``tokens`` slots of block ``src`` into block ``dst`` (every layer)."""
        s, d = src * self.block_size, dst * self.block_size
        self.k[:, d : d + tokens] = self.k[:, s : s + tokens]
        self.v[:, d : d + tokens] = self.v[:, s : s + tokens]

    def slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        """Slot ids of tokens [start, end) of a sequence with these blocks."""
        bs = self.block_size
        return [blocks[i // bs] * bs + i % bs for i in range(start, end)]
