"""The JSON spec an adapter file carries, and its checksum.

The spec (``factnet_format_version`` 2) holds the format, rank, factor letters, scale, dropout, the
head's module names, the storage ``dtype`` (``null``: as the adapter held them), a fingerprint of
the base model (``base``: the first 16 hex digits of the SHA-256 of the sorted listing of every
matrix outside the head, name, kind, ``d_out``, ``d_in``, and their count) and each group's slice
map as module-name templates with numeric runs: ``{"shape": [144, 768, 768], "slices":
["blocks.{0-11}.attn.qkv[0-2]", "blocks.{0-11}.attn.proj", ...]}`` (``[blocks]``: the blocks of a
cut matrix; none: the whole matrix). `load` expands the
templates, rebuilds the slices on the model (in the model's order, as `Tensorizer` makes them) and
checks them against each group's shape; the head parameters are the file's ``head.*`` tensors.
A ViT-B FacT-TT rank 8 file has a header under 1 KiB. Files of version 1 (the spec listed every
matrix of the base model and every slice) still load, unchanged. A low-bit file (version 3) adds
``bits``: ``{"factors": b | null, "head": b | null, "group": values per scale, "shapes": {tensor: shape}}``,
and holds each low-bit tensor as ``<name>.codes`` (uint8), ``<name>.scale`` and, above 1 bit,
``<name>.offset`` (float16) (`factnet.quant`). An adapter trained in the rank-stable parametrization
(`Format.multipliers`, relative to rank 1) adds ``"base_rank": 1`` (versions 2 and 3; absent: the paper's
parametrization), so that a loaded adapter trains on as it was trained; the tensors are the values the
increment uses.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from factnet.errors import FactnetError
from factnet.slices import Slice, find_matrices
from factnet.version import __version__

if TYPE_CHECKING:
    from factnet.adapter import Adapter

__all__ = ["CHECKSUM_KEY", "FORMAT_VERSION", "SPEC_KEY", "STORAGE_DTYPES"]

FORMAT_VERSION = 3  # the newest version read; files are written as version 2 unless low-bit (version 3)
SPEC_KEY = "factnet"
CHECKSUM_KEY = "factnet.sha256"
FINGERPRINT_DIGITS = 16  # hex digits of the base model's SHA-256 kept in the spec (64 bits)
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float64": torch.float64}
_SHOWN = 5  # mismatches listed in an error
MAX_SPEC_CHARACTERS = 1 << 22  # a spec longer than this is refused unparsed (ViT-B's is under 1 KiB)

@dataclass(frozen=True)
class _Optional:
    layout: Any  # a key of a {key: layout} that may be absent


# The spec's JSON layout: a type, a tuple of alternatives, [item layout], {key: layout} (exactly these keys,
# those marked `_Optional` may be absent) or {str: layout}.
_COMMON_LAYOUT: dict[Any, Any] = {
    "factnet_format_version": int, "factnet_version": str, "format": str, "rank": int, "factors": {str: str},
    "scale": float, "dropout": float,
}
_SPEC_LAYOUTS: dict[int, dict[Any, Any]] = {
    1: {**_COMMON_LAYOUT, "head": [str], "head_parameters": [str],
        "matrices": {str: {"kind": str, "d_out": int, "d_in": int}},
        "groups": {str: {"shape": [int], "slices": [{"module": str, "block": int, "side": str, "offset": int}]}}},
    2: {**_COMMON_LAYOUT, "dtype": (str, type(None)), "head": [str],
        "base": {"sha256": str, "matrices": int},
        "groups": {str: {"shape": [int], "slices": [str]}}},
}
_SPEC_LAYOUTS[2]["base_rank"] = _Optional(int)  # the rank-stable parametrization's base (1); absent: the paper's
_SPEC_LAYOUTS[2]["seed"] = _Optional(int)  # seeded factors (`Format.seeded`): group number g's are drawn from seed + g
_SPEC_LAYOUTS[3] = {**_SPEC_LAYOUTS[2], "bits": {"factors": (int, type(None)), "head": (int, type(None)), "group": int,
                                                 "shapes": {str: [int]}}}
_MAX_QUANTIZED = 1 << 40  # values of one low-bit tensor a spec may claim (its codes must hold them too)


# ---- the spec --------------------------------------------------------------------------------
def _matrices(model: nn.Module, head: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {kind, d_out, d_in}}`` (linear convention) of every matrix of ``model`` outside ``head``,
    adapted ones included: the architecture an adapter file fits."""
    found = find_matrices(model)  # adapted matrices included (as their `StandIn`)
    return {m.name: {"kind": m.kind, "d_out": m.d_out, "d_in": m.d_in} for m in found
            if not any(m.name == h or m.name.startswith(h + ".") for h in head)}


def _fingerprint(matrices: Mapping[str, Mapping[str, Any]]) -> str:
    """The first `FINGERPRINT_DIGITS` hex digits of the SHA-256 of the count and the sorted listing
    ``name, kind, d_out, d_in`` (one matrix a line) of ``matrices``."""
    lines = "".join(f"{name}\t{m['kind']}\t{m['d_out']}\t{m['d_in']}\n" for name, m in sorted(matrices.items()))
    return hashlib.sha256(f"{len(matrices)}\n{lines}".encode()).hexdigest()[:FINGERPRINT_DIGITS]


