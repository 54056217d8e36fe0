"""Every kernel variant `factnet.autotune` may pick is exact: gradcheck and the dense oracle with each
variant forced; the autotuner measures once per shape and thread count, and can be overridden."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from conftest import TinyNet, randomize_factors
from oracle_support import blockwise_delta
from kernel_support import check_gradients

import factnet
from factnet import autotune
from factnet.errors import FactnetError
from factnet.increment import Increment
from factnet.kernel import _ActivationLinear, adapted_linear, delta_rows
from factnet.products import outer, times_t

SCALE = 1.7
SHAPES = [(1, 3, 1, 1, 3, 2), (4, 1, 1, 1, 3, 2), (1, 1, 1, 1, 3, 2), (1, 3, 1, 3, 6, 2), (4, 1, 4, 1, 3, 4)]
V = autotune.VARIANTS
# the merged-weight kernel: every forward x grad_input x outer, times_t rotating (every times_t x outer pair);
# the activation kernel runs outer and times_t only: every pair
COMBOS = [{"forward": f, "grad_input": g, "outer": o, "times_t": V["times_t"][i // 3 % 3]}
          for i, (f, g, o) in enumerate(itertools.product(V["forward"], V["grad_input"], V["outer"]))]
ACTIVATION = [{"outer": o, "times_t": t} for o, t in itertools.product(V["outer"], V["times_t"])]
CASES = [("auto", c) for c in COMBOS] + [("activation", c) for c in ACTIVATION]


def _inputs(m_in, m_out, g_in, g_out, alpha, beta, rows=7, d=5):
    torch.manual_seed(0)
    dt = torch.float64
    weight, bias = torch.randn(m_out * d, m_in * d, dtype=dt), torch.randn(m_out * d, dtype=dt)
    inputs = (torch.randn(rows, m_in * d, dtype=dt, requires_grad=True),
              torch.randn(g_in, alpha, d, dtype=dt, requires_grad=True),
              torch.randn(m_in * alpha, m_out * beta, dtype=dt, requires_grad=True),
              torch.randn(g_out, beta, d, dtype=dt, requires_grad=True))
    return weight, bias, inputs


@pytest.mark.parametrize(("path", "combo"), CASES,
                         ids=[f"{p}:" + ",".join(f"{k}={v}" for k, v in c.items()) for p, c in CASES])
@pytest.mark.parametrize(("m_in", "m_out", "g_in", "g_out", "alpha", "beta"), SHAPES)
def test_every_variant_gradcheck_and_oracle(path, combo, m_in, m_out, g_in, g_out, alpha, beta):
    d = 5
    weight, bias, inputs = _inputs(m_in, m_out, g_in, g_out, alpha, beta, d=d)

    def run(x, a_t, core, b_t):
        return adapted_linear(x, weight, bias, [Increment(a_t, core, b_t, m_in, m_out)], SCALE, 0.0, path)

    with autotune.force(**combo):
        assert torch.autograd.gradcheck(run, inputs)
        x, a_t, core, b_t = (t.detach() for t in inputs)
        delta = blockwise_delta(weight, a_t, core, b_t, m_in, m_out, g_in, g_out, d)
        torch.testing.assert_close(run(x, a_t, core, b_t), x @ (weight + SCALE * delta).T + bias)
        torch.testing.assert_close(delta_rows(x, [Increment(a_t, core, b_t, m_in, m_out)], SCALE), SCALE * x @ delta.T)


@pytest.mark.parametrize("outer", autotune.VARIANTS["outer"])
@pytest.mark.parametrize("times_t", autotune.VARIANTS["times_t"])
@pytest.mark.parametrize(("m_in", "m_out", "g_in", "g_out"), [(1, 3, 1, 1), (4, 1, 1, 1), (1, 3, 1, 3), (4, 1, 4, 1)])
def test_every_variant_dropout_kernel(outer, times_t, m_in, m_out, g_in, g_out):
    weight, bias, inputs = _inputs(m_in, m_out, g_in, g_out, 3, 2, rows=9)
    mask = torch.bernoulli(torch.full((9, m_out * 2), 0.7, dtype=torch.float64)) / 0.7

    def run(x, a_t, core, b_t):
        return _ActivationLinear.apply(x, weight, bias, SCALE, ((m_in, m_out),), False, False, (mask,), a_t, core, b_t)

    with autotune.force(outer=outer, times_t=times_t):
        assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("variant", autotune.VARIANTS["outer"])
@pytest.mark.parametrize("rows", [1000, 1001, 37])
@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_outer_variants_exact(variant, rows, blocks, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        r, x = torch.randn(rows, blocks * 3, dtype=torch.float64), torch.randn(rows, blocks * 5, dtype=torch.float64)
        expected = r.reshape(rows * blocks, 3).t() @ x.reshape(rows * blocks, 5)
        with autotune.force(outer=variant):
            torch.testing.assert_close(outer(r, x, blocks, 1)[0], expected)
            torch.testing.assert_close(outer(r.t().contiguous().t(), x, blocks, 1)[0], expected)  # strided rows
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("variant", autotune.VARIANTS["times_t"])
@pytest.mark.parametrize("blocks", [1, 4])
def test_times_t_variants_exact(variant, blocks):
    x, p_t = torch.randn(50, blocks * 6, dtype=torch.float64), torch.randn(1, 3, 6, dtype=torch.float64)
    expected = (x.reshape(50 * blocks, 6) @ p_t[0].T).reshape(50, -1)
    with autotune.force(times_t=variant):
        torch.testing.assert_close(times_t(x, p_t, blocks), expected)


@pytest.mark.parametrize("combo", [{"forward": "thin", "grad_input": "thin", "outer": "tn", "times_t": "tn"},
                                   {"forward": "merged", "grad_input": "rebuild", "outer": "mm", "times_t": "nn"}],
                         ids=["thin-tn", "merged-mm-nn"])
@pytest.mark.parametrize("name", ["tt", "tucker", "batch-matrix"])
def test_model_matches_oracle_with_forced_variants(combo, name):
    """A whole adapted model (blocked and whole matrices) against autograd through the dense oracle."""
    torch.manual_seed(0)
    model = TinyNet(d=4).double()
    base = copy.deepcopy(model)
    rank = min(2, factnet.get_format(name, 1).max_rank(12, 4, 4))
    adapter = factnet.Tensorizer(model, ["qkv[q,v]", "proj", "fc1", "fc2[1,2]"]).decompose(name, rank=rank, scale=1.3)
    randomize_factors(adapter, seed=2)
    x = torch.randn(7, 43, 4, dtype=torch.float64)
    with autotune.force(**combo):
        check_gradients(model.eval(), base, adapter, 1.3, x, 1e-10)


def test_measures_once_per_shape_and_thread_count():
    autotune.clear()
    x, p_t = torch.randn(300, 16), torch.randn(1, 4, 16)
    times_t(x, p_t, 1)
    keys = [k for k in autotune.choices() if k[0] == "times_t"]
    assert len(keys) == 1 and autotune.choices()[keys[0]] in autotune.VARIANTS["times_t"]
    times_t(x + 1, p_t, 1)  # same shape: looked up, not measured again
    assert [k for k in autotune.choices() if k[0] == "times_t"] == keys
    previous = torch.get_num_threads()
    torch.set_num_threads(1 if previous != 1 else 2)
    try:
        times_t(x, p_t, 1)
    finally:
        torch.set_num_threads(previous)
    assert len([k for k in autotune.choices() if k[0] == "times_t"]) == 2


def test_force_overrides_and_restores():
    autotune.clear()
    with autotune.force(outer="tn"):
        assert autotune.forced()["outer"] == "tn"
        assert autotune.choice("outer", ("any",)) == "tn"
        with autotune.force(outer="mm"):
            assert autotune.choice("outer", ("any",)) == "mm"
        assert autotune.choice("outer", ("any",)) == "tn"
    assert "outer" not in autotune.forced()
    assert autotune.choice("outer", ("any",)) is None
    with pytest.raises(FactnetError, match="unknown variant"), autotune.force(outer="fastest"):
        pass
    with pytest.raises(FactnetError, match="unknown kernel op"), autotune.force(gemm="mm"):
        pass


def test_environment_spec_parses():
    assert autotune._parse("outer=mm, times_t=nt") == {"outer": "mm", "times_t": "nt"}
    assert autotune._parse("") == {}
    with pytest.raises(FactnetError, match="op=variant"):
        autotune._parse("outer")


def test_no_measurement_while_compiling_or_for_subclasses(monkeypatch):
    class Sub(torch.Tensor):
        pass

    calls = []
    variants = {"chunked": lambda: calls.append("chunked"), "mm": lambda: calls.append("mm")}
    assert autotune.measure("outer", ("sub",), variants, (torch.zeros(2).as_subclass(Sub),)) == "chunked"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert autotune.measure("outer", ("compiling",), variants, (torch.zeros(2),)) == "chunked"
    assert calls == []


def test_save_and_load_round_trip(tmp_path):
    autotune.clear()
    times_t(torch.randn(64, 8), torch.randn(1, 2, 8), 1)
    path = tmp_path / "choices.json"
    autotune.save(str(path))
    data = json.loads(path.read_text())
    assert data["signature"]["torch"] == torch.__version__ and len(data["choices"]) == 1
    chosen = next(iter(data["choices"].values()))
    autotune.clear()
    autotune.load(str(path))
    monkey = {}
    autotune._path, previous = str(path), autotune._path
    try:
        def never():
            monkey["ran"] = True
        key = next(iter(data["choices"]))
        op, shape_key, threads = eval(key, {"torch": torch})  # the repr of (op, key, threads)
        if threads == torch.get_num_threads():
            assert autotune.measure(op, shape_key, dict.fromkeys(autotune.VARIANTS[op], never),
                                    (torch.zeros(1),)) == chosen
            assert "ran" not in monkey
    finally:
        autotune._path = previous
        autotune.clear()
