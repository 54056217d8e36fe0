"""Adapter files: writing one (`write`, atomically) and reading one back verified (`read`, `unpack`), no model
involved until the tensors are split.

Save an adapter to one safetensors file and rebuild it on a fresh copy of the base model.

The file (format version 4) holds one tensor per dtype, named by it (``float32``, ``bfloat16``, ``uint8``,
``float16``, ...): the packs. Every stored value is in one of them, in a fixed order: the factors (the groups in
the spec's order, each group's trained factors in the format's order), then, unless ``include_head=False``, the
head's parameters (in the order of the spec's ``head_shapes``); a tensor held as it is (or cast to the
``dtype`` given to `save`) is its values, flat, in the pack of its dtype; a low-bit one is its codes in
``uint8`` and its float16 scale (and offset above 1 bit) in ``float16`` (`factnet.quant`). Each tensor's shape,
and so where it sits, follows from the spec (`factnet.spec`) and the model's slices: nothing is restated, and
the header stays a few hundred bytes whatever the model. Two metadata entries: ``"factnet"``, the spec as
JSON, and ``"factnet.sha256"``, a SHA-256 of that JSON and every tensor. `read` trusts nothing before the
checksum matches, so a truncated, corrupt or foreign file is a `FactnetError`, and it never unpickles
(safetensors is raw tensor bytes plus a JSON header); `unpack` checks that the packs hold exactly the values
the spec and the model's slices need before it splits them. Files of versions 1 to 3 (one tensor per factor
and head parameter, ``factors.<group>.<factor>`` and ``head.<parameter name>``; low-bit: ``<name>.codes``,
``.scale``, ``.offset``) still read. Writes go to a temporary file next to the target, are fsynced and renamed
over it: a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from collections.abc import Callable, Mapping
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
    from factnet.formats import Format

__all__ = ["FileInfo", "Saved", "factor_shapes", "file_info", "load_spec", "read", "unpack", "write",
           "write_atomically"]

_PACK_DTYPES = {**STORAGE_DTYPES, "uint8": torch.uint8}  # a pack's name: the dtype of its values


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
    shapes = factor_shapes(adapter.format, adapter.group_shapes())  # (the packs' order)
    if tensors.keys() != shapes.keys() or any(tuple(tensors[k].shape) != shape for k, shape in shapes.items()):
        raise FactnetError(f"format {adapter.format.name!r} gives factors {shapes}, but the adapter holds "
                           f"{ {k: tuple(v.shape) for k, v in tensors.items()} }; its values cannot be saved")
    tensors = {key: tensors[key] for key in shapes}
    head = adapter.head_state() if include_head else {}  # an inactive adapter keeps its head values apart
    tensors.update({f"head.{name}": value for name, value in head.items()})
    sharded = any(_is_sharded(t) for t in tensors.values())
    tensors = {key: _full(value).detach().cpu() for key, value in tensors.items()}
    head_bits = head_bits if head else None
    low = {key: bits if key.startswith("factors.") else head_bits for key in tensors}
    low = {key: b for key, b in low.items() if b is not None}
    used_values = {f"factors.{name}.{factor}": value for name in adapter.group_names
                   for factor, value in adapter.group(name).values().items()} if low else {}
    used_values |= {f"head.{name}": value for name, value in adapter.head_values().items()} if head_bits else {}
    parts, errors = [], {}  # (tensor, part, values as stored), in the packs' order
    for key, value in tensors.items():
        if key not in low:
            parts.append((key, "values", value.to(dtype or value.dtype).contiguous()))
            continue
        q = quantize(value, low[key], group)
        parts += [(key, "codes", q.codes), (key, "scale", q.scale)] + ([] if q.offset is None else [
            (key, "offset", q.offset)])
        used = used_values.get(key, value).detach().cpu().double()  # what the adapter's forward uses
        norm = used.norm().item()
        errors[key] = (dequantize(q).double() - used).norm().item() / norm if norm else 0.0
    head_bytes = sum(t.numel() * t.element_size() for key, _, t in parts if key.startswith("head."))
    if sharded and torch.distributed.get_rank() != 0:  # FSDP2: every rank gathers, rank 0 writes
        torch.distributed.barrier()
        return Saved(target, 0, errors, head_bytes)
    packs: dict[str, list[Tensor]] = {}
    for _, _, value in parts:
        packs.setdefault(str(value.dtype).removeprefix("torch."), []).append(value.reshape(-1))
    stored = {name: torch.cat(values) for name, values in packs.items()}
    held = None
    if dtype is None:  # as held: in which dtype(s)
        floats = {key: str(tensors[key].dtype).removeprefix("torch.") for key, part, _ in parts if part == "values"}
        kinds = {"factors" if key.startswith("factors.") else key.removeprefix("head."): name
                 for key, name in floats.items()}
        if len({name for key, name in floats.items() if key.startswith("factors.")}) > 1:
            raise FactnetError(f"the adapter's factors have several dtypes ({floats}); save with dtype=...")
        held = next(iter(kinds.values())) if len(set(kinds.values())) == 1 else kinds or None
    bit_widths = None if not low else {"factors": bits, "head": head_bits, "group": group}
    spec = _spec(adapter, dtype, held, {name: tuple(tensors[f"head.{name}"].shape) for name in head}, bit_widths)
    text = json.dumps(spec, separators=(",", ":"), allow_nan=False)
    metadata = {SPEC_KEY: text, CHECKSUM_KEY: _checksum(text, stored)}
    write_atomically(target, lambda temp: save_file(stored, temp, metadata=metadata))
    if sharded:
        torch.distributed.barrier()  # the file exists for every rank once save returns
    return Saved(target, os.path.getsize(target), errors, head_bytes)


def factor_shapes(fmt: Format, group_shapes: Mapping[str, tuple[int, int, int]]) -> dict[str, tuple[int, ...]]:
    """``{"factors.<group>.<factor>": shape}`` of the factors a file stores (all but the seeded ones), in the
    order the packs hold them: ``group_shapes``' order (``{group: (n, d_in, d_out)}``), the format's factors."""
    return {f"factors.{group}.{factor}": shape for group, dims in group_shapes.items()
            for factor, shape in fmt.shapes(*dims).items() if factor not in fmt.seeded}


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
    """The spec and every tensor of an adapter file, once the checksum matches: of a version-4 file its packs
    (``{dtype name: values}``, each checked to be flat and of its name's dtype), which `unpack` splits once the
    model's slices are known; of older files the tensors, low-bit ones read back as float32 values."""
    spec, tensors = _read(name)
    if spec["factnet_format_version"] == 4 or "bits" not in spec:
        return spec, tensors
    return spec, _low_bit_values(spec["bits"], tensors, name)


def _read(name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The spec and the tensors of an adapter file as stored, once the checksum matches."""
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
    if spec["factnet_format_version"] == 4:
        for key, value in tensors.items():
            if _PACK_DTYPES.get(key) != value.dtype or value.dim() != 1:
                raise _malformed(name, f"it holds the tensor {key!r} ({value.dtype}, shape {tuple(value.shape)}); a "
                                       "version-4 file holds flat packs named by their dtype "
                                       f"({', '.join(_PACK_DTYPES)})")
    return spec, tensors


def unpack(spec: dict[str, Any], packs: Mapping[str, Tensor], factors: Mapping[str, tuple[int, ...]],
           name: str) -> dict[str, Tensor]:
    """The tensors of a version-4 file (as `read` gives older files'): ``factors.<group>.<factor>`` of the shapes
    ``factors`` (`factor_shapes` of the format and the slices rebuilt on the model, in order) and ``head.<name>``
    of the spec's ``head_shapes``, split from ``packs`` (`read`) after checking that each pack holds exactly the
    values they need (so a tensor of another size is an error, and nothing larger than the file's own values is
    allocated); low-bit tensors are read back as float32 values, the others copied out of their packs."""
    bits = spec.get("bits") or {}
    shapes = dict(factors) | {f"head.{p}": tuple(shape) for p, shape in spec.get("head_shapes", {}).items()}
    layout = _layout(spec, shapes, name)
    needed: dict[str, int] = {}
    for _, _, pack, count in layout:
        needed[pack] = needed.get(pack, 0) + count
    held_values = {pack: value.numel() for pack, value in packs.items()}
    if needed != held_values:
        wrong = [f"{pack}: needs {needed.get(pack, 0):,} values, holds {held_values.get(pack, 0):,}"
                 for pack in dict.fromkeys([*needed, *held_values]) if needed.get(pack) != held_values.get(pack)]
        raise FactnetError(f"{name} does not hold the tensors its spec and this model need ({spec['format']} rank "
                           f"{spec['rank']}, {len(factors)} factors" + (f", head {list(spec['head_shapes'])}"
                                                                        if spec.get("head_shapes") else "")
                           + f"): {'; '.join(wrong)}; load onto the architecture it was saved from (same head size)")
    found: dict[str, dict[str, Tensor]] = {}
    offsets = dict.fromkeys(packs, 0)
    for key, part, pack, count in layout:
        found.setdefault(key, {})[part] = packs[pack][offsets[pack]:offsets[pack] + count]
        offsets[pack] += count
    tensors = {}
    for key, parts in found.items():
        width, shape = bits.get(key.partition(".")[0]), shapes[key]
        tensors[key] = parts["values"].reshape(shape).clone() if width is None else dequantize(Quantized(
            parts["codes"], parts["scale"], parts.get("offset"), shape, width, bits["group"]))
    return tensors


def _layout(spec: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], name: str) -> list[tuple[str, str, str, int]]:
    """Where a version-4 file stores the tensors of ``shapes`` (in the packs' order): ``(tensor, part, pack,
    values)``, a part being ``values`` (in the dtype the spec gives) or low-bit ``codes``, ``scale``, ``offset``."""
    bits, held = spec.get("bits") or {}, spec.get("held")
    layout = []
    for key, shape in shapes.items():
        kind, count = key.partition(".")[0], math.prod(shape)
        width = bits.get(kind)
        if width is None:
            dtype = spec.get("dtype") or (held if not isinstance(held, dict) else held.get(
                "factors" if kind == "factors" else key.removeprefix("head.")))
            if dtype is None:
                raise _malformed(name, f"it does not say in which dtype {key} is stored")
            layout.append((key, "values", dtype, count))
            continue
        groups = -(-count // bits["group"])
        layout += [(key, "codes", "uint8", -(-count * width // 8)), (key, "scale", "float16", groups)]
        layout += [] if width == 1 else [(key, "offset", "float16", groups)]
    return layout


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


@dataclass(frozen=True)
class FileInfo:
    """What an adapter file holds, read and verified without a model (`file_info`): its spec, its size and its
    header's (the safetensors header with the spec, and the 8 bytes giving its length), and the head's
    parameters it holds, by name, with their shapes and their bytes as stored (low-bit codes and constants
    included). The same for every file version."""

    path: str
    spec: dict[str, Any]
    bytes: int
    header_bytes: int
    head_shapes: dict[str, tuple[int, ...]]
    head_bytes: int

    @property
    def version(self) -> int:
        return self.spec["factnet_format_version"]

    @property
    def factor_bytes(self) -> int:
        """The factors' bytes as stored: the rest of the file."""
        return self.bytes - self.header_bytes - self.head_bytes


def file_info(path: str | os.PathLike[str]) -> FileInfo:
    """The `FileInfo` of the adapter file at ``path`` (checked like `load` does, without a model)."""
    name = _fspath(path)
    spec, stored = _read(name)
    with open(name, "rb") as handle:
        header = 8 + int.from_bytes(handle.read(8), "little")
    if spec["factnet_format_version"] == 4:
        shapes = {p: tuple(shape) for p, shape in spec.get("head_shapes", {}).items()}
        parts = _layout(spec, {f"head.{p}": shape for p, shape in shapes.items()}, name)
        head_bytes = sum(count * _PACK_DTYPES[pack].itemsize for _, _, pack, count in parts)
    else:
        low = spec.get("bits", {}).get("shapes", {})  # (version 3: low-bit tensors as codes and constants)
        shapes = {key.removeprefix("head."): tuple(shape) for key, shape in low.items() if key.startswith("head.")}
        shapes |= {key.removeprefix("head."): tuple(value.shape) for key, value in stored.items()
                   if key.startswith("head.") and key.rpartition(".")[0] not in low}
        head_bytes = sum(value.nbytes for key, value in stored.items() if key.startswith("head."))
    return FileInfo(name, spec, os.path.getsize(name), header, shapes, head_bytes)


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The spec of an adapter file as a dict, as the file holds it (versions 1 to 4, `factnet.spec`; checked like
    `load` does, without a model)."""
    return read(_fspath(path))[0]
