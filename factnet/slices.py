"""Slices: the weight matrices of a model, cut into same-shaped blocks.

A `Matrix` is one weight in linear convention (``y = x Wᵀ``, ``W: (d_out, d_in)``) of one of the
kinds in `factnet.matrix_kinds` (an ``nn.Linear``, a 1x1 ``nn.Conv2d``, a transposed ``Conv1D``, the
in/out projections of ``nn.MultiheadAttention``, ...). A matrix whose longer side is a multiple of its
shorter side is cut into square blocks; a `Slice` is one block.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from factnet.errors import FactnetError
from factnet.matrix_kinds import KINDS, MatrixKind

__all__ = ["Matrix", "Slice", "StandIn", "find_matrices", "matches", "select_slices"]

Side = Literal["out", "in", "none"]

# Name segments that mark a module as outside the paper's targets: the task head, patch
# embedding, stems, Swin's patch-merging reduction, and the nets that generate position biases or
# encodings (SwinV2's ``cpb_mlp``, Hugging Face's ``continuous_position_bias_mlp``, XCiT's
# ``pos_embed.token_projection``, relative-position nets).
DEFAULT_EXCLUDED_SEGMENTS = (
    "head", "head_*", "heads", "lm_head", "classifier", "patch_embed", "conv_proj", "stem",
    "downsample", "reduction", "pre_logits", "attn_pool",
    "cpb*", "*position*", "rel_pos*", "*pos_bias*", "rpe*", "pos_embed*", "*pos_enc*",
)
# A default target is not tiny: its shorter side is at least this fraction of the widest matrix's
# shorter side (SwinV2 tiny's 512x2 and 3x512 bias MLPs against its 768-wide blocks).
TINY_FRACTION = 1 / 16
_FUSED_LABELS = {3: ("q", "k", "v"), 2: ("k", "v")}
_FUSED_NAMES = re.compile(r"(^|.*\.)(qkv|kv|c_attn)$")


@dataclass(frozen=True)
class Matrix:
    """One weight matrix of the model: the path of the module holding it, its kind's name (a key of
    `factnet.matrix_kinds.KINDS`) and its linear-convention shape."""

    name: str
    kind: str
    d_out: int
    d_in: int

    @property
    def rules(self) -> MatrixKind:
        """The rules of its kind."""
        return KINDS[self.kind]

    @property
    def cut(self) -> tuple[int, Side]:
        """``(blocks, side)``: square blocks along the output or input side, or whole."""
        if self.d_out != self.d_in and self.d_out % self.d_in == 0:
            return self.d_out // self.d_in, "out"
        if self.d_out != self.d_in and self.d_in % self.d_out == 0:
            return self.d_in // self.d_out, "in"
        return 1, "none"

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of the blocks: ``q, k, v`` for fused attention projections, else indices."""
        blocks, side = self.cut
        fused = self.rules.fused or _FUSED_NAMES.match(self.name)
        if side == "out" and blocks in _FUSED_LABELS and fused:
            return _FUSED_LABELS[blocks]
        return tuple(str(b) for b in range(blocks))

    def slices(self) -> tuple[Slice, ...]:
        blocks, side = self.cut
        d_in = self.d_in // blocks if side == "in" else self.d_in
        d_out = self.d_out // blocks if side == "out" else self.d_out
        return tuple(Slice(self, b, label, d_in, d_out) for b, label in enumerate(self.labels))


@dataclass(frozen=True)
class Slice:
    """Block ``index`` of a matrix: ``d_in × d_out`` (as applied, ``x @ block``)."""

    matrix: Matrix
    index: int
    label: str
    d_in: int
    d_out: int

    @property
    def module(self) -> str:
        return self.matrix.name

    @property
    def side(self) -> Side:
        return self.matrix.cut[1]

    @property
    def qualified_name(self) -> str:
        """``module[label]``, e.g. ``blocks.0.attn.qkv[q]``; whole matrices have no label."""
        return self.module if self.side == "none" else f"{self.module}[{self.label}]"

    @property
    def shape(self) -> tuple[int, int]:
        return self.d_in, self.d_out


class StandIn(nn.Module):
    """Base of a module standing in for an adapted matrix (`factnet.attach.AdaptedMatrix`): `find_matrices`
    finds it as the `Matrix` it holds (a model may carry adapters already)."""

    matrix: Matrix


def find_matrices(model: nn.Module) -> list[Matrix]:
    """Every weight matrix of ``model`` factnet can adapt, in module order: per module, the first
    registered kind that matches it (`factnet.matrix_kinds`)."""
    found: list[Matrix] = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, StandIn):
            found.append(module.matrix)
            continue
        parent = modules[name.rpartition(".")[0]] if name else None
        for kind in KINDS.values():
            shape = kind.match(module, parent)
            if shape is not None:
                found.append(Matrix(name, kind.name, *shape))
                break
    return found


