"""Detection -> grounding with positive overflow, negative sampling and token budget (official semantics)."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast

from glip_data import DetectionToGrounding, GroundingSample, build_positive_map, clean_name, detection_to_grounding

COLORS = "red blue green black white brown pink gray yellow orange".split()
OBJECTS = "car dog cat bus chair table cup bed boat kite".split()
THREE_TOKEN_NAMES = [f"{c} {o}" for c in COLORS for o in OBJECTS]  # "red car" + ". " -> 3 tokens each


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return BertTokenizerFast.from_pretrained(str(minilm_dir), do_lower_case=True)


def _sample(labels, width=1000, height=800, boxes=None):
    n = len(labels)
    if boxes is None:
        boxes = [[i, i, i + 10, i + 10] for i in range(n)]
    return GroundingSample(
        image_path="img.jpg", width=width, height=height, boxes=boxes, caption="",
        tokens_positive=[[] for _ in range(n)], labels=labels, metadata={"image_id": 7},
    )


def _n_tokens(tokenizer, text):
    return len(tokenizer(text)["input_ids"])


def test_spans_point_at_each_box_class_name(tokenizer):
    categories = {i + 1: name for i, name in enumerate(["person", "bicycle", "aerosol_can", "bow_(weapon)", "car"])}
    out = DetectionToGrounding(categories, tokenizer, rng=0)(_sample([3, 5, 3, 4]))
    assert out.labels.tolist() == [3, 5, 3, 4]
    assert [out.caption[s:e] for (s, e), in out.tokens_positive] == ["aerosol can", "car", "aerosol can", "bow "]
    assert out.metadata["image_id"] == 7 and sorted(out.metadata["positive_labels"]) == [3, 4, 5]
    # Every name in the prompt is one of the positives or negatives, joined by ". ".
    names = [clean_name(categories.get(l, "__background__")) for l in out.metadata["label_to_span"]]
    assert sorted(out.caption.split(". ")) == sorted(names)
    pm = build_positive_map(tokenizer, out.caption, out.tokens_positive)
    assert pm.any(dim=1).all()


def test_reproducible_with_seed_and_generator(tokenizer):
    categories = dict(enumerate(THREE_TOKEN_NAMES[:30], start=1))
    sample = _sample([1, 2])
    for make in (lambda: 123, lambda: random.Random(123), lambda: np.random.default_rng(123)):
        a = detection_to_grounding(sample, categories, tokenizer, rng=make())
        b = detection_to_grounding(sample, categories, tokenizer, rng=make())
        assert a.caption == b.caption and a.tokens_positive == b.tokens_positive
    captions = {detection_to_grounding(sample, categories, tokenizer, rng=s).caption for s in range(5)}
    assert len(captions) > 1


def test_positive_overflow_keeps_labels_within_budget(tokenizer):
    assert all(len(tokenizer.tokenize(n + ". ")) == 3 for n in THREE_TOKEN_NAMES)
    categories = dict(enumerate(THREE_TOKEN_NAMES, start=1))  # 100 classes
    labels = list(range(1, 101)) + [1, 2]  # every class is positive: 300 tokens > 254
    with pytest.warns(UserWarning, match="positive class names overflow 254 tokens"):
        out = DetectionToGrounding(categories, tokenizer, rng=1)(_sample(labels))
    kept = out.metadata["positive_labels"]
    assert len(kept) == 254 // 3  # 84 labels: 84 * 3 = 252 <= 254 < 255
    assert set(out.labels.tolist()) == set(kept)
    assert out.num_boxes == len(kept) + sum(1 for l in (1, 2) if l in kept)
    assert out.metadata["removed_boxes_overflow"] == len(labels) - out.num_boxes
    assert out.metadata["negative_labels"] == []  # budget 254 - 255 (length counts the refused label) < 0
    assert _n_tokens(tokenizer, out.caption) <= 256


@pytest.mark.parametrize("seed", range(6))
def test_prompt_always_fits_the_text_length(tokenizer, seed):
    long_names = {i: f"{COLORS[i % 10]} {OBJECTS[(i // 10) % 10]} number {i} of the set" for i in range(1, 301)}
    out = DetectionToGrounding(long_names, tokenizer, rng=seed)(_sample([5, 17, 250]))
    assert _n_tokens(tokenizer, out.caption) <= 256
    assert {5, 17, 250} <= set(out.metadata["label_to_span"])


def test_control_probabilities_one_negative_and_no_negative(tokenizer):
    categories = dict(enumerate(THREE_TOKEN_NAMES[:20], start=1))
    one_neg = DetectionToGrounding(categories, tokenizer, control_probabilities=(1, 0, 0, 0), rng=3)
    zero_neg = DetectionToGrounding(categories, tokenizer, control_probabilities=(0, 1, 0, 0), rng=3)
    for _ in range(20):
        negatives = one_neg(_sample([4]))
        assert len(negatives.metadata["negative_labels"]) <= 1  # one drawn; dropped if it was the positive
        assert zero_neg(_sample([4])).metadata["negative_labels"] == []
        assert zero_neg(_sample([4])).caption == clean_name(categories[4])


def test_full_negatives_include_background_by_default(tokenizer):
    categories = {1: "cat", 2: "dog", 3: "horse"}
    conv = DetectionToGrounding(categories, tokenizer, control_probabilities=(0, 0, 1, 0), rng=0)
    out = conv(_sample([2]))
    # full_negative = min(85, 4 candidates incl. background) -> all drawn, the positive removed.
    assert sorted(out.metadata["negative_labels"]) == [0, 1, 3]
    assert " background " in out.caption.split(". ")
    no_bg = DetectionToGrounding(categories, tokenizer, control_probabilities=(0, 0, 1, 0), include_background=False,
                                 rng=0)(_sample([2]))
    assert sorted(no_bg.metadata["negative_labels"]) == [1, 3] and "background" not in no_bg.caption


def test_negative_count_distribution_matches_official_mixture(tokenizer):
    # 200 candidates, budget disabled (max_len 4096): half the draws take all 85, the rest uniform in 1..85.
    categories = dict(enumerate([f"{n} {k}" for k in range(2) for n in THREE_TOKEN_NAMES], start=1))
    conv = DetectionToGrounding(categories, tokenizer, max_len=4096, rng=0)
    counts = np.array([len(conv(_sample([1])).metadata["negative_labels"]) for _ in range(400)])
    assert counts.min() >= 0 and counts.max() <= 85
    full = np.mean(counts >= 84)  # 85 drawn, one may be the positive
    assert 0.42 < full < 0.62  # expected 0.5 + 0.5 * 2/85
    partial = counts[counts < 84]
    assert 30 < partial.mean() < 55  # uniform 1..83 -> 42


def test_negative_screening_respects_remaining_budget(tokenizer):
    categories = dict(enumerate(THREE_TOKEN_NAMES, start=1))
    conv = DetectionToGrounding(categories, tokenizer, max_len=40, control_probabilities=(0, 0, 1, 0), rng=5)
    out = conv(_sample([1, 2]))
    # positives: 6 tokens; budget 38 - 6 = 32; negatives kept while the budget stays > 0: 10 (32 - 30 = 2 > 0).
    assert len(out.metadata["negative_labels"]) == 10
    assert _n_tokens(tokenizer, out.caption) <= 40


def test_disable_shuffle_gives_all_classes_in_id_order(tokenizer):
    categories = {2: "dog", 1: "person", 3: "traffic light"}
    out = DetectionToGrounding(categories, tokenizer, shuffle=False, rng=0)(_sample([3, 1]))
    assert out.caption == "person. dog. traffic light"
    assert out.tokens_positive == [[(13, 26)], [(0, 6)]]


def test_clipping_and_empty_boxes(tokenizer):
    categories = {1: "cat", 2: "dog"}
    boxes = [[-5, 10, 120, 50], [30, 30, 30, 60], [10, 10, 20, 20]]  # 2nd is empty (x2 == x1)
    out = DetectionToGrounding(categories, tokenizer, rng=0)(_sample([1, 2, 2], width=100, height=80, boxes=boxes))
    assert out.boxes.tolist() == [[0, 10, 99, 50], [10, 10, 20, 20]]
    assert out.labels.tolist() == [1, 2]


def test_bad_labels_and_options(tokenizer):
    with pytest.raises(KeyError, match=r"img.jpg: labels \[9\]"):
        DetectionToGrounding({1: "cat"}, tokenizer)(_sample([1, 9]))
    with pytest.raises(ValueError, match="drop positives"):
        DetectionToGrounding({1: "cat"}, tokenizer, control_probabilities=(0, 0, 0.5, 0.1))
    with pytest.raises(TypeError, match="rng"):
        DetectionToGrounding({1: "cat"}, tokenizer, rng="seed")


def test_no_warning_when_everything_fits(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = DetectionToGrounding({1: "cat", 2: "dog"}, tokenizer, rng=0)(_sample([1]))
    assert torch.equal(out.labels, torch.tensor([1]))
