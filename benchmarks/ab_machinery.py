"""Two source trees' adapter machinery against each other: a train step and a mixed batch, A/B in one run.

    python benchmarks/ab_machinery.py --a /work/main --b . [--rounds 9] [--steps 5] [--batch 16]

Each tree's ``factnet`` runs in its own subprocess (one torch thread; ``PYTHONPATH`` the tree), built once:
a small timm ViT (``vit_tiny_patch16_224`` at 64x64 inputs, random weights, nothing downloaded) with
(1) FacT-TT r8 trained, a step being forward, cross-entropy, backward and AdamW step; and (2) four random
FacT-TT r8 adapters serving a mixed batch (``model.factnet.per_sample``, each adapter on a quarter of the
samples), an eval-mode no-grad forward. The workers then run in interleaved rounds (``--steps`` of a job
per worker per round, the order of A and B alternating), so a machine whose speed drifts during the run
(shared, throttled) moves both alike (as `step_time.interleaved`). Prints each job's median ms per step
for A and B and the ratio B/A: the median over rounds of the ratio within a round, with its quartiles.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

JOBS = ("train", "mixed")
ADAPTERS = ("a", "b", "c", "d")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, help="the first source tree (its factnet/ package is used)")
    parser.add_argument("--b", type=Path, help="the second source tree")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5, help="steps of a job per worker per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (the kernel's autotuning)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--worker", choices=JOBS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return work(args.worker, args.batch, args.steps, args.warmup)
    if args.a is None or args.b is None:
        parser.error("--a and --b (the two source trees) are required")
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    print(f"A = {trees['A']}\nB = {trees['B']}\nbatch {args.batch}, {args.rounds} rounds of {args.steps} steps, "
          "1 torch thread per worker")
    for job in JOBS:
        times = interleaved(job, trees, args)
        a, b = (statistics.median(times[k]) * 1e3 for k in ("A", "B"))
        ratios = [y / x for x, y in zip(times["A"], times["B"])]
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"{job:>6}: A {a:.2f} ms, B {b:.2f} ms, B/A {statistics.median(ratios):.3f} "
              f"(quartiles {low:.3f}-{high:.3f})")


def interleaved(job: str, trees: dict[str, Path], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step of ``job`` in each tree's worker, one value per round, the order alternating."""
    workers = {name: _start(job, tree, args) for name, tree in trees.items()}
    times: dict[str, list[float]] = {name: [] for name in trees}
    try:
        for name, worker in workers.items():
            ready = json.loads(worker.stdout.readline())
            print(f"  {job} {name}: factnet from {ready['factnet']}")
        names = list(workers)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                worker = workers[name]
                worker.stdin.write("go\n")
                worker.stdin.flush()
                times[name].append(float(worker.stdout.readline()))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return times


def _start(job: str, tree: Path, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return subprocess.Popen(command, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def work(job: str, batch: int, steps: int, warmup: int) -> None:
    """A worker: build ``job`` with the ``factnet`` on ``PYTHONPATH``, say so, then time ``steps`` steps for
    each ``go`` read from stdin (seconds per step, one line each)."""
    import factnet
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    step = _train_step(factnet, batch) if job == "train" else _mixed_forward(factnet, batch)
    for _ in range(warmup):
        step()
    print(json.dumps({"factnet": str(Path(factnet.__file__).parent)}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        print((time.perf_counter() - start) / steps, flush=True)


def _vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)


def _train_step(factnet, batch: int):
    """Forward, loss, backward and AdamW step of FacT-TT r8 (the head trained)."""
    import torch

    model = _vit().train()
    adapter = factnet.Tensorizer(model).decompose("tt", rank=8, seed=0)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, 64, 64), torch.randint(0, 10, (batch,))

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def _mixed_forward(factnet, batch: int):
    """An eval-mode, no-grad forward of a batch whose samples use four random FacT-TT r8 adapters in turn."""
    import torch

    model = _vit().eval()
    for seed, name in enumerate(ADAPTERS):
        adapter = factnet.Tensorizer(model).decompose("tt", rank=8, seed=seed, name=name)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0, 0.02)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]
    x = torch.randn(batch, 3, 64, 64)

    def step() -> None:
        with torch.no_grad(), model.factnet.per_sample(names):
            model(x)
    return step


if __name__ == "__main__":
    main()
