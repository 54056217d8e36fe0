"""The accuracy-per-byte figure of `factnet.app.demo.frontier`: every family's curve, the frontier under them."""

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
    """Test accuracy (mean ± std) against trainable parameters from ``frontier.csv`` rows: log x,
    one line per family, each budget labelled; the linear probe and full fine-tuning as
    horizontal reference lines (with their ± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float, float, str]]] = {}
    for row in rows:
        curves.setdefault(row["family"], []).append(
            (int(row["trainable_params"]), float(row["test_mean"]), float(row["test_std"]), row["budget"]))
    ends = {name: curves.pop(name)[0] for name, _ in _ENDS if name in curves}
    everything = [m for members in curves.values() for m in members] + list(ends.values())
    # the y range: every end and curve point within reach of the linear probe; a collapsed run (far
    # below it) is drawn on the floor with its value written next to it, so it does not squash the rest
    floor = min([e[1] - e[2] for e in ends.values()] or [min(m[1] for m in everything)]) - 6
    floor = min(floor, min((m[1] - m[2] for m in everything if m[1] - m[2] >= floor - 4), default=floor)) - 1
    top = max(m[1] + m[2] for m in everything) + 2
    fig, ax = plt.subplots(figsize=(10, 5.8), dpi=120)
    for name, style in _ENDS:
        if name in ends:
            params, mean, std, _ = ends[name]
            count = "0 trainable" if params == 0 else f"{params:,} trainable"
            ax.axhline(mean, color="0.3", linestyle=style, linewidth=1.4,
                       label=f"{name}: {mean:.1f} ± {std:.1f} ({count})")
            ax.axhspan(mean - std, mean + std, color="0.5", alpha=0.12, linewidth=0)
    best = [m for m in sorted(everything) if not any(o[0] <= m[0] and o[1] > m[1] for o in everything)]
    shown = [m for m in best if m[0] > 0]
    if shown:  # the frontier: the points that no point with fewer (or as many) parameters beats
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
        for xi, yi, vi, ei, label in zip(x, y, mean, std, budgets):
            label = label.replace(" vectors", "v")
            if yi != vi:
                label += f": {vi:.1f} ± {ei:.1f}, off the scale"
            offset, align = ((6, -12), "left") if peft else ((-6, 7), "right")
            ax.annotate(label, (xi, yi), xytext=offset, textcoords="offset points", fontsize=7.5, color=color,
                        ha=align)
    ax.set_ylim(floor, top)
    if curves:
        counts = [m[0] for members in curves.values() for m in members]
        ax.set_xlim(min(counts) / 1.8, max(counts) * 1.8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, without the head (log scale)")
    ax.set_ylabel("test accuracy, %  (mean ± std over seeds)")
    if title:
        ax.set_title(title, fontsize=10.5, loc="left")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="x", alpha=0.12)
    ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    from factnet import write_atomically

    write_atomically(str(path), lambda temp: Path(temp).write_bytes(data))


