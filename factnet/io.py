"""Saving an adapter and rebuilding it on a fresh copy of the base model (`load`, `load_many`).

The file (`factnet.files`) holds the factors, the head and a JSON spec (`factnet.spec`): its groups'
slice maps (as name templates, or the rule that gives them from the model's default targets) and a
fingerprint of the base model. `load` reads it verified, checks the model against the spec
(`factnet.fit`), rebuilds the slices on the model, splits the packed tensors by them (version 4) and
attaches the adapter; on any error the model is left unchanged. Files of every version, 1 to 4, load.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from factnet.adapter import Adapter, _in_head
from factnet.adapter_set import AdapterSet
from factnet.config import spec_config
from factnet.errors import FactnetError
from factnet.files import (
    Saved,
    _fspath,
    factor_shapes,
    file_info,
    load_spec,
    read,
    unpack,
    write,
    write_atomically,
)
from factnet.fit import (
    _check_base,
    _check_dtypes,
    _check_matrices,
    _check_settings,
    _check_tensors,
    _cut_blocks,
    _listing,
    _registered_format,
)
from factnet.formats import Format
from factnet.spec import (
    _SHOWN,
    FORMAT_VERSION,
    STORAGE_DTYPES,
    _malformed,
    _matrices,
    _parse_template,
    _slice_map,
    groups_digest,
)
from factnet.tensorizer import Tensorizer

__all__ = ["FORMAT_VERSION", "STORAGE_DTYPES", "file_info", "load", "load_many", "load_spec", "save",
           "write_atomically"]


def save(adapter: Adapter, path: str | os.PathLike[str], include_head: bool = True,
         dtype: torch.dtype | None = None, *, bits: int | None = None, head_bits: int | None = None,
         group: int = 64) -> Saved:
    """Write ``adapter`` to ``path``: one safetensors file, atomically (see the module doc).

    From a model sharded with FSDP2 (``fully_shard``), call it on every rank: the full factors are
    gathered and rank 0 writes the one file.

    Holds the factors and, unless ``include_head=False``, the parameters of the trainable head, as they
    are (``dtype=None``) or cast to ``dtype`` (``torch.float16``, ``torch.bfloat16``, ``torch.float32`` or
    ``torch.float64``): ``torch.bfloat16`` stores 2 bytes a parameter, and `load` casts the values back to
    the model's dtypes. The size is the tensors' bytes plus the header: the tensors are packed, one per
    dtype, and the spec names the default targets by their grouping rule instead of listing them (format
    version 4, `factnet.files`): with the default targets the header is 500 to 700 bytes (ViT-B,
    EfficientNet-Lite0 and every family of tests/zoo.py); other slices are listed as templates, which add their
    length.

    ``bits`` (1, 2, 4 or 8) stores the factors low-bit, ``head_bits`` the head: ``bits``-bit codes with a
    float16 scale (and offset) per ``group`` values (`factnet.quant`), about ``bits/8`` bytes a parameter;
    `load` reads them back as float32 values, exactly the stored ones, into the model's dtypes. Returns the file's path and size and, per low-bit tensor, the relative
    error of its stored values (`factnet.files.Saved`).
    """
    if not isinstance(adapter, Adapter):
        raise FactnetError(f"save needs a factnet Adapter, got {type(adapter).__name__}")
    return write(adapter, path, include_head, dtype, bits, head_bits, group)


# ---- load ------------------------------------------------------------------------------------
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
    _warn_mha_dropout([loaded])
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
        _warn_mha_dropout(loaded)
        bar.reset()
        bar.set_description("load_many: attach")
        previous = model.factnet.active if isinstance(getattr(model, "factnet", None), AdapterSet) else None
        heads = {p: value.detach().clone() for head in {tuple(item.spec['head']) for item in loaded}
                 for p, value in caches.head_parameters(head).items()}
        adapters: dict[str, Adapter] = {}
        try:
            for position, name in enumerate(names):
                adapters[name] = _attach(model, loaded[position], name)
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
    spec, tensors = read(path)
    fmt = _registered_format(spec)
    version = spec["factnet_format_version"]
    listing = json.dumps(spec["matrices"], sort_keys=True) if version == 1 else spec["base"]["sha256"]
    if (tuple(spec["head"]), listing) not in caches.checked:
        (_check_matrices if version == 1 else _check_base)(caches.matrices_of(spec["head"]), spec, path)
        caches.checked.add((tuple(spec["head"]), listing))
    if "default_groups" in spec:  # (version 4: the model's default targets, grouped by a rule)
        key: tuple = ("default", spec["default_groups"]["by"], spec["default_groups"]["sha256"])
        build = _rebuild_default
    else:  # (versions 3 and 4 have version 2's slice maps)
        key = (min(version, 2), json.dumps(spec["groups"], sort_keys=True))
        build = _rebuild_v1 if version == 1 else _rebuild
    if key not in caches.tensorizers:
        caches.tensorizers[key] = build(model, spec, path, caches.matrices_of(spec["head"]))
    tensorizer = caches.tensorizers[key]
    if version == 4:  # the packs split: the factors' shapes from the format and the slices, in the file's order
        shapes = tensorizer.group_shapes()
        tensors = unpack(spec, tensors, factor_shapes(fmt, {g: shapes[g] for g in spec.get("groups", shapes)}), path)
    if version == 1:
        head_parameters = list(spec["head_parameters"])
    else:
        head_parameters = [key[len("head."):] for key in tensors if key.startswith("head.")]
    head = caches.head_parameters(spec["head"])
    _check_tensors(head, spec, fmt, tensorizer, tensors, head_parameters, path)
    _check_dtypes(model, spec, tensors, head, head_parameters, path)
    _check_settings(model, spec, fmt, tensorizer)
    return _Loaded(path, spec, fmt, tensorizer, tensors, head_parameters)


def _attach(model: nn.Module, loaded: _Loaded, name: str) -> Adapter:
    """Add the adapter of a checked file to ``model`` as ``name``, its factors and head values in before it
    joins ``model.factnet``: other threads' calls find it whole or not at all. Built directly, not by
    `Tensorizer.decompose`, whose checks `_check_settings` made (decompose walks every module of the model,
    adapters included, to find the head: quadratic over 1,000 adapters)."""
    spec, tensors = loaded.spec, loaded.tensors
    values_per_scale = spec.get("bits", {"group": 64})["group"]  # (trained on at the file's bits: saved the same)
    adapter = Adapter(model, loaded.tensorizer.groups, spec_config(spec), spec["scale"], name,  # (a seed: the
                      torch.Generator().manual_seed(0), register=False, group=values_per_scale)  # global RNG stays)
    for group in adapter.group_names:
        adapter.group(group).assign({key: tensors[f"factors.{group}.{key}"]  # (cast from a storage dtype)
                                     for key in adapter.group(group).factors})
    if loaded.head_parameters:
        adapter._head_state = {}
        for p in loaded.head_parameters:
            param = model.get_parameter(p)
            adapter._head_state[p] = tensors[f"head.{p}"].to(device=param.device, dtype=param.dtype)  # (`add` copies it in)
    AdapterSet.of(model).add(name, adapter)
    return adapter


def _warn_mha_dropout(loaded: Sequence[_Loaded]) -> None:
    if any(item.spec.get("dropout", 0.0) > 0 and any(s.matrix.kind.startswith("mha") for s in item.tensorizer.slices)
           for item in loaded):
        warnings.warn("factor-space dropout does not reach nn.MultiheadAttention matrices: their increment is "
                      "applied as a merged weight", stacklevel=3)


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


def _rebuild_default(model: nn.Module, spec: dict[str, Any], path: str, matrices: dict[str, Any]) -> Tensorizer:
    """Version 4, ``default_groups``: the model's default targets grouped by the spec's rule, checked against
    the digest of the slice map they were saved with."""
    rule = spec["default_groups"]
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
                           f"({spec['factnet_version']}) or one whose default targets are the same")
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


