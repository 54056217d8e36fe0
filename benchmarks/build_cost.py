"""What a train step spends building its increments: the normal forms, the cut and the fold, forward and backward.

    python benchmarks/build_cost.py [--size demo] [--format tt] [--reps 300]

Each rep drops the cached normal forms and increments of a FacT r8 adapter (as a step's new factors do),
builds every matrix's increments as a forward does (`Adapter.all_increments`), and runs the backward
through them alone (a ones gradient into each); prints the medians and the autograd nodes the build makes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import SIZES

import factnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="demo", choices=list(SIZES))
    parser.add_argument("--format", default="tt")
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    build, _ = SIZES[args.size]
    torch.manual_seed(0)
    model = build().train()
    adapter = factnet.Tensorizer(model).decompose(args.format, rank=8, scale=10.0, train_head=False)
    weights = [model.factnet._parameter(name) for name in adapter.matrices]
    forward, backward = [], []
    for _ in range(args.reps):
        for group in adapter.groups.values():
            group._cache.clear()
        start = time.perf_counter()
        increments = adapter.all_increments(weights)
        middle = time.perf_counter()
        outputs = list({id(t): t for found in increments.values() for inc in found for t in inc.tensors()
                        if t is not None and t.grad_fn is not None}.values())
        gradients = [torch.ones_like(t) for t in outputs]
        before_backward = time.perf_counter()
        torch.autograd.backward(outputs, gradients)
        forward.append(middle - start)
        backward.append(time.perf_counter() - before_backward)
    nodes: set = set()
    pending = [t.grad_fn for t in outputs]
    while pending:
        node = pending.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            pending += [n for n, _ in node.next_functions]
    kinds = Counter(type(n).__name__ for n in nodes).most_common()
    print(f"{args.size}, FacT-{args.format} r8, {len(adapter.matrices)} matrices, {len(adapter.groups)} group(s): "
          f"build {statistics.median(forward) * 1e6:.0f} us, backward {statistics.median(backward) * 1e6:.0f} us "
          f"(medians of {args.reps}); {len(nodes)} autograd nodes: " + ", ".join(f"{k} {c}" for k, c in kinds))


if __name__ == "__main__":
    main()
