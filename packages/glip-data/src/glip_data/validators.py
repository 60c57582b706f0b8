"""Value checks shared by every command-line option (``glip`` and ``glip-data``) and every config (training runs,
evaluation protocols): one rule and one message per kind of value.

Config checks raise ``error`` (a ``ValueError`` subclass of the caller's, e.g. ``ConfigError``) with the message
``"<name>: must be ...; got <value>"``. The argparse types at the end check command-line text with the same rules;
argparse prefixes their message with the option (``argument --batch-size: must be >= 1, got 0``).

A leaf module: it imports nothing from glip, so option parsing stays instant.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Collection
from typing import Any

__all__ = [
    "NONE_WORDS",
    "check_choice",
    "check_int",
    "check_number",
    "non_negative_int",
    "optional_positive_int",
    "positive_int",
    "probability",
]

#: the words that mean "no value" in every key=value override and every option that takes ``none``
NONE_WORDS = ("none", "null", "~")


def check_int(value: Any, name: str, *, low: int = 1, error: type[ValueError] = ValueError) -> int:
    """``value`` must be an ``int`` (not a bool) ``>= low``; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"{name}: must be an integer >= {low}; got {value!r}")
    return value


def check_number(value: Any, name: str, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                 error: type[ValueError] = ValueError) -> float:
    """``value`` must be a finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``); returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"{name}: must be a finite number; got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise error(f"{name}: must be in {bound}; got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Collection[Any], *, error: type[ValueError] = ValueError) -> Any:
    """``value`` must be one of ``choices``; returns it."""
    if value not in choices:
        raise error(f"{name}: must be one of {tuple(choices)}; got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# argparse types: text -> value, the same rules as above


def _int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0)


def optional_positive_int(text: str) -> int | None:
    """An integer >= 1, or one of :data:`NONE_WORDS` for "no limit"."""
    return None if text.strip().lower() in NONE_WORDS else _int(text, 1)


def probability(text: str) -> float:
    """A score in [0, 1] (thresholds, IoUs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a score in [0, 1], got {text}")
    return value
