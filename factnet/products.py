"""The thin matrix products the kernel is made of, each run the way it measures fastest here.

``x: (N, m·d)`` is a batch of rows cut into ``m`` blocks; a projection ``p_t: (g, r, d)`` is stored
rank-major, one per block (``g == m``) or shared by all (``g == 1``). Where an exact product has more
than one BLAS formulation (``x Pᵀ`` as NT, NN or TN; the long ``Σ_n`` reductions as one TN GEMM, split
per thread, or transposed), `factnet.autotune` times them on the operands once per shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from factnet import autotune

__all__ = ["add_times", "outer", "scaled_mm", "times", "times_t"]


def scaled_mm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale · a b`` in one BLAS call (``addmm`` with ``beta=0`` reads nothing of its input)."""
    return torch.addmm(_zero(a), a, b, beta=0, alpha=scale)


def _zero(a: Tensor) -> Tensor:
    """A 0-d zero of ``a``'s dtype and device (the ignored input of ``beta=0`` products), made once."""
    key = (a.dtype, a.device)
    zero = _ZERO.get(key)
    if zero is None:
        zero = _ZERO[key] = a.new_zeros(())
    return zero


_ZERO: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def times_t(x: Tensor, p_t: Tensor, m: int) -> Tensor:
    """Per block ``x_p @ p_t[p]ᵀ``: ``(N, m·d) × (g, α, d) → (N, m·α)`` (the layout measured fastest)."""
    n = x.shape[0]
    if p_t.shape[0] == 1:
        flat, p = (x if m == 1 else x.reshape(n * m, -1)), p_t[0]
        key = (flat.shape, flat.stride(), p.shape, x.dtype)
        name = autotune.choice("times_t", key)
        if name is None:
            name = autotune.measure("times_t", key, {v: _bind(f, flat, p) for v, f in _TIMES_T.items()}, (flat, p))
        out = _TIMES_T[name](flat, p)
        return out if m == 1 else out.reshape(n, -1)
    return torch.bmm(x.reshape(n, m, -1).transpose(0, 1), p_t.transpose(1, 2)).transpose(0, 1).reshape(n, -1)


_TIMES_T = {
    "nt": lambda x, p: F.linear(x, p),  # x @ pᵀ with p (α, d) as stored
    "nn": lambda x, p: torch.mm(x, p.t().contiguous()),  # on a (d, α) copy
    "tn": lambda x, p: torch.mm(p, x.t()).t(),  # (p xᵀ)ᵀ: a transposed (α, N) result
}


def _bind(f, *args):
    return lambda: f(*args)


def times(r: Tensor, p_t: Tensor, m: int) -> Tensor:
    """Per block ``r_p @ p_t[p]``: ``(N, m·α) × (g, α, d) → (N, m·d)``."""
    n = r.shape[0]
    if p_t.shape[0] == 1:
        return torch.mm(r, p_t[0]) if m == 1 else torch.mm(r.reshape(n * m, -1), p_t[0]).reshape(n, -1)
    return torch.bmm(r.reshape(n, m, -1).transpose(0, 1), p_t).transpose(0, 1).reshape(n, -1)


def add_times(out: Tensor, r: Tensor, p_t: Tensor, m: int, alpha: float = 1.0) -> None:
    """``out += alpha · r ⊗ p_t`` per block, in place (one ``addmm`` pass when the projection is shared)."""
    if m == 1:
        (out if out.dim() == 2 else out.view(r.shape[0], -1)).addmm_(r, p_t[0], alpha=alpha)
    elif p_t.shape[0] == 1:
        out.view(r.shape[0] * m, -1).addmm_(r.reshape(r.shape[0] * m, -1), p_t[0], alpha=alpha)
    else:
        out.add_(times(r, p_t, m).view_as(out), alpha=alpha)


def outer(r: Tensor, x: Tensor, m: int, groups: int, alpha: float = 1.0) -> Tensor:
    """``alpha · Σ_n r_pᵀ x_p`` per projection: ``(N, m·α), (N, m·d) → (g, α, d)`` (rank-major).

    The contraction over ``N`` is long and the output tiny; how BLAS runs that best (one TN GEMM, the
    rows split into one chunk per thread, batched and summed, or ``(xᵀ r)ᵀ``) depends on the machine,
    so it is measured once per shape (`factnet.autotune`, op ``outer``).
    """
    n = r.shape[0]
    if groups > 1:
        return _bmm(r.reshape(n, m, -1).permute(1, 2, 0), x.reshape(n, m, -1).transpose(0, 1), alpha)
    if m > 1:
        r, x = r.reshape(n * m, -1), x.reshape(n * m, -1)
    key = (r.shape, r.stride(), x.shape, x.stride(), r.dtype)
    name = autotune.choice("outer", key)
    if name is None:
        name = autotune.measure("outer", key, {v: _bind(f, r, x, alpha) for v, f in _OUTER.items()}, (r, x))
    return _OUTER[name](r, x, alpha).unsqueeze(0)


def _mm(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    return torch.mm(a, b) if alpha == 1.0 else scaled_mm(a, b, alpha)


def _bmm(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    return torch.bmm(a, b) if alpha == 1.0 else torch.baddbmm(_zero(a), a, b, beta=0, alpha=alpha)


def _outer_chunked(r: Tensor, x: Tensor, alpha: float) -> Tensor:
    """``alpha · rᵀ x`` with the rows split into one chunk per thread, batched and summed."""
    rows, chunks = r.shape[0], torch.get_num_threads()
    if chunks < 2 or rows < 64 * chunks:
        return _mm(r.t(), x, alpha)
    even = rows // chunks * chunks
    total = _bmm(r[:even].reshape(chunks, -1, r.shape[1]).transpose(1, 2),
                 x[:even].reshape(chunks, -1, x.shape[1]), alpha).sum(0)
    if even < rows:
        total.addmm_(r[even:].t(), x[even:], alpha=alpha)
    return total


_OUTER = {
    "chunked": _outer_chunked,
    "mm": lambda r, x, alpha: _mm(r.t(), x, alpha),
    "tn": lambda r, x, alpha: _mm(x.t(), r, alpha).t(),
}
