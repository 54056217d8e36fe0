"""Train-step time of formats with a diagonal rank letter against PEFT VeRA, on the frontier's wide backbone.

    PYTHONPATH=. python benchmarks/diagonal_step.py [--steps 30] [--rounds 3] [--threads 1]

The frontier's wide ViT (`WIDE`: width 192, depth 4, 8x8 inputs in 2x2 patches, 17 tokens; random weights: the time
does not depend on them) with the frontier's recipe (batch 32, factor-space dropout 0.1, drop-path 0.1, AdamW), the
head trained. Each method is prepared as the frontier prepares it (`factnet.app.demo.methods._prepare`), then timed
in rounds that interleave the methods (a round runs ``--steps`` steps of each, after 3 warm-up steps), so the
machine's drift hits them alike. Prints each method's median step (ms) over all rounds and its ratio to PEFT VeRA
at the same rank.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from factnet.app.demo.backbone import build_vit
from factnet.app.demo.frontier_families import WIDE, FrontierConfig
from factnet.app.demo.methods import Method, _prepare

METHODS = [
    Method("peft", 0.1, format="vera", rank=1024),
    Method("fact", 0.1, format="vera", rank=1024, gain=1.0),
    Method("fact", 0.1, format="cp-seeded", rank=1024, gain=1.0),
    Method("fact", 0.1, format="vera", rank=4096, gain=1.0),
    Method("fact", 0.1, format="cp-seeded", rank=4096, gain=1.0),
    Method("fact", 1e-2, format="tt", rank=8, gain=1.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = FrontierConfig().demo.recipe()
    torch.manual_seed(0)
    x, y = torch.randn(recipe.batch_size, 1, 8, 8), torch.randint(0, 10, (recipe.batch_size,))
    prepared = []
    for method in METHODS:
        torch.manual_seed(0)
        model, _, parameters, count, _ = _prepare(build_vit(WIDE, 10, recipe.drop_path), method, recipe, seed=0)
        optimizer = torch.optim.AdamW(parameters, lr=method.lr, weight_decay=recipe.weight_decay)
        prepared.append((method, model.train(), optimizer, count))

    def step(model, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    times: dict[int, list[float]] = {i: [] for i in range(len(prepared))}
    for _ in range(args.rounds):
        for i, (_, model, optimizer, _) in enumerate(prepared):
            for _ in range(3):
                step(model, optimizer)
            for _ in range(args.steps):
                start = time.perf_counter()
                step(model, optimizer)
                times[i].append(1e3 * (time.perf_counter() - start))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"{args.rounds} rounds x {args.steps} steps, batch {recipe.batch_size}")
    peft = {m.rank: statistics.median(times[i]) for i, (m, *_) in enumerate(prepared) if m.kind == "peft"}
    print(f"{'method':<28} {'trained':>10} {'median ms':>10} {'vs PEFT VeRA r1024':>20}")
    for i, (method, _, _, count) in enumerate(prepared):
        median = statistics.median(times[i])
        name = f"{'PEFT' if method.kind == 'peft' else 'factnet'} {method.format} r{method.rank}"
        print(f"{name:<28} {count:>10,} {median:>10.1f} {median / peft[1024]:>20.2f}")


if __name__ == "__main__":
    main()
