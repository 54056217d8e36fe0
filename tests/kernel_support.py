"""Shared by the kernel tests: hypothesis cases of `TinyNet` targets and groupings, and the gradient check
against the dense oracle."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from conftest import TinyNet, assert_close, factor_leaves
from oracle_support import oracle_forward
from hypothesis import strategies as st

import factnet

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
