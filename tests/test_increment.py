"""`factnet.increment`: an increment's dense ``ΔW`` (`delta_weight`), ``W + s·ΔW`` (`effective_weight`) and a
diagonal core made dense (`as_dense`), against ``ΔW`` built block by block from its definition."""

from __future__ import annotations

import pytest
import torch
from oracle_support import blockwise_delta

from factnet.increment import Increment, as_dense, delta_weight, effective_weight

SCALE = 1.7
D = 5  # each block of the matrix is D x D


def dense_diagonal_core(core: torch.Tensor) -> torch.Tensor:
    """``(m_in·α, m_out·α)`` with ``diag(core[p, q])`` in block ``(p, q)``."""
    m_in, m_out, alpha = core.shape
    dense = torch.zeros(m_in * alpha, m_out * alpha, dtype=core.dtype)
    for p in range(m_in):
        for q in range(m_out):
            dense[p * alpha:(p + 1) * alpha, q * alpha:(q + 1) * alpha] = torch.diag(core[p, q])
    return dense


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("m_in", "m_out", "g_in", "g_out", "alpha", "beta"),
                         [(1, 1, 1, 1, 3, 2), (1, 3, 1, 1, 3, 2), (4, 1, 1, 1, 3, 2), (1, 3, 1, 3, 6, 2),
                          (4, 1, 4, 1, 3, 4)])
def test_delta_and_effective_weight_match_the_blockwise_definition(transposed: bool, m_in: int, m_out: int, g_in: int,
                                                                  g_out: int, alpha: int, beta: int) -> None:
    """Each layout of blocks and per-block projections, on a weight stored as is or transposed (Conv1D's)."""
    torch.manual_seed(0)
    dt = torch.float64
    shape = (m_in * D, m_out * D) if transposed else (m_out * D, m_in * D)
    weight = torch.randn(shape, dtype=dt).t() if transposed else torch.randn(shape, dtype=dt)
    increments = [Increment(torch.randn(g_in, alpha, D, dtype=dt), torch.randn(m_in * alpha, m_out * beta, dtype=dt),
                            torch.randn(g_out, beta, D, dtype=dt), m_in, m_out) for _ in range(2)]
    deltas = [blockwise_delta(weight, *inc.tensors(), m_in, m_out, g_in, g_out, D) for inc in increments]
    for inc, delta in zip(increments, deltas):
        torch.testing.assert_close(delta_weight(inc), delta)
    torch.testing.assert_close(effective_weight(weight, increments, SCALE), weight + SCALE * (deltas[0] + deltas[1]))
    assert effective_weight(weight, [], SCALE) is weight


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize(("m_in", "m_out", "g_in", "g_out"),
                         [(1, 1, 1, 1), (1, 3, 1, 1), (1, 3, 1, 3), (4, 1, 1, 1), (4, 1, 4, 1)])
def test_a_diagonal_increment_is_its_dense_core_then_the_output_scaling(scaled: bool, m_in: int, m_out: int, g_in: int,
                                                                       g_out: int) -> None:
    """``ΔW[:, p] = diag(out_scale[p]) Σ_q E_q b_t[q]ᵀ diag(core[p, q]) a_t[p]``; `as_dense` gives that core as a
    dense matrix."""
    torch.manual_seed(0)
    dt, alpha = torch.float64, 4
    weight = torch.randn(m_out * D, m_in * D, dtype=dt)
    a_t, b_t = torch.randn(g_in, alpha, D, dtype=dt), torch.randn(g_out, alpha, D, dtype=dt)
    core = torch.randn(m_in, m_out, alpha, dtype=dt)
    out_scale = torch.randn(m_in, m_out * D, dtype=dt) if scaled else None
    increment = Increment(a_t, core, b_t, m_in, m_out, out_scale)
    dense = dense_diagonal_core(core)
    expected = blockwise_delta(weight, a_t, dense, b_t, m_in, m_out, g_in, g_out, D)
    for p in range(m_in if scaled else 0):
        expected[:, p * D:(p + 1) * D] *= out_scale[p].unsqueeze(1)
    assert increment.diagonal
    torch.testing.assert_close(delta_weight(increment), expected)
    torch.testing.assert_close(effective_weight(weight, [increment], SCALE), weight + SCALE * expected)
    made_dense = as_dense(increment)
    torch.testing.assert_close(made_dense.core, dense)
    assert made_dense.out_scale is out_scale and made_dense.tensors()[::2] == (a_t, b_t)
    if not scaled:
        assert not made_dense.diagonal
        torch.testing.assert_close(delta_weight(made_dense), expected)
