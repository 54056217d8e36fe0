"""`factnet.slices`: target patterns and default targets; a pattern or model they cannot serve raises
FactnetError naming the problem and leaves the model untouched."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import factnet
from conftest import TinyNet, assert_refused


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(d=4, odd=True).double()


# ---- targets -------------------------------------------------------------------------------------
def test_pattern_matching_nothing(model):
    message = assert_refused(model, "matches no weight matrix",
                             lambda: factnet.Tensorizer(model, ["blocks.*.attn.qkv"]))
    assert "blocks.*.attn.qkv" in message and "qkv" in message.split("look like")[1]


def test_patterns_match_full_names_not_substrings(model):
    assert_refused(model, "matches no weight matrix", lambda: factnet.Tensorizer(model, ["fc"]))


def test_empty_selection(model):
    assert_refused(model, "empty selection", lambda: factnet.Tensorizer(model, ["qkv[]"]))


@pytest.mark.parametrize("pattern, missing", [("qkv[x]", "x"), ("fc1[4]", "4"), ("qkv[q,o]", "o")])
def test_unknown_block_label(model, pattern, missing):
    message = assert_refused(model, re.escape(pattern), lambda: factnet.Tensorizer(model, [pattern]))
    assert repr(missing) in message or missing in message
    module = pattern.split("[")[0]
    labels = {"qkv": ["q", "k", "v"], "fc1": ["0", "1", "2", "3"]}[module]
    assert str(labels) in message  # tells what the blocks are


@pytest.mark.parametrize("pattern", ["qkv[q", "qkv]q[", "", "qkv[q][k]"])
def test_malformed_pattern(model, pattern):
    assert_refused(model, "pattern", lambda: factnet.Tensorizer(model, [pattern]))


def test_overlapping_patterns(model):
    message = assert_refused(model, "selected by both", lambda: factnet.Tensorizer(model, ["qkv", "qkv[q]"]))
    assert "qkv[q]" in message
    assert_refused(model, "selected by both", lambda: factnet.Tensorizer(model, ["fc*", "fc1[2]"]))


def test_no_matrices_at_all():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 3))
    assert_refused(model, "no Linear", lambda: factnet.Tensorizer(model))


def test_only_a_head():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)

    model = Classifier()
    assert_refused(model, "no default targets", lambda: factnet.Tensorizer(model))


# ---- default targets ---------------------------------------------------------------------------
def test_default_targets_skip_position_bias_mlps_and_tiny_matrices():
    class Block(nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.coords = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))  # tiny: 2 and 1 wide
            self.cpb_mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))  # by name

    model = nn.Sequential(Block(), Block())
    modules = {s.module for s in factnet.Tensorizer(model).slices}
    assert modules == {f"{b}.{m}" for b in "01" for m in ("qkv", "proj")}
    # named explicitly, they are still adaptable
    assert factnet.Tensorizer(model, ["*.coords.0"]).group_shapes() == {"2x2": (64, 2, 2)}


def test_swinv2_defaults_are_the_block_matrices_and_the_table_stays_readable():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swinv2_tiny_window8_256", img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                              num_heads=(2, 4), num_classes=3)
    tz = factnet.Tensorizer(model)
    assert {s.module.rsplit(".", 1)[-1] for s in tz.slices} == {"qkv", "proj", "fc1", "fc2"}
    assert not any("cpb" in s.module for s in tz.slices)
    table = str(factnet.Tensorizer(model, ["*.cpb_mlp.0"]))
    assert "0..255 (256 blocks)" in table and max(len(line) for line in table.splitlines()) < 120
