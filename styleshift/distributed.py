"""torch.distributed plumbing: which process am I, and the few collective operations training needs.

A single process (the usual case) gets a Context whose collectives are no-ops, so the trainer has one
code path. Under `torchrun`, the process group is created from torchrun's environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, name: str = "auto") -> torch.device:
        """One device per process: cuda:<local rank> when GPUs are used, else the CPU."""
        if name in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        if name == "cuda":
            raise ValueError("--device cuda: no CUDA device is available")
        return torch.device("cpu")

    def wrap_ddp(self, net: nn.Module, device: torch.device) -> nn.Module:
        if not self.distributed:
            return net
        ids = [device.index] if device.type == "cuda" else None
        # Instance norm keeps no running buffers, so there is nothing to broadcast before each forward.
        return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: all ranks must stop at the same step."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean over ranks of each scalar (losses for the log)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.stack([values[k].float().to(self._collective_device()) for k in keys])
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return {k: v / self.world_size for k, v in zip(keys, t)}

    def gather(self, obj):
        """A list of every rank's `obj` (any picklable value), on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if tdist.get_backend() == "nccl" else torch.device("cpu")


def context() -> Context:
    """This process's place in the job; joins the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend)
    return Context(
        rank=tdist.get_rank(),
        world_size=tdist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
