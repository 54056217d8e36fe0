"""`factnet.dispatch.Dispatch`: the increments each attached matrix gets (the active adapter's, none when
disabled, merged or with no adapter active), looked up from the ones built as the model's forward starts;
the forward's start and finish (counted, guarded); a merged adapter's backward refused."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, randomize_factors
from oracle_support import oracle_forward
from torch import nn

import factnet
from factnet import FactnetError, calls
from factnet.calls import Forward
from factnet.increment import delta_weight


def _adapted(vit) -> tuple[nn.Module, factnet.Adapter, factnet.Adapter]:
    """``(base copy, a, b)``: two random TT adapters, b active."""
    base = copy.deepcopy(vit)
    a = factnet.Tensorizer(vit).decompose("tt", rank=2, scale=2.0, name="a")
    randomize_factors(a, seed=1)
    b = factnet.Tensorizer(vit).decompose("tt", rank=3, scale=0.5, name="b")
    randomize_factors(b, seed=2)
    return base, a, b


def _dense(adapter: factnet.Adapter, matrix: str, increments: list) -> torch.Tensor:
    """``s·ΔW`` of ``matrix`` from ``increments``, against the adapter's own dense ``delta_weight``."""
    return adapter.settings.scale * sum(delta_weight(i) for i in increments)


def test_each_matrix_gets_the_active_adapters_increments(vit, images):
    base, a, b = _adapted(vit)
    dispatch = vit.factnet.dispatch
    for adapter in (a, b):
        adapter.activate()
        assert dispatch.settings is adapter.settings
        for matrix in adapter.matrices:
            weight = dispatch.parameter(matrix)
            assert_close(_dense(adapter, matrix, dispatch.increments(matrix, weight)), adapter.delta_weight(matrix),
                         1e-12, matrix)
        assert_close(vit(images), oracle_forward(base, adapter, adapter.settings.scale, images), 1e-12, adapter.name)


def test_none_when_disabled_merged_or_no_adapter_acts(vit, images):
    base, a, b = _adapted(vit)
    dispatch, matrix = vit.factnet.dispatch, next(iter(b.matrices))
    weight = dispatch.parameter(matrix)
    with vit.factnet.disable():
        assert dispatch.increments(matrix, weight) == [] and torch.equal(vit(images), base(images))
    b.merge()
    assert dispatch.increments(matrix, weight) == [] and dispatch.acting() is None
    assert_close(vit(images), oracle_forward(base, b, 0.5, images), 1e-10, "merged")
    b.unmerge()
    vit.factnet.activate(None)
    assert dispatch.increments(matrix, weight) == [] and dispatch.settings.scale == 1.0
    assert_close(vit(images), base(images), 1e-12, "no adapter active (unmerged: exact up to rounding)")


def test_a_forward_looks_up_the_increments_built_as_it_started(vit, images):
    _, a, b = _adapted(vit)
    owner, seen = vit.factnet, []

    def look(module: nn.Module, args: tuple) -> None:
        call = calls.current(owner)
        matrix = next(iter(b.matrices))
        seen.append((type(call), call.reads_active, owner.traffic.forwards,
                     owner.dispatch.increments(matrix, owner.dispatch.parameter(matrix)) is call.now[1][matrix]))

    handle = vit.blocks[0].register_forward_pre_hook(look)
    vit(images)
    handle.remove()
    assert seen == [(Forward, True, 1, True)]
    assert calls.current(owner) is None and owner.traffic.forwards == 0 and owner.traffic.reading_active == 0
    assert set(b.matrices) <= owner.dispatch.verified  # the first-forward guard saw them take part


def test_training_a_merged_adapter_is_refused_in_backward(vit, images):
    _, a, b = _adapted(vit)
    b.merge()
    vit.train()
    with pytest.raises(FactnetError, match="adapter 'b' is merged into the weights, so this backward"):
        vit(images).sum().backward()
    vit.eval()
    b.unmerge()
