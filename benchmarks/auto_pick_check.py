"""Checks `factnet.budget.AUTO_RULE` on a model: what ``decompose(budget=B)`` with no format picks at each budget,
trained (3 seeds) at the rule's learning rate and at the family's lr validated on that model by the bytes
frontier, against the best setting the frontier measured within the same budget.

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
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bytes_frontier as bf  # noqa: E402
import frontier_protocol as fp  # noqa: E402

BUDGETS_KB = (2, 8, 32, 128, 1024)


def bare_model(backend: fp.Backend):
    """The backend's untrained-head model (the pick depends on the shapes only)."""
    if isinstance(backend, bf.Lite0):
        return backend.rm.build_model(False)
    from factnet.app.demo.backbone import build_vit

    demo = backend.light["demo"]
    return build_vit(demo.pretrain, backend.light["classes"], demo.drop_path)


def picks(backend: fp.Backend) -> dict[int, tuple[fp.Family, str, float, str]]:
    """{budget KB: (family, setting, rule lr, why)} of ``decompose(budget=...)`` with no format."""
    from factnet import Tensorizer

    families = {f.name: f for f in bf.factnet_families()[0]}
    out = {}
    for kb in BUDGETS_KB:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = Tensorizer(bare_model(backend)).auto_choice(f"{kb}KB")
        bits = auto.choice.bits
        name = f"factnet {auto.format} " + (f"{bits}-bit" if bits else "fp32")
        family = families.get(name) or fp.Family(name, "factnet", auto.format, bits, (f"r {auto.choice.rank}",),
                                                 f"r {auto.choice.rank}")
        out[kb] = (family, f"r {auto.choice.rank}", auto.rule.lr, auto.rule.measured)
    return out


def state(backend: fp.Backend) -> fp.State:
    families, _ = backend.families()
    plan = json.loads(backend.plan_path.read_text())["families"] if backend.plan_path.exists() else {}
    return fp.State(backend, families, plan)


def lrs_of(st: fp.State, family: fp.Family, rule_lr: float) -> list[tuple[str, float]]:
    """[(label, lr)]: the rule's, then the family's validated lr on this model where the frontier has chosen one."""
    known = next((f for f in st.families if f.name == family.name), None)
    validated = st.lr_state(known)[1] if known is not None else None
    out = [("rule", rule_lr)]
    if validated is not None and validated != rule_lr:
        out.append(("validated", validated))
    return out


def train_missing(backend: fp.Backend, stop_at: str | None) -> None:
    st = state(backend)
    for kb, (family, setting, rule_lr, _) in picks(backend).items():
        for _, lr in lrs_of(st, family, rule_lr):
            for seed in fp.SEEDS:
                key = backend.key(family, setting, lr, seed)
                if key in st.records:
                    continue
                first = st.records.get(backend.key(family, setting, lr, 0))
                if first is not None and fp.collapsed(first, backend.chance):
                    break  # seed 0 collapsed to one class: the other seeds are not run
                if stop_at and dt.datetime.now(dt.timezone.utc).strftime("%H:%M") >= stop_at:
                    print(f"stop-at {stop_at} UTC reached")
                    return
                base = {"key": key, "model": backend.name, "family": family.name, "kind": "factnet",
                        "method": family.method, "bits": family.bits, "setting": setting, "lr": lr, "seed": seed,
                        "why": f"auto pick at {kb} KB"}
                start = time.perf_counter()
                record = {**base, **backend.train(family, setting, lr, seed)}
                record.setdefault("seconds", time.perf_counter() - start)
                with open(backend.runs_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                st.records[key] = fp.normalize(record)
                print(f"[{dt.datetime.now():%H:%M}] {kb} KB: {family.name} {setting} lr {lr:g} seed {seed}: "
                      f"val {record['val']:.1f} test {record['test']:.1f}, {record['bytes']:,} B", flush=True)


def _stat(runs: list[dict]) -> tuple[float, float, int]:
    tests = [r["test"] for r in runs]
    return statistics.fmean(tests), statistics.stdev(tests) if len(tests) > 1 else 0.0, len(tests)


def _fmt(stat: tuple[float, float, int] | None) -> str:
    return "" if stat is None else f"{stat[0]:.1f} ± {stat[1]:.1f} (n={stat[2]})"


def report(backend: fp.Backend) -> str:
    st = state(backend)
    lines = [f"# The auto rule on {backend.title}", "",
             "What `decompose(budget=B)` with no format picks (`factnet.budget.AUTO_RULE`, measured on the wide "
             "backbone), trained at the rule's lr and at the family's lr validated on this model, against the best "
             "setting the bytes frontier measured within B (its README: each family's point by seed-0 validation, "
             "the best by mean validation). Test %, mean ± std over seeds. Written by "
             f"`python benchmarks/auto_pick_check.py --model {backend.name} --report`.", "",
             "| budget | pick | bytes | test at the rule's lr | test at the validated lr | frontier's best (factnet "
             "or PEFT) | its test | pick − best |", "|---:|---|---:|---|---|---|---|---:|"]
    for kb, (family, setting, rule_lr, _) in picks(backend).items():
        cells, col = {}, {}
        size = None
        for label, lr in lrs_of(st, family, rule_lr):
            runs = [r for s in fp.SEEDS if (r := st.records.get(backend.key(family, setting, lr, s))) and "error" not in r]
            col[label] = f"lr {lr:g}: not run yet"
            if runs:
                size = runs[0]["bytes"]
                cells[label] = (lr, _stat(runs))
                col[label] = f"lr {lr:g}: {_fmt(cells[label][1])}"
        budget = kb * fp.KB
        best = [p for p in (st.best("factnet", budget), st.best("peft", budget)) if p is not None]
        top = max(best, key=lambda p: p.stat("val")[0]) if best else None
        pick_best = max((c[1][0] for c in cells.values()), default=None)
        gap = "" if top is None or pick_best is None else f"{pick_best - top.stat('test')[0]:+.1f}"
        lines.append(f"| {kb:,} KB | {family.name}, {setting} | {f'{size:,}' if size else ''} | {col.get('rule', '')} | "
                     f"{col.get('validated', 'the same lr')} | {top.family.name + ', ' + top.label if top else '—'} | "
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
