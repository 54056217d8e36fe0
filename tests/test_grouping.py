"""`factnet.grouping`: a grouping that cannot put each slice in one same-shaped group raises FactnetError
naming the problem and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch

import factnet
from conftest import TinyNet, assert_refused


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(d=4, odd=True).double()


# ---- grouping ------------------------------------------------------------------------------------
def test_mixed_shape_group_names_the_modules(model):
    tensorizer = factnet.Tensorizer(model)  # 4x4 slices and the whole 4x5 `odd`
    message = assert_refused(model, "mixes slice shapes", lambda: tensorizer.group({"all": ["*"]}))
    assert "'all'" in message and "odd" in message and "4x5" in message and "4x4" in message
    assert_refused(model, "mixes slice shapes", lambda: tensorizer.group(lambda piece: "everything"))


def test_grouping_regex_not_matching(model):
    tensorizer = factnet.Tensorizer(model, ["qkv", "fc1"])
    message = assert_refused(model, "does not match slice", lambda: tensorizer.group(r"(qkv)\[[qk]\]"))
    assert "qkv[v]" in message
    assert_refused(model, "valid regex", lambda: tensorizer.group("(unclosed"))


def test_dict_grouping_needs_exactly_one_group_per_slice(model):
    tensorizer = factnet.Tensorizer(model, ["qkv", "fc1"])
    assert_refused(model, "no group", lambda: tensorizer.group({"attention": "qkv"}))
    assert_refused(model, "several groups", lambda: tensorizer.group({"a": ["qkv", "fc1"], "b": "fc1[0]"}))


def test_grouping_callable_must_name_a_group(model):
    tensorizer = factnet.Tensorizer(model, ["qkv"])
    assert_refused(model, "non-empty group name", lambda: tensorizer.group(lambda piece: None))
    assert_refused(model, "non-empty group name", lambda: tensorizer.group(lambda piece: ""))


def test_stage_grouping_without_stage_index(model):
    assert_refused(model, "stage index", lambda: factnet.Tensorizer(model).group("stage"))


def test_bad_group_by(model):
    assert_refused(model, "group by", lambda: factnet.Tensorizer(model, ["qkv"]).group(42))
