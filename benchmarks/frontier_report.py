"""The bytes frontier's outputs, from the runs only: the table (`table_rows`, the CSV's `COLUMNS`), the figure and the
README. The protocol that made the runs, and the choice at a budget the table shows, are `frontier_protocol`'s."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from frontier_protocol import BUDGETS, KB, SEEDS, Backend, Point, State, collapsed


def _kb(n: int) -> str:
    return f"{n // KB:,} KB"


def _ms(point: Point | None, what: str = "test") -> str:
    if point is None:
        return ""
    m, s, n = point.stat(what)
    return f"{m:.1f} ± {s:.1f} (n={n})"


COLUMNS = ("budget_bytes", "factnet_family", "factnet_setting", "factnet_bytes", "factnet_val_mean",
           "factnet_test_mean", "factnet_test_std", "factnet_seeds", "peft_family", "peft_setting", "peft_bytes",
           "peft_val_mean", "peft_test_mean", "peft_test_std", "peft_seeds", "difference")


def table_rows(state: State) -> list[dict]:
    rows = []
    for budget in BUDGETS:
        row: dict = {"budget_bytes": budget}
        for kind in ("factnet", "peft"):
            p = state.best(kind, budget)
            if p is None:
                row.update({f"{kind}_{c}": "" for c in ("family", "setting", "bytes", "val_mean", "test_mean",
                                                           "test_std", "seeds")})
                continue
            vm, _, _ = p.stat("val")
            tm, ts, n = p.stat("test")
            row.update({f"{kind}_family": p.family.name, f"{kind}_setting": p.label, f"{kind}_bytes": p.bytes,
                        f"{kind}_val_mean": round(vm, 2), f"{kind}_test_mean": round(tm, 2),
                        f"{kind}_test_std": round(ts, 2), f"{kind}_seeds": n})
        both = row["factnet_test_mean"] != "" and row["peft_test_mean"] != ""
        row["difference"] = round(row["factnet_test_mean"] - row["peft_test_mean"], 2) if both else ""
        rows.append(row)
    return rows


def write_csv(state: State) -> Path:
    path = state.backend.csv
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table_rows(state))
    return path


def plot(state: State, extra=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(15, 8))
    formats = sorted({f.method for f in state.families if f.kind == "factnet"})
    tuners = [f.method for f in state.families if f.kind == "peft"]
    fcolors, pcolors = plt.get_cmap("tab10"), plt.get_cmap("Dark2")
    styles = {1: ":", 2: "-.", 4: "--", None: "-"}
    markers = {1: "v", 2: "s", 4: "D", None: "o"}
    for family in state.families:
        env, last = [], None
        for budget in BUDGETS:
            p = state.choose(family, budget)
            if p is not None and p is not last:
                env.append(p)
                last = p
        if not env:
            continue
        xs = [p.bytes for p in env]
        stats = [p.stat("test") for p in env]
        if family.kind == "factnet":
            style = dict(color=fcolors(formats.index(family.method) % 10), linestyle=styles[family.bits],
                         marker=markers[family.bits], linewidth=1.2)
        else:
            style = dict(color=pcolors(tuners.index(family.method) % 8), linestyle=(0, (6, 2)), marker="x",
                         linewidth=2.0)
        ax.errorbar(xs, [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], label=family.name, capsize=2,
                    markersize=4, alpha=0.85, **style)
    for kind, marker, color in (("factnet", "*", "red"), ("peft", "P", "black")):
        chosen = {}
        for budget in BUDGETS:
            p = state.best(kind, budget)
            if p is not None:
                chosen[(p.family.name, p.setting)] = p
        if chosen:
            ax.scatter([p.bytes for p in chosen.values()], [p.stat("test")[0] for p in chosen.values()], s=220,
                       marker=marker, facecolors="none", edgecolors=color, linewidths=1.8, zorder=5,
                       label=f"{'factnet' if kind == 'factnet' else 'PEFT'}'s best at some budget (mean val)")
    if extra:
        extra(ax)
    for budget in BUDGETS:
        ax.axvline(budget, color="gray", alpha=0.15, linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("adapter file bytes without the head (log; grey lines: the budgets, 1 KB to 1,024 KB)")
    ax.set_ylabel("test accuracy % (mean ± std over the seeds run)")
    ax.set_title(state.backend.title + "\neach family's point at every budget, chosen on seed-0 validation",
                 fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(state.backend.figure, dpi=90)
    plt.close(fig)
    return state.backend.figure


def readme(state: State, notes: list[str], plan_notes: list[str]) -> str:
    b = state.backend
    lines = [f"# {b.title}: the bytes frontier", "", f"![test accuracy vs file bytes]({b.figure.name})"
             if b.figure.parent == b.out else f"![test accuracy vs file bytes]({_rel(b.figure, b.out)})", ""]
    lines += b.header() + [""]
    records = [r for r in state.records.values() if r.get("model") == b.name]  # not the older runs the file keeps
    finished = [r for r in records if "error" not in r]
    reused = [r for r in finished if "from" in r]
    hours = sum(r.get("seconds", 0) for r in finished if "from" not in r) / 3600
    lines += [f"**Runs:** {len(finished)} finished runs in `{_rel(b.runs_path, Path('.'))}` ({len(reused)} of them "
              "copied from older runs files, same key and parameter count; the file may also keep older runs of "
              f"other benchmarks), {len(records) - len(finished)} failed; "
              + ", ".join(f"seed {s}: {sum(1 for r in finished if r['seed'] == s)}" for s in SEEDS)
              + f". Training time of the runs not copied: {hours:.1f} h.",
              ""]
    planned = all(f.name in state.plan for f in state.families)
    nxt = state.next_run() if planned else None
    lines += [("**Not planned yet:** some families were added since the runner last measured the settings; run the "
               "command to plan and train them." if not planned else "**Not finished:** the protocol's next run is "
               + f"{nxt[0].name} {nxt[1]} lr {nxt[2]:g} seed {nxt[3]} "
               f"({nxt[4]}); rerun the command to resume." if nxt else "**Finished:** every run the protocol asks for "
               "has run."), ""]
    lines += ["## factnet against PEFT at each budget", "",
              "At each budget (file bytes without the head; 1 KB = 1000 B), each family's point is its setting with "
              "the best seed-0 validation accuracy among those whose file fits; factnet's best and PEFT's best are the "
              "family points with the best mean validation accuracy over the seeds run. Test: mean ± std (n seeds). "
              f"Also in [{b.csv.name}]({_rel(b.csv, b.out)}).", "",
              "| budget | factnet's best | bytes | val | test | PEFT's best | bytes | val | test | factnet − PEFT |",
              "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for budget in BUDGETS:
        f, p = state.best("factnet", budget), state.best("peft", budget)
        cells = []
        for point in (f, p):
            cells += ([f"{point.family.name}, {point.label}", f"{point.bytes:,}", _ms(point, "val"), _ms(point)]
                      if point else ["—", "", "", ""])
        diff = f"{f.stat('test')[0] - p.stat('test')[0]:+.1f}" if f and p else ""
        lines.append(f"| {_kb(budget)} | " + " | ".join(cells) + f" | {diff} |")
    lines += ["", "## The learning rate of each family", "",
              "Seed 0 at the family's reference setting, validation accuracy per candidate (— : collapsed to one "
              "class, or not finite); the chosen lr in bold. Larger candidates than a collapsed one are not run.", "",
              "| family | reference | lr: seed-0 val | chosen |", "|---|---|---|---:|"]
    for family in state.families:
        nxt_lr, lr, runs = state.lr_state(family)
        if not state.usable(family, family.reference):
            lines.append(f"| {family.name} | {family.reference} (does not build) | | |")
            continue
        cells = []
        for l in sorted(runs):
            r = runs[l]
            v = "error" if "error" in r else ("—" if collapsed(r, b.chance) else f"{r['val']:.1f}")
            cells.append(f"**{l:g}: {v}**" if l == lr else f"{l:g}: {v}")
        lines.append(f"| {family.name} | {family.reference} | {' / '.join(cells)} | "
                     f"{f'{lr:g}' if lr is not None else ('next ' + format(nxt_lr, 'g') if nxt_lr else '—')} |")
    lines += ["", "## Each family's point at each budget", "",
              "The setting (seed-0 validation choice) and its test accuracy, mean over the seeds run [n]. Empty: "
              "nothing of the family fits, or none of its settings has run yet.", ""]
    shown = [x for x in BUDGETS]
    lines += ["| family | " + " | ".join(_kb(x) for x in shown) + " |", "|---|" + "---|" * len(shown)]
    for family in state.families:
        cells = []
        for budget in shown:
            p = state.choose(family, budget)
            cells.append(f"{p.setting}: {p.stat('test')[0]:.1f} [{p.stat('test')[2]}]" if p else "")
        lines.append(f"| {family.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Every setting run at its family's lr", "",
              "| family | setting | lr | params | file bytes | val (seed 0) | val | test |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for family in state.families:
        for p in sorted(state.points(family), key=lambda p: p.bytes):
            params = p.runs[0].get("params")
            lines.append(f"| {family.name} | {p.setting} | {p.lr:g} | {params:,} | {p.bytes:,} | {p.val0:.1f} | "
                         f"{_ms(p, 'val')} | {_ms(p)} |" if params is not None else
                         f"| {family.name} | {p.setting} | {p.lr:g} | | {p.bytes:,} | {p.val0:.1f} | {_ms(p, 'val')} | "
                         f"{_ms(p)} |")
    errors = [r for r in records if "error" in r]
    fallen = [r for r in finished if collapsed(r, b.chance)]
    lines += ["", "## What did not run, or failed", ""]
    lines += [f"- {n}" for n in notes]
    lines += [f"- {n}" for n in plan_notes]
    lines += [f"- run `{r['family']} {r['setting']} lr {r['lr']:g} seed {r['seed']}` failed: `{r['error'][:300]}`"
              for r in errors]
    if fallen:
        lines += ["- collapsed to one class (validation at chance), seed-0 lr candidates mostly: " + ", ".join(
            f"{r['family']} {r['setting']} lr {r['lr']:g} seed {r['seed']}" for r in fallen)]
    hand = b.out / "notes.md"  # hand-written notes on the runs, kept apart from the generated tables
    if hand.exists():
        lines += ["", hand.read_text(encoding="utf-8").strip()]
    return "\n".join(lines) + "\n"


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def report(backend: Backend, extra_plot=None) -> None:
    families, notes = backend.families()
    plan_file = json.loads(backend.plan_path.read_text()) if backend.plan_path.exists() else {"families": {}}
    plan = plan_file["families"]
    plan_notes = [n for n in plan_file.get("plan_notes", [])]
    state = State(backend, families, plan)
    print(write_csv(state))
    print(plot(state, extra_plot))
    (backend.out / "README.md").write_text(readme(state, notes, plan_notes), encoding="utf-8")
    print(backend.out / "README.md")
