"""Low-bit values: ``b``-bit codes with a float16 scale (and offset) per group of values, packed into bytes.

A tensor is read flat, in groups of ``group`` consecutive values (the last group may be shorter), and
each group is stored as ``b``-bit codes ``c`` plus float16 constants:

- ``b = 1``: ``value = scale · (2c − 1)``, ``scale = mean |x|`` over the group (sign binarization, as
  binary adapters store their weights);
- ``b ∈ {2, 4, 8}``: ``value = offset + scale · c``, ``c ∈ {0, …, 2ᵇ − 1}``, ``offset = min x`` and
  ``scale = (max x − min x) / (2ᵇ − 1)`` (asymmetric uniform: every level inside the group's range).

Values are rebuilt in float32 from the stored float16 constants, so the forward of a model trained with
`fake_quantize` and the values read back from a file are the same bits. ``codes`` pack ``8 / b`` to a
byte, so a tensor of ``n`` values takes ``⌈n·b/8⌉`` bytes plus 2 (``b = 1``) or 4 bytes per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from factnet.errors import FactnetError

__all__ = ["BITS", "Quantized", "check_bits", "dequantize", "fake_quantize", "quantize", "stored_bytes"]

BITS = (1, 2, 4, 8)


def check_bits(bits: object, group: object = 64) -> None:
    """Raise `FactnetError` unless ``bits`` is one of `BITS` and ``group`` a positive int."""
    if isinstance(bits, bool) or bits not in BITS:
        raise FactnetError(f"bits must be one of {', '.join(map(str, BITS))} (or None for full precision), got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise FactnetError(f"the quantization group must be a positive number of values, got {group!r}")


@dataclass(frozen=True)
class Quantized:
    """A tensor of ``shape`` as packed ``codes: (⌈n·bits/8⌉,) uint8`` and per-group ``scale`` (and, for
    ``bits > 1``, ``offset``) ``: (⌈n/group⌉,) float16``."""

    codes: Tensor
    scale: Tensor
    offset: Tensor | None
    shape: tuple[int, ...]
    bits: int
    group: int


def _groups(x: Tensor, group: int) -> tuple[Tensor, int]:
    """``x`` flat in float32, zero-padded to whole groups, as ``(groups, group)``; and its length. (A group
    longer than ``x`` is ``x``: one group either way.)"""
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    group = max(1, min(group, n))
    padded = torch.nn.functional.pad(flat, (0, -n % group))
    return padded.reshape(-1, group), n


def _constants(rows: Tensor, n: int, bits: int, group: int) -> tuple[Tensor, Tensor | None]:
    """Each group's float16 scale (and offset), computed over its real values only."""
    valid = (torch.arange(rows.numel(), device=rows.device) < n).reshape(rows.shape)
    counts = valid.sum(1).clamp_min(1)
    if bits == 1:
        return ((rows.abs() * valid).sum(1) / counts).to(torch.float16), None
    low = torch.where(valid, rows, torch.inf).amin(1)
    high = torch.where(valid, rows, -torch.inf).amax(1)
    offset = low.to(torch.float16)
    scale = ((high - offset.float()) / (2**bits - 1)).to(torch.float16)
    return scale, offset


def _levels(rows: Tensor, scale: Tensor, offset: Tensor | None, bits: int) -> Tensor:
    """The codes of ``rows`` under the stored constants, ``(groups, group)`` int64."""
    if bits == 1:
        return (rows >= 0).long()
    step = scale.float()[:, None]
    codes = torch.where(step > 0, torch.round((rows - offset.float()[:, None]) / step.clamp_min(1e-30)), 0)
    return codes.clamp(0, 2**bits - 1).long()


def _values(codes: Tensor, scale: Tensor, offset: Tensor | None, bits: int) -> Tensor:
    """float32 values of ``codes: (groups, group)``."""
    if bits == 1:
        return scale.float()[:, None] * (2 * codes - 1).float()
    return offset.float()[:, None] + scale.float()[:, None] * codes.float()


def quantize(x: Tensor, bits: int, group: int = 64) -> Quantized:
    """``x`` as ``bits``-bit codes with per-group constants (see the module doc)."""
    check_bits(bits, group)
    rows, n = _groups(x, group)
    scale, offset = _constants(rows, n, bits, group)
    codes = _levels(rows, scale, offset, bits).reshape(-1)[:n]
    return Quantized(_pack(codes, bits), scale, offset, tuple(x.shape), bits, group)


def dequantize(q: Quantized) -> Tensor:
    """The float32 values of ``q``, shaped as the tensor it came from (nothing larger is allocated)."""
    n = math.prod(q.shape)
    codes = _unpack(q.codes, q.bits, n)
    which = torch.arange(n, device=codes.device) // q.group
    offset = None if q.offset is None else q.offset[which]
    return _values(codes[:, None], q.scale[which], offset, q.bits).reshape(q.shape)


def fake_quantize(x: Tensor, bits: int, group: int = 64) -> Tensor:
    """The values ``x`` would be stored as (exactly `dequantize(quantize(x))`, in ``x``'s dtype), with a
    straight-through gradient: training sees the stored values in the forward and updates ``x``."""
    check_bits(bits, group)
    rows, n = _groups(x, group)
    scale, offset = _constants(rows, n, bits, group)
    stored = _values(_levels(rows, scale, offset, bits), scale, offset, bits).reshape(-1)[:n].reshape(x.shape)
    return _StraightThrough.apply(x, stored.to(x.dtype))


class _StraightThrough(torch.autograd.Function):
    """Forward: ``stored`` exactly (``x + (stored − x)`` would round); backward: the gradient to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, stored: Tensor) -> Tensor:  # type: ignore[override]
        return stored

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def stored_bytes(numel: int, bits: int, group: int = 64) -> int:
    """Bytes of a quantized tensor of ``numel`` values: codes plus float16 constants."""
    groups = -(-numel // group)
    return -(-numel * bits // 8) + groups * (2 if bits == 1 else 4)


def _pack(codes: Tensor, bits: int) -> Tensor:
    """``codes`` (values < 2ᵇ) packed ``8 / bits`` to a byte, first code in the lowest bits."""
    per = 8 // bits
    padded = torch.nn.functional.pad(codes, (0, -codes.numel() % per)).reshape(-1, per)
    shifts = torch.arange(per, device=codes.device) * bits
    return (padded << shifts).sum(1).to(torch.uint8)


def _unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device) * bits
    return ((packed.long()[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:n]
