"""FPN + P6/P7 against a hand-written composition of the official formulas (docs/official_model.md#image-encoder), and DropBlock."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from glip_encoders.fpn import FPN, DropBlock2d
from torch import nn


def nearest_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize by its definition: output (i, j) reads input (floor(i*H/h), floor(j*W/w))."""
    H, W = x.shape[-2:]
    rows = (torch.arange(size[0]) * H) // size[0]
    cols = (torch.arange(size[1]) * W) // size[1]
    return x[..., rows[:, None], cols[None, :]]


def randomize(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def features(channels=(8, 12, 16), sizes=((9, 13), (5, 7), (3, 4)), batch=2):
    return [torch.randn(batch, c, *s) for c, s in zip(channels, sizes)]


def hand_fpn(fpn: FPN, c3, c4, c5, drop=lambda t: t):
    conv = lambda name, x, **kw: F.conv2d(x, getattr(fpn, name).weight, getattr(fpn, name).bias, **kw)
    t5 = conv("fpn_inner4", c5)
    p5 = conv("fpn_layer4", t5, padding=1)
    t4 = conv("fpn_inner3", c4) + nearest_to(t5, c4.shape[-2:])
    p4 = conv("fpn_layer3", drop(t4), padding=1)
    t3 = conv("fpn_inner2", c3) + nearest_to(t4, c3.shape[-2:])
    p3 = conv("fpn_layer2", drop(t3), padding=1)
    top = fpn.top_blocks
    src = p5 if top.p6.in_channels == fpn.out_channels else c5
    p6 = F.conv2d(src, top.p6.weight, top.p6.bias, stride=2, padding=1)
    p7 = F.conv2d(p6.clamp(min=0), top.p7.weight, top.p7.bias, stride=2, padding=1)
    return [p3, p4, p5, p6, p7]


def test_fpn_equals_hand_composition_odd_sizes():
    torch.manual_seed(0)
    fpn = FPN([8, 12, 16], out_channels=6).eval()
    randomize(fpn)
    c3, c4, c5 = features()
    with torch.no_grad():
        ours = fpn([c3, c4, c5])
        ref = hand_fpn(fpn, c3, c4, c5)
    assert [tuple(p.shape[-2:]) for p in ours] == [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


def test_official_names_and_p6_source():
    fpn = FPN([8, 12, 16], out_channels=6)
    names = {k for k in fpn.state_dict()}
    assert names == {f"{m}.{p}" for m in ["fpn_inner2", "fpn_inner3", "fpn_inner4", "fpn_layer2", "fpn_layer3",
                                          "fpn_layer4", "top_blocks.p6", "top_blocks.p7"] for p in ("weight", "bias")}
    assert fpn.top_blocks.use_p5 and fpn.top_blocks.p6.in_channels == 6  # GLIP: P6 from P5
    assert fpn.fpn_inner2.kernel_size == (1, 1) and fpn.fpn_layer2.kernel_size == (3, 3)

    torch.manual_seed(0)
    from_c5 = FPN([8, 12, 16], out_channels=6, p6p7_in_channels=16).eval()  # RetinaNet style: P6 from C5
    randomize(from_c5, seed=1)
    assert not from_c5.top_blocks.use_p5
    c3, c4, c5 = features()
    with torch.no_grad():
        for o, r in zip(from_c5([c3, c4, c5]), hand_fpn(from_c5, c3, c4, c5)):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def test_drop_block_only_on_layer_inputs_in_training():
    """The block sits before fpn_layer3/fpn_layer2 only; the top-down sums passed on stay undropped."""
    torch.manual_seed(0)
    fpn = FPN([8, 12, 16], out_channels=6)
    randomize(fpn)
    fpn.drop_block = Doubler()
    c3, c4, c5 = features()
    fpn.train()
    with torch.no_grad():
        ours = fpn([c3, c4, c5])
        ref = hand_fpn(fpn, c3, c4, c5, drop=lambda t: 2 * t)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_drop_block_default_on_and_inactive_in_eval():
    fpn = FPN([8, 12, 16], out_channels=6)
    assert isinstance(fpn.drop_block, DropBlock2d)
    assert (fpn.drop_block.drop_prob, fpn.drop_block.block_size) == (0.3, 3)
    assert FPN([8, 12, 16], drop_block=False).drop_block is None
    torch.manual_seed(0)
    c3, c4, c5 = features()
    fpn.eval()
    with torch.no_grad():
        a = fpn([c3, c4, c5])
        fpn.train()
        b = fpn([c3, c4, c5])
    torch.testing.assert_close(a[2], b[2])  # P5 (and P6/P7) never see the block
    torch.testing.assert_close(a[4], b[4])
    assert not torch.allclose(a[0], b[0])  # P3 does in training


def test_drop_block_mask_is_dilated_seeds():
    block = DropBlock2d(0.3, 3)
    seeds = torch.zeros(1, 5, 6)
    seeds[0, 0, 0] = 1
    seeds[0, 3, 4] = 1
    mask = block.block_mask(seeds)
    expected = torch.ones(1, 5, 6)
    for y, x in [(0, 0), (3, 4)]:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if 0 <= y + dy < 5 and 0 <= x + dx < 6:
                    expected[0, y + dy, x + dx] = 0
    assert torch.equal(mask, expected)


def test_drop_block_training_output_structure():
    torch.manual_seed(0)
    block = DropBlock2d(0.3, 3).train()
    x = torch.randn(4, 5, 20, 20)
    out = block(x)
    dropped = out.abs().sum(1) == 0  # (B, H, W): the same positions in every channel
    assert dropped.any() and (~dropped).any()
    keep = (~dropped).float()
    scale = keep.numel() / keep.sum()
    torch.testing.assert_close(out, x * keep[:, None] * scale)
    # every dropped position lies in some fully dropped 3x3 square (blocks, not single pixels)
    padded = F.pad(dropped.float(), (1, 1, 1, 1), value=1.0)
    full = F.avg_pool2d(padded[:, None], 3, stride=1)[:, 0] == 1.0  # 3x3 squares centred at each position
    covered = F.max_pool2d(full.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    assert bool((covered | ~dropped).all())
    block.eval()
    assert torch.equal(block(x), x)
    with pytest.raises(ValueError, match="drop_prob"):
        DropBlock2d(1.5)


def test_fpn_input_errors():
    fpn = FPN([8, 12, 16])
    with pytest.raises(ValueError, match="3 feature maps"):
        fpn(features()[:2])
    with pytest.raises(ValueError, match="in_channels_list"):
        FPN([8, 16])
