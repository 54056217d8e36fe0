"""The training kernel against the dense oracle ``x (W + s·ΔW)ᵀ``: forward, gradients, merge.

Models are `TinyNet`s (Linear (d, d), (3d, d), (4d, d), (d, 4d), optionally a whole (d+1, d));
hypothesis draws the format's rank, which blocks of which matrices are targeted, how slices
are grouped (groups may split one matrix), the scale and the input shape.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import factnet
from conftest import (
    TinyNet,
    assert_close,
    effective_params,
    factor_leaves,
    oracle_forward,
    randomize_factors,
)

FORMATS = factnet.available_formats()
LABELS = {"qkv": ["q", "k", "v"], "fc1": ["0", "1", "2", "3"], "fc2": ["0", "1", "2", "3"]}


@dataclass
class Case:
    d: int
    bias: bool
    odd: bool
    targets: list[str]
    expected: list[tuple]  # (module, label, index, side, d_in, d_out) in model order
    grouping: object
    rank: int
    scale: float
    x_shape: tuple[int, ...]
    seed: int
    format_name: str


def _whole(module, d_in, d_out):
    return [(module, "0", 0, "none", d_in, d_out)]


@st.composite
def cases(draw, name: str, allow_odd: bool = True):
    d = draw(st.integers(2, 5))
    odd = allow_odd and draw(st.booleans())
    modules = ["qkv", "proj", "fc1", "fc2"] + (["odd"] if odd else [])
    chosen = draw(st.lists(st.sampled_from(modules), min_size=1, max_size=len(modules), unique=True))
    targets, expected = [], []
    for module in modules:  # expected slices in model order, whatever order the patterns come in
        if module not in chosen:
            continue
        if module in LABELS:
            labels = LABELS[module]
            picked = draw(st.one_of(st.none(), st.lists(st.sampled_from(range(len(labels))), min_size=1,
                                                        max_size=len(labels), unique=True)))
            indices = sorted(picked) if picked is not None else list(range(len(labels)))
            if picked is None:
                targets.append(module)
            else:  # name blocks by label or by index, in any order
                by_index = draw(st.booleans())
                targets.append(f"{module}[{','.join(str(i) if by_index else labels[i] for i in picked)}]")
            side = "in" if module == "fc2" else "out"
            expected += [(module, labels[i], i, side, d, d) for i in indices]
        else:
            targets.append(module)
            expected += _whole(module, d, d + 1 if module == "odd" else d)
    targets = draw(st.permutations(targets))
    if draw(st.booleans()):
        grouping = "shape"
        shapes = {(e[4], e[5]) for e in expected}
        sizes = [sum((e[4], e[5]) == s for e in expected) for s in shapes]
        group_shapes = [(n, *s) for n, s in zip(sizes, shapes)]
    else:  # a random split of each shape into up to three groups
        tags = {e[:2]: draw(st.integers(0, 2)) for e in expected}
        grouping = {"tags": tags}
        counts: dict[tuple, int] = {}
        for e in expected:
            key = (e[4], e[5], tags[e[:2]])
            counts[key] = counts.get(key, 0) + 1
        group_shapes = [(n, key[0], key[1]) for key, n in counts.items()]
    fmt = factnet.get_format(name, 1)
    limit = min(fmt.max_rank(*shape) for shape in group_shapes)
    rank = draw(st.integers(1, min(limit, 4)))
    scale = draw(st.sampled_from([1.0, 2.5, -1.5, 0.3]))
    x_shape = draw(st.sampled_from([(5, d), (2, 3, d), (1, d)]))
    return Case(d, draw(st.booleans()), odd, list(targets), expected, grouping, rank, scale, x_shape,
                draw(st.integers(0, 2**16)), name)


def _grouping(case: Case):
    if case.grouping == "shape":
        return "shape"
    tags = case.grouping["tags"]
    return lambda piece: f"{piece.d_in}x{piece.d_out}-g{tags[(piece.module, piece.label)]}"


def build(case: Case, dtype=torch.float64, dropout: float = 0.0):
    torch.manual_seed(case.seed)
    model = TinyNet(case.d, bias=case.bias, odd=case.odd).to(dtype)
    base = copy.deepcopy(model)
    tensorizer = factnet.Tensorizer(model, case.targets).group(_grouping(case))
    got = [(s.module, s.label, s.index, s.side, s.d_in, s.d_out) for s in tensorizer.slices]
    assert got == case.expected, (case.targets, got)
    adapter = tensorizer.decompose(factnet.get_format(case.format_name, case.rank), scale=case.scale,
                                   dropout=dropout, seed=case.seed)
    x = torch.randn(case.x_shape, dtype=dtype, generator=torch.Generator().manual_seed(case.seed + 1))
    return model, base, adapter, x


def check_gradients(model, base, adapter, scale, x, tol, head=("head",), factor_tol=None):
    """Factor, input and head gradients of ``sum(y · g)`` against autograd through the oracle.

    The oracle always runs in float64 (a float64 copy of ``base`` and of the factors), so a
    float32 model is compared with the exact answer, not with another float32 rounding."""
    factor_tol = tol * 10 if factor_tol is None else factor_tol
    model.zero_grad(set_to_none=True)
    x_model = x.detach().clone().requires_grad_(True)
    y = model(x_model)
    weights = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    (y * weights.to(y.dtype)).sum().backward()

    exact = base if next(base.parameters()).dtype == torch.float64 else copy.deepcopy(base).double()
    leaves = {k: {n: t.detach().double().requires_grad_(True) for n, t in group.items()}
              for k, group in factor_leaves(adapter).items()}
    x_oracle = x.detach().double().requires_grad_(True)
    exact.zero_grad(set_to_none=True)
    y_oracle = oracle_forward(exact, adapter, scale, x_oracle, factors=leaves)
    (y_oracle * weights).sum().backward()

    assert_close(y, y_oracle, tol, "forward")
    for key, group in adapter.groups.items():
        for name, factor in group.factors.items():
            assert factor.grad is not None, f"{key}.{name} got no gradient"
            assert factor.grad.dtype == factor.dtype
            assert_close(factor.grad, leaves[key][name].grad, factor_tol, f"grad {key}.{name}")
    assert_close(x_model.grad, x_oracle.grad, tol, "grad x")
    exact_params = dict(exact.named_parameters())
    for name, param in model.named_parameters():
        if name.startswith("factnet."):
            continue
        if any(name.startswith(h + ".") for h in head):
            assert param.requires_grad and param.grad is not None, name
            assert_close(param.grad, exact_params[name].grad, factor_tol, f"grad {name}")
        else:
            assert not param.requires_grad, f"{name} is not frozen"
            assert param.grad is None, f"{name} got a gradient"


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
