"""Small trained add-ons of a frozen GLIP: prompt tuning and linear probing, saved as small files.

* **Prompt tuning** (the official ``language_prompt_v2``): a zero-initialised table ``(positions, text width)`` whose
  first M rows are added to the text encoder's outputs — both the features entering the fusion tower and the ones the
  word-region logits read — before the tower. Everything else stays frozen.
* **Linear probing**: only the official predictor set trains — box regression, centerness, the text projection of
  the word-region alignment and its temperature and biases (``bbox_pred``, ``centerness``,
  ``dot_product_projection_text``, ``log_scale``, ``bias_lang``, ``bias0``).

:func:`save_adapter` writes what was trained (a few kB to a few MB of safetensors) with a fingerprint of the base
weights; :func:`load_adapter` (also ``GLIP.from_pretrained(base, adapter=FILE)`` and ``glip detect --adapter FILE``)
applies it to a base model and refuses one trained on other base weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["PromptTuning", "ADAPTER_KINDS", "LINEAR_PROBE_PARAMETERS", "linear_probe_parameters",
           "save_adapter", "load_adapter", "AdapterError", "base_fingerprint"]

ADAPTER_KINDS = ("prompt_tuning", "linear_probe")
#: name fragments of the head parameters a linear probe trains (the official set)
LINEAR_PROBE_PARAMETERS = ("bbox_pred", "centerness", "dot_product_projection_text", "log_scale", "bias_lang",
                           "bias0")


class AdapterError(ValueError):
    """An adapter file that cannot be applied to this model; the message names the file and the reason."""


class PromptTuning(nn.Module):
    """Per-position offsets added to the text features (``weight (positions, D)``, zero-initialised)."""

    def __init__(self, positions: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(positions, dim))

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden``, ``embedded`` ``(B, M, D)`` -> both plus the first M rows of the table."""
        length = hidden.shape[1]
        if length > self.weight.shape[0]:
            raise ValueError(f"text of {length} tokens is longer than the prompt-tuning table "
                             f"({self.weight.shape[0]} positions)")
        offsets = self.weight[:length].to(hidden.dtype)
        return hidden + offsets, embedded + offsets


def linear_probe_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters a linear probe trains (head predictors; ``cls_logits`` stays frozen)."""
    return [name for name, _ in model.named_parameters()
            if name.startswith("head.") and ".dyhead_tower." not in name
            and any(part in name for part in LINEAR_PROBE_PARAMETERS)]


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the weights no adapter changes (image and text encoders): for every tensor, its name, its
    sum and its first 64 values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(("backbone.", "language_backbone.")) or not tensor.is_floating_point():
            continue
        values = tensor.detach().reshape(-1).double().cpu()
        digest.update(name.encode())
        digest.update(values[:64].numpy().tobytes())
        digest.update(repr(round(float(values.sum()), 6)).encode())
    return digest.hexdigest()[:16]


def save_adapter(model: nn.Module, path: str | os.PathLike, kind: str, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained part of ``model`` (``kind``: "prompt_tuning" or "linear_probe") to a safetensors file."""
    from safetensors.torch import save

    from glip_data.io import atomic_write_bytes

    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}; got {kind!r}")
    if kind == "prompt_tuning":
        if getattr(model, "prompt_tuning", None) is None:
            raise ValueError("the model has no prompt-tuning table (model.enable_prompt_tuning())")
        tensors = {"prompt_tuning.weight": model.prompt_tuning.weight}
    else:
        params = dict(model.named_parameters())
        tensors = {name: params[name] for name in linear_probe_parameters(model)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"glip_adapter": kind, "base": getattr(getattr(model, "config", None), "name", ""),
                "base_fingerprint": base_fingerprint(model), "extra": json.dumps(extra or {})}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> dict[str, Any]:
    """Apply an adapter file to ``model`` in place; returns its metadata.

    Raises:
        AdapterError: the file is missing or not an adapter, its tensors do not fit the model, or (``check_base``)
            it was trained on other base weights.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterError(f"{path}: not a readable safetensors adapter ({exc})") from None
    kind = metadata.get("glip_adapter")
    if kind not in ADAPTER_KINDS:
        raise AdapterError(f"{path}: not a glip adapter (metadata glip_adapter={kind!r})")
    if check_base and metadata.get("base_fingerprint") not in (None, "", base_fingerprint(model)):
        raise AdapterError(f"{path}: trained on other base weights (fingerprint {metadata.get('base_fingerprint')} "
                           f"vs this model's {base_fingerprint(model)}); load the base model it was trained from")
    if kind == "prompt_tuning":
        weight = tensors.get("prompt_tuning.weight")
        if weight is None or weight.ndim != 2 or weight.shape[1] != model.config.text_dim:
            raise AdapterError(f"{path}: the prompt table {None if weight is None else tuple(weight.shape)} does not "
                               f"fit a text width of {model.config.text_dim}")
        model.enable_prompt_tuning(weight.shape[0])
        with torch.no_grad():
            model.prompt_tuning.weight.copy_(weight.to(model.prompt_tuning.weight))
    else:
        params = dict(model.named_parameters())
        expected = set(linear_probe_parameters(model))
        if set(tensors) != expected:
            raise AdapterError(f"{path}: linear-probe tensors {sorted(tensors)} differ from the model's "
                               f"{sorted(expected)}")
        bad = [k for k, v in tensors.items() if v.shape != params[k].shape]
        if bad:
            raise AdapterError(f"{path}: shapes differ from the model's for {bad}")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name]))
    return {**metadata, "kind": kind}
