"""Every adapter's head values on one model, kept by one owner (`Heads`, ``model.factnet.heads``).

The model has one task head; each adapter trains its own values of it. The active adapter's are the
model's head parameters themselves (so training reaches them); every other adapter's are kept here,
only those that differ from the head's values before any adapter trained it (1,000 untrained heads
cost nothing). Switching adapters stashes the one's values and copies the other's in; a mixed batch
(`factnet.mixing`) runs each adapter's head on a copy holding its values (`values`, `views`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from factnet.head_bits import quantized_head

if TYPE_CHECKING:
    from factnet.adapter import Adapter

__all__ = ["Heads", "backbone_parameters", "in_head"]


class Heads:
    """The head values of the adapters of ``model``, by parameter name.

    ``initial``: each head parameter's values before any adapter trained it; ``views``: the head copies
    a mixed batch runs, by (head module, adapter name) (`factnet.mixing`). An adapter without values kept
    here is the active one (or has no head): its values are the model's.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.initial: dict[str, Tensor] = {}
        self.views: dict[tuple[str, str | None], tuple[tuple, nn.Module]] = {}
        self._kept: dict[Adapter, dict[str, Tensor]] = {}  # the inactive adapters' values that training changed
        self._live: tuple[list, dict[str, Tensor]] | None = None  # a copy of the model's head values

    def join(self, adapter: Adapter, values: dict[str, Tensor] | None = None) -> None:
        """Take in ``adapter``'s head parameters (their values now are the initial ones), and its own
        ``values`` (a file's, by parameter name) if given, which `switch` copies in."""
        for name, param in backbone_parameters(self.model):
            if in_head(name, adapter.head) and name not in self.initial:
                self.initial[name] = param.detach().clone()
        if values is not None:
            self._kept[adapter] = values

    def stash(self, adapter: Adapter | None) -> None:
        """Keep the active ``adapter``'s head values before another takes the head."""
        if adapter is not None and adapter.head:
            values = {n: self.model.get_parameter(n) for n in self.initial if in_head(n, adapter.head)}
            self._kept[adapter] = {n: v.detach().clone() for n, v in values.items()
                                   if not torch.equal(v, self.initial[n])}

    @torch.no_grad()
    def switch(self, adapter: Adapter | None) -> None:
        """Put ``adapter``'s head values (``None``: the initial ones) into the model's head."""
        own = self._kept.pop(adapter, {}) if adapter is not None else {}
        for name, initial in self.initial.items():
            self.model.get_parameter(name).copy_(own.get(name, initial))

    def state(self, adapter: Adapter) -> dict[str, Tensor]:
        """``adapter``'s head parameters by model name: its kept values, or the model's own parameters."""
        kept = self._kept.get(adapter)
        if kept is not None:
            return {n: kept.get(n, self.initial[n]) for n in self.initial if in_head(n, adapter.head)}
        return {n: p for n, p in backbone_parameters(self.model) if in_head(n, adapter.head)}

    def release(self, adapter: Adapter) -> dict[str, Tensor] | None:
        """Forget ``adapter`` (being deleted); its whole head values if they were kept here, else None."""
        whole = self.state(adapter) if adapter in self._kept else None
        self._kept.pop(adapter, None)
        return whole

    def drop_views(self, name: str) -> None:
        """Forget the head copies of adapter ``name`` (deleted, and no block uses it any more)."""
        for key in [k for k in self.views if k[1] == name]:
            del self.views[key]

    @torch.no_grad()
    def load(self, values: dict[str, Tensor]) -> None:
        """Copy ``values`` (a file's, by parameter name) into the model's head: the active adapter's."""
        for name, value in values.items():
            self.model.get_parameter(name).copy_(value)

    def values(self, adapter: Adapter | None) -> dict[str, Tensor]:
        """The head values ``adapter`` (``None``: no adapter) computes with, by parameter name, as tensors
        nothing writes to: the model's own for the active adapter, as a copy (made again when training
        changes them); for ``head_bits``, its own parameters low-bit."""
        initial = self.initial
        if adapter is None:
            return dict(initial)  # (`join` may add to the initial ones)
        kept = self._kept.get(adapter)
        if kept is not None:
            values = {n: kept.get(n, initial[n]) for n in initial}
        else:
            live = {n: self.model.get_parameter(n) for n in initial}
            key = [(id(p), p._version) for p in live.values()]
            if self._live is None or self._live[0] != key:
                self._live = key, {n: p.detach().clone() for n, p in live.items()}
            values = self._live[1]
        bits = adapter.settings.head_bits
        if bits is None:
            return values
        own = {n: v for n, v in values.items() if in_head(n, adapter.head)}
        return values | quantized_head(adapter, own, bits, adapter.settings.group)

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) start with no head copies."""
        return {**self.__dict__, "views": {}, "_live": None}


def backbone_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The model's parameters but the adapters' in ``model.factnet`` (not walking 1,000 adapters to reach
    the backbone), a tied parameter once, under its first name (as ``named_parameters``)."""
    seen = set()
    found = [model.named_parameters(recurse=False)]
    found += [child.named_parameters(prefix=name) for name, child in model.named_children() if name != "factnet"]
    for name, param in (pair for pairs in found for pair in pairs):
        if id(param) not in seen:
            seen.add(id(param))
            yield name, param


def in_head(parameter: str, head: list[str]) -> bool:
    """Whether ``parameter`` (a model parameter's name) belongs to one of the ``head`` modules."""
    return any(parameter.startswith(h + ".") for h in head)
