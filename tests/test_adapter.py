"""Adapter lifecycle: disable, merge/unmerge, detach, freezing, training, reports."""

from __future__ import annotations

import copy

import pytest
import torch

import factnet
from conftest import TinyNet, assert_close, assert_refused, assert_same_model, randomize_factors, snapshot, tiny_vit
from oracle_support import effective_params, oracle_forward

FORMATS = factnet.available_formats()


def adapted(model, fmt="tt", rank=3, scale=2.0, **kwargs):
    base = copy.deepcopy(model)
    adapter = factnet.Tensorizer(model).decompose(fmt, rank=rank, scale=scale, **kwargs)
    randomize_factors(adapter, seed=4)
    return base, adapter


# ---- registration and freezing -----------------------------------------------------------------
def test_adapter_is_registered_and_keeps_state_dict_keys(vit):
    keys = list(vit.state_dict())
    adapter = factnet.Tensorizer(vit).decompose("tt", rank=2)
    assert isinstance(adapter, torch.nn.Module)
    assert vit.factnet["default"] is adapter and vit.factnet.active_adapter is adapter
    new_keys = list(vit.state_dict())
    assert [k for k in new_keys if not k.startswith("factnet.")] == keys
    factor_names = {f"factnet.adapters.default.{n}" for n, _ in adapter.named_parameters()}
    assert {k for k in new_keys if k.startswith("factnet.")} == factor_names
    ids = {id(p) for p in vit.parameters()}
    assert all(id(p) in ids for p in adapter.parameters())  # the optimizer sees the factors
    assert {n.split(".")[-1] for n, _ in adapter.named_parameters()} == set(adapter.format.factors)


def test_only_factors_and_head_are_trainable(vit):
    adapter = factnet.Tensorizer(vit).decompose("tucker", rank=2)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    expected = {f"factnet.adapters.default.{n}" for n, _ in adapter.named_parameters()} | {"head.weight", "head.bias"}
    assert trainable == expected
    assert {id(p) for p in adapter.trainable_parameters()} == {id(p) for p in vit.parameters() if p.requires_grad}
    assert adapter.num_head_parameters() == vit.head.weight.numel() + vit.head.bias.numel() == 48 * 5 + 5


def test_train_head_false_freezes_the_head(vit):
    adapter = factnet.Tensorizer(vit).decompose("tt", rank=2, train_head=False)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {f"factnet.adapters.default.{n}" for n, _ in adapter.named_parameters()}
    assert adapter.num_head_parameters() == 0


def test_explicit_head_modules_stay_trainable(vit):
    adapter = factnet.Tensorizer(vit).decompose("tt", rank=2, head=["norm", "head"])
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad and not n.startswith("factnet.")}
    assert trainable == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert adapter.num_head_parameters() == 2 * 48 + 48 * 5 + 5


def test_seed_makes_init_reproducible(vit):
    other = copy.deepcopy(vit)
    third = copy.deepcopy(vit)
    a = factnet.Tensorizer(vit).decompose("tucker", rank=3, seed=11)
    b = factnet.Tensorizer(other).decompose("tucker", rank=3, seed=11)
    c = factnet.Tensorizer(third).decompose("tucker", rank=3, seed=12)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith(".v"):
            assert not torch.equal(pa, pc), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_at_init_float32_train_and_eval(fmt):
    torch.manual_seed(0)
    model = tiny_vit()
    base = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    rank = min(2, min(factnet.get_format(fmt, 1).max_rank(*s) for s in factnet.Tensorizer(model).group_shapes().values()))
    factnet.Tensorizer(model).decompose(fmt, rank=rank, scale=10.0)
    for mode in (True, False):
        model.train(mode)
        base.train(mode)
        assert torch.equal(model(x), base(x))
        with torch.no_grad():
            assert torch.equal(model(x), base(x))


# ---- disable -----------------------------------------------------------------------------------
def test_disable_gives_base_output_and_restores(vit, images):
    base, adapter = adapted(vit)
    adapted_out = vit(images)
    assert_close(adapted_out, oracle_forward(base, adapter, 2.0, images), 1e-10, "adapted")
    assert not torch.allclose(adapted_out, base(images))
    with adapter.disable():
        assert torch.equal(vit(images), base(images))
    assert torch.equal(vit(images), adapted_out)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.disable():
            raise RuntimeError("boom")
    assert torch.equal(vit(images), adapted_out)


def test_disable_while_merged(vit, images):
    base, adapter = adapted(vit)
    adapted_out = vit(images)
    adapter.merge()
    with adapter.disable():
        assert not adapter.merged
        assert_close(vit(images), base(images), 1e-12, "disabled while merged")
    assert adapter.merged
    assert_close(vit(images), adapted_out, 1e-12, "merged again")


# ---- merge / unmerge ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_equals_forward_and_unmerge_restores(fmt, vit, images):
    rank = min(3, min(factnet.get_format(fmt, 1).max_rank(*s) for s in factnet.Tensorizer(vit).group_shapes().values()))
    base, adapter = adapted(vit, fmt, rank=rank, scale=1.5)
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    out = vit(images)
    adapter.merge()
    merged_out = vit(images)
    assert_close(merged_out, out, 1e-10, "merged vs unmerged")
    params = dict(vit.named_parameters())
    expected = effective_params(base, adapter, 1.5)
    assert expected  # something was merged
    for name, weight in expected.items():
        assert_close(params[name], weight, 1e-12, name)
    for name, weight in before.items():  # nothing else moved
        if name not in expected:
            assert torch.equal(params[name], weight), name
    adapter.unmerge()
    for name, weight in before.items():
        assert_close(params[name], weight, 1e-12, name)
    assert_close(vit(images), out, 1e-10, "after unmerge")


def test_merge_twice_and_unmerge_without_merge_raise(vit):
    base, adapter = adapted(vit)
    with pytest.raises(factnet.FactnetError, match="not merged"):
        adapter.unmerge()
    adapter.merge()
    assert_refused(vit, "already merged", adapter.merge)
    assert adapter.merged


def test_merged_model_does_not_train_the_factors_silently(vit, images):
    """Once merged, the forward is the plain base GEMM: no graph to the factors."""
    base, adapter = adapted(vit)
    adapter.merge()
    vit(images).sum().backward()
    assert all(p.grad is None for p in adapter.parameters())


# ---- detach ------------------------------------------------------------------------------------
def test_detach_restores_model_exactly(vit, images):
    vit.pos_embed.requires_grad_(False)  # a user's own freezing must survive
    vit.blocks[1].norm1.weight.requires_grad_(False)
    vit.train()
    before = snapshot(vit)
    modules = dict(vit.named_modules())
    out = vit(images)
    base, adapter = adapted(vit, "tucker")
    vit(images).sum().backward()
    model = adapter.detach()
    assert model is vit
    assert_same_model(vit, before)
    for name, module in vit.named_modules():
        assert module is modules[name], name  # the very same module objects are back
    assert torch.equal(vit(images), out)
    # the detached model can be adapted again
    again = factnet.Tensorizer(vit).decompose("tt", rank=2)
    assert vit.factnet["default"] is again


def test_detach_of_a_merged_adapter_is_explicit(vit, images):
    """A merged adapter changed the weights: detach() refuses until unmerged, or keeps them on request."""
    before = snapshot(vit)
    out = vit(images)
    base, adapter = adapted(vit, "tt", scale=3.0)
    adapter.merge()
    with pytest.raises(factnet.FactnetError, match="unmerge"):
        adapter.detach()
    adapter.unmerge()
    adapter.detach()
    assert_same_model(vit, before, tol=1e-6)
    torch.testing.assert_close(vit(images), out, rtol=1e-5, atol=1e-5)
    base, adapter = adapted(vit, "tt", scale=3.0)
    adapter.merge()
    kept = adapter.detach(keep_merged=True)
    assert kept is vit and getattr(vit, "factnet", None) is None
    assert not torch.allclose(vit(images), out)


def test_detach_removes_forward_hooks(vit):
    hooks_before = (len(vit._forward_pre_hooks), len(vit._forward_hooks))
    adapter = factnet.Tensorizer(vit).decompose("tt", rank=2)
    adapter.detach()
    assert (len(vit._forward_pre_hooks), len(vit._forward_hooks)) == hooks_before
    for module in vit.modules():
        assert type(module).__name__ != "AdaptedMatrix"


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tt", "tucker", "batch-matrix"])
def test_adamw_steps_change_only_factors_and_head(fmt, vit, images):
    torch.manual_seed(0)
    vit.train()
    backbone = {n: p.detach().clone() for n, p in vit.named_parameters() if not n.startswith("head.")}
    adapter = factnet.Tensorizer(vit).decompose(fmt, rank=2, scale=4.0, dropout=0.1)
    factors_before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    head_before = {n: p.detach().clone() for n, p in vit.head.named_parameters()}
    out_before = vit(images).detach()
    trainable = [p for p in vit.parameters() if p.requires_grad]
    assert len(trainable) == len(factors_before) + len(head_before)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-4)
    labels = torch.tensor([1, 3])
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(vit(images), labels).backward()
        optimizer.step()
    for name, param in vit.named_parameters():
        if name in backbone:
            assert torch.equal(param, backbone[name]), f"backbone {name} changed"
    for name, param in adapter.named_parameters():
        assert not torch.equal(param, factors_before[name]), f"factor {name} did not train"
    for name, param in vit.head.named_parameters():
        assert not torch.equal(param, head_before[name]), f"head {name} did not train"
    vit.eval()
    assert not torch.allclose(vit(images), out_before)


# ---- reports -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_and_shapes_agree_with_the_dry_run(fmt, vit):
    tensorizer = factnet.Tensorizer(vit, ["blocks.*.attn.qkv[q,v]", "blocks.*.mlp.*"]).group(
        {"attention": "blocks.*.attn.*", "mlp": ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]})
    assert tensorizer.group_shapes() == {"attention": (4, 48, 48), "mlp": (16, 48, 48)}
    rank = min(3, factnet.get_format(fmt, 1).max_rank(4, 48, 48))
    dry = tensorizer.num_parameters(fmt, rank)
    adapter = tensorizer.decompose(fmt, rank=rank)
    fmt_obj = factnet.get_format(fmt, rank)
    assert adapter.group_shapes() == tensorizer.group_shapes()
    assert adapter.num_parameters_by_group() == {
        "attention": fmt_obj.num_parameters(4, 48, 48), "mlp": fmt_obj.num_parameters(16, 48, 48)}
    assert adapter.num_parameters() == dry == sum(p.numel() for p in adapter.parameters())


# ---- the per-step normal-form cache must never serve stale factors ------------------------------
def test_factors_replaced_through_data_are_seen_by_merge(vit, images):
    """`torch.nn.utils.vector_to_parameters` assigns ``param.data``; merge() must use the new values."""
    base, adapter = adapted(vit)
    with torch.no_grad():
        vit(images)  # a no-grad forward right before, as in an eval loop
    vector = torch.randn(sum(p.numel() for p in adapter.parameters()), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(9)) * 0.3
    torch.nn.utils.vector_to_parameters(vector, adapter.parameters())
    adapter.merge()
    params = dict(vit.named_parameters())
    for name, weight in effective_params(base, adapter, 2.0).items():
        assert_close(params[name], weight, 1e-12, f"merged {name} uses stale factors")


@pytest.mark.parametrize("fmt", ["tt", "tucker", "cp", "tensor-ring", "batch-matrix"])
def test_gradient_accumulation_through_forward_features(fmt, vit, images):
    """Two backward passes through ``model.forward_features`` (no root ``__call__``), as in
    gradient accumulation with a custom head: the second must work and give the same grads."""
    base, adapter = adapted(vit, fmt, rank=2)
    vit.train()
    vit.forward_features(images).sum().backward()
    first = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    vit.forward_features(images).sum().backward()
    for name, param in adapter.named_parameters():
        assert_close(param.grad, 2 * first[name], 1e-10, name)


def test_calling_a_submodule_directly_sees_updated_factors():
    """An adapted block called on its own (not via the root model) uses the current factors."""
    torch.manual_seed(0)
    model = tiny_vit().double()
    base, adapter = adapted(model, "tucker")
    tokens = torch.randn(2, 5, 48, dtype=torch.float64)
    block = model.blocks[0]
    first = block(tokens)
    randomize_factors(adapter, seed=99)  # in-place edit: bumps versions, cache must notice
    second = block(tokens)
    expected = oracle_forward(base.blocks[0], _sub(adapter, "blocks.0."), 2.0, tokens)
    assert not torch.allclose(first, second)
    assert_close(second, expected, 1e-10, "block after factor update")


class _SubAdapter:
    """The groups of an adapter restricted to slices under a module prefix (for the oracle)."""

    def __init__(self, adapter, prefix):
        self.groups = {}
        for key, group in adapter.groups.items():
            keep = [i for i, s in enumerate(group.slices) if s.module.startswith(prefix)]
            if keep:
                self.groups[key] = _SubGroup(group, keep, prefix)


class _SubGroup:
    def __init__(self, group, keep, prefix):
        import dataclasses

        self.format = _Sliced(group.format, keep)
        self.factors, self.seeded = group.factors, group.seeded
        self.slices = [dataclasses.replace(group.slices[i], matrix=dataclasses.replace(
            group.slices[i].matrix, name=group.slices[i].module[len(prefix):])) for i in keep]


class _Sliced:
    def __init__(self, fmt, keep):
        self.fmt, self.keep = fmt, keep

    def reference(self, factors):
        return self.fmt.reference(factors)[self.keep]


def _sub(adapter, prefix):
    return _SubAdapter(adapter, prefix)


def test_tiny_net_head_found_without_timm():
    torch.manual_seed(0)
    model = TinyNet(d=4)
    tensorizer = factnet.Tensorizer(model)
    assert [s.module for s in tensorizer.slices] == ["qkv"] * 3 + ["proj"] + ["fc1"] * 4 + ["fc2"] * 4  # no head
    adapter = tensorizer.decompose("tt", rank=2)
    assert adapter.num_head_parameters() == 4 * 3 + 3
    assert {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("factnet.")} == {
        "head.weight", "head.bias"}
