"""Any model, verified: weights read outside their module's forward (and by the model's own forward: the
first-forward guard), exactness at init for every kind, copies of adapted models, and training while merged."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import factnet
from conftest import (
    TinyGPT2,
    assert_close,
    factor_leaves,
    randomize_factors,
    tiny_convnext,
    tiny_transformer_encoder,
    tiny_vit,
)
from oracle_support import oracle_forward
from factnet import FactnetError


class FunctionalBlock(nn.Module):
    """Reads its children's weights itself, as BEiT/EVA/SwinV2 (``F.linear(x, self.qkv.weight)``)
    and torchvision's Swin (``shifted_window_attention(x, self.qkv.weight, self.proj.weight, ...)``) do."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias = nn.Parameter(torch.randn(d))
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros(2 * self.q_bias.numel(), dtype=x.dtype)])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, -1)
        x = x + F.linear(torch.tanh(q) * k + v, self.proj.weight, self.proj.bias)
        x = x + self.fc2(F.gelu(self.fc1(x)))  # these through their own forward
        return self.head(x)


class Wrapped(nn.Module):
    """A model around its blocks (reads by a submodule's forward see W + s·ΔW; the root's own do not)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _x(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["tt", "tucker", "batch-matrix"])
def test_weights_read_by_the_parent_get_their_increment_and_exact_gradients(fmt):
    torch.manual_seed(0)
    model = Wrapped(FunctionalBlock()).double()
    base = copy.deepcopy(model)
    x = _x(5, 6)
    adapter = factnet.Tensorizer(model, ["block.qkv", "block.proj", "block.fc1", "block.fc2"]).decompose(
        fmt, rank=2, scale=1.5, seed=0)
    assert torch.equal(model(x), base(x))
    randomize_factors(adapter, std=0.4)
    y = model(x)
    assert_close(y, oracle_forward(base, adapter, 1.5, x), 1e-10, "forward")
    assert (y - base(x)).abs().max() > 1e-3  # the qkv/proj increments show
    y.square().sum().backward()
    leaves = factor_leaves(adapter)
    oracle_forward(base, adapter, 1.5, x, factors=leaves).square().sum().backward()
    for key, group in adapter.groups.items():
        for name, factor in group.factors.items():
            assert_close(factor.grad, leaves[key][name].grad, 1e-9, f"grad {key}.{name}")
    with torch.no_grad():
        adapter.merge()
        assert_close(model(x), y, 1e-10, "merged")


def test_only_functional_reads_still_train():
    """EVA-02 with targets=["blocks.*.attn.qkv"] gave every factor a None gradient before."""
    model = Wrapped(FunctionalBlock()).double()
    adapter = factnet.Tensorizer(model, ["block.qkv"]).decompose("tt", rank=2, seed=0, train_head=False)
    model(_x(5, 6)).sum().backward()
    grads = {name: p.grad for name, p in adapter.named_parameters()}
    assert all(g is not None for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())


def test_a_read_by_the_models_own_forward_is_an_error_and_outside_forward_weight_is_the_parameter():
    model = FunctionalBlock().double()  # the root itself reads qkv.weight and proj.weight
    adapter = factnet.Tensorizer(model, ["qkv", "proj"]).decompose("tt", rank=2, seed=0)
    with pytest.raises(FactnetError, match=r"proj, qkv.*model's own forward"):
        model(_x(5, 6))
    # outside any forward, module.weight is the parameter: get_parameter, FSDP2 and inspection see it
    assert model.get_parameter("qkv.weight") is model.qkv.weight is dict(model.named_parameters())["qkv.weight"]
    assert isinstance(model.qkv.weight, nn.Parameter) and adapter.num_parameters() > 0


def _bitwise_cases():
    def convnext():
        return tiny_convnext(conv_mlp=True, ls_init_value=1.0)

    return {
        "conv1x1": (convnext, lambda: (torch.randn(2, 3, 32, 32),)),
        "linear": (tiny_vit, lambda: (torch.randn(2, 3, 32, 32),)),
        "conv1d": (TinyGPT2, lambda: (torch.randint(0, 11, (2, 6)),)),
        "mha": (tiny_transformer_encoder, lambda: (torch.randn(2, 5, 16),)),
        "functional": (lambda: Wrapped(FunctionalBlock()), lambda: (torch.randn(5, 6),)),
    }


@pytest.mark.parametrize("kind", list(_bitwise_cases()))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_exact_at_init_bit_for_bit_in_float32(kind, dropout):
    build, inputs = _bitwise_cases()[kind]
    torch.manual_seed(0)
    model = build()
    # torch's MHA picks its kernel by whether the weights require grad: compare like with like
    trainable, frozen = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    x = inputs()
    factnet.Tensorizer(model).decompose("tt", rank=2, dropout=dropout, seed=0)
    for mode in ("train", "eval"):
        for m in (model, trainable, frozen):
            m.train(mode == "train")
            for module in m.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        with torch.no_grad():
            assert torch.equal(model(*x), frozen(*x)), mode
        assert torch.equal(model(*x), trainable(*x)), f"{mode}, grad enabled"


def _adapted_vit():
    torch.manual_seed(0)
    model = tiny_vit().double()
    adapter = factnet.Tensorizer(model).decompose("tucker", rank=2, seed=0)
    randomize_factors(adapter, std=0.3)
    return model, adapter


@pytest.mark.parametrize("when", ["after a forward without backward", "merged", "several adapters"])
def test_deepcopy_and_pickle_work_and_the_copy_is_independent(when):
    model, adapter = _adapted_vit()
    x = _x(2, 3, 32, 32)
    if when == "several adapters":
        factnet.Tensorizer(model).decompose("tt", rank=2, seed=1, name="other")
        adapter.activate()
    model(x)  # grad enabled: the cached normal forms hold a graph
    with torch.no_grad():  # like with like: the kernel may add the increment another exact way with grad
        y = model(x)
    if when == "merged":
        adapter.merge()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert_close(clone(x), y, 1e-12 if when == "merged" else 0.0, "copy")
        assert clone.factnet is not model.factnet and clone.factnet.names == model.factnet.names
        if when == "merged":
            clone.factnet.active_adapter.unmerge()
        clone_adapter = clone.factnet.active_adapter
        with torch.no_grad():
            for p in clone_adapter.parameters():
                p.add_(1.0)
        for name in clone.factnet.names:
            clone.factnet.delete(name)
        assert "factnet" not in dict(clone.named_children())
        with torch.no_grad():  # the original: untouched, still adapted, hooks in place
            assert_close(model(x), y, 1e-12 if when == "merged" else 0.0, "original")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert_close(torch.load(buffer, weights_only=False)(x), y, 1e-12 if when == "merged" else 0.0, "torch.load")


def test_pickle_and_copy_of_an_adapted_multihead_attention_model():
    model = tiny_transformer_encoder().double()
    factnet.Tensorizer(model).decompose("tt", rank=2, seed=0)
    randomize_factors(model.factnet.active_adapter, std=0.3)
    x = _x(2, 5, 16)
    y = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert_close(clone(x), y, 1e-12, "copy")
        clone.factnet.delete("default")
        assert type(clone.layers[0].self_attn) is nn.MultiheadAttention


def test_to_dtype_keeps_the_adapter_working():
    model, adapter = _adapted_vit()
    x = _x(2, 3, 32, 32)
    y = model(x)
    model.float()
    assert next(adapter.parameters()).dtype == torch.float32
    out = model(x.float())
    assert_close(out, y, 1e-5, "float32 copy")
    out.sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())


def test_training_while_merged_raises_and_head_only_training_is_allowed():
    model, adapter = _adapted_vit()
    x = _x(2, 3, 32, 32)
    adapter.merge()
    with torch.no_grad():
        model(x)  # inference on the merged model is fine
    loss = model(x).sum()  # so is a forward; the backward would give the factors nothing
    with pytest.raises(FactnetError, match="merged"):
        loss.backward()
    adapter.requires_grad_(False)  # training only the head on the merged model is a choice
    model(x).sum().backward()
    assert model.head.weight.grad is not None
