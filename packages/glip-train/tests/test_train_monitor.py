"""The stability monitor: its parts of a model, and its measurements against hand-computed values."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from glip_fusion.fusion_block import BiMultiHeadAttention
from glip_train.training.monitor import StabilityMonitor, model_parts


class Toy(nn.Module):
    """The layout of a GLIP model in miniature: two levels of modules, a container of blocks, own parameters."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Linear(2, 2)
        self.backbone.fpn = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        self.head = nn.Module()
        self.head.tower = nn.ModuleList([nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))])
        self.head.bias0 = nn.Parameter(torch.zeros(1))
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def test_parameters_are_grouped_two_levels_down_and_per_block_of_a_container():
    groups = model_parts(Toy())
    assert {g: [n for n, _ in ps] for g, ps in groups.items()} == {
        "backbone.body": ["backbone.body.weight", "backbone.body.bias"],
        "backbone.fpn.0": ["backbone.fpn.0.weight", "backbone.fpn.0.bias"],
        "backbone.fpn.1": ["backbone.fpn.1.weight", "backbone.fpn.1.bias"],
        "head.tower.0": ["head.tower.0.weight", "head.tower.0.bias"],
        "head.tower.1": ["head.tower.1.0.weight", "head.tower.1.0.bias"],
        "head": ["head.bias0"],
    }  # the frozen module is left out


def attention_with_identity_projections() -> BiMultiHeadAttention:
    attn = BiMultiHeadAttention(v_dim=4, l_dim=4, embed_dim=4, num_heads=2, dropout=0.0)
    with torch.no_grad():
        for lin in (attn.v_proj, attn.l_proj, attn.values_v_proj, attn.values_l_proj, attn.out_v_proj,
                    attn.out_l_proj):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    return attn


def monitored_attention(every: int):
    """A model holding one X-MHA (identity projections) as ``fusion``, a stand-in trainer that keeps what is logged,
    and a monitor registered with it, as ``Trainer`` registers hooks."""
    model = nn.Module()
    model.fusion = attention_with_identity_projections()
    trainer = SimpleNamespace(model=model, step=0, logged=[])
    trainer.log = trainer.logged.append
    monitor = StabilityMonitor(every=every)
    monitor.trainer = trainer
    monitor.before_train()
    return model, trainer, monitor


def test_xmha_logits_gradients_and_updates_match_hand_computed_values():
    model, trainer, monitor = monitored_attention(every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    # two image and two real text tokens; head 0 reads channels 0-1, head 1 channels 2-3; the third token is padding
    v = torch.tensor([[[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 1.0]]])
    l = torch.tensor([[[3.0, 0.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0], [100.0, 0.0, -100.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    monitor.before_step()
    dv, dl = model.fusion(v, l, text_mask=mask)
    (dv.sum() + dl[mask].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    trainer.step = 1
    monitor.after_step()
    monitor.close()

    (record,) = trainer.logged
    assert record["step"] == 1 and record["event"] == "stability"
    # q.k / sqrt(2): head 0 [[3, 0], [0, 2]], head 1 [[0, 2], [1, 0]] -> range [0, 3 / sqrt(2)]; the padded token
    # (100 / sqrt(2) in head 0, -200 / sqrt(2) in head 1) is not counted
    low, high = record["xmha_logits"]["fusion"]
    assert low == pytest.approx(0.0, abs=1e-6) and high == pytest.approx(3 / math.sqrt(2), rel=1e-6)
    group = record["groups"]["fusion.v_proj"]
    names = ["fusion.v_proj.weight", "fusion.v_proj.bias"]
    grad_norm = math.sqrt(sum(float(grads[n].double().pow(2).sum()) for n in names))
    assert group["grad_norm"] == pytest.approx(grad_norm, rel=1e-9) and grad_norm > 0
    assert group["update_norm"] == pytest.approx(0.1 * grad_norm, rel=1e-5)  # SGD: the update is lr x gradient
    weight_norm = math.sqrt(sum(float(p.detach().double().pow(2).sum())
                                for n, p in model.named_parameters() if n in names))
    assert group["weight_norm"] == pytest.approx(weight_norm, rel=1e-9)


def test_only_every_nth_step_and_the_first_are_recorded_and_hooks_are_removed():
    model, trainer, monitor = monitored_attention(every=3)
    v, l = torch.randn(1, 5, 4), torch.randn(1, 3, 4)
    for _ in range(7):
        monitor.before_step()
        model.fusion(v, l)
        trainer.step += 1
        monitor.after_step()
    assert [r["step"] for r in trainer.logged] == [1, 3, 6]
    assert all(set(r["xmha_logits"]) == {"fusion"} for r in trainer.logged)
    monitor.close()
    assert not model.fusion._forward_hooks and not model.fusion._forward_pre_hooks
    assert not model.fusion.v_proj._forward_hooks


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every must be >= 1"):
        StabilityMonitor(every=0)