def _base(matrices: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"sha256": _fingerprint(matrices), "matrices": len(matrices)}


def _slice_map(groups: Mapping[str, Sequence[Slice]]) -> dict[str, dict[str, Any]]:
    """Version 1's ``{group: {shape: [n, d_in, d_out], slices: [...]}}``; a slice is block ``block`` of
    ``module``, cut along ``side`` ("out", "in" or "none"), starting at row/column ``offset`` of the
    ``(d_out, d_in)`` weight."""
    def entry(s: Slice) -> dict[str, Any]:
        offset = s.index * {"out": s.d_out, "in": s.d_in}.get(s.side, 0)
        return {"module": s.module, "block": s.index, "side": s.side, "offset": offset}

    return {name: {"shape": [len(members), members[0].d_in, members[0].d_out], "slices": [entry(s) for s in members]}
            for name, members in groups.items()}


_NUMBER = re.compile(r"0|[1-9][0-9]*")
_RUNS = re.compile(r"(0|[1-9][0-9]*)(-(0|[1-9][0-9]*))?(,(0|[1-9][0-9]*)(-(0|[1-9][0-9]*))?)*")
_TEMPLATE = re.compile(r"(?P<name>[^\[\]{}]*(\{[^\[\]{}]*\}[^\[\]{}]*)*)(\[(?P<blocks>[^\[\]{}]*)\])?")


def _runs(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"`` (sorted, distinct)."""
    ordered, parts = sorted(set(numbers)), []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda pair: pair[1] - pair[0]):
        values = [value for _, value in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts)


def _parse_runs(text: str) -> list[tuple[int, int]] | None:
    """``"0-2,5"`` → ``[(0, 2), (5, 5)]``, increasing and disjoint; ``None`` if malformed."""
    if not _RUNS.fullmatch(text):
        return None
    runs = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        runs.append((int(low), int(high or low)))
    ordered = all(a <= b for a, b in runs) and all(b < c for (_, b), (c, _) in itertools.pairwise(runs))
    return runs if ordered else None


def _templates(members: Sequence[Slice]) -> list[str]:
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
                f"[{_runs(found)}]" if cut[module] else "") for module, found in blocks.items()]
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
        return str(next(iter(segment))) if len(segment) == 1 else "{" + _runs(segment) + "}"

    return [".".join(render(s) for s in segments) + suffix for segments, suffix in entries]


@dataclass(frozen=True)
class _Template:
    """A parsed slice-map template: name segments (literal, or runs of numbers) and the blocks' runs
    (``None``: the whole matrix)."""

    segments: tuple[str | tuple[tuple[int, int], ...], ...]
    blocks: tuple[tuple[int, int], ...] | None

    @property
    def size(self) -> int:
        total = 1
        for runs in (*(s for s in self.segments if not isinstance(s, str)), self.blocks or ((0, 0),)):
            total *= sum(b - a + 1 for a, b in runs)
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


def _parse_template(text: str) -> _Template | None:
    parsed = _TEMPLATE.fullmatch(text)
    if parsed is None or not parsed["name"]:
        return None
    segments: list[str | tuple[tuple[int, int], ...]] = []
    for segment in parsed["name"].split("."):
        if segment.startswith("{") and segment.endswith("}"):
            runs = _parse_runs(segment[1:-1])
            if runs is None:
                return None
            segments.append(tuple(runs))
        elif "{" in segment or "}" in segment or not segment:
            return None
        else:
            segments.append(segment)
    if parsed["blocks"] is None:
        return _Template(tuple(segments), None)
    runs = _parse_runs(parsed["blocks"])
    return None if runs is None else _Template(tuple(segments), tuple(runs))


