"""Multi-process training under `torchrun`: the process group and the few collectives the
trainer needs, behind one object that is a no-op in a single process.

    ctx = Distributed.from_env(device)   # torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else 1 process
    ctx.sum_floats(a, b)                 # each value summed over ranks (itself with 1 process)

Conventions of the trainer built on it (`nflux.training.trainer`):

- `--batch` is the global batch. Every rank draws the same global batch indices (and image
  dequantisation noise) from a data generator seeded by `seed`, and takes its own contiguous
  `batch / world_size` slice, so the shards of every global batch are disjoint and together
  are exactly the single-process batch. DDP averages the gradients, which makes them the
  gradient of the global batch mean.
- Model init uses `seed` on every rank (DDP also broadcasts rank 0's parameters and buffers);
  ActNorm's data-dependent init runs on the whole global first batch, on every rank, before
  DDP wraps the model. The global torch RNG is then seeded with `seed + rank`.
- Decisions (skip a non-finite step, validation, early stopping, stop on Ctrl-C) are taken on
  all-reduced values, so every rank takes the same one.
- Rank 0 writes every output; every rank reads `--out` on `--resume`, so with several nodes
  `--out` must be on storage that all nodes see.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Distributed"]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this object created the process group (and destroys it)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> "Distributed":
        """Join the process group that torchrun describes in the environment (gloo on CPU,
        nccl on CUDA; CUDA ranks use device `cuda:LOCAL_RANK`), or a single process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        device = torch.device(device)
        if world_size <= 1:
            return cls(device=device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            # A rank that dies makes torchrun stop the others; the timeout only bounds a hang.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=10))
        return cls(rank, dist.get_world_size(), local_rank, device, owns)

    def sum_floats(self, *values: float) -> list[float]:
        """Each value summed over ranks (float64; the values themselves with one process)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items (sizes differ by at most one)."""
        start = self.rank * n // self.world_size
        return slice(start, (self.rank + 1) * n // self.world_size)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def agree(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same int `value`."""
        if not self.active:
            return
        t = torch.tensor([value, -value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t[0].item() != value or -t[1].item() != value:
            raise RuntimeError(f"ranks disagree on {what}: rank {self.rank} has {value}, "
                               f"the range over ranks is [{-t[1].item():g}, {t[0].item():g}]")

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
