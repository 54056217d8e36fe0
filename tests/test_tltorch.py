"""tensorly-torch's role: a group's factors as the matching tltorch factorized tensor."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch

import factnet
from conftest import randomize_factors, tiny_vit
from factnet import FactnetError

# the mode order of each format's to_tensorly: FacT-TT is a train over (d_in, n, d_out)
MODES = {"tt": (1, 0, 2), "tucker": (0, 1, 2), "cp": (0, 1, 2), "batch-matrix": (0, 1, 2)}


@pytest.mark.parametrize("name", list(MODES))
def test_to_tltorch_round_trips_to_the_group_tensor(name):
    tltorch = pytest.importorskip("tltorch")
    model = tiny_vit().double()
    adapter = factnet.Tensorizer(model).decompose(name, rank=3, seed=0)
    randomize_factors(adapter, std=0.5)
    group = adapter.group(adapter.group_names[0])
    factorized = group.to_tltorch()
    assert isinstance(factorized, tltorch.FactorizedTensor)
    dense = group.reconstruct()  # (n, d_in, d_out), factnet's own contraction
    with tl.backend_context("pytorch"):
        rebuilt = factorized.to_tensor().permute(*MODES[name])
    torch.testing.assert_close(rebuilt, dense, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # a detached copy: the adapter's factors are not changed through it
        for factor in factorized.parameters():
            factor.zero_()
    torch.testing.assert_close(group.reconstruct(), dense, rtol=0, atol=0)


def test_to_tltorch_refuses_a_format_tltorch_lacks():
    adapter = factnet.Tensorizer(tiny_vit()).decompose("tensor-ring", rank=2, seed=0)
    with pytest.raises(FactnetError, match="tltorch has no factorized tensor"):
        adapter.group(adapter.group_names[0]).to_tltorch()
