"""The frontier (`factnet frontier`) on a tiny configuration: files, counts, protocol, resume.

Nothing here depends on the CPU's floating-point path: the asserts are on files, structure and
parameter counts (against formulas written out here, and PEFT's own counts), never on accuracy.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch

import factnet
from factnet.app import demo
from factnet.app.cli import main
from factnet.app.demo import frontier, frontier_families
from factnet.app.demo.backbone import pretrained_backbone
from factnet.app.demo.methods import BLOCK_MATRICES, downstream_model
from factnet.app.demo.train import threads

SMOKE = frontier.SMOKE
PRE = SMOKE.demo.pretrain
D, L = PRE.embed_dim, PRE.depth
# (d_in, d_out) of the matrices every method adapts, in each block: qkv, proj, fc1, fc2
MATRICES = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with threads(1):
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("FACTNET_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def made(cache, tmp_path_factory):
    """`factnet frontier --smoke` once: its output folder, its stdout."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("frontier")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["frontier", "--smoke", "--out", str(out), "--no-progress"]) == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def rows(made):
    return {(r["family"], r["budget"]): r for r in frontier.read_csv(made[0] / frontier.CSV_FILE)}


def _count(rows, family, budget=""):
    return int(rows[(family, budget)]["trainable_params"])


def test_the_command_writes_csv_markdown_png_and_the_runs(made):
    out, stdout = made
    for name in (frontier.CSV_FILE, frontier.TABLE_FILE, frontier.FIGURE_FILE, frontier.RUNS_FILE):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in stdout  # the command names what it wrote
    assert (out / frontier.FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    table = (out / frontier.TABLE_FILE).read_text()
    assert table.strip() in stdout  # the command prints the table it wrote
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "setting", "trainable params", "file bytes", "test acc", "step ms"]


def test_every_family_and_budget_is_a_row(rows):
    config = SMOKE
    expected = {("linear probe", ""), ("full fine-tuning", "")}
    expected |= {("PEFT LoRA", f"r {r}") for r in config.lora_ranks}
    expected |= {("PEFT VeRA", f"r {r}") for r in config.vera_ranks}
    expected |= {("PEFT VB-LoRA", f"r {r}, {n} vectors") for r, n in config.vblora}
    if frontier_families._in_peft("tinylora"):  # an older PEFT lacks it: the family is left out, and said so
        expected |= {("PEFT TinyLoRA", f"r {r}, u {u}") for r, u in config.tinylora}
    names = {"tt": "FacT-TT", "tucker": "FacT-TK", "cp": "CP"}
    expected |= {(names[fmt], f"r {r}") for fmt, ranks in config.fact_ranks for r in ranks}
    assert set(rows) == expected


