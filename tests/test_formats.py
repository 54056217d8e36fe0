"""Formats as pure functions: reconstruction, normal form, counts and init, against tensorly."""

from __future__ import annotations

import copy
import os

import pytest
import tensorly as tl
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import factnet
from conftest import BUILTIN_FORMATS, USER_FORMATS, TinyNet, assert_close, assert_refused, randomize_factors
from oracle_support import dense_core, oracle_forward

FORMATS = factnet.available_formats()
# formats whose projections share every rank letter: the core is diagonal (the identity for batch-matrix)
DIAGONAL_CORES = {"batch-matrix", "cp", "cp-seeded", "vera", "user-diagonal-in-per-slice"}


def test_registry_lists_builtin_and_user_formats():
    names = factnet.available_formats()
    assert names == sorted(names)
    assert set(BUILTIN_FORMATS) <= set(names)
    assert set(USER_FORMATS) <= set(names)
    for name in names:
        fmt = factnet.get_format(name, 3)
        assert isinstance(fmt, factnet.Format)
        assert fmt.name == name and fmt.rank == 3
        assert factnet.get_format(fmt) is fmt  # an instance passes through


# ---- ranks and names refused, by get_format and through the Tensorizer -----------------------------------
@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(d=4, odd=True).double()


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4", float("nan")])
def test_rank_must_be_a_positive_integer(model, rank):
    tensorizer = factnet.Tensorizer(model)
    assert_refused(model, "rank", lambda: tensorizer.decompose("tt", rank=rank))
    with pytest.raises(factnet.FactnetError, match="rank"):
        factnet.get_format("tt", rank)
    with pytest.raises(factnet.FactnetError, match="rank"):
        tensorizer.num_parameters("tt", rank)


def test_missing_rank(model):
    assert_refused(model, "needs a rank", lambda: factnet.Tensorizer(model).decompose("tt"))


def test_unknown_format_lists_the_known_ones(model):
    message = assert_refused(model, "unknown format 'tensor-train'",
                             lambda: factnet.Tensorizer(model).decompose("tensor-train", rank=2))
    for name in factnet.available_formats():
        assert name in message
    with pytest.raises(factnet.FactnetError, match="known formats"):
        factnet.get_format("TT", 2)


# ---- rank sizes: each letter capped by what its factors allow, worked out by hand from the letters --------
@pytest.mark.parametrize(("name", "shape", "rank", "expected"), [
    ("tucker", (1, 16, 24), 8, {"a": 1, "b": 8, "c": 8}),  # one slice: the slice mode's rank is 1
    ("tucker", (3, 16, 2), 8, {"a": 3, "b": 6, "c": 2}),  # b <= a·c = 6 (the core unfolded)
    ("tucker", (40, 16, 24), 8, {"a": 8, "b": 8, "c": 8}),  # nothing capped
    ("tt", (2, 4, 16), 8, {"a": 4, "b": 8}),  # a <= d_in; b <= n·a = 8
    ("tt", (1, 4, 16), 8, {"a": 4, "b": 4}),  # b <= n·a = 4: sigma[0] is 4x4 at most
    ("batch-matrix", (5, 3, 16), 8, {"r": 3}),  # per slice u_i v_iᵀ: r <= min(d_in, d_out)
    ("cp", (5, 3, 16), 8, {"r": 3}),  # the hyperedge r: at most max_rank = min(d_in, d_out)
    ("tensor-ring", (1, 2, 2), 3, {"a": 3, "b": 3, "c": 3}),  # each <= product of two others: never capped here
])
def test_sizes_per_mode(name, shape, rank, expected):
    fmt = factnet.get_format(name, rank)
    sizes = fmt.sizes(*shape)
    assert {c: sizes[c] for c in expected} == expected
    assert fmt.capped(*shape) == {c: s for c, s in expected.items() if s < rank}


@st.composite
def problem(draw, name):
    """``(format, n, d_in, d_out)`` with a rank the format accepts."""
    n = draw(st.integers(1, 12))
    d_in = draw(st.integers(1, 12))
    d_out = draw(st.integers(1, 12))
    limit = factnet.get_format(name, 1).max_rank(n, d_in, d_out)
    rank = draw(st.integers(1, max(1, min(limit, 5))))
    return factnet.get_format(name, rank), n, d_in, d_out


