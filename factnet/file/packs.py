"""The packs of a version-4 file: one flat tensor per dtype, named by it (``float32``, ``bfloat16``, ``uint8``,
``float16``, ...). Every stored value is in one of them, in a fixed order: the factors (the groups in the spec's
order, each group's trained factors in the format's order), then the head's parameters (in the order of the
spec's ``head_shapes``); a tensor held as it is (or cast to a storage dtype) is its values, flat, in the pack of
its dtype; a low-bit one is its codes in ``uint8`` and its float16 scale (and offset above 1 bit) in ``float16``
(`factnet.file.codes`). Each tensor's shape, and so where it sits, follows from the spec and the model's
slices: nothing is restated, and the header stays a few hundred bytes whatever the model."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from factnet.errors import FactnetError
from factnet.file.codes import code_parts, from_codes
from factnet.file.validate import STORAGE_DTYPES, malformed

if TYPE_CHECKING:
    from factnet.file.spec import Spec
    from factnet.formats import Format

__all__ = ["PACK_DTYPES", "factor_shapes", "pack", "pack_layout", "unpack"]

PACK_DTYPES = {**STORAGE_DTYPES, "uint8": torch.uint8}  # a pack's name: the dtype of its values


def factor_shapes(fmt: Format, group_shapes: Mapping[str, tuple[int, int, int]]) -> dict[str, tuple[int, ...]]:
    """``{"factors.<group>.<factor>": shape}`` of the factors a file stores (all but the seeded ones), in the
    order the packs hold them: ``group_shapes``' order (``{group: (n, d_in, d_out)}``), the format's factors."""
    return {f"factors.{group}.{factor}": shape for group, dims in group_shapes.items()
            for factor, shape in fmt.shapes(*dims).items() if factor not in fmt.seeded}


def pack(values: Iterable[Tensor]) -> dict[str, Tensor]:
    """``values`` (in the packs' order) concatenated flat, one tensor per dtype, named by it."""
    packs: dict[str, list[Tensor]] = {}
    for value in values:
        packs.setdefault(str(value.dtype).removeprefix("torch."), []).append(value.reshape(-1))
    return {name: torch.cat(found) for name, found in packs.items()}


def pack_layout(spec: Spec, shapes: Mapping[str, tuple[int, ...]],
                name: str) -> list[tuple[str, str, str, int]]:
    """Where a version-4 file stores the tensors of ``shapes`` (in the packs' order): ``(tensor, part, pack,
    values)``, a part being ``values`` (in the dtype the spec gives) or low-bit ``codes``, ``scale``, ``offset``."""
    bits, held = spec.bits or {}, spec.held
    layout = []
    for key, shape in shapes.items():
        kind, count = key.partition(".")[0], math.prod(shape)
        width = bits.get(kind)
        if width is None:
            dtype = spec.dtype or (held if not isinstance(held, dict) else held.get(
                "factors" if kind == "factors" else key.removeprefix("head.")))
            if dtype is None:
                raise malformed(name, f"it does not say in which dtype {key} is stored")
            layout.append((key, "values", dtype, count))
            continue
        layout += [(key, part, str(dtype).removeprefix("torch."), size)
                   for part, (dtype, size) in code_parts(count, width, bits["group"]).items()]
    return layout


def unpack(spec: Spec, packs: Mapping[str, Tensor], factors: Mapping[str, tuple[int, ...]],
           name: str) -> dict[str, Tensor]:
    """The tensors of a version-4 file (as `factnet.file.info.read` gives older files'): ``factors.<group>.<factor>``
    of the shapes ``factors`` (`factor_shapes` of the format and the slices rebuilt on the model, in order) and
    ``head.<name>`` of the spec's ``head_shapes``, split from ``packs`` after checking that each pack holds exactly
    the values they need (so a tensor of another size is an error, and nothing larger than the file's own values
    is allocated); low-bit tensors are read back as float32 values, the others copied out of their packs."""
    bits = spec.bits or {}
    shapes = dict(factors) | {f"head.{p}": tuple(shape) for p, shape in spec.head_shapes.items()}
    layout = pack_layout(spec, shapes, name)
    needed: dict[str, int] = {}
    for _, _, pack_name, count in layout:
        needed[pack_name] = needed.get(pack_name, 0) + count
    held_values = {pack_name: value.numel() for pack_name, value in packs.items()}
    if needed != held_values:
        wrong = [f"{p}: needs {needed.get(p, 0):,} values, holds {held_values.get(p, 0):,}"
                 for p in dict.fromkeys([*needed, *held_values]) if needed.get(p) != held_values.get(p)]
        raise FactnetError(f"{name} does not hold the tensors its spec and this model need ({spec.format} rank "
                           f"{spec.rank}, {len(factors)} factors" + (f", head {list(spec.head_shapes)}"
                                                                     if spec.head_shapes else "")
                           + f"): {'; '.join(wrong)}; load onto the architecture it was saved from (same head size)")
    found: dict[str, dict[str, Tensor]] = {}
    offsets = dict.fromkeys(packs, 0)
    for key, part, pack_name, count in layout:
        found.setdefault(key, {})[part] = packs[pack_name][offsets[pack_name]:offsets[pack_name] + count]
        offsets[pack_name] += count
    tensors = {}
    for key, parts in found.items():
        width, shape = bits.get(key.partition(".")[0]), shapes[key]
        tensors[key] = parts["values"].reshape(shape).clone() if width is None else from_codes(
            parts, shape, width, bits["group"])
    return tensors
