"""Repetition: 100 merge/unmerge cycles without drift, and a bitwise save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    randomize_factors,
    tiny_vit,
)

import factnet

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- round trips under repetition ------------------------------------------------------------------------
def test_merge_unmerge_100_cycles_without_drift():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    adapter = factnet.Tensorizer(model).decompose("tt", rank=4, scale=1.0)
    randomize_factors(adapter, std=0.17)
    names = list(adapter.matrices)
    weights = {n: model.get_submodule(n).weight for n in names}
    original = {n: w.detach().clone() for n, w in weights.items()}
    deltas = {n: adapter.delta_weight(n) for n in names}
    ratios = [(torch.linalg.norm(deltas[n]) / torch.linalg.norm(original[n])).item() for n in names]
    assert 0.3 < min(ratios) and max(ratios) < 3  # ‖s·ΔW‖ ≈ ‖W‖: rounding in merge/unmerge would show
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
    errors = []
    for cycle in range(100):
        adapter.merge()
        if cycle % 25 == 0:
            for n in names:
                torch.testing.assert_close(weights[n].detach(), original[n] + deltas[n], rtol=0, atol=1e-6)
            with torch.no_grad():
                torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
        adapter.unmerge()
        errors.append(max((torch.linalg.norm(weights[n].detach().double() - original[n].double())
                           / torch.linalg.norm(original[n].double())).item() for n in names))
    assert max(errors) <= 1e-6
    assert errors[-1] <= 2 * errors[0] + 1e-9  # rounding does not accumulate cycle after cycle
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    print(f"\nrelative weight error after merge/unmerge: cycle 1 {errors[0]:.2e}, cycle 100 {errors[-1]:.2e}, "
          f"worst {max(errors):.2e}")


def test_save_load_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tucker", rank=3, scale=2.0)
    randomize_factors(adapter, std=0.3)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    adapter.save(tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    factnet.load(fresh, tmp_path / "a.safetensors")
    expected, actual = model.state_dict(), fresh.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
