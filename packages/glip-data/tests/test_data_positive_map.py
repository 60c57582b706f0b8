"""Character spans -> token indices, against hand-checked tokenizations and the official parity fixture."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast

from glip_data import build_positive_map, detection_prompt, label_to_tokens, spans_to_tokens


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return BertTokenizerFast.from_pretrained(str(minilm_dir), do_lower_case=True)


def _tokens(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_lvis_names_with_parentheses_and_underscores(tokenizer):
    prompt, spans = detection_prompt(["bow_(weapon)", "aerosol_can", "person"])
    assert prompt == "bow . aerosol can. person"
    # [CLS] bow . aero ##sol can . person [SEP]
    assert _tokens(tokenizer, prompt) == ["[CLS]", "bow", ".", "aero", "##sol", "can", ".", "person", "[SEP]"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything maps: no warning
        result = spans_to_tokens(tokenizer, prompt, spans)
    # "bow " ends on a space: the end fallback (end - 2) lands on "w" -> token 1 only.
    assert result == [[1], [3, 4, 5], [7]]
    assert result.unmapped == [] and result.truncated == []


def test_accented_characters_keep_offsets(tokenizer):
    prompt = "crème brûlée. café"
    assert _tokens(tokenizer, prompt)[1:-1] == ["cr", "##eme", "br", "##ule", "##e", ".", "cafe"]
    result = spans_to_tokens(tokenizer, prompt, [[(0, 12)], [(14, 18)], [(6, 12)]])
    assert result == [[1, 2, 3, 4, 5], [7], [3, 4, 5]]


def test_decomposed_accent_uses_end_fallback(tokenizer):
    # NFD text: the combining accent (index 4) is stripped by the tokenizer, so char_to_token(4) is None and the
    # official end fallback (end - 2) finds "e" of "cafe".
    prompt = "cafe\u0301 noir"
    enc = tokenizer(prompt)
    assert enc.char_to_token(4) is None and enc.char_to_token(3) == 1
    assert spans_to_tokens(tokenizer, prompt, [[(0, 5)], [(4, 10)]]) == [[1], [2]]


def test_many_word_pieces(tokenizer):
    prompt = "a hippopotamus. supercalifragilistic"
    pieces = _tokens(tokenizer, prompt)
    n_super = len(pieces) - 1 - pieces.index(".") - 1  # word pieces of the last word
    assert n_super >= 4
    result = spans_to_tokens(tokenizer, prompt, [[(2, 14)], [(16, len(prompt))]])
    dot = pieces.index(".")
    assert result == [list(range(2, dot)), list(range(dot + 1, dot + 1 + n_super))]


def test_multiple_spans_union_and_whitespace_fallbacks(tokenizer):
    prompt = "a red car and  a blue car"  # [CLS] a red car and a blue car [SEP]
    # entity 0: two spans ("red", last "car"); entity 1 starts on two spaces (beg falls back to start + 2 = "a");
    # entity 2 is only the two spaces: beg -> "a" (5) but end falls back to "d" of "and" (4): beg > end -> nothing.
    spans = [[(2, 5), (22, 25)], [(13, 18)], [(13, 15)]]
    with pytest.warns(UserWarning, match=r"map to no token.*#2"):
        result = spans_to_tokens(tokenizer, prompt, spans)
    assert result == [[2, 7], [5, 6], []]
    assert result.unmapped == [2]
    assert result.empty == []


def test_entity_without_spans_is_empty_not_unmapped(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = spans_to_tokens(tokenizer, "a cat", [[(2, 5)], []])
    assert result == [[2], []] and result.empty == [1] and result.unmapped == []


def test_vocabulary_over_256_tokens_reports_truncation(tokenizer):
    names = [f"animal{i}" for i in range(100)]  # "animal12" is several word pieces each
    prompt, spans = detection_prompt(names)
    n_full = len(tokenizer(prompt)["input_ids"])
    assert n_full > 256
    with pytest.warns(UserWarning, match="truncated to 256"):
        result = spans_to_tokens(tokenizer, prompt, spans)
    untruncated = spans_to_tokens(tokenizer, prompt, spans, max_length=None)
    assert untruncated.truncated == [] and untruncated.num_tokens == n_full
    assert max(max(t) for t in untruncated) == n_full - 2
    assert result.num_tokens == 256 and result.num_tokens_untruncated == n_full
    # Entities fully inside the first 255 positions are identical; the others are reported.
    for i, (cut, full) in enumerate(zip(result, untruncated)):
        if max(full) <= 254:
            assert cut == full and i not in result.truncated
        else:
            assert i in result.truncated and cut != full
            assert all(t <= 254 for t in cut)
    assert result.unmapped and set(result.unmapped) <= set(result.truncated)


def test_build_positive_map_is_binary_and_truncated(tokenizer):
    caption = "a red car. a dog"
    pm = build_positive_map(tokenizer, caption, [[(2, 9)], [(11, 16)], []], max_len=16)
    assert pm.dtype == torch.bool and pm.shape == (3, 16)
    expected = torch.zeros(3, 16, dtype=torch.bool)
    expected[0, [2, 3]] = True
    expected[1, [5, 6]] = True
    assert torch.equal(pm, expected)


def test_label_to_tokens_plus_offset(tokenizer):
    prompt, spans = detection_prompt(["person", "traffic light"])
    assert label_to_tokens(tokenizer, prompt, spans) == {1: [1], 2: [3, 4]}
    assert label_to_tokens(tokenizer, prompt, spans, plus=0) == {0: [1], 1: [3, 4]}


def test_bad_spans_are_named(tokenizer):
    with pytest.raises(ValueError, match=r"spans\[1\] = \(3, 99\)"):
        spans_to_tokens(tokenizer, "a cat", [[(0, 1)], [(3, 99)]])
    with pytest.raises(TypeError, match=r"spans\[0\] = \(0, 1\) looks like a single"):
        spans_to_tokens(tokenizer, "a cat", [(0, 1)])


@pytest.mark.parity
def test_tokenizer_reproduces_fixture_ids(tokenizer, parity_index):
    for case in parity_index["cases"].values():
        for caption, ids in zip(case["captions"], case["input_ids_unpadded_single"]):
            assert tokenizer(caption)["input_ids"] == ids


@pytest.mark.parity
def test_label_to_token_matches_fixture(tokenizer, parity_index):
    for name, case in parity_index["cases"].items():
        for i, caption in enumerate(case["captions"]):
            spans = case["tokens_positive_char_spans"][i]
            expected = {int(k): v for k, v in case["label_to_token"][i].items()}
            assert label_to_tokens(tokenizer, caption, spans) == expected, (name, i)
            assert [caption[s:e] for (s, e), in spans] == case["phrases"][i]


@pytest.mark.parity
def test_positive_map_matches_fixture_after_binarisation(tokenizer, parity_dir, parity_index):
    for name, case in parity_index["cases"].items():
        arrays = np.load(parity_dir / case["file"])
        for i, caption in enumerate(case["captions"]):
            official = torch.from_numpy(arrays[f"input/positive_map_{i}"])
            ours = build_positive_map(tokenizer, caption, case["tokens_positive_char_spans"][i], max_len=256)
            assert ours.shape == official.shape, (name, i)
            assert torch.equal(ours, official > 0), (name, i)
            # The official rows are the binary rows normalised to sum 1 (/(n + 1e-6)).
            n = ours.sum(-1, keepdim=True).float()
            torch.testing.assert_close(official, ours.float() / (n + 1e-6))


def test_check_phrases_gives_each_phrase_one_status(tokenizer):
    from glip_data import PHRASE_PROBLEMS, check_phrases

    # [CLS] cat . 😀 . ​ . a red dog [SEP]: the emoji is [UNK] (token 3), the zero-width space no token at all,
    # "a red dog" tokens 5..7
    names = ["cat", "\N{GRINNING FACE}", "\u200b", "a red dog"]
    prompt, spans = detection_prompt(names)
    assert _tokens(tokenizer, prompt) == ["[CLS]", "cat", ".", "[UNK]", ".", ".", "a", "red", "dog", "[SEP]"]
    check = check_phrases(tokenizer, prompt, spans, max_length=8)
    assert check.tokens == [[1], [3], [], [6, 7, 8]]
    assert check.status == ["ok", "unknown_only", "no_token", "beyond_limit"]  # token 8 is past an 8-token text
    assert not check.ok and check.unreadable() == [1, 2, 3] and set(PHRASE_PROBLEMS) == set(check.status[1:])
    message = check.error(names, prompt)
    assert "map to no tokens" in message and "'[UNK]'" in message and "8-token limit" in message
    assert "'cat'" not in message
    assert check_phrases(tokenizer, prompt, spans, max_length=9).status[3] == "ok"
