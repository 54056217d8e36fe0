"""The training kernel against the dense oracle ``x (W + s·ΔW)ᵀ``: forward, gradients, merge.

Models are `TinyNet`s (Linear (d, d), (3d, d), (4d, d), (d, 4d), optionally a whole (d+1, d));
hypothesis draws the format's rank, which blocks of which matrices are targeted, how slices
are grouped (groups may split one matrix), the scale and the input shape. One layer's kernel
(`adapted_linear`, `_ActivationLinear`) is also checked alone: gradcheck and the block-wise dense oracle.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyNet, assert_close, randomize_factors
from oracle_support import blockwise_delta, effective_params, oracle_forward
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_support import (
    FORMATS,
    build,
    cases,
    check_gradients,
)

import factnet
from factnet.increment import Increment, delta_weight
from factnet.kernel import _ActivationLinear, adapted_linear


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


# ---- one layer: gradcheck and the block-wise dense oracle ------------------------------------------------
SCALE = 1.7


@pytest.mark.parametrize("path", ["auto", "activation"])
@pytest.mark.parametrize(("m_in", "m_out", "g_in", "g_out", "alpha", "beta"),
                         [(1, 3, 1, 1, 3, 2), (4, 1, 1, 1, 3, 2), (1, 1, 1, 1, 3, 2), (1, 3, 1, 3, 6, 2),
                          (4, 1, 4, 1, 3, 4)])
def test_kernel_gradcheck(path: str, m_in: int, m_out: int, g_in: int, g_out: int, alpha: int, beta: int) -> None:
    torch.manual_seed(0)
    d, dt = 5, torch.float64
    weight, bias = torch.randn(m_out * d, m_in * d, dtype=dt), torch.randn(m_out * d, dtype=dt)
    inputs = (torch.randn(7, m_in * d, dtype=dt, requires_grad=True),
              torch.randn(g_in, alpha, d, dtype=dt, requires_grad=True),
              torch.randn(m_in * alpha, m_out * beta, dtype=dt, requires_grad=True),
              torch.randn(g_out, beta, d, dtype=dt, requires_grad=True))

    def run(x, a_t, core, b_t):
        return adapted_linear(x, weight, bias, [Increment(a_t, core, b_t, m_in, m_out)], SCALE, 0.0, path)

    assert torch.autograd.gradcheck(run, inputs)
    # and the value equals the block-wise dense oracle
    x, a_t, core, b_t = (t.detach() for t in inputs)
    delta = blockwise_delta(weight, a_t, core, b_t, m_in, m_out, g_in, g_out, d)
    torch.testing.assert_close(run(x, a_t, core, b_t), x @ (weight + SCALE * delta).T + bias)


@pytest.mark.parametrize("path", ["auto", "activation", "merged"])
@pytest.mark.parametrize(("m_in", "m_out", "g_in", "g_out", "alpha", "beta"),
                         [(1, 1, 1, 1, 3, 3), (1, 3, 1, 1, 9, 3), (1, 3, 1, 3, 6, 2), (4, 1, 1, 1, 3, 12),
                          (4, 1, 4, 1, 2, 8), (1, 1, 1, 1, 7, 7)])
def test_kernel_without_core(path: str, m_in: int, m_out: int, g_in: int, g_out: int, alpha: int, beta: int) -> None:
    """``core=None`` (the identity, a diagonal core folded into a projection): block ``p`` of the hidden
    activations meets block ``p`` of the other side; gradients by gradcheck, values against the dense oracle,
    and the seeded (frozen) projection gets no gradient."""
    torch.manual_seed(0)
    d, dt = 5, torch.float64
    weight, bias = torch.randn(m_out * d, m_in * d, dtype=dt), torch.randn(m_out * d, dtype=dt)
    inputs = (torch.randn(7, m_in * d, dtype=dt, requires_grad=True),
              torch.randn(g_in, alpha, d, dtype=dt, requires_grad=True),
              torch.randn(g_out, beta, d, dtype=dt, requires_grad=True))

    def run(x, a_t, b_t):
        return adapted_linear(x, weight, bias, [Increment(a_t, None, b_t, m_in, m_out)], SCALE, 0.0, path)

    assert torch.autograd.gradcheck(run, inputs)
    x, a_t, b_t = (t.detach() for t in inputs)
    delta = blockwise_delta(weight, a_t, None, b_t, m_in, m_out, g_in, g_out, d)
    torch.testing.assert_close(run(x, a_t, b_t), x @ (weight + SCALE * delta).T + bias)
    torch.testing.assert_close(delta_weight(Increment(a_t, None, b_t, m_in, m_out)), delta)
    frozen, trained = a_t.clone(), b_t.clone().requires_grad_()
    run(x, frozen, trained).sum().backward()
    both = a_t.clone().requires_grad_(), b_t.clone().requires_grad_()
    run(x, *both).sum().backward()
    assert frozen.grad is None and torch.equal(trained.grad, both[1].grad)


@pytest.mark.parametrize(("m_in", "m_out", "g_in", "g_out"), [(1, 3, 1, 1), (4, 1, 1, 1), (1, 3, 1, 3), (4, 1, 4, 1)])
def test_dropout_kernel_with_fixed_mask(m_in: int, m_out: int, g_in: int, g_out: int) -> None:
    """Factor-space dropout: gradcheck with a fixed mask, and the value against the dense formula."""
    torch.manual_seed(0)
    d, alpha, beta, dt = 5, 3, 2, torch.float64
    weight, bias = torch.randn(m_out * d, m_in * d, dtype=dt), torch.randn(m_out * d, dtype=dt)
    mask = torch.bernoulli(torch.full((9, m_out * beta), 0.7, dtype=dt)) / 0.7
    inputs = (torch.randn(9, m_in * d, dtype=dt, requires_grad=True),
              torch.randn(g_in, alpha, d, dtype=dt, requires_grad=True),
              torch.randn(m_in * alpha, m_out * beta, dtype=dt, requires_grad=True),
              torch.randn(g_out, beta, d, dtype=dt, requires_grad=True))

    def run(x, a_t, core, b_t):
        return _ActivationLinear.apply(x, weight, bias, SCALE, ((m_in, m_out),), False, False, (mask,), a_t, core, b_t)

    assert torch.autograd.gradcheck(run, inputs)
    x, a_t, core, b_t = (t.detach() for t in inputs)
    u = torch.cat([x[:, p * d:(p + 1) * d] @ a_t[p if g_in > 1 else 0].T for p in range(m_in)], dim=1)
    hidden = (u @ core) * mask * SCALE
    increment = torch.cat([hidden[:, q * beta:(q + 1) * beta] @ b_t[q if g_out > 1 else 0] for q in range(m_out)], 1)
    torch.testing.assert_close(run(x, a_t, core, b_t), x @ weight.T + bias + increment)
