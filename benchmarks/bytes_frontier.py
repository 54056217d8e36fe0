"""Accuracy per file byte on the frontier's wide backbone: low-bit FacT, factnet's VeRA and tt-seeded against PEFT.

    PYTHONPATH=. nice -n 10 python benchmarks/bytes_frontier.py                       # seed 0 of all, then seeds 1, 2
    PYTHONPATH=. nice -n 10 python benchmarks/bytes_frontier.py --seeds 0             # seed 0 only
    PYTHONPATH=. nice -n 10 python benchmarks/bytes_frontier.py --only "FacT-TT 2-bit"
    PYTHONPATH=. python benchmarks/bytes_frontier.py --plot --frontier-runs ../main/docs/frontier/runs.jsonl

Trains, with the frontier's backbone and recipe (`FrontierConfig().demo`, lr 1e-2, one torch thread) and
decompose's default rank-stable parametrization (gain 1, no scale sweep):

- FacT-TT and FacT-TK trained quantized (``decompose(bits=b)``, straight-through) at bits 1, 2, 4, 8 and ranks
  1 to 64; their files are ``b``-bit (`Method.bits`);
- factnet ``vera`` (seeded A, B; trained vectors) at ranks 16, 64, 256, 1024, a rank the groups cannot take
  (above their largest) skipped with a note and the largest trained instead;
- factnet ``tt-seeded`` (FacT-TT with seeded u, v; cores train) at ranks 8, 32, gain 1 and gain 10;
- FacT-TT and FacT-TK in float32 at gain 1 (the ``bits`` reference; `benchmarks/scale_grid.py` ran these).

Every setting trains with seed 0 first; then seeds 1 and 2 for the settings some byte budget chooses (each
family's upper envelope on seed-0 validation accuracy, see `envelope`), those of the table's budgets first.
Runs are keyed as the frontier keys its runs (`factnet.app.demo.frontier._key`) and appended to
``docs/bytes/runs.jsonl``; a run already there, or in ``docs/scale/runs.jsonl`` (same key: same method,
backbone, recipe and seed), is reused, so an interrupted run resumes.

``--plot`` draws ``docs/bytes/frontier_bytes.png`` and writes ``docs/bytes/README.md``'s tables from the runs
so far, with the PEFT tuners, the frontier's float32 FacT (paper's s grid) and the linear probe and full
fine-tuning from the frontier's ``runs.jsonl`` (``--frontier-runs``), no training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

OUT = Path("docs/bytes")
RUNS = OUT / "runs.jsonl"
SCALE_RUNS = Path("docs/scale/runs.jsonl")  # the scale grid's gain-1 runs have the same keys
FRONTIER_RUNS = Path("docs/frontier/runs.jsonl")
FIGURE = OUT / "frontier_bytes.png"
README = OUT / "README.md"
NOTES = OUT / "notes.md"  # hand-written findings, copied into README.md under the header
RANKS = (1, 2, 4, 8, 16, 32, 64)
BITS = (1, 2, 4, 8)
VERA_RANKS = (16, 64, 256, 1024)
SEEDED = ((8, 32), (1.0, 10.0))  # tt-seeded: ranks, gains
KB = 1000
BUDGETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 400)  # KB (1000 bytes), the table's
FORMAT_NAMES = {"tt": "FacT-TT", "tucker": "FacT-TK"}
PEFT = ("PEFT LoRA", "PEFT VeRA", "PEFT VB-LoRA", "PEFT TinyLoRA")
FRONTIER_FACT = {"FacT-TT": "FacT-TT fp32 (s grid)", "FacT-TK": "FacT-TK fp32 (s grid)", "CP": "CP fp32 (s grid)"}


@dataclass(frozen=True)
class Spec:
    family: str
    format: str
    rank: int
    gain: float = 1.0
    bits: int | None = None

    def method(self, lr: float):
        from factnet.app.demo.methods import Method

        return Method("fact", lr, format=self.format, rank=self.rank, gain=self.gain, bits=self.bits)


def lowbit_family(fmt: str, bits: int | None) -> str:
    return f"{FORMAT_NAMES[fmt]} {bits or 32}-bit" + (" (fp32, gain 1)" if bits is None else "")


def specs(model: torch.nn.Module | None = None) -> list[Spec]:
    """Every setting, cheapest first within a family; ``model`` (the downstream ViT) checks the VeRA ranks."""
    out = [Spec(lowbit_family(f, b), f, r, bits=b) for b in BITS for f in FORMAT_NAMES for r in RANKS]
    vera = list(VERA_RANKS)
    if model is not None:
        from factnet import Tensorizer

        tensorizer = Tensorizer(model)
        largest = min(min(d_in, d_out) for _, d_in, d_out in tensorizer.group_shapes().values())
        too_big = [r for r in vera if tensorizer.capped_ranks("vera", r)]
        if too_big:
            print(f"note: vera rank {', '.join(map(str, too_big))} is more than the groups "
                  f"{list(tensorizer.group_shapes())} allow (at most {largest}): skipped, rank {largest} trained "
                  "instead", flush=True)
            vera = [r for r in vera if r not in too_big] + [largest]
    out += [Spec("factnet VeRA", "vera", r) for r in vera]
    out += [Spec("factnet tt-seeded", "tt-seeded", r, gain=g) for r in SEEDED[0] for g in SEEDED[1]]
    out += [Spec(lowbit_family(f, None), f, r) for f in FORMAT_NAMES for r in RANKS]
    return out


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- choosing on validation -----------------------------------------------------------------------------
@dataclass
class Setting:
    """One setting of a family with its runs: ``val0`` its seed-0 validation accuracy, ``tests`` every seed's."""

    family: str
    label: str
    bytes: int
    val0: float
    tests: dict[int, float]
    extra: dict

    def test(self) -> tuple[float, float, int]:
        values = list(self.tests.values())
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def choose(settings: list[Setting], budget: float) -> Setting | None:
    """The setting with the best seed-0 validation accuracy among those whose file fits ``budget`` bytes
    (ties: the smaller file)."""
    fits = [s for s in settings if s.bytes <= budget]
    return max(fits, key=lambda s: (s.val0, -s.bytes)) if fits else None


