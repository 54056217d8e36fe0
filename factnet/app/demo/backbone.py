"""The demo's backbone: a small timm ViT pretrained on digits 0–4, cached on disk.

The pretrained weights live in ``$FACTNET_CACHE`` (default ``~/.cache/factnet``) as
``demo-vit-<key>.safetensors``, where ``key`` hashes the `PretrainConfig` (architecture,
data split and recipe) and a cache version. The file is written atomically (a temporary file
in the same directory, fsynced, renamed over the target) and holds a SHA-256 of its tensors;
a file that does not load, does not match its key or fails the checksum is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from factnet.app.demo.data import DataConfig, Splits, load_splits

__all__ = ["Backbone", "PretrainConfig", "build_vit", "cache_dir", "pretrained_backbone"]

CACHE_VERSION = 1
PRETRAIN_RUNS = 0  # how many times this process pretrained a backbone (the tests read it)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained backbone (and so its cache key)."""

    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    patch_size: int = 2
    mlp_ratio: float = 4.0
    epochs: int = 100
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 32
    augment: bool = True  # shift by up to a pixel
    drop_path: float = 0.0
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)

    def key(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Backbone:
    """Pretrained weights (without the head) and how they were obtained."""

    state: dict[str, Tensor]
    config: PretrainConfig
    path: Path
    cached: bool  # loaded from the cache (False: pretrained by this call)
    val_accuracy: float  # on pretrain_val (digits 0-4), measured when it was pretrained
    seconds: float  # pretraining time when it was pretrained


def build_vit(config: PretrainConfig, num_classes: int, drop_path: float = 0.0) -> nn.Module:
    """The demo's ViT: 8×8 one-channel images in ``patch_size`` patches (16 tokens plus the class token)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=config.patch_size, in_chans=1, num_classes=num_classes,
                             embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
                             mlp_ratio=config.mlp_ratio, drop_path_rate=drop_path)


def cache_dir() -> Path:
    return Path(os.environ.get("FACTNET_CACHE") or Path.home() / ".cache" / "factnet")


def pretrained_backbone(config: PretrainConfig = PretrainConfig(), *, progress: bool = True,
                        splits: Splits | None = None) -> Backbone:
    """The backbone pretrained with ``config``: from the cache, or pretrained now and cached."""
    path = cache_dir() / f"demo-vit-{config.key()}.safetensors"
    if path.exists():
        loaded = _load(path, config)
        if loaded is not None:
            return loaded
        warnings.warn(f"the cached backbone {path} is corrupt or stale; pretraining it again", stacklevel=2)
    splits = splits if splits is not None else load_splits(config.data)
    start = time.perf_counter()
    model, val_accuracy = _pretrain(config, splits, progress)
    seconds = time.perf_counter() - start
    state = {name: value.detach().contiguous() for name, value in model.state_dict().items()
             if not name.startswith("head.")}
    metadata = {"config": json.dumps(asdict(config), sort_keys=True), "key": config.key(),
                "sha256": _checksum(state), "val_accuracy": repr(val_accuracy), "seconds": repr(seconds)}
    _write_atomically(path, state, metadata)
    return Backbone(state, config, path, False, val_accuracy, seconds)


def _pretrain(config: PretrainConfig, splits: Splits, progress: bool) -> tuple[nn.Module, float]:
    global PRETRAIN_RUNS
    PRETRAIN_RUNS += 1
    from factnet.app.demo.train import evaluate, fit
    from factnet.app.recipe import Recipe

    recipe = Recipe(lr=config.lr, weight_decay=config.weight_decay, batch_size=config.batch_size,
                    epochs=config.epochs, warmup_epochs=max(1, config.epochs // 10) if config.epochs > 1 else 0,
                    dropout=0.0, drop_path=0.0)
    with torch.random.fork_rng(devices=[]):  # init and drop-path from the seed; the caller's RNG untouched
        torch.manual_seed(config.seed)
        model = build_vit(config, num_classes=len(splits.pretrain_classes), drop_path=config.drop_path)
        fit(model, list(model.parameters()), splits.pretrain_train, recipe, seed=config.seed,
            augment=config.augment, progress=progress,
            desc=f"pretraining the ViT on digits {','.join(map(str, splits.pretrain_classes))}", leave=True)
    return model, evaluate(model, splits.pretrain_val)


def _checksum(state: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(str(tuple(state[name].shape)).encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load(path: Path, config: PretrainConfig) -> Backbone | None:
    """The cached backbone, or None when the file is unreadable, for another key or corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        if metadata.get("key") != config.key() or metadata.get("sha256") != _checksum(state):
            return None
        return Backbone(state, config, path, True, float(metadata["val_accuracy"]), float(metadata["seconds"]))
    except Exception:  # noqa: BLE001 - any failure to read the cache means: rebuild it
        return None


def _write_atomically(path: Path, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        save_file(state, str(temp), metadata=metadata)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
