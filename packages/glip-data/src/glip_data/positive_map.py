"""Character spans -> token indices ("positive maps"), with the official GLIP fallbacks.

Every grounded entity (a class name in a detection prompt, a phrase in a caption) is given as character spans of
the caption. The model scores tokens, so the spans are mapped to token indices with the fast tokenizer's
char→token offsets. The official rule (docs/official_model.md#prompts, docs/official_model.md#positive-maps) is
reproduced exactly:

* ``beg = char_to_token(start)``, falling back to ``start + 1`` then ``start + 2`` when the character belongs to no
  token (a space, or an accent the uncased tokenizer stripped);
* ``end = char_to_token(end - 1)``, falling back to ``end - 2`` then ``end - 3``;
* if either stays unresolved the span is skipped; otherwise every index ``beg..end`` (inclusive) is positive.

Token 0 is [CLS], so indices are positions in the model's (padded) token sequence.

Unlike the official code, nothing is dropped silently: an entity that maps to no token, or whose tokens were cut
by the ``max_length`` truncation, is reported (a warning plus the ``unmapped`` / ``truncated`` lists of the
returned :class:`EntityTokens`).

:func:`check_phrases` is the one rule of whether the model can read a phrase at all (it maps to tokens, not only
unknown ones, within the text limit): the processor raises on an unreadable phrase, evaluation checks every class
name and phrase with it before the model loads, and pseudo-labelling skips and counts the unreadable ones.
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

Span = tuple[int, int]


class EntityTokens(list):
    """The result of :func:`spans_to_tokens`: a plain ``list[list[int]]`` with a report attached.

    Attributes:
        unmapped: indices of entities that have spans but map to no token (``[]``): their spans fall on
            characters no token covers, or lie entirely beyond the truncation.
        truncated: indices of entities whose token list was shortened or emptied by the ``max_length``
            truncation (compared with the untruncated tokenization).
        empty: indices of entities given no span at all (legitimately grounded to nothing; not warned about).
        num_tokens: length of the tokenized caption used for the map, [CLS]/[SEP] included, after truncation.
        num_tokens_untruncated: the same without truncation.
    """

    unmapped: list[int]
    truncated: list[int]
    empty: list[int]
    num_tokens: int
    num_tokens_untruncated: int


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer: char->token offsets need one. "
            "Load it with transformers.AutoTokenizer.from_pretrained(local_dir) or BertTokenizerFast.from_pretrained"
        )


def _is_index(v: Any) -> bool:
    """An integer character offset (numpy integers included, ``bool`` excluded)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_spans(caption: str, spans: Any) -> list[list[Span]]:
    """Validate ``spans`` (one list of ``(start, end)`` per entity) against ``caption``; return them as tuples."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise TypeError(f"spans must be a list (one entry per entity) of lists of (start, end), got {spans!r}")
    checked: list[list[Span]] = []
    for i, entity in enumerate(spans):
        if isinstance(entity, (str, bytes)) or not isinstance(entity, Sequence):
            raise TypeError(f"spans[{i}] must be a list of (start, end) pairs, got {entity!r}")
        if len(entity) == 2 and all(isinstance(v, int) for v in entity):
            raise TypeError(
                f"spans[{i}] = {tuple(entity)!r} looks like a single (start, end) pair; each entity needs a list of "
                f"spans: [[(start, end)], ...]"
            )
        entity_spans: list[Span] = []
        for span in entity:
            if not isinstance(span, Sequence) or len(span) != 2 or not all(_is_index(v) for v in span):
                raise TypeError(f"spans[{i}] holds {span!r}, which is not a (start, end) pair of integers")
            start, end = int(span[0]), int(span[1])
            if not 0 <= start < end <= len(caption):
                raise ValueError(
                    f"spans[{i}] = ({start}, {end}) is not a non-empty range inside the caption of length "
                    f"{len(caption)}: {caption!r}"
                )
            entity_spans.append((start, end))
        checked.append(entity_spans)
    return checked


def _char_to_token(encoding: Any, char_index: int) -> int | None:
    """``char_to_token`` that answers None (instead of raising) for an index outside the text, as the official
    code's ``try/except`` fallbacks do."""
    if char_index < 0:
        return None
    try:
        return encoding.char_to_token(char_index)
    except Exception:  # out of range for this encoding
        return None


