"""The figure of `factnet.app.demo.frontier`: accuracy per parameter and per byte, each family, the frontier."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot", "read_csv"]

_STYLE = {  # family -> (color, marker)
    "PEFT LoRA": ("#1f77b4", "o"), "PEFT VeRA": ("#9467bd", "v"), "PEFT VB-LoRA": ("#8c564b", "P"),
    "PEFT TinyLoRA": ("#e377c2", "X"), "FacT-TT": ("#d62728", "s"), "FacT-TK": ("#ff7f0e", "D"),
    "CP": ("#2ca02c", "^"),
}
_ENDS = (("full fine-tuning", "--"), ("linear probe", ":"))


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a ``frontier.csv``."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def plot(rows: Sequence[dict[str, str]], path: Path, title: str = "") -> None:
    """Test accuracy (mean ± std) from ``frontier.csv`` rows against trainable parameters (left) and
    file bytes (right), log x: one line per family, each budget labelled; the linear probe and full
    fine-tuning as horizontal reference lines (with their ± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(17, 6.2), dpi=110, sharey=True)
    for ax, column, label in ((axes[0], "trainable_params", "trainable parameters, without the head"),
                              (axes[1], "file_bytes", "file bytes, without the head")):
        _panel(ax, rows, column, label)
    axes[0].set_ylabel("test accuracy, %  (mean ± std over seeds)")
    if title:
        fig.suptitle(title, fontsize=10.5, x=0.01, ha="left")
    axes[1].legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    from factnet import write_atomically

    write_atomically(str(path), lambda temp: Path(temp).write_bytes(data))


def _panel(ax, rows: Sequence[dict[str, str]], column: str, label: str) -> None:
    """One panel: accuracy against ``column`` (a count), every family and the frontier under them."""
    curves: dict[str, list[tuple[int, float, float, str]]] = {}
    for row in rows:
        curves.setdefault(row["family"], []).append(
            (int(row[column]), float(row["test_mean"]), float(row["test_std"]), row["budget"]))
    ends = {name: curves.pop(name)[0] for name, _ in _ENDS if name in curves}
    everything = [m for members in curves.values() for m in members] + list(ends.values())
    # the y range: every end and curve point within reach of the linear probe; a collapsed run (far
    # below it) is drawn on the floor with its value written next to it, so it does not squash the rest
    floor = min([e[1] - e[2] for e in ends.values()] or [min(m[1] for m in everything)]) - 6
    floor = min(floor, min((m[1] - m[2] for m in everything if m[1] - m[2] >= floor - 4), default=floor)) - 1
    top = max(m[1] + m[2] for m in everything) + 2
    for name, style in _ENDS:
        if name in ends:
            count, mean, std, _ = ends[name]
            unit = "bytes" if column == "file_bytes" else "trainable"
            ax.axhline(mean, color="0.3", linestyle=style, linewidth=1.4,
                       label=f"{name}: {mean:.1f} ± {std:.1f} ({count:,} {unit})")
            ax.axhspan(mean - std, mean + std, color="0.5", alpha=0.12, linewidth=0)
    best = [m for m in sorted(everything) if not any(o[0] <= m[0] and o[1] > m[1] for o in everything)]
    shown = [m for m in best if m[0] > 0]
    if shown:  # the frontier: the points that no point with fewer (or as many) parameters or bytes beats
        ax.plot([m[0] for m in shown], [m[1] for m in shown], color="#f2c14e", linewidth=9, alpha=0.45,
                solid_capstyle="round", zorder=0, label="frontier (no cheaper point beats it)")
    for name, members in curves.items():
        members.sort()
        color, marker = _STYLE.get(name, (None, "o"))
        x, mean, std, budgets = zip(*members)
        peft = name.startswith("PEFT ")
        y = [max(v, floor + 1.2) for v in mean]
        err = [0 if v < floor + 1.2 else e for v, e in zip(mean, std)]
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, markersize=7, linewidth=1.8, capsize=3,
                    linestyle="--" if peft else "-", label=name.removeprefix("PEFT ") + (" (PEFT)" if peft else
                                                                                    " (factnet)"))
        for xi, yi, vi, ei, text in zip(x, y, mean, std, budgets):
            text = text.replace(" vectors", "v")
            if yi != vi:  # on the floor: written upwards, so neighbours on the floor do not overlap
                ax.annotate(f"{text}: {vi:.1f} ± {ei:.1f}, off the scale", (xi, yi), xytext=(0, 9),
                            textcoords="offset points", fontsize=7, color=color, ha="center", va="bottom",
                            rotation=90)
                continue
            offset, align = ((6, -12), "left") if peft else ((-6, 7), "right")
            ax.annotate(text, (xi, yi), xytext=offset, textcoords="offset points", fontsize=7.5, color=color,
                        ha=align)
    ax.set_ylim(floor, top)
    if curves:
        counts = [m[0] for members in curves.values() for m in members]
        ax.set_xlim(min(counts) / 1.8, max(counts) * 1.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"{label} (log scale)")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="x", alpha=0.12)
