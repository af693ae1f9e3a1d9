"""Where a training process runs: its device, its place in a ``torchrun`` job, and its precision.

DDP: under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its own share of each epoch's patches
(``DistributedSampler``-style), gradients are averaged, and only rank 0 validates, logs and writes
checkpoints. A rank that dies or hangs makes the others fail after :data:`DIST_TIMEOUT` instead of waiting
forever.
"""

from __future__ import annotations

import gc
import os
import resource
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctdiff.device import pick_device

# How long a process waits for the others in a collective before the job fails with an error (gloo and
# NCCL alike): long enough for rank 0's validation and checkpoint writes at the end of an epoch, which the
# other ranks wait for, short enough that a job with a hung or vanished peer fails within the hour.
DIST_TIMEOUT = timedelta(minutes=30)


def autocast_dtype(precision: str, device: torch.device, say: Any = print) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None = fp32). CPU always runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        say("train: this GPU has no bf16; running fp32 (set train.precision=fp16 for mixed precision)")
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA, reset after reading) or peak resident memory of the process (CPU), MiB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class DistEnv:
    """This process's place in a ``torchrun`` job (world size 1 without one)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device_choice: str) -> DistEnv:
        """This process's place and device (``device_choice``: the ``device`` param, auto | cpu | cuda)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_choice, local_rank)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        if world_size > 1:
            if not cuda:  # processes share the cores instead of each taking all of them
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                          world_size))))
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
            return cls(dist.get_rank(), world_size, device)
        return cls(0, 1, device)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all processes."""
        if self.world_size == 1:
            return tuple(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Average gradients over processes for parameters DDP does not manage (the fine-tuned VAE)."""
        if self.world_size == 1:
            return
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def close(self) -> None:
        """Destroy the process group. Drop the DDP model first (:func:`train` does): the group must outlive it.

        Whatever drops the last reference to a gloo group joins its worker threads, and a worker may still
        be freeing the tensors of the last collective, which needs the GIL. The group's Python object joins
        with the GIL released; DDP's C++ reducer, also holding the group, joins while holding it, so when it
        went last the process deadlocked on exit (the job's last epoch done, one rank never exiting: 10 runs
        in 20 of the 2-process CPU test). DDP can sit in a reference cycle, hence the collection here: it
        frees a dropped model while the group is still registered, so the reducer's reference is never the
        last one.
        """
        if self.world_size > 1 and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
