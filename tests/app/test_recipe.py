"""The paper's recipe (checked against timm's CosineLRScheduler, the authors' schedule) and the
VTAB-1K presets (checked against the shipped CSV, read here with the csv module)."""

from __future__ import annotations

import csv
import io
from importlib import resources

import pytest
import torch
from timm.scheduler.cosine_lr import CosineLRScheduler

from factnet import FactnetError
from factnet.app.cli import build_parser
from factnet.app.presets import get_preset, preset_names
from factnet.app.recipe import Recipe
from factnet.app.runs import RunSettings


def csv_rows() -> dict[str, dict[str, str]]:
    text = resources.files("factnet.app").joinpath("resources/vtab1k_presets.csv").read_text(encoding="utf-8")
    return {row["task"]: row for row in csv.DictReader(io.StringIO(text))}


# ---- the schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [Recipe(), Recipe(epochs=30, warmup_epochs=3, lr=5e-3, warmup_lr=1e-5, min_lr=1e-4)])
def test_schedule_equals_timm_cosine_scheduler_at_whole_epochs(recipe: Recipe) -> None:
    """The authors: CosineLRScheduler(t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    timm_schedule = CosineLRScheduler(optimizer, t_initial=recipe.epochs, warmup_t=recipe.warmup_epochs,
                                      lr_min=recipe.min_lr, warmup_lr_init=recipe.warmup_lr)
    for epoch in range(recipe.epochs + 1):
        assert recipe.learning_rate(epoch) == pytest.approx(timm_schedule._get_lr(epoch)[0], rel=1e-12), epoch


def test_schedule_steps_per_batch() -> None:
    recipe = Recipe(epochs=5, warmup_epochs=2)
    steps_per_epoch = 4
    optimizer, schedule = recipe.optimizer([torch.nn.Parameter(torch.zeros(1))], steps_per_epoch)
    seen = []
    for _ in range(recipe.epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen[0] == pytest.approx(1e-6)  # warmup starts at warmup_lr
    assert seen == pytest.approx([recipe.learning_rate(step / steps_per_epoch) for step in range(len(seen))])
    assert all(a < b for a, b in zip(seen[:7], seen[1:8]))  # rising through the warmup (steps 0-7)
    assert all(a > b for a, b in zip(seen[8:], seen[9:]))  # then the cosine, counted from epoch 0, falls
    assert recipe.learning_rate(recipe.epochs) == pytest.approx(recipe.min_lr)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4


def test_defaults_are_the_papers() -> None:
    assert Recipe().to_dict() == dict(lr=1e-3, weight_decay=1e-4, batch_size=64, epochs=100, warmup_epochs=10,
                                      warmup_lr=1e-6, min_lr=1e-5, dropout=0.1, drop_path=0.1)


@pytest.mark.parametrize("values, expected", [
    (dict(epochs=5), "--warmup-epochs"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(dropout=1.0), "dropout"),
    (dict(learning_rate=1.0), "unknown recipe fields"),
])
def test_bad_recipes_say_what_to_do(values: dict, expected: str) -> None:
    with pytest.raises(FactnetError, match=expected):
        Recipe.from_dict(values)


def test_cli_flags_build_the_recipe() -> None:
    args = build_parser().parse_args(["train", "--data", "d", "--model", "m"])
    assert RunSettings.from_args(args).recipe == Recipe()
    args = build_parser().parse_args(["train", "--data", "d", "--model", "m", "--epochs", "7", "--warmup-epochs", "0",
                                      "--lr", "5e-3", "--batch-size", "16", "--dropout", "0", "--drop-path", "0.2"])
    assert RunSettings.from_args(args).recipe == Recipe(epochs=7, warmup_epochs=0, lr=5e-3, batch_size=16, dropout=0.0,
                                                        drop_path=0.2)


# ---- presets ----------------------------------------------------------------------------------------
def test_every_preset_equals_its_csv_row() -> None:
    rows = csv_rows()
    assert len(rows) == 19 and preset_names() == [f"vtab1k/{task}" for task in rows]
    for task, row in rows.items():
        preset = get_preset(f"vtab1k/{task}")
        assert preset.classes == int(row["classes"])
        assert preset.rank_and_scale("tt") == (int(row["tt_rank"]), float(row["tt_scale"]))
        assert preset.rank_and_scale("tucker") == (int(row["tk_rank"]), float(row["tk_scale"]))


@pytest.mark.parametrize("fmt, rank_column, scale_column", [("tt", "tt_rank", "tt_scale"),
                                                            ("tucker", "tk_rank", "tk_scale")])
def test_cli_preset_takes_the_csv_rank_and_scale(fmt: str, rank_column: str, scale_column: str) -> None:
    for task, row in csv_rows().items():
        args = build_parser().parse_args(["train", "--data", "d", "--model", "m", "--format", fmt,
                                          "--preset", f"vtab1k/{task}"])
        settings = RunSettings.from_args(args)
        assert (settings.adapter.rank, settings.adapter.scale, settings.classes) == (
            int(row[rank_column]), float(row[scale_column]), int(row["classes"])), task


def test_preset_errors() -> None:
    with pytest.raises(FactnetError, match="vtab1k/cifar"):
        get_preset("vtab1k/cifr")  # suggests the close match
    with pytest.raises(FactnetError, match="vtab1k/<task>"):
        get_preset("imagenet/cifar")
    with pytest.raises(FactnetError, match="tt.*tucker"):
        get_preset("vtab1k/cifar").rank_and_scale("cp")
    args = build_parser().parse_args(["train", "--data", "d", "--model", "m", "--preset", "vtab1k/dtd", "--rank", "4"])
    with pytest.raises(FactnetError, match="either --preset or --rank"):
        RunSettings.from_args(args)
