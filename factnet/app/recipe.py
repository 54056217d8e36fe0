"""The paper's training recipe: AdamW with a per-step cosine schedule after a linear warmup.

    recipe = Recipe()                                    # lr 1e-3, wd 1e-4, batch 64, 100 epochs
    optimizer, schedule = recipe.optimizer(adapter.trainable_parameters(), steps_per_epoch=len(loader))
    ...  optimizer.step(); schedule.step()                # once per batch

The learning rate rises linearly from ``warmup_lr`` towards ``lr`` over ``warmup_epochs``; from
then on it is the cosine from ``lr`` (epoch 0) down to ``min_lr`` (epoch ``epochs``). That is
timm's ``CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr,
lr_min=min_lr)`` of the authors' code, whose cosine counts from epoch 0, not from the warmup's
end; here it is stepped per batch rather than per epoch (equal at whole epochs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from factnet import FactnetError

__all__ = ["Recipe"]


@dataclass(frozen=True)
class Recipe:
    """Optimizer, schedule and regularization of one training run (defaults: the paper's VTAB-1K)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    epochs: int = 100
    warmup_epochs: int = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    dropout: float = 0.1  # in factor space
    drop_path: float = 0.1  # on the backbone's residual branches

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "batch_size": self.batch_size, "epochs": self.epochs}
        for name, value in positive.items():
            if not value > 0:
                raise FactnetError(f"recipe {name} must be > 0, got {value!r}")
        for name in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "drop_path"):
            if not getattr(self, name) >= 0:
                raise FactnetError(f"recipe {name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1 or not 0 <= self.drop_path < 1:
            raise FactnetError(f"recipe dropout and drop_path must be in [0, 1), got {self.dropout}, {self.drop_path}")
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise FactnetError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs}); "
                               "lower warmup_epochs (--warmup-epochs) or train for more epochs")

    def learning_rate(self, epoch: float) -> float:
        """The learning rate at fractional ``epoch`` (0 at the first step)."""
        warmup = min(self.warmup_epochs, self.epochs - 1) if self.epochs > 1 else 0
        if epoch < warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * epoch / warmup
        progress = min(1.0, epoch / self.epochs)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def optimizer(
        self, parameters: Iterable[nn.Parameter], steps_per_epoch: int
    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over ``parameters`` and its per-step schedule (call ``schedule.step()`` after
        each ``optimizer.step()``)."""
        if steps_per_epoch < 1:
            raise FactnetError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        optimizer = torch.optim.AdamW(list(parameters), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.learning_rate(step / steps_per_epoch) / self.lr)
        return optimizer, schedule

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FactnetError(f"unknown recipe fields {unknown}; known: {sorted(known)}")
        return replace(cls(), **values)
