"""Whether an adapter file fits the model it is loaded onto: the checks `factnet.file.load` runs on a file
read and verified (`factnet.file.info`) before it changes anything, each an error that says what differs.

The base model's fingerprint first (`check_base`, which explains a mismatch by the matrices a version-1
file lists, else as far as the slice map tells). Then the
tensors (`check_tensors`, `check_dtypes`) and what `Tensorizer.decompose` would reject
(`check_settings`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from factnet.adapter import factor_dtype, group_key
from factnet.errors import FactnetError
from factnet.file.packs import factor_shapes
from factnet.file.spec import Spec, base_of
from factnet.file.validate import SHOWN, STORAGE_DTYPES, malformed
from factnet.file.templates import parse_template, runs
from factnet.formats import Format, available_formats, get_format
from factnet.tensorizer import Tensorizer

__all__ = ["check_base", "check_dtypes", "check_settings", "check_tensors", "cut_blocks", "listing",
           "registered_format"]


def registered_format(spec: Spec) -> Format:
    """The registered `Format` the spec names, with the factor letters it was saved with."""
    if spec.format not in available_formats():
        raise FactnetError(f"the adapter's format {spec.format!r} is not registered (known formats: "
                           f"{', '.join(available_formats())}); import the module defining that Format subclass "
                           "before load")
    fmt = get_format(spec.format, spec.rank)
    registered = ",".join(fmt.factors.values()) if isinstance(spec.factors, str) else dict(fmt.factors)
    if registered != spec.factors:
        raise FactnetError(f"format {fmt.name!r} is registered with factors {fmt.factors}, but the adapter was "
                           f"saved with {spec.factors}; load with the definition it was saved with")
    return fmt


def listing(wrong: list[str]) -> str:
    """The first `SHOWN` mismatches, and how many more there are."""
    more = f"; and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else ""
    return "; ".join(wrong[:SHOWN]) + more


def _check_listing(found: dict[str, dict[str, Any]], saved: dict[str, dict[str, Any]], path: str) -> None:
    """Version 1: the model's matrices ``found`` (outside the head) are the ``saved`` base model's, no more, no
    fewer, of the same kind and shape; else list the first mismatches."""

    def describe(m: dict[str, Any] | None) -> str:
        return "missing" if m is None else f"{m['kind']} {m['d_out']}x{m['d_in']}"

    wrong = [f"{name}: saved {describe(saved.get(name))}, model has {describe(found.get(name))}"
             for name in [*saved, *(n for n in found if n not in saved)] if saved.get(name) != found.get(name)]
    if wrong:
        raise FactnetError(f"{path} does not fit this model: {len(wrong)} matrices differ (d_out x d_in): "
                           f"{listing(wrong)}; load it onto the architecture it was saved from (same depth and "
                           "width)")


def check_base(found: dict[str, dict[str, Any]], spec: Spec, path: str) -> None:
    """The model's matrices ``found`` (outside the head) have the saved base model's fingerprint; else say how
    they differ as far as the spec tells: which matrices differ where the file lists them (version 1), else the
    counts, and which of the matrices the file adapts (its slice map: module, blocks, block shape) the model
    lacks or has of another shape."""
    saved, base = spec.base, base_of(found)
    if saved["sha256"] == base["sha256"]:
        return
    if spec.matrices is not None:  # (version 1 lists them: which differ)
        _check_listing(found, spec.matrices, path)
        return
    if spec.groups is None:  # (version 4's default_groups: the file names no matrix)
        raise FactnetError(f"{path} does not fit this model: it was saved from a base model with {saved['matrices']} "
                           f"matrices outside the head (fingerprint {saved['sha256']}), this model has "
                           f"{base['matrices']} (fingerprint {base['sha256']}); it adapts that model's default targets "
                           f"(grouped by {spec.default_groups['by']}); load it onto the architecture it was saved "
                           "from (same depth, width and module names)")
    adapted: dict[str, tuple[set[int], int, int, bool]] = {}  # module -> (blocks, d_out, d_in, cut) as saved
    for group in spec.groups.values():
        _, d_in, d_out = group["shape"]
        for text in group["slices"]:
            template = parse_template(text)
            for module, block in itertools.islice(template.expand(), 100_000):  # type: ignore[union-attr]
                blocks = adapted.setdefault(module, (set(), d_out, d_in, template.blocks is not None))[0]  # type: ignore[union-attr]
                blocks.add(block)

    def differs(module: str) -> str | None:
        chosen, d_out, d_in, cut = adapted[module]
        last = max(chosen)
        was = f"blocks {runs(chosen)} of {d_out}x{d_in}" if cut else f"{d_out}x{d_in}"
        matrix = found.get(module)
        if matrix is None:
            return f"{module}: saved {was}, model has missing"
        blocks = cut_blocks(matrix)
        size = (matrix["d_out"] // blocks, matrix["d_in"]) if matrix["d_out"] > matrix["d_in"] else (
            matrix["d_out"], matrix["d_in"] // blocks)
        if size == (d_out, d_in) and blocks > last and (blocks > 1) == cut:
            return None
        return f"{module}: saved {was}, model has {matrix['kind']} {matrix['d_out']}x{matrix['d_in']}"

    wrong = [w for w in map(differs, adapted) if w is not None]
    detail = (f"; of the {len(adapted)} matrices it adapts, {len(wrong)} differ (d_out x d_in): {listing(wrong)}"
              if wrong else f"; the {len(adapted)} matrices it adapts match")
    patterns = [re.compile(r"\.".join(re.escape(s) if isinstance(s, str) else "[0-9]+"
                                      for s in parse_template(text).segments))  # type: ignore[union-attr]
                for group in spec.groups.values() for text in group["slices"]]
    extra = [f"{name}: {m['kind']} {m['d_out']}x{m['d_in']}" for name, m in found.items()
             if name not in adapted and any(p.fullmatch(name) for p in patterns)]
    if extra:
        detail += (f"; this model also has {len(extra)} matrices named like those but not in the file's slice map: "
                   f"{listing(extra)}")
    elif not wrong:
        detail += ", so others differ"
    raise FactnetError(f"{path} does not fit this model: it was saved from a base model with {saved['matrices']} "
                       f"matrices outside the head (fingerprint {saved['sha256']}), this model has {base['matrices']} "
                       f"(fingerprint {base['sha256']}){detail}; load it onto the architecture it was saved from "
                       "(same depth, width and module names)")


def cut_blocks(matrix: Mapping[str, Any]) -> int:
    """How many blocks a matrix ``{kind, d_out, d_in}`` is cut into: the longer side over the shorter where that
    divides, else 1 (whole)."""
    d_out, d_in = matrix["d_out"], matrix["d_in"]
    longer, shorter = max(d_out, d_in), min(d_out, d_in)
    return longer // shorter if d_out != d_in and longer % shorter == 0 else 1


def check_tensors(head: Mapping[str, nn.Parameter], spec: Spec, fmt: Format, tensorizer: Tensorizer,
                   tensors: Mapping[str, Tensor], head_parameters: list[str], path: str) -> None:
    """The file holds exactly the factors the format needs and the model's head parameters (``head``), of
    their shapes."""
    expected = factor_shapes(fmt, tensorizer.group_shapes())
    seeded = [key for key in tensors if key.startswith("factors.") and key.split(".")[-1] in fmt.seeded]
    if seeded:
        raise FactnetError(f"{path} stores values for seeded factors {listing(seeded)} of format {fmt.name!r}: they "
                           "are regenerated from the spec's seed, never trained or stored; this file was not written "
                           "by adapter.save()")
    if head_parameters:
        if sorted(head) != sorted(head_parameters):
            raise FactnetError(f"the model's head {spec.head} has parameters {sorted(head)[:SHOWN]}, but {path} "
                               f"saved {sorted(head_parameters)[:SHOWN]}; load onto the architecture it was saved "
                               "from, or save with include_head=False")
        expected |= {f"head.{p}": tuple(head[p].shape) for p in head}
    wrong = [f"{key}: expected {shape}, " + ("missing" if key not in tensors else f"got {tuple(tensors[key].shape)}")
             for key, shape in expected.items() if key not in tensors or tuple(tensors[key].shape) != shape]
    wrong += [f"{key}: unexpected" for key in tensors if key not in expected]
    wrong += [f"{key}: {value.dtype} is not floating point" for key, value in tensors.items()
              if not value.is_floating_point()]
    wrong += [f"{key}: holds NaN or infinite values (a diverged run)" for key, value in tensors.items()
              if value.is_floating_point() and not torch.isfinite(value).all()]
    if wrong:
        raise FactnetError(f"{path} does not hold the tensors this model needs ({fmt.name} rank {fmt.rank}): "
                           f"{listing(wrong)}; load onto the architecture it was saved from (same head size)")


def check_dtypes(model: nn.Module, spec: Spec, tensors: Mapping[str, Tensor],
                  head: Mapping[str, nn.Parameter], head_parameters: list[str], path: str) -> None:
    """As saved (``dtype`` null, or version 1): the tensors have the model's dtypes. With a storage dtype:
    every tensor has it (`factnet.file.load` casts them)."""
    storage = spec.dtype
    bits = spec.bits or {}  # low-bit tensors are read back as float32 values, cast exactly by `factnet.file.load`
    low_bit = spec.low_bit if spec.low_bit is not None else [k for k in tensors if bits.get(k.partition(".")[0])
                                                                    is not None]
    tensors = {key: value for key, value in tensors.items() if key not in low_bit}
    head_parameters = [p for p in head_parameters if f"head.{p}" not in low_bit]
    if storage is not None:
        wrong = [key for key, value in tensors.items() if value.dtype != STORAGE_DTYPES[storage]]
        if wrong:
            raise malformed(path, f"its spec says it stores {storage}, but {wrong[0]} is "
                                  f"{tensors[wrong[0]].dtype}")
        return
    wanted = {key: factor_dtype(model) for key in tensors if key.startswith("factors.")}
    wanted |= {f"head.{p}": head[p].dtype for p in head_parameters}
    wrong = [(dtype, tensors[key].dtype) for key, dtype in wanted.items() if tensors[key].dtype != dtype]
    if wrong:
        raise FactnetError(f"{path} holds {wrong[0][1]} tensors but the model would take {wrong[0][0]} ({len(wrong)} "
                           f"tensors differ); cast the model to {wrong[0][1]} before load (e.g. model.float())")


def check_settings(model: nn.Module, spec: Spec, fmt: Format, tensorizer: Tensorizer) -> None:
    """What `Tensorizer.decompose` would reject, checked before anything is attached (`load_many`)."""
    scale, dropout = spec.scale, spec.dropout
    if not (isinstance(scale, (int, float)) and torch.isfinite(torch.tensor(float(scale)))):
        raise FactnetError(f"scale must be a finite number, got {scale!r}")
    if not 0.0 <= dropout < 1.0:
        raise FactnetError(f"dropout must be in [0, 1), got {dropout!r}")
    keys = [group_key(group) for group in tensorizer.groups]
    if len(set(keys)) != len(keys):
        raise FactnetError(f"group names {list(tensorizer.groups)} collide once dots become underscores; rename them")
    unknown = []
    for head in spec.head:
        try:
            model.get_submodule(head) if head else unknown.append(head)
        except AttributeError:
            unknown.append(head)
    if unknown:
        raise FactnetError(f"head {unknown} is not a submodule of the model")
