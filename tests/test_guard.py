"""`factnet.guard`: the first forward of an adapted model checks every adapted matrix; a weight used without
its increment is an error naming it, a matrix that took no part a warning, once."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import factnet
from factnet import FactnetError


class CachedWeight(nn.Module):
    """Uses a weight by a channel factnet cannot see: a tensor cached before `decompose`."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.other = nn.Linear(d, d)
        self.__dict__["cached"] = self.lin.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(F.linear(x, self.cached))


class WithUnusedPooler(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.pooler = nn.Linear(d, d)  # the task ignores it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_weight_used_by_an_unseen_channel_is_an_error_naming_it():
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = CachedWeight().double()
    factnet.Tensorizer(model).decompose("tt", rank=2)
    with pytest.raises(FactnetError, match=r"1 adapted matrices had their weight used .*: lin\."):
        model(x)
    with pytest.raises(FactnetError, match="lin"):  # and again: the guard stays until the model is fixed
        model(x)
    # targeting only what the model routes properly is fine
    fresh = CachedWeight().double()
    factnet.Tensorizer(fresh, ["other"]).decompose("tt", rank=2)
    fresh(x).sum().backward()


def test_a_weight_read_through_parameters_dict_is_caught():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(x, self.fc._parameters["weight"], self.fc.bias)

    model = Sneaky()
    factnet.Tensorizer(model, ["fc"]).decompose("cp", rank=2)
    with pytest.raises(FactnetError, match="fc"):
        model(torch.randn(2, 4))


def test_unused_modules_warn_once_and_do_not_break_training():
    model = WithUnusedPooler()
    adapter = factnet.Tensorizer(model, ["fc", "pooler"]).decompose("tt", rank=2, seed=0)
    with pytest.warns(UserWarning, match=r"took no part in the first forward.*pooler"):
        model(torch.randn(3, 6)).sum().backward()
    assert adapter.group_names and all(p.grad is not None for p in adapter.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified once: no second warning
        model(torch.randn(3, 6)).sum().backward()
