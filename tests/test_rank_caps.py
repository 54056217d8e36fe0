"""Rank means "at most that, in each mode": a group too small for it gets the largest rank it allows.

The sizes themselves are `Format.sizes`' (tests/test_formats.py); here, what a capped group does: its
message, the adapter built on it against the dense oracle, budgets and files.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import factnet
from conftest import TinyNet, randomize_factors
from oracle_support import oracle_forward
from factnet import Tensorizer


def test_one_slice_tucker_is_built_with_one_message():
    """The issue's timm case: a group holding a single slice, Tucker rank 8."""
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.Linear(24, 24))
    tensorizer = Tensorizer(model, ["0", "2", "3"])
    assert tensorizer.group_shapes() == {"16x24": (1, 16, 24), "24x24": (2, 24, 24)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = tensorizer.decompose("tucker", rank=8)
    messages = [str(w.message) for w in caught if "rank" in str(w.message)]
    assert len(messages) == 1
    # by hand: core a·b·c + p n·a + u d_in·b + v d_out·c
    one = 1 * 8 * 8 + 1 * 1 + 16 * 8 + 24 * 8  # a = 1
    two = 2 * 8 * 8 + 2 * 2 + 24 * 8 + 24 * 8  # a = 2
    assert adapter.num_parameters_by_group() == {"16x24": one, "24x24": two}
    assert tensorizer.num_parameters("tucker", 8) == one + two
    assert "'16x24' (1x16x24): a=1 (385 parameters)" in messages[0]
    assert "'24x24' (2x24x24): a=2 (516 parameters)" in messages[0]
    assert f"{one + two:,} parameters in all" in messages[0]
    assert "capped: a=1" in repr(adapter) and "capped: a=2" in repr(adapter)


def test_no_message_when_nothing_is_capped():
    tensorizer = Tensorizer(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), ["0", "1"])
    assert tensorizer.rank_report("tt", 8) == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensorizer.decompose("tt", rank=8)


@pytest.mark.parametrize("name", factnet.available_formats())
def test_capped_groups_compute_the_dense_increment(name):
    """Forward on capped groups equals the dense oracle (the format's reference reconstruction)."""
    torch.manual_seed(0)
    model = TinyNet(d=4, odd=True).double()
    base = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = Tensorizer(model).decompose(name, rank=6, scale=0.7)
    randomize_factors(adapter)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), oracle_forward(base, adapter, 0.7, x), rtol=1e-9, atol=1e-9)


def test_budget_stays_exact_with_capped_groups():
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.Linear(24, 24))
    tensorizer = Tensorizer(model, ["0", "2", "3"])
    for budget in (500, 1_200, 3_000, 100_000):
        rank = tensorizer.rank_for_budget("tucker", budget)
        count = tensorizer.num_parameters("tucker", rank)
        assert count <= budget and tensorizer.num_parameters("tucker", rank + 1) > budget or \
            tensorizer.num_parameters("tucker", rank + 1) == count  # the next rank adds nothing (capped)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = Tensorizer(copy.deepcopy(model), ["0", "2", "3"]).decompose("tucker", budget=budget)
        assert adapter.num_parameters() == count and adapter.format.rank == rank


def test_capped_adapter_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24))
    fresh = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = Tensorizer(model, ["0", "2"]).decompose("tucker", rank=8, train_head=False)
        randomize_factors(adapter)
        adapter.save(str(tmp_path / "a.factnet"))
        loaded = factnet.load(fresh, str(tmp_path / "a.factnet"))
    assert re.search(r"capped: a=1", repr(loaded))
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), model(x))
