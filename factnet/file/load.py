"""Rebuilding an adapter from its file on a fresh copy of the base model (`load`, `load_many`).

The file holds the factors, the head and a JSON spec (`factnet.file.spec`): its groups' slice maps (as name
templates, or the rule that gives them from the model's default targets) and a fingerprint of the base model.
`load` reads it verified (`factnet.file.info`), checks the model against the spec (`factnet.file.compat`),
rebuilds the slices on the model (`factnet.file.rebuild`), splits the packed tensors by them (version 4,
`factnet.file.packs`) and attaches the adapter; on any error the model is left unchanged. Files of every
version, 1 to 4, load.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from factnet.adapter import Adapter
from factnet.adapter_set import AdapterSet
from factnet.errors import FactnetError
from factnet.file.compat import check_base, check_dtypes, check_settings, check_tensors, registered_format
from factnet.file.container import file_path
from factnet.file.info import read
from factnet.file.packs import factor_shapes, unpack
from factnet.file.rebuild import rebuild_default, rebuild_listed, rebuild_templates
from factnet.file.spec import Spec, base_matrices
from factnet.formats import Format
from factnet.heads import in_head
from factnet.tensorizer import Tensorizer

__all__ = ["load", "load_many"]


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
    path = file_path(path)
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
    files = [file_path(p) for p in paths]
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
        heads = {p: value.detach().clone() for head in {tuple(item.spec.head) for item in loaded}
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
    spec: Spec
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
            self.matrices[key] = base_matrices(self.model, head)
        return self.matrices[key]

    def head_parameters(self, head: Sequence[str]) -> dict[str, nn.Parameter]:
        if self.parameters is None:
            self.parameters = {n: p for n, p in self.model.named_parameters() if not n.startswith("factnet.")}
        key = tuple(head)
        if key not in self.heads:
            self.heads[key] = {n: p for n, p in self.parameters.items() if in_head(n, head)}
        return self.heads[key]


def _prepare(model: nn.Module, path: str, caches: _Caches) -> _Loaded:
    """Read ``path`` and check it against ``model`` (nothing is changed)."""
    spec, tensors = read(path)
    fmt = registered_format(spec)
    if (tuple(spec.head), spec.base["sha256"]) not in caches.checked:
        check_base(caches.matrices_of(spec.head), spec, path)
        caches.checked.add((tuple(spec.head), spec.base["sha256"]))
    if spec.default_groups is not None:  # the model's default targets, grouped by a rule
        key: tuple = ("default", spec.default_groups["by"], spec.default_groups["sha256"])
        build = rebuild_default
    elif spec.listed is not None:
        key, build = ("listed", json.dumps(spec.listed, sort_keys=True)), rebuild_listed
    else:
        key, build = ("templates", json.dumps(spec.groups, sort_keys=True)), rebuild_templates
    if key not in caches.tensorizers:
        caches.tensorizers[key] = build(model, spec, path, caches.matrices_of(spec.head))
    tensorizer = caches.tensorizers[key]
    if spec.packed:  # the packs split: the factors' shapes from the format and the slices, in the file's order
        shapes = tensorizer.group_shapes()
        tensors = unpack(spec, tensors, factor_shapes(fmt, {g: shapes[g] for g in spec.groups or shapes}), path)
    head_parameters = spec.head_parameters if spec.head_parameters is not None else [
        key[len("head."):] for key in tensors if key.startswith("head.")]
    head = caches.head_parameters(spec.head)
    check_tensors(head, spec, fmt, tensorizer, tensors, head_parameters, path)
    check_dtypes(model, spec, tensors, head, head_parameters, path)
    check_settings(model, spec, fmt, tensorizer)
    return _Loaded(path, spec, fmt, tensorizer, tensors, head_parameters)


def _attach(model: nn.Module, loaded: _Loaded, name: str) -> Adapter:
    """Add the adapter of a checked file to ``model`` as ``name``, its factors and head values in before it
    joins ``model.factnet``: other threads' calls find it whole or not at all. Built directly, not by
    `Tensorizer.decompose`, whose checks `check_settings` made (decompose walks every module of the model,
    adapters included, to find the head: quadratic over 1,000 adapters)."""
    spec, tensors = loaded.spec, loaded.tensors
    values_per_scale = (spec.bits or {"group": 64})["group"]  # (trained on at the file's bits: saved the same)
    adapter = Adapter(model, loaded.tensorizer.groups, spec.config, spec.scale, name,  # (a seed: the global RNG
                      torch.Generator().manual_seed(0), register=False, group=values_per_scale)  # stays)
    for group in adapter.group_names:
        adapter.group(group).assign({key: tensors[f"factors.{group}.{key}"]  # (cast from a storage dtype)
                                     for key in adapter.group(group).factors})
    adapters = AdapterSet.of(model)
    with adapters.traffic.lock:  # (the head's values in before another thread's call can take the adapter)
        adapters.add(name, adapter)
        adapters.heads.load({p: tensors[f"head.{p}"] for p in loaded.head_parameters})  # (cast by copy_)
    return adapter


def _warn_mha_dropout(loaded: Sequence[_Loaded]) -> None:
    if any(item.spec.dropout > 0 and any(s.matrix.rules.applied_as_weight for s in item.tensorizer.slices)
           for item in loaded):
        warnings.warn("factor-space dropout does not reach nn.MultiheadAttention matrices: their increment is "
                      "applied as a merged weight", stacklevel=3)