def _span_tokens(encoding: Any, start: int, end: int) -> list[int]:
    """Token indices of one span with the official fallbacks; [] when the span is skipped."""
    beg = _char_to_token(encoding, start)
    if beg is None:
        beg = _char_to_token(encoding, start + 1)
        if beg is None:
            beg = _char_to_token(encoding, start + 2)
    last = _char_to_token(encoding, end - 1)
    if last is None:
        last = _char_to_token(encoding, end - 2)
        if last is None:
            last = _char_to_token(encoding, end - 3)
    if beg is None or last is None:
        return []
    return list(range(beg, last + 1))


def _entity_tokens(encoding: Any, spans: list[list[Span]]) -> list[list[int]]:
    # Union of the spans' tokens, sorted: the non-zero columns of the official positive-map row.
    return [sorted({t for start, end in entity for t in _span_tokens(encoding, start, end)}) for entity in spans]


def _describe(caption: str, spans: list[list[Span]], indices: list[int], limit: int = 5) -> str:
    shown = ", ".join(f"#{i} {[caption[s:e] for s, e in spans[i]]!r}" for i in indices[:limit])
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return shown + more


def spans_to_tokens(
    tokenizer: Any,
    prompt: str,
    spans: Sequence[Sequence[Span]],
    max_length: int | None = 256,
    warn: bool = True,
) -> EntityTokens:
    """Map each entity's character spans to the token indices they cover (official rule, see module docstring).

    Args:
        tokenizer: a fast Hugging Face tokenizer (BERT uncased for the official models).
        prompt: the caption / detection prompt.
        spans: for each entity, a list of ``(start, end)`` character spans of ``prompt`` (end exclusive).
        max_length: tokenize with truncation to this many tokens (the model's 256), as the official training code
            does; tokens past it cannot be scored by the model, so entities cut by it are reported in
            ``truncated``. ``None`` tokenizes without truncation (the official evaluation code does that, and
            crashes later when an index passes 255 — docs/official_model.md#quirks item 10; chunk the classes
            instead).
        warn: emit a :class:`UserWarning` naming the unmapped and truncated entities.

    Returns:
        An :class:`EntityTokens` (a ``list[list[int]]``, one sorted token-index list per entity, ``[]`` for an entity
        that cannot be mapped) carrying the ``unmapped`` / ``truncated`` / ``empty`` report.
    """
    _require_fast(tokenizer)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    checked = _check_spans(prompt, spans)
    full = tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)
    n_full = len(full["input_ids"])
    if max_length is None or n_full <= max_length:
        encoding = full
    else:
        encoding = tokenizer(prompt, add_special_tokens=True, max_length=max_length, truncation=True)

    result = EntityTokens(_entity_tokens(encoding, checked))
    result.empty = [i for i, entity in enumerate(checked) if not entity]
    result.unmapped = [i for i, (entity, toks) in enumerate(zip(checked, result)) if entity and not toks]
    result.num_tokens = len(encoding["input_ids"])
    result.num_tokens_untruncated = n_full
    if encoding is full:
        result.truncated = []
    else:
        untruncated = _entity_tokens(full, checked)
        result.truncated = [i for i, (a, b) in enumerate(zip(result, untruncated)) if a != b]

    if warn and result.truncated:
        warnings.warn(
            f"spans_to_tokens: the caption has {n_full} tokens, truncated to {max_length}; "
            f"{len(result.truncated)} of {len(checked)} entities lose tokens: "
            f"{_describe(prompt, checked, result.truncated)}",
            stacklevel=2,
        )
    not_by_truncation = [i for i in result.unmapped if i not in result.truncated]
    if warn and not_by_truncation:
        warnings.warn(
            f"spans_to_tokens: {len(not_by_truncation)} of {len(checked)} entities map to no token "
            f"(their spans cover no tokenized character): {_describe(prompt, checked, not_by_truncation)}",
            stacklevel=2,
        )
    return result


#: The statuses of an unreadable phrase (:func:`check_phrases`), in the words skip reports and errors use.
PHRASE_PROBLEMS = {
    "no_token": "phrase maps to no token",
    "unknown_only": "phrase is only unknown tokens",
    "beyond_limit": "phrase beyond the text limit",
}


