"""Data-parallel training across processes started by torchrun (one per GPU; gloo on the CPU).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op and the
Trainer runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def setup(self, device: torch.device) -> bool:
        """Join the process group (NCCL on GPUs, gloo on the CPU); True if this call created it."""
        if not self.active or dist.is_initialized():
            return False
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (rank 0 decides to stop, all stop together)."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
