"""Per-call state: what one thread's or asyncio task's forwards run with, and who is running now.

Forwards on one model may run at the same time (a thread pool serving requests; asyncio tasks handing
work to threads, which copies their context). What a call decides for itself lives in context
variables, where no other thread or task can see it: a `Block` for each open block (the adapters it
selected with `AdapterSet.use`, `per_sample`, or `disable`), a `Forward` while a model forward runs (the
increments it looked up, its first-forward guard), and which `factnet.attach.Sites` a reader module's
forward is running on (`reading`). What calls share (the model, its adapters, the
active adapter) changes only under `Traffic`'s lock, and never under a running call that would see it
half-done: changes that would are refused while such calls run (`Traffic.check_quiet`), and deleting an
adapter waits for the blocks using it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

from factnet.errors import FactnetError

if TYPE_CHECKING:
    from factnet.adapter import Adapter
    from factnet.guard import WeightWatch
    from factnet.increment import Increment
    from factnet.mixing import Mix

__all__ = ["Block", "Call", "Forward", "Traffic", "current", "entered", "reading", "start_reading", "stop_reading"]


class Call:
    """What one thread's or task's calls on the model ``owner`` (an `AdapterSet`) chose.

    ``mix``: the adapters per sample (`factnet.mixing.Mix`), None to use the active adapter;
    ``disabled``: the base model (`AdapterSet.disable`); ``watch``: the first-forward guard that
    sees the increments applied (`factnet.guard`), if one is on."""

    __slots__ = ("owner", "mix", "disabled", "watch")

    def __init__(self, owner: object, mix: Mix | None = None, disabled: bool = False) -> None:
        self.owner, self.mix, self.disabled = owner, mix, disabled
        self.watch: WeightWatch | None = None


class Block(Call):
    """A user's block (`AdapterSet.use`, `per_sample`, `disable`) or a split module's run in a mixed
    batch (`AdapterSet.mixing`, which shares its forward's ``watch``); ``counted``: a `use`/`per_sample`
    block, counted in `Traffic.blocks`."""

    __slots__ = ("counted",)

    def __init__(self, owner: object, mix: Mix | None = None, disabled: bool = False, counted: bool = False,
                 watch: WeightWatch | None = None) -> None:
        super().__init__(owner, mix, disabled)
        self.counted, self.watch = counted, watch


class Forward(Call):
    """One model forward, from its pre-hook to its post-hook: its block's choice (``mix`` made for this
    forward, ``disabled``), whether it reads the active adapter (``reads_active``, counted in
    `Traffic.reading_active`), and the increments it looked up (``now``: ``(grad mode, {matrix:
    increments})``, built as it started)."""

    __slots__ = ("reads_active", "now")

    def __init__(self, owner: object, mix: Mix | None, disabled: bool) -> None:
        super().__init__(owner, mix, disabled)
        self.reads_active = mix is None and not disabled
        self.now: tuple[bool, dict[str, list[Increment]]] | None = None


_CALLS: ContextVar[tuple[Call, ...]] = ContextVar("factnet_calls", default=())
_READING: ContextVar[tuple[object, ...]] = ContextVar("factnet_reading", default=())  # the `Sites` reading


def current(owner: object) -> Call | None:
    """The innermost call on ``owner`` in this thread or task, or None."""
    calls = _CALLS.get()
    if calls and calls[-1].owner is owner:  # (the common case)
        return calls[-1]
    for call in reversed(calls):
        if call.owner is owner:
            return call
    return None


def mine(owner: object) -> list[Call]:
    """This thread's or task's calls on ``owner``, outermost first."""
    return [call for call in _CALLS.get() if call.owner is owner]


@contextmanager
def entered(call: Block) -> Iterator[Block]:
    """Inside the block, ``call`` is this thread's or task's innermost call on its owner."""
    token = _CALLS.set((*_CALLS.get(), call))
    try:
        yield call
    finally:
        _CALLS.reset(token)


def push(call: Forward) -> None:
    """Make ``call`` the innermost (a model forward's pre-hook; `pop_forward` in its post-hook)."""
    _CALLS.set((*_CALLS.get(), call))


def pop_forward(owner: object) -> Forward | None:
    """Take back the innermost forward call on ``owner`` pushed in this thread or task (None if there is
    none: the forward started before the hooks were in)."""
    calls = _CALLS.get()
    for index in range(len(calls) - 1, -1, -1):
        call = calls[index]
        if call.owner is owner and isinstance(call, Forward):
            _CALLS.set(calls[:index] + calls[index + 1:])
            return call
    return None


def reading(sites: object) -> bool:
    """Whether this thread or task runs the forward of a module that may read ``sites``' adapted weights
    as attributes (`factnet.attach.readers`)."""
    return sites in _READING.get()


def start_reading(sites: object) -> Token:
    """A reader's forward on ``sites`` starts in this thread or task (`stop_reading` with the token as it ends)."""
    return _READING.set((*_READING.get(), sites))


def stop_reading(token: Token) -> None:
    _READING.reset(token)


class Traffic:
    """The calls running on one model: model forwards (``forwards``; ``reading_active``: those using the
    active adapter), open `use`/`per_sample` blocks (``blocks``) and the adapters they hold (``using``, by
    adapter object: a name may be taken again while a deleted adapter of that name is still in use).
    ``lock`` guards them and every change to the model's adapters; ``released`` is notified when a block
    lets an adapter go."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.released = threading.Condition(self.lock)
        self.forwards = 0
        self.reading_active = 0
        self.blocks = 0
        self.using: Counter[Adapter] = Counter()

    def check_quiet(self, owner: object, action: str, *, blocks: bool = False) -> None:
        """Raise `FactnetError` if ``action`` would change what a running call of another thread or task
        computes: a forward using the active adapter (``blocks``: any forward, and any open block)."""
        own = mine(owner)
        forwards = self.forwards if blocks else self.reading_active
        others = forwards - sum(1 for c in own if isinstance(c, Forward) and (blocks or c.reads_active))
        open_blocks = self.blocks - sum(1 for c in own if isinstance(c, Block) and c.counted) if blocks else 0
        if others > 0 or open_blocks > 0:
            running = f"{others} forward(s)" + (f" and {open_blocks} use()/per_sample() block(s)" if open_blocks else "")
            raise FactnetError(f"cannot {action} while {running} of other threads or tasks run on this model: it "
                               "would change what they compute. Serve with model.factnet.use(name) or "
                               "per_sample(names), which select adapters per call, and change the model between "
                               "requests")
