"""`placement.cut`: one gather of a group's core for all its matrices equals each matrix's core tiled
block by block, zeros where no member sits, and its backward scatters each block's gradient back."""

from __future__ import annotations

import pytest
import torch

from factnet.formats import NormalForm
from factnet.placement import Placement, cut

N, A, B, D = 6, 3, 2, 5
# (members, blocks, n_blocks, side, per_slice): columns, rows, a missing block, and per-slice input
# projections (the members' activations side by side: a block-diagonal core)
LAYOUTS = [
    ([0, 1, 2], [0, 1, 2], 3, "out", (False, False)),
    ([3, 4, 5, 0], [0, 1, 2, 3], 4, "in", (False, False)),
    ([5, 1], [0, 2], 3, "out", (False, False)),
    ([2, 4], [1, 0], 2, "out", (True, False)),
]


def _tiled(placement: Placement, core: torch.Tensor) -> torch.Tensor:
    """The module core built block by block from the placement's recipe (the reference)."""
    rows, row_blocks = placement._in[1], placement._in[2]
    cols, col_blocks = placement._out[1], placement._out[2]
    out = torch.zeros(row_blocks * A, col_blocks * B, dtype=core.dtype)
    for q, member in enumerate(placement.members.tolist()):
        r, c = int(rows[q]), int(cols[q])
        out[r * A:(r + 1) * A, c * B:(c + 1) * B] = core[member]
    return out


def _form(core: torch.Tensor) -> NormalForm:
    return NormalForm(torch.randn(N, A, D, dtype=core.dtype), core, torch.randn(N, B, D, dtype=core.dtype))


@pytest.mark.parametrize("layout", LAYOUTS, ids=["columns", "rows", "missing-block", "block-diagonal"])
def test_each_core_is_its_blocks(layout) -> None:
    torch.manual_seed(0)
    placement = Placement("g", *layout)
    core = torch.randn(N, A, B, dtype=torch.float64)
    found = cut([placement], _form(core), torch.float64)[0]
    assert torch.equal(found.core, _tiled(placement, core))
    assert (found.m_in, found.m_out) == (placement.m_in, placement.m_out)


def test_one_gather_for_all_matrices_matches_each_alone_and_its_gradient() -> None:
    torch.manual_seed(1)
    placements = [Placement("g", *layout) for layout in LAYOUTS]
    core = torch.randn(N, A, B, dtype=torch.float64, requires_grad=True)
    together = cut(placements, _form(core), torch.float64)
    weights = [torch.randn_like(inc.core) for inc in together]
    sum((w * inc.core).sum() for w, inc in zip(weights, together)).backward()
    expected = torch.zeros(N, A, B, dtype=torch.float64)  # each block's weight, back where its member came from
    for placement, w in zip(placements, weights):
        rows, cols = placement._in[1], placement._out[1]
        for q, member in enumerate(placement.members.tolist()):
            r, c = int(rows[q]), int(cols[q])
            expected[member] += w[r * A:(r + 1) * A, c * B:(c + 1) * B]
        assert torch.equal(cut([placement], _form(core.detach()), torch.float64)[0].core,
                           _tiled(placement, core.detach()))
    torch.testing.assert_close(core.grad, expected)
    for placement, inc in zip(placements, together):
        assert torch.equal(inc.core, _tiled(placement, core.detach()))


def test_cast_to_the_matrix_dtype() -> None:
    placement = Placement("g", *LAYOUTS[2])
    core = torch.randn(N, A, B)
    found = cut([placement], _form(core), torch.float64)[0]
    assert all(t.dtype == torch.float64 for t in found.tensors())
    assert torch.equal(found.core, _tiled(placement, core).double())
