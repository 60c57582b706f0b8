"""Training checkpoints: finding the last one, and refusing a resume with another config.

Every file is written atomically (:mod:`glip_data.io`: a temporary name in the same folder, flushed and renamed), so
a process killed mid-write leaves the previous checkpoint intact and never a truncated one. A checkpoint holds the model, the optimizer, the scheduler, the gradient scaler, the EMA
weights, the step, the random-number states and the resolved config (also written beside it as ``config.yaml``).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "restore_rng_state",
    "config_differences",
    "ResumeError",
]

_NAME = re.compile(r"^checkpoint_(\d{8})\.pt$")
#: keys (and everything below them) that may change between a run and its resume: they do not change the trained
#: weights
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "keep_checkpoints", "data.num_workers", "eval_every",
                     "nan_patience", "device", "data.val")


class ResumeError(RuntimeError):
    """A checkpoint that cannot resume this run (another config, a damaged file); the message says why."""


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"checkpoint_{step:08d}.pt"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for _, path in list_checkpoints(output_dir)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Every random-number state a training step can touch (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two config dicts, except :data:`RESUMABLE_CHANGES`."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == r or key.startswith(r + ".") for r in RESUMABLE_CHANGES):
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            diffs.append(f"{key}: checkpoint {a.get(key, '<missing>')!r} vs now {b.get(key, '<missing>')!r}")
    return diffs
