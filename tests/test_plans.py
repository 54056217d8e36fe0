"""`factnet.plans`: an einsum planned once per equation and shapes, computing what ``torch.einsum`` does."""

from __future__ import annotations

import torch

from factnet.plans import planned


def test_a_plan_is_made_once_per_shape_and_computes_the_einsum() -> None:
    generator = torch.Generator().manual_seed(0)
    equation = "iab,ja,kb->ijk"  # FacT-TT's reconstruction
    operands = [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in [(3, 4, 5), (6, 4), (7, 5)]]
    shapes = [tuple(t.shape) for t in operands]
    plan = planned(equation, *shapes)
    assert planned(equation, *shapes) is plan
    assert planned(equation, (2, 4, 5), *shapes[1:]) is not plan
    torch.testing.assert_close(plan(*operands), torch.einsum(equation, *operands))
