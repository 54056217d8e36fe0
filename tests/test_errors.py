"""Every bad request raises FactnetError naming the problem, and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch

import factnet
from conftest import TinyNet, assert_refused, randomize_factors


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(d=4, odd=True).double()


def test_factnet_error_is_a_value_error():
    assert issubclass(factnet.FactnetError, ValueError)


# ---- lifecycle misuse ----------------------------------------------------------------------------
def test_decompose_twice(model):
    tensorizer = factnet.Tensorizer(model, ["qkv", "fc1"])
    adapter = tensorizer.decompose("tt", rank=2)
    randomize_factors(adapter)
    assert_refused(model, "already has an adapter named 'default'", lambda: tensorizer.decompose("tt", rank=2))
    assert_refused(model, "already has an adapter named 'default'",
                   lambda: tensorizer.group({"x": ["qkv", "fc1"]}).decompose("cp", rank=2))
    assert model.factnet["default"] is adapter


def test_merge_twice(model):
    adapter = factnet.Tensorizer(model).group(lambda p: f"{p.d_in}x{p.d_out}").decompose("tt", rank=2)
    randomize_factors(adapter)
    adapter.merge()
    assert_refused(model, "already merged", adapter.merge)
    assert adapter.merged


def test_unmerge_without_merge(model):
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    assert_refused(model, "not merged", adapter.unmerge)


def test_operations_after_detach(model):
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    randomize_factors(adapter)
    adapter.detach()
    assert_refused(model, "detached", adapter.merge)
    assert_refused(model, "detached", adapter.detach)

    def disabled():
        with adapter.disable():
            pass

    assert_refused(model, "detached", disabled)
    assert_refused(model, "detached", adapter.unmerge)
    assert adapter.num_head_parameters() == 0
