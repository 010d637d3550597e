"""torch.distributed plumbing: which process am I, and the few collective operations training needs.

A single process (the usual case) gets a Context whose collectives are no-ops, so the trainer has one
code path. Under `torchrun`, the process group is created from torchrun's environment variables
(nccl between GPUs, gloo between CPU processes); `launch` starts such a job on this machine.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

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
        if name == "mps":  # torch.distributed has no backend for Apple GPUs
            raise ValueError("--device mps: several processes cannot share an Apple GPU; use --device cpu")
        return torch.device("cpu")

    def wrap_ddp(self, net: nn.Module, device: torch.device) -> nn.Module:
        if not self.distributed:
            return net
        ids = [device.index] if device.type == "cuda" else None
        # Wrapping broadcasts rank 0's parameters, so every rank starts from the same weights. Instance norm
        # keeps no running statistics, so no buffer needs syncing before each forward.
        return nn.parallel.DistributedDataParallel(net, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC)

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

    def gather_to_main(self, obj):
        """A list of every rank's `obj` on rank 0 (None elsewhere): for large values only rank 0 keeps."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        tdist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` (any picklable value), on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def _collective_device(self) -> torch.device:
        # Small values go through gloo on the CPU (see `context`): no wait on the GPU's queue. Only a group
        # made elsewhere with nccl alone needs them on the GPU.
        return torch.device("cuda", self.local_rank) if tdist.get_backend() == "nccl" else torch.device("cpu")


# `broadcast_buffers` became `forward_sync_buffers` in recent torch; use whichever this torch knows.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def context() -> Context:
    """This process's place in the job; joins the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    if not tdist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # nccl for CUDA tensors (gradients), gloo for CPU ones: the per-step stop flag and the objects
            # gathered at checkpoints stay off the GPU, and `--device cpu` works on a machine with GPUs.
            backend = "cpu:gloo,cuda:nccl"
        tdist.init_process_group(backend)
        global _joined
        _joined = True
    return Context(
        rank=tdist.get_rank(),
        world_size=tdist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )


_joined = False  # whether context() made this process join a process group


def joined() -> bool:
    return _joined


def leave(code: int | str | None) -> NoReturn:
    """End a command-line process that took part in a torchrun job, once its command is done: flush what it
    printed, then exit with `code` (as sys.exit takes it) without the interpreter's teardown.

    Why: DistributedDataParallel keeps its process group alive after destroy_process_group (even once the
    wrapper is deleted and collected, gloo's threads keep running: checked with torch 2.14.1), and a gloo
    thread that destroys a finished collective while the interpreter finalizes takes the GIL, which ends the
    thread there; unwinding through that destructor terminates the process ("terminate called without an
    active exception", SIGABRT), so torchrun reported a job that had finished and saved everything as failed.
    It happened in about 1 job in 30 of the test suite's two-process jobs (gdb on the core showed where), and
    PyTorch PR 179291 describes the same race. Everything a command writes (checkpoints, styles, pictures) is
    already on disk by then, each file atomically."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            pass
    os._exit(code)


def close() -> None:
    """Leave the process group (at the end of a command run under torchrun)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets its environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(nproc: int, args: list[str]) -> int:
    """Run `python -m styleshift ARGS` as `nproc` processes on this machine under torchrun (its
    standalone rendezvous: a free local port, no address to give); returns the job's exit status."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "styleshift", *args]))
    except ChildFailedError as e:  # the workers have printed their own errors
        return next((f.exitcode for f in e.failures.values() if f.exitcode > 0), 1)
    except SignalException as e:  # Ctrl-C: torchrun passed it on to the workers, which saved and stopped
        return 128 + int(e.sigval)
    return 0
