"""Where a train step's time goes: torch.profiler over a few steps of floor, FacT and PEFT LoRA.

    python benchmarks/profile_step.py [--size vit_s] [--batch 8] [--steps 3] [--kinds floor,fact:tt:0:auto,lora:0]
        [--top 15] [--choices] [--threads N]
    python benchmarks/profile_step.py --size demo --batch 1 --phases 15

Prints, per variant, the ops with the most self CPU time (calls, self ms, total ms) over ``--steps``
steps after two warm-up steps (which also run the kernel's autotuning), and with ``--choices`` the
variants `factnet.autotune` picked for each shape. ``--phases R`` instead times forward and backward
apart (no optimizer step), interleaved over R rounds, each over the last kind's (medians of the
per-round ratios): where a step's gap to another opens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from step_time import SIZES, make_variant

from factnet import autotune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="vit_s", choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kinds", default="floor,fact:tt:0:auto,lora:0")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--choices", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--phases", type=int, default=0, help="time forward and backward over this many rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build, shape = SIZES[args.size]
    torch.manual_seed(0)
    base = build()
    x = torch.randn(args.batch, *shape)
    if args.phases:
        return phases(base, x, args.kinds.split(","), args.phases)
    for kind in args.kinds.split(","):
        step, _ = make_variant(base, kind, x)
        step(), step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"\n{kind}: {args.steps} steps, {total:.1f} ms self CPU in all")
        print(f"{'op':48} {'calls':>7} {'self ms':>9} {'total ms':>9}")
        for e in events[: args.top]:
            print(f"{e.key[:48]:48} {e.count:7d} {e.self_cpu_time_total / 1e3:9.1f} {e.cpu_time_total / 1e3:9.1f}")
    if args.choices:
        print("\nautotune choices (op, key, threads) -> variant")
        for key, name in autotune.choices().items():
            print(f"  {key} -> {name}")


def phases(base: torch.nn.Module, x: torch.Tensor, kinds: list[str], rounds: int, least: float = 0.2) -> None:
    """Forward and backward times of each kind (no optimizer step), interleaved per round."""
    forwards = {kind: make_variant(base, kind, x)[1] for kind in kinds}
    for forward in forwards.values():
        for _ in range(3):
            forward().backward()
    times: dict[str, tuple[list[float], list[float]]] = {kind: ([], []) for kind in kinds}
    for _ in range(rounds):
        for kind, forward in forwards.items():
            spent, runs = [0.0, 0.0], 0
            while spent[0] + spent[1] < least or runs < 2:
                start = time.perf_counter()
                loss = forward()
                middle = time.perf_counter()
                loss.backward()
                spent[0], spent[1], runs = spent[0] + middle - start, spent[1] + time.perf_counter() - middle, runs + 1
            times[kind][0].append(spent[0] / runs)
            times[kind][1].append(spent[1] / runs)
    reference = times[kinds[-1]]
    print(f"{'kind':24} {'forward ms':>11} {'x ' + kinds[-1]:>14} {'backward ms':>12} {'x ' + kinds[-1]:>14}")
    for kind, (fwd, bwd) in times.items():
        over = [statistics.median(a / b for a, b in zip(mine, theirs)) for mine, theirs in ((fwd, reference[0]),
                                                                                           (bwd, reference[1]))]
        print(f"{kind:24} {statistics.median(fwd) * 1e3:11.2f} {over[0]:14.3f} {statistics.median(bwd) * 1e3:12.2f} "
              f"{over[1]:14.3f}")


if __name__ == "__main__":
    main()
