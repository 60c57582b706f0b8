"""The model shipped with glip-train: what ``glip detect`` / ``glip ground`` / ``GLIP.from_pretrained()`` use when no
weights are given.

It is a small GLIP trained on glip-data's synthetic grounding world (coloured shapes), so it detects that world's
shapes and colours only; for real photographs use an official checkpoint (``--weights``). How it was trained, its
metrics and the command to reproduce it are in ``assets/default_model/README.md`` of this package.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODEL_DIR", "SHIPPED_NAME", "default_model_dir", "shipped_model_dir"]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
#: the weights name that means the shipped model (``--weights default``, ``glip train --init default``,
#: ``GLIP.from_pretrained("default")``); a folder called so is ``./default``
SHIPPED_NAME = "default"


def default_model_dir() -> Path | None:
    """The shipped model's directory, or None when this installation has none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "model.safetensors").is_file() else None


def shipped_model_dir() -> Path:
    """The shipped model's directory.

    Raises:
        FileNotFoundError: this installation has none (the message says what to pass instead).
    """
    found = default_model_dir()
    if found is None:
        raise FileNotFoundError("this installation of glip-train has no shipped model: pass the path of a checkpoint "
                                "or of a directory written by save_pretrained")
    return found
