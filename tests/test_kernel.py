"""The training kernel against the dense oracle ``x (W + s·ΔW)ᵀ``: forward, gradients, merge.

Models are `TinyNet`s (Linear (d, d), (3d, d), (4d, d), (d, 4d), optionally a whole (d+1, d));
hypothesis draws the format's rank, which blocks of which matrices are targeted, how slices
are grouped (groups may split one matrix), the scale and the input shape.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    TinyNet,
    assert_close,
    effective_params,
    oracle_forward,
    randomize_factors,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_support import (
    FORMATS,
    build,
    cases,
    check_gradients,
)

import factnet


# ---- forward, gradients, merge (float64) -----------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=60)
@given(data=st.data())
def test_forward_gradients_and_merge_match_dense_oracle(name, data):
    case = data.draw(cases(name))
    model, base, adapter, x = build(case)

    # zero at init: the adapted model is the base model, bit for bit
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), base(x))
    # at init the gradients already match (and the zero factor gets one)
    check_gradients(model, base, adapter, case.scale, x, 1e-10)

    randomize_factors(adapter, seed=case.seed)
    check_gradients(model, base, adapter, case.scale, x, 1e-10)
    with torch.no_grad():
        assert_close(model(x), oracle_forward(base, adapter, case.scale, x), 1e-10, "no-grad forward")

    # merge: the weights become W + s·ΔW, the output is unchanged; unmerge restores W
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("factnet.")}
    with torch.no_grad():
        unmerged = model(x)
    adapter.merge()
    assert adapter.merged
    with torch.no_grad():
        assert_close(model(x), unmerged, 1e-10, "merged forward")
    params = dict(model.named_parameters())
    for pname, weight in effective_params(base, adapter, case.scale).items():
        assert_close(params[pname], weight, 1e-12, f"merged {pname}")
    adapter.unmerge()
    assert not adapter.merged
    for pname, weight in before.items():
        assert_close(params[pname], weight, 1e-12, f"unmerged {pname}")
    with torch.no_grad():
        assert_close(model(x), unmerged, 1e-10, "after unmerge")


# ---- float32 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=15)
@given(data=st.data())
def test_float32_matches_oracle(name, data):
    case = data.draw(cases(name))
    model, base, adapter, x = build(case, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert torch.equal(model(x), base(x))
    randomize_factors(adapter, seed=case.seed)
    check_gradients(model, base, adapter, case.scale, x, 1e-4, factor_tol=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("factnet.")}
    adapter.merge()
    adapter.unmerge()
    for pname, param in model.named_parameters():
        if pname in before:
            assert_close(param, before[pname], 1e-6, f"unmerged {pname}")


# ---- the activation-side path (used with dropout) is exact too -------------------------------------
@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=12)
@given(data=st.data())
def test_activation_side_path_matches_oracle(name, data):
    case = data.draw(cases(name))
    model, base, adapter, x = build(case)
    randomize_factors(adapter, seed=case.seed)
    adapter.settings.path = "activation"
    check_gradients(model, base, adapter, case.scale, x, 1e-10)


# ---- slices that share a matrix but sit in different groups, in both orders ----------------------
@pytest.mark.parametrize("name", FORMATS)
def test_one_matrix_split_over_groups(name):
    torch.manual_seed(0)
    model = TinyNet(d=4).double()
    base = copy.deepcopy(model)
    spec = {"a": ["qkv[v]", "fc1[2]", "fc2[3,0]"], "b": ["qkv[q]", "fc1[0,3]", "fc2[1]", "proj"]}
    tensorizer = factnet.Tensorizer(model, ["qkv[q,v]", "fc1[0,2,3]", "fc2[0,1,3]", "proj"]).group(spec)
    assert {k: [s.qualified_name for s in v] for k, v in tensorizer.groups.items()} == {
        "a": ["qkv[v]", "fc1[2]", "fc2[0]", "fc2[3]"],
        "b": ["qkv[q]", "proj", "fc1[0]", "fc1[3]", "fc2[1]"],
    }
    rank = min(2, factnet.get_format(name, 1).max_rank(4, 4, 4))
    adapter = tensorizer.decompose(name, rank=rank, scale=0.7)
    randomize_factors(adapter, seed=5)
    x = torch.randn(3, 4, dtype=torch.float64)
    check_gradients(model, base, adapter, 0.7, x, 1e-10)
    adapter.merge()
    with torch.no_grad():
        assert_close(model(x), oracle_forward(base, adapter, 0.7, x), 1e-10, "merged")


def test_gradient_accumulation_matches_sum_of_two_steps():
    torch.manual_seed(0)
    model = TinyNet(d=4).double()
    adapter = factnet.Tensorizer(model).decompose("tucker", rank=3, scale=2.0)
    randomize_factors(adapter, seed=1)
    x1, x2 = torch.randn(2, 5, 4, dtype=torch.float64)
    model(x1).square().sum().backward()
    model(x2).square().sum().backward()
    accumulated = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    model.zero_grad(set_to_none=True)
    (model(x1).square().sum() + model(x2).square().sum()).backward()
    for name, param in adapter.named_parameters():
        assert_close(accumulated[name], param.grad, 1e-12, name)
