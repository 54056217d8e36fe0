"""Train-step time and activation memory of FacT against the frozen floor and PEFT LoRA.

    python benchmarks/step_time.py [--model vit_small_patch16_224] [--batch 8] [--reps 15]

One process, random weights, CPU. Every variant runs once per round, in rotating order
(interleaved), and the median over rounds is reported with its ratio to the floor:
- floor: backbone frozen, backward to the first block's input, no weight gradients;
- FacT-TT / FacT-TK r8 on all attention and MLP matrices, dropout 0 (merged-weight kernel)
  and 0.1 (activation-side kernel), plus the activation-side kernel at dropout 0;
- PEFT LoRA r8 on the same matrices (qkv, proj, fc1, fc2), dropout 0 and 0.1.
A step is forward, loss, backward, and (for trainable variants) AdamW step + zero_grad.
Memory is the bytes autograd saves for backward (distinct storages, via saved-tensor hooks):
the part of training memory the methods differ in.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

from factnet import Tensorizer

Step = Callable[[], None]


def saved_bytes(step_forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves during one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_forward()
    loss.backward()
    return sum(storages.values())


def make_variant(base: nn.Module, kind: str, x: torch.Tensor) -> tuple[Step, Callable[[], torch.Tensor]]:
    model = copy.deepcopy(base).train()
    targets = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    if kind == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.blocks[0].register_forward_pre_hook(lambda _, args: (args[0].detach().requires_grad_(),))
    elif kind.startswith("fact"):
        _, fmt, dropout, path = kind.split(":")
        adapter = Tensorizer(model).decompose(fmt, rank=8, scale=10.0, dropout=float(dropout), train_head=False)
        adapter.settings.path = path
    elif kind.startswith("lora"):
        import peft

        dropout = float(kind.split(":")[1])
        config = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
        model = peft.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3) if trainable else None

    def forward() -> torch.Tensor:
        return model(x).float().square().mean()

    def step() -> None:
        forward().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=10)
    x = torch.randn(args.batch, 3, 224, 224)
    kinds = {
        "floor": "floor",
        "FacT-TT r8": "fact:tt:0:auto",
        "FacT-TK r8": "fact:tucker:0:auto",
        "FacT-TT r8 (activation kernel)": "fact:tt:0:activation",
        "FacT-TT r8 dropout 0.1": "fact:tt:0.1:auto",
        "FacT-TK r8 dropout 0.1": "fact:tucker:0.1:auto",
        "PEFT LoRA r8": "lora:0",
        "PEFT LoRA r8 dropout 0.1": "lora:0.1",
    }
    variants = {name: make_variant(base, kind, x) for name, kind in kinds.items()}
    memory = {name: saved_bytes(forward) for name, (_, forward) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.warmup + args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name][0]()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["floor"])
    lora = statistics.median(times["PEFT LoRA r8"])
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.reps} interleaved steps")
    print(f"{'variant':34} {'step ms':>8} {'x floor':>8} {'x LoRA':>7} {'saved MB':>9} {'x floor':>8}")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:34} {median * 1e3:8.1f} {median / floor:8.3f} {median / lora:7.3f} "
              f"{memory[name] / 2**20:9.1f} {memory[name] / memory['floor']:8.3f}")


if __name__ == "__main__":
    main()
