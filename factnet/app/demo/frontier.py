"""The frontier on the embedded task: test accuracy against trainable parameters (the paper's Fig. 1).

    from factnet.app.demo.frontier import run
    table = run(Path("frontier"))        # frontier.csv, frontier.md, frontier.png, runs.jsonl

Every method adapts the wide backbone (`WIDE`: ViT-Ti's width 192, 3 heads, the demo's depth 4,
pretrained on the digits 0–4 with the default backbone's recipe and cached the same way, in
``$FACTNET_CACHE``) to the digits 5–9 with the demo's recipe (`factnet.app.demo.DemoConfig`: AdamW,
warmup/cosine, 100 epochs, batch 32, dropout 0.1, drop-path 0.1). Its patches are 4×4 (4 tokens
and the class token), not the default's 2×2: at width 192 a 2×2-patch step costs four times as
much (a full fine-tuning step 167 ms against 42 ms on one core), which would put the training runs
of the frontier at many hours on a 2-core machine; the parameter counts, which are what the wider
backbone is for, do not depend on the patch size. The families and their budgets:

- linear probe and full fine-tuning, the two ends;
- PEFT LoRA at ranks 1 to 16 (alpha = r);
- PEFT VeRA at ranks 16 to 1024, VB-LoRA and TinyLoRA at two budgets each;
- FacT-TT, FacT-TK and CP (factnet's ``tt``, ``tucker``, ``cp``) at ranks 1 to 64.

All PEFT tuners adapt the matrices FacT adapts: ``qkv``, ``proj``, ``fc1`` and ``fc2`` of every
block (`factnet.app.demo.methods.BLOCK_MATRICES`).

Protocol (nothing is chosen on test). A family's hyper-parameter (the learning rate; for FacT,
the paper's scale grid at the demo's FacT learning rate) is chosen at every budget: each candidate
trains with seed 0 and the best validation accuracy wins (ties: the first listed); the winner then
trains with seeds 1..n-1 too. The table gives test accuracy, mean ± sample std over seeds.

Counts exclude the new head every method trains. File bytes: the file each method would ship
without the head, in its smallest form that reloads: factnet's adapter file (tensors plus its
JSON spec), PEFT's adapter state dict as safetensors (VeRA and TinyLoRA without the projections
they regenerate from a seed, VB-LoRA with only its top-k weights), the backbone's weights for
full fine-tuning, nothing for the linear probe.

Each finished run is appended to ``runs.jsonl`` in the output folder; a rerun with the same
settings reuses those runs (so an interrupted run continues).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from factnet.app.demo.backbone import Backbone, pretrained_backbone
from factnet.app.demo.data import Splits, load_splits
from factnet.app.demo.frontier_families import SMOKE, WIDE, Family, FrontierConfig, Point, families, left_out
from factnet.app.demo.frontier_plot import plot, read_csv
from factnet.app.demo.methods import Method, Result, adapt
from factnet.app.demo.train import threads

__all__ = [
    "CSV_FILE",
    "FIGURE_FILE",
    "RUNS_FILE",
    "SMOKE",
    "TABLE_FILE",
    "WIDE",
    "Family",
    "FrontierConfig",
    "Point",
    "families",
    "plot",
    "read_csv",
    "replot",
    "run",
    "title",
]

CSV_FILE, TABLE_FILE, FIGURE_FILE, RUNS_FILE = "frontier.csv", "frontier.md", "frontier.png", "runs.jsonl"

# ---- running --------------------------------------------------------------------------------------
def _key(backbone: Backbone, demo, method: Method, seed: int) -> str:
    # keys from before Method had a gain, and then bits, stay valid: the repr without those fields when unset
    described = repr(method).replace(", bits=None)", ")").replace(", gain=None)", ")")
    text = json.dumps({"backbone": backbone.config.key(), "recipe": asdict(demo.recipe()), "augment": demo.augment,
                       "method": described, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _record(result: Result, key: str, family: str, budget: str) -> dict:
    values = asdict(result)
    values["method"] = repr(result.method)
    return {"key": key, "family": family, "budget": budget, **values}


def _from_record(record: dict, method: Method) -> Result:
    names = ("seed", "val_accuracy", "test_accuracy", "params", "head_params", "bytes", "step_ms", "seconds")
    return Result(method, **{n: record[n] for n in names}, epoch_losses=tuple(record.get("epoch_losses", ())))


def _worker(backbone: Backbone, method: Method, splits: Splits, demo, seed: int) -> Result:
    with threads(demo.threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*save_projection.*|.*[Ss]pecified to not save.*")
        return adapt(backbone, method, splits, demo.recipe(), seed=seed, augment=demo.augment, progress=False)[0]


class _Runner:
    """Trains (method, seed) pairs, inline or in ``jobs`` processes, reusing runs from ``runs.jsonl``."""

    def __init__(self, backbone: Backbone, splits: Splits, demo, out_dir: Path, jobs: int, bar) -> None:
        self.backbone, self.splits, self.demo, self.bar = backbone, splits, demo, bar
        self.path = out_dir / RUNS_FILE
        self.done: dict[str, dict] = {}
        self.trained = 0  # runs trained by this call (the others came from runs.jsonl)
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.done[record["key"]] = record
        self.pool = None
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, method: Method, seed: int, family: str, budget: str):
        """A future-like object whose ``result()`` is the run's `Result`."""
        key = _key(self.backbone, self.demo, method, seed)
        if key in self.done:
            return _Done(self._finish(_from_record(self.done[key], method), key, family, budget, cached=True))
        if self.pool is None:
            result = _worker(self.backbone, method, self.splits, self.demo, seed)
            return _Done(self._finish(result, key, family, budget))
        future = self.pool.submit(_worker, self.backbone, method, self.splits, self.demo, seed)
        return _Pending(future, lambda result: self._finish(result, key, family, budget))

    def _finish(self, result: Result, key: str, family: str, budget: str, cached: bool = False) -> Result:
        if not cached:
            self.trained += 1
            record = _record(result, key, family, budget)
            self.done[key] = record
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        self.bar.update()
        self.bar.set_postfix_str(f"{family}, {result.method.settings}: val {result.val_accuracy:.1f}",
                                 refresh=False)
        return result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _Done:
    def __init__(self, result: Result) -> None:
        self._result = result

    def result(self) -> Result:
        return self._result


