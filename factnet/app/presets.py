"""Published per-task settings: the rank and scale FacT used on each VTAB-1K task.

    preset = get_preset("vtab1k/cifar")      # Preset(task='cifar', classes=100, ...)
    preset.rank_and_scale("tt")              # (8, 1.0)

The table ships as package data (``factnet/app/resources/vtab1k_presets.csv``, columns
``task,classes,tt_rank,tt_scale,tk_rank,tk_scale``): FacT-TT's and FacT-TK's rank and scale
for each of the 19 tasks, as selected by the paper on train800 → val200.
"""

from __future__ import annotations

import csv
import difflib
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources

from factnet import FactnetError

__all__ = ["Preset", "get_preset", "preset_names"]

COLLECTION = "vtab1k"
_COLUMNS = {"tt": "tt", "tucker": "tk"}  # format name -> column prefix in the CSV


@dataclass(frozen=True)
class Preset:
    """One task's published settings: its class count, and rank and scale per format."""

    task: str
    classes: int
    ranks: dict[str, int]
    scales: dict[str, float]

    @property
    def name(self) -> str:
        return f"{COLLECTION}/{self.task}"

    def rank_and_scale(self, format: str) -> tuple[int, float]:
        """``(rank, scale)`` the paper used for ``format`` ("tt" or "tucker") on this task."""
        if format not in self.ranks:
            raise FactnetError(f"preset {self.name} has published settings for formats {sorted(self.ranks)} only, "
                               f"not {format!r}; pass --format tt or tucker, or give --rank and --scale yourself")
        return self.ranks[format], self.scales[format]


@cache
def _table() -> dict[str, Preset]:
    text = resources.files("factnet.app").joinpath("resources/vtab1k_presets.csv").read_text(encoding="utf-8")
    table = {}
    for row in csv.DictReader(io.StringIO(text)):
        table[row["task"]] = Preset(
            task=row["task"],
            classes=int(row["classes"]),
            ranks={fmt: int(row[f"{column}_rank"]) for fmt, column in _COLUMNS.items()},
            scales={fmt: float(row[f"{column}_scale"]) for fmt, column in _COLUMNS.items()},
        )
    return table


def preset_names() -> list[str]:
    """Every preset name, ``"vtab1k/<task>"``."""
    return [f"{COLLECTION}/{task}" for task in _table()]


def get_preset(name: str) -> Preset:
    """The preset ``"vtab1k/<task>"``; an unknown name is an error listing the close matches."""
    collection, _, task = name.partition("/")
    if collection != COLLECTION or not task:
        raise FactnetError(f"unknown preset {name!r}; presets are named {COLLECTION}/<task>, e.g. {COLLECTION}/cifar")
    table = _table()
    if task not in table:
        close = difflib.get_close_matches(task, table, n=3)
        hint = f"did you mean {', '.join(f'{COLLECTION}/{t}' for t in close)}? " if close else ""
        raise FactnetError(f"unknown VTAB-1K task {task!r} in preset {name!r}; {hint}tasks: {', '.join(table)}")
    return table[task]
