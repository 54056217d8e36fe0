"""Helpers shared by the save/load tests (tests/test_file_*.py), and their `saved` fixture."""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import struct

import pytest
import safetensors.torch
import torch
from conftest import (
    TinyNet,
    assert_same_model,
    randomize_factors,
    snapshot,
)
from legacy_files import save_legacy
from torch import nn

import factnet
import factnet.file.container
import factnet.file.info
import factnet.quant

FORMATS = factnet.available_formats()


# ---- helpers ---------------------------------------------------------------------------------------
def train(adapter: factnet.Adapter, seed: int = 0) -> None:
    """Stand-in for training: random factors (the zero one included) and a perturbed head."""
    randomize_factors(adapter, std=0.3, seed=seed)
    factors = {id(p) for p in adapter.parameters()}
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            if id(param) not in factors:
                param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype))


def head_parameters(model: nn.Module, adapter: factnet.Adapter) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if any(n.startswith(h + ".") for h in adapter.head)}


def factors_of(adapter: factnet.Adapter) -> dict[tuple[str, str], torch.Tensor]:
    return {(g, k): v.detach().clone() for g in adapter.group_names for k, v in adapter.group(g).factors.items()}


def assert_bitwise(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def read_header(path: os.PathLike) -> tuple[int, dict]:
    """The safetensors header, parsed by hand (no factnet, no safetensors): ``(length, JSON)``."""
    raw = pathlib.Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8:8 + length])


def split_packs(path: os.PathLike, adapter: factnet.Adapter) -> dict[str, torch.Tensor]:
    """The tensors of a version-4 file of ``adapter``, split by hand from its packs (safetensors, the order
    docs/files.md gives and `factnet.quant` only): ``{"factors.<group>.<factor>" | "head.<name>": values}``,
    low-bit ones as float32 values. Every value of every pack is used once."""
    _, header = read_header(path)
    spec = json.loads(header["__metadata__"]["factnet"])
    packs = safetensors.torch.load_file(str(path))
    fmt, bits, held = adapter.format, spec.get("bits") or {}, spec.get("held")
    order = [(f"factors.{g}.{k}", shape) for g in adapter.group_names
             for k, shape in fmt.shapes(*adapter.group_shapes()[g]).items() if k not in fmt.seeded]
    order += [(f"head.{n}", tuple(shape)) for n, shape in spec.get("head_shapes", {}).items()]
    used = dict.fromkeys(packs, 0)

    def take(pack: str, count: int) -> torch.Tensor:
        used[pack] += count
        return packs[pack][used[pack] - count:used[pack]]

    found = {}
    for key, shape in order:
        kind, count = key.partition(".")[0], math.prod(shape)
        width = bits.get(kind)
        if width is None:
            dtype = spec.get("dtype") or (held if isinstance(held, str) else held[
                "factors" if kind == "factors" else key[len("head."):]])
            found[key] = take(dtype, count).reshape(shape)
            continue
        codes, groups = take("uint8", -(-count * width // 8)), -(-count // bits["group"])
        scale, offset = take("float16", groups), take("float16", groups) if width > 1 else None
        found[key] = factnet.quant.dequantize(factnet.quant.Quantized(codes, scale, offset, shape, width,
                                                                      bits["group"]))
    assert used == {pack: value.numel() for pack, value in packs.items()}
    return found


def rewrite_spec(path: os.PathLike, edit, rename: dict | None = None, edit_tensors=None) -> None:
    """Edit the spec JSON of an adapter file (and ``rename`` tensors, or ``edit_tensors(tensors)`` in place) and
    write it back with a matching checksum (a crafted file)."""
    tensors = {(rename or {}).get(k, k): v for k, v in safetensors.torch.load_file(str(path)).items()}
    if edit_tensors is not None:
        edit_tensors(tensors)
    _, header = read_header(path)
    spec = json.loads(header["__metadata__"]["factnet"])
    edit(spec)
    text = json.dumps(spec)
    safetensors.torch.save_file(tensors, str(path), metadata={"factnet": text,
                                                              "factnet.sha256": factnet.file.container.checksum(text, tensors)})


def rejected(model: nn.Module, path: os.PathLike, match: str) -> str:
    """``factnet.load`` raises FactnetError matching ``match`` and leaves ``model`` exactly as it was."""
    before = snapshot(model)
    with pytest.raises(factnet.FactnetError, match=match) as info:
        factnet.load(model, path)
    assert_same_model(model, before)
    return str(info.value)


def round_trip(base: nn.Module, tmp_path: pathlib.Path, *inputs: torch.Tensor, include_head: bool = True,
               **decompose) -> tuple[nn.Module, factnet.Adapter, nn.Module, factnet.Adapter]:
    """Adapt a copy of ``base``, train it, save, load onto another copy; check the outputs match."""
    model = copy.deepcopy(base)
    tensorizer = factnet.Tensorizer(model, decompose.pop("targets", None)).group(decompose.pop("by", "shape"))
    adapter = tensorizer.decompose(**decompose)
    train(adapter)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path, include_head=include_head)
    fresh = copy.deepcopy(base)
    loaded = factnet.load(fresh, path)
    assert_bitwise(factors_of(loaded), factors_of(adapter))
    assert (loaded.format.name, loaded.format.rank) == (adapter.format.name, adapter.format.rank)
    assert loaded.settings == adapter.settings and loaded.head == adapter.head
    assert loaded.group_shapes() == adapter.group_shapes()
    assert [p.qualified_name for g in loaded.group_names for p in loaded.group(g).slices] == \
        [p.qualified_name for g in adapter.group_names for p in adapter.group(g).slices]
    if include_head:
        assert_bitwise(head_parameters(fresh, loaded), head_parameters(model, adapter))
        model.eval(), fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(*inputs), model(*inputs))
    return model, adapter, fresh, loaded


@pytest.fixture
def saved(tmp_path):
    """A trained TinyNet adapter saved once: ``(base, path, factors, head, file bytes, adapter)`` (import it into a
    test module to use it)."""
    torch.manual_seed(0)
    base = TinyNet(d=4)
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    train(adapter)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    return base, path, factors_of(adapter), head_parameters(model, adapter), path.read_bytes(), adapter


@pytest.fixture
def saved_v2(tmp_path):
    """A trained TinyNet adapter saved as a version-2 file (tests/legacy_files.py): ``(base, path)`` (import it
    into a test module to use it)."""
    torch.manual_seed(0)
    base = TinyNet(d=4)
    adapter = factnet.Tensorizer(copy.deepcopy(base)).decompose("tt", rank=2)
    train(adapter)
    path = tmp_path / "v2.safetensors"
    save_legacy(adapter, path)
    assert factnet.file.info.load_spec(path)["groups"] == {
        "4x4": {"shape": [12, 4, 4], "slices": ["qkv[0-2]", "proj", "fc1[0-3]", "fc2[0-3]"]}}
    return base, path