def test_markdown_cells_have_mean_and_std(made, rows):
    lines = [line for line in (made[0] / frontier.TABLE_FILE).read_text().splitlines() if line.startswith("| ")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert len(body) == len(rows)
    for cells in body:
        mean, std = cells[4].split(" ± ")  # test acc: mean ± std over the seeds
        assert 0 <= float(mean) <= 100 and float(std) >= 0
        assert float(cells[5]) > 0  # step ms
    for row in rows.values():
        assert "±" in row["test_acc"] and int(row["seeds"]) == SMOKE.seeds
        assert len(row["test_per_seed"].split()) == SMOKE.seeds


def test_counts_equal_independent_formulas(rows):
    # LoRA: r (d_in + d_out) per adapted matrix (A: r x d_in, B: d_out x r)
    for r in SMOKE.lora_ranks:
        assert _count(rows, "PEFT LoRA", f"r {r}") == L * sum(r * (i + o) for i, o in MATRICES)
    # VeRA: lambda_d (r) and lambda_b (d_out) per matrix; the projections are frozen
    for r in SMOKE.vera_ranks:
        assert _count(rows, "PEFT VeRA", f"r {r}") == L * sum(r + o for _, o in MATRICES)
    # VB-LoRA: the vector bank, plus logits over it for every sub-vector of A and B
    vl = SMOKE.vblora_vector_length
    for r, n in SMOKE.vblora:
        assert _count(rows, "PEFT VB-LoRA", f"r {r}, {n} vectors") == \
            n * vl + L * sum(r * n * (i // vl + o // vl) for i, o in MATRICES)
    # TinyLoRA: u per matrix (no weight tying)
    for r, u in SMOKE.tinylora if frontier_families._in_peft("tinylora") else ():
        assert _count(rows, "PEFT TinyLoRA", f"r {r}, u {u}") == u * L * len(MATRICES)
    # FacT: one 12L x d x d group (q, k, v, o, fc1's and fc2's four d x d blocks of every block)
    n = 12 * L
    for fmt, ranks in SMOKE.fact_ranks:
        for r in ranks:
            expected = {"tt": 2 * D * r + n * r * r, "tucker": r**3 + n * r + 2 * D * r,
                        "cp": r + (n + 2 * D) * r}[fmt]
            assert _count(rows, {"tt": "FacT-TT", "tucker": "FacT-TK", "cp": "CP"}[fmt], f"r {r}") == expected
    assert _count(rows, "linear probe") == 0


def test_counts_equal_peft_and_factnet_on_a_fresh_model(cache, rows):
    import peft

    backbone = pretrained_backbone(PRE, progress=False)
    fresh = lambda: downstream_model(backbone, 5, 0.0)
    model = fresh()
    assert _count(rows, "full fine-tuning") == sum(p.numel() for k, p in model.named_parameters()
                                                   if not k.startswith("head."))
    configs = {("PEFT VeRA", f"r {r}"): peft.VeraConfig(r=r, target_modules=BLOCK_MATRICES)
               for r in SMOKE.vera_ranks}
    configs |= {("PEFT VB-LoRA", f"r {r}, {n} vectors"): peft.VBLoRAConfig(
        r=r, num_vectors=n, vector_length=SMOKE.vblora_vector_length, target_modules=BLOCK_MATRICES)
        for r, n in SMOKE.vblora}
    configs |= {("PEFT LoRA", f"r {r}"): peft.LoraConfig(r=r, target_modules=BLOCK_MATRICES)
                for r in SMOKE.lora_ranks}
    for key, config in configs.items():
        wrapped = peft.get_peft_model(fresh(), config)
        assert int(rows[key]["trainable_params"]) == wrapped.get_nb_trainable_parameters()[0], key
        adapted = {n for n, m in wrapped.named_modules() if hasattr(m, "base_layer")}
        assert len(adapted) == L * len(MATRICES) and not any("patch_embed" in n for n in adapted), key
    for fmt, ranks in SMOKE.fact_ranks:
        for r in ranks:
            name = {"tt": "FacT-TT", "tucker": "FacT-TK", "cp": "CP"}[fmt]
            assert _count(rows, name, f"r {r}") == factnet.Tensorizer(fresh()).num_parameters(fmt, r)


def test_file_bytes_hold_the_parameters(rows):
    for key, row in rows.items():
        size, count = int(row["file_bytes"]), int(row["trainable_params"])
        if key[0] == "linear probe":
            assert size == 0
        elif key[0] == "PEFT VB-LoRA":
            assert size > 4 * SMOKE.vblora_vector_length * SMOKE.vblora[0][1]  # the bank at least, top-k logits only
        else:
            assert size > 4 * count, key  # float32 tensors plus a header


def test_settings_are_chosen_at_every_budget(made, tmp_path):
    """Two candidates for one family: at each budget the seed-0 run with the better val accuracy
    decides, that setting trains the other seeds, and its seed-0 run is the one in the table."""
    import shutil

    shutil.copy(made[0] / frontier.RUNS_FILE, tmp_path)  # the other families' runs: reused, not trained again
    config = replace(SMOKE, seeds=2, lora_ranks=(1, 2), lora_lrs=(1e-3, 3e-2))
    frontier.run(tmp_path, config, progress=False)
    records = [json.loads(line) for line in (tmp_path / frontier.RUNS_FILE).read_text().splitlines()]
    records = [r for r in records if "lr=0.01," not in r["method"] or r["family"] != "PEFT LoRA"]
    rows = {(r["family"], r["budget"]): r for r in frontier.read_csv(tmp_path / frontier.CSV_FILE)}
    for budget in ("r 1", "r 2"):
        tried = [r for r in records if r["family"] == "PEFT LoRA" and r["budget"] == budget and r["seed"] == 0]
        assert len(tried) == 2  # one per candidate learning rate
        best = max(tried, key=lambda r: r["val_accuracy"])  # the first of equals, as the frontier takes
        lr = 1e-3 if "lr=0.001" in best["method"] else 3e-2
        row = rows[("PEFT LoRA", budget)]
        assert row["setting"].endswith(f"lr {lr:g}") and row["candidates"] == "2"
        assert float(row["val_acc_seed0"]) == pytest.approx(best["val_accuracy"], abs=0.06)
        assert float(row["test_per_seed"].split()[0]) == pytest.approx(best["test_accuracy"], abs=0.006)
    lora_runs = [r for r in records if r["family"] == "PEFT LoRA"]
    assert len(lora_runs) == 2 * (2 + 1)  # per budget: the candidates, then the chosen one's other seed


def test_a_rerun_reuses_the_finished_runs(made, monkeypatch, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(made[0], out)
    before = (out / frontier.CSV_FILE).read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(frontier, "adapt", no_training)
    frontier.run(out, SMOKE, progress=False)
    assert (out / frontier.CSV_FILE).read_text() == before  # the same table from the same runs
    assert "0 of the" in (out / frontier.TABLE_FILE).read_text()


def test_replot_draws_the_figure_from_the_csv(made, tmp_path):
    import shutil

    shutil.copy(made[0] / frontier.CSV_FILE, tmp_path / frontier.CSV_FILE)
    path = frontier.replot(tmp_path, SMOKE)
    assert path == tmp_path / frontier.FIGURE_FILE and path.read_bytes()[:4] == b"\x89PNG"


def test_the_wide_backbone_is_wide_and_the_default_demo_is_unchanged():
    assert frontier.WIDE.embed_dim >= 192 and frontier.WIDE.depth == 4
    assert frontier.FrontierConfig().demo.pretrain == frontier.WIDE
    default = demo.DemoConfig()
    assert (default.pretrain.embed_dim, default.pretrain.depth) == (64, 4)  # what `factnet train` pretrains
    # the same recipe as the default demo; the backbone differs in width, heads and patch size only
    assert replace(frontier.FrontierConfig().demo, pretrain=default.pretrain) == default
    assert replace(frontier.WIDE, embed_dim=64, num_heads=4, patch_size=2) == default.pretrain


def test_csv_is_plain_csv(made):
    with open(made[0] / frontier.CSV_FILE, newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert len({len(row) for row in table}) == 1 and table[0][:3] == ["family", "budget", "setting"]
    assert torch.tensor([int(r[5]) for r in table[1:]]).min() >= 0  # trainable params column
