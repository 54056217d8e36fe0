"""Checks `factnet.budget.AUTO_RULE` on a model: what ``decompose(budget=B)`` with no format picks at each budget,
trained as a user told "train it at lr a or b, choose on validation data" would (seed 0 at each of the rule's
learning rates, seeds 1 and 2 at the one with the best validation accuracy) and at the family's lr validated on that
model by the bytes frontier (3 seeds), against the best setting the frontier measured within the budget.

    PYTHONPATH=. nice -n 10 python benchmarks/auto_pick_check.py --model lite0            # train, resumable
    PYTHONPATH=. python benchmarks/auto_pick_check.py --model lite0 --report               # the table only

Runs go to the frontier's own ``runs.jsonl`` (same keys, same recipe: the frontier reuses them and this reuses the
frontier's); the table goes to ``auto_check.md`` beside it. A pick's bytes are its file without the head, as the
frontier counts them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bytes_frontier as bf  # noqa: E402
import frontier_protocol as fp  # noqa: E402
import frontier_runner  # noqa: E402

BUDGETS_KB = (2, 8, 16, 32, 128, 1024)  # 16: the goal (full fine-tuning's accuracy in <= 16 KB)


def bare_model(backend: fp.Backend):
    """The backend's untrained-head model (the pick depends on the shapes only)."""
    if isinstance(backend, bf.Lite0):
        return backend.rm.build_model(False)
    from factnet.app.demo.backbone import build_vit

    demo = backend.light["demo"]
    return build_vit(demo.pretrain, backend.light["classes"], demo.drop_path)


def run_config(backend: fp.Backend, budget: str):
    """The settings the backend's runs decompose with (their spec, and so their file, is the pick's)."""
    from factnet import AdapterConfig

    if isinstance(backend, bf.Lite0):
        return AdapterConfig(budget=budget, seed=0, train_head=True)
    return AdapterConfig(budget=budget, gain=1.0, dropout=backend.light["demo"].recipe().dropout, seed=0)


def picks(backend: fp.Backend) -> dict[int, tuple[fp.Family, str, tuple[float, ...], str]]:
    """{budget KB: (family, setting, the rule's lrs, why)} of ``decompose(budget=...)`` with no format."""
    from factnet import Tensorizer

    families = {f.name: f for f in bf.factnet_families()[0]}
    out = {}
    for kb in BUDGETS_KB:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = Tensorizer(bare_model(backend)).auto_choice(f"{kb}KB", config=run_config(backend, f"{kb}KB"))
        bits = auto.choice.bits
        name = f"factnet {auto.format} " + (f"{bits}-bit" if bits else "fp32")
        family = families.get(name) or fp.Family(name, "factnet", auto.format, bits, (f"r {auto.choice.rank}",),
                                                 f"r {auto.choice.rank}")
        out[kb] = (family, f"r {auto.choice.rank}", auto.rule.lrs, auto.rule.measured)
    return out


def state(backend: fp.Backend) -> fp.State:
    families, _ = backend.families()
    plan = json.loads(backend.plan_path.read_text())["families"] if backend.plan_path.exists() else {}
    return fp.State(backend, families, plan)


def rule_choice(st: fp.State, backend: fp.Backend, family: fp.Family, setting: str, lrs: tuple[float, ...]
                ) -> float | None:
    """The rule's lr whose seed-0 run validated best, once every one of them has run (collapsed runs do not count)."""
    val = {}
    for lr in lrs:
        record = st.records.get(backend.key(family, setting, lr, 0))
        if record is None:
            return None
        if "error" not in record and not fp.collapsed(record, backend.chance):
            val[lr] = record["val"]
    return max(val, key=val.get) if val else None


def lrs_of(st: fp.State, backend: fp.Backend, family: fp.Family, setting: str, rule_lrs: tuple[float, ...]
           ) -> list[tuple[str, float, tuple[int, ...]]]:
    """[(label, lr, seeds)]: seed 0 at each of the rule's lrs and every seed at the one chosen on validation
    (label "rule"); every seed at the family's lr validated on this model, where the frontier has chosen one and it
    differs (label "validated")."""
    chosen = rule_choice(st, backend, family, setting, rule_lrs)
    out = [("rule", lr, fp.SEEDS if lr == chosen else (0,)) for lr in rule_lrs]
    known = next((f for f in st.families if f.name == family.name), None)
    validated = st.lr_state(known)[1] if known is not None else None
    if validated is not None and validated != chosen:
        out.append(("validated", validated, fp.SEEDS))
    return out


def missing(st: fp.State, backend: fp.Backend, family: fp.Family, setting: str, rule_lrs: tuple[float, ...]
            ) -> tuple[float, int] | None:
    """The next (lr, seed) to train for this pick, or None; no seed after one whose seed 0 collapsed."""
    for _, lr, seeds in lrs_of(st, backend, family, setting, rule_lrs):
        first = st.records.get(backend.key(family, setting, lr, 0))
        for seed in seeds:
            if seed and first is not None and fp.collapsed(first, backend.chance):
                break
            if backend.key(family, setting, lr, seed) not in st.records:
                return lr, seed
    return None


