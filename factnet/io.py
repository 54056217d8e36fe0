"""Save an adapter to one safetensors file and rebuild it on a fresh copy of the base model.

The file holds the tensors ``factors.<group>.<factor>`` and, unless ``include_head=False``,
``head.<parameter name>`` (as they are, or cast to the ``dtype`` given to `save`), and two metadata
entries: ``"factnet"``, the spec as JSON, and ``"factnet.sha256"``, a SHA-256 of that JSON and every
tensor. `load` trusts nothing before the checksum matches, so a truncated, corrupt or foreign file
is a `FactnetError`, and it never unpickles (safetensors is raw tensor bytes plus a JSON header).
Writes go to a temporary file next to the target, are fsynced and renamed over it: a crash
mid-write leaves the old file intact.

The spec (``factnet_format_version`` 2) holds the format, rank, factor letters, scale, dropout, the
head's module names, the storage ``dtype`` (``null``: as the adapter held them), a fingerprint of
the base model (``base``: the first 16 hex digits of the SHA-256 of the sorted listing of every
matrix outside the head, name, kind, ``d_out``, ``d_in``, and their count) and each group's slice
map as module-name templates with numeric runs: ``{"shape": [144, 768, 768], "slices":
["blocks.{0-11}.attn.qkv[0-2]", "blocks.{0-11}.attn.proj", ...]}`` (``[blocks]``: the blocks of a
cut matrix; none: the whole matrix). `load` expands the
templates, rebuilds the slices on the model (in the model's order, as `Tensorizer` makes them) and
checks them against each group's shape; the head parameters are the file's ``head.*`` tensors.
A ViT-B FacT-TT rank 8 file has a header under 1 KiB. Files of version 1 (the spec listed every
matrix of the base model and every slice) still load, unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import pathlib
import re
import secrets
import stat
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from factnet.adapter import Adapter, _in_head, _key, factor_dtype
from factnet.adapter_set import AdapterSet
from factnet.attach import AdaptedMatrix
from factnet.errors import FactnetError
from factnet.formats import Format, available_formats, get_format
from factnet.slices import Slice, find_matrices
from factnet.tensorizer import Tensorizer

__all__ = ["FORMAT_VERSION", "STORAGE_DTYPES", "load", "load_many", "load_spec", "save", "write_atomically"]

FORMAT_VERSION = 2
SPEC_KEY = "factnet"
CHECKSUM_KEY = "factnet.sha256"
FINGERPRINT_DIGITS = 16  # hex digits of the base model's SHA-256 kept in the spec (64 bits)
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float64": torch.float64}
_SHOWN = 5  # mismatches listed in an error

# The spec's JSON layout: a type, a tuple of alternatives, [item layout], {key: layout} (exactly these keys)
# or {str: layout}.
_COMMON_LAYOUT: dict[Any, Any] = {
    "factnet_format_version": int, "factnet_version": str, "format": str, "rank": int, "factors": {str: str},
    "scale": float, "dropout": float,
}
_SPEC_LAYOUTS: dict[int, dict[Any, Any]] = {
    1: {**_COMMON_LAYOUT, "head": [str], "head_parameters": [str],
        "matrices": {str: {"kind": str, "d_out": int, "d_in": int}},
        "groups": {str: {"shape": [int], "slices": [{"module": str, "block": int, "side": str, "offset": int}]}}},
    2: {**_COMMON_LAYOUT, "dtype": (str, type(None)), "head": [str],
        "base": {"sha256": str, "matrices": int},
        "groups": {str: {"shape": [int], "slices": [str]}}},
}


# ---- the spec --------------------------------------------------------------------------------
def _matrices(model: nn.Module, head: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {kind, d_out, d_in}}`` (linear convention) of every matrix of ``model`` outside ``head``,
    adapted ones included: the architecture an adapter file fits."""
    found = find_matrices(model) + [m.matrix for m in model.modules() if isinstance(m, AdaptedMatrix)]
    return {m.name: {"kind": m.kind, "d_out": m.d_out, "d_in": m.d_in} for m in found
            if not any(m.name == h or m.name.startswith(h + ".") for h in head)}


def _fingerprint(matrices: Mapping[str, Mapping[str, Any]]) -> str:
    """The first `FINGERPRINT_DIGITS` hex digits of the SHA-256 of the count and the sorted listing
    ``name, kind, d_out, d_in`` (one matrix a line) of ``matrices``."""
    lines = "".join(f"{name}\t{m['kind']}\t{m['d_out']}\t{m['d_in']}\n" for name, m in sorted(matrices.items()))
    return hashlib.sha256(f"{len(matrices)}\n{lines}".encode()).hexdigest()[:FINGERPRINT_DIGITS]


def _base(matrices: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"sha256": _fingerprint(matrices), "matrices": len(matrices)}


