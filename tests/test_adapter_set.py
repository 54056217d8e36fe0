"""Several named adapters on one model (`model.factnet`, an `AdapterSet`): add, switch, disable
all, delete, merge one at a time; training one leaves the others bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch

import factnet
from conftest import assert_close, assert_same_model, randomize_factors, snapshot
from oracle_support import oracle_forward
from factnet.adapter_set import AdapterSet


def two_adapters(vit):
    """``(base copy, a: TT on every matrix, b: Tucker on qkv only)``, both randomized; b active."""
    base = copy.deepcopy(vit)
    a = factnet.Tensorizer(vit).decompose("tt", rank=3, scale=2.0, name="a")
    randomize_factors(a, seed=1)
    b = factnet.Tensorizer(vit, ["blocks.*.attn.qkv"]).decompose("tucker", rank=2, scale=0.5, name="b")
    randomize_factors(b, seed=2)
    return base, a, b


def test_each_adapter_acts_alone_when_active(vit, images):
    base, a, b = two_adapters(vit)
    assert isinstance(vit.factnet, AdapterSet) and vit.factnet.names == ["a", "b"]
    assert vit.factnet.active == "b" and b.active and not a.active
    assert_close(vit(images), oracle_forward(base, b, 0.5, images), 1e-12, "b active")
    assert a.activate() is a and vit.factnet.active == "a"
    assert_close(vit(images), oracle_forward(base, a, 2.0, images), 1e-12, "a active")
    vit.factnet.activate(None)
    assert torch.equal(vit(images), base(images))


def test_disable_runs_the_base_model_and_restores(vit, images):
    base, a, b = two_adapters(vit)
    adapted = vit(images)
    with vit.factnet.disable():
        assert torch.equal(vit(images), base(images))
    assert torch.equal(vit(images), adapted)
    b.merge()
    with b.disable():  # a merged adapter is unmerged inside
        assert_close(vit(images), base(images), 1e-12, "disabled while merged")
    assert b.merged
    assert_close(vit(images), adapted, 1e-12, "merged again")


def test_training_one_leaves_the_others_bit_identical(vit, images):
    base, a, b = two_adapters(vit)
    a.activate()
    a_factors = {n: p.detach().clone() for n, p in a.named_parameters()}
    a_head = {n: p.detach().clone() for n, p in a.head_state().items()}
    a_out = vit(images)
    b.activate()
    assert all(not p.requires_grad for p in a.parameters())
    assert all(p.requires_grad for p in b.parameters())
    trainable = [p for p in vit.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in b.trainable_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    b_before = [p.detach().clone() for p in b.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        vit.train()
        vit(images).square().mean().backward()
        optimizer.step()
    assert all(not torch.equal(p, q) for p, q in zip(b.parameters(), b_before))  # b did train
    assert all(torch.equal(p, a_factors[n]) for n, p in a.named_parameters())
    assert all(torch.equal(p, a_head[n]) for n, p in a.head_state().items())
    assert not torch.equal(vit.head.weight, a_head["head.weight"])  # b trained its own head
    b_head = {n: p.detach().clone() for n, p in b.head_state().items()}
    vit.eval()
    a.activate()
    assert torch.equal(vit(images), a_out)
    assert all(torch.equal(b.head_state()[n], v) for n, v in b_head.items())  # b's head kept aside


def test_a_new_adapter_starts_from_the_base_head(vit):
    head = vit.head.weight.detach().clone()
    a = factnet.Tensorizer(vit).decompose("tt", rank=2, name="a")
    with torch.no_grad():
        vit.head.weight.add_(1.0)  # as training would
    factnet.Tensorizer(vit).decompose("tt", rank=2, name="b")
    assert torch.equal(vit.head.weight, head)
    a.activate()
    assert torch.equal(vit.head.weight, head + 1.0)


def test_state_dict_holds_every_adapter(vit):
    _, a, b = two_adapters(vit)
    keys = [k for k in vit.state_dict() if k.startswith("factnet.")]
    expected = [f"factnet.adapters.a.{n}" for n, _ in a.named_parameters()]
    expected += [f"factnet.adapters.b.{n}" for n, _ in b.named_parameters()]
    assert keys == expected


def test_merge_one_at_a_time(vit, images):
    base, a, b = two_adapters(vit)
    with pytest.raises(factnet.FactnetError, match="not the active one"):
        a.merge()
    b.merge()
    assert_close(vit(images), oracle_forward(base, b, 0.5, images), 1e-12, "b merged")
    before = snapshot(vit)
    for switch in (a.activate, lambda: vit.factnet.activate(None),
                   lambda: factnet.Tensorizer(vit).decompose("tt", rank=2, name="c")):
        with pytest.raises(factnet.FactnetError, match="'b' is merged"):
            switch()
        assert_same_model(vit, before)
    b.unmerge()
    a.activate()
    a.merge()
    assert_close(vit(images), oracle_forward(base, a, 2.0, images), 1e-12, "a merged")


def test_delete_one_then_the_last_gives_the_model_back(vit, images):
    before = snapshot(vit)
    modules = dict(vit.named_modules())
    base, a, b = two_adapters(vit)
    assert vit.factnet.delete("b") is vit
    assert vit.factnet.names == ["a"] and vit.factnet.active is None and not b.active
    with pytest.raises(factnet.FactnetError, match="detached"):
        b.merge()
    assert torch.equal(vit(images), base(images))  # nothing active after deleting the active one
    a.activate()
    assert_close(vit(images), oracle_forward(base, a, 2.0, images), 1e-12, "a after b deleted")
    a.detach()
    assert_same_model(vit, before)
    assert all(module is modules[name] for name, module in vit.named_modules())


def test_matrices_only_one_adapter_targets_are_released_with_it(vit):
    factnet.Tensorizer(vit, ["blocks.*.attn.qkv"]).decompose("tt", rank=2, name="attention")
    factnet.Tensorizer(vit, ["blocks.*.mlp.fc1"]).decompose("tt", rank=2, name="mlp")
    kinds = lambda: {n: type(m).__name__ for n, m in vit.named_modules() if n.endswith(("qkv", "fc1"))}  # noqa: E731
    assert set(kinds().values()) == {"AdaptedMatrix"}
    vit.factnet.delete("mlp")
    assert set(kinds().values()) == {"Linear"}  # no adapter acts: the model holds its own modules
    vit.factnet.activate("attention")
    assert kinds()["blocks.0.mlp.fc1"] == "Linear" and kinds()["blocks.0.attn.qkv"] == "AdaptedMatrix"


@pytest.mark.parametrize("name, message", [("", "non-empty strings"), ("a.b", "without dots"), (3, "non-empty")])
def test_bad_names_are_refused(vit, name, message):
    before = snapshot(vit)
    with pytest.raises(factnet.FactnetError, match=message):
        factnet.Tensorizer(vit).decompose("tt", rank=2, name=name)
    assert_same_model(vit, before)


def test_unknown_and_duplicate_names(vit):
    factnet.Tensorizer(vit).decompose("tt", rank=2, name="a")
    before = snapshot(vit)
    with pytest.raises(factnet.FactnetError, match=r"no adapter named 'x'; this model has \['a'\]"):
        vit.factnet.activate("x")
    with pytest.raises(factnet.FactnetError, match="already has an adapter named 'a'"):
        factnet.Tensorizer(vit).decompose("cp", rank=2, name="a")
    assert_same_model(vit, before)


def test_attached_matrices_keep_the_model_mode(vit):
    factnet.Tensorizer(vit).decompose("tt", rank=2, dropout=0.5)  # vit is in eval mode
    assert not any(module.training for module in vit.modules())
    vit.train()
    factnet.Tensorizer(vit).decompose("tt", rank=2, name="second")
    assert all(module.training for module in vit.modules())


def test_load_adds_a_named_adapter_beside_others(vit, images, tmp_path):
    base, a, b = two_adapters(vit)
    with torch.no_grad():
        vit.head.weight.mul_(3.0)  # b's trained head
    b.save(tmp_path / "b.safetensors")
    a.activate()
    a.save(tmp_path / "a.safetensors")  # saved inactive: b's head stays with b
    outputs = {}
    for adapter in (a, b):
        adapter.activate()
        outputs[adapter.name] = vit(images)
    fresh = copy.deepcopy(base)
    factnet.Tensorizer(fresh).decompose("cp", rank=2, name="other")
    before = snapshot(fresh)
    with pytest.raises(factnet.FactnetError, match="already has an adapter named 'other'"):
        factnet.load(fresh, tmp_path / "a.safetensors", name="other")
    assert_same_model(fresh, before)
    loaded_b = factnet.load(fresh, tmp_path / "b.safetensors", name="b")
    loaded_a = factnet.load(fresh, tmp_path / "a.safetensors", name="a")
    assert fresh.factnet.names == ["other", "b", "a"] and loaded_a.active
    assert torch.equal(fresh(images), outputs["a"])
    loaded_b.activate()
    assert torch.equal(fresh(images), outputs["b"])
