"""Caption packing: a pseudo-labelled caption joined with random other captions as negatives.

The official caption loader (``docs/official_model.md#caption-data``) makes caption data harder by packing the
positive caption with captions of other images, which the model must learn not to ground:

1. the number of negatives: with probability ``no_pack_prob`` (0.4) none; otherwise with probability
   ``full_pack_prob`` (0.5) ``number`` (20), else a uniform integer in ``[0, number)``;
2. negatives are drawn uniformly from the dataset (with replacement);
3. in random order, a negative is kept when its token count (with ``[CLS]``/``[SEP]``) is below the budget left, the
   budget starting at ``max_len`` minus the positive caption's token count;
4. the positive and the kept negatives are shuffled and concatenated, each followed by ``"."`` if it does not end
   with one, then a space; the positive caption's spans are shifted by its new start.

With no negatives the caption is left as it is.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .grounding import RandomSource
from .sample import GroundingSample

__all__ = ["num_caption_negatives", "pack_captions"]


def num_caption_negatives(rng: Any, number: int = 20, no_pack_prob: float = 0.4, full_pack_prob: float = 0.5) -> int:
    """How many negative captions to pack (official rule, see the module doc)."""
    rng = RandomSource(rng)
    if number <= 0 or rng.random() < no_pack_prob:
        return 0
    if rng.random() < full_pack_prob:
        return number
    return rng.randint(0, number - 1)


def _num_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


def pack_captions(sample: GroundingSample, negatives: Sequence[str], tokenizer: Any, max_len: int = 256,
                  rng: Any = None) -> GroundingSample:
    """``sample`` with its caption packed among ``negatives`` (official packing; module doc).

    The returned sample's ``metadata["packed_negatives"]`` counts the negatives kept and ``metadata["positive_span"]``
    is the ``(start, end)`` of the original caption inside the packed one.
    """
    if not negatives:
        return sample
    rng = RandomSource(rng)
    caption = sample.caption
    budget = max_len - _num_tokens(tokenizer, caption)
    order = list(range(len(negatives)))
    rng.shuffle(order)
    kept = []
    for i in order:
        length = _num_tokens(tokenizer, negatives[i])
        if length < budget:
            kept.append(negatives[i])
            budget -= length
    pieces: list[tuple[bool, str]] = [(True, caption)] + [(False, text) for text in kept]
    rng.shuffle(pieces)
    packed, start = "", 0
    for is_positive, text in pieces:
        if is_positive:
            start = len(packed)
        packed += text if text.endswith(".") else text + "."
        packed += " "
    spans = [[(s + start, e + start) for s, e in box_spans] for box_spans in sample.tokens_positive]
    metadata = dict(sample.metadata)
    metadata.update(packed_negatives=len(kept), positive_span=(start, start + len(caption)))
    return replace(sample, caption=packed, tokens_positive=spans, positive_map=None, metadata=metadata)
