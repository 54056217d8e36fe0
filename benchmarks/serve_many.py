"""Serving many adapters on one backbone: throughput of mixed-adapter batches, and of requests from threads.

    python benchmarks/serve_many.py [--model vit_small_patch16_224] [--batch 64] [--ks 1,8,64] [--reps 5]
    python benchmarks/serve_many.py --concurrent --threads 1,2,4 --requests 48 --request-batch 4 [--old DIR]

One process, random weights, CPU, eval mode, no grad. Each batch of ``--batch`` images is spread
over K distinct adapters (sample b uses adapter b mod K), and every variant runs once per round in
rotating order (interleaved); the median over rounds is reported as images/s and as a ratio to the
merged model's (one adapter folded into the weights: the limit):
- merged: FacT-TT r8 merged, the base model's cost;
- FacT-TT r8 mixed: ``with model.factnet.per_sample(names): model(x)`` over K FacT-TT r8 adapters;
- PEFT LoRA r8 mixed: ``model(x, adapter_names=names)`` over K LoRA r8 adapters on the same
  matrices (qkv, proj, fc1, fc2), PEFT's mixed-batch inference.
Every adapter's factors are random (nonzero), so no path can skip work.

``--concurrent``: ``--requests`` requests of ``--request-batch`` images, each from a random one of 64 users
(FacT-TT r8 adapters), served one at a time in one thread (choosing the user with ``per_sample([name] * B)``,
or with ``activate(name)``), and by a pool of T threads for each T of ``--threads`` (``use(name)``); reported
as requests/s and as a ratio to the first row. ``--old DIR`` (an older checkout, loaded beside this one
as in ``ab_step.py``) adds its one-thread rows in the same interleaved rounds: what the thread safety
costs the single-user path.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import timm
import torch

import factnet

USERS = 64


def _randomize(params) -> None:
    with torch.no_grad():
        for param in params:
            param.normal_(0, 0.02)


def factnet_model(base: torch.nn.Module, count: int, package=factnet) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for index in range(count):
        adapter = package.Tensorizer(model).decompose("tt", rank=8, scale=10, name=f"user{index}")
        _randomize(adapter.parameters())
    return model


def peft_model(base: torch.nn.Module, count: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="user0")
    for index in range(1, count):
        model.add_adapter(f"user{index}", config)
    return model.eval()


def concurrent(args: argparse.Namespace) -> None:
    """Requests from a pool of threads, each request one random user's (see the module doc)."""
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=100).eval()
    rng = random.Random(0)
    requests = [(f"user{rng.randrange(USERS)}", torch.randn(args.request_batch, 3, 224, 224))
                for _ in range(args.requests)]
    packages = {"": factnet}
    if args.old:
        sys.path.insert(0, str(Path(__file__).parent))
        from ab_step import load_old

        packages["--old: "] = load_old(Path(args.old), Path(tempfile.mkdtemp()))
    runs: dict[str, Callable[[], object]] = {}
    for label, package in packages.items():
        model = factnet_model(base, USERS, package).eval()
        runs[f"{label}1 thread, per_sample([name] * B)"] = lambda model=model: _serially(model, requests, "per_sample")
        runs[f"{label}1 thread, activate(name)"] = lambda model=model: _serially(model, requests, "activate")
        if not label:
            for threads in [int(t) for t in args.threads.split(",")]:
                runs[f"{threads} thread(s), use(name)"] = lambda model=model, threads=threads: _pooled(
                    model, requests, threads)
    times = _interleaved(runs, args.reps)
    print(f"{args.model}, {args.requests} requests of {args.request_batch} images over {USERS} users, "
          f"{torch.get_num_threads()} torch threads, median of {args.reps} interleaved rounds\n")
    _print_rates(times, args.requests, "| serving | requests/s | × first row |", digits=2)


def _serially(model: torch.nn.Module, requests: list[tuple[str, torch.Tensor]], how: str) -> None:
    for name, x in requests:
        if how == "activate":
            model.factnet.activate(name)
            model(x)
        else:
            with model.factnet.per_sample([name] * len(x)):
                model(x)


def _pooled(model: torch.nn.Module, requests: list[tuple[str, torch.Tensor]], threads: int) -> None:
    def serve(request: tuple[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), model.factnet.use(request[0]):
            return model(request[1])

    with ThreadPoolExecutor(threads) as executor:
        list(executor.map(serve, requests))


def _interleaved(runs: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds of each run per round, after one warm-up round, in rotating order."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for round_ in range(reps):
            order = list(runs)[round_ % len(runs):] + list(runs)[: round_ % len(runs)]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    return times


def _print_rates(times: dict[str, list[float]], per_run: int, header: str, digits: int) -> None:
    """A markdown table: each run's rate (``per_run`` over its median seconds) and its ratio to the first run's."""
    first = per_run / statistics.median(next(iter(times.values())))
    print(f"{header}\n|---|---:|---:|")
    for name, values in times.items():
        rate = per_run / statistics.median(values)
        print(f"| {name} | {rate:.{digits}f} | {rate / first:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ks", default="1,8,64", help="numbers of distinct adapters per batch")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--concurrent", action="store_true", help="requests from a pool of threads instead")
    parser.add_argument("--threads", default="1,2,4", help="thread pool sizes (--concurrent)")
    parser.add_argument("--requests", type=int, default=48, help="requests per round (--concurrent)")
    parser.add_argument("--request-batch", type=int, default=4, help="images per request (--concurrent)")
    parser.add_argument("--old", help="an older checkout to serve the same requests beside (--concurrent)")
    parser.add_argument("--torch-threads", type=int, help="torch's intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.concurrent:
        concurrent(args)
        return
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

    times = _interleaved(runs, args.reps)
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.reps} interleaved "
          f"rounds\n")
    _print_rates(times, args.batch, "| variant | images/s | × merged |", digits=1)


if __name__ == "__main__":
    main()