def _slice_map(groups: Mapping[str, Sequence[Slice]]) -> dict[str, dict[str, Any]]:
    """Version 1's ``{group: {shape: [n, d_in, d_out], slices: [...]}}``; a slice is block ``block`` of
    ``module``, cut along ``side`` ("out", "in" or "none"), starting at row/column ``offset`` of the
    ``(d_out, d_in)`` weight."""
    def entry(s: Slice) -> dict[str, Any]:
        offset = s.index * {"out": s.d_out, "in": s.d_in}.get(s.side, 0)
        return {"module": s.module, "block": s.index, "side": s.side, "offset": offset}

    return {name: {"shape": [len(members), members[0].d_in, members[0].d_out], "slices": [entry(s) for s in members]}
            for name, members in groups.items()}


_NUMBER = re.compile(r"0|[1-9][0-9]*")
_RUNS = re.compile(r"(0|[1-9][0-9]*)(-(0|[1-9][0-9]*))?(,(0|[1-9][0-9]*)(-(0|[1-9][0-9]*))?)*")
_TEMPLATE = re.compile(r"(?P<name>[^\[\]{}]*(\{[^\[\]{}]*\}[^\[\]{}]*)*)(\[(?P<blocks>[^\[\]{}]*)\])?")


def _runs(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"`` (sorted, distinct)."""
    ordered, parts = sorted(set(numbers)), []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda pair: pair[1] - pair[0]):
        values = [value for _, value in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts)


def _parse_runs(text: str) -> list[tuple[int, int]] | None:
    """``"0-2,5"`` → ``[(0, 2), (5, 5)]``, increasing and disjoint; ``None`` if malformed."""
    if not _RUNS.fullmatch(text):
        return None
    runs = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        runs.append((int(low), int(high or low)))
    ordered = all(a <= b for a, b in runs) and all(b < c for (_, b), (c, _) in itertools.pairwise(runs))
    return runs if ordered else None


def _templates(members: Sequence[Slice]) -> list[str]:
    """The slices of one group as module-name templates: every module with its blocks (``[0-2]``; none for a
    whole matrix), then modules that differ in one numeric name segment merged into a run (``{0-11}``), until
    none merge. Each template stands for the product of its runs: exactly the group's slices."""
    blocks: dict[str, list[int]] = {}
    cut: dict[str, bool] = {}
    for piece in members:
        if any(c in piece.module for c in "{}[],"):
            raise FactnetError(f"module name {piece.module!r} has a brace, bracket or comma, which the adapter file's "
                               "slice map cannot name; rename the module to save the adapter")
        blocks.setdefault(piece.module, []).append(piece.index)
        cut[piece.module] = piece.side != "none"
    entries = [(tuple(frozenset([int(s)]) if _NUMBER.fullmatch(s) else s for s in module.split(".")),
                f"[{_runs(found)}]" if cut[module] else "") for module, found in blocks.items()]
    merged = True
    while merged:
        merged = False
        for position in reversed(range(max(len(segments) for segments, _ in entries))):
            buckets: dict[tuple, list[Any]] = {}  # key -> [numbers (None: not mergeable here), segments, suffix]
            for segments, suffix in entries:
                if position < len(segments) and isinstance(segments[position], frozenset):
                    key: tuple = (segments[:position], segments[position + 1:], suffix)
                    if key in buckets:
                        buckets[key][0] |= segments[position]
                        merged = True
                    else:
                        buckets[key] = [segments[position], segments, suffix]
                else:
                    buckets[(segments, suffix)] = [None, segments, suffix]
            entries = [(segments if numbers is None else (*segments[:position], numbers, *segments[position + 1:]),
                        suffix) for numbers, segments, suffix in buckets.values()]

    def render(segment: str | frozenset) -> str:
        if isinstance(segment, str):
            return segment
        return str(next(iter(segment))) if len(segment) == 1 else "{" + _runs(segment) + "}"

    return [".".join(render(s) for s in segments) + suffix for segments, suffix in entries]


@dataclass(frozen=True)
class _Template:
    """A parsed slice-map template: name segments (literal, or runs of numbers) and the blocks' runs
    (``None``: the whole matrix)."""

    segments: tuple[str | tuple[tuple[int, int], ...], ...]
    blocks: tuple[tuple[int, int], ...] | None

    @property
    def size(self) -> int:
        total = 1
        for runs in (*(s for s in self.segments if not isinstance(s, str)), self.blocks or ((0, 0),)):
            total *= sum(b - a + 1 for a, b in runs)
        return total

    def expand(self) -> Iterable[tuple[str, int]]:
        """``(module, block)`` of every slice it stands for (block 0 for a whole matrix)."""
        def values(segment: str | tuple[tuple[int, int], ...]) -> Iterable[str]:
            if isinstance(segment, str):
                return (segment,)
            return [str(v) for a, b in segment for v in range(a, b + 1)]

        for parts in itertools.product(*(values(s) for s in self.segments)):
            module = ".".join(parts)
            for a, b in self.blocks or ((0, 0),):
                for block in range(a, b + 1):
                    yield module, block


