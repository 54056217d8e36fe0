"""Batch-matrix: each slice its own low-rank ``u_i v_iᵀ``. On ``q, v`` only it is LoRA."""

from __future__ import annotations

import tensorly as tl
import torch
from tensorly.cp_tensor import CPTensor
from torch import Tensor

from factnet.formats.base import Format


class BatchMatrix(Format, name="batch-matrix"):
    """``ΔW[i,j,k] = Σ_r u[i,j,r] v[i,k,r]``; ``n·(d_in + d_out)·r`` parameters (LoRA: ``4Ldr``).

    Init as LoRA: ``u`` (LoRA's A) uniform ``±1/√d_in``, ``v`` (LoRA's B) zero.
    """

    factors = {"u": "ijr", "v": "ikr"}
    zero = "v"

    def num_parameters(self, n: int, d_in: int, d_out: int) -> int:
        return n * (d_in + d_out) * self.rank

    def to_tensorly(self, factors: dict[str, Tensor]) -> CPTensor:
        """The same tensor as a CP of rank ``n·r`` whose slice factor is block-indicator."""
        u, v = factors["u"], factors["v"]
        n, _, r = u.shape
        indicator = torch.eye(n, dtype=u.dtype, device=u.device).repeat_interleave(r, dim=1)
        columns = lambda f: f.permute(1, 0, 2).reshape(f.shape[1], n * r)  # noqa: E731
        weights = torch.ones(n * r, dtype=u.dtype, device=u.device)
        return CPTensor((weights, [indicator, columns(u), columns(v)]))

    def reference(self, factors: dict[str, Tensor]) -> Tensor:
        with tl.backend_context("pytorch"):
            return tl.cp_to_tensor(self.to_tensorly(factors))
