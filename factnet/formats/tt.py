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
