"""Every bad request raises FactnetError naming the problem, and leaves the model untouched."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import factnet
from conftest import TinyNet, assert_same_model, randomize_factors, snapshot

FORMATS = factnet.available_formats()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(d=4, odd=True).double()


def raises(model, match, call):
    """``call()`` raises FactnetError matching ``match``; the model is exactly as before."""
    before = snapshot(model)
    with pytest.raises(factnet.FactnetError, match=match) as info:
        call()
    assert_same_model(model, before)
    return str(info.value)


def test_factnet_error_is_a_value_error():
    assert issubclass(factnet.FactnetError, ValueError)


# ---- ranks and formats ---------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4", float("nan")])
def test_rank_must_be_a_positive_integer(model, rank):
    tensorizer = factnet.Tensorizer(model)
    raises(model, "rank", lambda: tensorizer.decompose("tt", rank=rank))
    with pytest.raises(factnet.FactnetError, match="rank"):
        factnet.get_format("tt", rank)
    with pytest.raises(factnet.FactnetError, match="rank"):
        tensorizer.num_parameters("tt", rank)


def test_missing_rank(model):
    raises(model, "needs a rank", lambda: factnet.Tensorizer(model).decompose("tt"))


def test_unknown_format_lists_the_known_ones(model):
    message = raises(model, "unknown format 'tensor-train'",
                     lambda: factnet.Tensorizer(model).decompose("tensor-train", rank=2))
    for name in factnet.available_formats():
        assert name in message
    with pytest.raises(factnet.FactnetError, match="known formats"):
        factnet.get_format("TT", 2)


# ---- targets -------------------------------------------------------------------------------------
def test_pattern_matching_nothing(model):
    message = raises(model, "matches no weight matrix", lambda: factnet.Tensorizer(model, ["blocks.*.attn.qkv"]))
    assert "blocks.*.attn.qkv" in message and "qkv" in message.split("look like")[1]


def test_patterns_match_full_names_not_substrings(model):
    raises(model, "matches no weight matrix", lambda: factnet.Tensorizer(model, ["fc"]))


def test_empty_selection(model):
    raises(model, "empty selection", lambda: factnet.Tensorizer(model, ["qkv[]"]))


@pytest.mark.parametrize("pattern, missing", [("qkv[x]", "x"), ("fc1[4]", "4"), ("qkv[q,o]", "o")])
def test_unknown_block_label(model, pattern, missing):
    message = raises(model, re.escape(pattern), lambda: factnet.Tensorizer(model, [pattern]))
    assert repr(missing) in message or missing in message
    module = pattern.split("[")[0]
    labels = {"qkv": ["q", "k", "v"], "fc1": ["0", "1", "2", "3"]}[module]
    assert str(labels) in message  # tells what the blocks are


@pytest.mark.parametrize("pattern", ["qkv[q", "qkv]q[", "", "qkv[q][k]"])
def test_malformed_pattern(model, pattern):
    raises(model, "pattern", lambda: factnet.Tensorizer(model, [pattern]))


def test_overlapping_patterns(model):
    message = raises(model, "selected by both", lambda: factnet.Tensorizer(model, ["qkv", "qkv[q]"]))
    assert "qkv[q]" in message
    raises(model, "selected by both", lambda: factnet.Tensorizer(model, ["fc*", "fc1[2]"]))


def test_no_matrices_at_all():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 3))
    raises(model, "no Linear", lambda: factnet.Tensorizer(model))


def test_only_a_head():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)

    model = Classifier()
    raises(model, "no default targets", lambda: factnet.Tensorizer(model))


def test_not_a_module():
    with pytest.raises(factnet.FactnetError, match="nn.Module"):
        factnet.Tensorizer({"weight": torch.zeros(2, 2)})


def test_integer_weights(model):
    model.fc1.weight = nn.Parameter(torch.zeros(16, 4, dtype=torch.int8), requires_grad=False)
    message = raises(model, "floating-point", lambda: factnet.Tensorizer(model))
    assert "fc1" in message and "int8" in message
    factnet.Tensorizer(model, ["qkv", "proj"])  # the float matrices can still be adapted


# ---- grouping ------------------------------------------------------------------------------------
def test_mixed_shape_group_names_the_modules(model):
    tensorizer = factnet.Tensorizer(model)  # 4x4 slices and the whole 4x5 `odd`
    message = raises(model, "mixes slice shapes", lambda: tensorizer.group({"all": ["*"]}))
    assert "'all'" in message and "odd" in message and "4x5" in message and "4x4" in message
    raises(model, "mixes slice shapes", lambda: tensorizer.group(lambda piece: "everything"))


def test_grouping_regex_not_matching(model):
    tensorizer = factnet.Tensorizer(model, ["qkv", "fc1"])
    message = raises(model, "does not match slice", lambda: tensorizer.group(r"(qkv)\[[qk]\]"))
    assert "qkv[v]" in message
    raises(model, "valid regex", lambda: tensorizer.group("(unclosed"))


def test_dict_grouping_needs_exactly_one_group_per_slice(model):
    tensorizer = factnet.Tensorizer(model, ["qkv", "fc1"])
    raises(model, "no group", lambda: tensorizer.group({"attention": "qkv"}))
    raises(model, "several groups", lambda: tensorizer.group({"a": ["qkv", "fc1"], "b": "fc1[0]"}))


def test_grouping_callable_must_name_a_group(model):
    tensorizer = factnet.Tensorizer(model, ["qkv"])
    raises(model, "non-empty group name", lambda: tensorizer.group(lambda piece: None))
    raises(model, "non-empty group name", lambda: tensorizer.group(lambda piece: ""))


def test_stage_grouping_without_stage_index(model):
    raises(model, "stage index", lambda: factnet.Tensorizer(model).group("stage"))


def test_bad_group_by(model):
    raises(model, "group by", lambda: factnet.Tensorizer(model, ["qkv"]).group(42))


def test_group_names_that_collide(model):
    tensorizer = factnet.Tensorizer(model, ["qkv", "fc1"]).group({"a.b": "qkv", "a_b": "fc1"})
    raises(model, "collide", lambda: tensorizer.decompose("tt", rank=2))


# ---- decompose options ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "2"])
def test_bad_scale(model, scale):
    raises(model, "scale", lambda: factnet.Tensorizer(model).decompose("tt", rank=2, scale=scale))


@pytest.mark.parametrize("dropout", [1.5, 1.0, -0.1, math.nan, "0.1"])
def test_bad_dropout(model, dropout):
    raises(model, "dropout", lambda: factnet.Tensorizer(model).decompose("tt", rank=2, dropout=dropout))


def test_unknown_head(model):
    raises(model, "not a submodule", lambda: factnet.Tensorizer(model).decompose("tt", rank=2, head=["classifier"]))


# ---- lifecycle misuse ----------------------------------------------------------------------------
def test_decompose_twice(model):
    tensorizer = factnet.Tensorizer(model, ["qkv", "fc1"])
    adapter = tensorizer.decompose("tt", rank=2)
    randomize_factors(adapter)
    raises(model, "already has an adapter named 'default'", lambda: tensorizer.decompose("tt", rank=2))
    raises(model, "already has an adapter named 'default'",
           lambda: tensorizer.group({"x": ["qkv", "fc1"]}).decompose("cp", rank=2))
    assert model.factnet["default"] is adapter


def test_merge_twice(model):
    adapter = factnet.Tensorizer(model).group(lambda p: f"{p.d_in}x{p.d_out}").decompose("tt", rank=2)
    randomize_factors(adapter)
    adapter.merge()
    raises(model, "already merged", adapter.merge)
    assert adapter.merged


def test_unmerge_without_merge(model):
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    raises(model, "not merged", adapter.unmerge)


def test_operations_after_detach(model):
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    randomize_factors(adapter)
    adapter.detach()
    raises(model, "detached", adapter.merge)
    raises(model, "detached", adapter.detach)

    def disabled():
        with adapter.disable():
            pass

    raises(model, "detached", disabled)
    raises(model, "detached", adapter.unmerge)
    assert adapter.num_head_parameters() == 0
