"""`GroupFactors`: the factors of one group tensor in one format, as the increment uses them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from factnet.errors import FactnetError
from factnet.formats import Format, NormalForm
from factnet.quant import fake_quantize
from factnet.slices import Slice

if TYPE_CHECKING:
    import tltorch

__all__ = ["GroupFactors"]


class GroupFactors(nn.Module):
    """The factors of one group tensor ``(n, d_in, d_out)`` in one format."""

    def __init__(self, fmt: Format, slices: tuple[Slice, ...], dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator | None = None, bits: int | None = None, group: int = 64,
                 stable: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.format, self.slices, self.bits, self.quant_group = fmt, slices, bits, group
        self.shape = (len(slices), slices[0].d_in, slices[0].d_out)
        shapes = fmt.shapes(*self.shape)
        self.factors = nn.ParameterDict({name: nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
                                         for name, shape in shapes.items() if name not in fmt.seeded})
        # seeded factors (`Format.seeded`): frozen buffers, regenerated from ``seed``, never saved
        self.seed = seed
        self.seeded = nn.Module()
        for name, value in fmt.seeded_values(*self.shape, seed).items():
            self.seeded.register_buffer(name, value.to(device=device, dtype=dtype), persistent=False)
        # stable: each factor is used as c_F·(stored), c_F = Format.multipliers (powers of two); else all 1
        self.multipliers = {n: c for n, c in fmt.multipliers(*self.shape).items()
                            if c != 1.0 and n not in fmt.seeded} if stable else {}
        initial = dict(self.factors.items())
        fmt.initialize(initial | {n: torch.empty(shapes[n], dtype=dtype) for n in fmt.seeded}, generator)
        self.assign(initial)
        self._cache: dict[bool, tuple[list, NormalForm]] = {}  # by grad mode

    def normal_form(self) -> NormalForm:
        """The group's normal form, built once per training step for all its matrices.

        Cached until the factors change; with grad enabled, also until a backward pass runs
        through it (which frees its graph).
        """
        grad = torch.is_grad_enabled()
        key = [(p.data_ptr(), p._version) for p in self._modules["factors"]._parameters.values()]  # (hot path)
        cached = self._cache.get(grad)
        if cached is None or cached[0] != key:
            form = self.format.normal_form(self.values())
            for tensor in (form.p_in_t, form.core, form.p_out_t) if grad else ():
                if tensor is not None and tensor.grad_fn is not None:  # built here: its graph is freed by backward
                    tensor.register_hook(self._invalidate)
            cached = self._cache[grad] = (key, form)
        return cached[1]

    def values(self, quantized: bool = True) -> dict[str, Tensor]:
        """The factors as the increment uses them and files store them: the parameters times their
        `multipliers`, and, trained low-bit (``bits``) unless ``quantized=False``, as a ``bits``-bit file
        stores them (`factnet.quant.fake_quantize`: straight-through gradient)."""
        used = {name: p * self.multipliers[name] if name in self.multipliers else p
                for name, p in self.factors.items()}
        if self.bits is not None and quantized:
            used = {name: fake_quantize(p, self.bits, self.quant_group) for name, p in used.items()}
        return used | dict(self.seeded.named_buffers())

    def trained_values(self, quantized: bool = True) -> dict[str, Tensor]:
        """`values` without the seeded factors: what files store."""
        return {name: value for name, value in self.values(quantized).items() if name in self.factors}

    @torch.no_grad()
    def assign(self, values: Mapping[str, Tensor]) -> None:
        """Set the factors so that `values` (before low-bit rounding) gives ``values`` (exactly: the
        multipliers are powers of two); a tensor in another dtype is cast."""
        for name, value in values.items():
            if name in self.format.seeded:
                raise FactnetError(f"factor {name!r} of format {self.format.name!r} is seeded: regenerated from the "
                                   f"seed ({self.seed}), never trained or assigned")
            factor = self.factors[name]
            factor.copy_(value / self.multipliers[name] if name in self.multipliers else value)

    def _invalidate(self, grad: Tensor) -> None:
        self._cache.pop(True, None)

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) leave the cached normal forms behind: they may hold a graph."""
        return {**self.__dict__, "_cache": {}}

    def to_tltorch(self) -> tltorch.FactorizedTensor:
        """The factors as the matching tltorch factorized tensor (TT, Tucker, CP; batch-matrix as the CP
        of its `to_tensorly`), modes as the format's `to_tensorly` orders them (FacT-TT: ``(d_in, n,
        d_out)``), e.g. to build tltorch factorized layers from a trained increment. A detached copy.
        Formats tltorch has no class for (tensor-ring) are an error."""
        import tltorch
        from tensorly.cp_tensor import CPTensor
        from tensorly.tt_tensor import TTTensor
        from tensorly.tucker_tensor import TuckerTensor

        try:
            found = self.format.to_tensorly({n: p.detach().clone() for n, p in self.values().items()})
        except NotImplementedError:
            found = None
        if isinstance(found, TTTensor):
            return tltorch.TTTensor(list(found))
        if isinstance(found, TuckerTensor):
            return tltorch.TuckerTensor(found.core, list(found.factors))
        if isinstance(found, CPTensor):
            return tltorch.CPTensor(found.weights, list(found.factors))
        raise FactnetError(f"tltorch has no factorized tensor for format {self.format.name!r} "
                           f"({type(found).__name__ if found is not None else 'no to_tensorly'}); use reconstruct()")

    def reconstruct(self) -> Tensor:
        """Dense ``ΔW: (n, d_in, d_out)`` (without the scale)."""
        return self.format.reconstruct(self.values())

    def extra_repr(self) -> str:
        n, d_in, d_out = self.shape
        capped = self.format.capped_text(*self.shape)
        diagonal = self.format.diagonal_letters
        notes = ([f"capped: {capped}"] if capped else []) + (
            [f"diagonal {', '.join(diagonal)}: bounded by the budget, not the matrix side"] if diagonal else [])
        noted = f" ({'; '.join(notes)})" if notes else ""
        times = ", ".join(f"{f}×{c:g}" for f, c in self.multipliers.items())
        return (f"{self.format.name} rank {self.format.rank}{noted}, "
                f"{n}x{d_in}x{d_out}{f', multipliers {times}' if times else ''}")
