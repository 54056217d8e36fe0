"""`placement.cut`: one gather of a group's core for all its matrices equals each matrix's core tiled
block by block, zeros where no member sits, and its backward scatters each block's gradient back;
folding the cores into the projections leaves every ``ΔW`` and gradient as it was."""

from __future__ import annotations

import pytest
import torch

from factnet.formats import NormalForm
from factnet.increment import delta_weight
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


@pytest.mark.parametrize("fold", ["any", "in"])
def test_folded_cores_give_the_same_increment_and_gradients(fold) -> None:
    """Folding a core into a shared projection (``core=None``) changes how ``ΔW`` is factored, not
    ``ΔW`` or the gradients; it folds where the input is one block (``"in"``: whole matrices only)."""
    torch.manual_seed(2)
    layouts = [LAYOUTS[0], LAYOUTS[1], LAYOUTS[2], ([0, 1, 2], [0, 1, 2], 3, "out", (False, False)),
               ([4], [0], 1, "out", (False, False)), ([1], [0], 1, "in", (False, False))]
    placements = [Placement("g", *layout) for layout in layouts]
    leaves = [torch.randn(N, A, B, dtype=torch.float64), torch.randn(1, A, D, dtype=torch.float64),
              torch.randn(1, B, D, dtype=torch.float64)]
    found = {}
    for how in (None, fold):
        values = [t.clone().requires_grad_() for t in leaves]
        increments = cut(placements, NormalForm(values[1], values[0], values[2]), torch.float64, how)
        deltas = [delta_weight(inc) for inc in increments]
        sum((d * torch.cos(torch.arange(d.numel(), dtype=d.dtype)).view_as(d)).sum() for d in deltas).backward()
        found[how] = increments, deltas, [v.grad for v in values]
    (plain, plain_deltas, plain_grads), (folded, folded_deltas, folded_grads) = found[None], found[fold]
    for p, f, dp, df in zip(placements, folded, plain_deltas, folded_deltas):
        torch.testing.assert_close(df, dp, rtol=1e-12, atol=1e-12)
        expect_folded = p.m_in == 1 and (fold == "any" or p.m_out == 1)
        assert (f.core is None) == expect_folded, (p.side, p.n_blocks)
        if expect_folded:
            assert (f.m_in, f.m_out) == (1, 1)
    assert all(inc.core is not None for inc in plain)
    for gf, gp in zip(folded_grads, plain_grads):
        torch.testing.assert_close(gf, gp, rtol=1e-12, atol=1e-12)
