"""Training checkpoints: finding the last one, reading it for a resume (refusing one of another config), and the
leftovers of killed writes.

Every file is written atomically (:mod:`glip_data.io`: a temporary name in the same folder, flushed and renamed), so
a process killed mid-write leaves the previous checkpoint intact and never a truncated one; the temporaries such a
kill leaves are removed when the next run takes the folder's lock. A checkpoint holds the model, the optimizer, the
scheduler, the gradient scaler, the EMA weights, the step, the data position, the random-number states of every
process, the run's counters and skip reports, the state of the hooks that have one and the resolved config (also
written beside it as ``config.yaml``).
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
    "read_resume_state",
    "clean_legacy_temporaries",
    "ResumeError",
]

_NAME = re.compile(r"^checkpoint_(\d{8})\.pt$")
#: temporaries of the files a run writes, as earlier versions named them (``tempfile.mkstemp(prefix=".NAME.",
#: suffix=".tmp")``); today's end in ``glip_data.io.TEMP_SUFFIX``
_LEGACY_TEMPORARY = re.compile(
    r"^\.(checkpoint_\d{8}\.pt|config\.yaml|result\.json|adapter\.safetensors|model\.safetensors)\.[a-z0-9_]{8}\.tmp$")
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


def read_resume_state(output_dir: str | os.PathLike, config: dict[str, Any],
                      world_size: int) -> tuple[Path, dict[str, Any]] | None:
    """``(path, state)`` of the newest checkpoint of a run, or None for a new run.

    Raises:
        ResumeError: the checkpoint cannot be read, was written with another config (the differing keys are
            listed; :data:`RESUMABLE_CHANGES` may differ) or by another number of processes.
    """
    path = latest_checkpoint(output_dir)
    if path is None:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file
        raise ResumeError(f"{path}: cannot be read ({exc}); delete it to resume from the previous checkpoint") \
            from None
    diffs = config_differences(state.get("config", {}), config)
    if diffs:
        raise ResumeError(f"{path} was written by a run with another config; it cannot be resumed. Differences:\n  "
                          + "\n  ".join(diffs) + "\nUse another output_dir for a new run.")
    if state.get("world_size", 1) != world_size:
        raise ResumeError(f"{path} was written by {state['world_size']} process(es), this run has "
                          f"{world_size}: the data order would change")
    return path, state


def clean_legacy_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writes of earlier versions left in a run folder (``.NAME.XXXXXXXX.tmp``
    beside a checkpoint, ``config.yaml``, ``result.json``, an adapter or the final weights); returns them.

    Call it only while holding the folder's ``glip_data.io.RunLock``, as ``clean_temporaries``.
    """
    folder = Path(output_dir)
    removed = []
    for sub in (folder, folder / "checkpoints", folder / "model", folder / "model_ema"):
        if not sub.is_dir():
            continue
        for path in sorted(sub.iterdir()):
            if _LEGACY_TEMPORARY.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
