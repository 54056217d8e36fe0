"""Running the bytes-frontier protocol (`frontier_protocol`): the plan of every setting's file size, the runs
file, one run trained and recorded, and the loop that trains what the protocol asks for next until it is done or
``--stop-at``. `benchmarks/bytes_frontier.py` and `benchmarks/auto_pick_check.py` run through it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from pathlib import Path

from frontier_protocol import BUDGETS, LADDER, SEEDS, Backend, Family, State


def make_plan(backend: Backend, families: list[Family], log=print, notes: list | None = None) -> dict:
    """{family: {setting: [file bytes, params]}} for the settings that build and whose file is at most the largest
    budget; a setting whose adapter is the same as a smaller one's (a rank capped by the groups) is left out."""
    plan: dict[str, dict[str, list[int]]] = {}
    for i, family in enumerate(families, 1):
        start = time.perf_counter()
        plan[family.name] = {}
        seen: dict[int, str] = {}
        for setting in family.settings:
            try:
                size, params = backend.measure(family, setting)
            except Exception as exc:  # noqa: BLE001 - a setting the library refuses: noted, not run
                note = f"{family.name} {setting} does not build: `{type(exc).__name__}: {str(exc)[:160]}`"
            else:
                note = (f"{family.name} {setting} builds the same adapter as {seen[params]} ({params:,} parameters, "
                        "a rank the groups cap): left out") if params in seen else None
            if note:
                log("note: " + note)
                if notes is not None:
                    notes.append(note)
                continue
            seen[params] = setting
            if size > BUDGETS[-1]:
                continue
            plan[family.name][setting] = [size, params]
        log(f"measured {i}/{len(families)}: {family.name}, {len(plan[family.name])} settings within the largest "
            f"budget ({time.perf_counter() - start:.0f} s)")
    return plan


