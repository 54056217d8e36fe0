"""Train-step cost of FacT on models that read their weights outside the module's forward.

    python benchmarks/zoo_step_time.py [--batch 8] [--reps 7]

BEiT, EVA-02 and SwinV2 (timm) and torchvision's Swin pass ``self.qkv.weight`` (Swin also
``self.proj.weight``) to a functional op: factnet gives them ``W + s·ΔW`` built differentiably,
whose backward forms a dense weight gradient, where the other matrices run the thin-product
kernel. Each is timed next to a model of the same widths whose matrices all run the kernel
(ViT-S for the 384-wide ones, timm's Swin-T for the Swin family). One process, random weights,
CPU; per model the floor (frozen backbone, backward to the input images) and FacT-TT r8 on the
default targets run interleaved; the median over rounds and its ratio to the floor are printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

from factnet import Tensorizer

MODELS = {
    "timm ViT-S (384)": lambda: timm.create_model("vit_small_patch16_224"),
    "timm BEiT (384)": lambda: timm.create_model("beit_base_patch16_224", embed_dim=384, num_heads=6),
    "timm EVA-02-S (384)": lambda: timm.create_model("eva02_small_patch14_224"),
    "timm Swin-T": lambda: timm.create_model("swin_tiny_patch4_window7_224"),
    "timm SwinV2-T (256 px)": lambda: timm.create_model("swinv2_tiny_window8_256"),
    "torchvision Swin-T": lambda: __import__("torchvision").models.swin_t(),
}
SIZES = {"timm SwinV2-T (256 px)": 256}


def variants(build, batch: int) -> dict[str, tuple]:
    torch.manual_seed(0)
    base = build().train()
    x = torch.randn(batch, 3, SIZES.get(name_of(build), 224), SIZES.get(name_of(build), 224))
    floor = copy.deepcopy(base).requires_grad_(False)
    fact = copy.deepcopy(base)
    Tensorizer(fact).decompose("tt", rank=8, scale=10.0, train_head=False)
    optimizer = torch.optim.AdamW([p for p in fact.parameters() if p.requires_grad], lr=1e-3)

    def floor_step() -> None:
        floor(x.detach().requires_grad_()).float().square().mean().backward()

    def fact_step() -> None:
        fact(x.detach().requires_grad_()).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"floor": floor_step, "FacT-TT r8": fact_step}


def name_of(build) -> str:
    return next(name for name, b in MODELS.items() if b is build)


def measure(steps: dict, warmup: int, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(warmup + reps):
        for name in names[rep % 2:] + names[: rep % 2]:
            start = time.perf_counter()
            steps[name]()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names from the list")
    args = parser.parse_args()
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.reps} interleaved steps")
    print(f"{'model':34} {'floor ms':>9} {'FacT ms':>9} {'x floor':>8}  matrices read outside forward")
    for name in args.models.split(","):
        build = MODELS[name]
        result = measure(variants(build, args.batch), args.warmup, args.reps)
        functional = _functional_matrices(build)
        print(f"{name:34} {result['floor'] * 1e3:9.1f} {result['FacT-TT r8'] * 1e3:9.1f} "
              f"{result['FacT-TT r8'] / result['floor']:8.3f}  {functional}", flush=True)


def _functional_matrices(build) -> str:
    """Which adapted matrices receive their increment by attribute reads (counted on one forward)."""
    torch.manual_seed(0)
    model = build().eval()
    Tensorizer(model).decompose("tt", rank=2, train_head=False)
    calls: set[str] = set()
    for name, module in model.named_modules():
        if type(module).__name__ == "AdaptedMatrix":
            module.register_forward_pre_hook(lambda m, _, name=name: calls.add(name))
    size = SIZES.get(name_of(build), 224)
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    adapted = [n for n, m in model.named_modules() if type(m).__name__ == "AdaptedMatrix"]
    read = [n.rsplit(".", 1)[-1] for n in adapted if n not in calls]
    return f"{len(read)} of {len(adapted)} ({', '.join(sorted(set(read))) or 'none'})"


if __name__ == "__main__":
    main()
