"""The `Format` base class: a factor network over the modes of a group tensor.

A group tensor ``ΔW`` has three modes: ``i`` (slice), ``j`` (input), ``k`` (output), so
``ΔW[i]`` is the ``d_in × d_out`` increment of slice ``i`` (applied as ``x @ ΔW[i]``).
A format names its factors with einsum letters (``{"sigma": "iab", "u": "ja", "v": "kb"}``
is FacT-TT); every other letter is a rank index of size at most ``rank`` (see `Format.sizes`).
From that alone the base class derives the shapes, the parameter count, the rank-stable scale
(`Format.stable_scale`), the dense reconstruction and the *normal form* every kernel uses,
``ΔW[i] = P_in[i] @ core[i] @ P_out[i]ᵀ`` (`factnet.formats.normal_form`: how the factors contract into it).

A rank letter that the *trained* factors carry only diagonally (each trained factor holding it holds
no other letter but ``i``: VeRA's ``a`` in ``d: ia``, its ``A``, ``B`` being seeded) is a *diagonal
letter* (`Format.diagonal_letters`): every extra index adds a direction however small the matrix,
so it is bounded by the budget, not by the matrix side. Subclasses register themselves by
name: ``class BlockTerm(Format, name="block-term"): ...``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from factnet.errors import FactnetError
from factnet.formats import normal_form
from factnet.formats.normal_form import MODES, NormalForm
from factnet.plans import planned

__all__ = ["Format", "available_formats", "get_format"]
_REGISTRY: dict[str, type[Format]] = {}


class Format:
    """A decomposition format of a ``(n, d_in, d_out)`` group tensor at a given rank.

    Subclasses set ``factors`` (name → einsum letters over ``i, j, k`` and rank letters) and
    ``zero`` (the factor that starts at zero, on the output side so ``ΔW = 0`` at step 0),
    and implement `to_tensorly`/`reference`. Factors named in ``seeded`` are frozen: never trained nor
    stored, regenerated from the seed in the file's spec (`seeded_values`); VeRA's ``A``, ``B`` are.
    """

    name: ClassVar[str]
    factors: ClassVar[dict[str, str]]
    zero: ClassVar[str]
    seeded: ClassVar[tuple[str, ...]] = ()
    ones: ClassVar[tuple[str, ...]] = ()  # factors that start at ones (CP's weights, a per-slice gain)

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        _check_declaration(cls, name)
        cls.name = name
        _REGISTRY[name] = cls

    def __init__(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise FactnetError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank})"

    # ---- declared by each format -------------------------------------------------------
    def num_parameters(self, n: int, d_in: int, d_out: int) -> int:
        """Exact number of trained parameters for a ``(n, d_in, d_out)`` group: the elements of the factors
        not `seeded` (those cost nothing: regenerated from the seed)."""
        return sum(math.prod(shape) for name, shape in self.shapes(n, d_in, d_out).items() if name not in self.seeded)

    def seeded_values(self, n: int, d_in: int, d_out: int, seed: int) -> dict[str, Tensor]:
        """The `seeded` factors of a ``(n, d_in, d_out)`` group, float32 on the CPU, bit for bit the same in
        every process: `initialize` draws all factors with ``torch.Generator().manual_seed(seed)`` (CPU) and the
        seeded ones are kept (the caller moves and casts them)."""
        generator = torch.Generator().manual_seed(seed)
        drawn = {name: torch.empty(shape) for name, shape in self.shapes(n, d_in, d_out).items()}
        self.initialize(drawn, generator)
        return {name: drawn[name] for name in self.seeded}

    def max_rank(self, n: int, d_in: int, d_out: int) -> int:
        """Largest meaningful size of a rank letter held by three or more factors (CP's ``r``); a letter
        linking two factors is capped by the factors themselves, a diagonal letter not at all (see `sizes`)."""
        return min(d_in, d_out)

    @property
    def diagonal_letters(self) -> str:
        """The rank letters the trained factors carry only diagonally (see the module doc): uncapped."""
        return _diagonal_letters(type(self))

    def to_tensorly(self, factors: dict[str, Tensor]) -> Any:
        """The factors as the matching tensorly factorized tensor."""
        raise NotImplementedError

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        """Dense ``(n, d_in, d_out)`` tensor reconstructed by tensorly (the test oracle)."""
        raise NotImplementedError

    def from_tensorly(self, decomposition: Any) -> dict[str, Tensor]:
        """The inverse of `to_tensorly`: factors (name → tensor) from a tensorly factorized tensor.

        Rank sizes are taken from ``decomposition`` (they may be below ``self.rank``)."""
        raise NotImplementedError(
            f"format {getattr(self, 'name', type(self).__name__)!r} does not implement from_tensorly(), so "
            "factnet.compress cannot map a tensorly decomposition onto its factors; implement "
            f"{type(self).__name__}.from_tensorly(decomposition) -> dict[str, Tensor] (the inverse of to_tensorly)"
        )

    def initialize(self, factors: dict[str, Tensor], generator: torch.Generator | None = None) -> None:
        """Fill factors in place: uniform ``±1/√fan`` (``fan`` the factor's largest non-slice
        size, as ``nn.Linear`` does), then `zero` set to zeros and `ones` to ones. Formats may override."""
        for name, tensor in factors.items():
            _uniform(tensor, 1.0 / math.sqrt(_fan(self.factors[name], tensor.shape)), generator)
        with torch.no_grad():
            factors[self.zero].zero_()
            for name in self.ones:
                factors[name].fill_(1.0)

    def second_moments(self, n: int, d_in: int, d_out: int) -> dict[str, float]:
        """``E[f²]`` of each factor's entries as `initialize` draws them (the zero factor's is 0).

        Exact for the base init (uniform ``±1/√fan``: ``1/(3·fan)``); a format that overrides
        `initialize` without overriding this gets a deterministic estimate (seeded draws)."""
        if type(self).initialize is Format.initialize:
            return self._uniform_moments(n, d_in, d_out)
        return _sampled_second_moments(self, self.shapes(n, d_in, d_out))

    def _uniform_moments(self, n: int, d_in: int, d_out: int) -> dict[str, float]:
        """`second_moments` of the base init (for formats that redraw only some factors)."""
        def moment(name: str, shape: tuple[int, ...]) -> float:
            return 0.0 if name == self.zero else 1.0 if name in self.ones else 1.0 / (3 * _fan(self.factors[name], shape))

        return {name: moment(name, shape) for name, shape in self.shapes(n, d_in, d_out).items()}

    def stable_scale(self, n: int, d_in: int, d_out: int) -> float:
        """The rank-stable scale ``ρ`` of a ``(n, d_in, d_out)`` group: ``s = g·ρ`` makes one Adam step of
        size ``lr`` from the init change the increment's output by ``≈ g·lr`` per unit input, whatever the
        rank, width or slice count (docs/scale/README.md has the derivation).

        At step 0 only the zero factor ``Z`` has a gradient; Adam moves each of its entries by ``±lr``
        along the gradient, so the output moves by ``s·lr·R_Z·σ_h``: ``R_Z`` terms (the product of the sizes
        of ``Z``'s summed letters), each a coefficient ``h`` (the input contracted with the other factors) of
        RMS ``σ_h = √(N_h·Π E[f²])`` for ``N_h`` summed terms. Hence ``ρ = 1 / (R_Z·σ_h)``."""
        return 1.0 / self._step_gains(n, d_in, d_out)[self.zero]

    def multipliers(self, n: int, d_in: int, d_out: int) -> dict[str, float]:
        """Each factor's multiplier ``c_F`` in the rank-stable parametrization: the increment uses
        ``c_F·F`` for a stored ``F``, so Adam moves factor ``F`` ``c_F`` times as fast (docs/scale/README.md).

        Once every factor is non-zero, each one's Adam step moves the output by ``s·lr·G_F``, the
        `stable_scale` count with ``F`` in place of ``Z`` (``Z`` at unit size): TT's ``sigma`` sums ``r²``
        terms where ``v`` sums ``r``, so it grows ``r`` times faster than ``v`` as the rank grows.
        ``c_F = (G_Z/G_F)(rank) / (G_Z/G_F)(rank 1)``, rounded to a power of two (so stored and used
        values convert exactly), keeps every factor's step in the proportion it has at rank 1: TT
        ``sigma`` ``1/r``, Tucker ``core`` about ``1/r²``, CP ``p`` about ``1/√r``; ``Z`` and factors whose
        step does not grow with the rank keep 1 (μP's base-shape rule, with rank 1 as the base)."""
        gains, base = self._step_gains(n, d_in, d_out), type(self)(1)._step_gains(n, d_in, d_out)
        return {name: 2.0 ** round(math.log2((gains[self.zero] / gains[name]) / (base[self.zero] / base[name])))
                for name in self.factors}

    def _step_gains(self, n: int, d_in: int, d_out: int) -> dict[str, float]:
        """``R_F·σ_h`` of every factor ``F``: how far one Adam step of ``±1`` on each of its entries moves the
        output per unit input and unit scale, with the zero factor counted at unit size (see `stable_scale`)."""
        sizes = self.sizes(n, d_in, d_out)
        moments = self.second_moments(n, d_in, d_out) | {self.zero: 1.0}
        summed = (set("".join(self.factors.values())) | {"j"}) - {"i", "k"}  # j is summed against the input
        gains = {}
        for name, letters in self.factors.items():
            own = summed & set(letters)
            terms = math.prod(sizes[c] for c in own)
            n_h = math.prod(sizes[c] for c in summed - own)
            gains[name] = terms * math.sqrt(n_h * math.prod(moments[f] for f in self.factors if f != name))
        return gains

    # ---- derived from the declaration --------------------------------------------------
    def sizes(self, n: int, d_in: int, d_out: int) -> dict[str, int]:
        """Size of every einsum letter: the three modes and each rank letter, ``rank`` capped per letter.

        A letter linking two factors is at most the product of the other sizes of each (the rank of
        that factor unfolded; mode ``i`` does not count where several factors hold it, as it is a
        batch index there): Tucker's ``a`` (with ``p: i×a``) is at most ``n``, TT's ``a`` at most
        ``d_in``. A letter held by three or more factors is at most `max_rank`. Caps are applied until
        none changes, so ``rank`` means "at most ``rank`` in each mode". A diagonal letter
        (`diagonal_letters`) is ``rank`` whatever the matrix side."""
        sizes = {"i": n, "j": d_in, "k": d_out}
        links, diagonal = _links(type(self)), self.diagonal_letters
        ranks = {c: self.rank if c in links or c in diagonal else min(self.rank, self.max_rank(n, d_in, d_out))
                 for letters in self.factors.values() for c in letters if c not in MODES}
        batch = {"i"} if sum("i" in letters for letters in self.factors.values()) > 1 else set()
        changed = True
        while changed:
            changed = False
            for c, holders in links.items():
                for letters in holders:
                    cap = math.prod({**sizes, **ranks}[x] for x in letters if x != c and x not in batch)
                    if ranks[c] > cap:
                        ranks[c], changed = cap, True
        return {**sizes, **ranks}

    def capped(self, n: int, d_in: int, d_out: int) -> dict[str, int]:
        """The rank letters a ``(n, d_in, d_out)`` group caps below ``rank``, with their sizes."""
        return {c: size for c, size in self.sizes(n, d_in, d_out).items() if c not in MODES and size < self.rank}

    def capped_text(self, n: int, d_in: int, d_out: int) -> str:
        """`capped` as the messages say it: ``"a=1, b=4"`` ("" if no letter is capped)."""
        return ", ".join(f"{c}={size}" for c, size in self.capped(n, d_in, d_out).items())

    def shapes(self, n: int, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
        """Shape of each factor for a ``(n, d_in, d_out)`` group."""
        sizes = self.sizes(n, d_in, d_out)
        return {name: tuple(sizes[c] for c in letters) for name, letters in self.factors.items()}

    @property
    def equation(self) -> str:
        """The einsum that reconstructs ``ΔW`` from the factors, e.g. ``iab,ja,kb->ijk``."""
        return ",".join(self.factors.values()) + "->" + MODES

    @property
    def projections_per_slice(self) -> tuple[bool, bool]:
        """Whether ``P_in`` / ``P_out`` of the normal form differ per slice (their factor holds mode ``i``)."""
        return normal_form.per_slice(self.factors)

    def reconstruct(self, factors: dict[str, Tensor]) -> Tensor:
        """Dense ``(n, d_in, d_out)`` tensor by the format's own einsum."""
        operands = [factors[name] for name in self.factors]
        return planned(self.equation, *(tuple(t.shape) for t in operands))(*operands)

    def normal_form(self, factors: dict[str, Tensor]) -> NormalForm:
        """``(P_in, core, P_out)`` with ``ΔW[i] = P_in[i] core[i] P_out[i]ᵀ`` (`factnet.formats.normal_form`)."""
        return normal_form.build(self.factors, factors)

    def core_plan_report(self, n: int, d_in: int, d_out: int) -> str:
        """opt-einsum's path and cost for building the cores of a ``(n, d_in, d_out)`` group."""
        return normal_form.core_report(self.factors, self.sizes(n, d_in, d_out))


@functools.cache
def _diagonal_letters(cls: type[Format]) -> str:
    """The rank letters that every trained factor holding them carries alone (besides ``i``)."""
    trained = [letters for name, letters in cls.factors.items() if name not in cls.seeded]
    letters = dict.fromkeys(c for held in cls.factors.values() for c in held if c not in MODES)
    return "".join(c for c in letters if all(set(held) <= {"i", c} for held in trained if c in held)
                   and any(c in held for held in trained))


@functools.cache
def _links(cls: type[Format]) -> dict[str, tuple[str, ...]]:
    """Rank letters held by exactly two factors, with the letters of those two factors."""
    held = [letters for letters in cls.factors.values()]
    counts = {c: sum(c in letters for letters in held) for letters in held for c in letters if c not in MODES}
    return {c: tuple(letters for letters in held if c in letters) for c, count in counts.items() if count == 2}


def _fan(letters: str, shape: tuple[int, ...]) -> int:
    """The base init's fan: the factor's largest size outside mode ``i`` (as ``nn.Linear``'s fan-in)."""
    return max((size for letter, size in zip(letters, shape) if letter != "i"), default=1)


def _sampled_second_moments(fmt: Format, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """``E[f²]`` per factor from seeded draws of ``fmt.initialize`` (at least 2¹⁶ values or 1024 draws each)."""
    generator = torch.Generator().manual_seed(0)
    draws = min(1024, max(1, -(-(1 << 16) // min(math.prod(s) or 1 for s in shapes.values()))))
    totals = dict.fromkeys(shapes, 0.0)
    for _ in range(draws):
        factors = {name: torch.empty(shape, dtype=torch.float64) for name, shape in shapes.items()}
        fmt.initialize(factors, generator)
        for name, tensor in factors.items():
            totals[name] += tensor.square().mean().item() / draws
    return totals


def _uniform(tensor: Tensor, bound: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


def _check_declaration(cls: type[Format], name: str) -> None:
    """Reject a format whose letters cannot describe a ``(i, j, k)`` increment."""
    factors = getattr(cls, "factors", None)
    problem = None
    if not isinstance(factors, dict) or not factors:
        problem = "`factors` must map factor names to einsum letters"
    else:
        holders = {m: [f for f, letters in factors.items() if m in letters] for m in MODES}
        letters_all = "".join(factors.values())
        if any(not holders[m] for m in "jk"):
            problem = "modes 'j' (in) and 'k' (out) must each appear in some factor"
        elif set(holders["j"]) & set(holders["k"]):
            problem = "'j' and 'k' must sit in different factors (the input and output projections)"
        elif "i" not in letters_all:
            problem = "mode 'i' (slice) must appear in some factor"
        elif not all(c.isalpha() and c.islower() for c in letters_all):
            problem = "factor letters must be lowercase a-z"
        elif getattr(cls, "zero", None) not in factors:
            problem = "`zero` must name one of the factors"
        elif not set(cls.seeded) <= set(factors) or cls.zero in cls.seeded:
            problem = "`seeded` must name factors other than `zero`"
        else:
            counts = {c: letters_all.count(c) for c in set(letters_all) if c not in MODES}
            lonely = sorted(c for c, count in counts.items() if count < 2)
            if lonely:
                problem = f"rank letters {lonely} appear in one factor only; each must link two"
    if problem:
        raise FactnetError(f"format {name!r}: {problem}")


def available_formats() -> list[str]:
    """Names of the registered formats, sorted."""
    return sorted(_REGISTRY)


def get_format(name: str | Format, rank: int | None = None) -> Format:
    """A format instance by registered name (or pass an instance through)."""
    if isinstance(name, Format):
        return name
    if name not in _REGISTRY:
        raise FactnetError(f"unknown format {name!r}; known formats: {', '.join(available_formats())}")
    if rank is None:
        raise FactnetError(f"format {name!r} needs a rank, e.g. decompose({name!r}, rank=8)")
    return _REGISTRY[name](rank)