def _parse_template(text: str) -> _Template | None:
    parsed = _TEMPLATE.fullmatch(text)
    if parsed is None or not parsed["name"]:
        return None
    segments: list[str | tuple[tuple[int, int], ...]] = []
    for segment in parsed["name"].split("."):
        if segment.startswith("{") and segment.endswith("}"):
            runs = _parse_runs(segment[1:-1])
            if runs is None:
                return None
            segments.append(tuple(runs))
        elif "{" in segment or "}" in segment or not segment:
            return None
        else:
            segments.append(segment)
    if parsed["blocks"] is None:
        return _Template(tuple(segments), None)
    runs = _parse_runs(parsed["blocks"])
    return None if runs is None else _Template(tuple(segments), tuple(runs))


def _spec(adapter: Adapter, dtype: torch.dtype | None) -> dict[str, Any]:
    from factnet import __version__

    fmt, settings = adapter.format, adapter.settings
    groups = {name: adapter.group(name).slices for name in adapter.group_names}
    return {
        "factnet_format_version": FORMAT_VERSION, "factnet_version": __version__,
        "format": fmt.name, "rank": fmt.rank, "factors": dict(fmt.factors),
        "scale": settings.scale, "dropout": settings.dropout,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "head": list(adapter.head),
        "base": _base(_matrices(adapter.model, adapter.head)),
        "groups": {name: {"shape": [len(members), members[0].d_in, members[0].d_out],
                          "slices": _templates(members)} for name, members in groups.items()},
    }


def _fits(value: Any, layout: Any) -> bool:
    """Whether decoded JSON ``value`` has ``layout`` (see `_SPEC_LAYOUTS`)."""
    if layout is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(layout, tuple):
        return any(_fits(value, option) for option in layout)
    if isinstance(layout, type):
        return isinstance(value, layout) and not isinstance(value, bool)
    if isinstance(layout, list):
        return isinstance(value, list) and all(_fits(v, layout[0]) for v in value)
    if not isinstance(value, dict):
        return False
    if list(layout) == [str]:
        return all(_fits(v, layout[str]) for v in value.values())
    return value.keys() == layout.keys() and all(_fits(value[k], sub) for k, sub in layout.items())


def _malformed(path: str, problem: str) -> FactnetError:
    return FactnetError(f"{path} has a malformed factnet spec: {problem}; it was not written by adapter.save()")


def _parse_spec(text: str, path: str) -> dict[str, Any]:
    """The spec's JSON, checked for its version and layout (not yet against a model)."""
    try:
        spec = json.loads(text)
    except ValueError:
        spec = None
    version = spec.get("factnet_format_version") if isinstance(spec, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise FactnetError(f"{path} has factnet_format_version {version}, but this factnet reads versions "
                           f"1 to {FORMAT_VERSION}; upgrade factnet to load it")
    layout = _SPEC_LAYOUTS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if layout is None or not _fits(spec, layout) or not spec["groups"]:
        raise FactnetError(f"{path} has a malformed factnet spec (expected the JSON layout of factnet_format_version "
                           f"1 to {FORMAT_VERSION} with at least one group); it was not written by adapter.save()")
    if version == 1:
        unlisted = {s["module"] for group in spec["groups"].values() for s in group["slices"]} - set(spec["matrices"])
        if unlisted:
            raise _malformed(path, f"its groups use matrices {sorted(unlisted)[:_SHOWN]} it does not list")
        return spec
    if spec["dtype"] is not None and spec["dtype"] not in STORAGE_DTYPES:
        raise _malformed(path, f"storage dtype {spec['dtype']!r} is not one of {list(STORAGE_DTYPES)}")
    if not re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_DIGITS}}}", spec["base"]["sha256"]):
        raise _malformed(path, f"the base model's fingerprint {spec['base']['sha256']!r} is not "
                               f"{FINGERPRINT_DIGITS} hex digits")
    for name, group in spec["groups"].items():
        shape = group["shape"]
        if len(shape) != 3 or min(shape) < 1:
            raise _malformed(path, f"group {name!r} has shape {shape}, not [n, d_in, d_out] of positive sizes")
        templates = [_parse_template(t) for t in group["slices"]]
        if None in templates:
            bad = group["slices"][templates.index(None)]
            raise _malformed(path, f"group {name!r} has the slice template {bad!r} (expected a module name with "
                                   "numeric runs such as 'blocks.{0-11}.attn.qkv[0-2]')")
        count = sum(t.size for t in templates)  # type: ignore[union-attr]
        if count != shape[0]:
            raise _malformed(path, f"the slice templates of group {name!r} stand for {count} slices, but its shape "
                                   f"{shape} has {shape[0]}")
    return spec


