"""CP (CANDECOMP/PARAFAC): ``ΔW = Σ_r λ_r p_r ∘ u_r ∘ v_r``."""

from __future__ import annotations

import tensorly as tl
from tensorly.cp_tensor import CPTensor
from torch import Tensor

from factnet.formats.base import Format


class CP(Format, name="cp"):
    """``ΔW[i,j,k] = Σ_r weights[r] p[i,r] u[j,r] v[k,r]``; ``r + (n + d_in + d_out)·r``.

    Per module the core of slice ``i`` is ``diag(weights · p[i])``. Init: ``weights`` ones,
    ``p`` and ``u`` uniform ``±1/√fan``, ``v`` zero.
    """

    factors = {"weights": "r", "p": "ir", "u": "jr", "v": "kr"}
    zero = "v"
    ones = ("weights",)

    def to_tensorly(self, factors: dict[str, Tensor]) -> CPTensor:
        return CPTensor((factors["weights"], [factors["p"], factors["u"], factors["v"]]))

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        with tl.backend_context("pytorch"):
            return tl.cp_to_tensor(self.to_tensorly(factors))

    def from_tensorly(self, decomposition: CPTensor) -> dict[str, Tensor]:
        """Inverse of `to_tensorly`: ``(weights, [p, u, v])`` with modes (i, j, k)."""
        weights, (p, u, v) = decomposition
        return {"weights": weights, "p": p, "u": u, "v": v}
