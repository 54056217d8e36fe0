"""The slices of an adapter file rebuilt on a model, as a `Tensorizer`, from the spec's slice map: version 1's
listing (`rebuild_listed`), the name templates of versions 2 to 4 (`rebuild_templates`), or version 4's default
targets grouped by a rule (`rebuild_default`); each checked against what the file says."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from factnet.errors import FactnetError
from factnet.file.compat import cut_blocks, listing
from factnet.file.spec import Spec
from factnet.file.validate import SHOWN, malformed
from factnet.file.templates import groups_digest, parse_template, slice_listing
from factnet.tensorizer import Tensorizer

__all__ = ["rebuild_default", "rebuild_listed", "rebuild_templates"]


def rebuild_listed(model: nn.Module, spec: Spec, path: str, matrices: dict[str, Any]) -> Tensorizer:
    """Version 1: the slices of every group on ``model``, checked against the saved slice map."""
    group_of = {(s["module"], s["block"]): group for group, entry in spec.listed.items() for s in entry["slices"]}
    tensorizer = _tensorizer(model, group_of, path)
    rebuilt = slice_listing(tensorizer.groups)
    if rebuilt != spec.listed:
        wrong = [g for g in spec.listed if rebuilt.get(g) != spec.listed[g]]
        raise FactnetError(f"{path}: the slice map of groups {wrong[:SHOWN]} does not match this model's matrices "
                           "(block offsets or shapes differ); the file was not written by adapter.save()")
    return tensorizer


def rebuild_templates(model: nn.Module, spec: Spec, path: str, matrices: dict[str, Any]) -> Tensorizer:
    """Version 2: the slice templates of every group expanded and rebuilt on ``model`` (in the model's
    order, as `Tensorizer` makes them), checked against each group's shape and cut."""
    available = sum(cut_blocks(m) for m in matrices.values())
    wanted = sum(group["shape"][0] for group in spec.groups.values())
    if wanted > available:
        raise FactnetError(f"{path}: its slice map has {wanted} slices, but this model's matrices have "
                           f"{available}; the file was not written by adapter.save() for this model")
    group_of: dict[tuple[str, int], str] = {}
    whole: set[str] = set()
    for group, entry in spec.groups.items():
        for text in entry["slices"]:
            template = parse_template(text)
            for module, block in template.expand():  # type: ignore[union-attr]
                if (module, block) in group_of:
                    raise malformed(path, f"slice {module}[{block}] is in its slice map twice")
                group_of[(module, block)] = group
                if template.blocks is None:  # type: ignore[union-attr]
                    whole.add(module)
    tensorizer = _tensorizer(model, group_of, path)
    for group, entry in spec.groups.items():
        members = tensorizer.groups.get(group, ())
        shape = [len(members), members[0].d_in, members[0].d_out] if members else [0]
        wrong = [f"{p.module} is " + ("whole here, cut into blocks in the file" if p.side == "none" else
                                      "cut into blocks here, whole in the file")
                 for p in members if (p.side == "none") != (p.module in whole)]
        if shape != entry["shape"] or wrong:
            problem = listing(wrong) if wrong else f"shape {shape}, not {entry['shape']}"
            raise FactnetError(f"{path}: the slice map of group {group!r} does not match this model's matrices "
                               f"({problem}); the file was not written by adapter.save() for this model")
    return tensorizer


def rebuild_default(model: nn.Module, spec: Spec, path: str, matrices: dict[str, Any]) -> Tensorizer:
    """Version 4, ``default_groups``: the model's default targets grouped by the spec's rule, checked against
    the digest of the slice map they were saved with."""
    rule = spec.default_groups
    try:
        tensorizer = Tensorizer(model).group(rule["by"])
    except FactnetError as error:
        raise FactnetError(f"{path}: its slices, this model's default targets grouped by {rule['by']}, cannot be "
                           f"rebuilt on it ({error})") from None
    digest = groups_digest(tensorizer.groups)
    if digest != rule["sha256"]:
        raise FactnetError(f"{path}: its slices are the default targets grouped by {rule['by']} of the model it was "
                           f"saved from (slice map {rule['sha256']}), but on this model they give another slice map "
                           f"({digest}: {', '.join(f'{g} {s}' for g, s in tensorizer.group_shapes().items())}); load "
                           f"it onto the architecture it was saved from, with the factnet that saved it "
                           f"({spec.factnet_version}) or one whose default targets are the same")
    return tensorizer


def _tensorizer(model: nn.Module, group_of: Mapping[tuple[str, int], str], path: str) -> Tensorizer:
    """The `Tensorizer` of exactly the slices ``(module, block)`` of ``group_of``, grouped by it."""
    blocks: dict[str, list[str]] = {}
    for module, block in group_of:
        blocks.setdefault(module, []).append(str(block))
    try:
        tensorizer = Tensorizer(model, [f"{module}[{','.join(b)}]" for module, b in blocks.items()])
        return tensorizer.group(lambda piece: group_of.get((piece.module, piece.index), ""))
    except FactnetError as error:
        raise FactnetError(f"{path}: its slice map does not match this model ({error})") from None