def fingerprint(families: list[Family]) -> str:
    """A hash of the installed factnet's sources, the PEFT and torch versions and the families: when it is unchanged,
    every setting's file size is too."""
    import peft
    import torch

    import factnet

    digest = hashlib.sha256(f"{peft.__version__} {torch.__version__} {families!r}".encode())
    for path in sorted(Path(factnet.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def import_reusable(state: State) -> int:
    """Copy into the runs file every run of an older runs file that the protocol could ask for (any setting in the
    plan, any lr of `LADDER`, any seed) whose key and trainable-parameter count match: the protocol then uses them
    as its own, and a report shows them before the runner reaches them."""
    backend, count = state.backend, 0
    with open(backend.runs_path, "a", encoding="utf-8") as handle:
        for family in state.families:
            for setting, (size, params) in state.plan.get(family.name, {}).items():
                for lr in LADDER:
                    for seed in SEEDS:
                        key = backend.key(family, setting, lr, seed)
                        old = backend.reused(key)
                        if key in state.records or old is None or old.get("params") != params:
                            continue
                        record = {**old, "key": key, "model": backend.name, "family": family.name,
                                  "kind": family.kind, "method": family.method, "bits": family.bits,
                                  "setting": setting, "lr": lr, "seed": seed, "bytes": size}
                        handle.write(json.dumps(record) + "\n")
                        state.records[key] = record
                        count += 1
    return count


def train_record(backend: Backend, base: dict, family: Family, setting: str, lr: float, seed: int) -> dict:
    """``base`` and what training gives (val, test, bytes, ...) with its ``seconds``; a failure is recorded as
    ``error`` and its traceback, and the caller moves on."""
    start = time.perf_counter()
    try:
        record = {**base, **backend.train(family, setting, lr, seed)}
        record.setdefault("seconds", time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - recorded, the protocol moves on
        import traceback

        record = {**base, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6),
                  "seconds": time.perf_counter() - start}
    return record


def append(backend: Backend, record: dict) -> None:
    with open(backend.runs_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def outcome(record: dict) -> str:
    """One line for a run's log: its accuracies, bytes and seconds, or its error."""
    if "error" in record:
        return record["error"][:200]
    return (f"val {record['val']:.1f} test {record['test']:.1f}, {record['bytes']:,} B, {record.get('seconds', 0):.0f} s"
            + (f", reused from {record['from']}" if "from" in record else ""))


def deadline(stop_at: str | None) -> dt.datetime | None:
    """The next ``HH:MM`` UTC from now (tomorrow's when today's has passed): ``--stop-at 00:30`` given at 22:00 means
    in two and a half hours, not "already passed"."""
    if stop_at is None:
        return None
    hour, minute = map(int, stop_at.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return at if at > now else at + dt.timedelta(days=1)


def run(backend: Backend, stop_at: str | None = None, max_runs: int | None = None, dry: bool = False,
        skip: tuple[str, ...] = ()) -> None:
    """Train what the protocol asks for, one run at a time, until it is done (or ``stop_at``, ``max_runs``).
    ``skip``: families whose name contains one of these are not run by this call (the report still shows them)."""
    until = deadline(stop_at)
    families, notes = backend.families()
    skipped = [f.name for f in families if any(s in f.name for s in skip)]
    if skipped:
        print(f"skipped by --skip in this call: {', '.join(skipped)}", flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    print(f"{len(families)} families; measuring every setting's file...", flush=True)
    plan_notes: list[str] = []
    stamp = fingerprint(families)
    old = json.loads(backend.plan_path.read_text()) if backend.plan_path.exists() else {}
    if old.get("fingerprint") == stamp:  # same library, same families: the sizes measured before hold
        plan, plan_notes = old["families"], old.get("plan_notes", [])
        print("the plan's file sizes are reused (same factnet sources, PEFT and families)", flush=True)
    else:
        plan = make_plan(backend, families, notes=plan_notes)
    backend.out.mkdir(parents=True, exist_ok=True)
    backend.plan_path.write_text(json.dumps({"fingerprint": stamp, "families": plan, "notes": notes,
                                             "plan_notes": plan_notes}, indent=1) + "\n")
    print(f"{sum(len(v) for v in plan.values())} settings within {BUDGETS[-1]:,} bytes", flush=True)
    state = State(backend, [f for f in families if f.name not in skipped], plan)
    imported = import_reusable(state)
    if imported:
        print(f"{imported} runs copied from older runs files (same key and parameter count)", flush=True)
    done = 0
    while True:
        state.refresh()  # what another process ran meanwhile is not run again
        if (nxt := state.next_run()) is None:
            break
        family, setting, lr, seed, why = nxt
        if dry:
            print(f"next: {family.name} {setting} lr {lr:g} seed {seed} ({why})")
            return
        if until and dt.datetime.now(dt.timezone.utc) >= until:
            print(f"stop-at {stop_at} UTC reached; next would be {family.name} {setting} lr {lr:g} seed {seed}")
            return
        key = backend.key(family, setting, lr, seed)
        base = {"key": key, "model": backend.name, "family": family.name, "kind": family.kind, "method": family.method,
                "bits": family.bits, "setting": setting, "lr": lr, "seed": seed}
        old = backend.reused(key)
        params = plan[family.name][setting][1]
        if old is not None and old.get("params") == params:
            record = {**old, **base, "bytes": plan[family.name][setting][0], "from": old.get("from", "older runs")}
        else:
            if max_runs is not None and done >= max_runs:
                print(f"{done} runs trained (--max-runs {max_runs}); next would be {family.name} {setting} lr {lr:g} "
                      f"seed {seed} ({why})")
                return
            record = train_record(backend, base, family, setting, lr, seed)
            done += 1
        append(backend, record)
        state.records[key] = record
        print(f"[{dt.datetime.now():%H:%M}] {family.name} {setting} lr {lr:g} seed {seed} ({why}): {outcome(record)}",
              flush=True)
    print("the protocol is done: every run it asks for has finished", flush=True)

