"""The kernel with factor-space dropout: exact in eval, seeded in training, in factor space after the core,
gradients against finite differences; long inputs over several threads."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import TinyNet, assert_close, randomize_factors
from oracle_support import oracle_forward
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_support import (
    FORMATS,
    build,
    cases,
    check_gradients,
)
from torch import nn

import factnet


# ---- dropout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=12)
@given(data=st.data())
def test_dropout_in_eval_mode_is_exact(name, data):
    case = data.draw(cases(name))
    model, base, adapter, x = build(case, dropout=0.5)
    randomize_factors(adapter, seed=case.seed)
    model.eval()
    base.eval()
    check_gradients(model, base, adapter, case.scale, x, 1e-10)


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=12)
@given(data=st.data())
def test_dropout_in_training_is_seeded_and_trains(name, data):
    case = data.draw(cases(name))
    model, base, adapter, x = build(case, dropout=0.5)
    randomize_factors(adapter, seed=case.seed)
    x = torch.randn(64, case.d, dtype=torch.float64)  # many rows: some mask differs from all-kept
    model.train()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(1)
    second = model(x)
    assert torch.equal(first, second)
    assert not torch.equal(first, oracle_forward(base, adapter, case.scale, x).detach())
    model.zero_grad(set_to_none=True)
    first.square().sum().backward()
    for key, group in adapter.groups.items():
        for fname, factor in group.factors.items():
            assert factor.grad is not None and torch.isfinite(factor.grad).all(), f"{key}.{fname}"
            assert factor.grad.abs().max() > 0, f"{key}.{fname}"
    for pname, param in model.named_parameters():
        if not pname.startswith(("factnet.", "head.")):
            assert param.grad is None, pname
    # and no dropout once evaluated
    model.eval()
    assert_close(model(x), oracle_forward(base, adapter, case.scale, x), 1e-10, "eval after training")


class OneLinear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = nn.Linear(d, d)

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_dropout_sits_in_factor_space_after_the_core(rank):
    """TT on one whole matrix: ``y = x Wᵀ + b + s/(1-p) · (m ⊙ (x U Σ)) Vᵀ`` with a mask
    ``m ∈ {0,1}^r`` per row, so repeated rows take exactly the 2^r values the masks allow."""
    torch.manual_seed(rank)
    d, p, scale = 6, 0.5, 1.7
    model = OneLinear(d).double()
    base = copy.deepcopy(model)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=rank, scale=scale, dropout=p)
    randomize_factors(adapter, seed=rank)
    (group,) = adapter.groups.values()
    u, sigma, v = (group.factors[k].detach() for k in ("u", "sigma", "v"))
    row = torch.randn(1, d, dtype=torch.float64)
    x = row.expand(4000, d).contiguous()
    model.train()
    with torch.no_grad():
        delta = model(x) - base(x)
    hidden = row @ u @ sigma[0]  # (1, r)
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=rank)), dtype=torch.float64)
    candidates = scale / (1 - p) * (masks * hidden) @ v.T  # (2^r, d)
    distance = (delta[:, None, :] - candidates[None, :, :]).abs().amax(dim=-1)  # (rows, 2^r)
    nearest = distance.min(dim=1)
    assert nearest.values.max() < 1e-10, "an output row is not x W^T + s/(1-p) (m * x U sigma) V^T"
    assert set(nearest.indices.tolist()) == set(range(2**rank)), "not every mask occurred"
    kept = (nearest.indices.bincount(minlength=2**rank).float() / len(x))
    assert (kept - 0.5**rank).abs().max() < 0.05  # each mask about equally likely


def directional_derivative_check(model, adapter, x, seed, tol):
    """Autograd against five-point central differences along a random direction, in float64.

    The dropout masks are drawn from the global RNG with shapes that do not depend on the
    values, so reseeding before each forward makes the loss a smooth function of the factors
    and of ``x``: its gradient must match finite differences whatever the masks are."""
    params = list(adapter.parameters())
    x = x.detach().clone().requires_grad_(True)
    probe = None

    def loss():
        nonlocal probe
        torch.manual_seed(seed)
        y = model(x)
        if probe is None:
            probe = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
        return (y * probe).sum()

    model.zero_grad(set_to_none=True)
    loss().backward()
    generator = torch.Generator().manual_seed(seed + 1)
    directions = [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in params]
    direction_x = torch.randn(x.shape, dtype=x.dtype, generator=generator)
    analytic = sum((p.grad * d).sum() for p, d in zip(params, directions)) + (x.grad * direction_x).sum()
    eps = 1e-6  # five-point stencil: truncation error O(eps^4), roundoff about 1e-16 / eps
    with torch.no_grad():
        values = [p.detach().clone() for p in params]
        x_value = x.detach().clone()
        samples = {}
        for step in (-2, -1, 1, 2):
            for p, v, d in zip(params, values, directions):
                p.copy_(v + step * eps * d)
            x.copy_(x_value + step * eps * direction_x)
            samples[step] = loss()
        for p, v in zip(params, values):
            p.copy_(v)
        x.copy_(x_value)
    numeric = (samples[-2] - 8 * samples[-1] + 8 * samples[1] - samples[2]) / (12 * eps)
    assert abs(numeric - analytic) <= tol * max(1.0, abs(analytic)), (numeric.item(), analytic.item())


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=12)
@given(data=st.data())
def test_dropout_training_gradients_match_finite_differences(name, data):
    case = data.draw(cases(name))
    model, base, adapter, x = build(case, dropout=0.5)
    randomize_factors(adapter, seed=case.seed)
    model.train()
    x = torch.randn(16, case.d, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed))
    directional_derivative_check(model, adapter, x, case.seed, 1e-6)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", FORMATS)
def test_many_rows_and_threads(name, threads):
    """Long reductions over rows may be split per thread; results must not depend on it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = TinyNet(d=4).double()
        base = copy.deepcopy(model)
        rank = min(2, factnet.get_format(name, 1).max_rank(12, 4, 4))
        adapter = factnet.Tensorizer(model, ["qkv[q,v]", "proj", "fc1", "fc2[1,2]"]).decompose(
            name, rank=rank, scale=1.3, dropout=0.25)
        randomize_factors(adapter, seed=2)
        x = torch.randn(7, 43, 4, dtype=torch.float64)  # 301 rows: not a multiple of the thread count
        model.eval()  # merged-weight path
        check_gradients(model, base, adapter, 1.3, x, 1e-10)
        model.train()  # activation-side path with dropout
        directional_derivative_check(model, adapter, x, 3, 1e-6)
    finally:
        torch.set_num_threads(previous)
