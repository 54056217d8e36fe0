"""Attaching increments to a model's matrices, reversibly, so that no read of a weight misses them.

A targeted weight reaches the forward in one of two ways, and both see ``W + s·ΔW``:

- **its module's forward**: a module of a stand-in kind (`factnet.matrix_kinds`: Linear, 1x1 conv,
  Conv1D, ...) is swapped for an `AdaptedMatrix` that owns the very same weight and ``bias``
  parameters (``state_dict`` keys do not change) and runs the kernel (thin-product gradients; the
  base model's own op when the increment is zero, so exact at init bit for bit);
- **a read of the attribute by someone else** (``F.linear(x, self.qkv.weight)`` in BEiT, EVA and
  SwinV2, torchvision's Swin, ``nn.MultiheadAttention``'s ``out_proj`` and ``in_proj_weight``,
  fused inference paths): inside the forward of any module that holds it or sits above it (below
  the model itself, whose hooks wrappers like FSDP2 share), ``module.weight`` returns the
  effective weight ``W + s·ΔW``, built differentiably (autograd forms its dense gradient: exact,
  dearer than the kernel). Outside those forwards it is the parameter, as torch expects.

A matrix of a kind that is not a stand-in (``nn.MultiheadAttention``'s ``in_proj_weight``) belongs to a
module whose own forward must run: the module's class is swapped for a subclass (`_adapted_class`) that
answers reads of that one parameter, and swapped back (`_AnswersAdaptedWeight._factnet_unadapted_class`); both
pickle. What a model reads by any other channel (a weight cached before `decompose`,
``module._parameters``) is caught by `factnet.guard` on the first forward.

The swaps and hooks are in the model only while an adapter can act (`Sites`): merged for serving,
disabled or with no adapter active, the model holds its own modules and runs at the base model's cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from factnet import calls
from factnet.increment import Increment, effective_weight
from factnet.kernel import adapted_linear, base_op
from factnet.slices import Matrix, StandIn

__all__ = ["AdaptedMatrix", "Sites", "base_weight", "readers", "weight_view"]


class Source(Protocol):
    """What an attached matrix asks for its increments (`factnet.dispatch.Dispatch`)."""

    settings: Any  # scale, dropout, path of the increments returned
    mix: Any  # this call's adapters per sample (`factnet.mixing.Mix`), or None: the active adapter's
    reading: bool  # whether a module that may read adapted weights is running its forward (see `readers`)

    def increments(self, matrix: str, weight: Tensor) -> list[Increment]:
        """The increments to apply now for ``weight`` (only its dtype is read); ``[]`` when none acts."""

    def guard_merged(self, value: Tensor) -> Tensor:
        """``value`` as it is, or made to raise in backward while a trainable adapter is merged."""

    def applied(self, matrix: str) -> None:
        """Told each time ``matrix``'s increments are applied (for the first-forward guard)."""


class _Effective:
    """``W + s·ΔW`` for reads of a weight attribute, in the parameter's own layout; one build per
    set of increments (a model that reads ``.weight.dtype`` three times a forward pays once)."""

    def __init__(self, matrix: Matrix, source: Source) -> None:
        self.matrix, self.source, self.parameter = matrix, source, matrix.rules.parameter
        self._cached: tuple[list[Increment], int, bool, Tensor, Tensor] | None = None

    def __call__(self, weight: Tensor) -> Tensor:
        if not self.source.reading:
            return weight  # outside the forward of the modules that may read it: the parameter itself
        if self.source.mix is not None:
            return self.source.mix.read(self, weight)
        increments = self.source.increments(self.matrix.name, weight)
        if not increments:
            return self.source.guard_merged(weight)
        self.source.applied(self.matrix.name)
        return self.of(weight, increments)

    def of(self, weight: Tensor, increments: list[Increment], linear: bool = False) -> Tensor:
        """``W + s·ΔW`` in ``weight``'s layout (``linear``: as ``(d_out, d_in)``), built once while the
        increments and ``weight`` stay."""
        grad = torch.is_grad_enabled()
        cached = self._cached  # the adapter hands out the same list while its factors are unchanged
        if cached is None or cached[0] is not increments or cached[1] != weight._version or cached[2] is not grad:
            kind = self.matrix.rules
            built = effective_weight(kind.to_linear(weight), increments, self.source.settings.scale)
            cached = self._cached = (increments, weight._version, grad, kind.from_linear(built, weight), built)
        return cached[4] if linear else cached[3]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached": None}  # a graph cannot be copied