# ---- save ------------------------------------------------------------------------------------
def save(adapter: Adapter, path: str | os.PathLike[str], include_head: bool = True,
         dtype: torch.dtype | None = None) -> None:
    """Write ``adapter`` to ``path``: one safetensors file, atomically (see the module doc).

    From a model sharded with FSDP2 (``fully_shard``), call it on every rank: the full factors are
    gathered and rank 0 writes the one file.

    Holds the factors and, unless ``include_head=False``, the parameters of the trainable head, as they
    are (``dtype=None``) or cast to ``dtype`` (``torch.float16``, ``torch.bfloat16``, ``torch.float32`` or
    ``torch.float64``): ``torch.bfloat16`` stores 2 bytes a parameter, and `load` casts the values back to
    the model's dtypes. The size is the tensors' bytes plus the header (under 1 KiB for ViT-B).
    """
    if not isinstance(adapter, Adapter):
        raise FactnetError(f"save needs a factnet Adapter, got {type(adapter).__name__}")
    if dtype is not None and dtype not in STORAGE_DTYPES.values():
        raise FactnetError(f"dtype must be None (as the adapter holds them) or one of "
                           f"{', '.join(f'torch.{d}' for d in STORAGE_DTYPES)}, got {dtype!r}")
    target = os.path.realpath(_fspath(path))
    if os.path.isdir(target):
        raise FactnetError(f"{target} is a directory; give a file path such as {target}/adapter.safetensors")
    if not os.path.isdir(os.path.dirname(target)):
        raise FactnetError(f"directory {os.path.dirname(target)} does not exist; create it before saving")
    model = getattr(adapter, "model", None)
    if model is None:
        raise FactnetError("adapter was detached, so the model it fits is no longer known; save before detach()")
    tensors = {f"factors.{name}.{factor}": value
               for name in adapter.group_names for factor, value in adapter.group(name).factors.items()}
    head = adapter.head_state() if include_head else {}  # an inactive adapter keeps its head values apart
    tensors.update({f"head.{name}": value for name, value in head.items()})
    sharded = any(_is_sharded(t) for t in tensors.values())
    tensors = {key: _full(value).detach().cpu().to(dtype or value.dtype).contiguous()
               for key, value in tensors.items()}
    if sharded and torch.distributed.get_rank() != 0:  # FSDP2: every rank gathers, rank 0 writes
        torch.distributed.barrier()
        return
    text = json.dumps(_spec(adapter, dtype), separators=(",", ":"), allow_nan=False)
    metadata = {SPEC_KEY: text, CHECKSUM_KEY: _checksum(text, tensors)}
    write_atomically(target, lambda temp: save_file(tensors, temp, metadata=metadata))
    if sharded:
        torch.distributed.barrier()  # the file exists for every rank once save returns


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


def _checksum(spec_text: str, tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the spec JSON and every tensor's name, dtype, shape and bytes (in key order)."""
    digest = hashlib.sha256(spec_text.encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---- load ------------------------------------------------------------------------------------
def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The spec of an adapter file as a dict, as the file holds it (version 1 or 2; checked like `load`
    does, without a model)."""
    return _read(_fspath(path))[0]


def load(model: nn.Module, path: str | os.PathLike[str], name: str = "default") -> Adapter:
    """Rebuild the adapter saved at ``path`` on ``model`` (the base model, possibly carrying other
    adapters) as adapter ``name`` of ``model.factnet``, and return it, active, with its factors and
    (if saved) head as saved.

    ``model`` must have the saved model's matrices (outside the head: no more, no fewer, of the same
    kinds and shapes) and, for a file saved with ``dtype=None``, its dtype; a file saved with a
    ``dtype`` is cast to the model's factor dtype (and the head parameters' dtypes): bfloat16 values
    come back exactly, upcast. A user-defined format must be imported first. On any error the model
    is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise FactnetError(f"load needs a torch.nn.Module, got {type(model).__name__}")
    AdapterSet.check_addable(model, name)
    path = _fspath(path)
    loaded = _prepare(model, path, _Caches(model))
    return _attach(model, loaded, name)


