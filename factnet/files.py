"""Adapter files: writing one (`write`, atomically) and reading one back verified (`read`), no model involved.

Save an adapter to one safetensors file and rebuild it on a fresh copy of the base model.

The file holds the tensors ``factors.<group>.<factor>`` and, unless ``include_head=False``,
``head.<parameter name>`` (as they are, or cast to the ``dtype`` given to `save`), and two metadata
entries: ``"factnet"``, the spec as JSON, and ``"factnet.sha256"``, a SHA-256 of that JSON and every
tensor. `load` trusts nothing before the checksum matches, so a truncated, corrupt or foreign file
is a `FactnetError`, and it never unpickles (safetensors is raw tensor bytes plus a JSON header).
Writes go to a temporary file next to the target, are fsynced and renamed over it: a crash
mid-write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from factnet.errors import FactnetError
from factnet.quant import Quantized, check_bits, dequantize, quantize
from factnet.spec import CHECKSUM_KEY, SPEC_KEY, STORAGE_DTYPES, _checksum, _malformed, _parse_spec, _spec

if TYPE_CHECKING:
    from factnet.adapter import Adapter

__all__ = ["Saved", "load_spec", "read", "write", "write_atomically"]


@dataclass(frozen=True)
class Saved:
    """What `factnet.io.save` wrote: the file, its size (and the head's share of it), and for each tensor
    stored low-bit the error of the stored values against those the forward uses, ``‖x̂ − x‖ / ‖x‖`` (0 for
    factors or a head trained low-bit: they are stored as trained)."""

    path: str
    bytes: int
    errors: dict[str, float]
    head_bytes: int = 0  # of ``bytes``, the head's tensors as stored (the file without it: ``bytes - head_bytes``)


def write(adapter: Adapter, path: str | os.PathLike[str], include_head: bool = True, dtype: torch.dtype | None = None,
          bits: int | None = None, head_bits: int | None = None, group: int = 64) -> Saved:
    """`factnet.io.save` once ``adapter`` is known to be an `Adapter` (the behaviour is documented there)."""
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
    target = os.path.realpath(_fspath(path))
    if os.path.isdir(target):
        raise FactnetError(f"{target} is a directory; give a file path such as {target}/adapter.safetensors")
    if not os.path.isdir(os.path.dirname(target)):
        raise FactnetError(f"directory {os.path.dirname(target)} does not exist; create it before saving")
    model = getattr(adapter, "model", None)
    if model is None:
        raise FactnetError("adapter was detached, so the model it fits is no longer known; save before detach()")
    with torch.no_grad():  # the parameters times their multipliers, before low-bit rounding
        tensors = {f"factors.{name}.{factor}": value for name in adapter.group_names
                   for factor, value in adapter.group(name).trained_values(quantized=False).items()}
    head = adapter.head_state() if include_head else {}  # an inactive adapter keeps its head values apart
    tensors.update({f"head.{name}": value for name, value in head.items()})
    sharded = any(_is_sharded(t) for t in tensors.values())
    tensors = {key: _full(value).detach().cpu() for key, value in tensors.items()}
    low = {key: bits if key.startswith("factors.") else head_bits for key in tensors}
    low = {key: b for key, b in low.items() if b is not None}
    used_values = {f"factors.{name}.{factor}": value for name in adapter.group_names
                   for factor, value in adapter.group(name).values().items()} if low else {}
    used_values |= {f"head.{name}": value for name, value in adapter.head_values().items()} if head_bits else {}
    stored, errors = {}, {}
    for key, value in tensors.items():
        if key not in low:
            stored[key] = value.to(dtype or value.dtype).contiguous()
            continue
        q = quantize(value, low[key], group)
        stored |= {f"{key}.codes": q.codes, f"{key}.scale": q.scale}
        stored |= {} if q.offset is None else {f"{key}.offset": q.offset}
        used = used_values.get(key, value).detach().cpu().double()  # what the adapter's forward uses
        norm = used.norm().item()
        errors[key] = (dequantize(q).double() - used).norm().item() / norm if norm else 0.0
    head_bytes = sum(t.numel() * t.element_size() for key, t in stored.items() if key.startswith("head."))
    if sharded and torch.distributed.get_rank() != 0:  # FSDP2: every rank gathers, rank 0 writes
        torch.distributed.barrier()
        return Saved(target, 0, errors, head_bytes)
    layout = None if not low else {"factors": bits, "head": head_bits, "group": group,
                                   "shapes": {key: list(tensors[key].shape) for key in low}}
    text = json.dumps(_spec(adapter, dtype, layout), separators=(",", ":"), allow_nan=False)
    metadata = {SPEC_KEY: text, CHECKSUM_KEY: _checksum(text, stored)}
    write_atomically(target, lambda temp: save_file(stored, temp, metadata=metadata))
    if sharded:
        torch.distributed.barrier()  # the file exists for every rank once save returns
    return Saved(target, os.path.getsize(target), errors, head_bytes)


def _is_sharded(tensor: Tensor) -> bool:
    """A DTensor (FSDP2's ``fully_shard`` makes the parameters ones)."""
    return callable(getattr(tensor, "full_tensor", None))


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else the tensor."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def write_atomically(target: str, write: Callable[[str], None]) -> None:
    """Run ``write(temp)`` on a new file next to ``target``, fsync it and rename it over ``target``.

    Readers see the old file or the new one, never part of one: on any exception (KeyboardInterrupt
    too) the temporary file is removed and ``target`` is untouched. An existing target keeps its mode.
    """
    directory, base = os.path.split(os.path.abspath(target))
    temp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode: 0o666 less the umask
    try:
        mode = stat.S_IMODE(os.stat(temp).st_mode)
        write(temp)  # may recreate the file with its own mode (safetensors writes 0600)
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(target).st_mode)
        os.chmod(temp, mode)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename durable (POSIX)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        with contextlib.suppress(OSError):
            os.fsync(fd)
        os.close(fd)


def _fspath(path: str | os.PathLike[str]) -> str:
    try:
        name = os.fspath(path)
    except TypeError:
        name = None
    if not isinstance(name, str):
        raise FactnetError(f"expected a file path (str or os.PathLike), got {type(path).__name__} {path!r}")
    return name


def read(name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The spec and every tensor of an adapter file, once the checksum matches."""
    if not os.path.isfile(name):
        problem = "is a directory" if os.path.isdir(name) else "does not exist"
        raise FactnetError(f"adapter file {name} {problem}; give the path adapter.save() wrote")
    try:
        with safe_open(name, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if SPEC_KEY not in metadata or CHECKSUM_KEY not in metadata:
                raise FactnetError(f"{name} is a safetensors file but not a factnet adapter (no {SPEC_KEY!r} metadata; "
                                   f"tensors {list(handle.keys())[:4]}); load files written by adapter.save()")
            keys = handle.keys()
            tensors = {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as error:
        raise FactnetError(f"{name} is not a readable safetensors file ({error}): it is truncated or corrupt; "
                           "save the adapter again") from error
    if metadata[CHECKSUM_KEY] != _checksum(metadata[SPEC_KEY], tensors):
        raise FactnetError(f"{name} is corrupt: its SHA-256 does not match its contents (changed after "
                           "adapter.save() wrote it); save the adapter again")
    spec = _parse_spec(metadata[SPEC_KEY], name)
    return spec, (_low_bit_values(spec["bits"], tensors, name) if "bits" in spec else tensors)


def _low_bit_values(bits: dict[str, Any], tensors: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """``tensors`` with each low-bit tensor's codes and constants turned back into its float32 values, after
    checking that they hold exactly the values its spec shape says (so nothing larger than the file's own
    codes is ever allocated)."""
    found = dict(tensors)
    for key, shape in bits["shapes"].items():
        width, group, count = bits[key.partition(".")[0]], bits["group"], math.prod(shape)
        wanted = {"codes": (torch.uint8, -(-count * width // 8)), "scale": (torch.float16, -(-count // group))}
        wanted |= {} if width == 1 else {"offset": (torch.float16, -(-count // group))}
        parts = {}
        for part, (dtype, size) in wanted.items():
            value = found.pop(f"{key}.{part}", None)
            if value is None or value.dtype != dtype or tuple(value.shape) != (size,):
                got = "missing" if value is None else f"{value.dtype} {tuple(value.shape)}"
                raise _malformed(name, f"low-bit tensor {key!r} {shape} needs {part} of {dtype} ({size},), got {got}")
            parts[part] = value
        found[key] = dequantize(Quantized(parts["codes"], parts["scale"], parts.get("offset"), tuple(shape), width,
                                          group))
    return found


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The spec of an adapter file as a dict, as the file holds it (version 1 or 2; checked like `load`
    does, without a model)."""
    return read(_fspath(path))[0]