class _Pending:
    def __init__(self, future, finish: Callable[[Result], Result]) -> None:
        self.future, self.finish, self._result = future, finish, None

    def result(self) -> Result:
        if self._result is None:
            self._result = self.finish(self.future.result())
        return self._result


def _points(config: FrontierConfig, runner: _Runner, order: list[Family]) -> list[Point]:
    """At every budget of every family: each candidate setting with seed 0, the best on validation (the
    first of equals), then that setting with the other seeds. FacT's families run first (the cheapest
    runs, and the subject). Inline, each family finishes before the next starts, so an interrupted run
    leaves whole families in ``runs.jsonl``; with parallel jobs all candidates are queued first, so that
    the jobs always have work."""
    tried: dict[tuple[str, str], list] = {}
    chosen: dict[tuple[str, str], tuple[int, Method, list]] = {}

    def try_candidates(family: Family) -> None:
        for budget, method in family.points:
            tried[family.name, budget] = [runner.submit(replace(method, **dict(c)), 0, family.name, budget)
                                          for c in family.candidates]

    def choose(family: Family) -> None:
        for budget, method in family.points:
            results = [t.result() for t in tried[family.name, budget]]
            best = max(range(len(results)), key=lambda i: results[i].val_accuracy)
            method = replace(method, **dict(family.candidates[best]))
            chosen[family.name, budget] = best, method, [runner.submit(method, s, family.name, budget)
                                                         for s in range(1, config.seeds)]

    run_order = sorted(order, key=lambda f: f.points[0][1].kind != "fact")
    if runner.pool is None:
        for family in run_order:
            try_candidates(family)
            choose(family)
    else:
        for family in run_order:
            try_candidates(family)
        for family in run_order:
            choose(family)
    points = []
    for family in order:
        for budget, _ in family.points:
            best, method, others = chosen[family.name, budget]
            results = [tried[family.name, budget][best].result()] + [o.result() for o in others]
            points.append(Point(family.name, budget, method, len(family.candidates), results))
    return points


