"""`Dispatch`: what every attached matrix of one model asks for (`factnet.attach.Source`), answered
from the acting adapter or the call's mix, and the model forward's start and finish.

As the model's forward starts (`start`), the call's choice is taken (`factnet.calls`): a mixed batch
(`factnet.mixing`), the base model, or the active adapter, whose increments for every matrix are cut
once then and looked up by each matrix (`increments`) until the forward ends (`finish`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from factnet import attach as sites
from factnet import calls
from factnet.calls import Forward
from factnet.errors import FactnetError
from factnet.guard import WeightWatch
from factnet.increment import Increment
from factnet.mixing import Mix, check_batch

if TYPE_CHECKING:
    from factnet.adapter import Adapter, Settings
    from factnet.adapter_set import AdapterSet

__all__ = ["Dispatch"]


class Dispatch:
    """The increments of the adapters of ``owner`` (an `AdapterSet`) for each attached matrix of ``model``
    (``sites``, which it owns), per call. ``verified``: the matrices the first-forward guard has seen take
    part."""

    def __init__(self, owner: AdapterSet, model: nn.Module) -> None:
        self.set = owner
        self.sites = sites.Sites(model, self, self.start, self.finish)
        self.verified: set[str] = set()

    @property
    def mix(self) -> Mix | None:
        """This thread's or task's adapters per sample (`AdapterSet.use`, `per_sample`), or None: the active
        adapter's."""
        call = calls.current(self.set)
        return None if call is None else call.mix

    @property
    def settings(self) -> Settings | _NoSettings:
        """The active adapter's scale, dropout and kernel path (read with `increments`)."""
        adapter = self.set.active_adapter
        return _NO_SETTINGS if adapter is None else adapter.settings

    @property
    def reading(self) -> bool:
        """Whether a module that may read adapted weights as attributes is in its forward: only then
        does ``module.weight`` read as ``W + s·ΔW`` (elsewhere, as for FSDP or ``get_parameter``, it
        is the parameter)."""
        return self.sites.reading

    def increments(self, matrix: str, weight: Tensor) -> list[Increment]:
        """The increments of ``matrix`` for its ``weight``: the active adapter's, none when disabled or merged."""
        call = calls.current(self.set)
        if call is not None:
            if call.disabled:
                return []
            if isinstance(call, Forward):
                now = call.now
                if now is not None and now[0] == torch.is_grad_enabled():  # built as the model's forward started
                    return now[1].get(matrix, [])
        adapter = self.acting()
        if adapter is None or matrix not in adapter.placements:
            return []
        return adapter.increments(matrix, weight)

    def acting(self) -> Adapter | None:
        """The active adapter if its increments act now (not merged), else None."""
        adapter = self.set.active_adapter
        return adapter if adapter is not None and not adapter.merged else None

    def guard_merged(self, value: Tensor) -> Tensor:
        """``value`` (an output or weight computed without increments), made to raise `FactnetError` in
        backward if the active adapter is merged and trainable: training it then would be a silent no-op."""
        adapter = self.set.active_adapter
        if adapter is None or not adapter.merged or not (self.set.training and torch.is_grad_enabled()):
            return value
        trainable = [p for p in adapter.parameters() if p.requires_grad]
        return _NoTrainingWhileMerged.apply(value, adapter.name, trainable[0]) if trainable else value

    def applied(self, matrix: str) -> None:
        """An attached matrix applied its increments (seen by the first-forward guard)."""
        call = calls.current(self.set)
        if call is not None and call.watch is not None:
            call.watch.applied.add(matrix)

    def start(self, _: nn.Module, args: tuple, kwargs: dict) -> None:
        """As the model's forward starts: this forward's `calls.Forward` (the block's choice, or the active
        adapter's increments, built now, which the attached matrices then look up until it ends, outside
        any checkpointed block, so recomputation saves the same tensors as the first pass), counted in
        `calls.Traffic`, and the first-forward guard for newly adapted matrices (`factnet.guard`; in a
        mixed batch, those of its adapters)."""
        owner = self.set
        outer = calls.current(owner)
        mix = None if outer is None or outer.mix is None else outer.mix.for_forward()
        call = Forward(owner, mix, outer is not None and outer.disabled)
        traffic = owner.traffic
        with traffic.lock:
            traffic.forwards += 1
            traffic.reading_active += call.reads_active
        calls.push(call)  # (taken back by `finish`, which runs even if this raises)
        if mix is not None:
            check_batch(mix, args, kwargs)
            acting = list(mix.adapters.values())
        else:
            adapter = None if call.disabled else self.acting()
            if adapter is None:
                return
            acting = [adapter]
            call.now = torch.is_grad_enabled(), adapter.all_increments([self.parameter(n) for n in adapter.matrices])
        if self.sites.attached.keys() <= self.verified:  # (the common case, at C speed)
            return
        pending = {m.name for a in acting for m in a.matrices.values() if m.name not in self.verified}
        if pending and not torch.compiler.is_compiling():
            call.watch = WeightWatch({id(self.parameter(name)): name for name in pending})
            call.watch.__enter__()

    def parameter(self, matrix: str) -> nn.Parameter:
        """The parameter holding an attached matrix (as `attach.base_weight`, without walking the model)."""
        return self.sites.attached[matrix].parameter()

    def finish(self, *_: object) -> None:
        """As the model's forward ends (or raises): its `calls.Forward` taken back, the machinery taken
        out if it was wanted out meanwhile (`AdapterSet.sync`), the first-forward guard's verdict."""
        owner = self.set
        call = calls.pop_forward(owner)
        if call is None:  # the forward started before the hooks were in
            return
        traffic = owner.traffic
        with traffic.lock:
            traffic.forwards -= 1
            traffic.reading_active -= call.reads_active
            if not traffic.forwards:
                owner.sync()  # (the machinery may have been wanted out while it ran)
        watch = call.watch
        if watch is None:
            return
        watch.__exit__(None, None, None)
        if sys.exc_info()[0] is None:  # the forward completed (this hook also runs when it raised)
            self.verified |= watch.verdict()


class _NoTrainingWhileMerged(torch.autograd.Function):
    """Identity forward (a copy: the model may change it in place); its backward raises: a merged
    adapter's factors would get no gradient."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, name: str, factor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.name = name
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:  # type: ignore[override]
        raise FactnetError(f"adapter {ctx.name!r} is merged into the weights, so this backward would give its "
                           "factors no gradient; unmerge() it before training (or freeze its factors with "
                           "adapter.requires_grad_(False) to train the rest)")


class _NoSettings:
    scale, dropout, path = 1.0, 0.0, "auto"


_NO_SETTINGS = _NoSettings()
