"""Serve many per-user adapters on one backbone: load them all, answer a batch that mixes users.

Loads every adapter file in ``--adapters`` (``*.safetensors``, written by ``adapter.save``) onto one
base model with `factnet.load_many` (the base model is checked once, not once per file), then runs
a batch of random images in which sample ``b`` belongs to user ``b mod N`` with
``model.factnet.per_sample(names)``, and checks ``--check`` of its rows against a forward of that
sample alone with its user's adapter active. The exit status is 1 when a row differs by more than
``--tolerance`` (relative). Prints the load time, bytes per file and images per second.

Run (any timm model name, or ``package.module:function`` returning an ``nn.Module``)::

    python examples/serve_many.py --model vit_small_patch16_224 --model-kwargs '{"num_classes": 100}' \\
        --base base.safetensors --adapters users/ --batch 64

    python examples/serve_many.py --demo 200   # a tiny random ViT and 200 random adapters, in a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import factnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_lora import build_model, example_input  # the examples' shared model builder

DEMO_MODEL, DEMO_KWARGS = "vit_tiny_patch16_224", {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 4}


def write_demo_adapters(model: nn.Module, directory: str, count: int) -> None:
    """``count`` FacT-TT r8 adapters with random factors and heads, as users' training would leave them."""
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        adapter = factnet.Tensorizer(model).decompose("tt", rank=8, scale=10, name="user")
        with torch.no_grad():
            for param in [*adapter.parameters(), *adapter.head_state().values()]:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        adapter.save(os.path.join(directory, f"user{index:04d}.safetensors"))
        adapter.detach()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="timm model name, or package.module:function")
    parser.add_argument("--model-kwargs", default="{}", help='JSON keyword arguments, e.g. \'{"num_classes": 100}\'')
    parser.add_argument("--base", help="base checkpoint (.safetensors, .pt, .pth)")
    parser.add_argument("--adapters", help="directory of adapter files (*.safetensors)")
    parser.add_argument("--demo", type=int, metavar="N", help="write N random adapters for a tiny random ViT to a "
                        "temporary directory and serve those (no other arguments needed)")
    parser.add_argument("--batch", type=int, default=64, help="samples in the mixed batch (default 64)")
    parser.add_argument("--input-shape", help="one sample's shape C,H,W (default: the model's image size)")
    parser.add_argument("--check", type=int, default=4, help="rows checked against single-adapter forwards")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative row difference accepted")
    args = parser.parse_args(argv)
    if args.demo is None and (args.model is None or args.adapters is None):
        parser.error("give --model and --adapters, or --demo N")
    return args


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the script; returns what it printed as data (used by the tests)."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.demo is not None:
            args.model, args.model_kwargs, args.adapters = DEMO_MODEL, json.dumps(DEMO_KWARGS), scratch
            torch.manual_seed(0)
            write_demo_adapters(build_model(DEMO_MODEL, DEMO_KWARGS, None), scratch, args.demo)
        return serve(args)


def serve(args: argparse.Namespace) -> dict:
    model = build_model(args.model, json.loads(args.model_kwargs), args.base)
    paths = sorted(str(p) for p in Path(args.adapters).glob("*.safetensors"))
    if not paths:
        raise SystemExit(f"no *.safetensors adapter files in {args.adapters}")
    start = time.perf_counter()
    adapters = factnet.load_many(model, paths)
    loaded = time.perf_counter() - start
    users = list(adapters)
    size = sum(os.path.getsize(p) for p in paths) / len(paths)
    print(f"loaded {len(users)} adapters in {loaded:.2f} s ({size:,.0f} bytes a file)")

    sample = example_input(model, f"1,{args.input_shape}" if args.input_shape else None, seed=0).shape[1:]
    x = torch.randn(args.batch, *sample, generator=torch.Generator().manual_seed(0))
    names = [users[b % len(users)] for b in range(args.batch)]
    start = time.perf_counter()
    with model.factnet.per_sample(names):
        out = model(x)
    seconds = time.perf_counter() - start
    print(f"mixed batch of {args.batch} samples over {len(set(names))} adapters: {args.batch / seconds:.1f} images/s")

    worst = 0.0
    for b in range(min(args.check, args.batch)):
        model.factnet.activate(names[b])
        alone = model(x[b: b + 1])[0]
        worst = max(worst, ((out[b] - alone).norm() / alone.norm()).item())
    print(f"rows checked against single-adapter forwards: {min(args.check, args.batch)}, "
          f"largest relative difference {worst:.2e}")
    ok = worst <= args.tolerance
    if not ok:
        print(f"difference above --tolerance {args.tolerance:g}", file=sys.stderr)
    return {"adapters": len(users), "bytes_per_file": size, "outputs": out, "names": names,
            "max_relative_difference": worst, "ok": ok}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