class AdaptedMatrix(StandIn):
    """Stands in for an adapted module of a stand-in kind (``nn.Linear``, 1x1 ``nn.Conv2d``, ``Conv1D``, ...).

    Holds the original's weight (its kind's ``parameter``, e.g. ``weight``) and ``bias`` under the same
    names; inside the forward of the modules that may read it (`readers`) the weight reads as
    ``W + s·ΔW`` while an increment acts, elsewhere as the parameter. Other attributes (``in_features``,
    ``stride``, ...) read through to the original module.
    """

    def __init__(self, original: nn.Module, matrix: Matrix, source: Source) -> None:
        super().__init__()
        parameter = matrix.rules.parameter
        self.register_parameter(parameter, original._parameters[parameter])
        self.register_parameter("bias", original.bias)
        self.__dict__.update(original=original, source=source, matrix=matrix, effective=_Effective(matrix, source))

    def forward(self, x: Tensor) -> Tensor:
        source = self.source
        if source.mix is not None:  # a mixed-adapter batch (`AdapterSet.per_sample`)
            return source.mix.forward(self, x)
        matrix, effective = self.matrix, self.effective
        weight, bias = self._parameters[effective.parameter], self._parameters["bias"]
        increments = source.increments(matrix.name, weight)
        if not increments:
            return source.guard_merged(self.original(x))  # the base module's own kernel
        source.applied(matrix.name)
        settings, kind = source.settings, matrix.rules
        pointwise = kind.pointwise
        dropout = settings.dropout if self.training else 0.0
        if not dropout and not torch.is_grad_enabled():  # inference: the base op with W + s·ΔW, built once
            return base_op(x, effective.of(weight, increments, linear=True), bias, pointwise)
        linear = kind.to_linear(weight)
        return adapted_linear(x, linear, bias, increments, settings.scale, dropout, settings.path, pointwise=pointwise)

    def __getattr__(self, name: str) -> Any:
        effective = self.__dict__.get("effective")
        if effective is not None and name == effective.parameter:
            return effective(self._parameters[name])
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original" not in self.__dict__:
                raise
            return getattr(self.__dict__["original"], name)

    def extra_repr(self) -> str:
        return f"{self.matrix.kind} {self.matrix.d_in}->{self.matrix.d_out}, adapted"


