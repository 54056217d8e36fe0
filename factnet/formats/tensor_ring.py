"""Tensor ring: a closed chain of three cores over modes (i, j, k)."""

from __future__ import annotations

import tensorly as tl
from tensorly.tr_tensor import TRTensor
from torch import Tensor

from factnet.formats.base import Format


class TensorRing(Format, name="tensor-ring"):
    """``ΔW[i,j,k] = Σ_abc slices[a,i,b] u[j,b,c] v[k,c,a]``; ``r²·(n + d_in + d_out)``.

    In normal form ``P_in`` and ``P_out`` are the reshaped ring cores of rank ``r²``.
    """

    factors = {"slices": "aib", "u": "jbc", "v": "kca"}
    zero = "v"

    def to_tensorly(self, factors: dict[str, Tensor]) -> TRTensor:
        """Cores ``(r, n, r), (r, d_in, r), (r, d_out, r)`` in tensorly's ring layout."""
        return TRTensor([factors["slices"], factors["u"].permute(1, 0, 2), factors["v"].permute(1, 0, 2)])

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        with tl.backend_context("pytorch"):
            return tl.tr_to_tensor(self.to_tensorly(factors))

    def from_tensorly(self, decomposition: TRTensor) -> dict[str, Tensor]:
        """Inverse of `to_tensorly`: ring cores ``(a, n, b), (b, d_in, c), (c, d_out, a)`` over
        modes (i, j, k) → ``slices: (a, n, b)``, ``u: (d_in, b, c)``, ``v: (d_out, c, a)``."""
        slices, u, v = decomposition
        return {"slices": slices, "u": u.permute(1, 0, 2), "v": v.permute(1, 0, 2)}
