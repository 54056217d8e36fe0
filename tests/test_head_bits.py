"""The head trained low-bit (``decompose(..., head_bits=b)``): the forward uses the head values a ``b``-bit
file stores (checked against a dense head computed from `factnet.quant`), so the saved file reproduces the
trained model bit for bit; the gradient reaches the float head; mixed batches and LoRA export use the
stored values; detach takes the hooks off; the head's bytes are reported apart."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from conftest import tiny_vit
from io_support import train
from torch import nn

import factnet
from factnet.quant import BITS, dequantize, quantize, stored_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


class NormHead(nn.Module):
    """Two linear blocks and a head of two modules with parameters (LayerNorm, Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(24, 24) for _ in range(2)])
        self.head = nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def _stored(value: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize(quantize(value, bits)).to(value.dtype)


def _adapted(bits: int, name: str = "default", model: nn.Module | None = None):
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    model = copy.deepcopy(base) if model is None else model
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2, scale=1.5, head_bits=bits, name=name)
    train(adapter)
    return base, model, adapter


@pytest.mark.parametrize("bits", BITS)
@torch.no_grad()
def test_the_forward_uses_the_stored_head_and_the_file_is_the_trained_model(bits, tmp_path, images):
    base, model, adapter = _adapted(bits)
    trained = model(images)
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    head = model.head
    expected = features @ _stored(head.weight, bits).T + _stored(head.bias, bits)  # the head as stored, dense
    torch.testing.assert_close(trained, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(trained, features @ head.weight.T + head.bias)  # (the float head is not used)
    saved = adapter.save(tmp_path / "a.safetensors")
    assert saved.errors == {"head.head.weight": 0.0, "head.head.bias": 0.0}
    assert saved.head_bytes == stored_bytes(head.weight.numel(), bits) + stored_bytes(head.bias.numel(), bits)
    loaded = factnet.load(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert torch.equal(loaded.model(images), trained)


def test_a_head_of_several_modules_and_the_gradient_reaches_the_float_values(tmp_path):
    torch.manual_seed(0)
    model, x, y = NormHead(), torch.randn(16, 24), torch.arange(16) % 5
    base = copy.deepcopy(model)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2, head_bits=2, seed=0)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    for _ in range(5):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in model.head.named_parameters())  # straight through
    with torch.no_grad():
        stored = {n: _stored(p, 2) for n, p in model.head.named_parameters()}
        hidden = x
        for block in model.blocks:
            hidden = torch.relu(block(hidden))
        normed = nn.functional.layer_norm(hidden, (24,), stored["0.weight"], stored["0.bias"])
        torch.testing.assert_close(model(x), normed @ stored["1.weight"].T + stored["1.bias"], rtol=1e-6, atol=1e-6)
        adapter.save(tmp_path / "a.safetensors")
        assert torch.equal(factnet.load(base, tmp_path / "a.safetensors").model(x), model(x))


@torch.no_grad()
def test_mixed_batches_and_another_active_adapter_use_each_head_as_trained(images):
    base, model, low = _adapted(1, name="low")
    _, _, plain = _adapted(None, name="plain", model=model)  # float head, another adapter
    expected = {}
    for name in ("low", "plain"):
        model.factnet.activate(name)
        expected[name] = model(images)
    assert not torch.allclose(expected["low"], expected["plain"])
    for active in ("plain", "low"):  # (with "low" active, its head's forward runs the mixed heads' copies)
        model.factnet.activate(active)
        with model.factnet.per_sample(["plain", "low"]):
            mixed = model(images)
        torch.testing.assert_close(mixed[0], expected["plain"][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mixed[1], expected["low"][1], rtol=1e-9, atol=1e-12)
    model.factnet.activate("low")  # its float head back in the model: the forward still reads it low-bit
    torch.testing.assert_close(model(images), expected["low"], rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_lora_export_writes_the_stored_head(tmp_path):
    _, model, adapter = _adapted(4)
    factnet.export_lora(adapter, tmp_path / "lora")
    tensors = safetensors.torch.load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    head = {k.rsplit(".", 1)[-1]: v for k, v in tensors.items() if ".head." in k or k.startswith("head.")}
    assert torch.equal(head["weight"], _stored(model.head.weight, 4))
    assert torch.equal(head["bias"], _stored(model.head.bias, 4))


@torch.no_grad()
def test_detach_takes_the_hooks_off_and_copies_keep_them(images):
    base, model, adapter = _adapted(8)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(copied(images), model(images), rtol=0, atol=0)
    adapter.detach()
    assert not model.head._forward_pre_hooks and not model.head._forward_hooks
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(model(images), features @ model.head.weight.T + model.head.bias, rtol=0, atol=0)


def test_bad_head_bits_are_an_error():
    model = tiny_vit()
    with pytest.raises(factnet.FactnetError, match="bits must be one of 1, 2, 4, 8"):
        factnet.Tensorizer(model).decompose("tt", rank=2, head_bits=16)
    with pytest.raises(factnet.FactnetError, match="no trainable head here \\(train_head=False\\)"):
        factnet.Tensorizer(model).decompose("tt", rank=2, head_bits=4, train_head=False)
    assert not hasattr(model, "factnet")
