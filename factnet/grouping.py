"""Groups: which slices stack into one ``(n, d_in, d_out)`` tensor."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Union

from factnet.errors import FactnetError
from factnet.slices import Slice, matches

__all__ = ["GroupBy", "make_groups"]

GroupBy = Union[str, Mapping[str, Union[str, Sequence[str]]], Callable[[Slice], str]]


def make_groups(slices: Sequence[Slice], by: GroupBy = "shape") -> dict[str, tuple[Slice, ...]]:
    """Partition ``slices`` (order kept) into named groups of one shape each.

    ``by`` is ``"shape"`` (one group per block shape, named ``"768x768"``), ``"stage"`` (the
    module path up to its first integer index: Swin's ``layers.2``, ConvNeXt's ``stages.1``),
    a regex over ``module[label]`` names (the group is its captured text), a dict of group
    name → glob patterns (as in ``targets``), or a callable ``slice -> group name``.
    """
    namer = _namer(by)
    groups: dict[str, list[Slice]] = {}
    for piece in slices:
        name = namer(piece)
        if not isinstance(name, str) or not name:
            raise FactnetError(f"grouping gave {name!r} for slice {piece.qualified_name}; expected a "
                               "non-empty group name")
        groups.setdefault(name, []).append(piece)
    for name, members in groups.items():
        shapes = {p.shape for p in members}
        if len(shapes) > 1:
            examples = {p.shape: p.qualified_name for p in members}
            listed = "; ".join(f"{m} is {s[0]}x{s[1]}" for s, m in examples.items())
            raise FactnetError(f"group {name!r} mixes slice shapes ({listed}); group by 'shape' or "
                               "split it with a dict of patterns")
    return {name: tuple(members) for name, members in groups.items()}


def _namer(by: GroupBy) -> Callable[[Slice], str]:
    if by == "shape":
        return lambda piece: f"{piece.d_in}x{piece.d_out}"
    if by == "stage":
        return _stage
    if isinstance(by, str):
        return _regex_namer(by)
    if isinstance(by, Mapping):
        return _dict_namer(by)
    if callable(by):
        return by
    raise FactnetError(f"group by {by!r}: expected 'shape', 'stage', a regex, a dict of patterns "
                       "or a callable")


def _stage(piece: Slice) -> str:
    segments = piece.module.split(".")
    for pos, segment in enumerate(segments):
        if segment.isdigit():
            return ".".join(segments[: pos + 1])
    raise FactnetError(f"slice {piece.qualified_name} has no stage index in its module path; group "
                       "by 'shape', a regex or a dict instead")


def _regex_namer(pattern: str) -> Callable[[Slice], str]:
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise FactnetError(f"group by {pattern!r}: not 'shape', 'stage' or a valid regex ({error})") from None

    def name(piece: Slice) -> str:
        found = compiled.match(piece.qualified_name)
        if found is None:
            raise FactnetError(f"group regex {pattern!r} does not match slice {piece.qualified_name}; "
                               "every target slice needs a group")
        return "-".join(g for g in found.groups() if g) or found.group(0)

    return name


def _dict_namer(spec: Mapping[str, str | Sequence[str]]) -> Callable[[Slice], str]:
    patterns = {name: [p] if isinstance(p, str) else list(p) for name, p in spec.items()}

    def name(piece: Slice) -> str:
        hits = [g for g, pats in patterns.items() if any(matches(p, piece) for p in pats)]
        if len(hits) != 1:
            problem = "no group" if not hits else f"several groups {hits}"
            raise FactnetError(f"slice {piece.qualified_name} matches {problem}; each target slice "
                               "must match exactly one group's patterns")
        return hits[0]

    return name
