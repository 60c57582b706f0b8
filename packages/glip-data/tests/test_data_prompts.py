"""Detection prompts: official name cleaning, spans, chunking."""
from __future__ import annotations

import pytest
from transformers import BertTokenizerFast

from glip_data import chunk_classes, clean_name, detection_prompt


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return BertTokenizerFast.from_pretrained(str(minilm_dir), do_lower_case=True)


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("person", "person"),
        ("aerosol_can", "aerosol can"),
        ("bow_(weapon)", "bow "),  # trailing space kept, as the official code leaves it
        ("__background__", " background "),  # "  background  " -> one pass of "  " -> " "
        ("a_(b)_c_(d)", "a "),  # greedy: from the first "(" to the last ")"
        ("x___y", "x  y"),  # three spaces -> one replacement pass leaves two
        ("traffic light", "traffic light"),
    ],
)
def test_clean_name_matches_official_rules(raw, cleaned):
    assert clean_name(raw) == cleaned


def test_detection_prompt_coco_style():
    prompt, spans = detection_prompt(["person", "bicycle", "traffic light"])
    assert prompt == "person. bicycle. traffic light"
    assert spans == [[(0, 6)], [(8, 15)], [(17, 30)]]


def test_detection_prompt_spans_cover_cleaned_names_with_lvis_quirks():
    names = ["bow_(weapon)", "aerosol_can", "Band_Aid", "café"]
    prompt, spans = detection_prompt(names)
    assert prompt == "bow . aerosol can. Band Aid. café"
    assert [prompt[s:e] for (s, e), in spans] == [clean_name(n) for n in names]
    assert spans[0] == [(0, 4)]  # "bow " with its trailing space


def test_detection_prompt_custom_separator():
    prompt, spans = detection_prompt(["cat", "dog"], separator=" . ")
    assert prompt == "cat . dog"
    assert spans == [[(0, 3)], [(6, 9)]]


def test_detection_prompt_rejects_bad_input():
    with pytest.raises(TypeError, match="single string"):
        detection_prompt("person, car")
    with pytest.raises(ValueError, match="empty"):
        detection_prompt([])
    with pytest.raises(ValueError, match=r"category name 1 \('\(unknown\)'\)"):
        detection_prompt(["cat", "(unknown)"])
    with pytest.raises(TypeError, match=r"names\[0\]"):
        detection_prompt([3])


def _prompt_tokens(tokenizer, names, idx):
    prompt, _ = detection_prompt([names[i] for i in idx])
    return len(tokenizer(prompt)["input_ids"])


def test_chunk_classes_respects_class_limit():
    names = [f"class{i}" for i in range(95)]
    # The class limit alone decides here (a tokenizer stub counting characters keeps it independent of BERT).
    chunks = chunk_classes(names, lambda text, **kw: {"input_ids": list(text)}, max_classes=40, max_tokens=10**6)
    assert chunks == [list(range(0, 40)), list(range(40, 80)), list(range(80, 95))]


def test_chunk_classes_token_limit_is_exact_and_greedy(tokenizer):
    names = ["hippopotamus", "person", "aerosol_can", "bow_(weapon)", "traffic light", "sea lion", "crème brûlée"] * 6
    chunks = chunk_classes(names, tokenizer, max_classes=None, max_tokens=30)
    assert [i for chunk in chunks for i in chunk] == list(range(len(names)))  # consecutive, nothing lost
    for k, chunk in enumerate(chunks):
        assert _prompt_tokens(tokenizer, names, chunk) <= 30
        if k + 1 < len(chunks):  # greedy: the next class would not have fit
            assert _prompt_tokens(tokenizer, names, chunk + [chunks[k + 1][0]]) > 30


def test_chunk_classes_lvis_like_count(tokenizer):
    names = [f"thing_{i}" for i in range(1203)]
    chunks = chunk_classes(names, tokenizer, max_classes=40, max_tokens=256)
    assert len(chunks) == 31 and len(chunks[-1]) == 3


def test_chunk_classes_raises_for_a_class_that_never_fits(tokenizer):
    names = ["cat", "a very long category name that cannot fit", "dog"]
    with pytest.raises(ValueError, match=r"class 1 \('a very long"):
        chunk_classes(names, tokenizer, max_tokens=6)
