"""The ``factnet`` command line end to end, in process through ``main([...])`` (plus one run of the
installed script): tiny timm ViTs saved as local checkpoints, tiny PNG data sets in both layouts
where the class is the colour."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import factnet
from factnet.quant import stored_bytes
import factnet.app.cli
import factnet.app.runs
import factnet.app.training
from factnet.app.cli import main
from factnet.app.data import image_transform, load_task, make_loader
from factnet.app.runs import SettingResult, build_model
from factnet.app.training import ADAPTER_FILE, METRICS_FILE, RESUME_FILE, evaluate, read_metrics

MODEL = "vit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
KWARGS_FLAG = "img_size=32,patch_size=8,depth=2,embed_dim=48,num_heads=3"
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
SPLIT_SIZES = {"train800": 6, "val200": 3, "test": 3}  # images per class
FOLDER_SPLITS = {"train800": "train", "val200": "val", "test": "test"}
QUICK = ["--epochs", "2", "--warmup-epochs", "0", "--batch-size", "8", "--lr", "1e-2", "--workers", "0",
         "--no-progress"]


def write_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """``vtab``: a VTAB-1K task folder; ``folder``: the same images as an ImageFolder tree;
    ``checkpoint``: a tiny ViT's weights (3 classes, head zeroed so it starts at chance)."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {}
    for split, count in SPLIT_SIZES.items():
        for label, colour in enumerate(COLOURS):
            for i in range(count):
                relative = f"images/{split}/{label}_{i}.png"
                write_image(root / "vtab" / relative, colour, rng)
                lines.setdefault(split, []).append(f"{relative} {label}")
                folder = root / "folder" / FOLDER_SPLITS[split] / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(root / "vtab" / relative, folder / f"{i}.png")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, entries in lines.items():
        (root / "vtab" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=3, **KWARGS)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    save_file(model.state_dict(), str(root / "tiny.safetensors"))
    return types.SimpleNamespace(root=root, vtab=root / "vtab", folder=root / "folder",
                                 checkpoint=root / "tiny.safetensors")


def model_flags(toy: types.SimpleNamespace) -> list[str]:
    return ["--model", MODEL, "--checkpoint", str(toy.checkpoint), "--model-kwargs", KWARGS_FLAG]


