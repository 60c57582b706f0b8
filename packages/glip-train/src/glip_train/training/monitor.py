"""What a diverging run looks like from inside: per-module gradient and update norms, the fusion's attention logits
before the clamp, the layer scales, the token-logit bias and the text tower's activations.

:class:`StabilityMonitor` is a trainer hook (``Trainer(config, hooks=[StabilityMonitor(every=25)])``). Every
``every`` steps it logs one record with ``"event": "stability"`` to the run's ``metrics.jsonl`` (rank 0 writes it;
gradients are all-reduced, so every rank measures the same). It only reads: a monitored run trains bit for bit as an
unmonitored one. ``benchmarks/zero_shot/instability.py`` uses it to find which part of a fused model drifts first when
the learning rate is too high (docs/training.md, "Learning-rate instability").
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .hooks import HookBase

__all__ = ["StabilityMonitor", "model_parts"]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def model_parts(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable parameters of ``model`` by part: the module two levels down (``backbone.body``,
    ``backbone.fpn``, ``language_backbone.model``); where that module is a container (``nn.ModuleList``,
    ``nn.Sequential``, ``nn.ModuleDict``), each of its blocks (``head.dyhead_tower.3``: one fusion block); and the
    parameters a module holds itself, under its name (``head``: ``bias0``, ``bias_lang``, ``log_scale``).

    Returns ``{group: [(parameter name, parameter), ...]}`` in the model's parameter order.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")[:-1]
        prefix: list[str] = []
        module = model
        for part in parts:
            module = getattr(module, part)
            prefix.append(part)
            if len(prefix) == 3 or (len(prefix) == 2 and not isinstance(module, _CONTAINERS)):
                break
        groups.setdefault(".".join(prefix) or name, []).append((name, param))
    return groups


def _norm(tensors) -> float:
    total = 0.0
    for t in tensors:
        total += float(t.detach().double().pow(2).sum())
    return math.sqrt(total)


class _AttentionProbe:
    """Forward hooks on one X-MHA module: the range of its attention logits ``S = q k^T`` over real text tokens,
    computed from the projections the module made (before the clamp), while ``active``."""

    def __init__(self, attn: nn.Module):
        self.attn, self.active = attn, False
        self.q = self.k = self.text_mask = None
        self.low, self.high = math.inf, -math.inf
        self.handles = [
            attn.register_forward_pre_hook(self._inputs, with_kwargs=True),
            attn.v_proj.register_forward_hook(self._query),
            attn.l_proj.register_forward_hook(self._key),
            attn.register_forward_hook(self._done),
        ]

    def reset(self) -> None:
        self.low, self.high = math.inf, -math.inf

    def _inputs(self, module, args, kwargs):
        if self.active:
            mask = kwargs.get("text_mask", args[2] if len(args) > 2 else None)
            self.text_mask = None if mask is None else mask.detach().bool()

    def _query(self, module, args, output):
        if self.active:
            self.q = output.detach() * self.attn.scale

    def _key(self, module, args, output):
        if self.active:
            self.k = output.detach()

    def _done(self, module, args, output):
        if not self.active or self.q is None or self.k is None:
            return
        heads = self.attn.num_heads
        q = self.q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, d)
        k = self.k.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, M, d)
        logits = q @ k.transpose(-1, -2)  # (B, H, N, M)
        if self.text_mask is not None:
            real = self.text_mask[:, None, None, :].expand_as(logits)
            logits = logits[real]
        if logits.numel():
            self.low = min(self.low, float(logits.min()))
            self.high = max(self.high, float(logits.max()))
        self.q = self.k = self.text_mask = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class StabilityMonitor(HookBase):
    """Logs, every ``every`` optimizer steps, what drifts when training becomes unstable.

    The record (``"event": "stability"``, and ``"step"``) holds, per part of the model
    (:func:`model_parts`): ``grad_norm`` (L2 norm of the gradients the step applied, after unscaling and
    clipping), ``update_norm`` (L2 norm of the change the step made to the weights), ``update_ratio``
    (``update_norm / weight norm``) and ``weight_norm``; and, where the model has them: ``xmha_logits`` (min and max of
    each fusion block's attention logits over real text tokens, before the clamp), ``layer_scale`` (mean |gamma| of
    each fusion block's image and text residual scales), ``token_bias`` (the head's ``bias0``, ``|bias_lang|`` and
    ``exp(log_scale)``), ``text_activations`` (max |x| and RMS of the text tower's last layer over real tokens).

    Args:
        every: log every ``every`` steps (and at the first step).
    """

    def __init__(self, every: int = 25):
        if every < 1:
            raise ValueError(f"StabilityMonitor: every must be >= 1, got {every}")
        self.every = int(every)
        self.probes: list[tuple[str, _AttentionProbe]] = []
        self.before: dict[str, list[torch.Tensor]] = {}
        self.text_stats: dict[str, float] | None = None
        self.text_handle = None
        self.groups: dict[str, list[tuple[str, nn.Parameter]]] = {}

    def _records(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    def before_train(self) -> None:
        from glip_fusion.fusion_block import BiMultiHeadAttention

        model = self.trainer.model
        self.groups = model_parts(model)
        self.probes = [(name, _AttentionProbe(m)) for name, m in model.named_modules()
                       if isinstance(m, BiMultiHeadAttention)]
        language = getattr(model, "language_backbone", None)
        if language is not None:
            self.text_handle = language.register_forward_hook(self._text_output)

    def _text_output(self, module, args, output) -> None:
        if not self._active:
            return
        hidden, mask = output.hidden.detach(), output.masks.bool()
        real = hidden[mask]  # (tokens, C)
        if real.numel():
            stats = {"max_abs": float(real.abs().max()), "rms": float(real.pow(2).mean().sqrt())}
            if self.text_stats is not None:  # several micro-batches: the largest
                stats = {k: max(v, self.text_stats[k]) for k, v in stats.items()}
            self.text_stats = stats

    @property
    def _active(self) -> bool:
        return bool(self.before)

    def before_step(self) -> None:
        if not self._records(self.trainer.step + 1):
            return
        self.before = {group: [p.detach().clone() for _, p in params] for group, params in self.groups.items()}
        self.text_stats = None
        for _, probe in self.probes:
            probe.reset()
            probe.active = True

    def after_step(self) -> None:
        if not self.before:
            return
        trainer, model = self.trainer, self.trainer.model
        record: dict[str, Any] = {"step": trainer.step, "event": "stability", "groups": {}}
        for group, params in self.groups.items():
            previous = self.before[group]
            weights = _norm(p for _, p in params)
            update = _norm(p.detach() - old for (_, p), old in zip(params, previous))
            grads = [p.grad for _, p in params if p.grad is not None]
            record["groups"][group] = {"grad_norm": _norm(grads) if grads else 0.0, "update_norm": update,
                                       "weight_norm": weights, "update_ratio": update / max(weights, 1e-12)}
        if self.probes:
            record["xmha_logits"] = {name: [probe.low, probe.high] for name, probe in self.probes
                                     if probe.high > -math.inf}
        scales = {name: [float(m.gamma_v.detach().abs().mean()), float(m.gamma_l.detach().abs().mean())]
                  for name, m in model.named_modules() if hasattr(m, "gamma_v") and hasattr(m, "gamma_l")}
        if scales:
            record["layer_scale"] = scales
        head = getattr(model, "head", None)
        if head is not None and hasattr(head, "bias0"):
            record["token_bias"] = {"bias0": float(head.bias0.detach()), "bias_lang_norm": _norm([head.bias_lang]),
                                    "inv_temperature": float(head.log_scale.detach().exp())}
        if self.text_stats is not None:
            record["text_activations"] = self.text_stats
        self.before = {}
        for _, probe in self.probes:
            probe.active = False
        trainer.log(record)

    def close(self) -> None:
        for _, probe in self.probes:
            probe.remove()
        self.probes = []
        if self.text_handle is not None:
            self.text_handle.remove()
            self.text_handle = None
