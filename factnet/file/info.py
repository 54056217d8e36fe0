"""Reading an adapter file verified, no model involved: its spec and tensors (`read`), what it holds
(`file_info`), its spec alone (`load_spec`). Files of versions 1 to 3 (one tensor per factor and head
parameter, ``factors.<group>.<factor>`` and ``head.<parameter name>``; low-bit: ``<name>.codes``, ``.scale``,
``.offset``) read as well as version 4's packs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from factnet.file.codes import low_bit_values
from factnet.file.container import file_path, read_tensors
from factnet.file.packs import PACK_DTYPES, pack_layout
from factnet.file.spec import Spec, read_spec
from factnet.file.validate import malformed

__all__ = ["FileInfo", "file_info", "load_spec", "read"]


def read(name: str) -> tuple[Spec, dict[str, Tensor]]:
    """The spec and every tensor of an adapter file, once the checksum matches: of a version-4 file its packs
    (``{dtype name: values}``, each checked to be flat and of its name's dtype), which `factnet.file.packs.unpack`
    splits once the model's slices are known; of older files the tensors, low-bit ones read back as float32
    values."""
    spec, tensors = _read_stored(name)
    if spec.low_bit is None:
        return spec, tensors
    return spec, low_bit_values(spec.bits, spec.low_bit, tensors, name)  # type: ignore[arg-type]


def _read_stored(name: str) -> tuple[Spec, dict[str, Tensor]]:
    """The spec and the tensors of an adapter file as stored, once the checksum matches."""
    text, tensors = read_tensors(name)
    spec = read_spec(text, name)
    if spec.packed:
        for key, value in tensors.items():
            if PACK_DTYPES.get(key) != value.dtype or value.dim() != 1:
                raise malformed(name, f"it holds the tensor {key!r} ({value.dtype}, shape {tuple(value.shape)}); a "
                                      "version-4 file holds flat packs named by their dtype "
                                      f"({', '.join(PACK_DTYPES)})")
    return spec, tensors


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
    name = file_path(path)
    spec, stored = _read_stored(name)
    with open(name, "rb") as handle:
        header = 8 + int.from_bytes(handle.read(8), "little")
    if spec.packed:
        shapes = {p: tuple(shape) for p, shape in spec.head_shapes.items()}
        parts = pack_layout(spec, {f"head.{p}": shape for p, shape in shapes.items()}, name)
        head_bytes = sum(count * PACK_DTYPES[pack].itemsize for _, _, pack, count in parts)
    else:
        low = spec.low_bit or {}  # (version 3: low-bit tensors as codes and constants)
        shapes = {key.removeprefix("head."): tuple(shape) for key, shape in low.items() if key.startswith("head.")}
        shapes |= {key.removeprefix("head."): tuple(value.shape) for key, value in stored.items()
                   if key.startswith("head.") and key.rpartition(".")[0] not in low}
        head_bytes = sum(value.nbytes for key, value in stored.items() if key.startswith("head."))
    return FileInfo(name, spec.written, os.path.getsize(name), header, shapes, head_bytes)


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The spec of an adapter file as a dict, as the file holds it (versions 1 to 4, `factnet.file.spec`; checked
    like `load` does, without a model)."""
    return read(file_path(path))[0].written
