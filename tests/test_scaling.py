"""The rank-stable scale: one Adam step changes the output by the same amount at every rank.

Property (every registered format, the user formats of conftest and one defined here): with
``s = g·ρ`` (`Format.stable_scale`), the first Adam step from the init on a linear loss lowers it by
an amount that does not depend on the rank or the input width. Tolerance: over ranks 4 to 64 the
largest seed-averaged decrease is within 1.25x the smallest (measured: at most 1.15x); ranks 1 and 2
within 1.8x of their mean (measured down to 0.6x: Adam's step is ``lr·Σ|g|``, and ``E|g| ∝ E√V``
falls below the ``√E[V]`` that ρ normalizes by when ``V`` sums only a few random terms). The paper's
fixed ``s`` fails the same check by 8x or more between ranks 1 and 64.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import factnet
from conftest import BUILTIN_FORMATS, USER_FORMATS
from factnet.tensorizer import DEFAULT_GAIN


class TwoCores(factnet.Format, name="test-two-cores"):
    """A chain with two rank-sized cores: ``ΔW[i] = u · g · h_i · vᵀ`` (a user format of this file)."""

    factors = {"u": "ja", "g": "ab", "h": "ibc", "v": "kc"}
    zero = "v"

    def reference(self, factors):
        return torch.einsum("ja,ab,ibc,kc->ijk", factors["u"], factors["g"], factors["h"], factors["v"])

    def initialize(self, factors, generator=None):  # Gaussian, so the moments are estimated by draws
        for name, tensor in factors.items():
            with torch.no_grad():
                tensor.normal_(0.0, 1.0 / math.sqrt(tensor.shape[-1]), generator=generator)
        with torch.no_grad():
            factors[self.zero].zero_()


FORMATS = BUILTIN_FORMATS + USER_FORMATS + ["test-two-cores", "vera", "tt-seeded"]
SEEDS = range(6)


def first_step_decrease(name: str, rank: int, n: int, d_in: int, d_out: int, seed: int, stable: bool = True) -> float:
    """Decrease of ``L = Σ G·(x s ΔW)`` after one Adam step (lr 1e-3) from the init, per lr."""
    fmt = factnet.get_format(name, rank)
    generator = torch.Generator().manual_seed(seed)
    factors = {k: torch.empty(shape, dtype=torch.float64) for k, shape in fmt.shapes(n, d_in, d_out).items()}
    fmt.initialize(factors, generator)
    params = {k: nn.Parameter(v) for k, v in factors.items()}
    x = torch.randn(16, n, d_in, generator=generator, dtype=torch.float64)
    target = torch.randn(16, n, d_out, generator=generator, dtype=torch.float64)
    scale = fmt.stable_scale(n, d_in, d_out) if stable else 1.0

    def loss() -> torch.Tensor:
        return (torch.einsum("bij,ijk->bik", x, scale * fmt.reconstruct(params)) * target).sum()

    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    loss().backward()
    optimizer.step()
    with torch.no_grad():
        return -loss().item() / 1e-3


def mean_decrease(name: str, rank: int, n: int, d_in: int, d_out: int, stable: bool = True) -> float:
    return statistics.mean(first_step_decrease(name, rank, n, d_in, d_out, seed, stable) for seed in SEEDS)


@pytest.mark.parametrize("name", FORMATS)
def test_one_adam_step_is_the_same_at_every_rank(name):
    decreases = [mean_decrease(name, rank, 6, 96, 80) for rank in (4, 16, 64)]
    assert min(decreases) > 0
    assert max(decreases) / min(decreases) < 1.25, decreases
    for rank in (1, 2):
        assert 1 / 1.8 < mean_decrease(name, rank, 6, 96, 80) / statistics.mean(decreases) < 1.8


@pytest.mark.parametrize("name", FORMATS)
def test_one_adam_step_does_not_grow_with_the_width(name):
    narrow, wide = mean_decrease(name, 8, 6, 48, 80), mean_decrease(name, 8, 6, 384, 80)
    assert 1 / 1.25 < wide / narrow < 1.25


@pytest.mark.parametrize("name", ["tt", "tucker", "tensor-ring", "batch-matrix"])
def test_the_papers_fixed_scale_grows_with_the_rank(name):
    """The check above can fail: at a fixed ``s`` the same step grows 8x or more from rank 1 to 64."""
    assert mean_decrease(name, 64, 6, 96, 80, stable=False) > 8 * mean_decrease(name, 1, 6, 96, 80, stable=False)


@pytest.mark.parametrize("rank", [1, 3, 8, 32])
def test_stable_scale_matches_the_closed_forms(rank):
    """ρ = 1/(R_Z·σ_h) worked out by hand for the built-in inits (uniform ±1/√fan: E[f²] = 1/(3·fan))."""
    n, d_in, d_out = 40, 96, 80  # no mode caps these ranks
    expected = {
        "tt": 3 / rank,  # σ_h² = (d_in·r)·(1/(3·d_in))·(1/(3·r)) = 1/9
        "batch-matrix": math.sqrt(3) / rank,  # σ_h² = d_in/(3·d_in)
        "cp": 3 / math.sqrt(rank),  # σ_h² = 1·(1/(3r))·(d_in/(3·d_in)), weights ones
        "tensor-ring": 3 / rank**2,  # R_Z = r², σ_h² = (d_in·r)/(9·r·d_in)
        "tucker": math.sqrt(3 * (rank + n) / 2) / rank,  # Xavier core and p: σ_h² = 2/(3(r + n))
    }
    for name, value in expected.items():
        assert factnet.get_format(name, rank).stable_scale(n, d_in, d_out) == pytest.approx(value, rel=1e-12)


def test_estimated_moments_of_a_custom_init():
    """A format with its own init gets its moments from seeded draws: here N(0, 1/last size)."""
    fmt = factnet.get_format("test-two-cores", 4)
    moments = fmt.second_moments(5, 24, 16)
    assert moments["v"] == 0.0
    for name, exact in {"u": 1 / 4, "g": 1 / 4, "h": 1 / 4}.items():
        assert moments[name] == pytest.approx(exact, rel=0.06)


def test_decompose_defaults_to_the_stable_scale_and_keeps_the_papers():
    def decompose(**options) -> float:
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        return factnet.Tensorizer(model, ["0", "2"]).decompose("tt", rank=4, **options).settings.scale

    assert decompose() == pytest.approx(DEFAULT_GAIN * 3 / 4)  # TT: ρ = 3/r
    assert decompose(gain=2.0) == pytest.approx(2.0 * 3 / 4)
    assert decompose(scale=10.0) == 10.0  # the paper's s, as is
    with pytest.raises(factnet.FactnetError, match="not both"):
        decompose(scale=1.0, gain=1.0)


def kernel_step_decrease(rank: int, seed: int) -> float:
    """Decrease of ``Σ target·y`` after one AdamW step of a decomposed two-layer net, at the default scale."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).double()
    adapter = factnet.Tensorizer(model, ["0", "2"]).decompose("tt", rank=rank, seed=seed, train_head=False)
    x, target = torch.randn(32, 64, dtype=torch.float64), torch.randn(32, 64, dtype=torch.float64)
    before = (model(x) * target).sum()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=0.0)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        return (before - (model(x) * target).sum()).item() / 1e-3