def envelope(settings: list[Setting]) -> list[Setting]:
    """The settings `choose` picks at some budget, by bytes: the family's upper envelope, chosen on validation."""
    out: list[Setting] = []
    for size in sorted({s.bytes for s in settings}):
        best = choose(settings, size)
        if best is not None and (not out or best is not out[-1]):
            out.append(best)
    return out


def own_settings(records: list[dict]) -> dict[str, list[Setting]]:
    """``{family: settings}`` of this benchmark's runs (a setting without a seed-0 run is left out)."""
    grouped: dict[tuple, dict[int, dict]] = {}
    for r in records:
        grouped.setdefault((r["family"], r["format"], r["rank"], r["gain"], r["bits"]), {})[r["seed"]] = r
    out: dict[str, list[Setting]] = {}
    for (family, fmt, rank, gain, bits), runs in grouped.items():
        if 0 not in runs:
            continue
        label = f"r {rank}" + (f", gain {gain:g}" if fmt == "tt-seeded" else "") + (f", {bits}-bit" if bits else "")
        out.setdefault(family, []).append(Setting(family, label, runs[0]["bytes"], runs[0]["val_accuracy"],
                                                  {s: r["test_accuracy"] for s, r in runs.items()},
                                                  {"format": fmt, "rank": rank, "gain": gain, "bits": bits}))
    return out


def frontier_settings(path: Path) -> dict[str, list[Setting]]:
    """``{family: settings}`` of the frontier's runs (one setting: one method repr; label its settings)."""
    from factnet.app.demo.methods import Method  # noqa: F401  (eval of the stored reprs)

    grouped: dict[tuple[str, str], dict[int, dict]] = {}
    for r in _records(path):
        grouped.setdefault((r["family"], r["method"]), {})[r["seed"]] = r
    out: dict[str, list[Setting]] = {}
    for (family, method), runs in grouped.items():
        if 0 not in runs:
            continue
        name = FRONTIER_FACT.get(family, family)
        settings = eval(method, {"Method": Method}).settings  # noqa: S307 (our own file's reprs)
        out.setdefault(name, []).append(Setting(name, settings, runs[0]["bytes"], runs[0]["val_accuracy"],
                                                {s: r["test_accuracy"] for s, r in runs.items()}, {}))
    return out


