"""One training loop for every method of the demo: the recipe's AdamW and per-step warmup+cosine."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factnet.app.demo.data import Split, shift
from factnet.app.recipe import Recipe

__all__ = ["Fitted", "evaluate", "fit", "threads"]


@dataclass(frozen=True)
class Fitted:
    """What a training run measured: the median step and the mean training loss of each epoch."""

    step_ms: float
    epoch_losses: tuple[float, ...]


def fit(model: nn.Module, parameters: list[nn.Parameter], split: Split, recipe: Recipe, *, seed: int,
        augment: bool = True, progress: bool = True, desc: str = "training", leave: bool = False) -> Fitted:
    """Train ``parameters`` of ``model`` on ``split`` for ``recipe.epochs``; the median step (ms) and
    the epochs' mean losses.

    A step is forward, backward, optimizer and schedule step of one batch (the batch's
    augmentation is drawn before the clock starts). Batches are drawn from ``seed``.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    size = recipe.batch_size
    steps_per_epoch = -(-len(split) // size)
    optimizer, schedule = recipe.optimizer(parameters, steps_per_epoch)
    times: list[float] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(recipe.epochs), desc=desc, disable=not progress, leave=leave, unit="epoch")
    for _ in bar:
        order = torch.randperm(len(split), generator=generator)
        total = 0.0
        for start in range(0, len(split), size):
            rows = order[start:start + size]
            x = shift(split.x[rows], generator) if augment else split.x[rows]
            began = time.perf_counter()
            loss = F.cross_entropy(model(x), split.y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            times.append(time.perf_counter() - began)
            total += loss.item() * len(rows)
        losses.append(total / len(split))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return Fitted(1000 * statistics.median(times), tuple(losses))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy on ``split``, in percent (eval mode: no dropout, no drop-path)."""
    was_training = model.training
    model.eval()
    try:
        return 100.0 * (model(split.x).argmax(-1) == split.y).float().mean().item()
    finally:
        model.train(was_training)


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch threads (None: leave as is), restored afterwards.

    The demo's matrices are 64 wide: threading costs more than it gains, and on a busy
    machine two threads waiting on each other were five times slower than one."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
