"""The demo's data: scikit-learn's handwritten digits (8×8, 1,797 images, shipped with the package).

Pretraining sees only the images of digits 0–4; the downstream task is to tell apart the digits
5–9, on the other images. So the two tasks share no image and no class: the backbone has never
been asked to separate a 5 from an 8. Its features, shaped to separate 0–4, carry only part of
what the new classes need, so adapting the backbone pays (full fine-tuning beats a linear probe
on the frozen features by a wide margin, see `factnet.app.demo.bench_table`).

    pretraining  digits 0-4  ->  pretrain_train / pretrain_val (stratified, 90% / 10%)
    downstream   digits 5-9  ->  train (n per class) / val (n per class) / test (the rest)

Splits are drawn once from ``split_seed`` (stratified), independently of the training seed,
like VTAB's fixed splits. Labels of the downstream task are ``digit - 5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DataConfig", "Split", "Splits", "load_splits", "shift"]

# Pixel values are 0..16; scaled to [0, 1] then standardized with the pretraining set's
# mean and std (rounded: the background, 0, becomes -0.75).
_MEAN, _STD = 0.3, 0.4


@dataclass(frozen=True)
class DataConfig:
    """How the digits are split between pretraining and the downstream task."""

    pretrain_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    pretrain_val_fraction: float = 0.1
    train_per_class: int = 50
    val_per_class: int = 40
    split_seed: int = 0


@dataclass(frozen=True)
class Split:
    """Images ``x: (n, 1, 8, 8)`` (standardized), labels ``y: (n,)`` and ``index``, the rows of
    `sklearn.datasets.load_digits` they come from (to check that splits are disjoint)."""

    x: Tensor
    y: Tensor
    index: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    pretrain_train: Split
    pretrain_val: Split
    train: Split
    val: Split
    test: Split
    pretrain_classes: tuple[int, ...]  # digits of the pretraining task, label i is digit pretrain_classes[i]
    downstream_classes: tuple[int, ...]  # digits of the downstream task, likewise

    def all(self) -> dict[str, Split]:
        return {name: getattr(self, name) for name in ("pretrain_train", "pretrain_val", "train", "val", "test")}


def load_splits(config: DataConfig = DataConfig()) -> Splits:
    """The five disjoint splits of the digits (deterministic for a given ``config``)."""
    from sklearn.datasets import load_digits

    pixels, digits = load_digits(return_X_y=True)
    images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8).div_(16.0).sub_(_MEAN).div_(_STD)
    digits = torch.tensor(digits, dtype=torch.long)
    pre = tuple(sorted(config.pretrain_classes))
    down = tuple(d for d in range(10) if d not in pre)
    if not pre or not down:
        raise ValueError(f"pretrain_classes must be a proper subset of 0..9, got {config.pretrain_classes}")
    generator = torch.Generator().manual_seed(config.split_seed)
    parts: dict[str, list[Tensor]] = {name: [] for name in ("pretrain_train", "pretrain_val", "train", "val", "test")}
    for digit in range(10):
        rows = (digits == digit).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        if digit in pre:
            n_val = round(len(rows) * config.pretrain_val_fraction)
            parts["pretrain_val"].append(rows[:n_val])
            parts["pretrain_train"].append(rows[n_val:])
        else:
            n_train, n_val = config.train_per_class, config.val_per_class
            if n_train + n_val >= len(rows):
                raise ValueError(f"digit {digit} has {len(rows)} images: fewer than train_per_class + "
                                 f"val_per_class + 1 ({n_train} + {n_val} + 1)")
            parts["train"].append(rows[:n_train])
            parts["val"].append(rows[n_train:n_train + n_val])
            parts["test"].append(rows[n_train + n_val:])
    lookup = torch.full((10,), -1, dtype=torch.long)
    lookup[list(pre)] = torch.arange(len(pre))
    lookup[list(down)] = torch.arange(len(down))

    def split(rows: list[Tensor]) -> Split:
        index = torch.cat(rows).sort().values
        return Split(images[index], lookup[digits[index]], index)

    return Splits(**{name: split(rows) for name, rows in parts.items()}, pretrain_classes=pre,
                  downstream_classes=down)


def shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Augmentation: move each image by up to one pixel in each direction (background fill)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-_MEAN / _STD)
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    steps = torch.arange(x.shape[-1])
    rows, cols = dy[:, None] + steps, dx[:, None] + steps
    return padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].movedim(-1, 1)
