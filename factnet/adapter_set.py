"""`AdapterSet`: the named adapters of one model, registered on it as ``model.factnet``.

Every adapted matrix is attached once and asks the set for its increments; the set answers
with the *active* adapter's (none when disabled, merged, or when no adapter is active). So
several adapters share one frozen backbone, only one acts at a time, and switching costs
nothing: the inactive adapters' factors are frozen and untouched by training. Each adapter
keeps its own head values, swapped into the model's head when it is activated.

Calls choose their adapters themselves with `use` and `per_sample` (per thread or asyncio task,
`factnet.calls`), so many threads can serve different users on one model at once; the active
adapter is what the other forwards use, and what trains.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from factnet import attach as sites
from factnet import calls
from factnet.calls import Call, Traffic
from factnet.errors import FactnetError
from factnet.guard import WeightWatch
from factnet.head_bits import quantized_head
from factnet.increment import Increment
from factnet.mixing import Mix, check_batch

if TYPE_CHECKING:
    from factnet.adapter import Adapter, Settings

__all__ = ["AdapterSet"]


class AdapterSet(nn.Module):
    """``model.factnet``: named adapters over one frozen model, at most one active.

    ``model.factnet["task"]`` is an adapter, ``activate(name)`` switches, ``use(name)`` and
    ``per_sample(names)`` choose adapters for one thread's calls, ``disable()`` runs the base model,
    ``delete(name)`` removes one (the last one gives the model back as it was).
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
        self._traffic = Traffic()  # the calls running, and the lock every change to the adapters takes
        self.head_views: dict[tuple[str, str | None], tuple[tuple, nn.Module]] = {}  # (`factnet.mixing`)
        self._live_head: tuple[list, dict[str, Tensor]] | None = None  # a copy of the model's head values
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
        """Register ``adapter`` as ``name``, attach the matrices it adapts, and activate it. Calls of other
        threads see it only once it is whole (`use` and `per_sample` find it after this returns)."""
        with self._traffic.lock:
            self.check_addable(self.model, name)
            self._traffic.check_quiet(self, f"add adapter {name!r}, which becomes the active one,")
            for param_name, param in self._backbone_parameters():
                if in_head(param_name, adapter.head) and param_name not in self._head_init:
                    self._head_init[param_name] = param.detach().clone()
            self._stash_head()
            adapter.train(self.model.training)
            self._sites.attach(adapter.matrices.values(), adapter.head)
            self.adapters[name] = adapter
            self._switch(name)

    def activate(self, name: str | None) -> Adapter | None:
        """Make ``name`` the adapter that acts (``None``: none does) and the only one that trains. It acts
        in every forward that chose no adapters of its own (`use`, `per_sample`)."""
        with self._traffic.lock:
            if name is not None:
                self[name]
            if name != self.active:
                self._check_switchable()
                self._traffic.check_quiet(self, f"activate {name!r}")
                self._stash_head()
                self._switch(name)
            return self.active_adapter

    def delete(self, name: str, keep_merged: bool = False) -> nn.Module:
        """Remove adapter ``name``; the last one leaves the model exactly as it was before the first
        `decompose` (but for a trained head). Returns the model. See `Adapter.detach`.

        From the call on, `use`/`per_sample` no longer find it; blocks of other threads that took it
        before keep it whole until they end, and this waits for them."""
        traffic = self._traffic
        with traffic.lock:
            adapter = self[name]
            if adapter.merged and not keep_merged:
                raise FactnetError(f"adapter {name!r} is merged, so removing it would keep W + s·dW in the weights; "
                                   "call unmerge() first, or pass keep_merged=True to keep the merged weights")
            if any(c.mix is not None and adapter in c.mix.adapters.values() for c in calls.mine(self)):
                raise FactnetError(f"cannot delete adapter {name!r} inside a use()/per_sample() block that uses it; "
                                   "delete it after the block")
            if name == self.active:
                traffic.check_quiet(self, f"delete the active adapter {name!r}")
                adapter._merged = False
                self.active = None
            if adapter._head_state is not None:
                adapter._head_state = adapter.head_state()  # whole: it can no longer fall back on the set's
            if adapter._head_quantizer is not None:
                adapter._head_quantizer.remove()
            del self.adapters[name]
            while traffic.using[adapter]:
                traffic.released.wait()
            del traffic.using[adapter]
            for key in [k for k in self.head_views if k[1] == name]:
                del self.head_views[key]
            model = self.model
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
    @property
    def mix(self) -> Mix | None:
        """This thread's or task's adapters per sample (`use`, `per_sample`), or None: the active adapter's."""
        call = calls.current(self)
        return None if call is None else call.mix

    def increments(self, matrix: str, weight: Tensor) -> list[Increment]:
        """The increments of ``matrix`` for its ``weight``: the active adapter's, none when disabled or merged."""
        call = calls.current(self)
        if call is not None:
            now = call.now
            if now is not None and now[0] == torch.is_grad_enabled():  # built as the model's forward started
                return now[1].get(matrix, [])
            if call.disabled:
                return []
        adapter = self._acting()
        if adapter is None or matrix not in adapter.placements:
            return []
        return adapter.increments(matrix, weight)

    def _acting(self) -> Adapter | None:
        """The active adapter if its increments act now (not merged), else None."""
        adapter = self.active_adapter
        return adapter if adapter is not None and not adapter.merged else None

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
        call = calls.current(self)
        if call is not None and call.watch is not None:
            call.watch.applied.add(matrix)

    @property
    def settings(self) -> Settings:
        """The active adapter's scale, dropout and kernel path (read with `increments`)."""
        adapter = self.active_adapter
        return _NO_SETTINGS if adapter is None else adapter.settings

    def _prepare(self, _: nn.Module, args: tuple, kwargs: dict) -> None:
        """As the model's forward starts: this forward's `Call` (the block's choice, or the active adapter's
        increments, built now, which the attached matrices then look up until it ends, outside any
        checkpointed block, so recomputation saves the same tensors as the first pass), counted in
        `Traffic`, and the first-forward guard for newly adapted matrices (`factnet.guard`; in a mixed
        batch, those of its adapters)."""
        outer = calls.current(self)
        mix = None if outer is None or outer.mix is None else outer.mix.for_forward()
        call = Call(self, mix, outer is not None and outer.disabled, forward=True)
        traffic = self._traffic
        with traffic.lock:
            traffic.forwards += 1
            traffic.reading_active += call.reads_active
        calls.push(call)  # (taken back by `_finish`, which runs even if this raises)
        if mix is not None:
            check_batch(mix, args, kwargs)
            acting = list(mix.adapters.values())
        else:
            adapter = None if call.disabled else self._acting()
            if adapter is None:
                return
            acting = [adapter]
            call.now = torch.is_grad_enabled(), adapter.all_increments([self._parameter(n) for n in adapter.matrices])
        if self._sites.attached.keys() <= self._verified:  # (the common case, at C speed)
            return
        pending = {m.name for a in acting for m in a.matrices.values() if m.name not in self._verified}
        if pending and not torch.compiler.is_compiling():
            call.watch = WeightWatch({id(self._parameter(name)): name for name in pending})
            call.watch.__enter__()

    def _parameter(self, matrix: str) -> nn.Parameter:
        """The parameter holding an attached matrix (as `attach.base_weight`, without walking the model)."""
        return self._sites.attached[matrix].parameter()

    def _finish(self, *_: object) -> None:
        call = calls.pop_forward(self)
        if call is None:  # the forward started before the hooks were in
            return
        traffic = self._traffic
        with traffic.lock:
            traffic.forwards -= 1
            traffic.reading_active -= call.reads_active
            if not traffic.forwards:
                self._sync()  # (the machinery may have been wanted out while it ran)
        watch = call.watch
        if watch is None:
            return
        watch.__exit__(None, None, None)
        if sys.exc_info()[0] is None:  # the forward completed (this hook also runs when it raised)
            self._verified |= watch.verdict()

    def forward(self, x: Tensor) -> Tensor:
        """Identity: adapters act inside the model's matrices. (Registered as the last child
        ``model.factnet``, an ``nn.Sequential`` root passes its output straight through.)"""
        return x

    # ---- adapters chosen per call -----------------------------------------------------------------
    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Inside the block, this thread's (or asyncio task's) forwards use adapter ``name`` with its head
        (``None``: the base model), whatever the active adapter is and whatever other threads use::

            with torch.no_grad(), model.factnet.use("alice"):
                logits = model(images)

        The adapter is taken whole as the block opens: a `delete` meanwhile waits for the block. Errors
        as `per_sample`'s."""
        with self._block(None, 0, name):
            yield

    @contextmanager
    def per_sample(self, names: Sequence[str | None], batch_dim: int = 0) -> Iterator[None]:
        """Inside the block, sample ``b`` of the model's batch uses adapter ``names[b]`` (``None``: the base
        model), its increments and its own head, without merging, in this thread's (or asyncio task's)
        forwards only::

            with model.factnet.per_sample(["alice", "bob", None, "alice"]):
                logits = model(images)  # (4, classes): each row as if its adapter were active

        ``batch_dim`` is the batch dimension of the model's input and of every adapted matrix's input
        (whose samples own equal consecutive blocks along it). Unknown names, a merged adapter, nested
        blocks, or an input of another batch size are a `FactnetError` before anything runs. Several
        threads may run blocks at once, each with its own adapters. See `factnet.mixing`.
        """
        with self._block(names, batch_dim):
            yield

    @contextmanager
    def _block(self, names: Sequence[str | None] | None, batch_dim: int, name: str | None = None) -> Iterator[None]:
        wanted = [name] if names is None else list(names)
        traffic = self._traffic
        with traffic.lock:
            self._check_block(wanted, batch_dim, names is None)
            adapters = {n: self[n] for n in dict.fromkeys(wanted) if n is not None}
            heads = {n: self._head_values(adapters.get(n)) for n in dict.fromkeys(wanted)}
            mix = Mix(self, names, batch_dim, adapters, heads, name)
            traffic.blocks += 1
            traffic.using.update(adapters.values())
            self._sync()
        try:
            with calls.entered(Call(self, mix, block=True)):
                yield
        finally:
            with traffic.lock:
                traffic.blocks -= 1
                traffic.using.subtract(adapters.values())
                traffic.released.notify_all()
                self._sync()

    def _check_block(self, names: list[str | None], batch_dim: int, single: bool) -> None:
        unknown = sorted({repr(n) for n in names if n is not None and (not isinstance(n, str) or n not in self)})
        if single and unknown:
            raise FactnetError(f"use({names[0]!r}): no adapter named {names[0]!r}; this model has {self.names}")
        if not names or unknown:
            problem = f"names adapters it does not have: {', '.join(unknown[:6])}" if names else "is empty"
            raise FactnetError(f"a mixed batch's list of adapter names (one per sample, None for the base model) "
                               f"{problem}; this model has {self.names}")
        call = calls.current(self)
        if call is not None and call.mix is not None:
            raise FactnetError("use()/per_sample() blocks do not nest; close the open one first")
        if call is not None and call.disabled:
            raise FactnetError("use()/per_sample() inside disable(): samples of the base model are named None instead")
        active = self.active_adapter
        if active is not None and active.merged:
            raise FactnetError(f"adapter {active.name!r} is merged into the weights, so every sample would get it; "
                               "unmerge() it before choosing adapters per call")
        if not isinstance(batch_dim, int) or batch_dim < 0:
            raise FactnetError(f"batch_dim must be a non-negative dimension, got {batch_dim}")
        dropping = sorted({n for n in names if n is not None and self[n].settings.dropout > 0})
        if self.training and dropping:
            raise FactnetError(f"adapters chosen per call apply no factor dropout, but adapters {dropping[:6]} train "
                               "with it; call model.eval() for serving")

    def _head_values(self, adapter: Adapter | None) -> dict[str, Tensor]:
        """The head values of ``adapter`` (``None``: before any adapter trained them), by parameter name, as
        tensors nothing writes to: the active adapter's, held by the model, as a copy (made again when
        training changes them)."""
        initial = self._head_init
        if adapter is None:
            return dict(initial)  # (`add` may add to the set's own)
        if adapter._head_state is not None:
            values = {n: adapter._head_state.get(n, initial[n]) for n in initial}
        else:
            live = {n: self.model.get_parameter(n) for n in initial}
            key = [(id(p), p._version) for p in live.values()]
            if self._live_head is None or self._live_head[0] != key:
                self._live_head = key, {n: p.detach().clone() for n, p in live.items()}
            values = self._live_head[1]
        if adapter.settings.head_bits is None:
            return values
        own = {n: v for n, v in values.items() if in_head(n, adapter.head)}
        return values | quantized_head(adapter, own, adapter.settings.head_bits, adapter.settings.group)

    @contextmanager
    def mixing(self, mix: Mix) -> Iterator[None]:
        """Forwards inside the block follow ``mix`` (a split module's run on some samples, watched by the
        forward's first-forward guard)."""
        outer, call = calls.current(self), Call(self, mix)
        call.watch = None if outer is None else outer.watch
        with calls.entered(call):
            yield

    @property
    def enabled(self) -> bool:
        """False inside `disable` (of this thread or task)."""
        call = calls.current(self)
        return call is None or not call.disabled

    @contextmanager
    def disable(self) -> Iterator[None]:
        """Run the base model inside the block, in this thread's (or asyncio task's) forwards (a merged
        adapter is unmerged meanwhile, which other threads' forwards then see: see `Adapter.unmerge`)."""
        adapter = self.active_adapter
        was_merged = adapter is not None and adapter.merged
        if was_merged:
            adapter.unmerge()
        try:
            with calls.entered(Call(self, disabled=True)):
                yield
        finally:
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
            values = {n: self.model.get_parameter(n) for n in self._head_init if in_head(n, adapter.head)}
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
        or train: an active unmerged one, a `use`/`per_sample` block, or a merged one in training mode
        (whose backward must raise, `guard_merged`). Otherwise the model is the base model and costs what it
        costs. It leaves only once no forward runs (the last one's finish hook calls this again)."""
        with self._traffic.lock:
            adapter = self.active_adapter
            trained_merged = adapter is not None and adapter.merged and self.training
            wanted = self._acting() is not None or trained_merged or self._traffic.blocks > 0
            if wanted or not self._traffic.forwards:
                self._sites.switch(wanted)

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
            param.requires_grad_(in_head(name, head))
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

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) start with no calls running and no head copies."""
        return {**super().__getstate__(), "_traffic": None, "head_views": {}, "_live_head": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._traffic = Traffic()


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


def in_head(parameter: str, head: list[str]) -> bool:
    """Whether ``parameter`` (a name) belongs to one of the ``head`` modules."""
    return any(parameter.startswith(h + ".") for h in head)