def test_adapter_output_step_through_the_kernel():
    """The same property end to end: decompose's default scale, the kernel, AdamW, the model's output."""
    low, high = (statistics.mean(kernel_step_decrease(rank, seed) for seed in SEEDS) for rank in (2, 32))
    assert low > 0 and 1 / 1.25 < high / low < 1.25


# ---- later steps: the per-factor multipliers -------------------------------------------------------
def factor_step_decrease(name: str, rank: int, factor: str, seed: int, multiplied: bool = True,
                         n: int = 6, d_in: int = 96, d_out: int = 80) -> float:
    """Decrease of ``L = Σ G·(x s ΔW)`` per lr after one Adam step of ``factor`` alone, from a state where
    every factor is non-zero (the zero factor drawn at unit second moment, as `Format.multipliers` counts
    it), the factors used as ``c_F·F`` (`Format.multipliers`; all 1 with ``multiplied=False``)."""
    fmt = factnet.get_format(name, rank)
    generator = torch.Generator().manual_seed(seed)
    factors = {k: torch.empty(shape, dtype=torch.float64) for k, shape in fmt.shapes(n, d_in, d_out).items()}
    fmt.initialize(factors, generator)
    factors[fmt.zero].uniform_(-math.sqrt(3), math.sqrt(3), generator=generator)
    c = fmt.multipliers(n, d_in, d_out) if multiplied else dict.fromkeys(factors, 1.0)
    params = {k: nn.Parameter(v / c[k]) for k, v in factors.items()}
    x = torch.randn(16, n, d_in, generator=generator, dtype=torch.float64)
    target = torch.randn(16, n, d_out, generator=generator, dtype=torch.float64)
    scale = fmt.stable_scale(n, d_in, d_out)

    def loss() -> torch.Tensor:
        used = {k: c[k] * p for k, p in params.items()}
        return (torch.einsum("bij,ijk->bik", x, scale * fmt.reconstruct(used)) * target).sum()

    optimizer = torch.optim.Adam([params[factor]], lr=1e-3)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        return (before - loss()).item() / 1e-3