@dataclass
class PhraseCheck:
    """Whether the model can read each phrase of a text: the result of :func:`check_phrases`.

    Attributes:
        tokens: per phrase, its token indices in the untruncated tokenization (``[]`` when it maps to none).
        status: per phrase ``"ok"`` or the first problem that applies, in this order: ``"no_token"`` (its spans
            cover no token), ``"unknown_only"`` (every token is the tokenizer's unknown token, e.g. an emoji for
            BERT's vocabulary), ``"beyond_limit"`` (a token at or past ``max_length``, which the model never sees).
        max_length: the text limit checked.
        unk_token: the tokenizer's unknown token (for messages).
    """

    tokens: list[list[int]]
    status: list[str]
    max_length: int
    unk_token: str | None = None

    @property
    def ok(self) -> bool:
        """Every phrase is readable."""
        return all(s == "ok" for s in self.status)

    def unreadable(self) -> list[int]:
        """Indices of the phrases the model cannot read."""
        return [i for i, s in enumerate(self.status) if s != "ok"]

    def error(self, names: Sequence[str], text: str) -> str:
        """One line naming every unreadable phrase (``names``: the phrases' names) by its problem ('' when none)."""
        parts = []
        for status, template in (
            ("no_token", "these phrases map to no tokens of {text!r}: {names}"),
            ("unknown_only", "these phrases tokenize to nothing but the unknown token {unk!r}, so the model cannot "
                             "read them: {names}"),
            ("beyond_limit", "phrases beyond the {limit}-token limit of {text!r}: {names}"),
        ):
            bad = [names[i] for i, s in enumerate(self.status) if s == status]
            if bad:
                parts.append(template.format(text=text, names=bad, unk=self.unk_token, limit=self.max_length))
        return "; ".join(parts)


def check_phrases(tokenizer: Any, text: str, spans: Sequence[Sequence[Span]], *,
                  max_length: int = 256) -> PhraseCheck:
    """The one readability rule of phrases: can the model read each entity of ``text`` (its character ``spans``)?

    The text is tokenized without truncation and each entity mapped to tokens with the official rule of
    :func:`spans_to_tokens`; a phrase is readable when it maps to at least one token, not all of them the unknown
    token, and none at or beyond ``max_length`` (the model's 256).

    Returns:
        a :class:`PhraseCheck` (tokens and a status per phrase).
    """
    tokens = spans_to_tokens(tokenizer, text, spans, max_length=None, warn=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"] if unk is not None \
        else None
    status = []
    for t in tokens:
        if not t:
            status.append("no_token")
        elif ids is not None and all(ids[j] == unk for j in t):
            status.append("unknown_only")
        elif max(t) >= max_length:
            status.append("beyond_limit")
        else:
            status.append("ok")
    return PhraseCheck([list(t) for t in tokens], status, int(max_length), getattr(tokenizer, "unk_token", None))


def label_to_tokens(
    tokenizer: Any,
    prompt: str,
    spans: Sequence[Sequence[Span]],
    plus: int = 1,
    max_length: int | None = 256,
    warn: bool = True,
) -> dict[int, list[int]]:
    """The inference map ``{label: [token indices]}`` (official ``positive_map_label_to_token``).

    Entity ``i`` gets label ``i + plus``; GLIP's VLDyHead uses ``plus=1`` (labels start at 1). Every entity has a
    key, with ``[]`` when it cannot be mapped (reported as in :func:`spans_to_tokens`).
    """
    token_lists = spans_to_tokens(tokenizer, prompt, spans, max_length=max_length, warn=warn)
    return {i + plus: list(tokens) for i, tokens in enumerate(token_lists)}


def build_positive_map(
    tokenizer: Any,
    caption: str,
    tokens_positive: Sequence[Sequence[Span]],
    max_len: int = 256,
    warn: bool = True,
) -> torch.Tensor:
    """The training positive map: ``(K, max_len)`` bool, row ``k`` True on the tokens box ``k`` grounds to.

    The caption is tokenized with truncation to ``max_len`` (official training, docs/official_model.md#positive-maps).
    The official dataset normalises rows to sum 1 and its collator re-binarises them
    (docs/official_model.md#quirks item 9), so the targets the loss sees are exactly this boolean map. A box whose
    spans cannot be mapped (or were truncated away) gets an all-False row and is reported (see
    :func:`spans_to_tokens`).

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        caption: the caption.
        tokens_positive: for each of the K boxes, its list of ``(start, end)`` character spans.
        max_len: the text length of the model (columns of the map).

    Returns:
        ``(K, max_len)`` bool tensor.
    """
    token_lists = spans_to_tokens(tokenizer, caption, tokens_positive, max_length=max_len, warn=warn)
    positive_map = torch.zeros((len(token_lists), max_len), dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        if tokens:
            positive_map[row, tokens] = True
    return positive_map
