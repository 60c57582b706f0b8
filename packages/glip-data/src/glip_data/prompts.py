"""Detection prompts: category names -> one caption with the character span of every name.

GLIP treats detection as grounding: the class vocabulary is written out as a caption such as
``"person. bicycle. car"`` and each class is grounded to the tokens of its name. This module builds that caption
exactly as the official evaluation code does (docs/official_model.md#prompts) and splits long vocabularies into
chunks that fit the text encoder (docs/official_model.md#chunking, docs/official_model.md#quirks item 10).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

Span = tuple[int, int]

# Greedy on purpose: the official regex removes everything from the first "(" to the LAST ")" of a name.
_PARENTHESISED = re.compile(r"\(.*\)")


def clean_name(name: str) -> str:
    """Clean one category name the way the official GLIP code does.

    Three steps, in this order and nothing more: remove a parenthesised part with the *greedy* regex ``\\(.*\\)``,
    replace every ``_`` by a space, then replace double spaces by single ones in one left-to-right pass (so three
    spaces become two). Leading/trailing spaces are kept: LVIS ``bow_(weapon)`` becomes ``"bow "`` and
    ``__background__`` becomes ``" background "``, exactly as in the official prompts.

    Examples:
        >>> clean_name("aerosol_can")
        'aerosol can'
        >>> clean_name("bow_(weapon)")
        'bow '
    """
    if not isinstance(name, str):
        raise TypeError(f"category name must be a str, got {type(name).__name__}: {name!r}")
    name = _PARENTHESISED.sub("", name)
    name = name.replace("_", " ")
    # str.replace scans left to right without overlaps, exactly like the official re.sub("  ", " ", name).
    return name.replace("  ", " ")


def _check_names(names: Any) -> list[str]:
    if isinstance(names, str):
        raise TypeError(
            f"names must be a sequence of category names, got the single string {names!r}; "
            "pass a list such as ['person', 'car']"
        )
    names = list(names)
    if not names:
        raise ValueError("names is empty: a detection prompt needs at least one category name")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"names[{i}] must be a str, got {type(name).__name__}: {name!r}")
    return names


def detection_prompt(names: Sequence[str], separator: str = ". ") -> tuple[str, list[list[Span]]]:
    """Build the detection prompt for a list of category names.

    Each name is cleaned with :func:`clean_name`; the cleaned names are joined by ``separator`` with no trailing
    separator, no prefix and no background entry (the official evaluation prompt, docs/official_model.md#prompts).

    The span of a class is the character range of its *cleaned* name as it sits in the prompt, spaces left by the
    cleaning included: ``["bow_(weapon)", "arrow"]`` gives ``"bow . arrow"`` with spans ``[[(0, 4)], [(6, 11)]]``.
    That is what the official code records; the span→token fallbacks (:func:`glip_data.spans_to_tokens`) then skip
    the space, so the class still maps to the token ``bow``.

    Args:
        names: category names in label order (label ``i`` is ``names[i]``).
        separator: text between two names; GLIP's ``DATASETS.SEPARATION_TOKENS`` is ``". "``.

    Returns:
        ``(prompt, spans)`` where ``spans[i] == [(start, end)]`` (end exclusive) locates name ``i`` in ``prompt``.

    Raises:
        TypeError: ``names`` is a single string or holds a non-string.
        ValueError: ``names`` is empty, or a name cleans to nothing but spaces (e.g. ``"(unknown)"``), which could
            never be grounded.
    """
    names = _check_names(names)
    if not isinstance(separator, str):
        raise TypeError(f"separator must be a str, got {type(separator).__name__}")
    parts: list[str] = []
    spans: list[list[Span]] = []
    cursor = 0
    for i, name in enumerate(names):
        cleaned = clean_name(name)
        if not cleaned.strip():
            raise ValueError(
                f"category name {i} ({name!r}) is empty after cleaning ({cleaned!r}); it cannot be put in a prompt"
            )
        if i > 0:
            parts.append(separator)
            cursor += len(separator)
        spans.append([(cursor, cursor + len(cleaned))])
        parts.append(cleaned)
        cursor += len(cleaned)
    return "".join(parts), spans


def _num_tokens(tokenizer: Any, text: str) -> int:
    """Length of ``text`` tokenized with the special tokens ([CLS] ... [SEP]) and no truncation."""
    return len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


def chunk_classes(
    names: Sequence[str],
    tokenizer: Any,
    max_classes: int | None = 40,
    max_tokens: int = 256,
    separator: str = ". ",
) -> list[list[int]]:
    """Split a class vocabulary into consecutive chunks whose prompts fit the text encoder.

    Chunks are filled greedily in order: a class joins the current chunk while the chunk has fewer than
    ``max_classes`` classes *and* the chunk's whole prompt (:func:`detection_prompt` with ``separator``) tokenizes to
    at most ``max_tokens`` tokens, [CLS] and [SEP] included. A name is never split across chunks. The token count is
    measured on the real prompt, not estimated, so a chunk's prompt is guaranteed to fit.

    The official LVIS protocol is ``max_classes=40`` (1203 classes → 31 chunks); its prompts are far below 256
    tokens, so the token limit only matters for long names or larger chunks. Results of chunked evaluation depend
    on the chunk size (each chunk is NMS'd and capped separately), so report it with the numbers.

    Args:
        names: category names (raw; they are cleaned as in the prompt).
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text)``).
        max_classes: most classes per chunk; ``None`` or ``<= 0`` means no class limit (COCO's
            ``CHUNKED_EVALUATION = -1``: one chunk while the tokens fit).
        max_tokens: most tokens per chunk prompt, special tokens included (the model's 256).
        separator: as in :func:`detection_prompt`.

    Returns:
        A list of chunks, each a list of indices into ``names``; concatenated, they are ``0..len(names)-1``.

    Raises:
        ValueError: a single class does not fit in ``max_tokens`` even alone (its index, name and token count are
            named). We raise rather than drop it: a silently missing class would score 0 AP without a trace.
    """
    names = _check_names(names)
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be at least 3 ([CLS], one token, [SEP]), got {max_tokens}")
    class_limit = max_classes if max_classes is not None and max_classes > 0 else len(names)

    chunks: list[list[int]] = []
    current: list[int] = []
    for i, name in enumerate(names):
        if current and len(current) < class_limit:
            prompt, _ = detection_prompt([names[j] for j in current + [i]], separator)
            if _num_tokens(tokenizer, prompt) <= max_tokens:
                current.append(i)
                continue
        if current:
            chunks.append(current)
        alone, _ = detection_prompt([name], separator)
        n_alone = _num_tokens(tokenizer, alone)
        if n_alone > max_tokens:
            raise ValueError(
                f"class {i} ({name!r}) needs {n_alone} tokens with [CLS]/[SEP], more than max_tokens={max_tokens}; "
                "shorten the name or raise max_tokens"
            )
        current = [i]
    chunks.append(current)
    return chunks