def any_bits(families: dict[str, list[Setting]], fmt: str) -> list[Setting]:
    """Every low-bit (1, 2, 4, 8) setting of ``fmt``, as one family."""
    name = f"{FORMAT_NAMES[fmt]} low-bit (any bits)"
    return [Setting(name, s.label, s.bytes, s.val0, s.tests, s.extra)
            for b in BITS for s in families.get(lowbit_family(fmt, b), [])]


# ---- training ---------------------------------------------------------------------------------------------
def to_train(seed_zero: dict[str, list[Setting]]) -> list[tuple[int, Setting]]:
    """The chosen settings (each family's envelope; any-bits families too), priority first: 0 the ones the
    table's budgets choose in the main families, 1 those of the per-bit families, 2 the rest of the envelopes."""
    families = dict(seed_zero)
    for fmt in FORMAT_NAMES:
        families[f"{FORMAT_NAMES[fmt]} low-bit (any bits)"] = any_bits(seed_zero, fmt)
    ranked: dict[tuple, int] = {}
    for name, settings in families.items():
        main = "any bits" in name or name.startswith("factnet")
        for s in envelope(settings):
            key = (s.extra["format"], s.extra["rank"], s.extra["gain"], s.extra["bits"])
            table = any(choose(settings, b * KB) is s for b in BUDGETS)
            priority = 2 if not table else (0 if main else 1)
            ranked[key] = min(priority, ranked.get(key, 3))
    chosen = []
    for settings in seed_zero.values():
        for s in settings:
            key = (s.extra["format"], s.extra["rank"], s.extra["gain"], s.extra["bits"])
            if key in ranked:
                chosen.append((ranked[key], s))
    return sorted(chosen, key=lambda item: (item[0], item[1].bytes))


