"""An adapter file's spec as JSON, checked before anything reads it (`parse_json`): its size, its version (1 to
`FORMAT_VERSION`), the JSON layout of that version, and the values a layout cannot say (fingerprint and digest
digits, template syntax and counts, dtypes, bit widths, shapes). Nothing is checked against a model here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from factnet.errors import FactnetError
from factnet.file.templates import GROUPS_DIGITS, parse_template
from factnet.quant import BITS

__all__ = ["DEFAULT_RULES", "FINGERPRINT_DIGITS", "FORMAT_VERSION", "MAX_SPEC_CHARACTERS", "SHOWN", "SPEC_KEYS",
           "STORAGE_DTYPES", "malformed", "parse_json"]

FORMAT_VERSION = 4  # the version written, and the newest read
FINGERPRINT_DIGITS = 16  # hex digits of the base model's SHA-256 kept in the spec (64 bits)
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float64": torch.float64}
SHOWN = 5  # mismatches listed in an error
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
SPEC_KEYS = tuple(_SPEC_LAYOUTS[FORMAT_VERSION])  # the keys of the spec written, in the order written


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


def malformed(path: str, problem: str) -> FactnetError:
    """The error for a file whose spec is not one `adapter.save()` writes: ``problem`` says why."""
    return FactnetError(f"{path} has a malformed factnet spec: {problem}; it was not written by adapter.save()")


def parse_json(text: str, path: str) -> dict[str, Any]:
    """The spec's JSON as written, checked for its size, version, layout and values (not yet against a model)."""
    if len(text) > MAX_SPEC_CHARACTERS:
        raise malformed(path, f"its spec is {len(text):,} characters long, more than the {MAX_SPEC_CHARACTERS:,} "
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
            raise malformed(path, f"its groups use matrices {sorted(unlisted)[:SHOWN]} it does not list")
        return spec
    if spec.get("base_rank", 1) != 1:
        raise malformed(path, f"its base_rank is {spec['base_rank']!r}; the rank-stable parametrization's is 1")
    if spec.get("dtype") is not None and spec["dtype"] not in STORAGE_DTYPES:
        raise malformed(path, f"storage dtype {spec['dtype']!r} is not one of {list(STORAGE_DTYPES)}")
    if not re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_DIGITS}}}", spec["base"]["sha256"]):
        raise malformed(path, f"the base model's fingerprint {spec['base']['sha256']!r} is not "
                              f"{FINGERPRINT_DIGITS} hex digits")
    for name, group in spec.get("groups", {}).items():
        shape = group["shape"]
        if len(shape) != 3 or min(shape) < 1:
            raise malformed(path, f"group {name!r} has shape {shape}, not [n, d_in, d_out] of positive sizes")
        templates = [parse_template(t) for t in group["slices"]]
        if None in templates:
            bad = group["slices"][templates.index(None)]
            raise malformed(path, f"group {name!r} has the slice template {bad!r} (expected a module name with "
                                  "numeric runs such as 'blocks.{0-11}.attn.qkv[0-2]')")
        count = sum(t.size for t in templates)  # type: ignore[union-attr]
        if count != shape[0]:
            raise malformed(path, f"the slice templates of group {name!r} stand for {count} slices, but its shape "
                                  f"{shape} has {shape[0]}")
    if version == 3:
        _check_bits(spec["bits"], path)
    if version == 4:
        _check_v4(spec, path)
    return spec


def _check_v4(spec: dict[str, Any], path: str) -> None:
    """What a version-4 spec adds to version 2's: one slice map, the head's shapes, the dtypes and the bits."""
    if "groups" in spec and "default_groups" in spec:
        raise malformed(path, "it has both groups and default_groups (one slice map)")
    rule = spec.get("default_groups")
    if rule is not None and rule["by"] not in DEFAULT_RULES:
        raise malformed(path, f"its default groups are by {rule['by']!r}, not one of {list(DEFAULT_RULES)}")
    if rule is not None and not re.fullmatch(f"[0-9a-f]{{{GROUPS_DIGITS}}}", rule["sha256"]):
        raise malformed(path, f"its slice map's digest {rule['sha256']!r} is not {GROUPS_DIGITS} hex digits")
    head = spec.get("head_shapes", {})
    for name, shape in head.items():
        if not name or len(shape) > 8 or min(shape, default=1) < 1 or math.prod(shape) > _MAX_QUANTIZED:
            raise malformed(path, f"head parameter {name!r} has shape {shape}, not up to 8 positive sizes of at "
                                  f"most {_MAX_QUANTIZED} values")
    if "dtype" in spec and "held" in spec:
        raise malformed(path, "it has both a storage dtype and the dtypes values were held in")
    held = spec.get("held", {})
    for key, dtype in (held.items() if isinstance(held, dict) else [(None, held)]):
        if dtype not in STORAGE_DTYPES or key not in (None, "factors", *head):
            raise malformed(path, f"it says values {key or 'all'} were held in {dtype!r} (expected 'factors' or a "
                                  f"head parameter, and one of {list(STORAGE_DTYPES)})")
    bits = spec.get("bits")
    if bits is not None:
        _check_widths(bits, path)
        if bits["factors"] is None and (bits["head"] is None or not head):
            raise malformed(path, "its bits store nothing low-bit (no factors, and no head held in the file)")


def _check_bits(bits: dict[str, Any], path: str) -> None:
    """A low-bit file's ``bits`` entry: known bit widths, a positive group, and shapes of tensors whose kind
    (``factors.`` or ``head.``) is stored low-bit, each of positive sizes and at most `_MAX_QUANTIZED` values."""
    _check_widths(bits, path)
    for name, shape in bits["shapes"].items():
        kind = name.partition(".")[0]
        if kind not in ("factors", "head") or bits[kind] is None:
            raise malformed(path, f"it lists {name!r} as low-bit, but its {kind} are not stored low-bit")
        if not 1 <= len(shape) <= 8 or min(shape) < 1 or math.prod(shape) > _MAX_QUANTIZED:
            raise malformed(path, f"low-bit tensor {name!r} has shape {shape}, not 1 to 8 positive sizes of at most "
                                  f"{_MAX_QUANTIZED} values")


def _check_widths(bits: dict[str, Any], path: str) -> None:
    """A low-bit file's bit widths (each of `BITS` or null) and its positive group size."""
    for kind in ("factors", "head"):
        if bits[kind] is not None and bits[kind] not in BITS:
            raise malformed(path, f"its {kind} are stored in {bits[kind]!r} bits, not one of {BITS}")
    if bits["group"] < 1:
        raise malformed(path, f"its low-bit group size {bits['group']} is not positive")
