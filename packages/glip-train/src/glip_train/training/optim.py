"""The official optimizer parameter groups and learning-rate schedules (``docs/official_model.md#training-recipe``)."""
from __future__ import annotations

import fnmatch
import math
from bisect import bisect_right
from typing import Any

import torch
from torch import nn

from .config import OptimConfig, ScheduleConfig

__all__ = ["parameter_groups", "build_optimizer", "LRSchedule", "build_scheduler"]

PROMPT_PARAMETER = "prompt_tuning.weight"


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """One group per trainable parameter with its LR and weight decay, by the official substring rules.

    ``language_backbone`` in the name -> ``language_lr``; then ``bias`` in the name -> LR x ``bias_lr_factor`` and
    ``weight_decay_bias`` (the substring also matches ``bias_lang``, ``bias0`` and Swin's
    ``relative_position_bias_table``, exactly as the official code does); the prompt-tuning table gets
    ``prompt_lr`` / ``prompt_weight_decay``; last, each ``lr_factors`` key that names the parameter (a substring of the
    name, or a glob over the whole name when it has ``*`` or ``?``) multiplies the LR.
    Each group records its parameter's ``name``.
    """
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, decay = config.lr, config.weight_decay
        if "language_backbone" in name:
            lr = config.language_lr
        if "bias" in name:
            lr *= config.bias_lr_factor
            decay = config.weight_decay_bias
        if name.endswith(PROMPT_PARAMETER):
            lr, decay = config.prompt_lr, config.prompt_weight_decay
        for key, factor in config.lr_factors.items():
            if _names(key, name):
                lr *= factor
        groups.append({"params": [param], "lr": lr, "weight_decay": decay, "name": name})
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    return groups


def _names(key: str, name: str) -> bool:
    """Whether an ``lr_factors`` key names a parameter: a key with ``*`` or ``?`` is a glob over the whole name
    (``fnmatch``), any other key a substring (as the official rules read names)."""
    if "*" in key or "?" in key:
        return fnmatch.fnmatchcase(name, key)
    return key in name


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`."""
    return torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, betas=tuple(config.betas), eps=config.eps)


class LRSchedule:
    """The LR factor at an optimizer step (a picklable ``LambdaLR`` function).

    Linear warm-up ``warmup_factor (1 - a) + a`` with ``a = step / warmup_iters``; then "multistep":
    ``gamma ** (number of milestones <= step)`` (applied during warm-up too, as the official scheduler does),
    "cosine": ``m + (1 - m)(1 + cos(pi (step - warmup) / max_iter)) / 2`` with ``m = min_lr_factor`` (the official
    formula divides by max_iter, not by the post-warm-up length), "constant": 1.
    """

    def __init__(self, config: ScheduleConfig):
        self.kind = config.kind
        self.warmup_iters = config.warmup()
        self.warmup_factor = config.warmup_factor
        self.milestones = config.milestones()
        self.gamma = config.gamma
        self.max_iter = config.max_iter
        self.min_lr_factor = config.min_lr_factor

    def __call__(self, step: int) -> float:
        warmup = 1.0
        if step < self.warmup_iters:
            alpha = step / self.warmup_iters
            warmup = self.warmup_factor * (1 - alpha) + alpha
        if self.kind == "multistep":
            return warmup * self.gamma ** bisect_right(self.milestones, step)
        if self.kind == "cosine":
            if step < self.warmup_iters:
                return warmup
            m = self.min_lr_factor
            return m + (1 - m) * (1 + math.cos(math.pi * (step - self.warmup_iters) / self.max_iter)) / 2
        return warmup


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(config))
