"""Low-bit values (`factnet.quant`) against a reference written here in NumPy from the rule alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factnet import FactnetError
from factnet.quant import BITS, dequantize, fake_quantize, quantize, stored_bytes


def _reference(x: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Each group of ``group`` flat values stored by the module doc's rule, rebuilt in float32."""
    flat = x.astype(np.float32).reshape(-1)
    out = np.empty_like(flat)
    for start in range(0, flat.size, group):
        part = flat[start: start + group]
        if bits == 1:
            scale = np.float32(np.float16(np.abs(part).sum(dtype=np.float32) / np.float32(part.size)))
            out[start: start + group] = np.where(part >= 0, scale, -scale)
            continue
        offset = np.float32(np.float16(part.min()))
        scale = np.float32(np.float16((part.max() - offset) / np.float32(2**bits - 1)))
        codes = np.clip(np.round((part - offset) / scale), 0, 2**bits - 1) if scale > 0 else np.zeros_like(part)
        out[start: start + group] = offset + scale * codes.astype(np.float32)
    return out.reshape(x.shape)


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shape=shapes, bits=st.sampled_from(BITS), group=st.sampled_from([1, 3, 8, 64]), seed=st.integers(0, 2**16))
def test_values_are_the_rules_and_come_back_exactly(shape, bits, group, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    q = quantize(x, bits, group)
    values = dequantize(q)
    np.testing.assert_allclose(values.numpy(), _reference(x.numpy(), bits, group), rtol=1e-6, atol=1e-6)
    assert torch.equal(fake_quantize(x, bits, group), values.double())  # what training sees is what is stored
    again = quantize(values, bits, group)  # stored values store as themselves
    assert torch.equal(dequantize(again), values)
    stored = q.codes.numel() + 2 * q.scale.numel() + (0 if q.offset is None else 2 * q.offset.numel())
    assert q.codes.dtype == torch.uint8 and stored == stored_bytes(x.numel(), bits, group)


def test_more_bits_are_closer_and_zeros_stay_zero():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    errors = [(dequantize(quantize(x, b)) - x).abs().mean().item() for b in BITS]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 * x.abs().mean().item()
    for b in BITS:
        assert torch.equal(dequantize(quantize(torch.zeros(5, 7), b)), torch.zeros(5, 7))


def test_the_gradient_goes_straight_through():
    x = torch.randn(3, 5, requires_grad=True)
    weights = torch.randn(3, 5)
    (fake_quantize(x, 2, 4) * weights).sum().backward()
    assert torch.equal(x.grad, weights)


@pytest.mark.parametrize("bits, group", [(3, 64), (0, 64), (True, 64), ("4", 64), (4, 0), (4, 2.5)])
def test_bad_bits_or_groups_are_errors(bits, group):
    with pytest.raises(FactnetError, match="bits must be|group must be"):
        quantize(torch.ones(3), bits, group)
