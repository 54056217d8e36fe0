"""`AdapterSet`: the named adapters of one model, registered on it as ``model.factnet``.

Every adapted matrix is attached once and asks the set for its increments; the set answers
with the *active* adapter's (none when disabled, merged, or when no adapter is active). So
several adapters share one frozen backbone, only one acts at a time, and switching costs
nothing: the inactive adapters' factors are frozen and untouched by training. Each adapter
keeps its own head values, swapped into the model's head when it is activated.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from factnet import attach as sites
from factnet.errors import FactnetError
from factnet.guard import WeightWatch
from factnet.kernel import Increment

if TYPE_CHECKING:
    from factnet.adapter import Adapter, Settings
    from factnet.mixing import Mix

__all__ = ["AdapterSet"]


class AdapterSet(nn.Module):
    """``model.factnet``: named adapters over one frozen model, at most one active.

    ``model.factnet["task"]`` is an adapter, ``activate(name)`` switches, ``disable()`` runs the
    base model, ``delete(name)`` removes one (the last one gives the model back as it was).
    Being a registered child, it lets ``model.to()``, ``zero_grad()``, DDP and ``state_dict``
    (``factnet.adapters.<name>.groups.<group>.factors.<factor>``) reach every factor.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self._enabled = True
        self.__dict__["model"] = model
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._head_init: dict[str, Tensor] = {}  # a head's values before any adapter trained it
        self._sites = sites.Sites(model, self, self._prepare, self._finish)
        self._verified: set[str] = set()  # matrices the first-forward guard has seen take part
        self.split_readers: set[str] = set()  # readers that mixed batches run once per adapter (`factnet.mixing`)
        self._watch: WeightWatch | None = None
        self._now: tuple[bool, dict[str, list[Increment]]] | None = None  # for the forward running: (grad, increments)
        self.mix = None  # a mixed-adapter batch's assignment while `per_sample` runs
        for param in model.parameters():
            param.requires_grad_(False)
        model.add_module("factnet", self.train(model.training))

    @staticmethod
    def check_addable(model: nn.Module, name: object) -> None:
        """Raise unless an adapter ``name`` can join ``model`` now (valid, free name; nothing merged).
        Checks only: the model is not touched."""
        if not isinstance(name, str) or not name or "." in name:
            raise FactnetError(f"adapter names are non-empty strings without dots, got {name!r}")
        found = getattr(model, "factnet", None)
        if found is None:
            return
        if not isinstance(found, AdapterSet):
            raise FactnetError(f"model.factnet is a {type(found).__name__}, not factnet's AdapterSet; rename that "
                               "attribute of the model")
        if name in found.adapters:
            raise FactnetError(f"this model already has an adapter named {name!r}; pass another name= or delete it "
                               f"first (model.factnet.delete({name!r}))")
        found._check_switchable()

    @classmethod
    def of(cls, model: nn.Module) -> AdapterSet:
        """The model's set, created (backbone frozen, registered as ``model.factnet``) if it has none."""
        found = getattr(model, "factnet", None)
        if found is None:
            return cls(model)
        if not isinstance(found, AdapterSet):
            raise FactnetError(f"model.factnet is a {type(found).__name__}, not factnet's AdapterSet; rename that "
                               "attribute of the model")
        return found

    # ---- the named adapters -----------------------------------------------------------------
    def __getitem__(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise FactnetError(f"no adapter named {name!r}; this model has {self.names}")
        return self.adapters[name]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.adapters))

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def active_adapter(self) -> Adapter | None:
        return None if self.active is None else self._modules["adapters"]._modules[self.active]  # (hot path)

    def add(self, name: str, adapter: Adapter) -> None:
        """Register ``adapter`` as ``name``, attach the matrices it adapts, and activate it."""
        self.check_addable(self.model, name)
        for param_name, param in self._backbone_parameters():
            if _in_head(param_name, adapter.head) and param_name not in self._head_init:
                self._head_init[param_name] = param.detach().clone()
        self._stash_head()
        self.adapters[name] = adapter.train(self.model.training)
        self._sites.attach(adapter.matrices.values())
        self._switch(name)

    def activate(self, name: str | None) -> Adapter | None:
        """Make ``name`` the adapter that acts (``None``: none does) and the only one that trains."""
        if name is not None:
            self[name]
        if name != self.active:
            self._check_switchable()
            self._stash_head()
            self._switch(name)
        return self.active_adapter

    def delete(self, name: str, keep_merged: bool = False) -> nn.Module:
        """Remove adapter ``name``; the last one leaves the model exactly as it was before the first
        `decompose` (but for a trained head). Returns the model. See `Adapter.detach`."""
        adapter = self[name]
        if adapter.merged and not keep_merged:
            raise FactnetError(f"adapter {name!r} is merged, so removing it would keep W + s·dW in the weights; "
                               "call unmerge() first, or pass keep_merged=True to keep the merged weights")
        model = self.model
        if name == self.active:
            adapter._merged = False
            self.active = None
        if adapter._head_state is not None:
            adapter._head_state = adapter.head_state()  # whole: it can no longer fall back on the set's
        del self.adapters[name]
        adapter.__dict__["model"] = None
        self._sites.release(adapter.matrices)
        self._sync()
        if not self.adapters:
            for param_name, param in model.named_parameters():
                param.requires_grad_(self._requires_grad.get(param_name, param.requires_grad))
            del model._modules["factnet"]
            self.__dict__["model"] = None
        else:
            self._set_requires_grad(adapter)
        return model

    # ---- what the attached matrices call ----------------------------------------------------
    def increments(self, matrix: str, weight: Tensor) -> list[Increment]:
        """The increments of ``matrix`` for its ``weight``: the active adapter's, none when disabled or merged."""
        now = self._now
        if now is not None and now[0] == torch.is_grad_enabled():  # built as the model's forward started
            return now[1].get(matrix, [])
        adapter = self._acting()
        if adapter is None or matrix not in adapter.placements:
            return []
        return adapter.increments(matrix, weight)

    def _acting(self) -> Adapter | None:
        """The active adapter if its increments act now (enabled and not merged), else None."""
        adapter = self.active_adapter
        return adapter if adapter is not None and self._enabled and not adapter.merged else None

    def guard_merged(self, value: Tensor) -> Tensor:
        """``value`` (an output or weight computed without increments), made to raise `FactnetError` in
        backward if the active adapter is merged and trainable: training it then would be a silent no-op."""
        adapter = self.active_adapter
        if adapter is None or not adapter.merged or not (self.training and torch.is_grad_enabled()):
            return value
        trainable = [p for p in adapter.parameters() if p.requires_grad]
        return _NoTrainingWhileMerged.apply(value, adapter.name, trainable[0]) if trainable else value

    @property
    def reading(self) -> bool:
        """Whether a module that may read adapted weights as attributes is in its forward: only then
        does ``module.weight`` read as ``W + s·ΔW`` (elsewhere, as for FSDP or ``get_parameter``, it
        is the parameter)."""
        return self._sites.reading

    def reader_modules(self) -> list[str]:
        """Names of the modules whose forward may read adapted weights as attributes (`readers`)."""
        return list(self._sites.readers)

    def applied(self, matrix: str) -> None:
        """An attached matrix applied its increments (seen by the first-forward guard)."""
        if self._watch is not None:
            self._watch.applied.add(matrix)

    @property
    def settings(self) -> Settings:
        """The active adapter's scale, dropout and kernel path (read with `increments`)."""
        adapter = self.active_adapter
        return _NO_SETTINGS if adapter is None else adapter.settings

    def _prepare(self, *_: object) -> None:
        """As the model's forward starts: build the active adapter's increments, which the attached
        matrices then look up until it ends (outside any checkpointed block, so recomputation saves
        the same tensors as the first pass; a state change drops them, `_sync`), and watch
        the first forward of newly adapted matrices (`factnet.guard`; in a mixed batch, those of
        its adapters)."""
        if self.mix is not None:
            acting = [self[name] for name, _ in self.mix.adapted]
        else:
            adapter = self._acting()
            if adapter is None:
                return
            acting = [adapter]
            increments = adapter.all_increments([self._parameter(name) for name in adapter.matrices])
            self._now = torch.is_grad_enabled(), increments
        if self._sites.attached.keys() <= self._verified:  # (the common case, at C speed)
            return
        pending = {m.name for a in acting for m in a.matrices.values() if m.name not in self._verified}
        if pending and self._watch is None and not torch.compiler.is_compiling():
            self._watch = WeightWatch({id(self._parameter(name)): name for name in pending})
            self._watch.__enter__()

    def _parameter(self, matrix: str) -> nn.Parameter:
        """The parameter holding an attached matrix (as `attach.base_weight`, without walking the model)."""
        return self._sites.attached[matrix].parameter()

    def _finish(self, *_: object) -> None:
        self._now = None
        watch, self._watch = self._watch, None
        if watch is None:
            return
        watch.__exit__(None, None, None)
        if sys.exc_info()[0] is None:  # the forward completed (this hook also runs when it raised)
            self._verified |= watch.verdict()

    def forward(self, x: Tensor) -> Tensor:
        """Identity: adapters act inside the model's matrices. (Registered as the last child
        ``model.factnet``, an ``nn.Sequential`` root passes its output straight through.)"""
        return x

    @contextmanager
    def per_sample(self, names: Sequence[str | None], batch_dim: int = 0) -> Iterator[None]:
        """Inside the block, sample ``b`` of the model's batch uses adapter ``names[b]`` (``None``: the base
        model), its increments and its own head, without merging::

            with model.factnet.per_sample(["alice", "bob", None, "alice"]):
                logits = model(images)  # (4, classes): each row as if its adapter were active

        ``batch_dim`` is the batch dimension of the model's input and of every adapted matrix's input
        (whose samples own equal consecutive blocks along it). Unknown names, a merged adapter, or an
        input of another batch size are a `FactnetError` before anything runs. See `factnet.mixing`.
        """
        from factnet.mixing import per_sample

        with per_sample(self, names, batch_dim):
            yield

    @contextmanager
    def mixing(self, mix: Mix) -> Iterator[None]:
        """Forwards inside the block follow ``mix`` (a split module's run on some samples)."""
        outer, self.mix = self.mix, mix
        self._sync()
        try:
            yield
        finally:
            self.mix = outer
            self._sync()

    @property
    def enabled(self) -> bool:
        """False inside `disable`."""
        return self._enabled

    @contextmanager
    def head_values(self, module: str, name: str | None) -> Iterator[None]:
        """Inside the block the head ``module``'s parameters are adapter ``name``'s (``None``: the values
        before any adapter trained them), swapped in without copying."""
        swapped = []
        for param_name, initial in self._head_init.items():
            if not _in_head(param_name, [module]):
                continue
            adapter = None if name is None else self[name]
            if adapter is not None and adapter.name == self.active:
                continue  # the model holds them
            state = adapter._head_state if adapter is not None else None
            owner_name, _, local = param_name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            swapped.append((owner, local, owner._parameters[local]))
            owner._parameters[local] = (state or {}).get(param_name, initial)
        try:
            yield
        finally:
            for owner, local, value in swapped:
                owner._parameters[local] = value

    @contextmanager
    def disable(self) -> Iterator[None]:
        """Run the base model inside the block (a merged adapter is unmerged meanwhile)."""
        adapter = self.active_adapter
        was_merged = adapter is not None and adapter.merged
        if was_merged:
            adapter.unmerge()
        self._enabled = False
        self._sync()
        try:
            yield
        finally:
            self._enabled = True
            self._sync()
            if was_merged:
                adapter.merge()

    # ---- switching --------------------------------------------------------------------------
    def _check_switchable(self) -> None:
        adapter = self.active_adapter
        if adapter is not None and adapter.merged:
            raise FactnetError(f"adapter {self.active!r} is merged into the weights; unmerge() it before switching "
                               "or adding adapters")

    def _stash_head(self) -> None:
        """Keep the active adapter's head values with it before another takes the head."""
        adapter = self.active_adapter
        if adapter is not None and adapter.head:
            values = {n: self.model.get_parameter(n) for n in self._head_init if _in_head(n, adapter.head)}
            adapter._head_state = {n: v.detach().clone() for n, v in values.items()  # only what training changed:
                                   if not torch.equal(v, self._head_init[n])}  # 1,000 untrained heads cost nothing

    @torch.no_grad()
    def _switch(self, name: str | None) -> None:
        previous, self.active = self.active_adapter, name
        adapter = self.active_adapter
        own = adapter._head_state if adapter is not None and adapter._head_state is not None else {}
        for param_name, initial in self._head_init.items():
            self.model.get_parameter(param_name).copy_(own.get(param_name, initial))
        if adapter is not None:
            adapter._head_state = None  # the model's head holds it while active
        self._set_requires_grad(previous)
        self._sync()

    def _sync(self) -> None:
        """Keep factnet's machinery in the model (`factnet.attach.Sites`) exactly while an adapter can act
        or train: an active unmerged one, a mixed batch, or a merged one in training mode (whose backward
        must raise, `guard_merged`). Otherwise the model is the base model and costs what it costs."""
        adapter = self.active_adapter
        trained_merged = adapter is not None and self._enabled and adapter.merged and self.training
        self._now = None  # built for the state that was
        self._sites.switch(self._acting() is not None or trained_merged or self.mix is not None)

    def train(self, mode: bool = True) -> AdapterSet:
        """As `nn.Module.train` (``model.train()`` calls it), then `_sync` (a merged model in eval mode runs bare)."""
        super().train(mode)
        if "_sites" in self.__dict__:
            self._sync()
        return self

    def _set_requires_grad(self, previous: Adapter | None) -> None:
        """Only the active adapter's factors and head train; ``previous`` (the adapter that was active)
        is frozen. Touches two adapters, not all of them: switching is O(1) in their number."""
        active = self.active_adapter
        head = active.head if active is not None else []
        for name, param in self._backbone_parameters():
            param.requires_grad_(_in_head(name, head))
        if previous is not None and previous is not active:
            previous.requires_grad_(False)
        if active is not None:
            active.requires_grad_(True)

    def _backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The model's parameters but the adapters' (not walking 1,000 adapters to reach the backbone)."""
        model, seen = self.model, set()
        found = [model.named_parameters(recurse=False)]
        found += [child.named_parameters(prefix=name) for name, child in model.named_children() if child is not self]
        for name, param in (pair for pairs in found for pair in pairs):
            if id(param) not in seen:  # a tied parameter once, under its first name (as named_parameters)
                seen.add(id(param))
                yield name, param

    def extra_repr(self) -> str:
        return f"active={self.active!r}"


class _NoTrainingWhileMerged(torch.autograd.Function):
    """Identity forward (a copy: the model may change it in place); its backward raises: a merged
    adapter's factors would get no gradient."""

    @staticmethod
    def forward(ctx, value, name, factor):  # type: ignore[override]
        ctx.name = name
        return value.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise FactnetError(f"adapter {ctx.name!r} is merged into the weights, so this backward would give its "
                           "factors no gradient; unmerge() it before training (or freeze its factors with "
                           "adapter.requires_grad_(False) to train the rest)")


class _NoSettings:
    scale, dropout, path = 1.0, 0.0, "auto"


_NO_SETTINGS = _NoSettings()


def _in_head(parameter: str, head: list[str]) -> bool:
    return any(parameter.startswith(h + ".") for h in head)
