"""Low-bit tensors as a file stores them: a tensor of ``count`` values in ``b`` bits is its packed codes
(``uint8``), a float16 scale per ``group`` values and, above 1 bit, a float16 offset per group
(`factnet.quant`). Version 3 stored each part as its own tensor, ``<name>.codes``, ``<name>.scale``,
``<name>.offset``; version 4 puts them in the packs of their dtypes (`factnet.file.packs`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from factnet.file.validate import malformed
from factnet.quant import Quantized, dequantize, quantize

__all__ = ["code_parts", "from_codes", "low_bit_values", "to_codes"]


def code_parts(count: int, width: int, group: int) -> dict[str, tuple[torch.dtype, int]]:
    """``{part: (dtype, values)}`` of a tensor of ``count`` values stored in ``width`` bits, ``group`` values a
    scale: ``codes``, ``scale`` and (above 1 bit) ``offset``, in the order a file stores them."""
    groups = -(-count // group)
    parts = {"codes": (torch.uint8, -(-count * width // 8)), "scale": (torch.float16, groups)}
    return parts | ({} if width == 1 else {"offset": (torch.float16, groups)})


def to_codes(value: Tensor, width: int, group: int) -> dict[str, Tensor]:
    """The parts of `code_parts` that store ``value`` in ``width`` bits, each flat."""
    q = quantize(value, width, group)
    return {"codes": q.codes, "scale": q.scale} | ({} if q.offset is None else {"offset": q.offset})


def from_codes(parts: Mapping[str, Tensor], shape: tuple[int, ...], width: int, group: int) -> Tensor:
    """The float32 values of shape ``shape`` that the parts of `code_parts` store."""
    return dequantize(Quantized(parts["codes"], parts["scale"], parts.get("offset"), tuple(shape), width, group))


def low_bit_values(bits: Mapping[str, Any], shapes: Mapping[str, list[int]], tensors: dict[str, Tensor],
                   name: str) -> dict[str, Tensor]:
    """Version 3: ``tensors`` with each low-bit tensor of ``shapes`` (its codes and constants, in ``bits``:
    ``{"factors": b | None, "head": b | None, "group": values per scale}``) turned back into its float32 values,
    after checking that they hold exactly the values its shape says (so nothing larger than the file's own
    codes is ever allocated)."""
    found = dict(tensors)
    for key, shape in shapes.items():
        width, group = bits[key.partition(".")[0]], bits["group"]
        parts = {}
        for part, (dtype, size) in code_parts(math.prod(shape), width, group).items():
            value = found.pop(f"{key}.{part}", None)
            if value is None or value.dtype != dtype or tuple(value.shape) != (size,):
                got = "missing" if value is None else f"{value.dtype} {tuple(value.shape)}"
                raise malformed(name, f"low-bit tensor {key!r} {shape} needs {part} of {dtype} ({size},), got {got}")
            parts[part] = value
        found[key] = from_codes(parts, tuple(shape), width, group)
    return found
