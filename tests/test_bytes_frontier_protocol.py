"""The bytes-frontier protocol (benchmarks/frontier_protocol.py) on a fake model: lr validation with widening and
the collapse ceiling, the choice at a budget, the run order, resuming, and the outputs (CSV columns, README)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frontier_protocol as fp  # noqa: E402
import frontier_report  # noqa: E402
import frontier_runner  # noqa: E402

pytest.importorskip("matplotlib")


class Fake(fp.Backend):
    """Two families; accuracy peaks at lr 0.1 for PEFT (on the edge: widened) and 0.01 for factnet; lr 0.3
    collapses PEFT; bytes grow with the rank."""

    name, title, chance = "fake", "fake model", 10.0

    def __init__(self, out: Path):
        self.out, self.csv, self.figure = out, out / "frontier_bytes.csv", out / "frontier_bytes.png"
        self.trained: list[str] = []

    def families(self):
        return [fp.Family("PEFT X", "peft", "x", None, ("r 1", "r 8"), "r 1"),
                fp.Family("factnet tt 2-bit", "factnet", "tt", 2, ("r 1", "r 4", "r 64"), "r 4")], ["a note"]

    def measure(self, family, setting):
        r = int(setting.split()[1])
        size = {"x": 3000 * r, "tt": 500 * r}[family.method]
        return size, r * 10

    def key(self, family, setting, lr, seed):
        return f"{family.name}/{setting}/{lr:g}/{seed}"

    def train(self, family, setting, lr, seed):
        self.trained.append(self.key(family, setting, lr, seed))
        r = int(setting.split()[1])
        if family.method == "x":
            val = 10.0 if lr >= 0.3 else 60 + 100 * lr + r
        else:
            val = 70 - abs(lr - 0.01) * 100 + r / 8
        return {"val": val, "test": val + seed, "bytes": self.measure(family, setting)[0], "params": r * 10,
                "seconds": 0.0}


def test_protocol_end_to_end(tmp_path):
    backend = Fake(tmp_path)
    frontier_runner.run(backend)
    state = fp.State(backend, backend.families()[0], json.loads(backend.plan_path.read_text())["families"])
    peft, fact = state.families
    _, lr, runs = state.lr_state(peft)
    assert lr == pytest.approx(0.1) and 0.3 in runs and 1.0 not in runs  # widened to 0.3, which collapsed
    assert state.lr_state(fact)[1] == pytest.approx(0.01)
    assert state.next_run() is None
    # the choice at a budget: the best seed-0 val among the settings whose file fits
    assert state.choose(fact, 1999).setting == "r 1" and state.choose(fact, 40_000).setting == "r 64"
    assert state.choose(peft, 2000) is None
    # chosen points have three seeds; a rerun trains nothing (resumable)
    assert set(state.choose(fact, 40_000).runs) == {0, 1, 2}
    again = Fake(tmp_path)
    frontier_runner.run(again)
    assert again.trained == []
    frontier_report.report(backend)
    rows = list(csv.DictReader(open(backend.csv)))
    assert set(frontier_report.COLUMNS) <= set(rows[0]) and len(rows) == len(fp.BUDGETS)
    row = {int(r["budget_bytes"]): r for r in rows}[4000]
    assert row["factnet_family"] == "factnet tt 2-bit" and row["peft_family"] == "PEFT X"
    text = (tmp_path / "README.md").read_text()
    assert "a note" in text and "| 4 KB |" in text


def test_auto_pick_check_chooses_the_rules_lr_on_validation(tmp_path):
    """The auto check trains seed 0 at each of the rule's lrs, the other seeds only at the one with the best
    validation accuracy (a collapsed lr gets no more seeds), and the frontier's validated lr where it differs."""
    import auto_pick_check as apc

    backend = Fake(tmp_path)
    frontier_runner.run(backend)  # the frontier: factnet tt 2-bit validated at lr 0.01
    family = backend.families()[0][1]
    backend.trained.clear()
    # val 70 - |lr - 0.01| * 100 + 8/8: lr 0.1 validates at 62, 0.02 at 70, and lr 1 collapses (-28)
    pick = {8: (family, "r 8", (0.1, 0.02, 1.0), "why")}
    apc.train_missing(backend, None, pick)
    key = backend.key
    assert backend.trained == [key(family, "r 8", lr, 0) for lr in (0.1, 0.02, 1.0)] + [
        key(family, "r 8", 0.02, s) for s in (1, 2)] + [key(family, "r 8", 0.01, s) for s in (0, 1, 2)]
    st = apc.state(backend)
    assert apc.rule_choice(st, backend, family, "r 8", (0.1, 0.02, 1.0)) == pytest.approx(0.02)
    backend.trained.clear()
    apc.train_missing(backend, None, pick)
    assert backend.trained == []  # resumable: all there


def test_stop_at_means_the_next_such_time_of_day():
    """``--stop-at 00:30`` given at 22:00 is two and a half hours away, not already passed."""
    now = frontier_runner.dt.datetime.now(frontier_runner.dt.timezone.utc)
    for minutes in (-5, 5):
        at = now + frontier_runner.dt.timedelta(minutes=minutes)
        until = frontier_runner.deadline(f"{at:%H:%M}")
        assert (until.hour, until.minute) == (at.hour, at.minute)
        assert now < until <= now + frontier_runner.dt.timedelta(days=1)
        assert (until - now > frontier_runner.dt.timedelta(hours=23)) == (minutes < 0)
    assert frontier_runner.deadline(None) is None


def test_a_run_another_process_appended_is_not_run_again(tmp_path):
    """Beside the frontier an auto check appends runs to the same file: the frontier reads them before each run."""
    other = Fake(tmp_path)

    class Beside(Fake):
        def train(self, family, setting, lr, seed):
            if not self.trained:  # meanwhile, another process finishes the run this one will ask for next
                state = fp.State(self, self.families()[0], json.loads(self.plan_path.read_text())["families"])
                state.records[self.key(family, setting, lr, seed)] = {"val": 50.0}  # (next_run looks past it)
                f, s, r, sd, _ = state.next_run()
                frontier_runner.append(self, {"key": self.key(f, s, r, sd), **other.train(f, s, r, sd)})
            return super().train(family, setting, lr, seed)

    backend = Beside(tmp_path)
    frontier_runner.run(backend, max_runs=2)
    assert len(other.trained) == 1 and other.trained[0] not in backend.trained
    assert len(backend.trained) == 2