def run(out_dir: Path, config: FrontierConfig | None = None, *, jobs: int = 1, progress: bool = True) -> str:
    """Train the frontier, write ``frontier.csv``, ``frontier.md`` and ``frontier.png`` to ``out_dir``;
    the markdown table.

    ``jobs``: training runs side by side, each in its own process with ``config.demo.threads``
    torch threads (1: one after another, in this process).
    """
    from tqdm.auto import tqdm

    config = config or FrontierConfig()
    if config.seeds < 1 or jobs < 1:
        raise ValueError(f"seeds and jobs must be >= 1, got {config.seeds} and {jobs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = config.demo
    order = families(config)
    total = sum(len(f.points) * (len(f.candidates) - 1 + config.seeds) for f in order)
    start = time.perf_counter()
    with threads(demo.threads):
        splits = load_splits(demo.pretrain.data)
        backbone = pretrained_backbone(demo.pretrain, progress=progress, splits=splits)
        bar = tqdm(total=total, desc="frontier", unit="run", disable=not progress, smoothing=0)
        runner = _Runner(backbone, splits, demo, out_dir, jobs, bar)
        try:
            points = _points(config, runner, order)
        finally:
            runner.close()
            bar.close()
    seconds = time.perf_counter() - start
    info = _Info(backbone, splits, demo, config, seconds, jobs, runner.trained, total)
    _write(out_dir / CSV_FILE, _csv(points))
    table = _markdown(points, info)
    _write(out_dir / TABLE_FILE, table + "\n")
    replot(out_dir, config)
    return table


@dataclass
class _Info:
    backbone: Backbone
    splits: Splits
    demo: object
    config: FrontierConfig
    seconds: float
    jobs: int
    trained: int  # runs trained by this call
    runs: int  # runs in the table (trained now or reused from runs.jsonl)


def _write(path: Path, text: str) -> None:
    from factnet import write_atomically

    write_atomically(str(path), lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def _csv(points: Sequence[Point]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["family", "budget", "setting", "candidates", "trainable_params",
                     "file_bytes", "test_acc", "test_mean", "test_std", "val_acc_seed0", "step_ms", "seeds",
                     "test_per_seed"])
    for p in points:
        mean, std = p.test()
        writer.writerow([p.family, p.budget, p.method.settings, p.candidates, p.params, p.bytes,
                         f"{mean:.1f} ± {std:.1f}", f"{mean:.2f}", f"{std:.2f}",
                         f"{p.results[0].val_accuracy:.1f}", f"{p.step_ms:.1f}", len(p.results),
                         " ".join(f"{r.test_accuracy:.2f}" for r in p.results)])
    return buffer.getvalue()


def _markdown(points: Sequence[Point], info: _Info) -> str:
    pre, demo, splits = info.backbone.config, info.demo, info.splits
    lines = [
        (f"Frontier: digits {_digits(splits.downstream_classes)} ({len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images) on a ViT (width {pre.embed_dim}, depth {pre.depth}, {pre.num_heads} heads, "
        f"{pre.patch_size}x{pre.patch_size} patches of 8x8 images) pretrained on digits "
        f"{_digits(splits.pretrain_classes)} (val accuracy {info.backbone.val_accuracy:.1f}%). One recipe for all: "
        f"{demo.epochs} epochs, batch {demo.batch_size}, AdamW + warmup/cosine, weight decay {demo.weight_decay:g}, "
        f"dropout {demo.dropout:g}, drop-path {demo.drop_path:g}. At every budget each family's learning rate (FacT: "
        f"the paper's scale, at lr {demo.lr:g}) is chosen on val with seed 0 among its candidates; test "
        f"accuracy mean ± std over {info.config.seeds} seed(s) of the chosen setting."),
        "",
        "| method | setting | trainable params | file bytes | test acc | step ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in points:
        mean, std = p.test()
        mark = f" (best of {p.candidates})" if p.candidates > 1 else ""
        lines.append(f"| {p.family} | {p.method.settings}{mark} | {p.params:,} | {p.bytes:,} | "
                     f"{mean:.1f} ± {std:.1f} | {p.step_ms:.1f} |")
    head = points[0].results[0].head_params
    cache = "backbone from the cache" if info.backbone.cached else f"pretraining {info.backbone.seconds:.0f} s"
    lines += [
        "",
        f"Every method also trains the new head ({head:,} parameters), not counted above. PEFT tuners adapt qkv, "
        "proj, fc1 and fc2 of every block, the matrices FacT adapts (trainable params: PEFT's own "
        "get_nb_trainable_parameters()). File bytes: the file without the head (factnet's adapter file with its JSON "
        "spec; PEFT's adapter state dict: VeRA and TinyLoRA without their seeded projections, VB-LoRA with top-k "
        "weights only; the backbone for full fine-tuning). Step: median ms of a training step at "
        f"{demo.threads or 'default'} torch thread(s), {info.jobs} run(s) side by side. Wall time "
        f"{info.seconds:.0f} s for " + (f"all {info.runs} training runs" if info.trained == info.runs else
                                         f"{info.trained} of the {info.runs} training runs (the others from "
                                         f"{RUNS_FILE})") + f" ({cache}).",
    ]
    if left_out():
        lines[-1] += " Left out: " + "; ".join(left_out()) + "."
    return "\n".join(lines)


def _digits(classes: tuple[int, ...]) -> str:
    return f"{classes[0]}-{classes[-1]}" if list(classes) == list(range(classes[0], classes[-1] + 1)) else \
        ",".join(map(str, classes))


def title(config: FrontierConfig) -> str:
    """The figure's title: the task and the backbone."""
    pre, data = config.demo.pretrain, config.demo.pretrain.data
    down = tuple(d for d in range(10) if d not in data.pretrain_classes)
    return (f"Digits {_digits(down)}, ViT (width {pre.embed_dim}, depth {pre.depth}) pretrained on digits "
            f"{_digits(tuple(sorted(data.pretrain_classes)))}: test accuracy vs trainable parameters and file bytes")


def replot(out_dir: Path, config: FrontierConfig | None = None) -> Path:
    """Draw ``frontier.png`` again from the ``frontier.csv`` in ``out_dir`` (no training)."""
    out_dir = Path(out_dir)
    path = out_dir / FIGURE_FILE
    plot(read_csv(out_dir / CSV_FILE), path, title=title(config or FrontierConfig()))
    return path
