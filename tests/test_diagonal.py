"""Diagonal rank letters (`Format.diagonal_letters`): VeRA's ``a``, cp-seeded's ``a``.

A letter the trained factors carry only diagonally is not capped by the matrix side, and a diagonal core is
kept as its diagonal (``NormalForm.core: (n, r)``), never as an ``r x r`` matrix. Every check here runs a rank
*above* the matrices' side (48) against the dense oracle (tensorly's reconstruction written into the weights):
forward, gradients, merge, mixed batches, a low-bit file, and budgets that pick such a rank.
"""

from __future__ import annotations

import copy

import pytest
import torch

import factnet
from conftest import factor_leaves, mixed_against_alone, randomize_factors, tiny_vit
from oracle_support import effective_params, oracle_forward
from factnet.quant import fake_quantize
from torch.func import functional_call

pytestmark = pytest.mark.usefixtures("one_thread")
DIAGONAL = ["vera", "cp-seeded"]
RANK, SCALE = 100, 0.7  # rank above every matrix side of the tiny ViT (48)


def _adapted(fmt: str, name: str = "default", seed: int = 1, rank: int = RANK):
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose(fmt, rank=rank, scale=SCALE, name=name, seed=seed, train_head=False)
    randomize_factors(adapter, std=0.3, seed=seed)
    return base, model, adapter


def test_diagonal_letters_are_derived_from_the_trained_factors():
    assert factnet.get_format("vera", 1).diagonal_letters == "a"  # d: ia (b holds no rank letter)
    assert factnet.get_format("cp-seeded", 1).diagonal_letters == "a"
    for name in ("tt", "tucker", "cp", "batch-matrix", "tensor-ring", "tt-seeded"):  # a trained factor holds j or k
        assert factnet.get_format(name, 1).diagonal_letters == "", name


@pytest.mark.parametrize("fmt", DIAGONAL)
def test_rank_above_the_matrix_side_is_not_capped(fmt):
    shape = (12, 48, 48)
    format_ = factnet.get_format(fmt, 4096)
    assert format_.sizes(*shape)["a"] == 4096 and format_.capped(*shape) == {}
    n, d_in, d_out = shape
    expected = n * 4096 + (n * d_out if fmt == "vera" else 0)  # d: n·r (+ VeRA's b: n·d_out)
    assert format_.num_parameters(*shape) == expected
    assert factnet.get_format("cp", 4096).sizes(*shape)["r"] == 48  # CP's u, v carry r fully: capped


@pytest.mark.parametrize("fmt", DIAGONAL)
def test_the_rank_report_says_the_letter_is_diagonal(fmt):
    _, model, adapter = _adapted(fmt)
    text = repr(adapter)
    assert f"{fmt} rank {RANK}" in text and "capped" not in text
    assert "diagonal a: bounded by the budget, not the matrix side" in text
    report = factnet.Tensorizer(copy.deepcopy(tiny_vit())).rank_report(factnet.get_format(fmt, RANK))
    assert report == ""  # nothing capped, no warning


@pytest.mark.parametrize("fmt", DIAGONAL)
def test_no_square_core_is_built(fmt):
    """The core is its diagonal ``(n, r)``; the projections stay the shared seeded ``A``, ``B``; VeRA's ``b`` is
    an output scaling ``(n, d_out)``; every matrix runs a diagonal increment (thin products and scalings)."""
    _, _, adapter = _adapted(fmt)
    for name, group in adapter.groups.items():
        form = group.normal_form()
        n = len(group.slices)
        assert form.core.shape == (n, RANK)
        assert form.p_in_t.shape == (1, RANK, 48) and form.p_out_t.shape == (1, RANK, 48)
        assert (form.out_scale is None) == (fmt == "cp-seeded")
        if fmt == "vera":
            assert form.out_scale.shape == (n, 48)
    for matrix in adapter.matrices:
        for inc in adapter.increments(matrix, adapter.model.get_submodule(matrix).weight):
            assert inc.diagonal and inc.core.shape[-1] == RANK and inc.core.dim() == 3


@pytest.mark.parametrize("fmt", DIAGONAL)
def test_forward_merge_and_gradients_match_the_dense_oracle(fmt):
    base, model, adapter = _adapted(fmt)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    torch.testing.assert_close(out, oracle_forward(base, adapter, SCALE, x), rtol=1e-10, atol=1e-10)
    adapter.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-10)
    adapter.unmerge()
    model.train()
    model(x).square().sum().backward()
    leaves = factor_leaves(adapter)
    params = effective_params(base, adapter, SCALE, leaves)
    functional_call(base.train(), params, (x,)).square().sum().backward()
    for key, group in adapter.groups.items():
        for name, param in group.factors.items():
            torch.testing.assert_close(param.grad, leaves[key][name].grad, rtol=1e-8, atol=1e-10)
        assert all(not b.requires_grad for b in group.seeded.buffers())


