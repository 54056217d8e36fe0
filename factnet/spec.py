"""The JSON spec an adapter file carries, and its checksum.

The spec (``factnet_format_version`` 4) holds the format, rank and factor letters (``"factors": "iab,ja,kb"``,
the format's einsum operands), scale, dropout (absent: 0), the head's module names and, when the file holds the
head, its parameters' shapes (``head_shapes``), a fingerprint of the base model (``base``: the first 16 hex
digits of the SHA-256 of the sorted listing of every matrix outside the head, name, kind, ``d_out``, ``d_in``,
and their count) and the slice map, one of:

- ``default_groups``: ``{"by": "shape" | "stage", "sha256": 8 hex digits}``, the adapter's slices being the
  model's default targets grouped that way (what `Tensorizer(model).group(by)` gives): nothing about them is
  written, `load` rebuilds them on the model and checks them against the digest of their slice map;
- ``groups``: each group's slice map as module-name templates with numeric runs, as in version 2:
  ``{"shape": [144, 768, 768], "slices": ["blocks.{0-11}.attn.qkv[0-2]", "blocks.{0-11}.attn.proj", ...]}``
  (``[blocks]``: the blocks of a cut matrix; none: the whole matrix).

``dtype`` names the storage dtype values were cast to (`load` casts them back); without it the values are
as the adapter held them, and ``held`` says in which dtype: one name for every value, or
``{"factors": dtype, head parameter: dtype, ...}`` where they differ. A low-bit file adds ``bits``:
``{"factors": b | null, "head": b | null, "group": values per scale}`` (the tensors' shapes follow from the
format, the slices and ``head_shapes``). An adapter trained in the rank-stable parametrization
(`Format.multipliers`, relative to rank 1) adds ``"base_rank": 1`` (absent: the paper's parametrization) and a
gain given ``gain``, one with seeded factors or a seed ``seed``, one with targets given ``targets`` and one grouped
by a rule its slice map does not say ``by`` (`factnet.config.spec_fields`: the adapter's `AdapterConfig`). With
the tensors packed (`factnet.files`), a file of the default targets has a header (spec included) of 500 to 700 bytes on any model; a listed slice map adds its templates.

Older versions still load, unchanged: version 1 listed every matrix of the base model and every slice;
version 2 wrote the ``groups`` templates always, ``dtype`` null for as held, the factor letters as a dict and
one safetensors tensor per factor and head parameter; version 3 (low-bit) added ``bits`` with every low-bit
tensor's shape (``"shapes": {tensor: shape}``), each stored as ``<name>.codes`` (uint8), ``<name>.scale`` and,
above 1 bit, ``<name>.offset`` (float16) (`factnet.quant`).
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

from factnet.config import spec_fields
from factnet.errors import FactnetError
from factnet.grouping import make_groups
from factnet.slices import Slice, default_slices, find_matrices
from factnet.version import __version__

if TYPE_CHECKING:
    from factnet.adapter import Adapter

__all__ = ["CHECKSUM_KEY", "DEFAULT_RULES", "FORMAT_VERSION", "SPEC_KEY", "STORAGE_DTYPES", "group_templates",
           "groups_digest"]

FORMAT_VERSION = 4  # the version written, and the newest read
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
_SPEC_LAYOUTS[4] = {
    "factnet_format_version": int, "factnet_version": str, "format": str, "rank": int, "factors": str,
    "scale": float, "dropout": _Optional(float), "dtype": _Optional(str), "held": _Optional((str, {str: str})),
    "head": [str], "head_shapes": _Optional({str: [int]}), "base": {"sha256": str, "matrices": int},
    "groups": _Optional({str: {"shape": [int], "slices": [str]}}),
    "default_groups": _Optional({"by": str, "sha256": str}),
    "bits": _Optional({"factors": (int, type(None)), "head": (int, type(None)), "group": int}),
    "base_rank": _Optional(int), "seed": _Optional(int), "gain": _Optional(float), "targets": _Optional([str]),
    "by": _Optional((str, {str: [str]})),
}
_MAX_QUANTIZED = 1 << 40  # values of one low-bit tensor a spec may claim (its codes must hold them too)
DEFAULT_RULES = ("shape", "stage")  # groupings of the default targets a version-4 spec names instead of listing
GROUPS_DIGITS = 8  # hex digits of the slice map's SHA-256 kept with ``default_groups``


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


def group_templates(groups: Mapping[str, Sequence[Slice]]) -> dict[str, dict[str, Any]]:
    """The slice map of ``groups`` as the spec writes it: ``{group: {"shape": [n, d_in, d_out], "slices":
    [template, ...]}}``."""
    return {name: {"shape": [len(members), members[0].d_in, members[0].d_out], "slices": _templates(members)}
            for name, members in groups.items()}


def groups_digest(groups: Mapping[str, Sequence[Slice]]) -> str:
    """The first `GROUPS_DIGITS` hex digits of the SHA-256 of `group_templates` as compact JSON (groups in order):
    what a ``default_groups`` spec checks the slices rebuilt on a model against."""
    text = json.dumps(group_templates(groups), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:GROUPS_DIGITS]


def _default_rule(model: nn.Module, groups: Mapping[str, Sequence[Slice]]) -> str | None:
    """The rule of `DEFAULT_RULES` by which ``model``'s default targets give exactly ``groups`` (names, slices,
    order), or None."""
    try:
        targets = default_slices(model, find_matrices(model))
    except FactnetError:
        return None
    wanted = [(name, tuple(members)) for name, members in groups.items()]
    for rule in DEFAULT_RULES:
        try:
            if list(make_groups(targets, rule).items()) == wanted:
                return rule
        except FactnetError:  # (a slice without a stage index)
            continue
    return None


def _spec(adapter: Adapter, dtype: torch.dtype | None, held: str | dict[str, str] | None = None,
          head_shapes: Mapping[str, Sequence[int]] | None = None, bits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The version-4 spec of ``adapter`` saved with storage ``dtype`` (None: as ``held``, the dtype of every
    value or ``{"factors" | head parameter: dtype}``), the head's parameters of ``head_shapes`` (None: without
    the head) and, for a low-bit file, ``bits``: ``{"factors": b | None, "head": b | None, "group": values per
    scale}``."""
    fmt = adapter.format
    groups = {name: adapter.group(name).slices for name in adapter.group_names}
    rule = _default_rule(adapter.model, groups)
    spec: dict[str, Any] = {
        "factnet_format_version": FORMAT_VERSION, "factnet_version": __version__,
        "format": fmt.name, "rank": fmt.rank, "factors": ",".join(fmt.factors.values()),
    }
    spec |= {"held": held} if dtype is None and held is not None else {}
    spec |= {} if dtype is None else {"dtype": str(dtype).removeprefix("torch.")}
    spec |= {"head": list(adapter.head)}
    spec |= {"head_shapes": {name: list(shape) for name, shape in head_shapes.items()}} if head_shapes else {}
    spec |= {"base": _base(_matrices(adapter.model, adapter.head))}
    spec |= {"groups": group_templates(groups)} if rule is None else {
        "default_groups": {"by": rule, "sha256": groups_digest(groups)}}
    spec |= {} if bits is None else {"bits": bits}
    return spec | spec_fields(adapter.config, adapter.settings.scale, rule)


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
    if layout is None or not _fits(spec, layout) or not spec.get("groups", version == 4 and "default_groups" in spec):
        raise FactnetError(f"{path} has a malformed factnet spec (expected the JSON layout of factnet_format_version "
                           f"1 to {FORMAT_VERSION} with at least one group); it was not written by adapter.save()")
    if version == 1:
        unlisted = {s["module"] for group in spec["groups"].values() for s in group["slices"]} - set(spec["matrices"])
        if unlisted:
            raise _malformed(path, f"its groups use matrices {sorted(unlisted)[:_SHOWN]} it does not list")
        return spec
    if spec.get("base_rank", 1) != 1:
        raise _malformed(path, f"its base_rank is {spec['base_rank']!r}; the rank-stable parametrization's is 1")
    if spec.get("dtype") is not None and spec["dtype"] not in STORAGE_DTYPES:
        raise _malformed(path, f"storage dtype {spec['dtype']!r} is not one of {list(STORAGE_DTYPES)}")
    if not re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_DIGITS}}}", spec["base"]["sha256"]):
        raise _malformed(path, f"the base model's fingerprint {spec['base']['sha256']!r} is not "
                               f"{FINGERPRINT_DIGITS} hex digits")
    for name, group in spec.get("groups", {}).items():
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
    if version == 4:
        _check_v4(spec, path)
    return spec


