"""Formats with seeded factors (`Format.seeded`: frozen, regenerated from the spec's seed, zero bytes)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from factnet.formats.base import Format
from factnet.formats.tt import TensorTrain


class VeRA(Format, name="vera"):
    """VeRA (Kopiczko et al., 2024): ``ΔW[i,j,k] = Σ_a b[i,k] B[k,a] d[i,a] A[j,a]``, ``A: (d_in, r)`` and
    ``B: (d_out, r)`` seeded; ``n·(d_out + r)`` trained parameters.

    Init as PEFT's VeRA: ``A``, ``B`` Kaiming-uniform (bound ``√(6/fan_in)``, fan-in ``d_in`` and ``r``),
    ``d`` the paper's ``d_initial = 0.1``, ``b`` zero. PEFT's ``vera_A`` is ``Aᵀ``, ``vera_B`` is ``B``,
    ``vera_lambda_b``/``vera_lambda_d`` of slice ``i`` are ``b[i]``/``d[i]``.
    """

    factors = {"b": "ik", "B": "ka", "d": "ia", "A": "ja"}
    zero = "b"
    seeded = ("A", "B")

    def initialize(self, factors: dict[str, Tensor], generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for name, fan in (("A", factors["A"].shape[0]), ("B", factors["B"].shape[1])):
                bound = math.sqrt(6.0 / fan)
                factors[name].uniform_(-bound, bound, generator=generator)
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
