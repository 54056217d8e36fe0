"""Accuracy of the embedded demo's adapter stored in float32 against bfloat16 (``save(..., dtype=torch.bfloat16)``).

    python benchmarks/bf16_accuracy.py [--seeds 3] [--format tt]

Per seed: `factnet.app.demo`'s default run (its backbone pretrained on the digits 0-4, cached; FacT adapted to the
digits 5-9 with the demo's default rank, scale and recipe), then the adapter saved twice (factors and head,
float32 and bfloat16), each file loaded onto a fresh downstream model, and test accuracy (the held-out
split), the predictions that differ and the largest logit difference measured. CPU; about 20 s a seed with
the backbone cached.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import factnet
from factnet.app.demo import DEFAULTS, DemoConfig
from factnet.app.demo.backbone import pretrained_backbone
from factnet.app.demo.data import load_splits
from factnet.app.demo.methods import Method, adapt, downstream_model
from factnet.app.demo.train import evaluate, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    parser.add_argument("--format", default="tt", help="FacT format (default tt, the demo's)")
    args = parser.parse_args()
    config = DemoConfig()
    rank, scale = DEFAULTS.get(args.format, (4, 10.0))
    rows = []
    with threads(config.threads), tempfile.TemporaryDirectory() as temp:
        splits = load_splits(config.pretrain.data)
        backbone = pretrained_backbone(config.pretrain, progress=False, splits=splits)
        classes = len(splits.downstream_classes)
        for seed in range(args.seeds):
            method = Method("fact", config.lr, args.format, rank, float(scale))
            result, _, adapter = adapt(backbone, method, splits, config.recipe(), seed=seed,
                                       augment=config.augment, progress=False)
            logits, accuracy, size = {}, {}, {}
            for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
                path = Path(temp) / f"{seed}-{name}.safetensors"
                adapter.save(path, dtype=dtype)
                size[name] = path.stat().st_size
                fresh = downstream_model(backbone, classes, 0.0).eval()
                factnet.load(fresh, path)
                accuracy[name] = evaluate(fresh, splits.test)
                with torch.no_grad():
                    logits[name] = fresh(splits.test.x)
            differ = int((logits["float32"].argmax(-1) != logits["bfloat16"].argmax(-1)).sum())
            gap = float((logits["float32"] - logits["bfloat16"]).abs().max())
            rows.append((seed, result.test_accuracy, accuracy["float32"], accuracy["bfloat16"], differ,
                         len(splits.test.y), gap, size["float32"], size["bfloat16"]))
    print(f"factnet.app.demo, FacT ({args.format}) rank {rank}, scale {scale:g}, factors and head saved; "
          f"test split of {rows[0][5]} images\n")
    print("| seed | trained model test acc. (%) | float32 file (%) | bfloat16 file (%) | predictions that differ | "
          "max logit difference | float32 bytes | bfloat16 bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, trained, fp32, bf16, differ, total, gap, fp32_bytes, bf16_bytes in rows:
        print(f"| {seed} | {trained:.2f} | {fp32:.2f} | {bf16:.2f} | {differ} / {total} | {gap:.4f} | "
              f"{fp32_bytes:,} | {bf16_bytes:,} |")
    if len(rows) > 1:
        print(f"| mean | {statistics.mean(r[1] for r in rows):.2f} | {statistics.mean(r[2] for r in rows):.2f} | "
              f"{statistics.mean(r[3] for r in rows):.2f} | | | | |")


if __name__ == "__main__":
    main()
