"""One FacT run on the real model (EfficientNet-Lite0 on Fashion-MNIST, as `real_model.py`) at a given gain of the
default parametrization and learning rate: where does the default's gain stop being stable on a real model?

    pip install -e ".[bench]"; apt-get install dataset-fashion-mnist
    PYTHONPATH=. python benchmarks/real_model_gain.py --gain 2 --lr 0.01 --rank 8 --format tt

Seed 0, 32x32, 10 epochs, the protocol of `real_model.py`; prints one JSON line (validation and test accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model_methods as rm  # noqa: E402

import factnet.tensorizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gain", type=float, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--format", default="tt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = rm.load_splits(32)
    with mock.patch.object(factnet.tensorizer, "DEFAULT_GAIN", args.gain):  # decompose's default, this once
        info = rm.setup(args.format, rm.build_model(True, seed=0), args.rank, 0)
    start = time.perf_counter()
    out = rm.train(info["model"], info["params"], splits, args.lr, 10, 0)
    print(json.dumps({"format": args.format, "gain": args.gain, "lr": args.lr, "rank": args.rank,
                      "val": out["val"], "test": out["test"], "seconds": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
