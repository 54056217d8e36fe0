"""Adapters trained low-bit (``decompose(..., bits=b)``): the forward uses the values a ``b``-bit file stores,
so the saved file reproduces the trained model bit for bit; gradients reach every factor (straight
through); merge and mixed batches work as for any adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_vit
from io_support import FORMATS, train

import factnet
from factnet.quant import BITS

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(fmt: str, bits: int, name: str = "default", model: torch.nn.Module | None = None):
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    model = copy.deepcopy(base) if model is None else model
    rank = min(2, *(factnet.get_format(fmt, 2).max_rank(*s) for s in factnet.Tensorizer(model).group_shapes().values()))
    adapter = factnet.Tensorizer(model).decompose(fmt, rank=rank, scale=1.5, bits=bits, name=name)
    train(adapter)
    return base, model, adapter


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", FORMATS)
@torch.no_grad()
def test_the_saved_file_is_the_trained_model_bit_for_bit(fmt, bits, tmp_path, images):
    base, model, adapter = _trained(fmt, bits)
    trained = model(images)
    saved = adapter.save(tmp_path / "a.safetensors")  # in the adapter's bits (the head as it is)
    assert all(error == 0.0 for key, error in saved.errors.items())  # its values are stored ones already
    loaded = factnet.load(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert torch.equal(loaded.model(images), trained)
    with model.factnet.disable():
        assert not torch.allclose(model(images), trained)  # (the adapter does act)


@pytest.mark.parametrize("bits", [1, 4])
def test_gradients_go_straight_through_to_every_factor(bits, images):
    _, model, adapter = _trained("tt", bits)
    model.train()
    model(images).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


@torch.no_grad()
def test_merge_and_mixed_batches_use_the_stored_values(images):
    base, model, a = _trained("tucker", 2, name="a")
    _, _, b = _trained("tt", 1, name="b", model=model)
    expected = {}
    for name in ("a", "b"):
        model.factnet.activate(name)
        expected[name] = model(images)
    with model.factnet.per_sample(["b", "a"]):
        mixed = model(images)
    torch.testing.assert_close(mixed[0], expected["b"][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mixed[1], expected["a"][1], rtol=1e-9, atol=1e-12)
    model.factnet.activate("a")
    a.merge()
    torch.testing.assert_close(model(images), expected["a"], rtol=1e-9, atol=1e-12)


def test_bad_bits_are_an_error():
    model = tiny_vit()
    with pytest.raises(factnet.FactnetError, match="bits must be one of 1, 2, 4, 8"):
        factnet.Tensorizer(model).decompose("tt", rank=2, bits=3)
    assert not hasattr(model, "factnet")
