"""Train-step time and activation memory of FacT against the frozen floor and PEFT LoRA.

    python benchmarks/step_time.py [--model vit_small_patch16_224] [--batch 8] [--reps 15]
    python benchmarks/step_time.py --sizes demo,vit_s,vit_b --batches 1,8 [--infer-batches 1,64] [--reps 7]

One process, random weights, CPU. Every variant runs once per round, in rotating order
(interleaved); the step time is the median over rounds, and each ratio is the median over rounds of
the ratio within the round (paired: robust to a machine whose speed drifts during the run):
- floor: backbone frozen, backward to the first block's input, no weight gradients;
- FacT-TT / FacT-TK r8 on all attention and MLP matrices, dropout 0 (merged-weight kernel)
  and 0.1 (activation-side kernel), plus the activation-side kernel at dropout 0;
- PEFT LoRA r8 on the same matrices (qkv, proj, fc1, fc2), dropout 0 and 0.1.
A step is forward, loss, backward, and (for trainable variants) AdamW step + zero_grad.
Memory is the bytes autograd saves for backward (distinct storages, via saved-tensor hooks):
the part of training memory the methods differ in.

``--sizes`` sweeps models (``demo``: the embedded demo's ViT, width 64, depth 4, 8x8 images;
``vit_s``; ``vit_b``) and ``--batches`` with the variants floor, FacT-TT r8, FacT-TK r8 and PEFT
LoRA r8 at dropout 0 and 0.1 (all interleaved in one run; one row per dropout, ratios to the floor
and FacT/LoRA), then times inference (eval, no grad) at ``--infer-batches`` (default 1,64): the
base model, FacT-TT r8 merged and unmerged, interleaved (merged/base and unmerged/merged).
The kernel's autotuning runs in the warm-up steps (`factnet.autotune`; ``--choices`` prints it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import timm
import torch
from torch import nn

import factnet
from factnet import Tensorizer, autotune

Step = Callable[[], None]
SIZES = {
    "demo": (lambda: _demo_vit(), (1, 8, 8)),
    "vit_s": (lambda: timm.create_model("vit_small_patch16_224", num_classes=10), (3, 224, 224)),
    "vit_b": (lambda: timm.create_model("vit_base_patch16_224", num_classes=10), (3, 224, 224)),
}
SWEEP = {"floor": "floor", "FacT-TT r8": "fact:tt:0:auto", "FacT-TK r8": "fact:tucker:0:auto",
         "PEFT LoRA r8": "lora:0", "FacT-TT r8 d0.1": "fact:tt:0.1:auto", "FacT-TK r8 d0.1": "fact:tucker:0.1:auto",
         "PEFT LoRA r8 d0.1": "lora:0.1"}


def _demo_vit() -> nn.Module:
    try:
        from factnet.app.demo.backbone import PretrainConfig, build_vit
    except ImportError:  # before the application moved to factnet.app
        from factnet.demo.backbone import PretrainConfig, build_vit  # type: ignore[no-redef]

    return build_vit(PretrainConfig(), num_classes=5)


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


def make_variant(base: nn.Module, kind: str, x: torch.Tensor,
                 library: ModuleType = factnet) -> tuple[Step, Callable[[], torch.Tensor]]:
    """A train step of ``kind`` (floor, fact:FORMAT:DROPOUT:PATH, lora:DROPOUT) on a copy of ``base``, and its
    forward; FacT from ``library`` (`ab_step.py` passes an older checkout's factnet)."""
    model = copy.deepcopy(base).train()
    targets = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    if kind == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.blocks[0].register_forward_pre_hook(lambda _, args: (args[0].detach().requires_grad_(),))
    elif kind.startswith("fact"):
        _, fmt, dropout, path = kind.split(":")
        adapter = library.Tensorizer(model).decompose(fmt, rank=8, scale=10.0, dropout=float(dropout), train_head=False)
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


def interleaved(steps: dict[str, Step], warmup: int, reps: int, least: float = 0.2) -> dict[str, list[float]]:
    """Seconds of each step per round, the steps run in rotating order; a short step runs several times
    in a row per round (at least ``least`` seconds of the first step), its mean time counted."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    start = time.perf_counter()
    steps[names[0]]()
    repeat = max(1, int(least / (time.perf_counter() - start)))
    for rep in range(warmup + reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            start = time.perf_counter()
            for _ in range(repeat):
                steps[name]()
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) / repeat)
    return times


def ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """The median over rounds of ``name``'s time over ``reference``'s in the same round: paired, so a
    machine whose speed drifts during the run (a shared or throttled CPU) moves both alike."""
    if reference not in times:
        return float("nan")
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def spread(times: dict[str, list[float]], name: str, reference: str) -> tuple[float, float]:
    """The quartiles of the paired ratio (how far one round is from another)."""
    found = statistics.quantiles([a / b for a, b in zip(times[name], times[reference])], n=4)
    return found[0], found[2]


def inference(base: nn.Module, x: torch.Tensor, warmup: int, reps: int) -> dict[str, list[float]]:
    """Eval-mode, no-grad forward of the base model and of FacT-TT r8 unmerged and merged."""
    plain, unmerged, merged = copy.deepcopy(base).eval(), copy.deepcopy(base).eval(), copy.deepcopy(base).eval()
    for model in (unmerged, merged):
        adapter = Tensorizer(model).decompose("tt", rank=8, scale=10.0, seed=0, train_head=False)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0, 0.02)
    merged.factnet.active_adapter.merge()

    def run(model: nn.Module) -> Step:
        def forward() -> None:
            with torch.no_grad():
                model(x)
        return forward

    return interleaved({"base": run(plain), "unmerged": run(unmerged), "merged": run(merged)}, warmup, reps)


def one_model(args: argparse.Namespace) -> None:
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
    if args.kinds:  # a subset, e.g. floor,fact:tt:0:auto,lora:0 (more rounds in the same time)
        chosen = args.kinds.split(",")
        kinds = {name: kind for name, kind in kinds.items() if kind in chosen or name == "floor"}
    variants = {name: make_variant(base, kind, x) for name, kind in kinds.items()}
    memory = {name: saved_bytes(forward) for name, (_, forward) in variants.items()}
    times = interleaved({name: step for name, (step, _) in variants.items()}, args.warmup, args.reps)
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.reps} interleaved rounds; ratios are medians of the per-round ratios (quartiles in brackets)")
    print(f"{'variant':34} {'step ms':>8} {'x floor':>8} {'(quartiles)':>13} {'x LoRA':>7} {'saved MB':>9} {'x floor':>8}")
    for name in variants:
        low, high = spread(times, name, "floor")
        print(f"{name:34} {statistics.median(times[name]) * 1e3:8.1f} {ratio(times, name, 'floor'):8.3f} "
              f"{f'({low:.3f}-{high:.3f})':>13} {ratio(times, name, 'PEFT LoRA r8'):7.3f} "
              f"{memory[name] / 2**20:9.1f} {memory[name] / memory['floor']:8.3f}")
    if args.choices:
        _print_choices()


def sweep(args: argparse.Namespace) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    infer_batches = [int(b) for b in args.infer_batches.split(",") if b]
    names = ["FacT-TT r8", "FacT-TK r8", "PEFT LoRA r8"]
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.reps} interleaved rounds (train) / "
          f"{args.infer_reps} (inference); ratios are medians of the per-round ratios")
    print(f"{'model':6} {'batch':>5} {'dropout':>7} | {'floor ms':>9} | " + " | ".join(f"{n:>12}" for n in names)
          + " | TT/LoRA | TK/LoRA")
    inferred: list[str] = []
    for size in args.sizes.split(","):
        build, shape = SIZES[size]
        torch.manual_seed(0)
        base = build()
        for batch in batches:
            x = torch.randn(batch, *shape)
            steps = {name: make_variant(base, kind, x)[0] for name, kind in SWEEP.items()}
            times = interleaved(steps, args.warmup, args.reps)
            floor = statistics.median(times["floor"])
            for dropout, suffix in (("0", ""), ("0.1", " d0.1")):
                cells = " | ".join(f"{ratio(times, n + suffix, 'floor'):7.3f}x fl" for n in names)
                lora = "PEFT LoRA r8" + suffix
                print(f"{size:6} {batch:5d} {dropout:>7} | {floor * 1e3:9.1f} | {cells} | "
                      f"{ratio(times, 'FacT-TT r8' + suffix, lora):7.3f} | {ratio(times, 'FacT-TK r8' + suffix, lora):7.3f}",
                      flush=True)
        for batch in infer_batches:
            infer = inference(base, torch.randn(batch, *shape), 1, args.infer_reps)
            inferred.append(f"{size:6} {batch:5d} | {statistics.median(infer['base']) * 1e3:8.1f} | "
                            f"{ratio(infer, 'merged', 'base'):12.3f} | {ratio(infer, 'unmerged', 'merged'):16.3f}")
    if inferred:
        print(f"\ninference, eval, no grad, FacT-TT r8\n{'model':6} {'batch':>5} | {'base ms':>8} | merged/base | "
              "unmerged/merged")
        print("\n".join(inferred))
    if args.choices:
        _print_choices()


def _print_choices() -> None:
    print("\nautotune choices (op, key, threads) -> variant")
    for key, name in autotune.choices().items():
        print(f"  {key} -> {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sizes", help=f"sweep these ({', '.join(SIZES)}) instead of one --model")
    parser.add_argument("--batches", default="1,8", help="the sweep's batch sizes (default 1,8)")
    parser.add_argument("--infer-batches", default="1,64", help="the sweep's inference batch sizes (default 1,64)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--infer-reps", type=int, default=5)
    parser.add_argument("--choices", action="store_true", help="print the kernel variants autotuning picked")
    parser.add_argument("--kinds", help="only these variants of one --model, e.g. fact:tt:0:auto,fact:tt:0:activation,lora:0")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sweep(args) if args.sizes else one_model(args)


if __name__ == "__main__":
    main()
