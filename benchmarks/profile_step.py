"""Where a train step's time goes: torch.profiler over a few steps of floor, FacT and PEFT LoRA.

    python benchmarks/profile_step.py [--size vit_s] [--batch 8] [--steps 3] [--kinds floor,fact:tt:0:auto,lora:0]
        [--top 15] [--choices] [--threads N]

Prints, per variant, the ops with the most self CPU time (calls, self ms, total ms) over ``--steps``
steps after two warm-up steps (which also run the kernel's autotuning), and with ``--choices`` the
variants `factnet.autotune` picked for each shape.
"""

from __future__ import annotations

import argparse
import sys
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build, shape = SIZES[args.size]
    torch.manual_seed(0)
    base = build()
    x = torch.randn(args.batch, *shape)
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


if __name__ == "__main__":
    main()
