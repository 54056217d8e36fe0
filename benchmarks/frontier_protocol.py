"""The bytes-frontier protocol, model-agnostic: families, learning-rate validation, the run order, the choice at
every byte budget. `benchmarks/bytes_frontier.py` gives it a model (a `Backend`: the wide ViT of the embedded task, or
EfficientNet-Lite0 on Fashion-MNIST) and the command line; `benchmarks/frontier_runner.py` trains what the protocol
asks for; `benchmarks/frontier_report.py` writes the CSV, figure and README from the runs.

Protocol (nothing is chosen on test):

1. **Learning rate, per family**, on seed 0 at the family's reference setting: the candidates `LRS`, the same for
   PEFT tuners and factnet formats, widened one ladder step (`LADDER`) at a time while the best sits on an edge;
   a candidate above an lr whose run collapsed (validation at chance) is not run.
2. **Every other setting** of the family at that lr, seed 0, in an order that covers the byte budgets first: for
   each budget from the smallest, each family's largest setting whose file fits (file bytes measured on an
   untrained adapter before training: they do not depend on the values), then the rest.
3. **A family's point at a budget**: its setting (at its lr) with the best seed-0 validation accuracy among those
   whose file fits (ties: the smaller file). The chosen points run seeds 1 and 2: first the table's (at each
   budget the best factnet point and the best PEFT point by mean validation accuracy over the seeds run), then
   the rest of every family's envelope.
4. **The table**: at each budget, factnet's best (of every factnet family's point, by mean validation accuracy)
   and PEFT's best likewise, with test accuracy mean ± sample std over the seeds run (3 when finished).

Runs are appended to the backend's ``runs.jsonl``, one JSON object a line, keyed by `Backend.key`; a key already
there is never rerun. A key found in an older runs file (`Backend.reused`) is copied over (with ``from``) when its
trainable-parameter count equals what the installed factnet builds now (so a run of a setting whose adapter the
library has since changed, e.g. a rank cap lifted, is rerun).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

KB = 1000
BUDGETS = tuple(2 ** k * KB for k in range(11))  # 1 KB ... 1024 KB (KB = 1000 bytes, as docs/bytes counts)
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # every family's candidates
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # how far an edge may widen
BITS = (1, 2, 4, None)  # factnet families: trained at these bits (None: full precision)
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Family:
    """One line of the figure: a PEFT tuner, or a factnet format at one bit width, over its settings."""

    name: str  # "PEFT LoRA", "factnet tt 2-bit", "factnet vera fp32"
    kind: str  # "peft" | "factnet"
    method: str  # the tuner or the format
    bits: int | None
    settings: tuple[str, ...]  # setting labels, smallest first ("r 8", "block 4", "r 2, 16 vectors")
    reference: str  # the setting the learning rate is validated at


@dataclass
class Point:
    """One setting of a family at the family's chosen lr, with its runs by seed."""

    family: Family
    setting: str
    lr: float
    bytes: int
    runs: dict[int, dict] = field(default_factory=dict)

    @property
    def val0(self) -> float:
        return self.runs[0]["val"]

    def stat(self, what: str) -> tuple[float, float, int]:
        values = [r[what] for r in self.runs.values()]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)

    @property
    def label(self) -> str:
        return f"{self.setting}, lr {self.lr:g}"


class Backend:
    """What a model gives the protocol. Subclasses: `bytes_frontier.Wide`, `bytes_frontier.Lite0`."""

    name = ""
    title = ""  # the figure's title
    out: Path  # folder of runs.jsonl, README.md
    csv: Path
    figure: Path
    chance = 10.0  # validation accuracy (%) of a run that predicts one class

    def families(self) -> tuple[list[Family], list[str]]:
        """The families to run and notes on what was left out (and why)."""
        raise NotImplementedError

    def measure(self, family: Family, setting: str) -> tuple[int, int]:
        """(file bytes without the head, trainable parameters without the head) of an untrained adapter."""
        raise NotImplementedError

    def key(self, family: Family, setting: str, lr: float, seed: int) -> str:
        raise NotImplementedError

    def reused(self, key: str) -> dict | None:
        """A finished run of ``key`` from an older runs file, normalized (val, test, params, bytes, seconds)."""
        return None

    def train(self, family: Family, setting: str, lr: float, seed: int) -> dict:
        """Train one run: a dict with val, test (%), bytes, params, seconds (and anything else to keep)."""
        raise NotImplementedError

    def header(self) -> list[str]:
        """README lines under the title: commands, machine, task and recipe."""
        return []

    @property
    def runs_path(self) -> Path:
        return self.out / "runs.jsonl"

    @property
    def plan_path(self) -> Path:
        return self.out / "plan.json"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def normalize(record: dict) -> dict:
    """Older runs files name the accuracies val_accuracy / test_accuracy (docs/frontier, docs/bytes before)."""
    out = dict(record)
    if "val" not in out and "val_accuracy" in out:
        out["val"], out["test"] = out["val_accuracy"], out["test_accuracy"]
    return out


def collapsed(record: dict, chance: float) -> bool:
    val = record.get("val")
    return val is None or not math.isfinite(val) or val < 1.2 * chance


