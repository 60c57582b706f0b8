"""Distributed evaluation under ``torchrun``: each rank predicts a shard of the images, rank 0 gathers and scores.

The shard of rank ``r`` out of ``W`` is every ``W``-th image starting at ``r`` (``r::W``); predictions are keyed by
the image's position in the dataset and put back in dataset order on rank 0, so the scored detections are exactly
those of a single process. (With ``batch_size=1``, the official setting, each image's outputs do not depend on the
sharding at all; larger batches group different images together, and GLIP's outputs depend on batch padding.)
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["DistInfo", "dist_info", "shard_indices", "gather_to_main", "init_distributed_from_env", "barrier"]


class DistInfo(tuple):
    """``(rank, world_size)``."""

    @property
    def rank(self) -> int:
        return self[0]

    @property
    def world_size(self) -> int:
        return self[1]

    @property
    def is_main(self) -> bool:
        return self[0] == 0


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def dist_info() -> DistInfo:
    """This process's rank and the world size (``(0, 1)`` when ``torch.distributed`` is not initialised); the one
    reading is glip-data's, which its shard streams use too."""
    from glip_data.shards import dist_info as rank_and_world

    return DistInfo(rank_and_world())


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Positions ``rank, rank + world_size, ...`` below ``n``: this rank's share of ``n`` items."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return list(range(rank, n, world_size))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), ``None`` on the others; ``[obj]`` without a process group.

    Uses ``torch.distributed.all_gather_object`` (with NCCL, each rank's current CUDA device must be set).
    """
    if not _initialized():
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered if dist.get_rank() == 0 else None


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def init_distributed_from_env(backend: str | None = None) -> bool:
    """Initialise the process group from ``torchrun``'s environment (``WORLD_SIZE`` > 1) if not done yet.

    Args:
        backend: default ``"nccl"`` when CUDA is available, else ``"gloo"``.

    Returns:
        True when a process group is (now) initialised.
    """
    import torch
    import torch.distributed as dist

    if _initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True
