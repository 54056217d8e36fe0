"""Rank x scale grid of FacT on the wide demo backbone with the frontier's recipe (validation accuracy).

    nice -n 10 python benchmarks/scale_grid.py --format tt --scaling paper --seeds 0
    nice -n 10 python benchmarks/scale_grid.py --format tt --scaling stable --seeds 0
    nice -n 10 python benchmarks/scale_grid.py --format tt --scaling balanced --values 1 --seeds 0,1,2
    python benchmarks/scale_grid.py --format tt --plot   # docs/scale/grid_tt.png and grid_tt.md from the runs so far
    python benchmarks/scale_grid.py --format tucker --import-frontier --seeds 0,1,2   # the frontier's paper-grid runs

``--scaling paper``: the grid value is the paper's raw ``s`` (``decompose(scale=s)``, main's parametrization).
``--scaling stable``: the grid value is the gain ``g`` of the rank-stable scale (``decompose(gain=g)``, whose raw
``s`` is ``g`` times `Tensorizer.stable_scale`).
``--scaling balanced``: the grid value is a gain ``g`` of `balanced_scale`, ``ρ·sqrt(R_Z / R_all)`` (the geometric
mean of the first step's regime, where only the zero factor's rank letters add coherently, and the later one, where
every rank letter does); benchmark only, not in the library. Each run trains through `factnet.app.demo.methods.adapt` with the
raw ``s``, keyed as the frontier keys its runs, so a run the other grid already has (same raw ``s``) is reused,
and finished runs are appended to ``docs/scale/runs.jsonl``: an interrupted grid resumes. Runs the frontier
finished (``docs/frontier/runs.jsonl``: the paper's grid at seed 0, the chosen ``s`` at seeds 1 and 2) are
reused the same way, by key.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from factnet import Tensorizer
from factnet.formats import get_format
from factnet.formats.base import MODES
from factnet.app.demo.backbone import pretrained_backbone
from factnet.app.demo.data import load_splits
from factnet.app.demo.frontier import _key, _worker
from factnet.app.demo.frontier_families import FrontierConfig
from factnet.app.demo.methods import Method, downstream_model

OUT = Path("docs/scale")
RUNS = OUT / "runs.jsonl"
FRONTIER_RUNS = Path("docs/frontier/runs.jsonl")  # same keys (`_key`): a paper-grid cell the frontier ran
GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # the paper's s grid
RANKS = (1, 2, 4, 8, 16, 32, 64)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line] if path.exists() else []


def _cell(record: dict) -> str:
    return f"{record['key']}/{record['scaling']}/{record['grid_value']}"


SCALINGS = {"paper": "paper's s", "stable": "gain g of s = g·ρ (first step only)",
            "balanced": "gain g of the balanced s = g·ρ·√(R_Z/R_all)",
            "default": "gain g of decompose's default (s = g·ρ, factor multipliers)"}


def balanced_scale(model: torch.nn.Module, fmt: str, rank: int) -> float:
    """``ρ·sqrt(R_Z / R_all)`` per group (``R_all``: the product of the capped sizes of every rank letter,
    ``R_Z``: of the zero factor's), the geometric mean over groups as `Tensorizer.stable_scale` takes it.
    CP: unchanged (both are ``r``); TT: ``ρ/√r``; Tucker: about ``ρ/r``."""
    format_ = get_format(fmt, rank)
    logs = []
    for shape in Tensorizer(model).group_shapes().values():
        sizes = format_.sizes(*shape)
        r_all = math.prod(size for c, size in sizes.items() if c not in MODES)
        r_zero = math.prod(sizes[c] for c in set(format_.factors[format_.zero]) if c not in MODES)
        logs.append(math.log(format_.stable_scale(*shape)) + 0.5 * math.log(r_zero / r_all))
    return math.exp(sum(logs) / len(logs))


def raw_scale(model: torch.nn.Module, fmt: str, rank: int, scaling: str, value: float) -> float:
    """The paper's ``s`` that the grid value ``value`` means under ``scaling``."""
    if scaling == "paper":
        return value
    if scaling == "balanced":
        return value * balanced_scale(model, fmt, rank)
    return value * Tensorizer(model).stable_scale(fmt, rank)


def run(fmt: str, scaling: str, ranks: list[int], values: list[float], seeds: list[int]) -> None:
    config = FrontierConfig()
    demo = config.demo
    torch.set_num_threads(demo.threads or 1)
    splits = load_splits(demo.pretrain.data)
    backbone = pretrained_backbone(demo.pretrain, progress=False, splits=splits)
    probe = downstream_model(backbone, len(splits.downstream_classes), demo.drop_path)
    done = {_cell(r): r for r in _records(RUNS)}
    trained = {r["key"]: r for r in _records(FRONTIER_RUNS) + _records(RUNS)}  # any run of the same key
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for rank in ranks:
            for value in values:
                s = raw_scale(probe, fmt, rank, scaling, value)
                method = Method("fact", demo.lr, format=fmt, rank=rank, gain=value) if scaling == "default" else \
                    Method("fact", demo.lr, format=fmt, rank=rank, scale=s)
                key = _key(backbone, demo, method, seed)
                tag = {"format": fmt, "rank": rank, "scaling": scaling, "grid_value": value, "raw_scale": s}
                if _cell({"key": key, **tag}) in done:
                    continue
                start = time.perf_counter()
                if key in trained:
                    old = trained[key]
                    record = {k: old[k] for k in ("seed", "val_accuracy", "test_accuracy", "params", "bytes",
                                                  "epoch_losses")}
                else:
                    result = _worker(backbone, method, splits, demo, seed)
                    record = {"seed": seed, "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                              "params": result.params, "bytes": result.bytes, "epoch_losses": result.epoch_losses}
                record = {"key": key, **tag, **record, "seconds": time.perf_counter() - start}
                with open(RUNS, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                done[_cell(record)] = trained[key] = record
                print(f"{fmt} r{rank} {scaling} {value:g} (s {s:.4g}) seed {seed}: val {record['val_accuracy']:.1f} "
                      f"test {record['test_accuracy']:.1f} ({record['seconds']:.0f} s)", flush=True)


def import_frontier(fmt: str, ranks: list[int], seeds: list[int]) -> int:
    """Append to ``runs.jsonl`` the paper-grid cells of ``fmt`` that the frontier finished and this grid lacks
    (matched by key, so only runs of exactly this recipe and backbone); how many."""
    config = FrontierConfig()
    demo = config.demo
    backbone = pretrained_backbone(demo.pretrain, progress=False, splits=load_splits(demo.pretrain.data))
    frontier = {r["key"]: r for r in _records(FRONTIER_RUNS)}
    done = {_cell(r) for r in _records(RUNS)}
    added = 0
    with open(RUNS, "a", encoding="utf-8") as handle:
        for seed in seeds:
            for rank in ranks:
                for value in GRID:
                    key = _key(backbone, demo, Method("fact", demo.lr, format=fmt, rank=rank, scale=value), seed)
                    tag = {"format": fmt, "rank": rank, "scaling": "paper", "grid_value": value, "raw_scale": value}
                    if key not in frontier or _cell({"key": key, **tag}) in done:
                        continue
                    old = frontier[key]
                    record = {"key": key, **tag, **{k: old[k] for k in ("seed", "val_accuracy", "test_accuracy", "params",
                                                                         "bytes", "epoch_losses", "seconds")},
                              "from": "frontier"}
                    handle.write(json.dumps(record) + "\n")
                    added += 1
    return added


def table(records: list[dict], fmt: str, scaling: str) -> dict[tuple[int, float], list[float]]:
    """``{(rank, grid value): [val accuracy per seed]}``."""
    cells: dict[tuple[int, float], list[float]] = {}
    for r in records:
        if r["format"] == fmt and r["scaling"] == scaling:
            cells.setdefault((r["rank"], r["grid_value"]), []).append(r["val_accuracy"])
    return cells


def plot(fmt: str) -> Path:
    """Validation accuracy vs the grid value, one line per rank: paper's ``s``, rank-stable gain, balanced gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _records(RUNS)
    fig, axes = plt.subplots(1, len(SCALINGS), figsize=(17, 4.5), sharey=True)
    for axis, (scaling, label) in zip(axes, SCALINGS.items()):
        cells = table(records, fmt, scaling)
        for rank in sorted({r for r, _ in cells}):
            xs = sorted(v for r, v in cells if r == rank)
            means = [statistics.mean(cells[rank, v]) for v in xs]
            axis.plot(xs, means, marker="o", label=f"r {rank}")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_title(f"FacT-{fmt}: {scaling}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy % (mean over seeds)")
    for axis in axes:
        if axis.lines:
            axis.legend(title="rank", fontsize=8)
    fig.tight_layout()
    path = OUT / f"grid_{fmt}.png"
    fig.savefig(path, dpi=110)
    return path


def _stats(runs: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (0 for one seed)."""
    return statistics.mean(runs), statistics.stdev(runs) / math.sqrt(len(runs)) if len(runs) > 1 else 0.0


def comparison(records: list[dict], fmt: str, gain: float) -> list[str]:
    """Must-have 2's check, one row per rank: decompose's default (``gain``, no sweep) against the paper grid's
    best ``s`` (the highest mean among the cells with the most seeds), validation accuracy; within means
    within 1 point or within the best cell's standard error; a run collapsed if its last epoch's training
    loss is not below its first's."""
    paper, default = table(records, fmt, "paper"), table(records, fmt, "default")
    losses = {(r["rank"], r["seed"]): r["epoch_losses"] for r in records
              if r["format"] == fmt and r["scaling"] == "default" and r["grid_value"] == gain}
    lines = [f"## decompose's default (gain {gain:g}, no sweep) against the paper grid's best s", "",
             "| rank | paper's best s | its val | default val | default - best | within | collapsed runs |",
             "|---:|---:|---:|---:|---:|:---:|---:|"]
    for rank in sorted({r for r, _ in default if (r, gain) in default}):
        cells = {v: runs for (r, v), runs in paper.items() if r == rank}
        if not cells:
            continue
        most = max(len(runs) for runs in cells.values())
        best = max((v for v, runs in cells.items() if len(runs) == most), key=lambda v: statistics.mean(cells[v]))
        (b_mean, b_se), (d_mean, d_se) = _stats(cells[best]), _stats(default[rank, gain])
        within = d_mean >= b_mean - max(1.0, b_se)
        collapsed = sum(1 for (r, _), loss in losses.items() if r == rank and loss[-1] >= loss[0])
        lines.append(f"| {rank} | {best:g} | {b_mean:.1f} ± {b_se:.1f} [{len(cells[best])}] | {d_mean:.1f} ± {d_se:.1f} "
                     f"[{len(default[rank, gain])}] | {d_mean - b_mean:+.1f} | {'yes' if within else '**no**'} | "
                     f"{collapsed} |")
    return lines + ["", "(± standard error over seeds, [seeds])", ""]


def markdown(fmt: str) -> Path:
    """Tables of validation accuracy (mean ± std over seeds, seed count) per rank and grid value, each scaling."""
    from factnet.tensorizer import DEFAULT_GAIN

    records = _records(RUNS)
    lines = [f"# FacT-{fmt}: validation accuracy % by rank and scale", ""] + comparison(records, fmt, DEFAULT_GAIN)
    lines += ["Each scaling's grid: mean ± std over seeds, [seeds].", ""]
    for scaling, label in SCALINGS.items():
        cells = table(records, fmt, scaling)
        values = sorted({v for _, v in cells})
        if not cells:
            continue
        lines += [f"## {label}", "", "| rank | " + " | ".join(f"{v:g}" for v in values) + " | best |",
                  "|---:|" + "---:|" * (len(values) + 1)]
        for rank in sorted({r for r, _ in cells}):
            row, best = [], None
            for v in values:
                runs = cells.get((rank, v), [])
                if not runs:
                    row.append("")
                    continue
                mean = statistics.mean(runs)
                std = statistics.stdev(runs) if len(runs) > 1 else 0.0
                row.append(f"{mean:.1f} ± {std:.1f} [{len(runs)}]" if len(runs) > 1 else f"{mean:.1f} [1]")
                best = v if best is None or mean > statistics.mean(cells[rank, best]) else best
            lines.append(f"| {rank} | " + " | ".join(row) + f" | {best:g} |")
        lines.append("")
    path = OUT / f"grid_{fmt}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", default="tt")
    parser.add_argument("--scaling", choices=tuple(SCALINGS), default="paper")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--values", default=",".join(map(str, GRID)), help="grid values (s or gain)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--plot", action="store_true", help="only draw the figure from the runs so far")
    parser.add_argument("--import-frontier", action="store_true",
                        help="only copy the paper-grid runs the frontier finished into runs.jsonl")
    args = parser.parse_args(argv)
    if args.import_frontier:
        print(import_frontier(args.format, [int(r) for r in args.ranks.split(",")],
                              [int(s) for s in args.seeds.split(",")]), "runs imported")
        return
    if args.plot:
        print(plot(args.format), markdown(args.format))
        return
    run(args.format, args.scaling, [int(r) for r in args.ranks.split(",")],
        [float(v) for v in args.values.split(",")], [int(s) for s in args.seeds.split(",")])


if __name__ == "__main__":
    main(sys.argv[1:])
