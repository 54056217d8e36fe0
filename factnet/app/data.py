"""Image classification data in two layouts, split for selection or for the final run.

VTAB-1K (the paper's): ``root/{train800,val200,train800val200,test}.txt``, each line
``relative/image/path label`` (paths relative to ``root``, labels from 0). ImageFolder:
``root/train/<class>/...``, optionally ``root/val/<class>/...``, and ``root/test/<class>/...``,
classes named by ``train``'s subfolders in sorted order.

A run trains on one split and evaluates on another, never selecting on test:

* ``"train800"``: train on train800 (folder: ``train``), evaluate on val200 (``val``);
* ``"train800val200"``: the final run: train on train800val200 (``train`` + ``val``), evaluate on test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from factnet import FactnetError

__all__ = ["SPLITS", "ImageDataset", "Task", "image_transform", "load_task", "make_loader"]

SPLITS = {"train800": "val200", "train800val200": "test"}  # train split -> its evaluation split
VTAB_FILES = ("train800", "val200", "train800val200", "test")
_FOLDER_PARTS = {"train800": (("train",), "val"), "train800val200": (("train", "val"), "test")}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

Sample = tuple[Path, int]


@dataclass(frozen=True)
class Task:
    """Samples to train and evaluate on: ``train`` and ``evaluation`` are ``(image path, label)``."""

    root: Path
    layout: str  # "vtab1k" or "folder"
    split: str  # "train800" or "train800val200"
    train: tuple[Sample, ...]
    evaluation: tuple[Sample, ...]
    num_classes: int

    @property
    def evaluation_split(self) -> str:
        """``"val200"`` or ``"test"``."""
        return SPLITS[self.split]


class ImageDataset(Dataset):
    """``(image: (3, H, W) float tensor, label)`` pairs from image files, read as RGB."""

    def __init__(self, samples: Sequence[Sample], transform: nn.Module | transforms.Compose) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                pixels = image.convert("RGB")
        except OSError as error:
            raise FactnetError(f"cannot read image {path}: {error}; fix or remove it from the split") from error
        return self.transform(pixels), label


def load_task(root: str | Path, split: str = "train800", classes: int | None = None) -> Task:
    """The samples of ``split`` (see the module docstring) under ``root``, in either layout.

    ``classes`` (e.g. from a preset) fixes the class count; a label outside it is an error.
    Every listed image must exist.
    """
    root = Path(root)
    if split not in SPLITS:
        raise FactnetError(f"unknown split {split!r}; use train800 (evaluate on val200) or train800val200 "
                           "(the final run, evaluated on test)")
    if not root.is_dir():
        raise FactnetError(f"data directory {root} does not exist; pass --data a VTAB-1K task folder "
                           "(with train800.txt, ...) or an ImageFolder tree (train/<class>/...)")
    if any((root / f"{name}.txt").exists() for name in VTAB_FILES):
        task = _vtab_task(root, split)
    elif (root / "train").is_dir():
        task = _folder_task(root, split)
    else:
        raise FactnetError(f"{root} is neither a VTAB-1K task folder (train800.txt, val200.txt, train800val200.txt, "
                           "test.txt) nor an ImageFolder tree (train/<class>/..., val/<class>/..., test/<class>/...)")
    if classes is not None:
        if task.num_classes > classes:
            raise FactnetError(f"{root} has labels up to {task.num_classes - 1}, but the preset expects {classes} "
                               "classes; check that --data and --preset name the same task")
        task = Task(task.root, task.layout, task.split, task.train, task.evaluation, classes)
    for samples in (task.train, task.evaluation):
        missing = [path for path, _ in samples if not path.is_file()]
        if missing:
            raise FactnetError(f"{len(missing)} listed image(s) of {root} do not exist, e.g. {missing[0]}; "
                               "image paths in the split files are relative to the data directory")
    return task


def _vtab_task(root: Path, split: str) -> Task:
    needed = (split, SPLITS[split])
    for name in needed:
        if not (root / f"{name}.txt").is_file():
            raise FactnetError(f"{root} lacks {name}.txt, needed for --split {split} (a VTAB-1K task folder holds "
                               "train800.txt, val200.txt, train800val200.txt and test.txt)")
    lists = {name: _read_list(root, root / f"{name}.txt") for name in VTAB_FILES if (root / f"{name}.txt").is_file()}
    for name in needed:
        if not lists[name]:
            raise FactnetError(f"{root / f'{name}.txt'} lists no images; each line is 'relative/image/path label'")
    num_classes = 1 + max(label for samples in lists.values() for _, label in samples)
    return Task(root, "vtab1k", split, tuple(lists[split]), tuple(lists[SPLITS[split]]), num_classes)


def _read_list(root: Path, list_file: Path) -> list[Sample]:
    samples = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path or not label.isdigit():
            raise FactnetError(f"{list_file}:{number}: expected 'relative/image/path label' with an integer "
                               f"label >= 0, got {line.strip()!r}")
        samples.append((root / path, int(label)))
    return samples


def _folder_task(root: Path, split: str) -> Task:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise FactnetError(f"{root / 'train'} has no class subfolders; an ImageFolder tree is train/<class>/<image>")
    train_parts, evaluation_part = _FOLDER_PARTS[split]
    present = [part for part in train_parts if (root / part).is_dir()]
    if not (root / evaluation_part).is_dir():
        other = "--split train800val200 (train on train/ + val/, evaluate on test/)" if split == "train800" else \
            "a test/ folder"
        raise FactnetError(f"{root} has no {evaluation_part}/ folder to evaluate --split {split} on; add one, "
                           f"or use {other}")
    train = [sample for part in present for sample in _folder_samples(root / part, classes)]
    return Task(root, "folder", split, tuple(train), tuple(_folder_samples(root / evaluation_part, classes)),
                len(classes))


def _folder_samples(folder: Path, classes: list[str]) -> list[Sample]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise FactnetError(f"{folder} has classes {unknown} that train/ lacks; every class needs training images")
    samples = [(path, label) for label, name in enumerate(classes) if (folder / name).is_dir()
               for path in sorted((folder / name).rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise FactnetError(f"{folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return samples


def image_transform(model: nn.Module) -> transforms.Compose:
    """Resize to the model's input size and normalize with its mean and std (timm's data config).

    The input size is the model's own where it has one (``patch_embed.img_size`` of timm's ViT
    and Swin, which may differ from the pretrained config), else the config's.
    """
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or config["input_size"][1:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = transforms.InterpolationMode(config.get("interpolation", "bicubic"))
    return transforms.Compose([
        transforms.Resize(size, interpolation=interpolation),
        transforms.ToTensor(),
        transforms.Normalize(config["mean"], config["std"]),
    ])


def make_loader(samples: Sequence[Sample], transform: transforms.Compose, batch_size: int, *, shuffle: bool,
                workers: int = 0) -> DataLoader:
    """Batches ``(images: (B, 3, H, W), labels: (B,))``; shuffled from torch's global RNG, so
    seeding (and the resume checkpoint's saved RNG state) makes the order reproducible."""
    return DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
