"""Matrix kinds: each kind of weight matrix factnet adapts, as one `MatrixKind` subclass carrying its rules.

A kind says which modules hold a matrix of it (`MatrixKind.match`), how its parameter reads as the linear
``(d_out, d_in)`` matrix of ``y = x Wᵀ`` and back (`to_linear`, `from_linear`), which parameter of its module
holds it, how it is attached (a stand-in module running the kernel, or its module's class answering reads
of the parameter: `stand_in`), whether it applies per position (`pointwise`) and how it exports to PEFT.
A matrix's name (`factnet.slices.Matrix`) is the path of the module holding its parameter; its kind's
``name`` is what adapter files record (never renamed).

Adding a kind is one class decorated with `register`; `factnet.slices.find_matrices` tries the registered
kinds in order, the first that matches a module wins.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from torch import Tensor, nn

from factnet.errors import FactnetError

__all__ = ["KINDS", "MatrixKind", "register"]


class MatrixKind:
    """The rules of one kind of weight matrix; the defaults are those of ``nn.Linear``.

    ``name``: recorded in adapter files. ``parameter``: the attribute of the module holding the weight.
    ``stand_in``: the module is swapped for a stand-in whose forward is ``x Wᵀ + b`` (an `AdaptedMatrix` of
    `factnet.attach`, holding the module's ``parameter`` and ``bias``), or else (false) the module stays and
    its class is swapped for one answering reads of ``parameter`` (its own forward reads the weight).
    ``pointwise``: applied per position of an ``(N, d_in, H, W)`` input, like a 1×1 convolution.
    ``fused``: its output blocks are q, k and v projections whatever the module's name.
    ``applied_as_weight``: the forward that uses it reads the weight itself, so its increment is applied as a
    merged weight (factor-space dropout does not reach it).
    ``fan_in_fan_out``: the parameter is stored ``(d_in, d_out)`` (PEFT's ``fan_in_fan_out``).
    """

    name: ClassVar[str]
    parameter: ClassVar[str] = "weight"
    stand_in: ClassVar[bool] = True
    pointwise: ClassVar[bool] = False
    fused: ClassVar[bool] = False
    applied_as_weight: ClassVar[bool] = False
    fan_in_fan_out: ClassVar[bool] = False

    def match(self, module: nn.Module, parent: nn.Module | None) -> tuple[int, int] | None:
        """``(d_out, d_in)`` of the matrix ``module`` (child of ``parent``) holds as this kind, or None."""
        raise NotImplementedError

    def to_linear(self, weight: Tensor) -> Tensor:
        """The parameter as the ``(d_out, d_in)`` matrix (a view: writes reach the parameter)."""
        return weight

    def from_linear(self, linear: Tensor, weight: Tensor) -> Tensor:
        """A ``(d_out, d_in)`` matrix in the layout of the parameter ``weight``."""
        return linear

    def check_peft(self, name: str, module: nn.Module) -> None:
        """Raise `FactnetError` where PEFT's LoRA cannot run the matrix ``name`` of ``module`` exactly."""

    def peft_tensors(self, module: nn.Module, a: Tensor, b: Tensor) -> dict[str, Tensor]:
        """PEFT's tensors for a LoRA ``B A`` (``a: (r, d_in)``, ``b: (d_out, r)``) on ``module``, keyed below it."""
        return {"lora_A.weight": a, "lora_B.weight": b}


KINDS: dict[str, MatrixKind] = {}  # name -> the kind, in the order `find_matrices` tries them
KindClass = TypeVar("KindClass", bound=type[MatrixKind])


def register(kind: KindClass) -> KindClass:
    """Class decorator: make ``kind`` one of the kinds `factnet.slices.find_matrices` finds (tried last)."""
    if kind.name in KINDS:
        raise FactnetError(f"a matrix kind named {kind.name!r} is registered already")
    KINDS[kind.name] = kind()
    return kind


@register
class MultiheadInProjection(MatrixKind):
    """``nn.MultiheadAttention``'s fused ``in_proj_weight`` ``(3·d, d)``, read by the attention's own forward."""

    name = "mha-in"
    parameter = "in_proj_weight"
    stand_in = False
    fused = True
    applied_as_weight = True

    def match(self, module: nn.Module, parent: nn.Module | None) -> tuple[int, int] | None:
        if not isinstance(module, nn.MultiheadAttention):
            return None
        in_proj = module._parameters.get("in_proj_weight")  # the parameter, even once adapted
        return tuple(in_proj.shape) if module._qkv_same_embed_dim and in_proj is not None else None

    def peft_tensors(self, module: nn.Module, a: Tensor, b: Tensor) -> dict[str, Tensor]:
        """PEFT's ``nn.MultiheadAttention`` LoRA also puts a LoRA of the same rank on ``base_layer.out_proj``:
        zero factors (`MultiheadOutProjection` does not export)."""
        d, rank = module.embed_dim, a.shape[0]
        return {**super().peft_tensors(module, a, b), "base_layer.out_proj.lora_A.weight": a.new_zeros(rank, d),
                "base_layer.out_proj.lora_B.weight": a.new_zeros(d, rank)}


@register
class MultiheadOutProjection(MatrixKind):
    """``nn.MultiheadAttention``'s ``out_proj``, whose weight the attention's forward reads."""

    name = "mha-out"
    applied_as_weight = True

    def match(self, module: nn.Module, parent: nn.Module | None) -> tuple[int, int] | None:
        if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
            return module.out_features, module.in_features
        return None

    def check_peft(self, name: str, module: nn.Module) -> None:
        raise FactnetError(f"{name} is the out_proj of an nn.MultiheadAttention: PEFT's LoRA adds that delta "
                           "twice (huggingface/peft#3774), so the export could not be exact. Adapt without it (e.g. "
                           "targets that leave out '*.out_proj'), or merge factnet's increment into the weights")


@register
class Linear(MatrixKind):
    """``nn.Linear``: ``weight: (d_out, d_in)``."""

    name = "linear"

    def match(self, module: nn.Module, parent: nn.Module | None) -> tuple[int, int] | None:
        return (module.out_features, module.in_features) if isinstance(module, nn.Linear) else None


@register
class PointwiseConv(MatrixKind):
    """A 1×1 ``nn.Conv2d`` (stride 1, no padding, dilation or groups): ``weight: (d_out, d_in, 1, 1)``."""

    name = "conv1x1"
    pointwise = True

    def match(self, module: nn.Module, parent: nn.Module | None) -> tuple[int, int] | None:
        pointwise = (isinstance(module, nn.Conv2d)
                     and module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1
                     and module.dilation == (1, 1) and module.padding in ((0, 0), "valid"))
        return (module.out_channels, module.in_channels) if pointwise else None

    def to_linear(self, weight: Tensor) -> Tensor:
        return weight.flatten(1)

    def from_linear(self, linear: Tensor, weight: Tensor) -> Tensor:
        return linear.reshape(weight.shape)

    def peft_tensors(self, module: nn.Module, a: Tensor, b: Tensor) -> dict[str, Tensor]:
        """PEFT: ``lora_A`` a ``Conv2d(in, r, 1x1)``, ``lora_B`` a ``Conv2d(r, out, 1x1)``."""
        return super().peft_tensors(module, a[:, :, None, None], b[:, :, None, None])


@register
class TransposedConv1D(MatrixKind):
    """A ``Conv1D`` (GPT-2 style, by class name): ``weight: (d_in, d_out)``."""

    name = "conv1d"
    fan_in_fan_out = True

    def match(self, module: nn.Module, parent: nn.Module | None) -> tuple[int, int] | None:
        if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            d_in, d_out = module.weight.shape
            return d_out, d_in
        return None

    def to_linear(self, weight: Tensor) -> Tensor:
        return weight.t()

    def from_linear(self, linear: Tensor, weight: Tensor) -> Tensor:
        return linear.t()

    def check_peft(self, name: str, module: nn.Module) -> None:
        if not _is_transformers_conv1d(module):
            raise FactnetError(f"{name} is a {type(module).__module__}.Conv1D, but PEFT's LoRA supports "
                               "only transformers.pytorch_utils.Conv1D; use that class, or target other matrices")


def _is_transformers_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)