def random_factors(fmt, n, d_in, d_out, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator, dtype=dtype)
            for name, shape in fmt.shapes(n, d_in, d_out).items()}


def einsum_sizes(fmt, n, d_in, d_out):
    """Expected size of each letter, derived here: modes from the problem, the rest the rank
    (but for letters a user format sizes itself, ``own_sizes``)."""
    sizes = {"i": n, "j": d_in, "k": d_out, **getattr(fmt, "own_sizes", {})}
    return {name: tuple(sizes.get(c, fmt.rank) for c in letters) for name, letters in fmt.factors.items()}


@pytest.mark.parametrize("name", FORMATS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_shapes_follow_the_letters(name, data, seed):
    fmt, n, d_in, d_out = data.draw(problem(name))
    assume(not fmt.capped(n, d_in, d_out))  # capped sizes: tests/test_rank_caps.py
    assert fmt.shapes(n, d_in, d_out) == einsum_sizes(fmt, n, d_in, d_out)
    assert fmt.equation == ",".join(fmt.factors.values()) + "->ijk"


@pytest.mark.parametrize("name", FORMATS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_reconstruct_equals_tensorly_reference(name, data, seed):
    fmt, n, d_in, d_out = data.draw(problem(name))
    factors = random_factors(fmt, n, d_in, d_out, seed)
    expected = fmt.reference(factors)
    assert expected.shape == (n, d_in, d_out)
    got = fmt.reconstruct(factors)
    assert got.shape == (n, d_in, d_out) and got.dtype == torch.float64
    assert_close(got, expected, 1e-10, f"{fmt} reconstruct vs reference")
    # and the plain einsum of the declared equation agrees too (equation and reference consistent)
    plain = torch.einsum(fmt.equation, *(factors[k] for k in fmt.factors))
    assert_close(plain, expected, 1e-10, f"{fmt} einsum vs reference")


@pytest.mark.parametrize("name", FORMATS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_normal_form_reconstructs_reference(name, data, seed):
    fmt, n, d_in, d_out = data.draw(problem(name))
    factors = random_factors(fmt, n, d_in, d_out, seed)
    form = fmt.normal_form(factors)
    # a diagonal core is kept as its diagonal (n | 1, a) or None (the identity), never as an a x a matrix
    assert (form.core is None or form.core.dim() == 2) == (name in DIAGONAL_CORES)
    p_in_t, core, p_out_t = form.p_in_t, dense_core(form, n), form.p_out_t
    assert p_in_t.dim() == core.dim() == p_out_t.dim() == 3
    if form.out_scale is not None:  # VeRA's b: each slice's output scaled, folded into P_out here
        p_out_t = p_out_t * form.out_scale.unsqueeze(1)
    assert p_in_t.shape[0] in (1, n) and p_out_t.shape[0] in (1, n) and core.shape[0] == n
    a, b = core.shape[1:]
    assert p_in_t.shape[1:] == (a, d_in) and p_out_t.shape[1:] == (b, d_out)
    expected = fmt.reference(factors)
    for i in range(n):
        p_in = p_in_t[i if p_in_t.shape[0] > 1 else 0]
        p_out = p_out_t[i if p_out_t.shape[0] > 1 else 0]
        assert_close(p_in.T @ core[i] @ p_out, expected[i], 1e-10, f"{fmt} normal form slice {i}")


@pytest.mark.parametrize("name", FORMATS)
@given(data=st.data())
def test_num_parameters_counts_factor_elements(name, data):
    fmt, n, d_in, d_out = data.draw(problem(name))
    declared = fmt.num_parameters(n, d_in, d_out)
    assert isinstance(declared, int)
    trained = {name: s for name, s in fmt.shapes(n, d_in, d_out).items() if name not in fmt.seeded}
    assert declared == sum(torch.Size(s).numel() for s in trained.values())


@pytest.mark.parametrize("name", FORMATS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_initialize_gives_exact_zero_and_is_seeded(name, data, seed):
    fmt, n, d_in, d_out = data.draw(problem(name))
    factors = random_factors(fmt, n, d_in, d_out, seed, dtype=torch.float32)
    fmt.initialize(factors, torch.Generator().manual_seed(seed))
    dense = fmt.reconstruct(factors)
    assert torch.equal(dense, torch.zeros(n, d_in, d_out))
    assert torch.equal(fmt.reference(factors), torch.zeros(n, d_in, d_out))
    assert torch.equal(factors[fmt.zero], torch.zeros_like(factors[fmt.zero]))
    for key, tensor in factors.items():
        assert torch.isfinite(tensor).all()
        if key != fmt.zero:  # the other factors must not be zero, or the zero factor gets no gradient
            assert tensor.abs().max() > 0, key
    again = random_factors(fmt, n, d_in, d_out, seed + 1, dtype=torch.float32)
    fmt.initialize(again, torch.Generator().manual_seed(seed))
    for key in factors:
        assert torch.equal(factors[key], again[key]), f"{key} not reproducible from the generator"


@pytest.mark.parametrize("name", FORMATS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_zero_factor_gets_gradient_at_init(name, data, seed):
    """Training can start: at ΔW = 0 the zero factor's gradient is generically non-zero."""
    fmt, n, d_in, d_out = data.draw(problem(name))
    factors = random_factors(fmt, n, d_in, d_out, seed)
    fmt.initialize(factors, torch.Generator().manual_seed(seed))
    for tensor in factors.values():
        tensor.requires_grad_(True)
    target = torch.randn(n, d_in, d_out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (fmt.reconstruct(factors) * target).sum().backward()
    assert factors[fmt.zero].grad.abs().max() > 0


@pytest.mark.parametrize("name", FORMATS)
def test_max_rank_is_accepted_and_bounded(name):
    fmt = factnet.get_format(name, 1)
    assert fmt.max_rank(12, 768, 768) <= 768
    assert fmt.max_rank(5, 3, 7) <= 3


# ---- the paper's formulas (square groups, d_in = d_out = d; ranks no mode caps) -------------------
@given(n=st.integers(1, 300), d=st.integers(1, 1024), r=st.integers(1, 32))
def test_paper_parameter_formulas(n, d, r):
    assume(r <= min(n, d))
    assert factnet.get_format("tt", r).num_parameters(n, d, d) == 2 * d * r + n * r**2
    assert factnet.get_format("tucker", r).num_parameters(n, d, d) == 2 * d * r + n * r + r**3
    assert factnet.get_format("batch-matrix", r).num_parameters(n, d, d) == n * 2 * d * r


def test_tensorly_containers():
    """`to_tensorly` gives tensorly's own factorized tensors; their dense form is the reference."""
    from tensorly.cp_tensor import CPTensor
    from tensorly.tr_tensor import TRTensor
    from tensorly.tt_tensor import TTTensor
    from tensorly.tucker_tensor import TuckerTensor

    kinds = {"tt": TTTensor, "tucker": TuckerTensor, "cp": CPTensor, "batch-matrix": CPTensor, "tensor-ring": TRTensor}
    with tl.backend_context("pytorch"):
        for name, kind in kinds.items():
            fmt = factnet.get_format(name, 2)
            factors = random_factors(fmt, 3, 4, 5, seed=1)
            container = fmt.to_tensorly(factors)
            assert isinstance(container, kind)
            dense = container.to_tensor()
            if name == "tt":  # a TT over modes (j, i, k)
                dense = dense.permute(1, 0, 2)
            assert_close(dense, fmt.reconstruct(factors), 1e-10, name)
    # factnet asks for the pytorch backend locally and never switches the global one
    assert tl.get_backend() == os.environ.get("TENSORLY_BACKEND", "numpy")


# ---- a user-defined format: a subclass only, then end to end ------------------------------------
_COUNTER = iter(range(10**6))


def _user_block_term():
    """A block-term-like format declared in the test (unique name: the registry is global)."""
    name = f"test-block-term-{next(_COUNTER)}"

    class BlockTerm(factnet.Format, name=name):
        # ΔW[i] = u · (Σ_c p[i,c] core[c]) · vᵀ with a (c, a, b) core and a mixing p: (n, c)
        factors = {"p": "ic", "core": "cab", "u": "ja", "v": "kb"}
        zero = "v"

        def num_parameters(self, n, d_in, d_out):
            return n * self.rank + self.rank**3 + (d_in + d_out) * self.rank

        def reference(self, factors):
            core = torch.einsum("ic,cab->iab", factors["p"], factors["core"])
            return torch.stack([factors["u"] @ core[i] @ factors["v"].T for i in range(core.shape[0])])

    return name, BlockTerm


def test_user_format_registers_and_works_end_to_end():
    from conftest import TinyNet

    name, cls = _user_block_term()
    assert name in factnet.available_formats()
    assert isinstance(factnet.get_format(name, 2), cls)
    torch.manual_seed(0)
    model = TinyNet(d=4).double()
    base = copy.deepcopy(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    tensorizer = factnet.Tensorizer(model, ["qkv[q,v]", "fc2", "proj"])
    assert tensorizer.group_shapes() == {"4x4": (7, 4, 4)}
    assert tensorizer.num_parameters(name, 2) == cls(2).num_parameters(7, 4, 4)
    adapter = tensorizer.decompose(name, rank=2, scale=1.5)
    assert adapter.num_parameters() == cls(2).num_parameters(7, 4, 4)
    assert torch.equal(model(x), base(x))
    randomize_factors(adapter, seed=3)
    assert_close(model(x), oracle_forward(base, adapter, 1.5, x), 1e-10, "user format forward")
    adapter.merge()
    assert_close(model(x), oracle_forward(base, adapter, 1.5, x), 1e-10, "user format merged")
    adapter.unmerge()
    adapter.detach()
    assert_close(model(x), base(x), 1e-12, "after detach")


def test_bad_user_format_declarations_are_rejected():
    bad = {
        "no-k": {"u": "ja", "s": "iab"},
        "j-and-k-together": {"w": "ijk"},
        "lonely-rank": {"u": "ja", "s": "ib", "v": "kb"},
        "no-slice-mode": {"u": "ja", "v": "ka"},
    }
    for tag, letters in bad.items():
        with pytest.raises(factnet.FactnetError, match="format"):
            type(f"Bad{tag}", (factnet.Format,), {"factors": letters, "zero": next(iter(letters)), "__module__": __name__},
                 name=f"test-bad-{tag}")
        assert f"test-bad-{tag}" not in factnet.available_formats()
    with pytest.raises(factnet.FactnetError, match="zero"):
        type("BadZero", (factnet.Format,), {"factors": {"s": "iab", "u": "ja", "v": "kb"}, "zero": "w"},
             name="test-bad-zero")


@pytest.mark.parametrize("name", FORMATS)
def test_float32_reconstruct_matches_float64(name):
    fmt = factnet.get_format(name, 3)
    factors = random_factors(fmt, 5, 6, 7, seed=2)
    single = {k: v.float() for k, v in factors.items()}
    got = fmt.reconstruct(single)
    assert got.dtype == torch.float32
    assert_close(got, fmt.reference(factors), 1e-5, name)



def test_a_rank_letter_of_its_own_size_reaches_the_normal_form():
    fmt = factnet.get_format("user-block-term", 3)
    generator = torch.Generator().manual_seed(0)
    factors = {k: torch.randn(s, dtype=torch.float64, generator=generator) for k, s in fmt.shapes(5, 6, 7).items()}
    dense = sum(torch.einsum("abc,ia,jb,kc->ijk", factors["core"][t], factors["p"][:, t], factors["u"][:, t],
                             factors["v"][:, t]) for t in range(2))
    form = fmt.normal_form(factors)
    rebuilt = torch.einsum("iaj,iab,ibk->ijk", form.p_in_t.expand(5, -1, -1), form.core, form.p_out_t.expand(5, -1, -1))
    torch.testing.assert_close(rebuilt, dense, rtol=1e-12, atol=1e-12)
    assert sum(t.numel() for t in factors.values()) == fmt.num_parameters(5, 6, 7)