def factor_steps(name: str, rank: int, multiplied: bool = True) -> dict[str, float]:
    factors = factnet.get_format(name, rank).factors
    return {f: statistics.mean(factor_step_decrease(name, rank, f, seed, multiplied) for seed in SEEDS[:3])
            for f in factors}


@pytest.mark.parametrize("name", FORMATS)
def test_every_factors_step_is_the_same_at_every_rank(name):
    """With the multipliers, each factor's own Adam step moves the output as much at rank 64 as at rank 4
    (within 2.5x: the multipliers are rounded to powers of two, up to √2 each way; without them the steps
    grow up to 1,000x over these ranks)."""
    steps = [factor_steps(name, rank) for rank in (4, 16, 64)]
    for factor in steps[0]:
        values = [s[factor] for s in steps]
        assert min(values) > 0 and max(values) / min(values) < 2.5, (factor, values)


@pytest.mark.parametrize("name", ["tt", "tucker"])
def test_without_the_multipliers_a_core_step_grows_with_the_rank(name):
    """The check above can fail: without them TT's sigma (Tucker's core) step grows 8x or more from rank 4
    to 64 (r²-term sums, against the zero factor's r)."""
    core = {"tt": "sigma", "tucker": "core"}[name]
    low, high = (factor_steps(name, rank, multiplied=False)[core] for rank in (4, 64))
    assert high > 8 * low, (low, high)


def test_multipliers_are_powers_of_two_that_follow_the_closed_forms():
    """TT's sigma 1/r, Tucker's core ~1/r² (n large enough not to cap a), CP's p 1/√r; the zero factor 1."""
    n, d_in, d_out = 4096, 96, 80
    for rank in (1, 4, 16, 64):
        tt, tucker, cp = (factnet.get_format(f, rank).multipliers(n, d_in, d_out) for f in ("tt", "tucker", "cp"))
        assert tt == {"sigma": 1 / rank, "u": 1.0, "v": 1.0}
        assert cp == {"weights": 1.0, "p": 2.0 ** round(math.log2(rank ** -0.5)), "u": 1.0, "v": 1.0}
        assert tucker["v"] == 1.0 and tucker["core"] == 2.0 ** round(math.log2(rank ** -2 * math.sqrt(
            (rank + n) / (1 + n))))
    for name in FORMATS:
        for value in factnet.get_format(name, 8).multipliers(6, 96, 80).values():
            assert value > 0 and math.log2(value) == round(math.log2(value))


def test_the_stable_parametrization_trains_saves_and_loads_exactly(tmp_path):
    """decompose's default uses the multipliers (repr shows them), files hold the values the increment uses,
    and a loaded adapter has the same parametrization and the same stored parameters, bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    adapter = factnet.Tensorizer(model, ["0", "2"]).decompose("tt", rank=4, seed=0, train_head=False)
    group = adapter.group(adapter.group_names[0])
    assert group.multipliers == {"sigma": 0.25} and "sigma×0.25" in repr(adapter)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    x = torch.randn(8, 16)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    expected = model(x)
    adapter.save(tmp_path / "a.safetensors")
    fresh = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("factnet")}, strict=False)
    loaded = factnet.load(fresh, tmp_path / "a.safetensors")
    assert loaded.settings.stable
    for name in adapter.group_names:
        for key, value in adapter.group(name).factors.items():
            assert torch.equal(loaded.group(name).factors[key], value), key
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    paper = factnet.Tensorizer(nn.Sequential(nn.Linear(16, 16)), ["0"]).decompose("tt", rank=4, scale=1.0)
    assert not paper.settings.stable and all(not g.multipliers for g in paper.groups.values())

