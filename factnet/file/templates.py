"""A spec's slice map: each group's slices as module-name templates with numeric runs
(``"blocks.{0-11}.attn.qkv[0-2]"``: ``[blocks]`` the blocks of a cut matrix, none the whole matrix), parsed
back (`parse_template`), and their digest (`groups_digest`); version 1's listing of every slice
(`slice_listing`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from factnet.errors import FactnetError
from factnet.slices import Slice

__all__ = ["GROUPS_DIGITS", "Template", "group_templates", "groups_digest", "parse_runs", "parse_template", "runs",
           "slice_listing", "slice_templates"]

GROUPS_DIGITS = 8  # hex digits of the slice map's SHA-256 kept with ``default_groups``
_NUMBER = re.compile(r"0|[1-9][0-9]*")
_RUNS = re.compile(r"(0|[1-9][0-9]*)(-(0|[1-9][0-9]*))?(,(0|[1-9][0-9]*)(-(0|[1-9][0-9]*))?)*")
_TEMPLATE = re.compile(r"(?P<name>[^\[\]{}]*(\{[^\[\]{}]*\}[^\[\]{}]*)*)(\[(?P<blocks>[^\[\]{}]*)\])?")


def slice_listing(groups: Mapping[str, Sequence[Slice]]) -> dict[str, dict[str, Any]]:
    """Version 1's ``{group: {shape: [n, d_in, d_out], slices: [...]}}``; a slice is block ``block`` of
    ``module``, cut along ``side`` ("out", "in" or "none"), starting at row/column ``offset`` of the
    ``(d_out, d_in)`` weight."""
    def entry(s: Slice) -> dict[str, Any]:
        offset = s.index * {"out": s.d_out, "in": s.d_in}.get(s.side, 0)
        return {"module": s.module, "block": s.index, "side": s.side, "offset": offset}

    return {name: {"shape": [len(members), members[0].d_in, members[0].d_out], "slices": [entry(s) for s in members]}
            for name, members in groups.items()}


def runs(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"`` (sorted, distinct)."""
    ordered, parts = sorted(set(numbers)), []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda pair: pair[1] - pair[0]):
        values = [value for _, value in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts)


def parse_runs(text: str) -> list[tuple[int, int]] | None:
    """``"0-2,5"`` → ``[(0, 2), (5, 5)]``, increasing and disjoint; ``None`` if malformed."""
    if not _RUNS.fullmatch(text):
        return None
    found = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        found.append((int(low), int(high or low)))
    ordered = all(a <= b for a, b in found) and all(b < c for (_, b), (c, _) in itertools.pairwise(found))
    return found if ordered else None


def slice_templates(members: Sequence[Slice]) -> list[str]:
    """The slices of one group as module-name templates: every module with its blocks (``[0-2]``; none for a
    whole matrix), then modules that differ in one numeric name segment merged into a run (``{0-11}``), until
    none merge. Each template stands for the product of its runs: exactly the group's slices."""
    blocks: dict[str, list[int]] = {}
    cut: dict[str, bool] = {}
    for piece in members:
        if any(c in piece.module for c in "{}[],"):
            raise FactnetError(f"module name {piece.module!r} has a brace, bracket or comma, which the adapter file's "
                               "slice map cannot name; rename the module to save the adapter")
        blocks.setdefault(piece.module, []).append(piece.index)
        cut[piece.module] = piece.side != "none"
    entries = [(tuple(frozenset([int(s)]) if _NUMBER.fullmatch(s) else s for s in module.split(".")),
                f"[{runs(found)}]" if cut[module] else "") for module, found in blocks.items()]
    merged = True
    while merged:
        merged = False
        for position in reversed(range(max(len(segments) for segments, _ in entries))):
            buckets: dict[tuple, list[Any]] = {}  # key -> [numbers (None: not mergeable here), segments, suffix]
            for segments, suffix in entries:
                if position < len(segments) and isinstance(segments[position], frozenset):
                    key: tuple = (segments[:position], segments[position + 1:], suffix)
                    if key in buckets:
                        buckets[key][0] |= segments[position]
                        merged = True
                    else:
                        buckets[key] = [segments[position], segments, suffix]
                else:
                    buckets[(segments, suffix)] = [None, segments, suffix]
            entries = [(segments if numbers is None else (*segments[:position], numbers, *segments[position + 1:]),
                        suffix) for numbers, segments, suffix in buckets.values()]

    def render(segment: str | frozenset) -> str:
        if isinstance(segment, str):
            return segment
        return str(next(iter(segment))) if len(segment) == 1 else "{" + runs(segment) + "}"

    return [".".join(render(s) for s in segments) + suffix for segments, suffix in entries]


@dataclass(frozen=True)
class Template:
    """A parsed slice-map template: name segments (literal, or runs of numbers) and the blocks' runs
    (``None``: the whole matrix)."""

    segments: tuple[str | tuple[tuple[int, int], ...], ...]
    blocks: tuple[tuple[int, int], ...] | None

    @property
    def size(self) -> int:
        total = 1
        for found in (*(s for s in self.segments if not isinstance(s, str)), self.blocks or ((0, 0),)):
            total *= sum(b - a + 1 for a, b in found)
        return total

    def expand(self) -> Iterable[tuple[str, int]]:
        """``(module, block)`` of every slice it stands for (block 0 for a whole matrix)."""
        def values(segment: str | tuple[tuple[int, int], ...]) -> Iterable[str]:
            if isinstance(segment, str):
                return (segment,)
            return [str(v) for a, b in segment for v in range(a, b + 1)]

        for parts in itertools.product(*(values(s) for s in self.segments)):
            module = ".".join(parts)
            for a, b in self.blocks or ((0, 0),):
                for block in range(a, b + 1):
                    yield module, block


def parse_template(text: str) -> Template | None:
    """The `Template` a slice-map entry writes, or ``None`` if it is malformed."""
    parsed = _TEMPLATE.fullmatch(text)
    if parsed is None or not parsed["name"]:
        return None
    segments: list[str | tuple[tuple[int, int], ...]] = []
    for segment in parsed["name"].split("."):
        if segment.startswith("{") and segment.endswith("}"):
            found = parse_runs(segment[1:-1])
            if found is None:
                return None
            segments.append(tuple(found))
        elif "{" in segment or "}" in segment or not segment:
            return None
        else:
            segments.append(segment)
    if parsed["blocks"] is None:
        return Template(tuple(segments), None)
    found = parse_runs(parsed["blocks"])
    return None if found is None else Template(tuple(segments), tuple(found))


def group_templates(groups: Mapping[str, Sequence[Slice]]) -> dict[str, dict[str, Any]]:
    """The slice map of ``groups`` as the spec writes it: ``{group: {"shape": [n, d_in, d_out], "slices":
    [template, ...]}}``."""
    return {name: {"shape": [len(members), members[0].d_in, members[0].d_out], "slices": slice_templates(members)}
            for name, members in groups.items()}


def groups_digest(groups: Mapping[str, Sequence[Slice]]) -> str:
    """The first `GROUPS_DIGITS` hex digits of the SHA-256 of `group_templates` as compact JSON (groups in order):
    what a ``default_groups`` spec checks the slices rebuilt on a model against."""
    text = json.dumps(group_templates(groups), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:GROUPS_DIGITS]