# ---- the state: what ran, what the protocol chooses ------------------------------------------------------
class State:
    """The runs so far and every choice the protocol makes from them."""

    def __init__(self, backend: Backend, families: list[Family], plan: dict[str, dict[str, list[int]]]):
        self.backend, self.families, self.plan = backend, families, plan  # plan: family -> setting -> [bytes, params]
        self.records: dict[str, dict] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read the runs file again: runs another process appended (an auto check beside the frontier) count."""
        self.records.update((r["key"], normalize(r)) for r in read_jsonl(self.backend.runs_path) if "key" in r)

    def run_of(self, family: Family, setting: str, lr: float, seed: int) -> dict | None:
        """The run, unless the installed factnet builds this setting with another parameter count than the run
        had (a library change, e.g. a rank cap lifted): such a run is stale and runs again."""
        record = self.records.get(self.backend.key(family, setting, lr, seed))
        planned = self.plan.get(family.name, {}).get(setting)
        if record is not None and planned and record.get("params") not in (None, planned[1]):
            return None
        return record

    def usable(self, family: Family, setting: str) -> bool:
        """In the plan (it builds, its file is at most the largest budget); a family the plan has not measured
        yet (a report before the runner planned it) keeps every setting."""
        return family.name not in self.plan or setting in self.plan[family.name]

    # -- step 1: the learning rate
    def lr_state(self, family: Family) -> tuple[float | None, float | None, dict[float, dict]]:
        """(the next lr to run at the reference, the chosen lr, {lr: seed-0 run at the reference})."""
        grid = list(LRS)
        while True:
            runs = {lr: r for lr in grid if (r := self.run_of(family, family.reference, lr, 0)) is not None}
            fallen = [lr for lr, r in runs.items() if "error" not in r and collapsed(r, self.backend.chance)]
            ceiling = min(fallen) if fallen else math.inf
            pending = [lr for lr in grid if lr not in runs and lr <= ceiling]
            if pending:
                return pending[0], None, runs
            chance = self.backend.chance
            scored = {lr: r["val"] for lr, r in runs.items() if "error" not in r and not collapsed(r, chance)}
            if not scored:
                return None, None, runs
            best = max(sorted(scored), key=lambda lr: scored[lr])  # ties: the smaller lr
            i = LADDER.index(best)
            if best == max(grid) and i + 1 < len(LADDER) and LADDER[i + 1] <= ceiling and LADDER[i + 1] not in grid:
                grid.append(LADDER[i + 1])
                continue
            if best == min(grid) and i > 0 and LADDER[i - 1] not in grid:
                grid.insert(0, LADDER[i - 1])
                continue
            return None, best, runs

    # -- steps 2, 3: points
    def points(self, family: Family) -> list[Point]:
        """The family's settings at its chosen lr that have a seed-0 run, with every seed's run."""
        _, lr, _ = self.lr_state(family)
        if lr is None:
            return []
        out = []
        for setting in family.settings:
            if not self.usable(family, setting):
                continue
            runs = {s: r for s in SEEDS if (r := self.run_of(family, setting, lr, s)) is not None and "error" not in r}
            if 0 in runs and not collapsed(runs[0], -1):  # a NaN run has no point
                # the file size the installed factnet writes (the plan's), else the run's own
                size = self.plan.get(family.name, {}).get(setting, [runs[0]["bytes"]])[0]
                out.append(Point(family, setting, lr, size, runs))
        return out

    def choose(self, family: Family, budget: int) -> Point | None:
        fits = [p for p in self.points(family) if p.bytes <= budget]
        return max(fits, key=lambda p: (p.val0, -p.bytes)) if fits else None

    def best(self, kind: str, budget: int) -> Point | None:
        """Of ``kind``'s families' points at ``budget``, the best by mean validation accuracy over its seeds."""
        chosen = [p for f in self.families if f.kind == kind for p in [self.choose(f, budget)] if p is not None]
        return max(chosen, key=lambda p: (p.stat("val")[0], -p.bytes)) if chosen else None

    # -- the run order
    def next_run(self) -> tuple[Family, str, float, int, str] | None:
        """(family, setting, lr, seed, why) of the next run, or None when the protocol is done."""
        for family in self.families:  # 1: the learning rates
            lr, _, _ = self.lr_state(family)
            if lr is not None and self.usable(family, family.reference):
                return family, family.reference, lr, 0, "lr validation"
        pending = {}
        for family in self.families:  # 2: the other settings, budgets covered first
            _, lr, _ = self.lr_state(family)
            if lr is None:
                continue
            todo = [s for s in family.settings if self.usable(family, s) and self.run_of(family, s, lr, 0) is None]
            if todo:
                pending[family.name] = (family, lr, todo)
        for budget in BUDGETS:
            for family, lr, todo in pending.values():
                fits = [s for s in todo if self.plan[family.name][s][0] <= budget]
                if fits:
                    largest = max(fits, key=lambda s: self.plan[family.name][s][0])
                    return family, largest, lr, 0, f"seed 0, <= {budget // KB} KB"
        for family, lr, todo in pending.values():
            return family, todo[0], lr, 0, "seed 0, larger than every budget"
        for budget in BUDGETS:  # 3: the table's points
            for kind in ("factnet", "peft"):
                point = self.best(kind, budget)
                if point is not None and (seed := self._missing_seed(point)) is not None:
                    return point.family, point.setting, point.lr, seed, f"table point at {budget // KB} KB"
        for budget in BUDGETS:  # 4: every family's envelope
            for family in self.families:
                point = self.choose(family, budget)
                if point is not None and (seed := self._missing_seed(point)) is not None:
                    return family, point.setting, point.lr, seed, f"envelope at {budget // KB} KB"
        return None

    def _missing_seed(self, point: Point) -> int | None:
        for seed in SEEDS:
            if self.run_of(point.family, point.setting, point.lr, seed) is None:
                return seed
        return None