@pytest.mark.parametrize("fmt", DIAGONAL)
def test_factor_space_dropout_trains_and_is_exact_without_mask(fmt):
    """The activation-side path (dropout's) runs the same increment: dropout 0 in train mode equals eval."""
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose(fmt, rank=RANK, scale=SCALE, dropout=0.5, seed=1)
    randomize_factors(adapter, std=0.3, seed=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.train()
    model(x).square().sum().backward()  # masked thin products, no core
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters() if p.requires_grad)
    model.eval()
    torch.testing.assert_close(model(x), oracle_forward(base, adapter, SCALE, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", DIAGONAL)
def test_mixed_batch_equals_each_adapter_alone(fmt):
    _, model, _ = _adapted(fmt, name="a", seed=1)
    other = factnet.Tensorizer(model).decompose(fmt, rank=RANK + 7, scale=SCALE, name="b", seed=2, train_head=False)
    randomize_factors(other, std=0.3, seed=2)
    mixed, expected = mixed_against_alone(model, torch.randn(4, 3, 32, 32, dtype=torch.float64), ["a", "b", "b", "a"])
    torch.testing.assert_close(mixed, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("fmt", DIAGONAL)
def test_low_bit_file_round_trip(fmt, bits, tmp_path):
    base, model, adapter = _adapted(fmt)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    saved = adapter.save(tmp_path / "a.safetensors", bits=bits)
    for g in adapter.group_names:  # the file's values
        adapter.group(g).assign({k: fake_quantize(v, bits, 64) for k, v in adapter.group(g).trained_values().items()})
    loaded = factnet.load(copy.deepcopy(base), tmp_path / "a.safetensors")
    torch.testing.assert_close(loaded.model(x), model(x), rtol=1e-12, atol=1e-12)
    assert loaded.format.rank == RANK and saved.bytes < RANK * 12 * 8  # codes, not float32 vectors


@pytest.mark.parametrize("fmt", DIAGONAL)
def test_a_budget_takes_a_rank_above_the_matrix_side(fmt):
    tensorizer = factnet.Tensorizer(tiny_vit())
    shapes = list(tensorizer.group_shapes().values())
    budget = 40_000
    adapter = tensorizer.decompose(fmt, budget=budget)
    rank = adapter.format.rank
    count = lambda r: sum(factnet.get_format(fmt, r).num_parameters(*s) for s in shapes)  # noqa: E731
    assert rank > 48 and count(rank) <= budget < count(rank + 1)
    assert adapter.num_parameters() == count(rank)


def _block_oracle(a_t, core, b_t, out_scale, m_in, m_out):
    """Dense ``ΔW`` of a diagonal increment from its definition, block by block (loops, no kernel code)."""
    d_in_block, d_out_block = a_t.shape[2], b_t.shape[2]
    delta = torch.zeros(m_out * d_out_block, m_in * d_in_block, dtype=a_t.dtype)
    for p in range(m_in):
        for q in range(m_out):
            a, b = a_t[p if a_t.shape[0] > 1 else 0], b_t[q if b_t.shape[0] > 1 else 0]
            block = b.t() @ torch.diag(core[p, q]) @ a
            if out_scale is not None:
                block = out_scale[p, q * d_out_block:(q + 1) * d_out_block, None] * block
            delta[q * d_out_block:(q + 1) * d_out_block, p * d_in_block:(p + 1) * d_in_block] = block
    return delta


@pytest.mark.parametrize(("rows", "rank", "dense"), [(3, 5, False), (10, 12, True)])
@pytest.mark.parametrize("layout", ["whole", "out", "out-own", "in", "in-own", "in-scaled"])
def test_diagonal_rows_by_thin_products_or_the_dense_delta(rows, rank, dense, layout):
    """Both ways `diagonal_rows` runs (thin products; the dense ``ΔW`` where that costs less) against the block
    oracle, values and gradients (gradcheck)."""
    from factnet.diagonal import builds_delta, diagonal_rows
    from factnet.increment import Increment

    torch.manual_seed(0)
    d, dt = 6, torch.float64
    m_in, m_out = {"whole": (1, 1), "out": (1, 3), "out-own": (1, 3)}.get(layout, (4, 1))
    g_in = 4 if layout == "in-own" else 1
    g_out = 3 if layout == "out-own" else 1
    scaled = layout in ("in-scaled", "out", "whole")
    tensors = [torch.randn(rows, m_in * d, dtype=dt), torch.randn(g_in, rank, d, dtype=dt),
               torch.randn(m_in, m_out, rank, dtype=dt), torch.randn(g_out, rank, d, dtype=dt),
               torch.randn(m_in, m_out * d, dtype=dt) if scaled else None]
    x, a_t, core, b_t, out_scale = (t if t is None else t.requires_grad_() for t in tensors)
    increment = Increment(a_t, core, b_t, m_in, m_out, out_scale)
    assert builds_delta(increment, rows) == dense
    expected = 0.7 * x @ _block_oracle(a_t, core, b_t, out_scale, m_in, m_out).t()
    torch.testing.assert_close(diagonal_rows(x, increment, 0.7), expected, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, a_t, core, b_t, out_scale) if t is not None]

    def run(*values):
        x_, a_, c_, b_, *e_ = values
        return diagonal_rows(x_, Increment(a_, c_, b_, m_in, m_out, e_[0] if e_ else None), 0.7)

    assert torch.autograd.gradcheck(run, inputs)