def run(seeds: list[int], only: str | None) -> None:
    from tqdm.auto import tqdm

    from factnet.app.demo.backbone import pretrained_backbone
    from factnet.app.demo.data import load_splits
    from factnet.app.demo.frontier import _key, _worker
    from factnet.app.demo.frontier_families import FrontierConfig
    from factnet.app.demo.methods import downstream_model

    demo = FrontierConfig().demo
    torch.set_num_threads(demo.threads or 1)
    splits = load_splits(demo.pretrain.data)
    backbone = pretrained_backbone(demo.pretrain, progress=False, splits=splits)
    all_specs = specs(downstream_model(backbone, len(splits.downstream_classes), demo.drop_path))
    if only:
        all_specs = [s for s in all_specs if s.family == only or s.family.startswith(only)]
        if not all_specs:
            raise SystemExit(f"no family matches {only!r}")
    OUT.mkdir(parents=True, exist_ok=True)
    done = {r["key"]: r for r in _records(RUNS)}
    reusable = {r["key"]: r for r in _records(SCALE_RUNS)}
    by_spec = {(s.format, s.rank, s.gain, s.bits): s for s in all_specs}
    plan = [(s, 0) for s in all_specs] if 0 in seeds else []
    bar = tqdm(total=len(plan), desc="bytes frontier", unit="run", smoothing=0)

    def train(spec: Spec, seed: int) -> None:
        method = spec.method(demo.lr)
        key = _key(backbone, demo, method, seed)
        if key not in done:
            start = time.perf_counter()
            tag = {"key": key, "family": spec.family, "format": spec.format, "rank": spec.rank, "gain": spec.gain,
                   "bits": spec.bits, "method": repr(method), "seed": seed}
            if key in reusable:
                old = reusable[key]
                values = {k: old[k] for k in ("val_accuracy", "test_accuracy", "params", "bytes", "epoch_losses")}
                record = {**tag, **values, "seconds": old["seconds"], "from": str(SCALE_RUNS)}
            else:
                result = _worker(backbone, method, splits, demo, seed)
                record = {**tag, "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                          "params": result.params, "bytes": result.bytes, "step_ms": result.step_ms,
                          "epoch_losses": list(result.epoch_losses), "seconds": time.perf_counter() - start}
            with open(RUNS, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            done[key] = record
            tqdm.write(f"{spec.family} r {spec.rank} gain {spec.gain:g} seed {seed}: val {record['val_accuracy']:.1f} "
                       f"test {record['test_accuracy']:.1f}, {record['bytes']:,} bytes ({record['seconds']:.0f} s"
                       + (", reused)" if "from" in record else ")"))
        bar.update()
        bar.set_postfix_str(f"{spec.family} r {spec.rank} seed {seed}", refresh=False)

    for spec, seed in plan:
        train(spec, seed)
    later = [s for s in seeds if s != 0]
    if later:
        ours = [r for r in done.values() if (r["format"], r["rank"], r["gain"], r["bits"]) in by_spec]
        seed_zero = own_settings(ours)
        chosen = to_train(seed_zero)
        print(f"{len(chosen)} settings chosen at some budget (priority 0/1/2: "
              f"{[sum(1 for p, _ in chosen if p == k) for k in range(3)]}); seeds {later} for them", flush=True)
        bar.total += len(chosen) * len(later)
        bar.refresh()
        for _, setting in chosen:
            extra = setting.extra
            spec = by_spec[(extra["format"], extra["rank"], extra["gain"], extra["bits"])]
            for seed in later:
                train(spec, seed)
    bar.close()


# ---- figure and tables --------------------------------------------------------------------------------------
def collect(frontier_runs: Path) -> tuple[dict[str, list[Setting]], dict[str, list[Setting]]]:
    """(this benchmark's families plus the any-bits ones, the frontier's families)."""
    own = own_settings(_records(RUNS))
    for fmt in FORMAT_NAMES:
        own[f"{FORMAT_NAMES[fmt]} low-bit (any bits)"] = any_bits(own, fmt)
    return own, frontier_settings(frontier_runs)


def _fmt_bytes(n: float) -> str:
    return f"{n / KB:.1f} KB" if n >= KB else f"{n:.0f} B"


def plot(frontier_runs: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own, front = collect(frontier_runs)
    fig, axes = plt.subplots(1, 3, figsize=(20, 6.5), gridspec_kw={"width_ratios": [1.6, 1, 1]})

    def line(axis, settings, label, **style):
        points = envelope(settings)
        if not points:
            return
        xs = [p.bytes for p in points]
        stats = [p.test() for p in points]
        axis.errorbar(xs, [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], label=label, capsize=2,
                      marker=style.pop("marker", "o"), markersize=4, **style)

    main = axes[0]
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(PEFT):
        line(main, front.get(name, []), name, color=colors(i), linestyle="--")
    fp32 = [s for name in FRONTIER_FACT.values() for s in front.get(name, [])]
    line(main, fp32, "FacT fp32, TT/TK/CP (frontier, s grid)", color="black")
    line(main, own.get("FacT-TT low-bit (any bits)", []), "FacT-TT low-bit (any bits)", color=colors(4), marker="s")
    line(main, own.get("FacT-TK low-bit (any bits)", []), "FacT-TK low-bit (any bits)", color=colors(5), marker="s")
    line(main, own.get("factnet VeRA", []), "factnet VeRA", color=colors(6), marker="^")
    line(main, own.get("factnet tt-seeded", []), "factnet tt-seeded", color=colors(8), marker="v")
    for name, style in (("linear probe", ":"),):
        chosen = envelope(front.get(name, []))
        if chosen:
            main.axhline(chosen[-1].test()[0], color="gray", linestyle=style, label=f"{name} (0 bytes)")
    full = envelope(front.get("full fine-tuning", []))
    if full:
        main.plot([full[-1].bytes], [full[-1].test()[0]], "k*", markersize=10, label="full fine-tuning")
    main.set_title("each family's envelope, chosen on seed-0 validation")
    for axis, fmt in zip(axes[1:], FORMAT_NAMES):
        for j, bits in enumerate(BITS + (None,)):
            line(axis, own.get(lowbit_family(fmt, bits), []), f"{bits or 32}-bit" + (" (fp32, gain 1)" if bits is None
                 else ""), color=plt.get_cmap("viridis")(j / 4))
        axis.set_title(f"{FORMAT_NAMES[fmt]} by bits (gain 1, ranks 1 to 64)")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_xlabel("file bytes without the head (log)")
        axis.grid(alpha=0.3, which="both")
        for b in BUDGETS:
            axis.axvline(b * KB, color="gray", alpha=0.12, linewidth=0.8)
        if axis.lines or axis.containers:
            axis.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("test accuracy % (mean ± std over seeds)")
    fig.suptitle("Digits 5-9 on the wide ViT (width 192, depth 4) pretrained on 0-4: test accuracy vs adapter file "
                 "bytes", fontsize=12)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=100)
    plt.close(fig)
    return FIGURE


def _cell(s: Setting | None) -> str:
    if s is None:
        return "—"
    mean, std, n = s.test()
    return f"{s.label} | {s.bytes:,} | {mean:.1f} ± {std:.1f} (n={n})"


def tables(frontier_runs: Path) -> str:
    own, front = collect(frontier_runs)
    factnet = list(FRONTIER_FACT.values()) + ["FacT-TT low-bit (any bits)", "FacT-TK low-bit (any bits)",
                                             "factnet VeRA", "factnet tt-seeded"] + \
        [lowbit_family(f, None) for f in FORMAT_NAMES]
    families = {**{n: front[n] for n in PEFT if n in front}, **{n: front.get(n) or own.get(n, []) for n in factnet}}
    lines = ["## Each family's point at each byte budget", "",
             "A family's point at a budget: its setting with the best seed-0 validation accuracy among those whose "
             "file (without the head) fits. Test accuracy: mean ± std over the seeds of that setting that finished "
             "(n). 1 KB = 1000 bytes. — : nothing of the family fits (or none ran).", ""]
    summary = ["## factnet against PEFT at each budget", "",
               "factnet's best: of factnet's families' points (float32 FacT-TT/TK/CP of the frontier, low-bit "
               "FacT-TT/TK, the float32 gain-1 FacT-TT/TK, factnet VeRA, tt-seeded), the one with the best seed-0 "
               "validation accuracy; PEFT's best: the PEFT tuner point with the highest mean test accuracy (the most "
               "favourable reading for PEFT).", "",
               "The last column, for reference only (chosen on test): factnet's family point with the highest mean "
               "test accuracy.", "",
               "| budget | factnet's best (val-chosen) | bytes | test | strongest PEFT tuner | bytes | test | "
               "difference | factnet's highest test mean |", "|---:|---|---:|---:|---|---:|---:|---:|---|"]
    sentences = []
    for b in BUDGETS:
        budget = b * KB
        lines += [f"### {b} KB", "", "| family | setting | bytes | test acc |", "|---|---|---:|---:|"]
        for name, settings in families.items():
            lines.append(f"| {name} | {_cell(choose(settings, budget))} |")
        lines.append("")
        ours = [s for n in factnet for s in [choose(families[n], budget)] if s is not None]
        peft = [s for n in PEFT if n in families for s in [choose(families[n], budget)] if s is not None]
        best = max(ours, key=lambda s: (s.val0, -s.bytes)) if ours else None
        rival = max(peft, key=lambda s: s.test()[0]) if peft else None
        top = max(ours, key=lambda s: s.test()[0]) if ours else None
        top_text = f"{top.family} {top.label}: {top.test()[0]:.1f} (n={top.test()[2]})" if top else ""
        if best is None:
            peft_cells = (f"{rival.family} {rival.label} | {rival.bytes:,} | {rival.test()[0]:.1f} | |" if rival
                          else "— | | | |")
            summary.append(f"| {b} KB | — | | | {peft_cells} |")
            sentences.append(f"- **{b} KB**: no factnet file fits" + ("." if rival is None else
                             f"; PEFT's best is {rival.family}, {rival.label}, {rival.test()[0]:.1f}%."))
            continue
        m, sd, n = best.test()
        if rival is None:
            summary.append(f"| {b} KB | {best.family} {best.label} | {best.bytes:,} | {m:.1f} ± {sd:.1f} (n={n}) | "
                           f"— | | | | {top_text} |")
            sentences.append(f"- **{b} KB**: no PEFT tuner's file fits (among the frontier runs read); factnet's "
                             f"best, {best.family} {best.label}, {m:.1f}%.")
            continue
        rm, rsd, rn = rival.test()
        diff = m - rm
        summary.append(f"| {b} KB | {best.family} {best.label} | {best.bytes:,} | {m:.1f} ± {sd:.1f} (n={n}) | "
                       f"{rival.family} {rival.label} | {rival.bytes:,} | {rm:.1f} ± {rsd:.1f} (n={rn}) | "
                       f"{diff:+.1f} | "
                       f"{top_text} |")
        verdict = "at or above every PEFT tuner's best" if diff >= 0 else "below the best PEFT tuner"
        sentences.append(f"- **{b} KB**: factnet's best ({best.family}, {best.label}, {m:.1f}%) is {verdict} "
                         f"({rival.family}, {rival.label}, {rm:.1f}%) by {abs(diff):.1f} points"
                         + ("." if top is best else f" (factnet's highest test mean here, not chosen on validation: "
                            f"{top.family}, {top.label}, {top.test()[0]:.1f}%, {top.test()[0] - rm:+.1f})."))
    summary += [""] + sentences + [""]
    bits_table = ["## Which bits won at each budget (low-bit FacT only)", "",
                  "Among the low-bit points (bits 1, 2, 4, 8; ranks 1 to 64; gain 1) whose file fits, the one with the "
                  "best seed-0 validation accuracy; in parentheses its rank and test accuracy (mean over n seeds). "
                  "Last column: the same choice when the float32 gain-1 points may win too.", "",
                  "| budget | FacT-TT | FacT-TK | TT or TK | TT or TK, fp32 allowed |", "|---:|---|---|---|---|"]
    for b in BUDGETS:
        cells = []
        tt, tk = own.get("FacT-TT low-bit (any bits)", []), own.get("FacT-TK low-bit (any bits)", [])
        fp32 = own.get(lowbit_family("tt", None), []) + own.get(lowbit_family("tucker", None), [])
        for column, pool in enumerate((tt, tk, tt + tk, tt + tk + fp32)):
            s = choose(pool, b * KB)
            if s is None:
                cells.append("—")
                continue
            m, _, n = s.test()
            name = FORMAT_NAMES[s.extra["format"]] + " " if column >= 2 else ""
            cells.append(f"**{s.extra['bits'] or 32}-bit** ({name}r {s.extra['rank']}, {m:.1f}, n={n})")
        bits_table.append(f"| {b} KB | " + " | ".join(cells) + " |")
    per_bit = ["## Every low-bit and float32 (gain 1) point, seed 0", "",
               "Validation / test accuracy of seed 0 and the file bytes, by format, rank and bits.", ""]
    for fmt in FORMAT_NAMES:
        per_bit += [f"### {FORMAT_NAMES[fmt]}", "", "| rank | " + " | ".join(f"{b}-bit" for b in BITS) + " | fp32 |",
                    "|---:|" + "---|" * (len(BITS) + 1)]
        for r in RANKS:
            row = []
            for bits in BITS + (None,):
                hit = [s for s in own.get(lowbit_family(fmt, bits), []) if s.extra["rank"] == r]
                row.append(f"{hit[0].val0:.1f} / {hit[0].tests[0]:.1f} ({hit[0].bytes:,} B)" if hit else "")
            per_bit.append(f"| {r} | " + " | ".join(row) + " |")
        per_bit.append("")
    others = ["## factnet VeRA and tt-seeded, every setting", "",
              "| family | setting | bytes | val (seed 0) | test (mean ± std, n) |", "|---|---|---:|---:|---:|"]
    for name in ("factnet VeRA", "factnet tt-seeded"):
        for s in sorted(own.get(name, []), key=lambda s: s.bytes):
            m, sd, n = s.test()
            others.append(f"| {name} | {s.label} | {s.bytes:,} | {s.val0:.1f} | {m:.1f} ± {sd:.1f} (n={n}) |")
    return "\n".join(summary + bits_table + [""] + lines + per_bit + others) + "\n"


def counts() -> str:
    records = _records(RUNS)
    trained = [r for r in records if "from" not in r]
    seeds = {}
    for r in records:
        seeds[r["seed"]] = seeds.get(r["seed"], 0) + 1
    return (f"{len(records)} runs in {RUNS} ({len(trained)} trained here, {len(records) - len(trained)} reused from "
            f"{SCALE_RUNS}); by seed: " + ", ".join(f"seed {k}: {v}" for k, v in sorted(seeds.items())))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="seed 0 trains every setting; the others the chosen ones")
    parser.add_argument("--only", help="one family (or a prefix: 'FacT-TT' is every FacT-TT bits)")
    parser.add_argument("--plot", action="store_true", help="figure and tables from the runs so far, no training")
    parser.add_argument("--frontier-runs", type=Path, default=FRONTIER_RUNS,
                        help="the frontier's runs.jsonl (PEFT tuners, float32 FacT, linear probe, full FT)")
    args = parser.parse_args(argv)
    if not args.plot:
        run([int(s) for s in args.seeds.split(",")], args.only)
    OUT.mkdir(parents=True, exist_ok=True)
    print(plot(args.frontier_runs))
    README.write_text(readme(args.frontier_runs), encoding="utf-8")
    print(README)
    print(counts())


