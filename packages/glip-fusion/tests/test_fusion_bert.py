"""BertEncoderLayer: HF BertLayer parity when the clamps are inactive, GLIP's clamps when they are active.

NOTE: this file imports ``transformers`` — allowed IN TESTS ONLY as an independent reference; glip_fusion itself
never imports it.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from glip_fusion import BertEncoderLayer

transformers = pytest.importorskip("transformers")  # test-only dependency
from transformers.models.bert.modeling_bert import BertConfig, BertLayer  # noqa: E402


def _hf_layer(hidden, heads, inter):
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
                     hidden_act="gelu", layer_norm_eps=1e-12)
    cfg._attn_implementation = "eager"
    return BertLayer(cfg).eval()


def _randomize(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))


def _hf_forward(layer, hidden, mask):
    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min  # HF extended mask
    out = layer(hidden, attention_mask=additive)
    return out[0] if isinstance(out, tuple) else out


def glip_layer_statement(sd, hidden, mask, heads, clamp=50000.0):
    """GLIP's clamped BERT layer (docs/official_model.md#head-bert-layer) restated with functional ops from a state_dict."""
    B, M, C = hidden.shape
    d = C // heads
    lin = lambda x, n: F.linear(x, sd[n + ".weight"], sd[n + ".bias"])
    c = lambda x: torch.clamp(x, -clamp, clamp)
    split = lambda x: x.reshape(B, M, heads, d).permute(0, 2, 1, 3)
    q, k, v = (split(lin(hidden, f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = c(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d))
    scores = scores + (1.0 - mask.to(hidden.dtype))[:, None, None, :] * torch.finfo(hidden.dtype).min
    ctx = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v).permute(0, 2, 1, 3).reshape(B, M, C)
    ln = lambda x, n: F.layer_norm(x, (C,), sd[n + ".weight"], sd[n + ".bias"], eps=1e-12)
    a = ln(lin(ctx, "attention.output.dense") + hidden, "attention.output.LayerNorm")
    u = c(0.5 * (lambda z: z * (1.0 + torch.erf(z / math.sqrt(2.0))))(c(lin(a, "intermediate.dense"))))
    o = c(lin(u, "output.dense"))
    return c(ln(o + a, "output.LayerNorm"))


@pytest.mark.parametrize("hidden,heads,inter", [(384, 12, 1536), (768, 12, 3072), (64, 4, 96)])
def test_matches_hf_bertlayer_when_clamps_inactive(hidden, heads, inter):
    ours = BertEncoderLayer(hidden, heads, inter).eval()
    hf = _hf_layer(hidden, heads, inter)
    assert set(ours.state_dict()) == set(hf.state_dict())  # HF names: a checkpoint loads by prefix strip
    _randomize(hf)
    ours.load_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, hidden, generator=g)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    with torch.no_grad():
        got = ours(x, mask)
        want = _hf_forward(hf, x, mask)
    assert got.shape == (2, 9, hidden)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_padding_keys_are_masked_and_bool_mask_accepted():
    layer = BertEncoderLayer(64, 4, 96).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 64, generator=g)
    mask = torch.tensor([[True, True, True, True, False, False]])
    y = layer(x, mask)
    x2 = x.clone()
    x2[:, 4:] = 100 * torch.randn(1, 2, 64, generator=g)  # change only the padded tokens
    y2 = layer(x2, mask.long())
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6)  # valid tokens never see padded keys
    assert not torch.allclose(y[:, 4:], y2[:, 4:])  # padded rows are still computed (GLIP keeps them)
    # every key padded: each score + finfo.min rounds to exactly finfo.min, so every row attends uniformly to all
    # tokens (as the Hugging Face layer and GLIP do), like an unmasked layer whose scores are all equal
    all_pad = layer(x, torch.zeros(1, 6, dtype=torch.bool))
    uniform = copy.deepcopy(layer)
    with torch.no_grad():
        uniform.attention.self.query.weight.zero_()
        uniform.attention.self.query.bias.zero_()
    assert torch.allclose(all_pad, uniform(x), atol=1e-6, rtol=0)
    assert not torch.allclose(all_pad, y, atol=1e-3)


def _clamp_test_layer():
    layer = BertEncoderLayer(64, 4, 96).eval()
    hf = _hf_layer(64, 4, 96)
    _randomize(hf, seed=3)
    layer.load_state_dict(hf.state_dict())
    return layer, hf


def test_ffn_clamps_active():
    layer, hf = _clamp_test_layer()
    with torch.no_grad():
        layer.intermediate.dense.weight.mul_(1e6)  # FFN pre-activations ~ 1e5 > 50000
    hf.load_state_dict(layer.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 64, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        a = layer.attention(x, (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min)
        assert layer.intermediate.dense(a).abs().max() > 5e4  # the clamp bites
        got = layer(x, mask)
        want = glip_layer_statement(layer.state_dict(), x, mask, heads=4)
        unclamped = _hf_forward(hf, x, mask)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()
    assert (got - unclamped).abs().max() > 1e-2
    assert got.abs().max() <= 5e4


def test_attention_score_clamp_before_mask():
    layer, hf = _clamp_test_layer()
    with torch.no_grad():
        layer.attention.self.query.weight.mul_(3e3)
        layer.attention.self.key.weight.mul_(3e3)  # scores ~ 1e5: several keys saturate at +50000 and tie
    hf.load_state_dict(layer.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 7, 64, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        got = layer(x, mask)
        want = glip_layer_statement(layer.state_dict(), x, mask, heads=4)
        unclamped = _hf_forward(hf, x, mask)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()
    assert (got - unclamped).abs().max() > 1e-3
    # clamp=None switches every clamp off and gives the plain BERT layer back
    plain = BertEncoderLayer(64, 4, 96, clamp=None).eval()
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(x, mask), unclamped, atol=1e-4)


def test_dropout_only_in_training():
    layer = BertEncoderLayer(64, 4, 96)
    x = torch.randn(2, 5, 64)
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    b = layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_bad_input_shape():
    layer = BertEncoderLayer(64, 4, 96)
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, M, 64\)"):
        layer(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="text_mask must have shape"):
        layer(torch.randn(2, 5, 64), torch.ones(2, 4))