def tiny_from(checkpoint: Path, num_classes: int = 3) -> torch.nn.Module:
    """The reference: timm's model with the checkpoint's weights loaded by hand."""
    model = timm.create_model(MODEL, pretrained=False, num_classes=num_classes, **KWARGS)
    state = load_file(str(checkpoint))
    if num_classes != 3:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=num_classes == 3)
    return model.eval()


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, expected: str) -> None:
    assert status == 2, err
    assert err.startswith("factnet: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err


# ---- models ---------------------------------------------------------------------------------------
def test_checkpoint_weights_are_loaded(toy: types.SimpleNamespace) -> None:
    images = torch.randn(2, 3, 32, 32)
    built = build_model(MODEL, checkpoint=toy.checkpoint, num_classes=3, kwargs=KWARGS).eval()
    torch.testing.assert_close(built(images), tiny_from(toy.checkpoint)(images), rtol=0, atol=0)
    other_head = build_model(MODEL, checkpoint=toy.checkpoint, num_classes=5, kwargs=KWARGS).eval()
    reference = tiny_from(toy.checkpoint, num_classes=5)
    torch.testing.assert_close(other_head.forward_features(images), reference.forward_features(images), rtol=0, atol=0)
    assert other_head.head.weight.shape == (5, 48)  # the checkpoint's 3-class head is left out


def test_without_checkpoint_the_model_is_random_and_says_so(capsys: pytest.CaptureFixture) -> None:
    build_model(MODEL, num_classes=3, kwargs=KWARGS)
    assert "random weights" in capsys.readouterr().err


def test_model_kwargs_parse_literals_tuples_and_json() -> None:
    from factnet.app.arguments import model_kwargs

    assert model_kwargs("img_size=32,depths=(2, 2),global_pool=avg,qkv_bias=False") == dict(
        img_size=32, depths=(2, 2), global_pool="avg", qkv_bias=False)
    assert model_kwargs('{"img_size": 32, "depths": [2, 2]}') == dict(img_size=32, depths=[2, 2])


# ---- train ----------------------------------------------------------------------------------------
def test_train_learns_the_toy_task_and_leaves_adapter_and_metrics(toy, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    status, stdout, err = run(["train", "--data", toy.vtab, *model_flags(toy), "--rank", "4", "--scale", "10",
                               *QUICK, "--epochs", "4", "--out", out], capsys)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_FILE, METRICS_FILE]
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    assert set(lines[0]) == {"epoch", "lr", "train_loss", "train_acc", "eval_acc", "eval_split", "seconds"}
    assert all(line["eval_split"] == "val200" and line["eval_acc"] is not None for line in lines)
    # chance before training (the zeroed head ties), learned after; the file reproduces it
    model = build_model(MODEL, checkpoint=toy.checkpoint, num_classes=3, kwargs=KWARGS)
    task = load_task(toy.vtab, "train800")
    loader = make_loader(task.evaluation, image_transform(model), 16, shuffle=False)
    assert evaluate(model, loader) == pytest.approx(1 / 3)
    assert lines[-1]["eval_acc"] >= 0.9 and lines[-1]["train_loss"] < lines[0]["train_loss"]
    adapter = factnet.load(model, out / ADAPTER_FILE)
    assert (adapter.format.rank, adapter.settings.scale) == (4, 10.0)
    assert evaluate(model, loader) == lines[-1]["eval_acc"]
    assert f"val200 accuracy {lines[-1]['eval_acc']:.4f}" in stdout


def test_bits_train_the_factors_and_head_as_the_low_bit_file_stores_them(toy, tmp_path, capsys) -> None:
    out = tmp_path / "low"
    status, stdout, err = run(["train", "--data", toy.vtab, *model_flags(toy), "--rank", "4", "--scale", "10",
                               "--bits", "2", "--head-bits", "4", *QUICK, "--out", out], capsys)
    assert status == 0, err
    assert factnet.file.info.load_spec(out / ADAPTER_FILE)["bits"] | {"shapes": None} == {"factors": 2, "head": 4, "group": 64,
                                                                                "shapes": None}
    model = build_model(MODEL, checkpoint=toy.checkpoint, num_classes=3, kwargs=KWARGS)
    factnet.load(model, out / ADAPTER_FILE)
    loader = make_loader(load_task(toy.vtab, "train800").evaluation, image_transform(model), 16, shuffle=False)
    assert evaluate(model, loader) == read_metrics(out)[-1].eval_acc  # the file is the trained model
    size, head = (out / ADAPTER_FILE).stat().st_size, sum(stored_bytes(p.numel(), 4) for p in model.head.parameters())
    assert f"({size:,} bytes, {size - head:,} without the head" in stdout
    status, _, err = run(["train", "--bits", "3"], capsys)
    assert status == 2 and "invalid choice: 3" in err


def test_final_split_on_an_image_folder_evaluates_test_once(toy, tmp_path, capsys) -> None:
    out = tmp_path / "final"
    status, _, err = run(["train", "--data", toy.folder, *model_flags(toy), "--split", "train800val200", *QUICK,
                          "--out", out], capsys)
    assert status == 0, err
    history = read_metrics(out)
    assert [(m.eval_split, m.eval_acc is None) for m in history] == [("test", True), ("test", False)]
    task = load_task(toy.folder, "train800val200")
    assert len(task.train) == 3 * (6 + 3) and len(task.evaluation) == 3 * 3


def test_preset_trains_with_the_published_rank_and_scale(toy, tmp_path, capsys) -> None:
    status, _, err = run(["train", "--data", toy.vtab, *model_flags(toy), "--preset", "vtab1k/clevr_dist",
                          "--format", "tucker", *QUICK, "--epochs", "1", "--out", tmp_path / "p"], capsys)
    assert status == 0, err
    model = build_model(MODEL, checkpoint=toy.checkpoint, num_classes=6, kwargs=KWARGS)  # the task's 6 classes,
    adapter = factnet.load(model, tmp_path / "p" / ADAPTER_FILE)  # though the toy data uses 3
    assert (adapter.format.name, adapter.format.rank, adapter.settings.scale) == ("tucker", 16, 10.0)  # 16,10.0


def test_resume_after_an_interruption_is_bit_exact(toy, tmp_path, capsys, monkeypatch) -> None:
    args = ["train", "--data", toy.vtab, *model_flags(toy), "--rank", "2", *QUICK, "--epochs", "3",
            "--batch-size", "4", "--drop-path", "0.1"]
    assert run([*args, "--out", tmp_path / "straight"], capsys)[0] == 0

    real_evaluate, calls = factnet.app.training.evaluate, []

    def interrupted_in_epoch_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(factnet.app.training, "evaluate", interrupted_in_epoch_two)
    status, _, err = run([*args, "--out", tmp_path / "resumed"], capsys)
    assert status == 130 and "--resume" in err
    assert (tmp_path / "resumed" / RESUME_FILE).is_file() and len(read_metrics(tmp_path / "resumed")) == 1
    monkeypatch.setattr(factnet.app.training, "evaluate", real_evaluate)
    assert_one_line_error(*run([*args, "--out", tmp_path / "resumed"], capsys)[::2], "--resume")
    assert_one_line_error(*run([*args, "--lr", "0.5", "--out", tmp_path / "resumed", "--resume"], capsys)[::2],
                          "recipe")
    assert run([*args, "--out", tmp_path / "resumed", "--resume"], capsys)[0] == 0

    straight, resumed = (load_file(str(tmp_path / name / ADAPTER_FILE)) for name in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    trained = factnet.load(build_model(MODEL, checkpoint=toy.checkpoint, num_classes=3, kwargs=KWARGS),
                           tmp_path / "straight" / ADAPTER_FILE)
    assert trained.group("48x48").factors["v"].abs().sum() > 0  # (v starts at zero: it trained)
    drop = lambda path: [{k: v for k, v in vars(m).items() if k != "seconds"} for m in read_metrics(path)]  # noqa
    assert drop(tmp_path / "straight") == drop(tmp_path / "resumed")
    assert not (tmp_path / "resumed" / RESUME_FILE).exists()


# ---- sweep ----------------------------------------------------------------------------------------
def test_sweep_writes_results_and_tests_only_the_selected_setting(toy, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "sweep"
    status, stdout, err = run(["sweep", "--data", toy.vtab, *model_flags(toy), "--ranks", "1,2", "--scales", "1",
                               *QUICK, "--epochs", "1", "--out", out], capsys)
    assert status == 0, err
    with (out / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["run", "rank", "scale", "parameters", "adapter_bytes", "val_acc", "test_acc", "seconds"]
    assert [(r["run"], r["rank"]) for r in rows[:2]] == [("select", "1"), ("select", "2")]
    tensorizer = factnet.Tensorizer(timm.create_model(MODEL, pretrained=False, num_classes=3, **KWARGS))
    for row in rows[:2]:
        folder = out / f"rank{row['rank']}_scale1"
        assert int(row["parameters"]) == tensorizer.num_parameters("tt", int(row["rank"]))
        assert int(row["adapter_bytes"]) == (folder / ADAPTER_FILE).stat().st_size
        assert float(row["val_acc"]) == read_metrics(folder)[-1].eval_acc and row["test_acc"] == ""
        assert read_metrics(folder)[-1].eval_split == "val200"
    final = rows[2]
    assert final["run"] == "final" and final["val_acc"] == ""
    assert float(final["test_acc"]) == read_metrics(out / "final")[-1].eval_acc
    assert read_metrics(out / "final")[-1].eval_split == "test"
    assert (out / "results.md").read_text() == stdout.strip() + "\n"
    assert "test accuracy" in stdout and "| 1 | 1 |" in stdout

    # an interrupted sweep (here: the final run lost) resumes without retraining finished settings
    sweep = ["sweep", "--data", toy.vtab, *model_flags(toy), "--ranks", "1,2", "--scales", "1", *QUICK, "--epochs",
             "1", "--out", out]
    assert_one_line_error(*run(sweep, capsys)[::2], "already holds a run")
    shutil.rmtree(out / "final")
    trained, real = [], factnet.app.runs.train_setting
    monkeypatch.setattr(factnet.app.runs, "train_setting", lambda *a, **k: trained.append(a[1]) or real(*a, **k))
    assert run([*sweep, "--resume"], capsys)[0] == 0
    assert trained == ["train800val200"]
    with (out / "results.csv").open() as stream:
        assert list(csv.DictReader(stream))[:2] == rows[:2]


def test_sweep_selects_on_val_even_when_test_disagrees(toy, tmp_path, capsys, monkeypatch) -> None:
    """Val prefers rank 1, test would prefer rank 4: the final run must be rank 1, tested once."""
    val = {(1, 1.0): 0.50, (1, 10.0): 0.90, (4, 1.0): 0.60, (4, 10.0): 0.70}
    test = {(1, 1.0): 0.95, (1, 10.0): 0.10, (4, 1.0): 0.99, (4, 10.0): 0.98}
    calls = []

    def fake_train_setting(settings, split, out_dir, *, resume=False, eval_every=None, base=None):
        rank, scale = settings.adapter.rank, settings.adapter.scale
        calls.append((rank, scale, split))
        accuracy = (val if split == "train800" else test)[rank, scale]
        return SettingResult(rank, scale, 100 * rank, 3, 1000, accuracy,
                             "val200" if split == "train800" else "test", 1.0, out_dir / ADAPTER_FILE)

    monkeypatch.setattr(factnet.app.runs, "train_setting", fake_train_setting)
    status, stdout, err = run(["sweep", "--data", toy.vtab, *model_flags(toy), "--ranks", "1,4", "--scales",
                               "1,10", *QUICK, "--out", tmp_path], capsys)
    assert status == 0, err
    assert [call for call in calls if call[2] == "train800val200"] == [(1, 10.0, "train800val200")]
    assert sorted(call for call in calls if call[2] == "train800") == sorted((r, s, "train800") for r, s in val)
    with (tmp_path / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert (rows[-1]["run"], rows[-1]["rank"], rows[-1]["scale"], rows[-1]["test_acc"]) == ("final", "1", "10.0",
                                                                                             "0.1")
    assert "rank 1, scale 10" in stdout and "test accuracy 0.1000" in stdout


# ---- info, export, merge ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["vit_base_patch16_224", "--format", "tt", "--rank", "4"], ["trainable factor parameters: 8,448"]),
    (["vit_base_patch16_224", "--format", "tucker", "--rank", "8"], ["trainable factor parameters: 13,952"]),
    (["swin_base_patch4_window7_224", "--format", "tt", "--rank", "16", "--group", "stage"],
     ["trainable factor parameters: 135,168", "24x128x128", "24x256x256", "216x512x512", "24x1024x1024"]),
])
def test_info_prints_the_papers_counts(argv, expected, capsys) -> None:
    status, stdout, err = run(["info", *argv], capsys)
    assert status == 0, err
    for text in expected:
        assert text in stdout
    assert "blocks.0.attn.qkv" in stdout or "layers.0.blocks.0.attn.qkv" in stdout  # the slice table
    factors = int(stdout.split("trainable factor parameters: ")[1].split()[0].replace(",", ""))
    head = int(stdout.split("head parameters: ")[1].split()[0].replace(",", ""))
    assert head == {"vit": 768 * 1000 + 1000, "swin": 1024 * 1000 + 1000}[argv[0][:4].rstrip("_")]
    assert f"adapter bytes: {4 * (factors + head):,}" in stdout and "estimate" in stdout


def test_info_with_targets_counts_lora_on_q_and_v(capsys) -> None:
    status, stdout, err = run(["info", "vit_base_patch16_224", "--format", "batch-matrix", "--rank", "8",
                               "--targets", "blocks.*.attn.qkv[q,v]", "--num-classes", "10"], capsys)
    assert status == 0, err
    assert "trainable factor parameters: 294,912" in stdout and "head parameters: 7,690" in stdout


def test_info_budget_prints_every_format_rank_and_exact_count(capsys) -> None:
    status, stdout, err = run(["info", "vit_base_patch16_224", "--budget", "10k"], capsys)
    assert status == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines()[-len(factnet.available_formats()):]}
    assert set(rows) == set(factnet.available_formats())
    assert rows["tt"] == ["4", "fp", "8,448", "33,792", "-"]  # the paper's FacT-TT rank 4 on ViT-B, 4 bytes each
    assert rows["batch-matrix"][:4] == ["-", "-", "none", "fits"]
    assert "with no format" not in stdout  # a budget in parameters picks no format
    status, stdout, err = run(["info", "vit_base_patch16_224", "--budget", "10KB"], capsys)
    table, auto = stdout.split("\n\nwith no format, ")
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[-len(factnet.available_formats()):]}
    picked = factnet.Tensorizer(timm.create_model("vit_base_patch16_224", pretrained=False)).auto_choice("10KB")
    assert auto.strip() == f"decompose(budget='10KB') picks {picked}"
    assert rows[picked.format][:5] == [str(picked.choice.rank), str(picked.choice.bits or "fp"),
                                       f"{picked.choice.params:,}", f"{picked.choice.bytes:,}", f"{picked.choice.file:,}"]
    # 2 bits: 29,760 codes (7,440 B) + 465 groups' scale, offset; the file adds its header and spec
    assert rows["tt"][:4] == ["10", "2", "29,760", "9,300"] and 9_300 < int(rows["tt"][4].replace(",", "")) <= 10_000
    assert rows["vera"][:4] == ["-", "-", "none", "fits"] and "rank 1 needs" in " ".join(rows["vera"])
    status, _, err = run(["info", "vit_base_patch16_224", "--budget", "lots"], capsys)
    assert status != 0 and "cannot read budget" in err


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> Path:
    """An adapter trained briefly on the toy task (its factors and head are no longer zero/initial)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main([str(a) for a in ["train", "--data", toy.vtab, *model_flags(toy), "--format", "tucker", "--rank",
                                  "4", "--dropout", "0", *QUICK, "--out", out]]) == 0
    return out / ADAPTER_FILE


def adapted_model(toy, adapter_path: Path) -> torch.nn.Module:
    model = build_model(MODEL, checkpoint=toy.checkpoint, num_classes=3, kwargs=KWARGS)
    factnet.load(model, adapter_path)
    return model.eval()


def test_merge_writes_weights_timm_loads_back(toy, trained, tmp_path, capsys) -> None:
    out = tmp_path / "merged.safetensors"
    status, stdout, err = run(["merge", trained, *model_flags(toy), "--out", out], capsys)
    assert status == 0, err
    assert "pretrained_cfg_overlay" in stdout
    merged = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=3),
                               num_classes=3, **KWARGS).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = adapted_model(toy, trained)(images)
        torch.testing.assert_close(merged(images), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tiny_from(toy.checkpoint)(images), expected, atol=1e-3)  # the adapter matters
    assert_one_line_error(*run(["merge", trained, *model_flags(toy), "--out", out], capsys)[::2], "--overwrite")


def test_export_writes_a_peft_lora_directory(toy, trained, tmp_path, capsys) -> None:
    peft = pytest.importorskip("peft")
    status, stdout, err = run(["export", trained, *model_flags(toy), "--out", tmp_path / "lora"], capsys)
    assert status == 0, err
    assert {p.name for p in (tmp_path / "lora").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base = tiny_from(toy.checkpoint)
    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lora(images), adapted_model(toy, trained)(images), rtol=1e-5, atol=1e-5)


# ---- the demo and bench-table (another module; wiring only) -----------------------------------------
def test_demo_and_bench_table_wiring(tmp_path, capsys, monkeypatch) -> None:
    calls = {}
    fake = types.SimpleNamespace(
        run=lambda out_dir, **options: calls.setdefault("run", (out_dir, options)) and {"test_acc": 0.75},
        bench_table=lambda seeds=3, progress=True: calls.setdefault("bench", (seeds, progress)) and "| a |\n|---|",
        summary=lambda metrics, out_dir, fmt: f"summary of {metrics} in {out_dir} ({fmt})",
    )
    monkeypatch.setitem(sys.modules, "factnet.app.demo", fake)
    monkeypatch.setattr(factnet.app, "demo", fake, raising=False)
    status, stdout, _ = run(["train", "--out", tmp_path, "--format", "tucker", "--rank", "4", "--seed", "3"], capsys)
    assert status == 0 and stdout == f"summary of {{'test_acc': 0.75}} in {tmp_path} (tucker)\n"  # a summary, not JSON
    assert calls["run"] == (tmp_path, dict(format="tucker", rank=4, scale=None, seed=3, progress=True, bits=None))
    status, stdout, _ = run(["bench-table", "--seeds", "2", "--no-progress"], capsys)
    assert status == 0 and stdout == "| a |\n|---|\n" and calls["bench"] == (2, False)
    assert_one_line_error(*run(["train", "--model", MODEL], capsys)[::2], "need --data")
    assert_one_line_error(*run(["train", "--head-bits", "4"], capsys)[::2], "--head-bits need --data")


# ---- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["train", "--data", "{tmp}/missing", "--model", MODEL], "does not exist"),
    (["train", "--data", "{no_val}", "--model", MODEL], "val200.txt"),
    (["train", "--data", "{vtab}", "--model", MODEL, "--preset", "vtab1k/cifr"], "vtab1k/cifar"),
    (["train", "--data", "{vtab}", "--model", MODEL, "--preset", "vtab1k/cifar", "--format", "cp"], "tt"),
    (["train", "--data", "{vtab}", "--model", "vit_tiny_patch16_244"], "vit_tiny_patch16_224"),
    (["train", "--data", "{vtab}", "--model", MODEL, "--format", "nope"], "nope"),
    (["train", "--data", "{vtab}", "--model", MODEL, "--checkpoint", "{tmp}/none.safetensors"], "does not exist"),
    (["train", "--data", "{vtab}", "--model", MODEL, "--checkpoint", "{checkpoint}", "--model-kwargs",
      "depth=2,bogus=1"], "--model-kwargs"),
    (["train", "--data", "{vtab}", "--model", MODEL, "--epochs", "0"], "--epochs"),
    (["train", "--data", "{vtab}", "--model", MODEL, "--lr", "fast"], "--lr"),
    (["train", "--data", "{vtab}", "--model", MODEL, "--epochs", "5"], "--warmup-epochs"),
    (["sweep", "--data", "{vtab}", "--model", MODEL, "--ranks", "2,x", "--scales", "1", "--out", "{tmp}"], "--ranks"),
    (["sweep", "--data", "{vtab}", "--model", MODEL, "--ranks", "2", "--scales", "nan", "--out", "{tmp}"], "--scales"),
    (["export", "{tmp}/none.safetensors", "--model", MODEL, "--out", "{tmp}/lora"], "does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line_with_status_2(argv, expected, toy, tmp_path, capsys) -> None:
    no_val = tmp_path / "no_val"
    shutil.copytree(toy.vtab, no_val)
    (no_val / "val200.txt").unlink()
    paths = dict(tmp=tmp_path, vtab=toy.vtab, no_val=no_val, checkpoint=toy.checkpoint)
    status, _, err = run([a.format(**paths) for a in argv], capsys)
    assert_one_line_error(status, err, expected)


def test_unexpected_errors_keep_their_traceback(monkeypatch) -> None:
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(factnet.app.cli, "command_info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", MODEL])


def test_installed_script_exit_status_and_no_traceback(tmp_path) -> None:
    script = shutil.which("factnet")
    assert script is not None, "the factnet console script is not installed (pip install -e .)"
    result = subprocess.run([script, "train", "--data", str(tmp_path / "missing"), "--model", MODEL],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("factnet: error: data directory") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and result.stdout == ""