class _AnswersAdaptedWeight:
    """Mixin of the class an adapted module of a kind that is not a stand-in takes (`_adapted_class`): reads
    of its kind's parameter return ``W + s·ΔW`` (the instance's ``_factnet_effective``, an `_Effective`).
    ``_factnet_unadapted_class`` is the module's own class, which `_Attachment.remove` gives back (one such
    matrix per module)."""

    _factnet_unadapted_class: type[nn.Module]

    def __getattr__(self, name: str) -> Any:
        effective = self.__dict__.get("_factnet_effective")
        if effective is not None and name == effective.parameter:
            return effective(self._parameters[name])  # type: ignore[attr-defined]
        return super().__getattr__(name)  # type: ignore[misc]

    def __reduce_ex__(self, protocol: int) -> tuple:
        return _adapted_instance, (self._factnet_unadapted_class,), self.__dict__


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with `_AnswersAdaptedWeight` mixed in (one class per ``cls``, named ``Adapted<cls>``)."""
    if cls not in _ADAPTED_CLASSES:
        name, bases = f"Adapted{cls.__name__}", (_AnswersAdaptedWeight, cls)
        _ADAPTED_CLASSES[cls] = type(name, bases, {"_factnet_unadapted_class": cls})
    return _ADAPTED_CLASSES[cls]


def _adapted_instance(cls: type[nn.Module]) -> nn.Module:
    """Unpickling: an empty instance of the adapted subclass of ``cls`` (its state follows)."""
    return object.__new__(_adapted_class(cls))


def readers(matrix: Matrix) -> list[str]:
    """Modules whose forward may read ``matrix``'s weight attribute, innermost first: the module holding
    it (unless a stand-in, whose own forward runs the kernel) and each module above, up to (not including)
    the model itself (whose hooks others, e.g. FSDP, share). A mixed batch runs split the one that reads."""
    owner = matrix.name.rpartition(".")[0] if matrix.rules.stand_in else matrix.name
    parts = owner.split(".") if owner else []
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def base_weight(model: nn.Module, matrix: Matrix) -> Tensor:
    """The parameter holding ``matrix`` (never the effective weight), in its own layout."""
    return model.get_submodule(matrix.name)._parameters[matrix.rules.parameter]


def weight_view(model: nn.Module, matrix: Matrix) -> Tensor:
    """The live weight of ``matrix`` as a ``(d_out, d_in)`` view: writes reach the model."""
    return matrix.rules.to_linear(base_weight(model, matrix))


class _Attachment:
    """One attached matrix: its holder (a stand-in `AdaptedMatrix`, or the module itself, which takes the
    adapted class while installed) and the original, holding the same parameters; `install` puts the
    adapted one into the model, `remove` the original."""

    def __init__(self, model: nn.Module, matrix: Matrix, source: Source) -> None:
        self.matrix = matrix
        module = model.get_submodule(matrix.name)
        if matrix.rules.stand_in:
            self.holder = AdaptedMatrix(module, matrix, source).train(module.training)
        else:
            module.__dict__["_factnet_effective"] = _Effective(matrix, source)
            self.holder = module

    def parameter(self) -> nn.Parameter:
        """The parameter holding the matrix (valid while installed)."""
        return self.holder._parameters[self.matrix.rules.parameter]

    def install(self, model: nn.Module) -> None:
        if self.matrix.rules.stand_in:
            _move(self.holder.original, self.holder, self.matrix.rules.parameter)
            self._put(model, self.holder)
        else:
            module = model.get_submodule(self.matrix.name)
            module.__class__ = _adapted_class(type(module))

    def remove(self, model: nn.Module) -> None:
        if self.matrix.rules.stand_in:
            _move(self.holder, self.holder.original, self.matrix.rules.parameter)
            self._put(model, self.holder.original)
        else:
            module = model.get_submodule(self.matrix.name)
            module.__class__ = module._factnet_unadapted_class

    def forget(self) -> None:
        """After `remove` for good: nothing of factnet is left on the original."""
        if not self.matrix.rules.stand_in:
            del self.holder.__dict__["_factnet_effective"]

    def _put(self, model: nn.Module, module: nn.Module) -> None:
        parent, _, child = self.matrix.name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def _move(source: nn.Module, target: nn.Module, parameter: str) -> None:
    """``target`` takes ``source``'s weight (``parameter``), bias and mode (one may have been replaced while
    the other acted)."""
    for name in (parameter, "bias"):
        target._parameters[name] = source._parameters[name]
    target.training = source.training


class Sites:
    """The matrices attached to one model, and whether the model holds them.

    `attach` and `release` count the adapters using each matrix (the first attaches it, the last lets it
    go), an adapter's at once; a task head, once attached, stays (a call may still run it with the values
    it had before any adapter, `factnet.mixing`).
    Switched on, the model holds the machinery: each matrix's stand-in (or adapted class), a `_Forward`
    on each module that may read an adapted weight as an attribute (``reading`` is true inside their
    forwards, see `readers`) and on each task head (both run per adapter in a mixed batch, `source.mix`),
    and ``prepare``/``finish`` hooks on the model itself. Switched off, it holds its original modules and
    no factnet hook or forward, so it runs as the base model, at its cost. Only `switch` touches the
    model's hooks (the caller switches off only when no forward runs, whose finish hook would be lost);
    the rest may change under other threads' forwards, which see a module either way the same.
    """

    def __init__(self, model: nn.Module, source: Source, prepare: Callable, finish: Callable) -> None:
        self.model, self.source, self.prepare, self.finish = model, source, prepare, finish
        self.attached: dict[str, _Attachment] = {}
        self.users: dict[str, int] = {}  # attached matrix -> how many adapters adapt it
        self.readers: dict[str, set[str]] = {}  # module whose forward may read attached weights -> those matrices
        self.heads: set[str] = set()  # task head modules
        self.on = False
        self._hooks: list[RemovableHandle] = []
        self._forwards: dict[str, _Forward] = {}  # the readers' and heads' forwards in the model now

    def attach(self, matrices: Iterable[Matrix], heads: Iterable[str] = ()) -> None:
        for matrix in matrices:
            if matrix.name not in self.attached:
                attachment = _Attachment(self.model, matrix, self.source)
                for reader in readers(matrix):
                    self.readers.setdefault(reader, set()).add(matrix.name)
                if self.on:
                    attachment.install(self.model)
                self.attached[matrix.name] = attachment
            self.users[matrix.name] = self.users.get(matrix.name, 0) + 1
        self.heads.update(heads)
        self._set_forwards()

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            self.users[name] -= 1
            if self.users[name]:
                continue
            del self.users[name]
            attachment = self.attached.pop(name)
            for reader in readers(attachment.matrix):
                self.readers[reader].discard(name)
                if not self.readers[reader]:
                    del self.readers[reader]
            if self.on:
                attachment.remove(self.model)
            attachment.forget()
        self._set_forwards()

    def switch(self, on: bool) -> None:
        """Put the machinery into the model (``on``) or take it out; nothing happens if it already is."""
        if on == self.on:
            return
        self.on = on
        for attachment in self.attached.values():
            attachment.install(self.model) if on else attachment.remove(self.model)
        for hook in self._hooks:
            hook.remove()
        self._hooks = [self.model.register_forward_pre_hook(self.prepare, with_kwargs=True, prepend=True),
                       self.model.register_forward_hook(self.finish, always_call=True, prepend=True)] if on else []
        self._set_forwards()

    def _set_forwards(self) -> None:
        """Bring the readers' and heads' forwards to what the attached matrices and heads need now."""
        wanted = {**{name: False for name in self.readers}, **{name: True for name in self.heads}} if self.on else {}
        for name in [n for n, f in self._forwards.items() if wanted.get(n) is not f.head]:
            self._forwards.pop(name).remove()
        for name in [n for n in wanted if n not in self._forwards]:
            self._forwards[name] = _Forward(self, self.model.get_submodule(name), name, wanted[name])

    @property
    def reading(self) -> bool:
        return calls.reading(self)


class _Forward:
    """A reader's or a task head's (``head``) forward while the machinery is in: the module's own (or the
    one set on it before), with `Sites.reading` true inside, run per adapter in a mixed batch
    (`factnet.mixing.Mix.run`). An instance attribute, not a hook pair, which would take the module off
    torch's hook-free call path: a forward costs a push and a pop."""

    def __init__(self, sites: Sites, module: nn.Module, name: str, head: bool) -> None:
        self.sites, self.module, self.name, self.head = sites, module, name, head
        self.inner = module.__dict__.get("forward")
        module.forward = self

    @property
    def __wrapped__(self) -> Callable:  # (what inspect.signature reports)
        return self.inner or type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        token = calls.start_reading(self.sites)
        try:
            mix = self.sites.source.mix
            if mix is not None and (self.head or not mix.uniform):
                return mix.run(self.module, self.name, self.head, self.__wrapped__, args, kwargs)
            if self.inner is None:
                return type(self.module).forward(self.module, *args, **kwargs)
            return self.inner(*args, **kwargs)
        finally:
            calls.stop_reading(token)

    def remove(self) -> None:
        """Give the module back the forward it had, unless someone set another over this one since
        (which then keeps calling it: a push and a pop, harmless with the machinery out)."""
        module = self.module
        if module.__dict__.get("forward") is self:
            if self.inner is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = self.inner