def _check_v4(spec: dict[str, Any], path: str) -> None:
    """What a version-4 spec adds to version 2's: one slice map, the head's shapes, the dtypes and the bits."""
    if "groups" in spec and "default_groups" in spec:
        raise _malformed(path, "it has both groups and default_groups (one slice map)")
    rule = spec.get("default_groups")
    if rule is not None and rule["by"] not in DEFAULT_RULES:
        raise _malformed(path, f"its default groups are by {rule['by']!r}, not one of {list(DEFAULT_RULES)}")
    if rule is not None and not re.fullmatch(f"[0-9a-f]{{{GROUPS_DIGITS}}}", rule["sha256"]):
        raise _malformed(path, f"its slice map's digest {rule['sha256']!r} is not {GROUPS_DIGITS} hex digits")
    head = spec.get("head_shapes", {})
    for name, shape in head.items():
        if not name or len(shape) > 8 or min(shape, default=1) < 1 or math.prod(shape) > _MAX_QUANTIZED:
            raise _malformed(path, f"head parameter {name!r} has shape {shape}, not up to 8 positive sizes of at "
                                   f"most {_MAX_QUANTIZED} values")
    if "dtype" in spec and "held" in spec:
        raise _malformed(path, "it has both a storage dtype and the dtypes values were held in")
    held = spec.get("held", {})
    for key, dtype in (held.items() if isinstance(held, dict) else [(None, held)]):
        if dtype not in STORAGE_DTYPES or key not in (None, "factors", *head):
            raise _malformed(path, f"it says values {key or 'all'} were held in {dtype!r} (expected 'factors' or a "
                                   f"head parameter, and one of {list(STORAGE_DTYPES)})")
    bits = spec.get("bits")
    if bits is not None:
        from factnet.quant import BITS

        for kind in ("factors", "head"):
            if bits[kind] is not None and bits[kind] not in BITS:
                raise _malformed(path, f"its {kind} are stored in {bits[kind]!r} bits, not one of {BITS}")
        if bits["group"] < 1:
            raise _malformed(path, f"its low-bit group size {bits['group']} is not positive")
        if bits["factors"] is None and (bits["head"] is None or not head):
            raise _malformed(path, "its bits store nothing low-bit (no factors, and no head held in the file)")


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
