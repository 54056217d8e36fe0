"""FacT-TT: ``ΔW = Σ ×₂ U ×₃ V``, a tensor train over modes (j, i, k)."""

from __future__ import annotations

import tensorly as tl
from tensorly.tt_tensor import TTTensor
from torch import Tensor

from factnet.formats.base import Format


class TensorTrain(Format, name="tt"):
    """``ΔW[i,j,k] = Σ_ab sigma[i,a,b] u[j,a] v[k,b]``; ``(d_in + d_out)·r + n·r²`` parameters.

    Init as the paper's code: ``u`` as ``nn.Linear(d_in, r)``, each ``sigma[i]`` as
    ``nn.Linear(r, r)`` (uniform ``±1/√fan_in``), ``v`` zero.
    """

    factors = {"sigma": "iab", "u": "ja", "v": "kb"}
    zero = "v"

    def to_tensorly(self, factors: dict[str, Tensor]) -> TTTensor:
        """Cores ``(1, d_in, r), (r, n, r), (r, d_out, 1)``: a TT over modes (j, i, k)."""
        u, sigma, v = factors["u"], factors["sigma"], factors["v"]
        return TTTensor([u.unsqueeze(0), sigma.permute(1, 0, 2), v.t().unsqueeze(-1)])

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        with tl.backend_context("pytorch"):
            return tl.tt_to_tensor(self.to_tensorly(factors)).permute(1, 0, 2)

    def from_tensorly(self, decomposition: TTTensor) -> dict[str, Tensor]:
        """Inverse of `to_tensorly`: a TT over modes (j, i, k) with cores ``(1, d_in, a)``,
        ``(a, n, b)``, ``(b, d_out, 1)`` → ``u: (d_in, a)``, ``sigma: (n, a, b)``, ``v: (d_out, b)``."""
        first, middle, last = decomposition
        return {"sigma": middle.permute(1, 0, 2), "u": first[0], "v": last[..., 0].t()}


class ScaledTensorTrain(Format, name="tt-scaled"):
    """FacT-TT with a per-slice output scaling: ``ΔW[i] = U Σ_i Vᵀ diag(b_i)``, ``ΔW[i,j,k] = Σ_ab sigma[i,a,b]
    u[j,a] v[k,b] b[i,k]``; ``(d_in + d_out)·r + n·r² + n·d_out`` parameters.

    FacT-TT's cross-layer factors ``u``, ``v`` and per-slice cores, and, as VeRA's ``b``, a trained gain for each
    output of each slice. Init: TT's (``v`` zero), ``b`` ones, so it starts as FacT-TT. On the wide backbone (2 bits,
    r8, seed 0, lr 1e-2) it scored 82.5% test against FacT-TT's 79.1 on the same backbone (docs/bytes/vera_lr.md).
    """

    factors = {"sigma": "iab", "u": "ja", "v": "kb", "b": "ik"}
    zero = "v"
    ones = ("b",)

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        """Dense ``ΔW``: tensorly's FacT-TT, each slice's output columns times ``b[i]``."""
        tt = TensorTrain(self.rank).reference({name: factors[name] for name in ("sigma", "u", "v")})
        return tt * factors["b"].unsqueeze(1)
