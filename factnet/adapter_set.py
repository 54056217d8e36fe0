"""`AdapterSet`: the named adapters of one model, registered on it as ``model.factnet``.

Every adapted matrix is attached once and asks the set for its increments; the set answers
with the *active* adapter's (none when disabled, merged, or when no adapter is active). So
several adapters share one frozen backbone, only one acts at a time, and switching costs
nothing: the inactive adapters' factors are frozen and untouched by training. Each adapter
keeps its own head values, swapped into the model's head when it is activated.

Calls choose their adapters themselves with `use` and `per_sample` (per thread or asyncio task,
`factnet.calls`), so many threads can serve different users on one model at once; the active
adapter is what the other forwards use, and what trains.

The set is the registry and decides which adapter acts and trains; what each attached matrix asks for is
answered by its `factnet.dispatch.Dispatch`, and the adapters' head values are kept by its
`factnet.heads.Heads`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import nn

from factnet import calls
from factnet.calls import Block, Traffic
from factnet.dispatch import Dispatch
from factnet.errors import FactnetError
from factnet.heads import Heads, backbone_parameters, in_head
from factnet.mixing import Mix

if TYPE_CHECKING:
    from factnet.adapter import Adapter

__all__ = ["AdapterSet"]


class AdapterSet(nn.Module):
    """``model.factnet``: named adapters over one frozen model, at most one active.

    ``model.factnet["task"]`` is an adapter, ``activate(name)`` switches, ``use(name)`` and
    ``per_sample(names)`` choose adapters for one thread's calls, ``disable()`` runs the base model,
    ``delete(name)`` removes one (the last one gives the model back as it was).
    Being a registered child, it lets ``model.to()``, ``zero_grad()``, DDP and ``state_dict``
    (``factnet.adapters.<name>.groups.<group>.factors.<factor>``) reach every factor.

    ``heads``: every adapter's head values (`factnet.heads.Heads`); ``dispatch``: the increments each
    attached matrix gets per call (`factnet.dispatch.Dispatch`); ``traffic``: the calls running, and the
    lock every change to the adapters takes (`factnet.calls.Traffic`); ``split_readers``: the readers that
    mixed batches run once per adapter (`factnet.mixing`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.__dict__["model"] = model
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.heads = Heads(model)
        self.dispatch = Dispatch(self, model)
        self.split_readers: set[str] = set()
        self.traffic = Traffic()
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
        with self.traffic.lock:
            self.check_addable(self.model, name)
            self.traffic.check_quiet(self, f"add adapter {name!r}, which becomes the active one,")
            self.heads.join(adapter)
            self.heads.stash(self.active_adapter)
            adapter.train(self.model.training)
            self.dispatch.sites.attach(adapter.matrices.values(), adapter.head)
            self.adapters[name] = adapter
            self._switch(name)

    def activate(self, name: str | None) -> Adapter | None:
        """Make ``name`` the adapter that acts (``None``: none does) and the only one that trains. It acts
        in every forward that chose no adapters of its own (`use`, `per_sample`)."""
        with self.traffic.lock:
            if name is not None:
                self[name]
            if name != self.active:
                self._check_switchable()
                self.traffic.check_quiet(self, f"activate {name!r}")
                self.heads.stash(self.active_adapter)
                self._switch(name)
            return self.active_adapter

    def delete(self, name: str, keep_merged: bool = False) -> nn.Module:
        """Remove adapter ``name``; the last one leaves the model exactly as it was before the first
        `decompose` (but for a trained head). Returns the model. See `Adapter.detach`.

        From the call on, `use`/`per_sample` no longer find it; blocks of other threads that took it
        before keep it whole until they end, and this waits for them."""
        traffic = self.traffic
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
                self.active = None
            adapter.leave(self.heads.release(adapter))
            del self.adapters[name]
            while traffic.using[adapter]:
                traffic.released.wait()
            del traffic.using[adapter]
            self.heads.drop_views(name)
            model = self.model
            self.dispatch.sites.release(adapter.matrices)
            self.sync()
            if not self.adapters:
                for param_name, param in model.named_parameters():
                    param.requires_grad_(self._requires_grad.get(param_name, param.requires_grad))
                del model._modules["factnet"]
                self.__dict__["model"] = None
            else:
                self._set_requires_grad(adapter)
            return model

    # ---- what the model's forwards see ----------------------------------------------------------
    @property
    def mix(self) -> Mix | None:
        """This thread's or task's adapters per sample (`use`, `per_sample`), or None: the active adapter's."""
        return self.dispatch.mix

    def reader_modules(self) -> list[str]:
        """Names of the modules whose forward may read adapted weights as attributes (`readers`)."""
        return list(self.dispatch.sites.readers)

    def forward(self, x: Any) -> Any:
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
        traffic = self.traffic
        with traffic.lock:
            self._check_block(wanted, batch_dim, names is None)
            adapters = {n: self[n] for n in dict.fromkeys(wanted) if n is not None}
            heads = {n: self.heads.values(adapters.get(n)) for n in dict.fromkeys(wanted)}
            mix = Mix(self, names, batch_dim, adapters, heads, name)
            traffic.blocks += 1
            traffic.using.update(adapters.values())
            self.sync()
        try:
            with calls.entered(Block(self, mix, counted=True)):
                yield
        finally:
            with traffic.lock:
                traffic.blocks -= 1
                traffic.using.subtract(adapters.values())
                traffic.released.notify_all()
                self.sync()

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

    @contextmanager
    def mixing(self, mix: Mix) -> Iterator[None]:
        """Forwards inside the block follow ``mix`` (a split module's run on some samples, watched by the
        forward's first-forward guard)."""
        outer = calls.current(self)
        with calls.entered(Block(self, mix, watch=None if outer is None else outer.watch)):
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
            with calls.entered(Block(self, disabled=True)):
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

    def _switch(self, name: str | None) -> None:
        previous, self.active = self.active_adapter, name
        self.heads.switch(self.active_adapter)
        self._set_requires_grad(previous)
        self.sync()

    def sync(self) -> None:
        """Keep factnet's machinery in the model (`factnet.attach.Sites`) exactly while an adapter can act
        or train: an active unmerged one, a `use`/`per_sample` block, or a merged one in training mode
        (whose backward must raise, `Dispatch.guard_merged`). Otherwise the model is the base model and costs what it
        costs. It leaves only once no forward runs (the last one's finish hook calls this again)."""
        with self.traffic.lock:
            adapter = self.active_adapter
            trained_merged = adapter is not None and adapter.merged and self.training
            wanted = self.dispatch.acting() is not None or trained_merged or self.traffic.blocks > 0
            if wanted or not self.traffic.forwards:
                self.dispatch.sites.switch(wanted)

    def train(self, mode: bool = True) -> AdapterSet:
        """As `nn.Module.train` (``model.train()`` calls it), then `sync` (a merged model in eval mode runs bare)."""
        super().train(mode)
        if "dispatch" in self.__dict__:
            self.sync()
        return self

    def _set_requires_grad(self, previous: Adapter | None) -> None:
        """Only the active adapter's factors and head train; ``previous`` (the adapter that was active)
        is frozen. Touches two adapters, not all of them: switching is O(1) in their number."""
        active = self.active_adapter
        head = active.head if active is not None else []
        for name, param in backbone_parameters(self.model):
            param.requires_grad_(in_head(name, head))
        if previous is not None and previous is not active:
            previous.requires_grad_(False)
        if active is not None:
            active.requires_grad_(True)

    def extra_repr(self) -> str:
        return f"active={self.active!r}"

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) start with no calls running (and no head copies: `Heads`)."""
        return {**super().__getstate__(), "traffic": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.traffic = Traffic()
