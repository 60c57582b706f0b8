"""Stage parity of the encoders with the official GLIP-T golden fixture (Swin + FPN, BERT).

Official-layout weights are rebuilt from ``weights_recipe.json`` (sha256-verified), loaded STRICTLY through the
glip-encoders filter functions, and every case of ``index.json`` is run on its recorded inputs.
Tolerance: max|ours - official| / max|official| <= 1e-4 (the fixture README's bound up to the fusion encoder).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from glip_encoders import (
    TextEncoder,
    build_image_encoder,
    image_checkpoint_filter_fn,
    load_tokenizer,
    text_checkpoint_filter_fn,
    tokenize,
)
from glip_train.recipe import build_recipe_state_dict

pytestmark = pytest.mark.parity

TOL = 1e-4
TEXT_PREFIX = "language_backbone.body.model."


def rel_err(ours: torch.Tensor, official: np.ndarray) -> float:
    ref = torch.from_numpy(official).to(torch.float64)
    return float((ours.detach().to(torch.float64) - ref).abs().max() / ref.abs().max())


def strip(sd: dict, prefix: str) -> dict:
    assert sd and all(k.startswith(prefix) for k in sd)
    return {k[len(prefix):]: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def cases(parity_dir, parity_index):
    names = sorted(parity_index["cases"])
    assert names, "index.json lists no cases"
    return {name: np.load(parity_dir / parity_index["cases"][name]["file"]) for name in names}


@pytest.fixture(scope="module")
def image_encoder(parity_dir):
    sd = strip(build_recipe_state_dict(parity_dir / "weights_recipe.json", prefix="backbone."), "backbone.")
    encoder = build_image_encoder("swin_tiny").eval()
    encoder.load_state_dict(image_checkpoint_filter_fn(sd, encoder), strict=True)
    return encoder


@pytest.fixture(scope="module")
def text_encoder(parity_dir):
    sd = build_recipe_state_dict(parity_dir / "weights_recipe.json", prefix="language_backbone.")
    encoder = TextEncoder.bert_base().eval()
    mapped, dropped = text_checkpoint_filter_fn(strip(sd, TEXT_PREFIX), encoder)
    assert all(k in ("embeddings.position_ids",) or k.startswith("pooler.") for k in dropped)
    encoder.model.load_state_dict(mapped, strict=True)
    return encoder


def test_backbone_and_fpn_match_official(image_encoder, cases):
    for name, arrays in cases.items():
        images = torch.from_numpy(arrays["input/image_tensor"])
        with torch.no_grad():
            pyramid, body = image_encoder(images, return_body_features=True)
        errors = {}
        for level, c in zip((3, 4, 5), body):
            key = f"backbone/swin_stage{level}_c32"
            assert tuple(c[:, :32].shape) == arrays[key].shape, (name, key)
            errors[key] = rel_err(c[:, :32], arrays[key])
        for level, p in zip((3, 4, 5, 6, 7), pyramid):
            key = f"fpn/p{level}"
            assert tuple(p.shape) == arrays[key].shape, (name, key)
            errors[key] = rel_err(p, arrays[key])
        bad = {k: e for k, e in errors.items() if not e <= TOL}
        assert not bad, f"{name}: relative errors above {TOL}: {bad}"


def test_bert_matches_official(text_encoder, cases):
    for name, arrays in cases.items():
        ids = torch.from_numpy(arrays["input/input_ids"])
        mask = torch.from_numpy(arrays["input/attention_mask"])
        with torch.no_grad():
            out = text_encoder(ids, mask)
        assert torch.equal(out.masks, torch.from_numpy(arrays["lang/masks"])), name
        errors = {
            "lang/hidden_t64": rel_err(out.hidden[:, :64], arrays["lang/hidden_t64"]),
            "lang/embedded_t64": rel_err(out.embedded[:, :64], arrays["lang/embedded_t64"]),
            "lang/aggregate": rel_err(out.aggregate, arrays["lang/aggregate"]),
        }
        assert (out.embedded[:, :64][mask[:, :64] == 0] == 0).all()
        bad = {k: e for k, e in errors.items() if not e <= TOL}
        assert not bad, f"{name}: relative errors above {TOL}: {bad}"


def test_tokenizer_reproduces_official_input_ids(minilm_dir, parity_index, cases):
    """The recorded input_ids came from the official batch_encode_plus(max_length=256, padding='max_length')."""
    tokenizer = load_tokenizer(minilm_dir)
    for name, arrays in cases.items():
        enc = tokenize(tokenizer, parity_index["cases"][name]["captions"], max_length=256, pad_to_max=True)
        assert torch.equal(enc["input_ids"], torch.from_numpy(arrays["input/input_ids"])), name
        assert torch.equal(enc["attention_mask"], torch.from_numpy(arrays["input/attention_mask"])), name
