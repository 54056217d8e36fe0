"""Save an adapter to one safetensors file and rebuild it on a fresh copy of the base model.

The file holds the tensors ``factors.<group>.<factor>`` and, unless ``include_head=False``,
``head.<parameter name>``, as they are, and two metadata entries: ``"factnet"``, the spec as
JSON (format, rank, factor letters, scale, dropout, head, the slice map of every group, the
shapes of all the base model's matrices outside the head, ``factnet_format_version``), and
``"factnet.sha256"``, a SHA-256 of that JSON and every tensor. `load` trusts nothing before the
checksum matches, so a truncated, corrupt or foreign file is a `FactnetError`, and it never
unpickles (safetensors is raw tensor bytes plus a JSON header). Writes go to a temporary file
next to the target, are fsynced and renamed over it: a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from factnet.adapter import Adapter, _in_head, factor_dtype
from factnet.adapter_set import AdapterSet
from factnet.attach import AdaptedMatrix
from factnet.errors import FactnetError
from factnet.formats import Format, available_formats, get_format
from factnet.slices import Slice, find_matrices
from factnet.tensorizer import Tensorizer

__all__ = ["FORMAT_VERSION", "load", "load_spec", "save", "write_atomically"]

FORMAT_VERSION = 1
SPEC_KEY = "factnet"
CHECKSUM_KEY = "factnet.sha256"
_SHOWN = 5  # mismatches listed in an error

# The spec's JSON layout: a type, [item layout], {key: layout} (exactly these keys) or {str: layout}.
_SPEC_LAYOUT: dict[Any, Any] = {
    "factnet_format_version": int, "factnet_version": str, "format": str, "rank": int, "factors": {str: str},
    "scale": float, "dropout": float, "head": [str], "head_parameters": [str],
    "matrices": {str: {"kind": str, "d_out": int, "d_in": int}},
    "groups": {str: {"shape": [int], "slices": [{"module": str, "block": int, "side": str, "offset": int}]}},
}


# ---- the spec --------------------------------------------------------------------------------
def _matrices(model: nn.Module, head: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {kind, d_out, d_in}}`` (linear convention) of every matrix of ``model`` outside ``head``,
    adapted ones included: the architecture an adapter file fits."""
    found = find_matrices(model) + [m.matrix for m in model.modules() if isinstance(m, AdaptedMatrix)]
    return {m.name: {"kind": m.kind, "d_out": m.d_out, "d_in": m.d_in} for m in found
            if not any(m.name == h or m.name.startswith(h + ".") for h in head)}


def _slice_map(groups: Mapping[str, Sequence[Slice]]) -> dict[str, dict[str, Any]]:
    """``{group: {shape: [n, d_in, d_out], slices: [...]}}``; a slice is block ``block`` of ``module``, cut
    along ``side`` ("out", "in" or "none"), starting at row/column ``offset`` of the ``(d_out, d_in)`` weight."""
    def entry(s: Slice) -> dict[str, Any]:
        offset = s.index * {"out": s.d_out, "in": s.d_in}.get(s.side, 0)
        return {"module": s.module, "block": s.index, "side": s.side, "offset": offset}

    return {name: {"shape": [len(members), members[0].d_in, members[0].d_out], "slices": [entry(s) for s in members]}
            for name, members in groups.items()}


def _spec(adapter: Adapter, head_parameters: list[str]) -> dict[str, Any]:
    from factnet import __version__

    fmt, settings = adapter.format, adapter.settings
    return {
        "factnet_format_version": FORMAT_VERSION, "factnet_version": __version__,
        "format": fmt.name, "rank": fmt.rank, "factors": dict(fmt.factors),
        "scale": settings.scale, "dropout": settings.dropout,
        "head": list(adapter.head), "head_parameters": head_parameters,
        "matrices": _matrices(adapter.model, adapter.head),
        "groups": _slice_map({name: adapter.group(name).slices for name in adapter.group_names}),
    }


