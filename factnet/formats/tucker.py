"""FacT-TK: ``ΔW = C ×₁ P ×₂ U ×₃ V``, a Tucker decomposition."""

from __future__ import annotations

import tensorly as tl
import torch
from tensorly.tucker_tensor import TuckerTensor
from torch import Tensor

from factnet.formats.base import Format


class Tucker(Format, name="tucker"):
    """``ΔW[i,j,k] = Σ_abc core[a,b,c] p[i,a] u[j,b] v[k,c]``; ``(d_in + d_out)·r + n·r + r³``.

    Init as the paper's code: ``core`` and ``p`` Xavier-uniform, ``u`` as
    ``nn.Linear(d_in, r)``, ``v`` zero.
    """

    factors = {"core": "abc", "p": "ia", "u": "jb", "v": "kc"}
    zero = "v"

    def initialize(self, factors: dict[str, Tensor], generator: torch.Generator | None = None) -> None:
        super().initialize(factors, generator)
        for name in ("core", "p"):
            tensor = factors[name]
            fan_in, fan_out = tensor.shape[1] * tensor[0, 0].numel(), tensor.shape[0] * tensor[0, 0].numel()
            bound = (6.0 / (fan_in + fan_out)) ** 0.5  # torch.nn.init.xavier_uniform_
            with torch.no_grad():
                tensor.uniform_(-bound, bound, generator=generator)

    def second_moments(self, n: int, d_in: int, d_out: int) -> dict[str, float]:
        """Xavier-uniform's ``2 / (fan_in + fan_out)`` for ``core`` and ``p``; the base init's for ``u``."""
        moments = self._uniform_moments(n, d_in, d_out)
        sizes = self.sizes(n, d_in, d_out)
        a, b, c = sizes["a"], sizes["b"], sizes["c"]
        return {**moments, "core": 2.0 / (b * c + a * c), "p": 2.0 / (a + n)}

    def to_tensorly(self, factors: dict[str, Tensor]) -> TuckerTensor:
        return TuckerTensor((factors["core"], [factors["p"], factors["u"], factors["v"]]))

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        with tl.backend_context("pytorch"):
            return tl.tucker_to_tensor(self.to_tensorly(factors))

    def from_tensorly(self, decomposition: TuckerTensor) -> dict[str, Tensor]:
        """Inverse of `to_tensorly`: ``(core, [p, u, v])`` with modes (i, j, k)."""
        core, (p, u, v) = decomposition
        return {"core": core, "p": p, "u": u, "v": v}
