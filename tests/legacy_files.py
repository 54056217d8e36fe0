"""factnet's writer of format versions 2 and 3 (one safetensors tensor per factor and head parameter; low-bit:
codes, scale and offset per tensor), as it was at commit a364838, kept so that the tests can write files of
those versions for any adapter (crafted specs, damaged files). `tests/test_file_load.py` checks that it
writes what that factnet wrote (the files of tests/v23_fixture.py).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

import factnet
import factnet.file.container
import factnet.file.spec
import factnet.file.templates
from factnet.quant import quantize


def legacy_spec(adapter: factnet.Adapter, dtype: torch.dtype | None, bits: dict | None) -> dict:
    """The spec of version 2, or 3 with ``bits``."""
    fmt, settings = adapter.format, adapter.settings
    groups = {name: adapter.group(name).slices for name in adapter.group_names}
    matrices = factnet.file.spec.base_matrices(adapter.model, adapter.head)
    return {
        "factnet_format_version": 2 if bits is None else 3, "factnet_version": factnet.__version__,
        "format": fmt.name, "rank": fmt.rank, "factors": dict(fmt.factors),
        "scale": settings.scale, "dropout": settings.dropout,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "head": list(adapter.head),
        "base": {"sha256": factnet.file.spec.fingerprint(matrices), "matrices": len(matrices)},
        "groups": {name: {"shape": [len(members), members[0].d_in, members[0].d_out],
                          "slices": factnet.file.templates.slice_templates(members)} for name, members in groups.items()},
    } | ({} if bits is None else {"bits": bits}) | ({"base_rank": 1} if settings.stable else {}) \
        | ({"seed": adapter.seed} if fmt.seeded else {})


def legacy_tensors(adapter: factnet.Adapter, include_head: bool = True, dtype: torch.dtype | None = None,
                   bits: int | None = None, head_bits: int | None = None,
                   group: int = 64) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(spec, tensors)`` of the file version 2/3 ``save`` wrote (the same arguments)."""
    if bits is None and adapter.settings.bits is not None:
        bits, group = adapter.settings.bits, adapter.settings.group
    if head_bits is None and adapter.settings.head_bits is not None and include_head:
        head_bits, group = adapter.settings.head_bits, adapter.settings.group
    with torch.no_grad():
        tensors = {f"factors.{name}.{factor}": value for name in adapter.group_names
                   for factor, value in adapter.group(name).trained_values(quantized=False).items()}
    head = adapter.head_state() if include_head else {}
    tensors.update({f"head.{name}": value for name, value in head.items()})
    tensors = {key: value.detach().cpu() for key, value in tensors.items()}
    low = {key: bits if key.startswith("factors.") else head_bits for key in tensors}
    low = {key: b for key, b in low.items() if b is not None}
    stored = {}
    for key, value in tensors.items():
        if key not in low:
            stored[key] = value.to(dtype or value.dtype).contiguous()
            continue
        q = quantize(value, low[key], group)
        stored |= {f"{key}.codes": q.codes, f"{key}.scale": q.scale}
        stored |= {} if q.offset is None else {f"{key}.offset": q.offset}
    layout = None if not low else {"factors": bits, "head": head_bits, "group": group,
                                   "shapes": {key: list(tensors[key].shape) for key in low}}
    return legacy_spec(adapter, dtype, layout), stored


def write_legacy(path: str | os.PathLike, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
    """An adapter file of ``spec`` and ``tensors`` with a matching checksum (crafted or legacy)."""
    text = json.dumps(spec, separators=(",", ":"), allow_nan=False)
    save_file(tensors, str(path), metadata={"factnet": text, "factnet.sha256": factnet.file.container.checksum(text, tensors)})


def save_legacy(adapter: factnet.Adapter, path: str | os.PathLike, **save) -> None:
    """``adapter`` saved as factnet's version-2/3 writer saved it (``save``: `factnet.save`'s arguments)."""
    write_legacy(path, *legacy_tensors(adapter, **save))