def _fits(value: Any, layout: Any) -> bool:
    """Whether decoded JSON ``value`` has ``layout`` (see `_SPEC_LAYOUT`)."""
    if layout is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(layout, type):
        return isinstance(value, layout) and not isinstance(value, bool)
    if isinstance(layout, list):
        return isinstance(value, list) and all(_fits(v, layout[0]) for v in value)
    if not isinstance(value, dict):
        return False
    if list(layout) == [str]:
        return all(_fits(v, layout[str]) for v in value.values())
    return value.keys() == layout.keys() and all(_fits(value[k], sub) for k, sub in layout.items())


def _parse_spec(text: str, path: str) -> dict[str, Any]:
    """The spec's JSON, checked for its version and layout (not yet against a model)."""
    try:
        spec = json.loads(text)
    except ValueError:
        spec = None
    version = spec.get("factnet_format_version") if isinstance(spec, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise FactnetError(f"{path} has factnet_format_version {version}, but this factnet reads version "
                           f"{FORMAT_VERSION}; upgrade factnet to load it")
    if version != FORMAT_VERSION or not _fits(spec, _SPEC_LAYOUT) or not spec["groups"]:
        raise FactnetError(f"{path} has a malformed factnet spec (expected the JSON layout of factnet_format_version "
                           f"{FORMAT_VERSION} with at least one group); it was not written by adapter.save()")
    unlisted = {s["module"] for group in spec["groups"].values() for s in group["slices"]} - set(spec["matrices"])
    if unlisted:
        raise FactnetError(f"{path} has a malformed factnet spec: its groups use matrices {sorted(unlisted)[:_SHOWN]} "
                           "it does not list; it was not written by adapter.save()")
    return spec


# ---- save ------------------------------------------------------------------------------------
def save(adapter: Adapter, path: str | os.PathLike[str], include_head: bool = True) -> None:
    """Write ``adapter`` to ``path``: one safetensors file, atomically (see the module doc).

    From a model sharded with FSDP2 (``fully_shard``), call it on every rank: the full factors are
    gathered and rank 0 writes the one file.

    Holds the factors and, unless ``include_head=False``, the parameters of the trainable head;
    the size is the tensors' bytes (4 per float32 parameter) plus the JSON header (15 KiB for ViT-B).
    """
    if not isinstance(adapter, Adapter):
        raise FactnetError(f"save needs a factnet Adapter, got {type(adapter).__name__}")
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
    tensors = {key: _full(value).detach().cpu().contiguous() for key, value in tensors.items()}
    if sharded and torch.distributed.get_rank() != 0:  # FSDP2: every rank gathers, rank 0 writes
        torch.distributed.barrier()
        return
    text = json.dumps(_spec(adapter, list(head)), separators=(",", ":"), allow_nan=False)
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
    """The spec of an adapter file as a dict (checked like `load` does, without a model)."""
    return _read(_fspath(path))[0]


def load(model: nn.Module, path: str | os.PathLike[str], name: str = "default") -> Adapter:
    """Rebuild the adapter saved at ``path`` on ``model`` (the base model, possibly carrying other
    adapters) as adapter ``name`` of ``model.factnet``, and return it, active, with its factors and
    (if saved) head exactly as saved.

    ``model`` must have the saved model's matrices (outside the head: no more, no fewer, of the same
    kinds and shapes) and its dtype, and a user-defined format must be imported first. On any error
    the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise FactnetError(f"load needs a torch.nn.Module, got {type(model).__name__}")
    AdapterSet.check_addable(model, name)
    adapter_name, name = name, _fspath(path)
    spec, tensors = _read(name)
    fmt = _registered_format(spec)
    _check_matrices(model, spec, name)
    group_of = {(s["module"], s["block"]): group for group, entry in spec["groups"].items() for s in entry["slices"]}
    blocks: dict[str, list[str]] = {}
    for module, block in group_of:
        blocks.setdefault(module, []).append(str(block))
    tensorizer = Tensorizer(model, [f"{module}[{','.join(b)}]" for module, b in blocks.items()])
    tensorizer = tensorizer.group(lambda piece: group_of[(piece.module, piece.index)])
    rebuilt = _slice_map(tensorizer.groups)
    if rebuilt != spec["groups"]:
        wrong = [g for g in spec["groups"] if rebuilt.get(g) != spec["groups"][g]]
        raise FactnetError(f"{name}: the slice map of groups {wrong[:_SHOWN]} does not match this model's matrices "
                           "(block offsets or shapes differ); the file was not written by adapter.save()")
    _check_tensors(model, spec, fmt, tensorizer, tensors, name)
    params = dict(model.named_parameters())
    wanted = {key: factor_dtype(model) for key in tensors if key.startswith("factors.")}
    wanted |= {f"head.{p}": params[p].dtype for p in spec["head_parameters"]}
    wrong = [(dtype, tensors[key].dtype) for key, dtype in wanted.items() if tensors[key].dtype != dtype]
    if wrong:
        raise FactnetError(f"{name} holds {wrong[0][1]} tensors but the model would take {wrong[0][0]} ({len(wrong)} "
                           f"tensors differ); cast the model to {wrong[0][1]} before load (e.g. model.float())")
    adapter = tensorizer.decompose(fmt, scale=spec["scale"], dropout=spec["dropout"], head=spec["head"],
                                   train_head=bool(spec["head"]), seed=0,  # seed: leave the global RNG alone
                                   name=adapter_name)
    pairs = [(factor, tensors[f"factors.{group}.{key}"])
             for group in adapter.group_names for key, factor in adapter.group(group).factors.items()]
    pairs += [(params[p], tensors[f"head.{p}"]) for p in spec["head_parameters"]]
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)
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
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
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


def _check_matrices(model: nn.Module, spec: dict[str, Any], path: str) -> None:
    """``model`` has the saved base model's matrices (outside the head), no more, no fewer, of the same
    kind and shape; else list the first mismatches."""
    found, saved = _matrices(model, spec["head"]), spec["matrices"]

    def describe(m: dict[str, Any] | None) -> str:
        return "missing" if m is None else f"{m['kind']} {m['d_out']}x{m['d_in']}"

    wrong = [f"{name}: saved {describe(saved.get(name))}, model has {describe(found.get(name))}"
             for name in [*saved, *(n for n in found if n not in saved)] if saved.get(name) != found.get(name)]
    if wrong:
        raise FactnetError(f"{path} does not fit this model: {len(wrong)} matrices differ (d_out x d_in): "
                           f"{_listing(wrong)}; load it onto the architecture it was saved from (same depth and "
                           "width)")


def _check_tensors(model: nn.Module, spec: dict[str, Any], fmt: Format, tensorizer: Tensorizer,
                   tensors: Mapping[str, Tensor], path: str) -> None:
    """The file holds exactly the factors the format needs and the model's head parameters, of their shapes."""
    expected = {f"factors.{group}.{factor}": shape for group, dims in tensorizer.group_shapes().items()
                for factor, shape in fmt.shapes(*dims).items()}
    if spec["head_parameters"]:
        params = dict(model.named_parameters())
        head = sorted(p for p in params if _in_head(p, spec["head"]))
        if head != sorted(spec["head_parameters"]):
            raise FactnetError(f"the model's head {spec['head']} has parameters {head[:_SHOWN]}, but {path} saved "
                               f"{sorted(spec['head_parameters'])[:_SHOWN]}; load onto the architecture it was saved "
                               "from, or save with include_head=False")
        expected |= {f"head.{p}": tuple(params[p].shape) for p in head}
    wrong = [f"{key}: expected {shape}, " + ("missing" if key not in tensors else f"got {tuple(tensors[key].shape)}")
             for key, shape in expected.items() if key not in tensors or tuple(tensors[key].shape) != shape]
    wrong += [f"{key}: unexpected" for key in tensors if key not in expected]
    wrong += [f"{key}: {value.dtype} is not floating point" for key, value in tensors.items()
              if not value.is_floating_point()]
    if wrong:
        raise FactnetError(f"{path} does not hold the tensors this model needs ({fmt.name} rank {fmt.rank}): "
                           f"{_listing(wrong)}; load onto the architecture it was saved from (same head size)")
