"""The trainer's few collective operations: process-group setup under ``torchrun`` and joint decisions.

Every decision that changes what a process does next (skip a batch, skip a step, stop because the output folder is
taken) is taken jointly with :func:`any_rank`, so the processes never disagree and none waits for ever.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["active", "setup_distributed", "any_rank", "all_gather", "barrier"]


def active() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Initialise ``torch.distributed`` under torchrun (NCCL on GPUs, gloo on CPU); ``(rank, world, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device_name!r} requested but CUDA is not available on this machine")
    if use_cuda:
        index = int(device_name.split(":")[1]) if ":" in device_name else local_rank
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not active():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any process (every process gets the same answer)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order, on every process (``[obj]`` outside a process group)."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if active():
        dist.barrier()