def load_many(model: nn.Module, paths: Iterable[str | os.PathLike[str]], names: Sequence[str] | None = None, *,
              progress: bool | None = None) -> dict[str, Adapter]:
    """Load every adapter file in ``paths`` onto ``model`` (one base model), as `load` would one by one, and
    return ``{name: adapter}`` in order; the last one is active.

    ``names`` default to the files' stems (``tasks/cifar.safetensors`` → ``"cifar"``); two equal names are an
    error. The base model is checked once per distinct fingerprint and the slices are rebuilt once per
    distinct slice map, so 1,000 files of one model load in seconds. All or nothing: every file is read and
    checked before the first adapter is added, and on any error no adapter is added and the model is left
    unchanged; the error names the file. ``progress``: a tqdm bar (``None``: when stderr is a terminal).
    """
    if not isinstance(model, nn.Module):
        raise FactnetError(f"load_many needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise FactnetError("load_many takes a list of adapter files; for one file use factnet.load(model, path)")
    files = [_fspath(p) for p in paths]
    names = [pathlib.Path(f).stem for f in files] if names is None else list(names)
    if len(names) != len(files):
        raise FactnetError(f"load_many got {len(files)} files but {len(names)} names; pass one name per file")
    first: dict[str, str] = {}
    for file, name in zip(files, names):
        try:
            AdapterSet.check_addable(model, name)
        except FactnetError as error:
            raise FactnetError(f"{file}: {error}") from None
        if name in first:
            raise FactnetError(f"{file} and {first[name]} would both be adapter {name!r}; pass names=[...] (one "
                               "distinct name per file) or rename the files")
        first[name] = file
    caches, loaded = _Caches(model), []
    with tqdm(total=len(files), desc="load_many: read and check", unit="file", disable=_no_bar(progress)) as bar:
        for file in files:
            try:
                loaded.append(_prepare(model, file, caches))
            except FactnetError as error:
                message = str(error)
                raise FactnetError(message if file in message else f"{file}: {message}") from None
            bar.update()
        if any(item.spec["dropout"] > 0 and any(s.matrix.kind.startswith("mha") for s in item.tensorizer.slices)
               for item in loaded):
            warnings.warn("factor-space dropout does not reach nn.MultiheadAttention matrices: their increment is "
                          "applied as a merged weight", stacklevel=2)
        bar.reset()
        bar.set_description("load_many: attach")
        previous = model.factnet.active if isinstance(getattr(model, "factnet", None), AdapterSet) else None
        heads = {p: value.detach().clone() for head in {tuple(item.spec['head']) for item in loaded}
                 for p, value in caches.head_parameters(head).items()}
        adapters: dict[str, Adapter] = {}
        try:
            for position, name in enumerate(names):
                adapters[name] = _attach(model, loaded[position], name, checked=True)
                loaded[position] = None  # type: ignore[call-overload]  # its tensors are the adapter's now
                bar.update()
        except BaseException:
            for name in reversed(list(adapters)):
                model.factnet.delete(name)
            if adapters and isinstance(getattr(model, "factnet", None), AdapterSet):
                model.factnet.activate(previous)
            with torch.no_grad():
                for parameter, value in heads.items():
                    model.get_parameter(parameter).copy_(value)
            raise
    return adapters


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: ``None`` disables it when stderr is not a terminal."""
    return None if progress is None else not progress


@dataclass
class _Loaded:
    """A file read and checked against the model, ready to attach."""

    path: str
    spec: dict[str, Any]
    fmt: Format
    tensorizer: Tensorizer
    tensors: dict[str, Tensor]
    head_parameters: list[str]


class _Caches:
    """What one `load_many` works out once: the model's matrices and parameters, per head its fingerprint,
    per slice map its `Tensorizer`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.matrices: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}
        self.checked: set[tuple] = set()  # (head, fingerprint or v1 listing) that fit the model
        self.tensorizers: dict[tuple[int, str], Tensorizer] = {}
        self.parameters: dict[str, nn.Parameter] | None = None  # the model's own (not its adapters')
        self.heads: dict[tuple[str, ...], dict[str, nn.Parameter]] = {}

    def matrices_of(self, head: Sequence[str]) -> dict[str, dict[str, Any]]:
        key = tuple(head)
        if key not in self.matrices:
            self.matrices[key] = _matrices(self.model, head)
        return self.matrices[key]

    def head_parameters(self, head: Sequence[str]) -> dict[str, nn.Parameter]:
        if self.parameters is None:
            self.parameters = {n: p for n, p in self.model.named_parameters() if not n.startswith("factnet.")}
        key = tuple(head)
        if key not in self.heads:
            self.heads[key] = {n: p for n, p in self.parameters.items() if _in_head(n, head)}
        return self.heads[key]


