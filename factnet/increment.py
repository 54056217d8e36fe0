"""An increment in normal form, one group's share of a module's ``ΔW``, and its dense ``ΔW``.

A module's matrix ``W: (d_out, d_in)`` splits its input into ``m_in`` equal blocks and its
output into ``m_out`` (one of them is 1 unless the matrix is whole). An `Increment` is one
group's share of ``ΔW`` for that module:

    ΔW[(q, k), (p, j)] = Σ_αβ b_t[q, β, k] · core[(p, α), (q, β)] · a_t[p, α, j]

with ``a_t: (g_in, α, d_in / m_in)`` and ``b_t: (g_out, β, d_out / m_out)`` shared by all
blocks when ``g == 1`` (one GEMM on the reshaped activations) or one per block (``g == m``);
projections are stored rank-major (``a_t`` is ``P_inᵀ``). The dense ``ΔW`` (`delta_weight`) serves
merging and parametrized weights, ``W + s·ΔW`` (`effective_weight`) the kernel's merged GEMM (`factnet.kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Increment", "as_dense", "delta_weight", "diagonal_delta", "effective_weight"]


@dataclass(frozen=True)
class Increment:
    """One group's share of a module's ``ΔW`` in normal form; see the module docstring.

    ``a_t: (g_in, α, d_in/m_in)``, ``core: (m_in·α, m_out·β)``, ``b_t: (g_out, β, d_out/m_out)``.
    ``core=None`` is the identity (``m_in·α = m_out·β``): the core folded into a projection
    (`factnet.placement.cut`), two thin products a step as in LoRA; ``ΔW = b_t[0]ᵀ a_t[0]`` when
    ``m_in = m_out = 1``, block ``p`` of the hidden activations meeting block ``p`` of the other side
    otherwise (per-slice projections of a diagonal core, `factnet.placement`).

    A *diagonal* increment (`diagonal`) has ``core: (m_in, m_out, α)``, the diagonals of its
    ``α x α`` blocks (``α = β``), and may scale its output, ``out_scale: (m_in, d_out)`` (row ``p`` for
    input block ``p``): ``ΔW[:, p] = diag(out_scale[p]) Σ_q E_q b_t[q]ᵀ diag(core[p, q]) a_t[p]``. It runs by
    thin products and per-slice scalings, or through its dense ``ΔW`` where that costs less
    (`factnet.diagonal.diagonal_rows`).
    """

    a_t: Tensor
    core: Tensor | None
    b_t: Tensor
    m_in: int
    m_out: int
    out_scale: Tensor | None = None

    def tensors(self) -> tuple[Tensor, Tensor | None, Tensor]:
        return self.a_t, self.core, self.b_t

    @property
    def diagonal(self) -> bool:
        return self.out_scale is not None or (self.core is not None and self.core.dim() == 3)


def _left(increment: Increment) -> Tensor:
    """``L = P_out · coreᵀ`` per block: ``(d_out, m_in·α)``, so ``ΔW = L @ P_inᵀ`` block-wise."""
    _, core, b_t = increment.tensors()
    if core is None and increment.m_out > 1:  # block q of the hidden activations feeds output block q only
        return torch.block_diag(*b_t.expand(increment.m_out, -1, -1).transpose(1, 2).unbind(0))
    if core is None:  # folded: P_out itself
        return b_t[0].t()
    if increment.m_out == 1:  # one output block: a single (k, β) x (β, m_in·α) product, no copies
        return torch.mm(b_t[0].t(), core.t())
    beta = b_t.shape[1]
    blocks = core.reshape(core.shape[0], increment.m_out, beta).permute(1, 2, 0)  # (m_out, β, m_in·α)
    b_op = b_t.transpose(1, 2)  # (g_out, k, β)
    if b_op.shape[0] == 1:
        b_op = b_op.expand(increment.m_out, -1, -1)
    return torch.bmm(b_op, blocks).reshape(-1, core.shape[0])


def as_dense(increment: Increment) -> Increment:
    """A `diagonal` increment with its core as the dense ``(m_in·α, m_out·α)`` matrix (its output scaling kept)."""
    m_in, m_out, alpha = increment.core.shape
    blocks = torch.diag_embed(increment.core)  # (m_in, m_out, α, α)
    core = blocks.permute(0, 2, 1, 3).reshape(m_in * alpha, m_out * alpha)
    return Increment(increment.a_t, core, increment.b_t, m_in, m_out, increment.out_scale)


def effective_weight(weight: Tensor, increments: list[Increment], scale: float) -> Tensor:
    """``W + s·Σ ΔW`` as a new ``(d_out, d_in)`` tensor, one ``addmm`` pass over ``W`` each."""
    # a transposed layout (Conv1D's weight) is kept for the base's GEMM; a diagonal increment has its own ΔW
    if not weight.is_contiguous() or any(inc.diagonal for inc in increments):
        return weight + scale * sum(delta_weight(inc) for inc in increments) if increments else weight
    result = weight
    for inc in increments:
        a_t = inc.a_t
        if a_t.shape[0] > 1:  # a projection per input block: contract block by block
            result = result + scale * _delta_by_blocks(inc)
            continue
        left = _left(inc).reshape(-1, a_t.shape[1])  # rows (q, k, p) of ΔW viewed (d_out·m_in, d)
        rows = result.reshape(left.shape[0], a_t.shape[2])
        if result is weight:
            result = torch.addmm(rows, left, a_t[0], alpha=scale).reshape(weight.shape)
        else:
            rows.addmm_(left, a_t[0], alpha=scale)
    return result


def delta_weight(increment: Increment) -> Tensor:
    """Dense ``ΔW: (d_out, d_in)`` of one increment (for merge and parametrized weights)."""
    if increment.diagonal:
        return diagonal_delta(increment)
    if increment.a_t.shape[0] > 1:
        return _delta_by_blocks(increment)
    d_in = increment.m_in * increment.a_t.shape[2]
    return torch.mm(_left(increment).reshape(-1, increment.a_t.shape[1]), increment.a_t[0]).reshape(-1, d_in)


def diagonal_delta(increment: Increment) -> Tensor:
    """Dense ``ΔW`` of a `diagonal` increment block by block, ``(P_out ⊙ core) P_inᵀ`` then the output scaling:
    ``d_out·α·d_in`` multiply-adds, never an ``α x α`` core. ``P_out`` is scaled in a contiguous ``(d, α)`` copy
    (a transposed view made each scaling read strided), and blocks sharing ``P_in`` are one GEMM."""
    a_t, core, b_t = increment.tensors()
    m_in, m_out, alpha = core.shape if core is not None else (increment.m_in, increment.m_out, a_t.shape[1])
    if core is None:  # (an output scaling on the identity)
        core = a_t.new_ones(m_in, m_out, alpha)
    p_out = b_t.transpose(1, 2).contiguous()  # (g_out, d, α)
    scaling = increment.out_scale  # (m_in, d_out): input block p's columns scaled by row p
    if m_in == 1:  # output block q: (P_out[q] ⊙ core[q]) P_inᵀ, one GEMM for all blocks
        delta = torch.mm((p_out * core[0].unsqueeze(1)).reshape(-1, alpha), a_t[0])
        return delta if scaling is None else delta * scaling[0].unsqueeze(1)
    left = p_out[0] * core[:, 0].unsqueeze(1)  # input block p: (P_out ⊙ core[p]) P_in[p]ᵀ, (m_in, d_out, α)
    if a_t.shape[0] == 1:  # one P_in: the blocks stacked, one GEMM
        blocks = torch.mm(left.view(-1, alpha), a_t[0]).view(m_in, left.shape[1], -1)
    else:
        blocks = torch.bmm(left, a_t)
    if scaling is not None:
        blocks = blocks * scaling.unsqueeze(-1)
    return blocks.transpose(0, 1).reshape(left.shape[1], -1)  # (d_out, m_in·d): the blocks side by side


def _delta_by_blocks(increment: Increment) -> Tensor:
    """``ΔW`` when each input block has its own projection: ``(d_out, m_in, α) ⊗ (m_in, α, d)``."""
    left = _left(increment).reshape(-1, increment.m_in, increment.a_t.shape[1])
    return torch.einsum("rpa,paj->rpj", left, increment.a_t).reshape(left.shape[0], -1)