def default_slices(model: nn.Module, matrices: Iterable[Matrix]) -> list[Slice]:
    """The paper's targets: the attention and MLP matrices of the blocks. Excluded: the head, and any
    matrix with a name segment in `DEFAULT_EXCLUDED_SEGMENTS` (embeddings, stems, reductions,
    position-bias MLPs), and tiny ones (shorter side below `TINY_FRACTION` of the widest's)."""
    classifiers = classifier_names(model)
    candidates = [m for m in matrices if m.name not in classifiers and not any(
        fnmatch.fnmatchcase(s, p) for s in m.name.split(".") for p in DEFAULT_EXCLUDED_SEGMENTS)]
    widest = max((min(m.d_out, m.d_in) for m in candidates), default=0)
    return [s for m in candidates if min(m.d_out, m.d_in) >= TINY_FRACTION * widest for s in m.slices()]


def classifier_names(model: nn.Module) -> list[str]:
    """The module names of the model's classifier(s) by timm's ``get_classifier()`` (DeiT-distilled
    has two: ``head`` and ``head_dist``); ``[]`` when the model does not say."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return []
    try:
        heads = get_classifier()
    except (AttributeError, NotImplementedError, TypeError):
        return []
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return [name for name, module in model.named_modules() if name and any(module is h for h in heads)]


_PATTERN = re.compile(r"^(?P<glob>[^\[\]]+)(\[(?P<select>[^\[\]]*)\])?$")


def select_slices(model: nn.Module, targets: Sequence[str] | None) -> list[Slice]:
    """Slices chosen by full-name glob patterns with optional block selections.

    ``"blocks.*.attn.qkv[q,v]"`` picks the q and v blocks of every fused qkv; ``"*.fc1[0]"``
    the first output block of each fc1. ``None`` picks the paper's default targets.
    """
    matrices = find_matrices(model)
    if not matrices:
        raise FactnetError(f"{type(model).__name__} has no Linear, 1x1 Conv2d, Conv1D or "
                           "MultiheadAttention weights to adapt")
    if targets is None:
        chosen = default_slices(model, matrices)
        if not chosen:
            raise FactnetError("no default targets found (all matrices look like heads, stems or "
                               "embeddings); name them with targets=[...]")
        return chosen
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise FactnetError("targets is empty, so nothing would be adapted; pass patterns such as "
                           "['blocks.*.attn.qkv[q,v]'], or targets=None for the default targets")
    owner: dict[Slice, str] = {}
    for pattern in targets:
        for piece in _match(pattern, matrices):
            if piece in owner:
                raise FactnetError(f"slice {piece.qualified_name} is selected by both {owner[piece]!r} "
                                   f"and {pattern!r}; make the patterns disjoint")
            owner[piece] = pattern
    order = {piece: pos for pos, piece in enumerate(s for m in matrices for s in m.slices())}
    return sorted(owner, key=order.__getitem__)


def _parse(pattern: str) -> tuple[str, list[str] | None]:
    """``"glob[a,b]"`` → ``("glob", ["a", "b"])``; no brackets → ``(glob, None)``."""
    parsed = _PATTERN.match(pattern.strip()) if isinstance(pattern, str) else None
    if parsed is None:
        raise FactnetError(f"bad target pattern {pattern!r}; expected a glob over module names with "
                           "an optional selection, e.g. 'blocks.*.attn.qkv[q,v]'")
    if parsed["select"] is None:
        return parsed["glob"], None
    wanted = [w.strip() for w in parsed["select"].split(",") if w.strip()]
    if not wanted:
        raise FactnetError(f"pattern {pattern!r} has an empty selection; name blocks, e.g. [q,v] or [0,2]")
    return parsed["glob"], wanted


def matches(pattern: str, piece: Slice) -> bool:
    """Whether ``piece`` is one of the slices ``pattern`` names."""
    glob, wanted = _parse(pattern)
    if not fnmatch.fnmatchcase(piece.module, glob):
        return False
    return wanted is None or piece.label in wanted or str(piece.index) in wanted


def _match(pattern: str, matrices: list[Matrix]) -> list[Slice]:
    glob, wanted = _parse(pattern)
    hits = [m for m in matrices if fnmatch.fnmatchcase(m.name, glob)]
    if not hits:
        names = ", ".join(m.name for m in matrices[:6])
        raise FactnetError(f"target {pattern!r} matches no weight matrix; matrices look like: {names}, ...")
    if wanted is None:
        return [s for m in hits for s in m.slices()]
    chosen = []
    for matrix in hits:
        by_name = {s.label: s for s in matrix.slices()} | {str(s.index): s for s in matrix.slices()}
        missing = [w for w in wanted if w not in by_name]
        if missing:
            raise FactnetError(f"target {pattern!r}: {matrix.name} has blocks {list(matrix.labels)}, "
                               f"not {missing}")
        chosen.extend(dict.fromkeys(by_name[w] for w in wanted))
    return chosen
