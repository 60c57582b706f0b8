"""factored_bi_mha (the X-MHA with image projections folded into the text side) against BiMultiHeadAttention with
the eager reference backend, in float64: outputs and gradients, masks, an active clamp, skip_masked_text."""

import pytest
import torch

from glip_fusion import BiMultiHeadAttention
from glip_fusion.factored_attention import factored_bi_mha, factored_pays

F64 = dict(atol=1e-11, rtol=1e-11)


def _module(clamp=50000.0, skip=False, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    m = BiMultiHeadAttention(12, 10, 32, 4, dropout=dropout, clamp=clamp, backend="reference",
                             skip_masked_text=skip).double()
    with torch.no_grad():
        for p in m.parameters():  # nonzero biases: the bias terms of the factored form are exercised
            p.copy_(0.4 * torch.randn(p.shape, dtype=p.dtype))
    return m.eval()


def _inputs(B=3, N=23, M=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, N, 12, generator=g, dtype=torch.float64)
    l = torch.randn(B, M, 10, generator=g, dtype=torch.float64)
    text_mask = torch.ones(B, M, dtype=torch.bool)
    text_mask[1, 4:] = False
    text_mask[2] = False  # no valid token: the image update is 0 (the reference zeroes it too)
    image_mask = torch.ones(B, N, dtype=torch.bool)
    image_mask[1, 15:] = False
    image_mask[2] = False
    return v, l, text_mask, image_mask


@pytest.mark.parametrize("use_image_mask", [False, True])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("clamp", [50000.0, 2.0])  # 2.0: the clamp changes many logits
def test_outputs_equal_the_reference(use_image_mask, skip, clamp):
    m = _module(clamp=clamp, skip=skip)
    v, l, tm, im = _inputs()
    im = im if use_image_mask else None
    with torch.no_grad():
        want = m(v, l, tm, im)
        got = factored_bi_mha(m, v, l, tm, im)
        if clamp == 2.0:  # the test must exercise the clamp
            q = m.v_proj(v) * m.scale
            k = m.l_proj(l)
            assert (q.view(3, 23, 4, 8).transpose(1, 2) @ k.view(3, 6, 4, 8).permute(0, 2, 3, 1)).abs().max() > 2.0
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **F64)


def test_gradients_equal_the_reference_without_dropout():
    m = _module(clamp=3.0).train()
    m.dropout = 0.0
    v, l, tm, im = _inputs()
    results = []
    for fn in (m, lambda *a: factored_bi_mha(m, *a)):
        vv, ll = v.clone().requires_grad_(), l.clone().requires_grad_()
        dv, dl = fn(vv, ll, tm, im)
        loss = (dv * torch.linspace(-1, 1, dv.numel(), dtype=dv.dtype).view_as(dv)).sum() + dl.square().sum()
        results.append(torch.autograd.grad(loss, [vv, ll, *m.parameters()]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **F64)


def test_refuses_dropout_in_training_and_bad_shapes():
    m = _module(dropout=0.1).train()
    v, l, tm, _ = _inputs()
    with pytest.raises(ValueError, match="dropout"):
        factored_bi_mha(m, v, l, tm)
    m.eval()
    with pytest.raises(ValueError, match="v must have shape"):
        factored_bi_mha(m, v[..., :5], l, tm)
    assert factored_pays(11, 256) and not factored_pays(256, 256)


def test_module_takes_the_factored_path_only_where_it_pays():
    m = _module(clamp=50000.0).float()
    m.backend = "auto"
    v, l, tm, im = (t.float() if t.is_floating_point() else t for t in _inputs(M=6))
    calls = []
    import glip_fusion.fusion_block as fusion_block
    original = fusion_block.factored_bi_mha
    fusion_block.factored_bi_mha = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            auto = m(v, l, tm, im)  # 6 text tokens < head_dim 8, CPU, no grad: factored
            assert calls == [1]
            m.factored = False
            plain = m(v, l, tm, im)
            assert calls == [1]
        m.factored = None
        m(v, l, tm, im)  # gradients recorded: the projected path
        assert calls == [1]
        with torch.no_grad():
            m(v, torch.randn(3, 8, 10), torch.ones(3, 8, dtype=torch.bool))  # 8 tokens = a head: no gain
            assert calls == [1]
            m.backend = "reference"  # an explicit backend is honoured
            m(v, l, tm, im)
            assert calls == [1]
            m.backend = "auto"
            with pytest.MonkeyPatch.context() as mp:  # ... also when it comes from the environment
                mp.setenv("GLIP_FUSION_BACKEND", "sdpa")
                m(v, l, tm, im)
            assert calls == [1]
            m.train()
            m.dropout = 0.1  # a module left in train mode with dropout: the projected path applies the dropout
            m(v, l, tm, im)
            assert calls == [1]
            m.eval()
            m(v, l, tm, im)
            assert calls == [1, 1]
    finally:
        fusion_block.factored_bi_mha = original
    for a, b in zip(auto, plain):  # float32: one reassociation of sums of ~10 products of O(1) values
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
