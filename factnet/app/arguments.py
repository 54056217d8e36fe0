"""Argument types of the ``factnet`` command line: a bad value is an argparse error (one line, exit status 2)."""

from __future__ import annotations

import argparse
import ast
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["add_model_options", "finite_float", "float_list", "int_list", "model_kwargs", "nonnegative_float", "nonnegative_int",
           "positive_float", "positive_int"]


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


def model_kwargs(text: str) -> dict[str, Any]:
    """``"img_size=32,depths=(2, 2),global_pool=avg"`` (or a JSON object) -> keyword arguments for
    ``timm.create_model``: values are Python literals where they parse as one, else strings."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"invalid JSON in --model-kwargs: {error}") from None
    pieces, depth, start = [], 0, 0
    for position, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            pieces.append(text[start:position])
            start = position + 1
    pieces.append(text[start:])
    options: dict[str, Any] = {}
    for piece in pieces:
        key, equals, value = piece.partition("=")
        if not equals or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got {piece!r}")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --checkpoint, --model-kwargs: the model every command that loads one takes."""
    parser.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224")
    parser.add_argument("--checkpoint", type=Path, help="local weights file for the model (safetensors or .pth); "
                        "without it the model starts from random weights")
    parser.add_argument("--model-kwargs", type=model_kwargs, default={}, metavar="K=V,...",
                        help="extra timm.create_model arguments, e.g. img_size=32,patch_size=8,depth=2")
