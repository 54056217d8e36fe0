"""`AdapterConfig`: one value for an adapter's settings; `decompose` takes it or its keywords, the adapter holds it
resolved, files keep it."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch

import factnet
from conftest import randomize_factors, tiny_swin, tiny_vit
from oracle_support import oracle_forward
from factnet import AdapterConfig, FactnetError
from factnet.file.info import load_spec
from io_support import rewrite_spec


# every field refused with the message decompose gave before the config existed
@pytest.mark.parametrize("settings, message", [
    (dict(), "decompose needs a format"),
    (dict(format="auto", rank=4, budget="8KB"), "decompose needs a format"),
    (dict(format="tt"), "format 'tt' needs a rank"),
    (dict(format="nope", rank=4), "unknown format 'nope'"),
    (dict(format="tt", rank=0), "rank must be a positive integer, got 0"),
    (dict(format="tt", rank=4, budget=1000), "pass rank= or budget=, not both"),
    (dict(format="tt", budget="lots"), "cannot read budget 'lots'"),
    (dict(format=factnet.get_format("tt", 2), budget=1000), "a budget takes a format name"),
    (dict(format="tt", budget="8KB", bits="some"), "bits must be 1, 2, 4, 8, None (full precision) or 'auto'"),
    (dict(format="tt", rank=4, bits=3), "bits must be one of 1, 2, 4, 8"),
    (dict(format="tt", rank=4, scale=1.0, gain=2.0), "pass scale= (the paper's s) or gain="),
    (dict(format="tt", rank=4, gain=math.inf), "gain must be a finite number, got inf"),
    (dict(format="tt", rank=4, scale=math.nan), "scale must be a finite number, got nan"),
    (dict(format="tt", rank=4, dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (dict(format="tt", rank=4, head_bits=5), "bits must be one of 1, 2, 4, 8"),
    (dict(format="tt", rank=4, seed="zero"), "seed must be an integer or None, got 'zero'"),
    (dict(format="tt", rank=4, targets=["qkv", 3]), "targets must be names"),
    (dict(format="tt", rank=4, head=["nothing.here"]), "head ['nothing.here'] is not a submodule of the model"),
    (dict(format="tt", rank=4, by=3), "by must be 'shape', 'stage', a regex"),
])
def test_every_field_is_checked_when_built(settings, message):
    if "head" not in settings:  # (the head's names: checked against the model, by decompose)
        with pytest.raises(FactnetError, match=re.escape(message)):
            AdapterConfig(**settings)
    model = tiny_vit()
    keywords = {k: v for k, v in settings.items() if k not in ("targets", "by")}
    if len(keywords) == len(settings):  # decompose's keywords: the same refusal, nothing attached
        with pytest.raises(FactnetError, match=re.escape(message)):
            factnet.Tensorizer(model).decompose(**keywords)
        assert not hasattr(model, "factnet")


@pytest.mark.parametrize("config", [
    AdapterConfig("tt", rank=8),
    AdapterConfig("tt", rank=8, bits=2),
    AdapterConfig(budget="16KB"),
    AdapterConfig("tucker", budget=5_000, bits=None, scale=3.5, dropout=0.1, seed=7),
    AdapterConfig("cp", rank=3, gain=2.0, head_bits=4, targets=("*.qkv[q,v]", "*.fc1"), by="stage",
                  head=("head",)),
    AdapterConfig("tt", rank=2, by={"attn": ["*.qkv", "*.proj"], "mlp": "*.fc*"}, train_head=False),
])
def test_print_is_the_call_that_builds_it(config):
    text = repr(config)
    assert str(config) == text and text.startswith("AdapterConfig(") and eval(text) == config


def test_print_leaves_defaults_out():
    assert repr(AdapterConfig("tt", rank=8, bits=2)) == "AdapterConfig('tt', rank=8, bits=2)"
    assert repr(AdapterConfig("tt", rank=8, bits=None)) == repr(AdapterConfig("tt", rank=8)) \
        == "AdapterConfig('tt', rank=8)"  # (with a rank, bits="auto" is full precision)
    assert AdapterConfig("tt", rank=8, bits="auto") == AdapterConfig("tt", rank=8, bits=None)
    assert AdapterConfig("tt", rank=8, train_head=0) == AdapterConfig("tt", rank=8, train_head=False)
    assert AdapterConfig("tt", rank=2, targets=["a", "b"], head="head") == AdapterConfig(
        "tt", rank=2, targets=("a", "b"), head=("head",))


def _dense_forward(base: torch.nn.Module, adapter: factnet.Adapter, images: torch.Tensor) -> torch.Tensor:
    """``base`` run with ``W + s·ΔW``, ΔW from the factors as the adapter uses them (times their multipliers)."""
    used = {key: {name: value.detach() for name, value in group.trained_values().items()}
            for key, group in adapter.groups.items()}
    return oracle_forward(base, adapter, adapter.settings.scale, images, factors=used)


def _twin_adapters(config: AdapterConfig, keywords: dict) -> tuple:
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    by_config, by_keywords = copy.deepcopy(base), copy.deepcopy(base)
    return (base, factnet.Tensorizer(by_config).decompose(config),
            factnet.Tensorizer(by_keywords).decompose(**keywords))


@pytest.mark.parametrize("keywords", [
    dict(format="tt", rank=4, seed=3),
    dict(format="tucker", rank=3, scale=2.5, seed=1, dropout=0.0, head=["head"]),
    dict(format="tt-seeded", rank=6, gain=2.0, seed=5, train_head=False),
])
def test_decompose_of_a_config_is_decompose_of_its_keywords(keywords):
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    config = AdapterConfig(**keywords)
    base, adapter, expected = _twin_adapters(config, keywords)
    assert adapter.config == expected.config and adapter.settings == expected.settings
    for name in adapter.group_names:  # the same init from the same seed
        for key, value in adapter.group(name).factors.items():
            assert torch.equal(value, expected.group(name).factors[key]), (name, key)
    for one in (adapter, expected):
        randomize_factors(one, seed=4)
    reference = _dense_forward(base, adapter, images)
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(images), reference, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(expected.model(images), reference, rtol=1e-9, atol=1e-9)
    stable = factnet.Tensorizer(base).stable_scale(adapter.format)
    assert adapter.settings.scale == pytest.approx(keywords.get("scale", keywords.get("gain", 1.0) * stable))


def test_a_config_is_given_once():
    tensorizer = factnet.Tensorizer(tiny_vit())
    config = AdapterConfig("tt", rank=2)
    for call in (lambda: tensorizer.decompose(config, rank=4), lambda: tensorizer.decompose(config, config=config),
                 lambda: tensorizer.decompose("tt", config=config), lambda: tensorizer.decompose(config, seed=1)):
        with pytest.raises(FactnetError, match="pass an AdapterConfig or the settings that build one"):
            call()
    named = tensorizer.decompose(config=config, name="other")
    assert named.name == "other" and named.config == AdapterConfig("tt", rank=2, head=("head",))


def test_a_budget_resolves_to_the_rank_and_bits_it_picks():
    tensorizer = factnet.Tensorizer(tiny_swin()).group("stage")
    for format, budget, bits in (("tt", "6KB", "auto"), ("tucker", 3_000, "auto"), ("cp", "4KB", 4)):
        given = AdapterConfig(format, budget=budget, bits=bits, seed=0)
        choice = tensorizer.budget_choice(format, budget, bits, given)  # the rule's own search (test_budget checks it)
        adapter = factnet.Tensorizer(tiny_swin()).group("stage").decompose(given)
        config = adapter.config
        assert (config.format, config.rank, config.bits, config.budget) == (format, choice.rank, choice.bits, None)
        assert config.by == "stage" and adapter.num_parameters() == choice.params
        again = factnet.Tensorizer(tiny_swin()).decompose(config)  # the resolved config builds the same adapter
        assert again.config == config and again.num_parameters() == choice.params
    picked = tensorizer.auto_choice("6KB")
    adapter = factnet.Tensorizer(tiny_swin()).decompose(budget="6KB")
    assert (adapter.config.format, adapter.config.rank, adapter.config.bits) == (
        picked.format, picked.choice.rank, picked.choice.bits)
    assert f"picked by the budget: {picked}" in repr(adapter)


def test_targets_and_grouping_of_a_config():
    model = tiny_vit()
    config = AdapterConfig("tt", rank=2, targets=("blocks.*.attn.qkv[q,v]", "blocks.*.mlp.fc1"), by="stage")
    expected = factnet.Tensorizer(tiny_vit(), config.targets).group("stage")
    adapter = factnet.Tensorizer(model).decompose(config)
    assert adapter.group_shapes() == expected.group_shapes()
    assert [s.qualified_name for g in adapter.group_names for s in adapter.group(g).slices] == [
        s.qualified_name for members in expected.groups.values() for s in members]
    assert adapter.config == dataclasses.replace(config, head=("head",))
    agreeing = factnet.Tensorizer(tiny_vit(), config.targets).group("stage").decompose(config)
    assert agreeing.group_shapes() == expected.group_shapes()
    with pytest.raises(FactnetError, match="give the targets once"):
        factnet.Tensorizer(tiny_vit(), ["blocks.*.mlp.fc2"]).decompose(config)
    with pytest.raises(FactnetError, match="give the grouping once"):
        factnet.Tensorizer(tiny_vit()).group(r"blocks\.(\d+)").decompose(config)
    grouped = factnet.Tensorizer(tiny_vit()).group("stage").decompose("tt", rank=2)  # the Tensorizer's grouping
    assert grouped.config.by == "stage"


@pytest.mark.parametrize("config", [
    AdapterConfig("tt", rank=4, gain=2.0, dropout=0.1, seed=5),
    AdapterConfig("tucker", rank=3, scale=3.0, bits=2, train_head=False, targets=("blocks.*.attn.qkv",)),
    AdapterConfig("vera", rank=8, by="stage", seed=2),
    AdapterConfig("tt", rank=2, by={"attn": ["*.qkv", "*.proj"], "mlp": ["*.fc1", "*.fc2"]}, seed=0),
    AdapterConfig("cp-seeded", rank=3),
])
def test_a_file_keeps_the_config(config, tmp_path):
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    adapter = factnet.Tensorizer(copy.deepcopy(base)).decompose(config)
    randomize_factors(adapter, seed=2)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    loaded = factnet.load(copy.deepcopy(base), path)
    assert loaded.config == adapter.config and loaded.settings == adapter.settings
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), _dense_forward(base, adapter, images), rtol=1e-9, atol=1e-9)


def test_older_files_load_to_the_config_they_would_have_had(tmp_path):
    """A version-4 file without the config's new fields (as written before them): their defaults."""
    torch.manual_seed(0)
    base = tiny_vit().eval()
    adapter = factnet.Tensorizer(copy.deepcopy(base)).decompose("tt", rank=4, gain=2.0, seed=3)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    spec = load_spec(path)
    assert (spec["gain"], spec["seed"], "targets" in spec, "by" in spec) == (2.0, 3, False, False)
    rewrite_spec(path, lambda written: [written.pop(key) for key in ("gain", "seed")])
    loaded = factnet.load(copy.deepcopy(base), path)
    assert loaded.config == AdapterConfig("tt", rank=4, head=("head",))  # stable, at the default gain
    assert loaded.settings.scale == adapter.settings.scale  # the file's s: the same outputs


def test_a_callable_grouping_is_recorded_as_its_groups(tmp_path):
    """The config keeps what a lambda grouped (exact slice names), so the model pickles and the file reads back
    the same config; regrouping by the record gives the same groups."""
    import pickle

    model = tiny_vit()
    tensorizer = factnet.Tensorizer(model).group(lambda piece: "attn" if ".attn." in piece.module else "mlp")
    adapter = tensorizer.decompose("tt", rank=2, seed=0)
    expected = {name: [piece.qualified_name for piece in members] for name, members in tensorizer.groups.items()}
    assert adapter.config.by == expected
    assert factnet.Tensorizer(tiny_vit()).group(adapter.config.by).groups.keys() == tensorizer.groups.keys()
    pickle.loads(pickle.dumps(model))
    adapter.save(tmp_path / "a.safetensors")
    assert factnet.load(tiny_vit(), tmp_path / "a.safetensors").config == adapter.config
