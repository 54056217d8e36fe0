"""`factnet.heads.Heads`: the one owner of every adapter's head values. Switching adapters puts each one's
own values into the model's head exactly; a mixed batch runs each adapter's head with its values; a deleted
adapter keeps its own; a file's values are the ones loaded."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, perturb_head, randomize_factors
from oracle_support import effective_params
from torch.func import functional_call

import factnet
from factnet import FactnetError
from factnet.heads import backbone_parameters, in_head


def _head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's head parameters now (``head.*`` of the tiny ViT)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("head.")}


def _assert_equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for name in expected:
        assert torch.equal(found[name], expected[name]), name


def _trained(vit, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """One adapter per name, each head given values of its own while active: those values, by adapter."""
    values = {}
    for seed, name in enumerate(names):
        adapter = factnet.Tensorizer(vit).decompose("tt", rank=2, scale=1.5, name=name)
        randomize_factors(adapter, seed=seed)
        perturb_head(adapter, 10 + seed)
        values[name] = _head(vit)
    return values


def test_switching_puts_each_adapters_own_head_values_into_the_model(vit):
    initial = _head(vit)
    values = _trained(vit, ["a", "b", "c"])
    for name in ["a", "c", "b", "a", None, "c"]:
        vit.factnet.activate(name)
        _assert_equal(_head(vit), initial if name is None else values[name])
        for other in "abc":  # every adapter's head, active or not, as it trained it
            _assert_equal({n: v.detach() for n, v in vit.factnet[other].head_state().items()}, values[other])
    active = vit.factnet.active_adapter.head_state()
    assert all(p is vit.get_parameter(n) for n, p in active.items())  # the model's own parameters: they train


def test_an_untrained_adapter_keeps_the_initial_head(vit):
    initial = _head(vit)
    factnet.Tensorizer(vit).decompose("tt", rank=2, name="untrained")
    _trained(vit, ["a"])
    vit.factnet.activate("untrained")
    _assert_equal(_head(vit), initial)
    vit.factnet.activate("a")
    _assert_equal({n: v.detach() for n, v in vit.factnet["untrained"].head_state().items()}, initial)


def test_values_are_each_adapters_and_a_copy_of_the_active_ones(vit):
    initial = _head(vit)
    values = _trained(vit, ["a", "b"])
    heads = vit.factnet.heads
    own = {n: v for n, v in heads.values(vit.factnet["a"]).items() if in_head(n, ["head"])}
    _assert_equal(own, values["a"])
    _assert_equal({n: v for n, v in heads.values(None).items() if in_head(n, ["head"])}, initial)
    live = heads.values(vit.factnet["b"])  # b is active: a copy of the model's head, made again once it changes
    _assert_equal({n: v for n, v in live.items() if in_head(n, ["head"])}, values["b"])
    assert all(v is not vit.get_parameter(n) for n, v in live.items())
    with torch.no_grad():
        vit.head.weight.add_(1.0)
    assert torch.equal(heads.values(vit.factnet["b"])["head.weight"], values["b"]["head.weight"] + 1.0)


def test_a_mixed_batch_runs_each_adapters_head_with_its_values(vit, images):
    base = copy.deepcopy(vit)
    values = _trained(vit, ["a", "b"])
    x = torch.cat([images, images])
    with torch.no_grad(), vit.factnet.per_sample(["a", "b", None, "a"]):
        mixed = vit(x)
    for row, name in enumerate(["a", "b", None, "a"]):
        params = {} if name is None else effective_params(base, vit.factnet[name], 1.5) | values[name]
        with torch.no_grad():
            expected = functional_call(base, params, (x[row: row + 1],))
        assert_close(mixed[row: row + 1], expected, 1e-12, f"row {row} ({name})")


def test_a_deleted_adapter_keeps_its_head_values(vit):
    values = _trained(vit, ["a", "b"])
    inactive = vit.factnet["a"]
    vit.factnet.delete("a")
    _assert_equal({n: v.detach() for n, v in inactive.head_state().items()}, values["a"])
    active = vit.factnet["b"]
    vit.factnet.delete("b")  # the model's head keeps the active adapter's values
    _assert_equal(_head(vit), values["b"])
    with pytest.raises(FactnetError, match="detached, so its head is no longer known"):
        active.head_state()


def test_a_loaded_adapter_has_the_files_head_values(vit, tmp_path):
    base = copy.deepcopy(vit)
    values = _trained(vit, ["a", "b"])
    vit.factnet["a"].save(tmp_path / "a.safetensors")
    loaded = factnet.load(base, tmp_path / "a.safetensors", name="a")
    _assert_equal(_head(base), values["a"])
    factnet.Tensorizer(base).decompose("tt", rank=2, name="other")
    _assert_equal({n: v.detach() for n, v in loaded.head_state().items()}, values["a"])


def test_backbone_parameters_leave_out_the_adapters(vit):
    expected = [n for n, _ in vit.named_parameters()]
    factnet.Tensorizer(vit).decompose("tt", rank=2)
    assert [n for n, _ in backbone_parameters(vit)] == expected
    assert in_head("head.weight", ["head"]) and not in_head("header.weight", ["head"])
