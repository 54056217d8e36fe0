"""A complete FacT example that runs on a laptop CPU with nothing to download.

    import factnet.app.demo
    metrics = factnet.app.demo.run(Path("out"))        # pretrain (once, cached), adapt with FacT-TT, save
    print(factnet.app.demo.bench_table())              # miniature Table 1: linear probe, full FT, LoRA, FacT

A small timm ViT (8×8 images, 2×2 patches, width 64, depth 4) is pretrained on the digits 0–4
of scikit-learn's digits dataset and cached (see `factnet.app.demo.backbone`); FacT then adapts
it to telling apart the digits 5–9, on other images (see `factnet.app.demo.data`). Every
configuration lives in `DemoConfig` (tests use small ones). Cold (pretraining included) a run
takes about a minute on one CPU core; with the backbone cached, about 20 s.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from factnet import write_atomically
from factnet.app.demo.backbone import PretrainConfig, pretrained_backbone
from factnet.app.demo.config import DemoConfig
from factnet.app.demo.data import DataConfig, load_splits
from factnet.app.demo.methods import Method, adapt
from factnet.app.demo.train import threads

__all__ = ["ADAPTER_FILE", "DEFAULTS", "METRICS_FILE", "DataConfig", "DemoConfig", "PretrainConfig", "bench_table",
           "run", "summary"]

ADAPTER_FILE, METRICS_FILE = "adapter.safetensors", "metrics.json"

# Rank and scale of run() when not given. tt and tucker: the choice of bench_table's validation
# sweep (within a tenth of LoRA's parameters); other formats: a middle setting, not tuned.
DEFAULTS: dict[str, tuple[int, float]] = {"tt": (3, 10.0), "tucker": (4, 10.0)}
_OTHER = (4, 10.0)


def run(out_dir: Path, *, format: str = "tt", rank: int | None = None, scale: float | None = None, seed: int = 0,
        progress: bool = True, config: DemoConfig | None = None, bits: int | None = None) -> dict[str, float]:
    """Pretrain (or load the cached) backbone, adapt it with FacT in ``format`` to the digits 5–9,
    write ``adapter.safetensors`` (factors and head; the factors trained and stored in ``bits`` bits if
    given) and ``metrics.json`` to ``out_dir``; the metrics.

    Accuracies are in percent: ``test_accuracy`` on the held-out test split (never used to
    choose anything), ``val_accuracy`` on the validation split.
    """
    config = config or DemoConfig()
    default_rank, default_scale = DEFAULTS.get(format, _OTHER)
    rank = default_rank if rank is None else rank
    scale = default_scale if scale is None else scale
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with threads(config.threads):
        splits = load_splits(config.pretrain.data)
        backbone = pretrained_backbone(config.pretrain, progress=progress, splits=splits)
        method = Method("fact", config.lr, format, rank, float(scale), bits=bits)
        path = out_dir / ADAPTER_FILE
        result, _, _ = adapt(backbone, method, splits, config.recipe(), seed=seed, augment=config.augment,
                             progress=progress, leave=True, save_to=path)
    metrics = {
        "rank": float(rank),
        "scale": float(scale),
        "test_accuracy": result.test_accuracy,
        "val_accuracy": result.val_accuracy,
        "params": float(result.params),
        "head_params": float(result.head_params),
        "bytes": float(path.stat().st_size),
        "bytes_without_head": float(result.bytes),
        "first_epoch_loss": result.epoch_losses[0],
        "last_epoch_loss": result.epoch_losses[-1],
        "step_ms": result.step_ms,
        "adapt_seconds": result.seconds,
        "pretrain_seconds": 0.0 if backbone.cached else backbone.seconds,
        "backbone_cached": float(backbone.cached),
        "pretrain_val_accuracy": backbone.val_accuracy,
        "seconds": time.perf_counter() - start,
    }
    record = {"task": "digits 5-9 (sklearn load_digits), backbone pretrained on digits 0-4",
              "format": format, "rank": rank, "scale": scale, "seed": seed, "adapter": str(path),
              "backbone": str(backbone.path), "config": asdict(config), "metrics": metrics}
    text = json.dumps(record, indent=2) + "\n"
    write_atomically(str(out_dir / METRICS_FILE), lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return metrics


def summary(metrics: dict[str, float], out_dir: Path, format: str) -> str:
    """What `run` did, in a few sentences for a person (the numbers are in ``metrics.json``)."""
    name = {"tt": "FacT-TT", "tucker": "FacT-TK"}.get(format, f"FacT ({format})")
    out_dir = Path(out_dir)
    pretrained = ("loaded the cached backbone" if metrics["backbone_cached"]
                  else f"pretrained the backbone in {metrics['pretrain_seconds']:.0f} s (cached for next time)")
    return (
        f"Adapted a small ViT, pretrained on the digits 0-4, to telling apart the digits 5-9 with {name} "
        f"(rank {int(metrics['rank'])}, scale {metrics['scale']:g}): {metrics['test_accuracy']:.1f}% test accuracy "
        f"({metrics['val_accuracy']:.1f}% on validation).\n"
        f"It trained {int(metrics['params']):,} factor parameters and a new {int(metrics['head_params']):,}-parameter "
        f"head; the adapter file is {int(metrics['bytes']):,} bytes ({int(metrics['bytes_without_head']):,} without "
        f"the head). It {pretrained} and took {metrics['seconds']:.0f} s in all.\n"
        f"Wrote {out_dir / ADAPTER_FILE} and {out_dir / METRICS_FILE}.\n"
        "Next: `factnet bench-table` compares it with linear probing, full fine-tuning and LoRA; "
        "`factnet train --data DIR --model M --checkpoint FILE` adapts your own model to your data."
    )


def bench_table(seeds: int = 3, progress: bool = True, config: DemoConfig | None = None) -> str:
    """The miniature Table 1 as markdown (see `factnet.app.demo.table`)."""
    from factnet.app.demo.table import bench_table as build

    return build(seeds=seeds, progress=progress, config=config or DemoConfig())
