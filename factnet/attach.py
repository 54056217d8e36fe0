"""Attaching increments to a model's matrices, reversibly.

Linear, 1x1 conv and Conv1D modules are swapped for an `AdaptedMatrix` that owns the very
same ``weight``/``bias`` parameters (so ``state_dict`` keys do not change) and runs the
kernel. Weights their parent reads directly (``nn.MultiheadAttention``'s projections, the
fused inference path of ``nn.TransformerEncoderLayer``) get a `torch.nn.utils.parametrize`
parametrization ``W → W + s·ΔW`` instead: exact, but autograd forms their dense gradient.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from factnet.kernel import Increment, adapted_linear, effective_weight
from factnet.slices import Matrix

__all__ = ["AdaptedMatrix", "attach", "detach", "weight_view"]


class Source(Protocol):
    """What an attached matrix asks for its increments (`factnet.adapter_set.AdapterSet`)."""

    settings: Any  # scale, dropout, path of the increments returned

    def increments(self, matrix: str, weight: Tensor) -> list[Increment]:
        """The increments to apply now for ``weight``; ``[]`` when none acts."""


class AdaptedMatrix(nn.Module):
    """Stands in for an adapted ``nn.Linear``, 1x1 ``nn.Conv2d`` or ``Conv1D``.

    Holds the original's ``weight`` and ``bias`` under the same names; other attributes
    (``in_features``, ``stride``, ...) read through to the original module.
    """

    def __init__(self, original: nn.Module, matrix: Matrix, source: Source) -> None:
        super().__init__()
        self.register_parameter("weight", original.weight)
        self.register_parameter("bias", original.bias)
        self.__dict__.update(original=original, source=source, matrix=matrix)

    def forward(self, x: Tensor) -> Tensor:
        increments = self.source.increments(self.matrix.name, self.weight)
        settings = self.source.settings
        dropout = settings.dropout if self.training else 0.0
        if self.matrix.kind == "conv1x1":
            y = adapted_linear(x.movedim(1, -1), self.weight.flatten(1), self.bias, increments, settings.scale,
                               dropout, settings.path)
            return y.movedim(-1, 1)
        weight = self.weight.t() if self.matrix.kind == "conv1d" else self.weight
        return adapted_linear(x, weight, self.bias, increments, settings.scale, dropout, settings.path)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original" not in self.__dict__:
                raise
            return getattr(self.__dict__["original"], name)

    def extra_repr(self) -> str:
        return f"{self.matrix.kind} {self.matrix.d_in}->{self.matrix.d_out}, adapted"


class _AddIncrement(nn.Module):
    """Parametrization ``W → W + s·Σ ΔW`` for weights read functionally (MHA)."""

    def __init__(self, matrix: Matrix, source: Source) -> None:
        super().__init__()
        self.__dict__.update(source=source, matrix=matrix)

    def forward(self, weight: Tensor) -> Tensor:
        return effective_weight(weight, self.source.increments(self.matrix.name, weight), self.source.settings.scale)


def _owner(model: nn.Module, matrix: Matrix) -> tuple[nn.Module, str]:
    """The module whose attribute holds the matrix, and the attribute name."""
    if matrix.kind == "mha-in":
        return model.get_submodule(matrix.name), "in_proj_weight"
    if matrix.functional:
        return model.get_submodule(matrix.name), "weight"
    parent, _, child = matrix.name.rpartition(".")
    return model.get_submodule(parent), child


def _parametrized(matrix: Matrix) -> bool:
    """Weights read outside their module's forward get a parametrization, not a wrapper."""
    return matrix.kind == "mha-in" or matrix.functional


def weight_view(model: nn.Module, matrix: Matrix) -> Tensor:
    """The live weight of ``matrix`` as a ``(d_out, d_in)`` view: writes reach the model."""
    owner, attribute = _owner(model, matrix)
    if _parametrized(matrix):
        parametrizations = getattr(owner, "parametrizations", None)
        if parametrizations is not None and attribute in parametrizations:
            return parametrizations[attribute].original
        return getattr(owner, attribute)
    weight = getattr(owner, attribute).weight
    if matrix.kind == "conv1x1":
        return weight.flatten(1)
    return weight.t() if matrix.kind == "conv1d" else weight


def attach(model: nn.Module, matrix: Matrix, source: Source) -> None:
    """Route ``matrix`` through the increments ``source`` provides."""
    owner, attribute = _owner(model, matrix)
    if _parametrized(matrix):
        owner.__dict__["_factnet_parameter_order"] = tuple(owner._parameters)
        parametrize.register_parametrization(owner, attribute, _AddIncrement(matrix, source), unsafe=True)
    else:
        original = getattr(owner, attribute)
        setattr(owner, attribute, AdaptedMatrix(original, matrix, source).train(original.training))


def detach(model: nn.Module, matrix: Matrix) -> None:
    """Undo `attach`: the original module or parameter is back, untouched."""
    owner, attribute = _owner(model, matrix)
    if _parametrized(matrix):
        order = list(owner.__dict__.pop("_factnet_parameter_order"))
        with torch.no_grad():
            parametrize.remove_parametrizations(owner, attribute, leave_parametrized=False)
        owner._parameters = {name: owner._parameters[name] for name in order}  # registration order, as before
    else:
        setattr(owner, attribute, getattr(owner, attribute).original)
