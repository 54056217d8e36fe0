"""Per-call state: what one thread's or asyncio task's forwards run with, and who is running now.

Forwards on one model may run at the same time (a thread pool serving requests; asyncio tasks handing
work to threads, which copies their context). What a call decides for itself lives in a `Call` in a
context variable, where no other thread or task can see it: the adapters its block selected
(`AdapterSet.use`, `per_sample`), whether `disable` is on, and, while a model forward runs, the
increments it looked up and its first-forward guard. What calls share (the model, its adapters, the
active adapter) changes only under `Traffic`'s lock, and never under a running call that would see it
half-done: changes that would are refused while such calls run (`Traffic.check_quiet`), and deleting an
adapter waits for the blocks using it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from factnet.errors import FactnetError

__all__ = ["Call", "Traffic", "current", "entered"]


class Call:
    """One block's or one model forward's choices on the model ``owner`` (an `AdapterSet`).

    ``mix``: the adapters per sample (`factnet.mixing.Mix`), None to use the active adapter;
    ``disabled``: the base model (`AdapterSet.disable`); ``block``: a `use`/`per_sample` block (counted
    in `Traffic.blocks`). A forward's call (``forward``) also holds the
    increments it looked up (``now``: ``(grad mode, {matrix: increments})``), its first-forward guard
    (``watch``), and whether it reads the active adapter (``reads_active``).
    """

    __slots__ = ("owner", "mix", "disabled", "forward", "block", "reads_active", "now", "watch")

    def __init__(self, owner: object, mix: Any = None, disabled: bool = False, forward: bool = False,
                 block: bool = False) -> None:
        self.owner, self.mix, self.disabled, self.forward, self.block = owner, mix, disabled, forward, block
        self.reads_active = forward and mix is None and not disabled
        self.now: tuple[bool, dict[str, list]] | None = None
        self.watch: Any = None


_CALLS: ContextVar[tuple[Call, ...]] = ContextVar("factnet_calls", default=())


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
def entered(call: Call) -> Iterator[Call]:
    """Inside the block, ``call`` is this thread's or task's innermost call on its owner."""
    token = _CALLS.set((*_CALLS.get(), call))
    try:
        yield call
    finally:
        _CALLS.reset(token)


def push(call: Call) -> None:
    """Make ``call`` the innermost (a model forward's pre-hook; `pop_forward` in its post-hook)."""
    _CALLS.set((*_CALLS.get(), call))


def pop_forward(owner: object) -> Call | None:
    """Take back the innermost forward call on ``owner`` pushed in this thread or task (None if there is
    none: the forward started before the hooks were in)."""
    calls = _CALLS.get()
    for index in range(len(calls) - 1, -1, -1):
        if calls[index].owner is owner and calls[index].forward:
            _CALLS.set(calls[:index] + calls[index + 1:])
            return calls[index]
    return None


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
        self.using: Counter[Any] = Counter()

    def check_quiet(self, owner: object, action: str, *, blocks: bool = False) -> None:
        """Raise `FactnetError` if ``action`` would change what a running call of another thread or task
        computes: a forward using the active adapter (``blocks``: any forward, and any open block)."""
        own = mine(owner)
        forwards = self.forwards if blocks else self.reading_active
        others = forwards - sum(1 for c in own if c.forward and (blocks or c.reads_active))
        open_blocks = self.blocks - sum(1 for c in own if c.block) if blocks else 0
        if others > 0 or open_blocks > 0:
            running = f"{others} forward(s)" + (f" and {open_blocks} use()/per_sample() block(s)" if open_blocks else "")
            raise FactnetError(f"cannot {action} while {running} of other threads or tasks run on this model: it "
                               "would change what they compute. Serve with model.factnet.use(name) or "
                               "per_sample(names), which select adapters per call, and change the model between "
                               "requests")
