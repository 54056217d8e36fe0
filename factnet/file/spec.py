"""The JSON spec an adapter file carries: written (`build_spec`), and read back checked (`factnet.file.validate`)
and upgraded into its current form, a `Spec` (`read_spec`).

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
  (``[blocks]``: the blocks of a cut matrix; none: the whole matrix; `factnet.file.templates`).

``dtype`` names the storage dtype values were cast to (`load` casts them back); without it the values are
as the adapter held them, and ``held`` says in which dtype: one name for every value, or
``{"factors": dtype, head parameter: dtype, ...}`` where they differ. A low-bit file adds ``bits``:
``{"factors": b | null, "head": b | null, "group": values per scale}`` (the tensors' shapes follow from the
format, the slices and ``head_shapes``). An adapter trained in the rank-stable parametrization
(`Format.multipliers`, relative to rank 1) adds ``"base_rank": 1`` (absent: the paper's parametrization) and a
gain given ``gain``, one with seeded factors or a seed ``seed``, one with targets given ``targets`` and one grouped
by a rule its slice map does not say ``by`` (`factnet.config.spec_fields`: the adapter's `AdapterConfig`, read
back as `Spec.config`). With the tensors packed (`factnet.file.packs`), a file of the default targets has a
header (spec included) of 500 to 700 bytes on any model; a listed slice map adds its templates.

Older versions still load, upgraded into a `Spec` when read: version 1 listed every matrix of the base model
and every slice; version 2 wrote the ``groups`` templates always, ``dtype`` null for as held, the factor letters
as a dict and one safetensors tensor per factor and head parameter; version 3 (low-bit) added ``bits`` with
every low-bit tensor's shape (``"shapes": {tensor: shape}``), each stored as ``<name>.codes`` (uint8),
``<name>.scale`` and, above 1 bit, ``<name>.offset`` (float16) (`factnet.file.codes`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from factnet.config import AdapterConfig, spec_config, spec_fields
from factnet.errors import FactnetError
from factnet.file.templates import group_templates, groups_digest
from factnet.file.validate import DEFAULT_RULES, FINGERPRINT_DIGITS, FORMAT_VERSION, SPEC_KEYS, parse_json
from factnet.grouping import make_groups
from factnet.slices import Slice, default_slices, find_matrices
from factnet.version import __version__

if TYPE_CHECKING:
    from factnet.adapter import Adapter

__all__ = ["Spec", "base_matrices", "base_of", "build_spec", "fingerprint", "read_spec"]


@dataclass(frozen=True)
class Spec:
    """An adapter file's spec in its current form (version 4's), whatever version wrote it: `read_spec`
    upgrades versions 1 to 3 into it, so nothing after it reads a version. What only an older version wrote,
    which its checks explain a mismatch by, is in the last four fields (None for a version-4 file)."""

    written: dict[str, Any]  # the JSON as the file holds it
    factnet_version: str  # of the factnet that wrote it
    format: str
    rank: int
    factors: str | dict[str, str]  # the factor letters, "iab,ja,kb" (versions 1 to 3: {factor: letters})
    scale: float
    dropout: float
    stable: bool  # the rank-stable parametrization (``base_rank`` 1)
    seed: int  # seeded factors: group number g's are drawn from seed + g
    head: list[str]  # the head's module names
    base: dict[str, Any]  # the base model's {"sha256": fingerprint, "matrices": count} (version 1: of `matrices`)
    groups: dict[str, dict[str, Any]] | None  # the slice map as templates; or the default targets by a rule:
    default_groups: dict[str, str] | None  # {"by": rule, "sha256": digest}; or (version 1) `listed`
    dtype: str | None  # the storage dtype values were cast to (None: as held)
    held: str | dict[str, str] | None  # as held: in which dtype(s), where the spec says (version 4)
    head_shapes: dict[str, list[int]]  # the head parameters the packs hold ({}: none, or stored by name)
    bits: dict[str, Any] | None  # low-bit: {"factors": b | None, "head": b | None, "group": values per scale}
    packed: bool  # the tensors are packs, one per dtype (`factnet.file.packs`); else one per factor/parameter
    matrices: dict[str, dict[str, Any]] | None  # version 1: the base model's matrices outside the head
    listed: dict[str, dict[str, Any]] | None  # version 1: every group's slices, with their offsets
    head_parameters: list[str] | None  # version 1: the head's parameters the file holds
    low_bit: dict[str, list[int]] | None  # version 3: the shape of each tensor stored low-bit

    @property
    def config(self) -> AdapterConfig:
        """The adapter's settings (`factnet.config.spec_config`; a field a file lacks: its default), once the
        file's format is known to be registered (`factnet.file.compat`)."""
        return spec_config(self.written)


