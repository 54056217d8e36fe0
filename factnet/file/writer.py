"""Writing an adapter file (`write`, what `factnet.save` and `Adapter.save` run): the adapter's factors and
head packed one tensor per dtype (`factnet.file.packs`), low-bit where asked (`factnet.file.codes`), and its
spec (`factnet.file.spec`), written atomically (`factnet.file.container`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from factnet.errors import FactnetError
from factnet.file.codes import from_codes, to_codes
from factnet.file.container import file_path, file_size, write_tensors
from factnet.file.packs import factor_shapes, pack
from factnet.file.spec import build_spec
from factnet.file.validate import STORAGE_DTYPES
from factnet.quant import check_bits

if TYPE_CHECKING:
    from factnet.adapter import Adapter

__all__ = ["Saved", "file_bytes", "write"]


@dataclass(frozen=True)
class Saved:
    """What `factnet.file.save.save` wrote: the file, its size (and the head's share of it), and for each tensor
    stored low-bit the error of the stored values against those the forward uses, ``‖x̂ − x‖ / ‖x‖`` (0 for
    factors or a head trained low-bit: they are stored as trained)."""

    path: str
    bytes: int
    errors: dict[str, float]
    head_bytes: int = 0  # of ``bytes``, the head's tensors as stored (the file without it: ``bytes - head_bytes``)


def write(adapter: Adapter, path: str | os.PathLike[str], include_head: bool = True, dtype: torch.dtype | None = None,
          bits: int | None = None, head_bits: int | None = None, group: int = 64) -> Saved:
    """`factnet.file.save.save` once ``adapter`` is known to be an `Adapter` (the behaviour is documented there)."""
    target = os.path.realpath(file_path(path))
    if os.path.isdir(target):
        raise FactnetError(f"{target} is a directory; give a file path such as {target}/adapter.safetensors")
    if not os.path.isdir(os.path.dirname(target)):
        raise FactnetError(f"directory {os.path.dirname(target)} does not exist; create it before saving")
    contents = _contents(adapter, include_head, dtype, bits, head_bits, group, sizes_only=False)
    if contents.sharded and torch.distributed.get_rank() != 0:  # FSDP2: every rank gathers, rank 0 writes
        torch.distributed.barrier()
        return Saved(target, 0, contents.errors, contents.head_bytes)
    write_tensors(target, contents.packs, contents.spec_text)
    if contents.sharded:
        torch.distributed.barrier()  # the file exists for every rank once save returns
    return Saved(target, os.path.getsize(target), contents.errors, contents.head_bytes)


def file_bytes(adapter: Adapter, include_head: bool = True, dtype: torch.dtype | None = None,
               bits: int | None = None, head_bits: int | None = None, group: int = 64) -> int:
    """The size of the file `write` writes with these arguments, serialized in memory (nothing is written); the
    size does not depend on the values, so an adapter of a weightless (meta-device) model has one too."""
    contents = _contents(adapter, include_head, dtype, bits, head_bits, group, sizes_only=True)
    return file_size(contents.packs, contents.spec_text)


@dataclass(frozen=True)
class _Contents:
    """What a file holds: its packs and spec, and what `Saved` reports of them."""

    packs: dict[str, Tensor]
    spec_text: str
    errors: dict[str, float]
    head_bytes: int
    sharded: bool


def _contents(adapter: Adapter, include_head: bool, dtype: torch.dtype | None, bits: int | None,
              head_bits: int | None, group: int, sizes_only: bool) -> _Contents:
    """The packs and spec of ``adapter``'s file (`write`'s arguments), checked; ``sizes_only``: values on the
    meta device as zeros and no errors of the stored values (the file's size, not its values)."""
    if dtype is not None and dtype not in STORAGE_DTYPES.values():
        raise FactnetError(f"dtype must be None (as the adapter holds them) or one of "
                           f"{', '.join(f'torch.{d}' for d in STORAGE_DTYPES)}, got {dtype!r}")
    if bits is None and adapter.settings.bits is not None:  # trained low-bit: the file is the trained model
        bits, group = adapter.settings.bits, adapter.settings.group
    if head_bits is None and adapter.settings.head_bits is not None and include_head:
        head_bits, group = adapter.settings.head_bits, adapter.settings.group
    for value in (bits, head_bits):
        if value is not None:
            check_bits(value, group)
    model = getattr(adapter, "model", None)
    if model is None:
        raise FactnetError("adapter was detached, so the model it fits is no longer known; save before detach()")
    with torch.no_grad():  # the parameters times their multipliers, before low-bit rounding
        tensors = {f"factors.{name}.{factor}": value for name in adapter.group_names
                   for factor, value in adapter.group(name).trained_values(quantized=False).items()}
    shapes = factor_shapes(adapter.format, adapter.group_shapes())  # (the packs' order)
    if tensors.keys() != shapes.keys() or any(tuple(tensors[k].shape) != shape for k, shape in shapes.items()):
        raise FactnetError(f"format {adapter.format.name!r} gives factors {shapes}, but the adapter holds "
                           f"{ {k: tuple(v.shape) for k, v in tensors.items()} }; its values cannot be saved")
    tensors = {key: tensors[key] for key in shapes}
    head = adapter.head_state() if include_head else {}  # an inactive adapter keeps its head values apart
    tensors.update({f"head.{name}": value for name, value in head.items()})
    sharded = any(_is_sharded(t) for t in tensors.values())
    if not sizes_only and any(value.is_meta for value in tensors.values()):
        raise FactnetError("the adapter's values are on the meta device (a model without weights): nothing to save")
    tensors = {key: _held(_full(value)) for key, value in tensors.items()}
    head_bits = head_bits if head else None
    low = {key: bits if key.startswith("factors.") else head_bits for key in tensors}
    low = {key: b for key, b in low.items() if b is not None}
    measured = bool(low) and not sizes_only  # (a size alone needs no error of the stored values)
    used_values = {f"factors.{name}.{factor}": value for name in adapter.group_names
                   for factor, value in adapter.group(name).values().items()} if measured else {}
    used_values |= {f"head.{name}": value for name, value in adapter.head_values().items()} if head_bits else {}
    parts, errors = [], {}  # (tensor, part, values as stored), in the packs' order
    for key, value in tensors.items():
        if key not in low:
            parts.append((key, "values", value.to(dtype or value.dtype).contiguous()))
            continue
        codes = to_codes(value, low[key], group)
        parts += [(key, part, stored) for part, stored in codes.items()]
        if not measured:
            continue
        used = _held(used_values.get(key, value)).double()  # what the adapter's forward uses
        norm = used.norm().item()
        errors[key] = (from_codes(codes, tuple(value.shape), low[key], group).double() - used).norm().item() / norm if norm else 0.0
    head_bytes = sum(t.numel() * t.element_size() for key, _, t in parts if key.startswith("head."))
    held = None
    if dtype is None:  # as held: in which dtype(s)
        floats = {key: str(tensors[key].dtype).removeprefix("torch.") for key, part, _ in parts if part == "values"}
        kinds = {"factors" if key.startswith("factors.") else key.removeprefix("head."): name
                 for key, name in floats.items()}
        if len({name for key, name in floats.items() if key.startswith("factors.")}) > 1:
            raise FactnetError(f"the adapter's factors have several dtypes ({floats}); save with dtype=...")
        held = next(iter(kinds.values())) if len(set(kinds.values())) == 1 else kinds or None
    bit_widths = None if not low else {"factors": bits, "head": head_bits, "group": group}
    spec = build_spec(adapter, dtype, held, {name: tuple(tensors[f"head.{name}"].shape) for name in head},
                      bit_widths)
    return _Contents(pack(value for _, _, value in parts), json.dumps(spec, separators=(",", ":"), allow_nan=False),
                     errors, head_bytes, sharded)


def _held(tensor: Tensor) -> Tensor:
    """``tensor`` on the CPU, detached; zeros of its shape where it is on the meta device (it has no values)."""
    return torch.zeros(tensor.shape, dtype=tensor.dtype) if tensor.is_meta else tensor.detach().cpu()


def _is_sharded(tensor: Tensor) -> bool:
    """A DTensor (FSDP2's ``fully_shard`` makes the parameters ones)."""
    return callable(getattr(tensor, "full_tensor", None))


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else the tensor."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor
