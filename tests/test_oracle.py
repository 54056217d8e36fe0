"""End-to-end oracle checks on a tiny timm ViT: every format, default and partial targets.

The adapted model must equal a copy of the base model whose weights were edited densely,
``W_block += s · ΔW[i]ᵀ`` with ``ΔW`` reconstructed by tensorly; gradients must match
autograd through that dense weight.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import factnet
from factnet import Tensorizer

SCALE = 1.7


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2, embed_dim=48, num_heads=3, drop_rate=0.0).eval()


def dense_copy(base: torch.nn.Module, adapter: factnet.Adapter, scale: float) -> torch.nn.Module:
    """``base`` with ``s·ΔW`` written into its weights from tensorly's reconstruction."""
    edited = copy.deepcopy(base)
    with torch.no_grad():
        for group in adapter.groups.values():
            dense = group.format.reference(dict(group.factors.items()) | dict(group.seeded.named_buffers()))
            for i, piece in enumerate(group.slices):
                weight = edited.get_submodule(piece.module).weight
                rows = slice(piece.index * piece.d_out, (piece.index + 1) * piece.d_out)
                cols = slice(piece.index * piece.d_in, (piece.index + 1) * piece.d_in)
                block = {"out": weight[rows, :], "in": weight[:, cols], "none": weight}[piece.side]
                block += scale * dense[i].T
    return edited


@pytest.mark.parametrize("fmt", factnet.available_formats())
@pytest.mark.parametrize("targets", [None, ["blocks.*.attn.qkv[q,v]", "blocks.*.mlp.fc2[1,3]"]])
def test_matches_dense_oracle(fmt: str, targets: list[str] | None) -> None:
    base = tiny_vit()
    model = copy.deepcopy(base)
    x = torch.randn(2, 3, 32, 32)
    adapter = Tensorizer(model, targets).decompose(fmt, rank=3, scale=SCALE, seed=1)
    assert torch.equal(model(x), base(x))  # zero increment at init, exactly
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.3)
    expected = dense_copy(base, adapter, SCALE)(x)
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    adapter.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    for name, param in base.named_parameters():
        torch.testing.assert_close(model.get_parameter(name), param, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["tt", "tucker", "batch-matrix"])
def test_gradients_match_dense_autograd(fmt: str) -> None:
    base = tiny_vit()
    model = copy.deepcopy(base)
    x = torch.randn(2, 3, 32, 32)
    adapter = Tensorizer(model).decompose(fmt, rank=3, scale=SCALE, train_head=False, seed=2)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.3)
    model(x).square().sum().backward()
    # oracle: the same loss through W + s·ΔW with ΔW from the format's own einsum, by autograd
    oracle = copy.deepcopy(base)
    for p in oracle.parameters():
        p.requires_grad_(False)
    factors = {k: {n: p.detach().clone().requires_grad_() for n, p in g.factors.items()}
               for k, g in adapter.groups.items()}
    originals = {n: m.weight.clone() for n, m in oracle.named_modules() if isinstance(m, torch.nn.Linear)}
    for key, group in adapter.groups.items():
        dense = group.format.reconstruct(factors[key])
        for i, piece in enumerate(group.slices):
            module = oracle.get_submodule(piece.module)
            weight = module.weight if isinstance(module.weight, torch.Tensor) and not isinstance(
                module.weight, torch.nn.Parameter) else originals[piece.module].clone()
            rows = slice(piece.index * piece.d_out, (piece.index + 1) * piece.d_out)
            cols = slice(piece.index * piece.d_in, (piece.index + 1) * piece.d_in)
            delta = torch.zeros_like(weight)
            index = {"out": (rows, slice(None)), "in": (slice(None), cols), "none": (slice(None), slice(None))}
            delta[index[piece.side]] = SCALE * dense[i].T
            del module.weight
            module.weight = weight + delta
    oracle(x).square().sum().backward()
    for key, group in adapter.groups.items():
        for name, param in group.factors.items():
            torch.testing.assert_close(param.grad, factors[key][name].grad, rtol=1e-4, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == {f"factnet.adapters.default.groups.{k}.factors.{n}" for k, g in adapter.groups.items() for n in g.factors}


def test_paper_counts_vit_base() -> None:
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    assert Tensorizer(model).num_parameters("tt", 4) == 8448 == 2 * 768 * 4 + 144 * 4**2
    assert Tensorizer(model).num_parameters("tucker", 8) == 13952 == 2 * 768 * 8 + 144 * 8 + 8**3
    lora = Tensorizer(model, ["blocks.*.attn.qkv[q,v]"]).num_parameters("batch-matrix", 8)
    assert lora == 294912 == 4 * 12 * 768 * 8
    adapter = Tensorizer(model).decompose("tt", rank=4)
    assert adapter.num_parameters() == 8448
    assert adapter.num_head_parameters() == 768 * 100 + 100


def test_dropout_changes_training_output_only() -> None:
    base = tiny_vit()
    model = copy.deepcopy(base)
    adapter = Tensorizer(model).decompose("tt", rank=3, scale=SCALE, dropout=0.5, seed=3)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    evaluated = model.eval()(x)
    adapter.settings.dropout = 0.0
    torch.testing.assert_close(model.train()(x), evaluated)  # eval applies no dropout
    adapter.settings.dropout = 0.5
    assert not torch.allclose(model.train()(x), evaluated)
