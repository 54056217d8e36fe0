"""The embedded demo and the miniature Table 1, on small configurations (a few seconds each)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from sklearn.datasets import load_digits

import factnet
import factnet.app.demo as demo
from factnet.app.demo import backbone as backbone_module
from factnet.app.demo.backbone import PretrainConfig, pretrained_backbone
from factnet.app.demo.data import DataConfig, load_splits
from factnet.app.demo.methods import downstream_model
from factnet.app.demo.train import threads
from factnet.quant import stored_bytes

TINY = PretrainConfig(embed_dim=32, depth=2, num_heads=2, epochs=12, lr=1e-2, augment=False)
SMALL = demo.DemoConfig(pretrain=TINY, epochs=30, warmup_epochs=3, linear_lrs=(1e-1,), full_lrs=(1e-3,),
                        lora_lrs=(1e-2,), fact_ranks=(2,), fact_scales=(10.0,), fact_budget=0.2,
                        beyond_budget=(("tt", 4),))
# The short run's recipe: learns clearly from any tiny backbone. With SMALL's (lr 1e-2, augmentation,
# drop-path) validation accuracy was 33-67% over pretraining seeds 0-5 (33 on another CPU with seed 0);
# with this one it was 39.5-81.5% over seeds 0-11 and the loss fell by a factor 0.87 or better.
LEARNS = replace(SMALL, lr=3e-2, augment=False, drop_path=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with threads(1):  # as run() and bench_table do: tiny matrices, and a machine shared with others
        yield


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("FACTNET_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACTNET_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield pretrained_backbone(TINY, progress=False)


# ---- the task split -----------------------------------------------------------------------
def test_splits_are_disjoint_and_the_downstream_task_is_new():
    splits = load_splits(DataConfig())
    parts = splits.all()
    digits = torch.tensor(load_digits().target)
    seen: set[int] = set()
    for name, part in parts.items():
        rows = set(part.index.tolist())
        assert len(rows) == len(part) and not rows & seen, f"{name} overlaps another split"
        seen |= rows
    assert seen == set(range(len(digits)))  # every image used exactly once
    pretrain_digits = set(digits[torch.cat([splits.pretrain_train.index, splits.pretrain_val.index])].tolist())
    downstream_digits = set(digits[torch.cat([parts[n].index for n in ("train", "val", "test")])].tolist())
    assert pretrain_digits == {0, 1, 2, 3, 4} and downstream_digits == {5, 6, 7, 8, 9}
    # labels are positions in each task's own class list
    for name, part in parts.items():
        classes = splits.pretrain_classes if name.startswith("pretrain") else splits.downstream_classes
        assert torch.equal(torch.tensor(classes)[part.y], digits[part.index])
    # no pixel-identical image is shared between pretraining and the downstream task
    pre = {tuple(x.flatten().tolist()) for x in torch.cat([splits.pretrain_train.x, splits.pretrain_val.x])}
    assert not any(tuple(x.flatten().tolist()) in pre for s in ("train", "val", "test") for x in parts[s].x)
    # stratified: exact counts per class in train and val, deterministic
    assert torch.bincount(splits.train.y).tolist() == [50] * 5
    assert torch.bincount(splits.val.y).tolist() == [40] * 5
    assert torch.equal(load_splits(DataConfig()).test.index, splits.test.index)
    assert not torch.equal(load_splits(DataConfig(split_seed=1)).test.index, splits.test.index)


def test_split_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="train_per_class"):
        load_splits(DataConfig(train_per_class=150, val_per_class=40))


# ---- the backbone cache -----------------------------------------------------------------
def test_cache_is_written_reused_and_rebuilt_when_corrupt(cache):
    config = PretrainConfig(embed_dim=16, depth=1, num_heads=2, epochs=1)
    runs = backbone_module.PRETRAIN_RUNS
    first = pretrained_backbone(config, progress=False)
    assert not first.cached and backbone_module.PRETRAIN_RUNS == runs + 1
    assert first.path.parent == cache and first.path.exists() and config.key() in first.path.name
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    stamp = first.path.stat().st_mtime_ns

    second = pretrained_backbone(config, progress=False)
    assert second.cached and backbone_module.PRETRAIN_RUNS == runs + 1  # not trained again
    assert first.path.stat().st_mtime_ns == stamp
    assert second.state.keys() == first.state.keys()
    assert all(torch.equal(second.state[k], first.state[k]) for k in first.state)
    assert second.val_accuracy == first.val_accuracy

    data = bytearray(first.path.read_bytes())  # flip bytes inside the tensor data: the checksum catches it
    data[-8:] = bytes(255 - b for b in data[-8:])
    first.path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        third = pretrained_backbone(config, progress=False)
    assert not third.cached and backbone_module.PRETRAIN_RUNS == runs + 2
    assert pretrained_backbone(config, progress=False).cached

    first.path.write_bytes(first.path.read_bytes()[:100])  # truncated: unreadable
    with pytest.warns(UserWarning, match="corrupt"):
        assert not pretrained_backbone(config, progress=False).cached
    assert backbone_module.PRETRAIN_RUNS == runs + 3

    other = PretrainConfig(embed_dim=16, depth=1, num_heads=2, epochs=1, seed=1)
    assert other.key() != config.key()
    assert not pretrained_backbone(other, progress=False).cached  # another config, another file


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("FACTNET_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert backbone_module.cache_dir() == tmp_path / ".cache" / "factnet"


# ---- adaptation -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_adapter_at_step_zero_equals_the_backbone(tiny_backbone, fmt):
    torch.manual_seed(0)
    model = downstream_model(tiny_backbone, 5, drop_path=0.1)
    reference = copy.deepcopy(model).eval()
    adapter = factnet.Tensorizer(model).decompose(fmt, rank=2, scale=10.0, dropout=0.1, seed=0)
    assert adapter.num_parameters() > 0
    model.eval()
    x = load_splits(TINY.data).test.x[:64]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), rtol=0, atol=1e-6)


def test_short_run_learns_and_writes_its_files(tiny_backbone, tmp_path):
    metrics = demo.run(tmp_path / "out", format="tt", rank=2, scale=10.0, progress=True, config=LEARNS)
    # margins any machine clears (the trajectory of a tiny model depends on the CPU's float path):
    # the loss falls, and accuracy is far above chance (20%: a 30% guess on 200 images is 3.5 sigma)
    assert metrics["last_epoch_loss"] < 0.93 * metrics["first_epoch_loss"]
    assert metrics["val_accuracy"] > 30 and metrics["test_accuracy"] > 30
    d, n, r = TINY.embed_dim, 12 * TINY.depth, 2
    assert metrics["params"] == 2 * d * r + n * r * r
    assert metrics["head_params"] == d * 5 + 5
    adapter_file = tmp_path / "out" / demo.ADAPTER_FILE
    assert metrics["bytes"] == adapter_file.stat().st_size
    assert metrics["bytes"] > metrics["bytes_without_head"] > 4 * metrics["params"]
    record = json.loads((tmp_path / "out" / demo.METRICS_FILE).read_text())
    assert record["metrics"] == metrics and record["rank"] == 2 and record["format"] == "tt"
    assert all(isinstance(v, float) for v in metrics.values())
    # the saved file (factors and head) rebuilds the trained model on a fresh copy of the backbone
    model = downstream_model(tiny_backbone, 5, 0.0)
    factnet.load(model, adapter_file)
    test = load_splits(TINY.data).test
    with torch.no_grad():
        accuracy = 100 * (model.eval()(test.x).argmax(-1) == test.y).float().mean().item()
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-4)
    # the summary a person reads names the files that exist, and the numbers of the metrics file
    text = demo.summary(metrics, tmp_path / "out", "tt")
    assert str(adapter_file) in text and str(tmp_path / "out" / demo.METRICS_FILE) in text
    assert f"{metrics['test_accuracy']:.1f}% test accuracy" in text and f"{int(metrics['bytes']):,} bytes" in text
    assert "FacT-TT (rank 2, scale 10)" in text and "factnet bench-table" in text


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honor_the_umask(tiny_backbone, tmp_path, umask):
    import os

    before = os.umask(umask)
    try:
        demo.run(tmp_path, format="tt", rank=2, progress=False, config=replace(SMALL, epochs=1, warmup_epochs=0))
    finally:
        os.umask(before)
    for name in (demo.ADAPTER_FILE, demo.METRICS_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("fmt", sorted(set(factnet.available_formats()) & {"tt", "tucker", "cp", "batch-matrix",
                                                                           "tensor-ring"}))
def test_run_takes_every_builtin_format_with_defaults(tiny_backbone, tmp_path, fmt):
    metrics = demo.run(tmp_path, format=fmt, progress=False, config=replace(SMALL, epochs=1, warmup_epochs=0))
    rank = demo.DEFAULTS.get(fmt, (4, 10.0))[0]
    fresh = downstream_model(tiny_backbone, 5, 0.0)
    assert metrics["params"] == factnet.Tensorizer(fresh).num_parameters(fmt, rank)
    assert json.loads((tmp_path / demo.METRICS_FILE).read_text())["rank"] == rank == metrics["rank"]


def test_run_with_bits_writes_a_low_bit_file_that_is_the_trained_model(tiny_backbone, tmp_path):
    metrics = demo.run(tmp_path, rank=2, progress=False, bits=2, config=replace(SMALL, epochs=1, warmup_epochs=0))
    path = tmp_path / demo.ADAPTER_FILE
    assert factnet.file.info.load_spec(path)["bits"]["factors"] == 2
    model = downstream_model(tiny_backbone, 5, 0.0)
    factnet.load(model, path)
    test = load_splits(SMALL.pretrain.data).test
    with torch.no_grad():
        accuracy = 100 * (model.eval()(test.x).argmax(-1) == test.y).float().mean().item()
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-4)  # the 2-bit file is the trained model
    info = factnet.file_info(path)  # the factors as 2-bit codes and constants
    factors = [t for g in model.factnet.active_adapter.group_names
               for t in model.factnet.active_adapter.group(g).trained_values().values()]
    assert info.factor_bytes == sum(stored_bytes(t.numel(), 2) for t in factors) > 0


def test_run_restores_torch_threads(cache, tmp_path):
    before = torch.get_num_threads()
    config = demo.DemoConfig(pretrain=PretrainConfig(embed_dim=16, depth=1, num_heads=2, epochs=1), epochs=1,
                             warmup_epochs=0, threads=1)
    demo.run(tmp_path / "out", rank=2, progress=False, config=config)
    assert torch.get_num_threads() == before


# ---- the table --------------------------------------------------------------------------
def _rows(table: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_fact_candidates_stay_within_the_budget(tiny_backbone):
    from factnet.app.demo.table import candidates, lora_parameters

    splits = load_splits(TINY.data)
    config = replace(SMALL, fact_ranks=(2, 3, 4), fact_scales=(1.0, 10.0), fact_budget=0.2)
    lora = lora_parameters(tiny_backbone, splits, config)
    assert lora == TINY.depth * 4 * TINY.embed_dim * 8
    grid = candidates(tiny_backbone, splits, config)
    fresh = downstream_model(tiny_backbone, 5, 0.0)
    for name in ("FacT-TT", "FacT-TK"):
        ranks = sorted({m.rank for m in grid[name]})
        assert ranks == [2, 3]  # rank 4 costs more than 0.2 x LoRA (TT 640, TK 416 > 409.6)
        assert all(factnet.Tensorizer(fresh).num_parameters(m.format, m.rank) <= 0.2 * lora for m in grid[name])
        assert len(grid[name]) == 4
    with pytest.raises(ValueError, match="no rank"):
        candidates(tiny_backbone, splits, replace(config, fact_budget=0.05))


def test_bench_table_counts_match_independent_formulas(tiny_backbone):
    import peft

    table = demo.bench_table(seeds=2, progress=False, config=replace(SMALL, epochs=4, warmup_epochs=1))
    rows = _rows(table)
    assert list(rows) == ["linear probe", "full fine-tuning", "PEFT LoRA", "FacT-TT", "FacT-TK",
                          "FacT-TT beyond the budget"]
    count = {name: int(cells[1].replace(",", "")) for name, cells in rows.items()}
    d, depth, r = TINY.embed_dim, TINY.depth, 2
    n = 12 * depth  # q, k, v, o, fc1[0..3], fc2[0..3] of every block: one d x d group
    assert count["FacT-TT"] == 2 * d * r + n * r * r
    assert count["FacT-TK"] == r**3 + n * r + 2 * d * r
    assert count["FacT-TT beyond the budget"] == 2 * d * 4 + n * 4 * 4
    # LoRA: PEFT's own count on a fresh model, and the fused-qkv formula (A: r x d, B: 3d x r per block)
    fresh = downstream_model(tiny_backbone, 5, 0.0)
    lora = peft.get_peft_model(fresh, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"]))
    assert count["PEFT LoRA"] == lora.get_nb_trainable_parameters()[0] == depth * (8 * d + 3 * d * 8)
    backbone_params = sum(p.numel() for k, p in downstream_model(tiny_backbone, 5, 0.0).named_parameters()
                          if not k.startswith("head."))
    assert count["full fine-tuning"] == backbone_params
    assert count["linear probe"] == 0
    for name in ("FacT-TT", "FacT-TK", "PEFT LoRA", "full fine-tuning"):
        size = int(rows[name][3].replace(",", ""))
        assert size > 4 * count[name]  # 4 bytes a float32 parameter plus the header
    assert int(rows["linear probe"][3]) == 0
    assert f"new head ({d * 5 + 5:,} parameters" in table
    for name, cells in rows.items():
        assert "±" in cells[5]
        assert ("(not searched)" if "beyond" in name else "(of 1)") in cells[0]
    assert "r 4, s 10" in rows["FacT-TT beyond the budget"][0]
