"""`factnet.Tensorizer`: its table of what it found; a model, group names or decompose options it cannot take
raise FactnetError naming the problem and leave the model untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import factnet
from conftest import TinyNet, assert_refused


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(d=4, odd=True).double()


# ---- the table -----------------------------------------------------------------------------------
def test_tensorizer_repr_is_a_table(vit):
    text = repr(factnet.Tensorizer(vit, ["blocks.*.attn.qkv[q,v]", "blocks.1.mlp.fc2"]))
    lines = text.splitlines()
    assert lines[0].startswith("Tensorizer(VisionTransformer")
    assert "48x48" in lines[0] and "module" in lines[1]
    assert any("blocks.0.attn.qkv" in line and "q,v" in line and "144x48" in line for line in lines)
    assert any("blocks.1.mlp.fc2" in line and "0,1,2,3" in line for line in lines)
    assert not any("head" in line.split()[0] for line in lines[2:])


# ---- the model ------------------------------------------------------------------------------------
def test_not_a_module():
    with pytest.raises(factnet.FactnetError, match="nn.Module"):
        factnet.Tensorizer({"weight": torch.zeros(2, 2)})


def test_integer_weights(model):
    model.fc1.weight = nn.Parameter(torch.zeros(16, 4, dtype=torch.int8), requires_grad=False)
    message = assert_refused(model, "floating-point", lambda: factnet.Tensorizer(model))
    assert "fc1" in message and "int8" in message
    factnet.Tensorizer(model, ["qkv", "proj"])  # the float matrices can still be adapted


# ---- group names ---------------------------------------------------------------------------------
def test_group_names_that_collide(model):
    tensorizer = factnet.Tensorizer(model, ["qkv", "fc1"]).group({"a.b": "qkv", "a_b": "fc1"})
    assert_refused(model, "collide", lambda: tensorizer.decompose("tt", rank=2))


# ---- decompose options ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "2"])
def test_bad_scale(model, scale):
    assert_refused(model, "scale", lambda: factnet.Tensorizer(model).decompose("tt", rank=2, scale=scale))


@pytest.mark.parametrize("dropout", [1.5, 1.0, -0.1, math.nan, "0.1"])
def test_bad_dropout(model, dropout):
    assert_refused(model, "dropout", lambda: factnet.Tensorizer(model).decompose("tt", rank=2, dropout=dropout))


def test_unknown_head(model):
    assert_refused(model, "not a submodule",
                   lambda: factnet.Tensorizer(model).decompose("tt", rank=2, head=["classifier"]))
