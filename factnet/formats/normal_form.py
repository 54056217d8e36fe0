"""The normal form every kernel uses, derived from a format's einsum letters alone:

    ΔW[i] = P_in[i] @ core[i] @ P_out[i]ᵀ,   P_in: (d_in, a), core: (a, b), P_out: (d_out, b)

``P_in`` is the factor holding ``j``, ``P_out`` the one holding ``k`` (per slice when it
also holds ``i``), and ``core`` contracts all other factors; a rank index shared by
``P_in`` and ``P_out`` becomes an identity in the core. Where every rank index of both
projections is shared (CP, VeRA, batch-matrix), the core is diagonal: it is kept as its diagonal
``core: (n | 1, a)`` (``None`` where it is the identity), never as an ``a x a`` matrix, and a factor
holding only ``i`` and ``k`` (VeRA's ``b``) stays a per-slice scaling of the output,
``out_scale: (n | 1, d_out)``, so ``ΔW[i] = P_in[i] diag(core[i]) P_out[i]ᵀ diag(out_scale[i])``: a step
costs thin products and per-slice scalings only, whatever the rank.

A format's declaration (``declared``: factor name → letters over the modes ``i, j, k`` and rank letters)
is all the functions here read: `build` the normal form from the factors, `per_slice` which projections
differ per slice, `core_report` how the cores are contracted.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import opt_einsum
import torch
from torch import Tensor

from factnet.plans import planned

__all__ = ["MODES", "NormalForm", "build", "core_report", "per_slice"]

MODES = "ijk"


@dataclass(frozen=True)
class NormalForm:
    """Factors of a group in normal form, laid out for BLAS (rank-major projections).

    ``p_in_t: (n | 1, a, d_in)``, ``core: (n, a, b)``, ``p_out_t: (n | 1, b, d_out)``; the
    leading size is ``n`` when the projection differs per slice, else 1 (shared). A diagonal core
    (``a == b``) is its diagonal, ``core: (n | 1, a)``, or ``None`` for the identity; only then may
    ``out_scale: (n | 1, d_out)`` scale each slice's output (``ΔW[i] ← ΔW[i] diag(out_scale[i])``).
    """

    p_in_t: Tensor
    core: Tensor | None
    p_out_t: Tensor
    out_scale: Tensor | None = None


def build(declared: dict[str, str], factors: dict[str, Tensor]) -> NormalForm:
    """``(P_in, core, P_out)`` with ``ΔW[i] = P_in[i] core[i] P_out[i]ᵀ`` from the factors of a format declaring
    ``declared`` (name → letters); see the module doc."""
    plan = _normal_plan(tuple(declared.items()))
    n = _mode_size(declared, factors, "i")
    p_in = _side(factors, declared, plan.in_factors, plan.in_letters)
    p_out = _side(factors, declared, plan.out_factors, plan.out_letters)
    p_in_t = _projection(p_in, plan.in_letters, "j", plan.in_ranks)
    p_out_t = _projection(p_out, plan.out_letters, "k", plan.in_ranks if plan.diagonal else plan.out_ranks)
    operands = [factors[name] for name in plan.rest]
    if plan.diagonal:  # core[i] = diag(c[i]): kept as c, never as an a x a matrix
        out_scale = None
        if plan.out_scales:
            out_scale = _side(factors, declared, plan.out_scales, _union(declared[f] for f in plan.out_scales))
            out_scale = out_scale.reshape(-1, out_scale.shape[-1])  # (n | 1, d_out)
        if not operands:
            ones = None if out_scale is None else p_in_t.new_ones(1, p_in_t.shape[1])
            return NormalForm(p_in_t, ones, p_out_t, out_scale)
        diagonal = operands[0] if plan.core_equation is None else planned(
            plan.core_equation, *(tuple(t.shape) for t in operands))(*operands)
        diagonal = diagonal.reshape(n if "i" in plan.core_equation_output else 1, -1)
        return NormalForm(p_in_t, diagonal, p_out_t, out_scale)
    operands += [torch.eye(p_in.shape[plan.in_letters.index(c)], dtype=p_in_t.dtype,
                           device=p_in_t.device) for c in plan.shared]
    if plan.core_equation is None:  # the core is a single factor already in (i, a, b) order
        core = operands[0]
    else:
        core = planned(plan.core_equation, *(tuple(t.shape) for t in operands))(*operands)
    if "i" not in plan.core_equation_output:
        core = core.unsqueeze(0).expand(n, *core.shape)
    a, b = p_in_t.shape[1], p_out_t.shape[1]
    return NormalForm(p_in_t, core.reshape(n, a, b), p_out_t)


def per_slice(declared: dict[str, str]) -> tuple[bool, bool]:
    """Whether ``P_in`` / ``P_out`` of the normal form differ per slice (their factor holds mode ``i``)."""
    return _normal_plan(tuple(declared.items())).per_slice


def core_report(declared: dict[str, str], sizes: dict[str, int]) -> str:
    """opt-einsum's path and cost for building the cores of a group whose letters have ``sizes``."""
    plan = _normal_plan(tuple(declared.items()))
    if plan.diagonal:
        letters = ", ".join(plan.shared)
        if not plan.rest:
            return f"core: the identity over {letters} (no core, no contraction)"
        how = f"the factor {plan.rest[0]}" if plan.core_equation is None else plan.core_equation
        scaled = f"; {', '.join(plan.out_scales)} scales the output" if plan.out_scales else ""
        return f"core: diagonal over {letters} ({how}), kept as a vector (no {letters}x{letters} core){scaled}"
    if plan.core_equation is None:
        return "core: a factor as is (no contraction)"
    shapes = [tuple(sizes[c] for c in declared[name]) for name in plan.rest]
    shapes += [(sizes[c], sizes[c]) for c in plan.shared]
    _, info = opt_einsum.contract_path(plan.core_equation, *shapes, shapes=True, optimize="optimal")
    return f"core: {plan.core_equation}\n{info}"


