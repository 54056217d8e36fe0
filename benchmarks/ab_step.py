"""Old code against new in one process: the train step of an older checkout, this one and the floor.

    git archive 849bfda | tar -x -C /tmp/before          # any older checkout of factnet
    python benchmarks/ab_step.py --old /tmp/before --size vit_s --batch 8 [--format tt] [--dropout 0]
    python benchmarks/ab_step.py --old /tmp/before --size demo --batch 1 --inference

The older checkout's ``factnet`` package is copied to a temporary directory as ``factnet_old`` (its
imports renamed) so both load side by side; floor, old and new then run interleaved in the same
rounds (`step_time.interleaved`), which a machine whose speed drifts between two runs cannot skew.
Prints each one's step over the floor and new over old, as medians of per-round ratios with quartiles.
With ``--inference``, an eval-mode no-grad forward of an unmerged adapter instead (old and new), over
the same adapter merged (new): the floor of an adapted model's inference.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import SIZES, interleaved, make_variant, ratio, spread

import factnet


def load_old(checkout: Path, into: Path):
    """The checkout's ``factnet`` package, importable as ``factnet_old``."""
    target = into / "factnet_old"
    shutil.copytree(checkout / "factnet", target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bfrom factnet\b", "from factnet_old", text)
        text = re.sub(r"\bimport factnet\b", "import factnet_old", text)
        path.write_text(re.sub(r"\bfactnet\.(?=[a-z_])", "factnet_old.", text))
    sys.path.insert(0, str(into))
    return importlib.import_module("factnet_old")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="an older checkout (its factnet/ package is used)")
    parser.add_argument("--size", default="vit_s", choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--format", default="tt")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--inference", action="store_true", help="eval, no-grad forward of an unmerged adapter")
    args = parser.parse_args()
    old = load_old(args.old, Path(tempfile.mkdtemp()))
    build, shape = SIZES[args.size]
    torch.manual_seed(0)
    base = build()
    x = torch.randn(args.batch, *shape)

    if args.inference:
        steps = {"floor": _inference(base, x, args.format, factnet, merge=True),
                 "old": _inference(base, x, args.format, old), "new": _inference(base, x, args.format, factnet)}
    else:
        kind = f"fact:{args.format}:{args.dropout}:auto"
        steps = {"floor": make_variant(base, "floor", x)[0], "old": make_variant(base, kind, x, old)[0],
                 "new": make_variant(base, kind, x, factnet)[0]}
    times = interleaved(steps, args.warmup, args.reps)
    what = "inference (floor: merged)" if args.inference else f"dropout {args.dropout}"
    print(f"{args.size}, batch {args.batch}, {args.format} r8, {what}, {args.reps} rounds, "
          f"floor {statistics.median(times['floor']) * 1e3:.1f} ms")
    for name, reference in (("old", "floor"), ("new", "floor"), ("new", "old")):
        low, high = spread(times, name, reference)
        print(f"  {name} / {reference}: {ratio(times, name, reference):.3f} (quartiles {low:.3f}-{high:.3f})")


def _inference(base: torch.nn.Module, x: torch.Tensor, fmt: str, library: ModuleType,
               merge: bool = False) -> Callable[[], None]:
    """An eval-mode, no-grad forward of a copy of ``base`` with a random adapter of ``library``'s."""
    model = copy.deepcopy(base).eval()
    adapter = library.Tensorizer(model).decompose(fmt, rank=8, scale=10.0, seed=0, train_head=False)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.02)
    if merge:
        adapter.merge()

    def forward() -> None:
        with torch.no_grad():
            model(x)
    return forward


if __name__ == "__main__":
    main()
