"""factnet's `vera` format at PEFT VeRA's learning rate (0.1) on the frontier's wide backbone and recipe.

    PYTHONPATH=. nice -n 10 python benchmarks/vera_lr.py               # every run not yet in the runs file
    PYTHONPATH=. python benchmarks/vera_lr.py --report                 # the table from the runs so far

`benchmarks/bytes_frontier.py` ran factnet's `vera` at FacT's lr 1e-2, where PEFT's VeRA scores the same
(about 70%); the frontier's validation chose lr 0.1 for PEFT's VeRA. This runs factnet's `vera` at 0.1:
the paper-style raw scale (``scale=1``, PEFT's own parametrization) and ``decompose``'s default (gain 1),
in full precision and trained at 2 and 4 bits; then, with the rank letter a diagonal letter (uncapped), `vera` and
`cp-seeded` at ranks 1024 and 4096, 1 and 2 bits. Runs are keyed as the frontier keys its runs and appended
to ``docs/bytes/vera_lr.jsonl``; a rerun skips finished ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from factnet.app.demo.backbone import pretrained_backbone
from factnet.app.demo.data import load_splits
from factnet.app.demo.frontier import _key, _worker
from factnet.app.demo.frontier_families import FrontierConfig
from factnet.app.demo.methods import Method

RUNS = Path("docs/bytes/vera_lr.jsonl")
LR = 0.1
# (format, rank, scale, gain, bits, seeds): seed 0 of each setting, seeds 1-2 of the two low-bit ones; then the
# diagonal letters' ranks above the matrix side (192), uncapped since a364838, and cp-seeded
PLAN = [("vera", 192, 1.0, None, None, (0,)), ("vera", 192, None, 1.0, None, (0,)), ("vera", 64, 1.0, None, None, (0,)),
        ("vera", 192, 1.0, None, 2, (0,)), ("vera", 192, None, 1.0, 4, (0, 1, 2)), ("vera", 64, None, 1.0, None, (0,)),
        ("vera", 192, None, 1.0, 2, (0, 1, 2)),
        ("vera", 1024, None, 1.0, 2, (0,)), ("cp-seeded", 1024, None, 1.0, 2, (0,)),
        ("vera", 192, None, 1.0, 1, (0,)), ("vera", 16, None, 1.0, 1, (0,)), ("vera", 1024, None, 1.0, 1, (0,)),
        ("vera", 4096, None, 1.0, 2, (0,)), ("vera", 192, None, 1.0, 2, (0,), 1e-2),
        ("cp-seeded", 1024, None, 1.0, 2, (0,), 1e-2), ("vera", 512, None, 1.0, 2, (0, 1, 2)),
        ("vera", 192, None, 1.0, 2, (0,), 0.3), ("tt-scaled", 8, None, 1.0, 2, (0,), 1e-2),
        ("cp-seeded", 4096, None, 1.0, 2, (0,))]  # (7th: its lr)


def _records() -> list[dict]:
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line] if RUNS.exists() else []


def run() -> None:
    config = FrontierConfig()
    demo = config.demo
    splits = load_splits(demo.pretrain.data)
    backbone = pretrained_backbone(demo.pretrain, progress=False, splits=splits)
    done = {r["key"] for r in _records()}
    for fmt, rank, scale, gain, bits, seeds, *lr in PLAN:
        method = Method("fact", lr[0] if lr else LR, fmt, rank, scale, gain=gain, bits=bits)
        for seed in seeds:
            key = _key(backbone, demo, method, seed)
            if key in done:
                continue
            start = time.time()
            result = _worker(backbone, method, splits, demo, seed)
            record = {"key": key, "method": repr(method), "format": fmt, "lr": method.lr, "rank": rank, "scale": scale, "gain": gain,
                      "bits": bits,
                      "seed": seed, "val": result.val_accuracy,
                      "test": result.test_accuracy, "params": result.params, "bytes": result.bytes,
                      "seconds": time.time() - start}
            print(json.dumps(record), flush=True)
            with open(RUNS, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def report() -> str:
    """A markdown table: one row per setting, seed-0 validation, test mean ± std over its seeds."""
    rows: dict[str, list[dict]] = {}
    for record in _records():
        rows.setdefault(record["method"], []).append(record)
    lines = ["| format | lr | rank | parametrization | bits | trained params | file bytes (no head) | val, seed 0 | test | seeds |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for records in rows.values():
        first = records[0]
        test = [r["test"] for r in records]
        spread = f" ± {statistics.stdev(test):.1f}" if len(test) > 1 else ""
        seed0 = next((r["val"] for r in records if r["seed"] == 0), float("nan"))
        how = f"scale {first['scale']:g} (PEFT's)" if first["scale"] is not None else f"default, gain {first['gain']:g}"
        lines.append(f"| {first.get('format', 'vera')} | {first.get('lr', LR):g} | {first['rank']} | {how} | {first['bits'] or 32} | {first['params']:,} | {first['bytes']:,} | "
                     f"{seed0:.1f} | {statistics.mean(test):.1f}{spread} | {len(test)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="print the table of the runs so far (no training)")
    args = parser.parse_args()
    if not args.report:
        run()
    print(report())