def _spec(adapter: Adapter, dtype: torch.dtype | None, bits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec of ``adapter`` saved with storage ``dtype`` and, for a low-bit file (version 3), ``bits``:
    ``{"factors": b | None, "head": b | None, "group": values per scale, "shapes": {tensor: shape}}``."""
    fmt, settings = adapter.format, adapter.settings
    groups = {name: adapter.group(name).slices for name in adapter.group_names}
    return {
        "factnet_format_version": 2 if bits is None else 3, "factnet_version": __version__,
        "format": fmt.name, "rank": fmt.rank, "factors": dict(fmt.factors),
        "scale": settings.scale, "dropout": settings.dropout,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "head": list(adapter.head),
        "base": _base(_matrices(adapter.model, adapter.head)),
        "groups": {name: {"shape": [len(members), members[0].d_in, members[0].d_out],
                          "slices": _templates(members)} for name, members in groups.items()},
    } | ({} if bits is None else {"bits": bits}) | ({"base_rank": 1} if settings.stable else {}) \
        | ({"seed": adapter.seed} if fmt.seeded else {})


def _fits(value: Any, layout: Any) -> bool:
    """Whether decoded JSON ``value`` has ``layout`` (see `_SPEC_LAYOUTS`)."""
    if layout is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(layout, tuple):
        return any(_fits(value, option) for option in layout)
    if isinstance(layout, type):
        return isinstance(value, layout) and not isinstance(value, bool)
    if isinstance(layout, list):
        return isinstance(value, list) and all(_fits(v, layout[0]) for v in value)
    if not isinstance(value, dict):
        return False
    if list(layout) == [str]:
        return all(_fits(v, layout[str]) for v in value.values())
    required = {k for k, sub in layout.items() if not isinstance(sub, _Optional)}
    return required <= value.keys() <= layout.keys() and all(
        _fits(value[k], sub.layout if isinstance(sub, _Optional) else sub) for k, sub in layout.items() if k in value)


def _malformed(path: str, problem: str) -> FactnetError:
    return FactnetError(f"{path} has a malformed factnet spec: {problem}; it was not written by adapter.save()")


def _parse_spec(text: str, path: str) -> dict[str, Any]:
    """The spec's JSON, checked for its size, version and layout (not yet against a model)."""
    if len(text) > MAX_SPEC_CHARACTERS:
        raise _malformed(path, f"its spec is {len(text):,} characters long, more than the {MAX_SPEC_CHARACTERS:,} "
                               "any adapter needs")
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):  # (RecursionError: JSON nested deeper than Python's stack)
        spec = None
    version = spec.get("factnet_format_version") if isinstance(spec, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise FactnetError(f"{path} has factnet_format_version {version}, but this factnet reads versions "
                           f"1 to {FORMAT_VERSION}; upgrade factnet to load it")
    layout = _SPEC_LAYOUTS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if layout is None or not _fits(spec, layout) or not spec["groups"]:
        raise FactnetError(f"{path} has a malformed factnet spec (expected the JSON layout of factnet_format_version "
                           f"1 to {FORMAT_VERSION} with at least one group); it was not written by adapter.save()")
    if version == 1:
        unlisted = {s["module"] for group in spec["groups"].values() for s in group["slices"]} - set(spec["matrices"])
        if unlisted:
            raise _malformed(path, f"its groups use matrices {sorted(unlisted)[:_SHOWN]} it does not list")
        return spec
    if spec.get("base_rank", 1) != 1:
        raise _malformed(path, f"its base_rank is {spec['base_rank']!r}; the rank-stable parametrization's is 1")
    if spec["dtype"] is not None and spec["dtype"] not in STORAGE_DTYPES:
        raise _malformed(path, f"storage dtype {spec['dtype']!r} is not one of {list(STORAGE_DTYPES)}")
    if not re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_DIGITS}}}", spec["base"]["sha256"]):
        raise _malformed(path, f"the base model's fingerprint {spec['base']['sha256']!r} is not "
                               f"{FINGERPRINT_DIGITS} hex digits")
    for name, group in spec["groups"].items():
        shape = group["shape"]
        if len(shape) != 3 or min(shape) < 1:
            raise _malformed(path, f"group {name!r} has shape {shape}, not [n, d_in, d_out] of positive sizes")
        templates = [_parse_template(t) for t in group["slices"]]
        if None in templates:
            bad = group["slices"][templates.index(None)]
            raise _malformed(path, f"group {name!r} has the slice template {bad!r} (expected a module name with "
                                   "numeric runs such as 'blocks.{0-11}.attn.qkv[0-2]')")
        count = sum(t.size for t in templates)  # type: ignore[union-attr]
        if count != shape[0]:
            raise _malformed(path, f"the slice templates of group {name!r} stand for {count} slices, but its shape "
                                   f"{shape} has {shape[0]}")
    if version == 3:
        _check_bits(spec["bits"], path)
    return spec


def _check_bits(bits: dict[str, Any], path: str) -> None:
    """A low-bit file's ``bits`` entry: known bit widths, a positive group, and shapes of tensors whose kind
    (``factors.`` or ``head.``) is stored low-bit, each of positive sizes and at most `_MAX_QUANTIZED` values."""
    from factnet.quant import BITS

    for kind in ("factors", "head"):
        if bits[kind] is not None and bits[kind] not in BITS:
            raise _malformed(path, f"its {kind} are stored in {bits[kind]!r} bits, not one of {BITS}")
    if bits["group"] < 1:
        raise _malformed(path, f"its low-bit group size {bits['group']} is not positive")
    for name, shape in bits["shapes"].items():
        kind = name.partition(".")[0]
        if kind not in ("factors", "head") or bits[kind] is None:
            raise _malformed(path, f"it lists {name!r} as low-bit, but its {kind} are not stored low-bit")
        if not 1 <= len(shape) <= 8 or min(shape) < 1 or math.prod(shape) > _MAX_QUANTIZED:
            raise _malformed(path, f"low-bit tensor {name!r} has shape {shape}, not 1 to 8 positive sizes of at most "
                                   f"{_MAX_QUANTIZED} values")


def _checksum(spec_text: str, tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the spec JSON and every tensor's name, dtype, shape and bytes (in key order)."""
    digest = hashlib.sha256(spec_text.encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
