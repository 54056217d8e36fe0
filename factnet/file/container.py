"""The safetensors container of an adapter file: tensors and two metadata entries, ``"factnet"`` (the spec as
JSON, `factnet.file.spec`) and ``"factnet.sha256"`` (a SHA-256 of that JSON and every tensor, `checksum`).

`write_tensors` goes through `write_atomically`: a temporary file next to the target, fsynced and renamed over
it, so a crash mid-write leaves the old file intact. `read_tensors` trusts nothing before the checksum matches,
so a truncated, corrupt or foreign file is a `FactnetError`, and it never unpickles (safetensors is raw tensor
bytes plus a JSON header).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch import Tensor

from factnet.errors import FactnetError

__all__ = ["CHECKSUM_KEY", "SPEC_KEY", "checksum", "file_path", "file_size", "read_tensors", "write_atomically",
           "write_tensors"]

SPEC_KEY = "factnet"
CHECKSUM_KEY = "factnet.sha256"


def file_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a str (`os.fspath`); anything else is a `FactnetError`."""
    try:
        name = os.fspath(path)
    except TypeError:
        name = None
    if not isinstance(name, str):
        raise FactnetError(f"expected a file path (str or os.PathLike), got {type(path).__name__} {path!r}")
    return name


def checksum(spec_text: str, tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the spec JSON and every tensor's name, dtype, shape and bytes (in key order)."""
    digest = hashlib.sha256(spec_text.encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_tensors(target: str, tensors: dict[str, Tensor], spec_text: str) -> None:
    """Write ``tensors`` and the spec ``spec_text`` (with their checksum) to ``target``, atomically."""
    metadata = _metadata(tensors, spec_text)
    write_atomically(target, lambda temp: save_file(tensors, temp, metadata=metadata))


def file_size(tensors: dict[str, Tensor], spec_text: str) -> int:
    """The bytes `write_tensors` writes for ``tensors`` and ``spec_text``, serialized in memory."""
    return len(save(tensors, metadata=_metadata(tensors, spec_text)))


def _metadata(tensors: dict[str, Tensor], spec_text: str) -> dict[str, str]:
    return {SPEC_KEY: spec_text, CHECKSUM_KEY: checksum(spec_text, tensors)}


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


def read_tensors(name: str) -> tuple[str, dict[str, Tensor]]:
    """The spec's JSON text and the tensors of the adapter file ``name`` as stored, once the checksum matches."""
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
    if metadata[CHECKSUM_KEY] != checksum(metadata[SPEC_KEY], tensors):
        raise FactnetError(f"{name} is corrupt: its SHA-256 does not match its contents (changed after "
                           "adapter.save() wrote it); save the adapter again")
    return metadata[SPEC_KEY], tensors
