"""`factnet.products`: the thin matrix products the kernel is made of, against plain matrix products."""

from __future__ import annotations

import pytest
import torch

from factnet.products import outer


@pytest.mark.parametrize("rows", [1000, 1001, 37])
@pytest.mark.parametrize("blocks", [1, 4])
def test_outer_product_chunks_exact(rows: int, blocks: int) -> None:
    """The chunked ``Σ_n r_pᵀ x_p`` equals one plain matrix product, remainders included."""
    r, x = torch.randn(rows, blocks * 3, dtype=torch.float64), torch.randn(rows, blocks * 5, dtype=torch.float64)
    expected = r.reshape(rows * blocks, 3).t() @ x.reshape(rows * blocks, 5)
    torch.testing.assert_close(outer(r, x, blocks, 1)[0], expected)