def readme(frontier_runs: Path) -> str:
    import os
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f"CUDA {torch.cuda.get_device_name(0)} present (not used)" if torch.cuda.is_available() else "no GPU"
    notes = NOTES.read_text(encoding="utf-8").strip() + "\n\n" if NOTES.exists() else ""
    header = [
        "# Accuracy per file byte: low-bit FacT, factnet VeRA and tt-seeded against PEFT", "",
        "![test accuracy vs file bytes](frontier_bytes.png)", "",
        "Made by (training resumes from `runs.jsonl`; `--plot` only redraws):", "",
        "```",
        "PYTHONPATH=. nice -n 10 python benchmarks/bytes_frontier.py --seeds 0,1,2 "
        "--frontier-runs docs/frontier/runs.jsonl",
        "PYTHONPATH=. python benchmarks/bytes_frontier.py --plot --frontier-runs docs/frontier/runs.jsonl",
        "```", "",
        f"Machine: {cpu}, {os.cpu_count()} cores (one used: one torch thread, runs one after another, another job on "
        f"the other core), {gpu}; Python {platform.python_version()}, torch {torch.__version__}.", "",
        "Task and recipe: the frontier's (`docs/frontier`): digits 5-9 on the wide ViT (width 192, depth 4, 3 heads, "
        "4x4 patches) pretrained on digits 0-4; 100 epochs, AdamW + warmup/cosine, dropout 0.1, drop-path 0.1, "
        "lr 1e-2 (the demo's FacT learning rate) for every factnet run here. factnet runs use decompose's default "
        "rank-stable parametrization at gain 1 (no scale sweep; tt-seeded also at gain 10). Low-bit runs train the "
        "factors quantized in the forward (`decompose(bits=b)`, straight-through), so the b-bit file holds exactly "
        "the trained model. Bytes: the adapter file without the head (`adapter.save(include_head=False)`, "
        "tensors plus the JSON spec; PEFT: its adapter state dict as safetensors, as in the frontier).", "",
        "Families: FacT-TT and FacT-TK at bits 1, 2, 4, 8 and ranks 1-64; factnet VeRA at ranks 16, 64 and 192 "
        "(256 and 1024 are more than the 192x192 group allows, so skipped, and its largest rank, 192, trained "
        "instead); tt-seeded at ranks 8, 32, gains 1 and 10; float32 FacT-TT/TK at gain 1 (the bits reference, "
        "reused from `docs/scale/runs.jsonl`, same keys); from the frontier's runs (read at plot time from "
        f"`{frontier_runs}`, {len(_records(frontier_runs))} runs when this was written): PEFT LoRA, VeRA, "
        "VB-LoRA, TinyLoRA, float32 FacT-TT/TK/CP at the paper's s grid, "
        "the linear probe and full fine-tuning.", "",
        "Protocol (nothing chosen on test): every setting trains with seed 0; a family's point at a byte budget is "
        "its setting with the best seed-0 validation accuracy among those whose file fits (the figure's lines are "
        "these envelopes); the settings so chosen at some budget then train with seeds 1 and 2. Test accuracy: "
        "mean ± sample std over the seeds that finished (n).", "",
        counts() + ".", "",
    ]
    return "\n".join(header) + notes + tables(frontier_runs)


if __name__ == "__main__":
    main(sys.argv[1:])
