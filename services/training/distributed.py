"""Data-parallel training across processes started by torchrun (one per GPU; gloo on the CPU).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op and the
Trainer runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives reduce

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def setup(self, device: torch.device) -> bool:
        """Join the process group (NCCL on GPUs, gloo on the CPU); True if this call created it.

        The timeout is long: the other ranks wait at a barrier while rank 0 evaluates and saves."""
        if not self.active or dist.is_initialized():
            return False
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        self.device = device
        return True

    def _tensor(self, value: float, dtype: torch.dtype) -> torch.Tensor:
        # NCCL reduces only device tensors; gloo only CPU ones.
        return torch.tensor([value], dtype=dtype, device=self.device)

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = self._tensor(value, torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks (rank 0 passes the real one, the others -1)."""
        if not self.active:
            return value
        t = self._tensor(value, torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (rank 0 decides to stop, all stop together)."""
        if not self.active:
            return flag
        t = self._tensor(1 if flag else 0, torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
