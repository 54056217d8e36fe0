"""`AdapterConfig`: every setting of an adapter in one frozen value, checked when it is built.

    config = AdapterConfig("tt", rank=8, bits=2)
    adapter = Tensorizer(model).decompose(config)          # the same as decompose("tt", rank=8, bits=2)
    adapter.config                                          # resolved: the rank and bits a budget picked

``print(config)`` is the line that builds it (defaults left out); ``eval`` of it gives an equal config when its
format is a name and its grouping a name, regex or dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from factnet.budget import read_budget
from factnet.errors import FactnetError
from factnet.formats import Format, get_format
from factnet.grouping import GroupBy
from factnet.quant import check_bits

__all__ = ["AdapterConfig", "is_auto", "spec_config", "spec_fields"]


@dataclass(frozen=True, repr=False)
class AdapterConfig:
    """An adapter's settings, as `Tensorizer.decompose` takes them (see there for what each does).

    ``format``: a registered name, a `Format`, or None / ``"auto"`` (with a budget in bytes: picked);
    ``rank`` or ``budget`` (parameters ``10_000``/``"10k"`` or bytes ``"16KB"``); ``scale`` (the paper's ``s``) or
    ``gain`` (of the rank-stable scale; neither: gain 1); ``dropout`` in factor space; ``bits``/``head_bits``: the
    factors/head trained low-bit (``bits="auto"``: a byte budget picks them, else full precision); ``seed`` of the
    factor init; ``targets`` (glob patterns) and ``by`` (the grouping) of the model's slices (None and
    ``"shape"``: the `Tensorizer`'s); ``head`` (module names; None: found) trained unless ``train_head=False``.
    """

    format: str | Format | None = None
    rank: int | None = None
    budget: int | str | None = None
    scale: float | None = None
    gain: float | None = None
    dropout: float = 0.0
    bits: int | None | str = "auto"
    head_bits: int | None = None
    seed: int | None = None
    targets: tuple[str, ...] | None = None
    by: GroupBy = "shape"
    head: tuple[str, ...] | None = None
    train_head: bool = True

    def __post_init__(self) -> None:
        for name in ("targets", "head"):  # (a list or one name: kept as a tuple, so configs compare and print alike)
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "train_head", bool(self.train_head))  # (as decompose read it: any truth value)
        if self.budget is None and self.bits == "auto":  # (with a rank: full precision unless told)
            object.__setattr__(self, "bits", None)
        self._check_size()
        if self.scale is not None and self.gain is not None:
            raise FactnetError("pass scale= (the paper's s) or gain= (of the rank-stable scale), not both")
        if self.scale is None and not _finite(self.gain, none=True):
            raise FactnetError(f"gain must be a finite number, got {self.gain!r}")
        if self.scale is not None and not _finite(self.scale):
            raise FactnetError(f"scale must be a finite number, got {self.scale!r}")
        if self.bits is not None and not isinstance(self.bits, str):
            check_bits(self.bits)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise FactnetError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.head_bits is not None:
            check_bits(self.head_bits)
        self._check_names()

    def _check_size(self) -> None:
        """The format with a rank or a budget (a budget in bytes alone: the format picked), and the bits."""
        if is_auto(self.format):
            if self.budget is None or self.rank is not None:
                raise FactnetError("decompose needs a format (e.g. decompose('tt', rank=8)), or no format and a budget "
                                   "in bytes (decompose(budget='16KB')) to pick the format, rank and bits")
        elif self.budget is not None and self.rank is not None:
            raise FactnetError("pass rank= or budget=, not both")
        if self.budget is None:
            if not is_auto(self.format):
                get_format(self.format, self.rank)  # an unknown format or a bad rank, said now
            if isinstance(self.bits, str) and self.bits != "auto":
                check_bits(self.bits)
            return
        if isinstance(self.format, Format):
            raise FactnetError("a budget takes a format name (it builds the format at each rank)")
        read_budget(self.budget)
        if isinstance(self.bits, str) and self.bits != "auto":
            raise FactnetError(f"bits must be 1, 2, 4, 8, None (full precision) or 'auto', got {self.bits!r}")
        if not is_auto(self.format):
            get_format(self.format, 1)

    def _check_names(self) -> None:
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise FactnetError(f"seed must be an integer or None, got {self.seed!r}")
        if self.targets is not None and not all(isinstance(v, str) for v in self.targets):
            raise FactnetError(f"targets must be names (strings), got {self.targets!r}")  # (head: `decompose` checks it)
        if not (isinstance(self.by, (str, Mapping)) or callable(self.by)):
            raise FactnetError(f"by must be 'shape', 'stage', a regex, a dict of group name -> patterns or a callable "
                               f"slice -> group name, got {self.by!r}")

    def __repr__(self) -> str:
        """The call that builds this config: its fields that differ from their defaults (the format first,
        positional; bits left out where they are what ``bits="auto"`` means: full precision with a rank)."""
        given = [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) != f.default
                 and not (f.name == "bits" and self.bits is None and self.budget is None)]
        return "AdapterConfig(" + ", ".join(repr(value) if name == "format" else f"{name}={_text(value)}"
                                            for name, value in given) + ")"


def spec_fields(config: AdapterConfig, scale: float, rule: str | None) -> dict[str, Any]:
    """The part of an adapter file's spec (`factnet.file.spec`) that says the adapter's resolved ``config`` beyond its
    format, rank, head and bits (written apart), read back by `spec_config`: the scale ``s`` it resolved to,
    dropout (absent: 0), ``"base_rank": 1`` for the rank-stable parametrization with its ``gain`` (absent: the
    default), the ``seed``, the ``targets`` (absent: the default ones) and the grouping ``by`` where the slice
    map's default-targets ``rule`` does not say it (a callable is not written: it reads back as ``"shape"``)."""
    by = config.by if isinstance(config.by, str) else {name: [patterns] if isinstance(patterns, str) else list(
        patterns) for name, patterns in config.by.items()} if isinstance(config.by, Mapping) else None
    return ({"scale": scale} | ({"dropout": config.dropout} if config.dropout else {})
            | ({"base_rank": 1} if config.scale is None else {})
            | ({} if config.gain is None else {"gain": config.gain})
            | ({} if config.seed is None else {"seed": config.seed})
            | ({} if config.targets is None else {"targets": list(config.targets)})
            | ({} if by is None or by == (rule or "shape") else {"by": by}))


def spec_config(spec: Mapping[str, Any]) -> AdapterConfig:
    """The `AdapterConfig` of the adapter a file's ``spec`` holds (`spec_fields`; a field a file lacks: its
    default). The bits are those the factors are stored in (an adapter loaded from a low-bit file trains on
    low-bit); the head's are not kept (a loaded head trains in full precision)."""
    stable = "base_rank" in spec
    return AdapterConfig(spec["format"], spec["rank"], scale=None if stable else spec["scale"], gain=spec.get("gain"),
                         dropout=spec.get("dropout", 0.0), bits=(spec.get("bits") or {}).get("factors"),
                         seed=spec.get("seed"), targets=spec.get("targets"),
                         by=spec.get("by", spec.get("default_groups", {}).get("by", "shape")),
                         head=tuple(spec["head"]) or None, train_head=bool(spec["head"]))


def is_auto(format: str | Format | None) -> bool:
    """Whether ``format`` leaves the format to a byte budget (None or ``"auto"``)."""
    return format is None or (isinstance(format, str) and format == "auto")


def _finite(value: object, none: bool = False) -> bool:
    if value is None:
        return none
    return isinstance(value, (int, float)) and math.isfinite(value)


def _text(value: object) -> str:
    """``value`` as Python source; a callable (a grouping) by its name."""
    return getattr(value, "__qualname__", repr(value)) if callable(value) else repr(value)
