"""Deterministic official-layout weights from a weights recipe (the parity fixture's ``weights_recipe.json``).

The recipe lists every key of an official GLIP state dict with a rule; each floating tensor is

    value = mean + std * torch.randn(shape, generator=torch.Generator().manual_seed(crc32(name)), dtype=float32)

Structural tensors (Swin ``relative_position_index``, anchor templates) keep the model's own values: we compute them
here from their definitions so that the weights can be built without any model. Every generated tensor is checked
against the sha256 recorded in the recipe.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

__all__ = ["load_recipe", "build_recipe_state_dict", "relative_position_index", "tensor_sha256"]


def load_recipe(path: str | Path) -> dict:
    """Read a ``weights_recipe.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights recipe not found: {path}")
    recipe = json.loads(path.read_text())
    if "keys" not in recipe:
        raise ValueError(f"{path}: not a weights recipe (no 'keys' entry)")
    return recipe


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's little-endian, C-order bytes (the recipe's ``sha256_le_bytes``)."""
    array = tensor.detach().cpu().contiguous().numpy()
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return hashlib.sha256(array.tobytes()).hexdigest()


def relative_position_index(window_size: int) -> torch.Tensor:
    """Swin's ``(w*w, w*w)`` int64 index into the ``(2w-1)**2`` relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, w*w)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # (w*w, w*w, 2)
    return (rel[..., 0] * (2 * window_size - 1) + rel[..., 1]).to(torch.int64)


def _structural_value(name: str, entry: Mapping) -> torch.Tensor:
    shape = tuple(entry["shape"])
    if name.endswith("relative_position_index"):
        window = int(round(shape[0] ** 0.5))
        return relative_position_index(window)
    if entry.get("values") is not None:
        return torch.tensor(entry["values"], dtype=getattr(torch, entry["dtype"].replace("torch.", ""))).reshape(shape)
    raise KeyError(f"recipe key {name!r} is structural but has no values and no known definition")


def build_recipe_state_dict(
    recipe: Mapping | str | Path,
    keys: Iterable[str] | None = None,
    *,
    prefix: str | None = None,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """Build the official-layout tensors a recipe describes.

    Args:
        recipe: the parsed recipe or the path of ``weights_recipe.json``.
        keys: only these keys (default: all).
        prefix: only keys starting with this prefix (e.g. ``"backbone."``).
        verify: check every tensor against the recipe's sha256 (raises ``ValueError`` on a mismatch).

    Returns:
        ``{official_key: tensor}`` (no ``module.`` prefix), in recipe order.
    """
    if not isinstance(recipe, Mapping):
        recipe = load_recipe(recipe)
    entries: Mapping[str, Mapping] = recipe["keys"]
    wanted = list(entries) if keys is None else list(keys)
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        if prefix is not None and not name.startswith(prefix):
            continue
        if name not in entries:
            raise KeyError(f"key {name!r} is not in the weights recipe")
        entry = entries[name]
        if entry["rule"] == "structural":
            value = _structural_value(name, entry)
        else:
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
            noise = torch.randn(tuple(entry["shape"]), generator=gen, dtype=torch.float32)
            value = torch.tensor(entry["mean"], dtype=torch.float32) + torch.tensor(entry["std"], dtype=torch.float32) * noise
        if verify and entry.get("sha256_le_bytes") and tensor_sha256(value) != entry["sha256_le_bytes"]:
            raise ValueError(f"recipe tensor {name!r} does not reproduce its recorded sha256")
        out[name] = value
    return out

