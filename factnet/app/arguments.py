"""Argument types of the ``factnet`` command line: a bad value is an argparse error (one line, exit status 2)."""

from __future__ import annotations

import argparse
import math

__all__ = ["finite_float", "float_list", "int_list", "nonnegative_float", "nonnegative_int", "positive_float",
           "positive_int"]


def number(text: str, kind: type, minimum: float | None = None) -> int | float:
    """``text`` as a finite ``kind`` (int or float), at least ``minimum``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or (minimum is not None and value < minimum):
        what = "an integer" if kind is int else "a finite number"
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise argparse.ArgumentTypeError(f"expected {what}{bound}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return number(text, int, 1)


def nonnegative_int(text: str) -> int:
    return number(text, int, 0)


def nonnegative_float(text: str) -> float:
    return number(text, float, 0)


def positive_float(text: str) -> float:
    value = number(text, float, 0)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return number(text, float)


def int_list(text: str) -> list[int]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (positive integers)."""
    return [positive_int(item) for item in items(text)]


def float_list(text: str) -> list[float]:
    """``"0.1,1,10"`` -> ``[0.1, 1.0, 10.0]`` (finite numbers)."""
    return [finite_float(item) for item in items(text)]


def items(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list such as 2,4,8, got {text!r}")
    return items
