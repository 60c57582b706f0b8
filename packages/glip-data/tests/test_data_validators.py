"""The value checks every option and config shares (glip_data.validators)."""
from __future__ import annotations

import argparse

import pytest

from glip_data.validators import (check_choice, check_int, check_number, non_negative_int, optional_positive_int,
                                  positive_int, probability)


class OwnError(ValueError):
    """A caller's error class (a config's)."""


def test_config_checks_name_the_field_and_the_value():
    assert check_int(3, "n") == 3 and check_int(0, "n", low=0) == 0
    for bad in (0, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"^n: must be an integer >= 1; got "):
            check_int(bad, "n")
    with pytest.raises(OwnError, match=r"^data.batch_size: must be an integer >= 1; got -1$"):
        check_int(-1, "data.batch_size", error=OwnError)
    assert check_number(1.0, "x", low=0.0, high=1.0, low_open=True) == 1.0
    with pytest.raises(ValueError, match=r"x: must be in \(0.0, 1.0\]; got 0.0"):
        check_number(0.0, "x", low=0.0, high=1.0, low_open=True)
    for bad in (float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="must be a finite number"):
            check_number(bad, "x")
    assert check_choice("a", "mode", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"mode: must be one of \('a', 'b'\); got 'c'"):
        check_choice("c", "mode", ("a", "b"))


def test_option_types():
    assert positive_int("4") == 4 and non_negative_int("0") == 0
    assert optional_positive_int("None") is None and optional_positive_int("~") is None
    assert optional_positive_int("2") == 2
    assert probability("0") == 0.0 and probability("1") == 1.0
    for fn, text, message in ((positive_int, "0", "must be >= 1, got 0"), (positive_int, "x", "'x' is not an integer"),
                              (non_negative_int, "-1", "must be >= 0, got -1"),
                              (probability, "1.5", "must be a score in [0, 1], got 1.5"),
                              (probability, "nan", "must be a score in [0, 1], got nan"),
                              (optional_positive_int, "0", "must be >= 1, got 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            fn(text)
