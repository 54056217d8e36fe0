"""Serving many adapters on one backbone: throughput of mixed-adapter batches.

    python benchmarks/serve_many.py [--model vit_small_patch16_224] [--batch 64] [--ks 1,8,64] [--reps 5]

One process, random weights, CPU, eval mode, no grad. Each batch of ``--batch`` images is spread
over K distinct adapters (sample b uses adapter b mod K), and every variant runs once per round in
rotating order (interleaved); the median over rounds is reported as images/s and as a ratio to the
merged model's (one adapter folded into the weights: the limit):
- merged: FacT-TT r8 merged, the base model's cost;
- FacT-TT r8 mixed: ``with model.factnet.per_sample(names): model(x)`` over K FacT-TT r8 adapters;
- PEFT LoRA r8 mixed: ``model(x, adapter_names=names)`` over K LoRA r8 adapters on the same
  matrices (qkv, proj, fc1, fc2), PEFT's mixed-batch inference.
Every adapter's factors are random (nonzero), so no path can skip work.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch

from factnet import Tensorizer


def _randomize(params) -> None:
    with torch.no_grad():
        for param in params:
            param.normal_(0, 0.02)


def factnet_model(base: torch.nn.Module, count: int) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for index in range(count):
        _randomize(Tensorizer(model).decompose("tt", rank=8, scale=10, name=f"user{index}").parameters())
    return model


def peft_model(base: torch.nn.Module, count: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="user0")
    for index in range(1, count):
        model.add_adapter(f"user{index}", config)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ks", default="1,8,64", help="numbers of distinct adapters per batch")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=100).eval()
    x = torch.randn(args.batch, 3, 224, 224)

    merged = factnet_model(base, 1).eval()
    merged.factnet["user0"].merge()
    runs: dict[str, Callable[[], object]] = {"merged (one adapter, the limit)": lambda: merged(x)}
    fact = factnet_model(base, max(ks)).eval()
    lora = peft_model(base, max(ks))
    for k in ks:
        names = [f"user{b % k}" for b in range(args.batch)]

        def mixed(names=names):
            with fact.factnet.per_sample(names):
                return fact(x)

        runs[f"FacT-TT r8 mixed, K={k}"] = mixed
        runs[f"PEFT LoRA r8 mixed, K={k}"] = lambda names=names: lora(x, adapter_names=names)

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm up
            run()
        for round_ in range(args.reps):
            order = list(runs)[round_ % len(runs):] + list(runs)[: round_ % len(runs)]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)

    limit = args.batch / statistics.median(times[next(iter(runs))])
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.reps} interleaved "
          f"rounds\n")
    print("| variant | images/s | × merged |\n|---|---:|---:|")
    for name, values in times.items():
        rate = args.batch / statistics.median(values)
        print(f"| {name} | {rate:.1f} | {rate / limit:.3f} |")


if __name__ == "__main__":
    main()
