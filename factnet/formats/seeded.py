"""Formats with seeded factors (`Format.seeded`: frozen, regenerated from the spec's seed, zero bytes)."""

from __future__ import annotations

import math

import tensorly as tl
import torch
from tensorly.cp_tensor import CPTensor
from torch import Tensor

from factnet.formats.base import Format
from factnet.formats.tt import TensorTrain


def _kaiming_uniform(factors: dict[str, Tensor], generator: torch.Generator | None) -> None:
    """``A: (d_in, r)``, ``B: (d_out, r)`` uniform with bound ``√(6/fan_in)``, fan-in ``d_in`` and ``r`` (PEFT's VeRA)."""
    with torch.no_grad():
        for name, fan in (("A", factors["A"].shape[0]), ("B", factors["B"].shape[1])):
            bound = math.sqrt(6.0 / fan)
            factors[name].uniform_(-bound, bound, generator=generator)


class VeRA(Format, name="vera"):
    """VeRA (Kopiczko et al., 2024): ``ΔW[i,j,k] = Σ_a b[i,k] B[k,a] d[i,a] A[j,a]``, ``A: (d_in, r)`` and
    ``B: (d_out, r)`` seeded; ``n·(d_out + r)`` trained parameters.

    Init as PEFT's VeRA: ``A``, ``B`` Kaiming-uniform (bound ``√(6/fan_in)``, fan-in ``d_in`` and ``r``),
    ``d`` the paper's ``d_initial = 0.1``, ``b`` zero. PEFT's ``vera_A`` is ``Aᵀ``, ``vera_B`` is ``B``,
    ``vera_lambda_b``/``vera_lambda_d`` of slice ``i`` are ``b[i]``/``d[i]``.

    ``a`` is a diagonal letter (the trained ``d`` holds it alone): any rank trains, above the matrix side
    too, and no ``r x r`` core is built (`Format.diagonal_letters`).
    """

    factors = {"b": "ik", "B": "ka", "d": "ia", "A": "ja"}
    zero = "b"
    seeded = ("A", "B")

    def initialize(self, factors: dict[str, Tensor], generator: torch.Generator | None = None) -> None:
        _kaiming_uniform(factors, generator)
        with torch.no_grad():
            factors["d"].fill_(0.1)
            factors["b"].zero_()

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        """Dense ``ΔW`` as PEFT writes it: ``ΔW[i]ᵀ = diag(b[i]) B diag(d[i]) Aᵀ``, slice by slice."""
        return torch.stack([(b[:, None] * factors["B"] * d) @ factors["A"].t()
                            for b, d in zip(factors["b"], factors["d"])]).transpose(1, 2)


class SeededTensorTrain(TensorTrain, name="tt-seeded"):
    """FacT-TT with ``u``, ``v`` seeded (the base init's uniform draws): only the cores ``sigma``
    (``n·r²`` parameters) train, from zero."""

    zero = "sigma"
    seeded = ("u", "v")


class SeededCP(Format, name="cp-seeded"):
    """CP with seeded projections: ``ΔW[i] = A diag(d[i]) Bᵀ``, ``A: (d_in, r)``, ``B: (d_out, r)`` seeded and
    shared by every slice of the group (FacT's cross-layer sharing), only the per-slice diagonal ``d``
    trained: ``n·r`` parameters for a per-slice rank of ``min(r, d_in, d_out)``.

    ``r`` is a diagonal letter: each index is one more seeded direction pair a slice can weigh, so it is
    bounded by the budget, not by the matrix side, and the kernel runs two thin products a matrix (``d``
    folded into ``B``), never an ``r x r`` core. Init: ``A``, ``B`` as VeRA's (Kaiming-uniform), ``d`` zero.
    """

    factors = {"d": "ia", "A": "ja", "B": "ka"}
    zero = "d"
    seeded = ("A", "B")

    def initialize(self, factors: dict[str, Tensor], generator: torch.Generator | None = None) -> None:
        _kaiming_uniform(factors, generator)
        with torch.no_grad():
            factors["d"].zero_()

    def to_tensorly(self, factors: dict[str, Tensor]) -> CPTensor:
        ones = torch.ones(factors["d"].shape[1], dtype=factors["d"].dtype, device=factors["d"].device)
        return CPTensor((ones, [factors["d"], factors["A"], factors["B"]]))

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        with tl.backend_context("pytorch"):
            return tl.cp_to_tensor(self.to_tensorly(factors))
