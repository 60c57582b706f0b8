"""Rule-based noun phrases on hand-labelled captions, and phrase location."""
from __future__ import annotations

import pytest

from glip_data import find_noun_phrases, find_phrase_spans

# Hand-labelled: the noun phrases a reader would ground in each caption.
CAPTIONS = [
    ("a man holding a red umbrella next to the two dogs", ["a man", "a red umbrella", "the two dogs"]),
    ("Two dogs playing in the snow.", ["Two dogs", "the snow"]),
    (
        "A woman in a blue dress is riding a bicycle down the street.",
        ["A woman", "a blue dress", "a bicycle", "the street"],
    ),
    ("a cat sleeping on a wooden bench", ["a cat", "a wooden bench"]),
    ("The little girl is eating an apple and a banana", ["The little girl", "an apple", "a banana"]),
    ("three people standing in front of a large building", ["three people", "a large building"]),
    ("A traffic light on the corner of a busy street", ["A traffic light", "the corner", "a busy street"]),
    ("a young boy throws a frisbee to his dog in the park", ["a young boy", "a frisbee", "his dog", "the park"]),
    ("A plate of food with broccoli and carrots", ["A plate", "food", "broccoli", "carrots"]),
    ("an old man sits on top of a bench while a bird flies overhead", ["an old man", "a bench", "a bird"]),
    ("A sleeping cat and a parked car near the stop sign", ["A sleeping cat", "a parked car", "the stop sign"]),
    ("There are several zebras grazing in the field.", ["several zebras", "the field"]),
    ("Two men wearing hats are looking at the camera", ["Two men", "hats", "the camera"]),
    ("a pizza topped with cheese and tomatoes sitting on a table", ["a pizza", "cheese", "tomatoes", "a table"]),
    ("people watch the game at a bus stop.", ["people", "the game", "a bus stop"]),
    ("a man riding a surf board on a big wave", ["a man", "a surf board", "a big wave"]),
    ("A woman holds her baby while an adult watches", ["A woman", "her baby", "an adult"]),
    ("a baby elephant stands next to two adults on the left", ["a baby elephant", "two adults"]),
    ("the kids stand on the beach", ["the kids", "the beach"]),
]


@pytest.mark.parametrize("caption, expected", CAPTIONS)
def test_find_noun_phrases_hand_labelled(caption, expected):
    assert find_noun_phrases(caption) == expected


def test_noun_phrases_are_substrings_and_deduplicated():
    caption = "A dog chases a ball. The dog catches a ball!"
    phrases = find_noun_phrases(caption)
    assert phrases == ["A dog", "a ball", "The dog"]
    assert all(p in caption for p in phrases)


def test_no_noun_phrase():
    assert find_noun_phrases("") == []
    assert find_noun_phrases("is very red") == []


def test_find_phrase_spans_first_occurrence_case_insensitive():
    caption = "A dog and a cat. The DOG sleeps."
    spans = find_phrase_spans(caption, ["dog", "the dog", "Cat"])
    assert spans == [[(2, 5)], [(17, 24)], [(12, 15)]]
    assert caption[17:24] == "The DOG"


def test_find_phrase_spans_keeps_offsets_with_unicode():
    caption = "İstanbul café and a dog"  # "İ".lower() is two characters: offsets must not shift
    assert find_phrase_spans(caption, ["a dog"]) == [[(18, 23)]]


def test_find_phrase_spans_errors_name_the_phrase():
    with pytest.raises(ValueError, match=r"phrase 1 \('zebra'\) does not occur"):
        find_phrase_spans("a dog", ["dog", "zebra"])
    with pytest.raises(ValueError, match="empty"):
        find_phrase_spans("a dog", [" "])
    with pytest.raises(TypeError, match="single string"):
        find_phrase_spans("a dog", "dog")


def test_find_phrase_spans_fragments_and_case_sensitivity():
    caption = "a red ceramic mug on a red table"
    # ODVG phrases may be fragments: each is searched after the previous one's end
    assert find_phrase_spans(caption, [["red", "mug"], ["red", "table"]]) == [[(2, 5), (14, 17)], [(2, 5), (27, 32)]]
    assert find_phrase_spans(caption, [["mug", "red"]]) == [[(14, 17), (23, 26)]]
    assert find_phrase_spans("A Mug", ["mug"]) == [[(2, 5)]]
    with pytest.raises(ValueError, match="does not occur"):
        find_phrase_spans("A Mug", ["mug"], ignore_case=False)
    with pytest.raises(ValueError, match="does not occur"):
        find_phrase_spans(caption, [["table", "red"]])  # no "red" after "table"
    with pytest.raises(ValueError, match="empty"):
        find_phrase_spans(caption, [[]])
    with pytest.raises(TypeError, match=r"phrases\[0\] must be a str or a list of str"):
        find_phrase_spans(caption, [None])


def test_noun_phrases_roundtrip_to_spans():
    caption = "a man holding a red umbrella next to the two dogs"
    phrases = find_noun_phrases(caption)
    spans = find_phrase_spans(caption, phrases)
    assert [caption[s:e] for (s, e), in spans] == phrases