def train_missing(backend: fp.Backend, stop_at: str | None, chosen: dict | None = None) -> None:
    """Train what `missing` asks for at every pick (``chosen``: `picks`' form; default the rule's picks)."""
    st, until = state(backend), frontier_runner.deadline(stop_at)
    for kb, (family, setting, rule_lrs, _) in (chosen or picks(backend)).items():
        while (nxt := missing(st, backend, family, setting, rule_lrs)) is not None:
            lr, seed = nxt
            if until and dt.datetime.now(dt.timezone.utc) >= until:
                print(f"stop-at {stop_at} UTC reached")
                return
            key = backend.key(family, setting, lr, seed)
            base = {"key": key, "model": backend.name, "family": family.name, "kind": "factnet",
                    "method": family.method, "bits": family.bits, "setting": setting, "lr": lr, "seed": seed,
                    "why": f"auto pick at {kb} KB"}
            record = frontier_runner.train_record(backend, base, family, setting, lr, seed)
            frontier_runner.append(backend, record)
            st.records[key] = record
            print(f"[{dt.datetime.now():%H:%M}] {kb} KB: {family.name} {setting} lr {lr:g} seed {seed}: "
                  f"{frontier_runner.outcome(record)}", flush=True)


def _stat(runs: list[dict]) -> tuple[float, float, int]:
    tests = [r["test"] for r in runs]
    return statistics.fmean(tests), statistics.stdev(tests) if len(tests) > 1 else 0.0, len(tests)


def _fmt(stat: tuple[float, float, int] | None) -> str:
    return "" if stat is None else f"{stat[0]:.1f} ± {stat[1]:.1f} (n={stat[2]})"


def report(backend: fp.Backend) -> str:
    st = state(backend)
    lines = [f"# The auto rule on {backend.title}", "",
             "What `decompose(budget=B)` with no format picks (`factnet.budget.AUTO_RULE`), trained at the rule's "
             "learning rates (seed 0 at each; seeds 1 and 2 at the one with the best validation accuracy, in bold) "
             "and at the family's lr the bytes frontier validated on this model, against the best setting the "
             "frontier measured within B (its README: each family's point by seed-0 validation, "
             "the best by mean validation). B holds the whole file without the head, as `budget=` does (the bytes "
             "column: the pick's file). Test %, mean ± std over seeds; — : collapsed to one class. \"pick − best\" "
             "is the rule's validation-chosen lr against the frontier's best: nothing in it is chosen on test. "
             "Written by "
             f"`python benchmarks/auto_pick_check.py --model {backend.name} --report`.", "",
             "| budget | pick | bytes | test at the rule's lrs | test at the validated lr | frontier's best (factnet "
             "or PEFT) | its test | pick − best |", "|---:|---|---:|---|---|---|---|---:|"]
    for kb, (family, setting, rule_lrs, _) in picks(backend).items():
        chosen = rule_choice(st, backend, family, setting, rule_lrs)
        cells: dict[str, list[str]] = {"rule": [], "validated": []}
        size, pick = None, None
        for label, lr, _ in lrs_of(st, backend, family, setting, rule_lrs):
            runs = [r for s in fp.SEEDS if (r := st.records.get(backend.key(family, setting, lr, s))) and "error" not in r]
            if not runs:
                cells[label].append(f"lr {lr:g}: not run yet")
                continue
            size = runs[0]["bytes"]
            text = "—" if fp.collapsed(runs[0], backend.chance) else _fmt(_stat(runs))
            if label == "rule" and lr == chosen:
                pick = _stat(runs)
                cells[label].append(f"**lr {lr:g}: {text}**")
            else:
                cells[label].append(f"lr {lr:g}: {text}")
        best = [p for p in (st.best("factnet", kb * fp.KB), st.best("peft", kb * fp.KB)) if p is not None]
        top = max(best, key=lambda p: p.stat("val")[0]) if best else None
        gap = "" if top is None or pick is None else f"{pick[0] - top.stat('test')[0]:+.1f}"
        lines.append(f"| {kb:,} KB | {family.name}, {setting} | {f'{size:,}' if size else ''} | "
                     f"{' / '.join(cells['rule'])} | {' / '.join(cells['validated']) or 'the same lr'} | "
                     f"{top.family.name + ', ' + top.label if top else '—'} | "
                     f"{_fmt(top.stat('test')) if top else ''} | {gap} |")
    text = "\n".join(lines) + "\n"
    (backend.out / "auto_check.md").write_text(text)
    return text


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(bf.MODELS), default="lite0")
    parser.add_argument("--report", action="store_true", help="the table from the runs only")
    parser.add_argument("--stop-at", default=None, help="HH:MM UTC: start no run at or after it")
    args = parser.parse_args(argv)
    backend = bf.MODELS[args.model]()
    if not args.report:
        train_missing(backend, args.stop_at)
    print(report(backend))


if __name__ == "__main__":
    main(sys.argv[1:])