def read_spec(text: str, path: str) -> Spec:
    """The spec of the JSON ``text`` (checked, `parse_json`), upgraded into its current form."""
    written = parse_json(text, path)
    version, bits = written["factnet_format_version"], written.get("bits")
    return Spec(
        written=written, factnet_version=written["factnet_version"], format=written["format"],
        rank=written["rank"], factors=written["factors"], scale=written["scale"],
        dropout=written.get("dropout", 0.0), stable="base_rank" in written, seed=written.get("seed", 0),
        head=list(written["head"]), base=base_of(written["matrices"]) if version == 1 else written["base"],
        groups=None if version == 1 else written.get("groups"), default_groups=written.get("default_groups"),
        dtype=written.get("dtype"), held=written.get("held"), head_shapes=written.get("head_shapes", {}),
        bits=None if bits is None else {key: bits[key] for key in ("factors", "head", "group")},
        packed=version == FORMAT_VERSION, matrices=written.get("matrices"),
        listed=written["groups"] if version == 1 else None, head_parameters=written.get("head_parameters"),
        low_bit=None if bits is None else bits.get("shapes"))


def base_matrices(model: nn.Module, head: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {kind, d_out, d_in}}`` (linear convention) of every matrix of ``model`` outside ``head``,
    adapted ones included: the architecture an adapter file fits."""
    found = find_matrices(model)  # adapted matrices included (as their `StandIn`)
    return {m.name: {"kind": m.kind, "d_out": m.d_out, "d_in": m.d_in} for m in found
            if not any(m.name == h or m.name.startswith(h + ".") for h in head)}


def fingerprint(matrices: Mapping[str, Mapping[str, Any]]) -> str:
    """The first `FINGERPRINT_DIGITS` hex digits of the SHA-256 of the count and the sorted listing
    ``name, kind, d_out, d_in`` (one matrix a line) of ``matrices``."""
    lines = "".join(f"{name}\t{m['kind']}\t{m['d_out']}\t{m['d_in']}\n" for name, m in sorted(matrices.items()))
    return hashlib.sha256(f"{len(matrices)}\n{lines}".encode()).hexdigest()[:FINGERPRINT_DIGITS]


def base_of(matrices: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The spec's ``base``: the fingerprint and the count of ``matrices`` (`base_matrices`)."""
    return {"sha256": fingerprint(matrices), "matrices": len(matrices)}


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


def build_spec(adapter: Adapter, dtype: torch.dtype | None, held: str | dict[str, str] | None = None,
               head_shapes: Mapping[str, Sequence[int]] | None = None,
               bits: dict[str, Any] | None = None) -> dict[str, Any]:
    """The version-4 spec of ``adapter`` saved with storage ``dtype`` (None: as ``held``, the dtype of every
    value or ``{"factors" | head parameter: dtype}``), the head's parameters of ``head_shapes`` (None: without
    the head) and, for a low-bit file, ``bits``: ``{"factors": b | None, "head": b | None, "group": values per
    scale}``; its keys in the order of the version-4 layout."""
    fmt = adapter.format
    groups = {name: adapter.group(name).slices for name in adapter.group_names}
    rule = _default_rule(adapter.model, groups)
    spec: dict[str, Any] = {
        "factnet_format_version": FORMAT_VERSION, "factnet_version": __version__,
        "format": fmt.name, "rank": fmt.rank, "factors": ",".join(fmt.factors.values()),
    }
    spec |= spec_fields(adapter.config, adapter.settings.scale, rule)
    spec |= {"held": held} if dtype is None and held is not None else {}
    spec |= {} if dtype is None else {"dtype": str(dtype).removeprefix("torch.")}
    spec |= {"head": list(adapter.head)}
    spec |= {"head_shapes": {name: list(shape) for name, shape in head_shapes.items()}} if head_shapes else {}
    spec |= {"base": base_of(base_matrices(adapter.model, adapter.head))}
    spec |= {"groups": group_templates(groups)} if rule is None else {
        "default_groups": {"by": rule, "sha256": groups_digest(groups)}}
    spec |= {} if bits is None else {"bits": bits}
    return {key: spec[key] for key in SPEC_KEYS if key in spec}

