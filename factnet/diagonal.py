"""Diagonal increments by thin products and per-slice scalings.

A `diagonal` `factnet.increment.Increment` (core ``(m_in, m_out, α)``, the diagonals of its ``α x α``
blocks, and an optional output scaling ``out_scale: (m_in, d_out)``) never forms an ``α x α`` core: its
``s · x ΔWᵀ`` runs as ``u = x P_in``, ``h = u ⊙ core``, ``z = h P_out``, ``z ⊙ out_scale`` through autograd, or
through its dense ``ΔW`` where that costs fewer multiply-adds (`diagonal_rows`); its dropout drops the rows it
reads (`dropout_mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from factnet.increment import Increment, diagonal_delta
from factnet.products import times, times_t

__all__ = ["builds_delta", "diagonal_rows", "dropout_mask"]


def diagonal_rows(rows: Tensor, increment: Increment, scale: float, mask: Tensor | None = None) -> Tensor:
    """``s · rows ΔWᵀ: (N, d_in) → (N, d_out)`` of a `diagonal` increment, by thin products and per-slice
    scalings through autograd (``mask: (N, d_in)``: dropout on the rows this increment reads, already scaled;
    as PEFT's LoRA and VeRA drop their input, not the factor space, which is the wider one here).

    ``u = x P_in`` per input block, ``h = u ⊙ core`` (input blocks summed before ``P_out`` unless each has an
    output scaling of its own), ``z = h P_out``, ``z ⊙ out_scale``: the products PEFT's VeRA runs. Where building
    the dense ``ΔW`` (``d_out·α·d_in``) and applying it (``N·d_in·d_out``) costs fewer multiply-adds than those
    thin products (``N·α·(d_in + d_out)``: a rank above the matrix side and more rows than its side), it does that
    instead, autograd through the build; both are exact."""
    n, (m_in, m_out, alpha) = rows.shape[0], increment.core.shape
    if mask is not None:
        rows = rows * mask
    if builds_delta(increment, n):
        return F.linear(rows, diagonal_delta(increment)).mul_(scale)
    u = times_t(rows, increment.a_t, m_in).view(n, m_in, alpha)
    core = increment.core * scale
    own_scales = increment.out_scale is not None and m_in > 1
    if m_in == 1:
        h = u * core[0]  # (N, m_out, α): output block q weighs the rank by its own diagonal
    elif own_scales:
        h = u * core[:, 0]  # (N, m_in, α): input block p meets its own output scaling
    else:
        h = (u * core[:, 0]).sum(1, keepdim=True)  # (N, 1, α): the input blocks summed, one output product
    if own_scales:
        z = torch.mm(h.reshape(n * m_in, alpha), increment.b_t[0]).view(n, m_in, -1)
        return (z * increment.out_scale).sum(1)
    z = times(h.reshape(n, -1), increment.b_t, m_out)
    return z if increment.out_scale is None else z * increment.out_scale[0]


def builds_delta(increment: Increment, rows: int) -> bool:
    """Whether `diagonal_rows` costs fewer multiply-adds through the dense ``ΔW`` than by thin products."""
    m_in, _, alpha = increment.core.shape
    d_in, d_out = increment.m_in * increment.a_t.shape[2], increment.m_out * increment.b_t.shape[2]
    outputs = m_in if increment.out_scale is not None and m_in > 1 else 1  # output products (one per input block)
    return d_out * alpha * d_in + rows * d_in * d_out < rows * alpha * (d_in + d_out * outputs)


def dropout_mask(rows: int, width: int, dropout: float, like: Tensor) -> Tensor:
    """A ``(rows, width)`` dropout mask for the rows a diagonal increment reads, kept entries ``1 / (1 - dropout)``
    (uniform draws: 3x faster than ``bernoulli_`` here, and as seeded)."""
    keep = 1.0 - dropout
    return torch.rand(rows, width, dtype=like.dtype, device=like.device).lt_(keep).div_(keep)
