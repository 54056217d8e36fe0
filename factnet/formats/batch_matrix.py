"""Batch-matrix: each slice its own low-rank ``u_i v_iᵀ``. On ``q, v`` only it is LoRA."""

from __future__ import annotations

import tensorly as tl
import torch
from tensorly.cp_tensor import CPTensor
from torch import Tensor

from factnet.errors import FactnetError
from factnet.formats.base import Format


class BatchMatrix(Format, name="batch-matrix"):
    """``ΔW[i,j,k] = Σ_r u[i,j,r] v[i,k,r]``; ``n·(d_in + d_out)·r`` parameters (LoRA: ``4Ldr``).

    Init as LoRA: ``u`` (LoRA's A) uniform ``±1/√d_in``, ``v`` (LoRA's B) zero.
    """

    factors = {"u": "ijr", "v": "ikr"}
    zero = "v"

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

    def from_tensorly(self, decomposition: CPTensor) -> dict[str, Tensor]:
        """Inverse of `to_tensorly`: a CP of rank ``n·r`` whose slice factor ``(n, n·r)`` is zero
        outside block ``i`` in row ``i`` → ``u: (n, d_in, r)``, ``v: (n, d_out, r)``. The weights and
        the slice factor's block entries are folded into ``u``."""
        weights, (slice_factor, u, v) = decomposition
        n, columns = slice_factor.shape
        if columns % n:
            raise FactnetError(f"batch-matrix needs a CP of rank n·r for n = {n} slices, got rank {columns}")
        r = columns // n
        blocks = slice_factor.reshape(n, n, r)
        own = torch.arange(n, device=blocks.device)
        coefficients = blocks[own, own] * weights.reshape(n, r)  # (n, r): the entries on the diagonal blocks
        if torch.count_nonzero(blocks).item() != torch.count_nonzero(blocks[own, own]).item():
            raise FactnetError("batch-matrix cannot represent this CP: its slice factor mixes slices (an entry "
                               "outside slice i's block of r columns is non-zero); use format 'cp' instead")
        per_slice = lambda f: f.reshape(f.shape[0], n, r).permute(1, 0, 2)  # noqa: E731  (n, d, r)
        return {"u": per_slice(u) * coefficients[:, None, :], "v": per_slice(v)}