def _prepare(model: nn.Module, path: str, caches: _Caches) -> _Loaded:
    """Read ``path`` and check it against ``model`` (nothing is changed)."""
    spec, tensors = _read(path)
    fmt = _registered_format(spec)
    version = spec["factnet_format_version"]
    listing = spec["base"]["sha256"] if version == 2 else json.dumps(spec["matrices"], sort_keys=True)
    if (tuple(spec["head"]), listing) not in caches.checked:
        (_check_matrices if version == 1 else _check_base)(caches.matrices_of(spec["head"]), spec, path)
        caches.checked.add((tuple(spec["head"]), listing))
    key = (version, json.dumps(spec["groups"], sort_keys=True))
    if key not in caches.tensorizers:
        build = _rebuild_v1 if version == 1 else _rebuild
        caches.tensorizers[key] = build(model, spec, path, caches.matrices_of(spec["head"]))
    tensorizer = caches.tensorizers[key]
    if version == 1:
        head_parameters = list(spec["head_parameters"])
    else:
        head_parameters = [key[len("head."):] for key in tensors if key.startswith("head.")]
    head = caches.head_parameters(spec["head"])
    _check_tensors(head, spec, fmt, tensorizer, tensors, head_parameters, path)
    _check_dtypes(model, spec, tensors, head, head_parameters, path)
    _check_settings(model, spec, fmt, tensorizer)
    return _Loaded(path, spec, fmt, tensorizer, tensors, head_parameters)


def _attach(model: nn.Module, loaded: _Loaded, name: str, checked: bool = False) -> Adapter:
    """Add the adapter of a checked file to ``model`` as ``name`` and copy its tensors in. ``checked``: what
    `Tensorizer.decompose` checks was checked (`_check_settings`), so build the `Adapter` directly (decompose
    walks every module of the model, adapters included, to find the head: quadratic over 1,000 adapters)."""
    spec, tensors = loaded.spec, loaded.tensors
    if checked:
        adapter = Adapter(model, loaded.tensorizer.groups, loaded.fmt, spec["scale"], spec["dropout"],
                          list(spec["head"]), name, torch.Generator().manual_seed(0))
    else:
        adapter = loaded.tensorizer.decompose(loaded.fmt, scale=spec["scale"], dropout=spec["dropout"],
                                              head=spec["head"], train_head=bool(spec["head"]),
                                              seed=0, name=name)  # seed: leave the global RNG alone
    pairs = [(factor, tensors[f"factors.{group}.{key}"])
             for group in adapter.group_names for key, factor in adapter.group(group).factors.items()]
    pairs += [(model.get_parameter(p), tensors[f"head.{p}"]) for p in loaded.head_parameters]
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)  # casts a file saved with a storage dtype
    return adapter


def _fspath(path: str | os.PathLike[str]) -> str:
    try:
        name = os.fspath(path)
    except TypeError:
        name = None
    if not isinstance(name, str):
        raise FactnetError(f"expected a file path (str or os.PathLike), got {type(path).__name__} {path!r}")
    return name


