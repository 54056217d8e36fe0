"""`Tensorizer`: find a model's matrices, slice and group them, then decompose the increment."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields, replace

import torch
from torch import nn

from factnet.adapter import Adapter, group_key
from factnet.adapter import factor_dtype as _factor_dtype
from factnet.adapter_set import AdapterSet
from factnet.attach import base_weight
from factnet.budget import AutoChoice, Choice, choose, choose_format, parse_budget, read_budget
from factnet.config import AdapterConfig, is_auto
from factnet.errors import FactnetError
from factnet.file.writer import file_bytes
from factnet.formats import Format, get_format
from factnet.grouping import GroupBy, make_groups
from factnet.slices import Slice, classifier_names, select_slices

__all__ = ["DEFAULT_GAIN", "Tensorizer", "parse_budget"]

# decompose's default gain g of s = g·ρ: the parametrization fixes how the step scales with the rank, not
# this O(1) constant, whose best value depends on the model (docs/scale/README.md: 3 is best on the demo's
# wide backbone at lr 1e-2, but 2 already collapses EfficientNet-Lite0 there; 1 is safe on both)
DEFAULT_GAIN = 1.0


_HEAD_NAMES = ("head", "heads", "classifier", "fc", "lm_head")


class Tensorizer:
    """The matrices of ``model`` cut into slices and stacked into groups (a dry run until
    `decompose`).

    ``targets`` are full-name glob patterns with optional block selections
    (``"blocks.*.attn.qkv[q,v]"``); by default, the paper's: attention and MLP matrices,
    never the head, patch embedding or Swin's patch-merging reduction.
    """

    def __init__(self, model: nn.Module, targets: Sequence[str] | None = None, *, by: GroupBy = "shape") -> None:
        if not isinstance(model, nn.Module):
            raise FactnetError(f"Tensorizer needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.targets = None if targets is None else tuple(targets)  # the patterns (None: the default targets)
        self.slices: tuple[Slice, ...] = tuple(select_slices(model, targets))
        self._check_weights()
        self.by = by
        self.groups: dict[str, tuple[Slice, ...]] = make_groups(self.slices, by)

    def group(self, by: GroupBy = "shape") -> Tensorizer:
        """The same slices grouped another way: ``"shape"``, ``"stage"``, a regex, a dict of
        name → patterns, or a callable ``slice -> name`` (see `factnet.grouping.make_groups`)."""
        regrouped = object.__new__(Tensorizer)
        regrouped.model, regrouped.targets, regrouped.slices, regrouped.by = self.model, self.targets, self.slices, by
        regrouped.groups = make_groups(self.slices, by)
        return regrouped

    def group_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``{group: (n_slices, d_in, d_out)}``."""
        return {name: (len(m), m[0].d_in, m[0].d_out) for name, m in self.groups.items()}

    def num_parameters(self, format: str | Format, rank: int | None = None) -> int:
        """Factor parameters ``decompose(format, rank)`` would train (dry run, exact: the format's count of
        its capped shapes, `Format.num_parameters`)."""
        fmt = get_format(format, rank)
        return sum(fmt.num_parameters(*shape) for shape in self.group_shapes().values())

    def rank_for_budget(self, format: str, budget: int | str, bits: int | None = None) -> int:
        """The largest rank whose exact factor count (the format's `num_parameters`) fits ``budget``:
        ``10_000``, ``"10k"``, ``"1.5M"`` parameters, or ``"40KB"``, ``"40KiB"`` bytes of the file saved without
        the head, its factors as stored at ``bits`` (None: at their dtype, 4 bytes a float32 factor). Every rank
        up to the groups' largest size is tried, so a format need not count monotonically; of ranks with equal
        counts (modes capped), the smallest. See `factnet.budget`."""
        return self.budget_choice(format, budget, bits).rank

    def budget_choice(self, format: str, budget: int | str, bits: int | None | str = "auto",
                      config: AdapterConfig | None = None) -> Choice:
        """The rank ``decompose(format, budget=budget, bits=bits)`` takes, and with ``bits="auto"`` and a
        budget in bytes the bits too (`factnet.budget.choose`), with its exact parameters, factor bytes and (a
        budget in bytes) the bytes of its file without the head, measured on the file the adapter of ``config``'s
        other settings (default: `decompose`'s) writes."""
        if isinstance(format, Format):
            raise FactnetError("a budget takes a format name (it builds the format at each rank)")
        read, auto = read_budget(budget), _auto_bits(bits)
        return choose(format, list(self.group_shapes().values()), read, None if auto else bits, self._itemsize(),
                      auto and read.in_bytes, self._file_bytes(config or AdapterConfig(format, budget=budget), format))

    def auto_choice(self, budget: int | str, bits: int | None | str = "auto",
                    config: AdapterConfig | None = None) -> AutoChoice:
        """The format, rank and bits ``decompose(budget=budget)`` takes with no format: `factnet.budget.AUTO_RULE`'s
        format for a budget in bytes, its rank and (with ``bits="auto"``) bits by `budget_choice`, and why."""
        read, auto = read_budget(budget), _auto_bits(bits)
        config = config or AdapterConfig(budget=budget)
        return choose_format(list(self.group_shapes().values()), read, self._itemsize(), None if auto else bits, auto,
                             lambda format: self._file_bytes(config, format))

    def _itemsize(self) -> int:
        return torch.empty((), dtype=_factor_dtype(self.model)).element_size()

    def _file_bytes(self, config: AdapterConfig, format: str) -> Callable[[Choice], int]:
        """A `Choice`'s file without the head, in bytes: written in memory from an adapter of ``format`` with
        ``config``'s other settings that is built for it and never attached to the model."""
        def measure(choice: Choice) -> int:
            fmt, resolved, scale = self._resolved(replace(config, head_bits=None), format, choice.rank, choice.bits)
            probe = Adapter(self.model, self.groups, resolved, scale, register=False)
            return file_bytes(probe, include_head=False)
        return measure

    def stable_scale(self, format: str | Format, rank: int | None = None) -> float:
        """The rank-stable scale ``ρ`` (`Format.stable_scale`) of these groups: the geometric mean of
        each group's (equal for every group except in formats whose init depends on the group's size,
        such as Tucker's Xavier-initialized slice factor). ``decompose(gain=g)`` trains ``s = g·ρ``."""
        fmt = get_format(format, rank)
        shapes = list(self.group_shapes().values())
        return math.exp(sum(math.log(fmt.stable_scale(*shape)) for shape in shapes) / len(shapes))

    def capped_ranks(self, format: str | Format, rank: int | None = None) -> dict[str, dict[str, int]]:
        """``{group: {rank letter: size}}`` for the groups too small for ``rank`` in some mode."""
        fmt = get_format(format, rank)
        found = {group: fmt.capped(*shape) for group, shape in self.group_shapes().items()}
        return {group: letters for group, letters in found.items() if letters}

    def rank_report(self, format: str | Format, rank: int | None = None) -> str:
        """One message naming every group too small for ``rank`` and the sizes it gets ("" if none)."""
        fmt = get_format(format, rank)
        capped = self.capped_ranks(fmt)
        if not capped:
            return ""
        shapes = self.group_shapes()
        parts = []
        for group in capped:
            parts.append(f"{group!r} ({'x'.join(map(str, shapes[group]))}): {fmt.capped_text(*shapes[group])} "
                         f"({fmt.num_parameters(*shapes[group]):,} parameters)")
        return (f"{fmt.name} rank {fmt.rank} is more than {len(capped)} of {len(shapes)} group(s) allow, so each gets "
                f"the largest rank it has in those modes ({' · '.join(fmt.factors.values())}): " + "; ".join(parts)
                + f"; {self.num_parameters(fmt):,} parameters in all")

    def decompose(
        self,
        format: str | Format | AdapterConfig | None = None,
        rank: int | None = None,
        *,
        config: AdapterConfig | None = None,
        budget: int | str | None = None,
        scale: float | None = None,
        gain: float | None = None,
        dropout: float = 0.0,
        train_head: bool = True,
        head: Sequence[str] | None = None,
        seed: int | None = None,
        name: str = "default",
        bits: int | None | str = "auto",
        head_bits: int | None = None,
    ) -> Adapter:
        """Freeze the backbone, attach a zero increment ``s·ΔW`` in ``format`` to every group,
        and return the `Adapter` holding its factors.

        The settings come as an `AdapterConfig` (``decompose(config)`` or ``config=``) or as the keywords that
        build one (``decompose("tt", rank=8)``), not both; ``name`` goes with either. A config's ``targets`` and
        ``by`` (when not None and ``"shape"``) select and group this Tensorizer's model as ``Tensorizer(model,
        targets).group(by)`` would, and are an error where this Tensorizer was given other ones; the adapter's
        ``config`` is the one resolved here: the format, rank and bits a budget picked, the targets and grouping
        used, the head trained, seed 0 for seeded factors drawn without a seed (the scale ``s`` a gain gives:
        ``adapter.settings.scale``).

        ``rank`` is at most that in each mode: a group too small for it gets the largest rank it allows,
        said in one warning (`rank_report`). ``budget`` instead of ``rank`` picks the largest rank that
        fits (see `rank_for_budget`); a budget in bytes picks the bits too unless ``bits`` is given (None: full
        precision; see `budget_choice`), and with no ``format`` (or ``"auto"``) the format too (`auto_choice`:
        `factnet.budget.AUTO_RULE`, measured; ``print(adapter)`` says what it picked and why). By default the
        parametrization is rank-stable, so one learning rate serves every rank: ``s = g·ρ`` with ``ρ`` from
        `stable_scale` and gain ``g = gain`` (default `DEFAULT_GAIN`), and each factor used times its
        `Format.multipliers` (docs/scale/README.md); ``scale=`` is the paper's parametrization, its ``s`` itself
        (the presets' values), as saved. ``dropout`` acts in factor space (the paper uses 0.1); ``head`` names
        the task head (found automatically on timm models and for modules named head/classifier/fc); it stays
        trainable unless ``train_head=False``. ``seed`` makes the factor init reproducible. ``name`` registers
        it in ``model.factnet`` (an `AdapterSet`) beside any adapters the model already has; the new one becomes
        the active one. ``bits`` (1, 2, 4, 8) trains the factors as a ``bits``-bit file stores them (quantized
        in the forward, straight-through gradient), so ``adapter.save`` then writes exactly the trained model in
        ``bits`` bits; ``head_bits`` does the same for the head (`factnet.head_bits`).
        """
        keywords = dict(budget=budget, scale=scale, gain=gain, dropout=dropout, bits=bits, head_bits=head_bits,
                        seed=seed, head=head, train_head=train_head)
        if isinstance(format, AdapterConfig) and config is None:
            format, config = None, format
        if config is None:
            config = AdapterConfig(format, rank, **keywords)
        elif format is not None or rank is not None or any(
                keywords[f.name] != f.default for f in fields(AdapterConfig) if f.name in keywords):
            raise FactnetError("pass an AdapterConfig or the settings that build one (decompose('tt', rank=8)), "
                               "not both")
        return self._selected(config)._decompose(config, name)

    def _selected(self, config: AdapterConfig) -> Tensorizer:
        """This Tensorizer, or the one ``config``'s targets and grouping select on its model."""
        if config.targets is not None and self.targets is not None and config.targets != self.targets:
            raise FactnetError(f"the config targets {list(config.targets)} but this Tensorizer {list(self.targets)}: "
                               "give the targets once")
        if not (_is_shape(config.by) or _is_shape(self.by) or config.by == self.by):
            raise FactnetError(f"the config groups by {config.by!r} but this Tensorizer by {self.by!r}: give the "
                               "grouping once")
        by = self.by if _is_shape(config.by) else config.by
        if config.targets is not None and self.targets is None:
            return Tensorizer(self.model, config.targets, by=by)
        return self if by is self.by else self.group(by)

    def _decompose(self, config: AdapterConfig, name: str) -> Adapter:
        """`decompose` of ``config`` on these groups."""
        picked = None
        format, rank, bits = config.format, config.rank, config.bits
        if is_auto(format):
            picked = self.auto_choice(config.budget, bits, config)
            format, rank, bits = picked.format, picked.choice.rank, picked.choice.bits
        elif config.budget is not None:
            rank, bits = (choice := self.budget_choice(format, config.budget, bits, config)).rank, choice.bits
        fmt, resolved, scale = self._resolved(config, format, rank, bits)
        AdapterSet.check_addable(self.model, name)
        capped = self.rank_report(fmt)
        if capped:
            warnings.warn(capped, stacklevel=3)
        keys = [group_key(group) for group in self.groups]
        if len(set(keys)) != len(keys):
            raise FactnetError(f"group names {list(self.groups)} collide once dots become underscores; rename them")
        if config.head_bits is not None and not resolved.head:
            raise FactnetError("head_bits trains the head low-bit, but there is no trainable head here ("
                               + ("train_head=False" if not config.train_head else "none found: name it with head=")
                               + "); drop head_bits, or train a head")
        if config.dropout > 0 and any(s.matrix.rules.applied_as_weight for s in self.slices):
            warnings.warn("factor-space dropout does not reach nn.MultiheadAttention matrices: their increment is "
                          "applied as a merged weight", stacklevel=3)
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        adapter = Adapter(self.model, self.groups, resolved, scale, name, generator)
        adapter.picked = picked
        return adapter

    def _resolved(self, config: AdapterConfig, format: str | Format, rank: int | None,
                  bits: int | None | str) -> tuple[Format, AdapterConfig, float]:
        """``format`` at ``rank``, ``config`` as the adapter records it (the format, rank and bits chosen, the
        targets and grouping used, the head trained, seed 0 for seeded factors drawn without a seed) and the
        scale ``s`` it trains with."""
        fmt = get_format(format, rank)
        scale = config.scale
        if scale is None:
            scale = (DEFAULT_GAIN if config.gain is None else config.gain) * self.stable_scale(fmt)
        heads = self._heads(config.head) if config.train_head else []
        resolved = replace(config, format=fmt if isinstance(format, Format) else fmt.name, rank=fmt.rank, budget=None,
                           bits=bits, seed=0 if fmt.seeded and config.seed is None else config.seed,
                           targets=self.targets, by=self._recorded_grouping(), head=tuple(heads) or None,
                           train_head=bool(heads))
        return fmt, resolved, scale

    def _recorded_grouping(self) -> GroupBy:
        """The grouping as the adapter's config records it: a callable as the groups it gave (``{group: [slice,
        ...]}``, exact names), so the config pickles and reads the same from a file."""
        if not callable(self.by):
            return self.by
        return {name: [piece.qualified_name for piece in members] for name, members in self.groups.items()}

    def _heads(self, head: Sequence[str] | None) -> list[str]:
        modules = dict(self.model.named_modules())
        if head is not None:
            names = [head] if isinstance(head, str) else list(head)
            unknown = [n for n in names if n not in modules or not n]
            if unknown:
                raise FactnetError(f"head {unknown} is not a submodule of the model")
            return names
        classifiers = classifier_names(self.model)
        if classifiers:
            return classifiers
        return [n for n in _HEAD_NAMES if n in modules and any(True for _ in modules[n].parameters())][:1]

    def _check_weights(self) -> None:
        for matrix in {s.matrix for s in self.slices}:
            weight = base_weight(self.model, matrix)
            if not weight.is_floating_point():
                raise FactnetError(f"{matrix.name} has {weight.dtype} weights; factnet adapts floating-point "
                                   "weights only (dequantize the model first)")

    def __repr__(self) -> str:
        group_of = {s: name for name, members in self.groups.items() for s in members}
        rows = [("module", "kind", "matrix", "slices", "group")]
        by_matrix: dict[str, list[Slice]] = {}
        for piece in self.slices:
            by_matrix.setdefault(piece.module, []).append(piece)
        for module, pieces in by_matrix.items():
            matrix = pieces[0].matrix
            labels = _labels(pieces) if matrix.cut[0] > 1 else "whole"
            groups = ",".join(dict.fromkeys(group_of[p] for p in pieces))
            rows.append((module, matrix.kind, f"{matrix.d_out}x{matrix.d_in}", labels, groups))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        summary = ", ".join(f"{g} {n}x{i}x{o}" for g, (n, i, o) in self.group_shapes().items())
        return "\n".join([f"Tensorizer({type(self.model).__name__}: {len(self.slices)} slices; groups: {summary})",
                          *lines])


def _is_shape(by: GroupBy) -> bool:
    return isinstance(by, str) and by == "shape"


def _labels(pieces: list[Slice]) -> str:
    """``q,k,v``; a long run of block indices as ``0..255 (256 blocks)``."""
    labels = [p.label for p in pieces]
    if len(labels) > 8 and labels == [str(p.index) for p in pieces]:
        return f"{labels[0]}..{labels[-1]} ({len(labels)} blocks)"
    return ",".join(labels)


def _auto_bits(bits: int | None | str) -> bool:
    """Whether ``bits`` is ``"auto"`` (a byte budget picks them); another string is an error."""
    auto = isinstance(bits, str) and bits == "auto"
    if isinstance(bits, str) and not auto:
        raise FactnetError(f"bits must be 1, 2, 4, 8, None (full precision) or 'auto', got {bits!r}")
    return auto