@dataclass(frozen=True)
class _NormalPlan:
    in_factors: tuple[str, ...]  # the factors holding j (VeRA: ``A``), their product the input projection
    out_factors: tuple[str, ...]  # the factors holding k and a rank letter (VeRA: ``B``; TT: ``v``)
    out_scales: tuple[str, ...]  # diagonal cores: the factors holding only i, k (VeRA's ``b``), an output scaling
    in_letters: str  # the letters of the input projection (their product)
    out_letters: str
    in_ranks: str  # their rank letters, in the order of the projections' rank axes
    out_ranks: str
    rest: tuple[str, ...]
    shared: tuple[str, ...]  # rank letters of both projections: an identity each in the core
    core_equation: str | None  # (diagonal: the rest's product over ``i`` and the shared letters)
    core_equation_output: str
    diagonal: bool  # every rank letter of both projections shared: the core is diagonal, kept as its diagonal
    per_slice: tuple[bool, bool]  # whether P_in / P_out of the normal form differ per slice


@functools.cache
def _normal_plan(declaration: tuple[tuple[str, str], ...]) -> _NormalPlan:
    """How `build` contracts the factors of a format declaring ``declaration`` (derived once per declaration)."""
    factors = dict(declaration)
    in_factors = tuple(name for name, letters in factors.items() if "j" in letters)
    out_factors = tuple(name for name, letters in factors.items() if "k" in letters)
    in_letters, out_letters = (_union(factors[name] for name in side) for side in (in_factors, out_factors))
    in_ranks = "".join(c for c in in_letters if c not in MODES)
    out_ranks = "".join(c for c in out_letters if c not in MODES)
    rest = tuple(name for name in factors if name not in in_factors + out_factors)
    diagonal = set(in_ranks) == set(out_ranks)
    out_scales = tuple(name for name in out_factors if set(factors[name]) <= {"i", "k"}) if diagonal else ()
    if out_scales:
        out_factors = tuple(name for name in out_factors if name not in out_scales)
        out_letters = _union(factors[name] for name in out_factors)
    fresh = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in "".join(factors.values()))
    renamed = {c: next(fresh) for c in out_ranks if c in in_ranks}
    rest_letters = "".join(factors[name] for name in rest)
    if diagonal:  # the core's only entries: its diagonal, the rest contracted over (i and) the shared letters
        inputs = [factors[name] for name in rest]
        output = ("i" if "i" in rest_letters else "") + in_ranks
    else:
        inputs = [factors[name] for name in rest] + [c + renamed[c] for c in renamed]
        slice_letter = "i" if any("i" in letters for letters in inputs) else ""
        output = slice_letter + in_ranks + "".join(renamed.get(c, c) for c in out_ranks)
    equation = ",".join(inputs) + "->" + output
    trivial = not inputs or (len(inputs) == 1 and inputs[0] == output)
    return _NormalPlan(in_factors, out_factors, out_scales, in_letters, out_letters, in_ranks, out_ranks, rest,
                       tuple(renamed), None if trivial else equation, output, diagonal,
                       ("i" in in_letters, "i" in out_letters))


def _union(letters: Iterable[str]) -> str:
    """The letters of several factors, each once, in order of appearance."""
    return "".join(dict.fromkeys("".join(letters)))


def _side(factors: dict[str, Tensor], declared: dict[str, str], names: tuple[str, ...], letters: str) -> Tensor:
    """The product of the factors ``names`` (those holding one mode) over ``letters``: the factor itself if one."""
    if len(names) == 1:
        return factors[names[0]]
    operands = [factors[name] for name in names]
    equation = ",".join(declared[name] for name in names) + "->" + letters
    return planned(equation, *(tuple(t.shape) for t in operands))(*operands)


def _projection(factor: Tensor, letters: str, mode: str, rank_order: str) -> Tensor:
    """A factor holding ``mode`` as a rank-major projection ``(n | 1, rank…, d)``, its rank axes in
    ``rank_order``, contiguous."""
    ranks = [letters.index(c) for c in rank_order]
    slice_axis = [letters.index("i")] if "i" in letters else []
    order = slice_axis + ranks + [letters.index(mode)]
    projection = factor.permute(order)
    lead = projection.shape[0] if slice_axis else 1
    return projection.reshape(lead, -1, factor.shape[letters.index(mode)]).contiguous()


def _mode_size(declared: dict[str, str], factors: dict[str, Tensor], mode: str) -> int:
    for name, letters in declared.items():
        if mode in letters:
            return factors[name].shape[letters.index(mode)]
    raise AssertionError(f"no factor holds mode {mode!r}")  # excluded by the format's declaration check