def _read(name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
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
    return _parse_spec(metadata[SPEC_KEY], name), tensors


def _registered_format(spec: dict[str, Any]) -> Format:
    if spec["format"] not in available_formats():
        raise FactnetError(f"the adapter's format {spec['format']!r} is not registered (known formats: "
                           f"{', '.join(available_formats())}); import the module defining that Format subclass "
                           "before load")
    fmt = get_format(spec["format"], spec["rank"])
    if dict(fmt.factors) != spec["factors"]:
        raise FactnetError(f"format {fmt.name!r} is registered with factors {fmt.factors}, but the adapter was "
                           f"saved with {spec['factors']}; load with the definition it was saved with")
    return fmt


def _listing(wrong: list[str]) -> str:
    more = f"; and {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else ""
    return "; ".join(wrong[:_SHOWN]) + more


def _check_matrices(found: dict[str, dict[str, Any]], spec: dict[str, Any], path: str) -> None:
    """Version 1: the model's matrices ``found`` (outside the head) are the saved base model's, no more, no
    fewer, of the same kind and shape; else list the first mismatches."""
    saved = spec["matrices"]

    def describe(m: dict[str, Any] | None) -> str:
        return "missing" if m is None else f"{m['kind']} {m['d_out']}x{m['d_in']}"

    wrong = [f"{name}: saved {describe(saved.get(name))}, model has {describe(found.get(name))}"
             for name in [*saved, *(n for n in found if n not in saved)] if saved.get(name) != found.get(name)]
    if wrong:
        raise FactnetError(f"{path} does not fit this model: {len(wrong)} matrices differ (d_out x d_in): "
                           f"{_listing(wrong)}; load it onto the architecture it was saved from (same depth and "
                           "width)")


def _check_base(found: dict[str, dict[str, Any]], spec: dict[str, Any], path: str) -> None:
    """Version 2: the model's matrices ``found`` (outside the head) have the saved base model's fingerprint;
    else say how they differ as far as the spec tells: the counts, and which of the matrices the file adapts
    (its slice map: module, blocks, block shape) the model lacks or has of another shape."""
    saved, base = spec["base"], _base(found)
    if saved["sha256"] == base["sha256"]:
        return
    adapted: dict[str, tuple[set[int], int, int, bool]] = {}  # module -> (blocks, d_out, d_in, cut) as saved
    for group in spec["groups"].values():
        _, d_in, d_out = group["shape"]
        for text in group["slices"]:
            template = _parse_template(text)
            for module, block in itertools.islice(template.expand(), 100_000):  # type: ignore[union-attr]
                blocks = adapted.setdefault(module, (set(), d_out, d_in, template.blocks is not None))[0]  # type: ignore[union-attr]
                blocks.add(block)

    def differs(module: str) -> str | None:
        chosen, d_out, d_in, cut = adapted[module]
        last = max(chosen)
        was = f"blocks {_runs(chosen)} of {d_out}x{d_in}" if cut else f"{d_out}x{d_in}"
        matrix = found.get(module)
        if matrix is None:
            return f"{module}: saved {was}, model has missing"
        blocks = _cut_blocks(matrix)
        size = (matrix["d_out"] // blocks, matrix["d_in"]) if matrix["d_out"] > matrix["d_in"] else (
            matrix["d_out"], matrix["d_in"] // blocks)
        if size == (d_out, d_in) and blocks > last and (blocks > 1) == cut:
            return None
        return f"{module}: saved {was}, model has {matrix['kind']} {matrix['d_out']}x{matrix['d_in']}"

    wrong = [w for w in map(differs, adapted) if w is not None]
    detail = (f"; of the {len(adapted)} matrices it adapts, {len(wrong)} differ (d_out x d_in): {_listing(wrong)}"
              if wrong else f"; the {len(adapted)} matrices it adapts match")
    patterns = [re.compile(r"\.".join(re.escape(s) if isinstance(s, str) else "[0-9]+"
                                      for s in _parse_template(text).segments))  # type: ignore[union-attr]
                for group in spec["groups"].values() for text in group["slices"]]
    extra = [f"{name}: {m['kind']} {m['d_out']}x{m['d_in']}" for name, m in found.items()
             if name not in adapted and any(p.fullmatch(name) for p in patterns)]
    if extra:
        detail += (f"; this model also has {len(extra)} matrices named like those but not in the file's slice map: "
                   f"{_listing(extra)}")
    elif not wrong:
        detail += ", so others differ"
    raise FactnetError(f"{path} does not fit this model: it was saved from a base model with {saved['matrices']} "
                       f"matrices outside the head (fingerprint {saved['sha256']}), this model has {base['matrices']} "
                       f"(fingerprint {base['sha256']}){detail}; load it onto the architecture it was saved from "
                       "(same depth, width and module names)")


def _rebuild_v1(model: nn.Module, spec: dict[str, Any], path: str, matrices: dict[str, Any]) -> Tensorizer:
    """Version 1: the slices of every group on ``model``, checked against the saved slice map."""
    group_of = {(s["module"], s["block"]): group for group, entry in spec["groups"].items() for s in entry["slices"]}
    tensorizer = _tensorizer(model, group_of, path)
    rebuilt = _slice_map(tensorizer.groups)
    if rebuilt != spec["groups"]:
        wrong = [g for g in spec["groups"] if rebuilt.get(g) != spec["groups"][g]]
        raise FactnetError(f"{path}: the slice map of groups {wrong[:_SHOWN]} does not match this model's matrices "
                           "(block offsets or shapes differ); the file was not written by adapter.save()")
    return tensorizer


def _rebuild(model: nn.Module, spec: dict[str, Any], path: str, matrices: dict[str, Any]) -> Tensorizer:
    """Version 2: the slice templates of every group expanded and rebuilt on ``model`` (in the model's
    order, as `Tensorizer` makes them), checked against each group's shape and cut."""
    available = sum(_cut_blocks(m) for m in matrices.values())
    wanted = sum(group["shape"][0] for group in spec["groups"].values())
    if wanted > available:
        raise FactnetError(f"{path}: its slice map has {wanted} slices, but this model's matrices have "
                           f"{available}; the file was not written by adapter.save() for this model")
    group_of: dict[tuple[str, int], str] = {}
    whole: set[str] = set()
    for group, entry in spec["groups"].items():
        for text in entry["slices"]:
            template = _parse_template(text)
            for module, block in template.expand():  # type: ignore[union-attr]
                if (module, block) in group_of:
                    raise _malformed(path, f"slice {module}[{block}] is in its slice map twice")
                group_of[(module, block)] = group
                if template.blocks is None:  # type: ignore[union-attr]
                    whole.add(module)
    tensorizer = _tensorizer(model, group_of, path)
    for group, entry in spec["groups"].items():
        members = tensorizer.groups.get(group, ())
        shape = [len(members), members[0].d_in, members[0].d_out] if members else [0]
        wrong = [f"{p.module} is " + ("whole here, cut into blocks in the file" if p.side == "none" else
                                      "cut into blocks here, whole in the file")
                 for p in members if (p.side == "none") != (p.module in whole)]
        if shape != entry["shape"] or wrong:
            problem = _listing(wrong) if wrong else f"shape {shape}, not {entry['shape']}"
            raise FactnetError(f"{path}: the slice map of group {group!r} does not match this model's matrices "
                               f"({problem}); the file was not written by adapter.save() for this model")
    return tensorizer


def _cut_blocks(matrix: Mapping[str, Any]) -> int:
    d_out, d_in = matrix["d_out"], matrix["d_in"]
    longer, shorter = max(d_out, d_in), min(d_out, d_in)
    return longer // shorter if d_out != d_in and longer % shorter == 0 else 1


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


def _check_tensors(head: Mapping[str, nn.Parameter], spec: dict[str, Any], fmt: Format, tensorizer: Tensorizer,
                   tensors: Mapping[str, Tensor], head_parameters: list[str], path: str) -> None:
    """The file holds exactly the factors the format needs and the model's head parameters (``head``), of
    their shapes."""
    expected = {f"factors.{group}.{factor}": shape for group, dims in tensorizer.group_shapes().items()
                for factor, shape in fmt.shapes(*dims).items()}
    if head_parameters:
        if sorted(head) != sorted(head_parameters):
            raise FactnetError(f"the model's head {spec['head']} has parameters {sorted(head)[:_SHOWN]}, but {path} "
                               f"saved {sorted(head_parameters)[:_SHOWN]}; load onto the architecture it was saved "
                               "from, or save with include_head=False")
        expected |= {f"head.{p}": tuple(head[p].shape) for p in head}
    wrong = [f"{key}: expected {shape}, " + ("missing" if key not in tensors else f"got {tuple(tensors[key].shape)}")
             for key, shape in expected.items() if key not in tensors or tuple(tensors[key].shape) != shape]
    wrong += [f"{key}: unexpected" for key in tensors if key not in expected]
    wrong += [f"{key}: {value.dtype} is not floating point" for key, value in tensors.items()
              if not value.is_floating_point()]
    if wrong:
        raise FactnetError(f"{path} does not hold the tensors this model needs ({fmt.name} rank {fmt.rank}): "
                           f"{_listing(wrong)}; load onto the architecture it was saved from (same head size)")


def _check_dtypes(model: nn.Module, spec: dict[str, Any], tensors: Mapping[str, Tensor],
                  head: Mapping[str, nn.Parameter], head_parameters: list[str], path: str) -> None:
    """As saved (``dtype`` null, or version 1): the tensors have the model's dtypes. With a storage dtype:
    every tensor has it (`_attach` casts them)."""
    storage = spec.get("dtype")
    if storage is not None:
        wrong = [key for key, value in tensors.items() if value.dtype != STORAGE_DTYPES[storage]]
        if wrong:
            raise _malformed(path, f"its spec says it stores {storage}, but {wrong[0]} is "
                                   f"{tensors[wrong[0]].dtype}")
        return
    wanted = {key: factor_dtype(model) for key in tensors if key.startswith("factors.")}
    wanted |= {f"head.{p}": head[p].dtype for p in head_parameters}
    wrong = [(dtype, tensors[key].dtype) for key, dtype in wanted.items() if tensors[key].dtype != dtype]
    if wrong:
        raise FactnetError(f"{path} holds {wrong[0][1]} tensors but the model would take {wrong[0][0]} ({len(wrong)} "
                           f"tensors differ); cast the model to {wrong[0][1]} before load (e.g. model.float())")


def _check_settings(model: nn.Module, spec: dict[str, Any], fmt: Format, tensorizer: Tensorizer) -> None:
    """What `Tensorizer.decompose` would reject, checked before anything is attached (`load_many`)."""
    scale, dropout = spec["scale"], spec["dropout"]
    if not (isinstance(scale, (int, float)) and torch.isfinite(torch.tensor(float(scale)))):
        raise FactnetError(f"scale must be a finite number, got {scale!r}")
    if not 0.0 <= dropout < 1.0:
        raise FactnetError(f"dropout must be in [0, 1), got {dropout!r}")
    for group, shape in tensorizer.group_shapes().items():
        limit = fmt.max_rank(*shape)
        if fmt.rank > limit:
            raise FactnetError(f"rank {fmt.rank} exceeds the {fmt.name} limit {limit} of group {group!r}")
    keys = [_key(group) for group in tensorizer.groups]
    if len(set(keys)) != len(keys):
        raise FactnetError(f"group names {list(tensorizer.groups)} collide once dots become underscores; rename them")
    unknown = []
    for head in spec["head"]:
        try:
            model.get_submodule(head) if head else unknown.append(head)
        except AttributeError:
            unknown.append(head)
    if unknown:
        raise FactnetError(f"head {unknown} is not a submodule of the model")
