"""Uploaded adapter files are untrusted: on any bytes, `factnet.load`, `load_many` and `load_spec` load or raise
`FactnetError`, quickly and in bounded memory; never another exception, a hang or a crash. The checksum is
no defence (anyone can recompute a SHA-256), so the spec edits here recompute it. Cases found by these
tests are kept below as named regressions.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import tempfile
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import tiny_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_support import train
from legacy_files import save_legacy

import factnet
import factnet.file.container
import factnet.file.info
import factnet.file.templates
import factnet.file.validate

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]
FUZZ = settings(max_examples=60, deadline=timedelta(seconds=20), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _saved(bits: int | None, legacy: bool = False) -> tuple[torch.nn.Module, bytes]:
    """A tiny ViT and the bytes of a trained adapter file for it (low-bit with ``bits``; ``legacy``: of version 2
    or 3, tests/legacy_files.py)."""
    torch.manual_seed(0)
    base = tiny_vit().eval()
    adapter = factnet.Tensorizer(copy.deepcopy(base)).decompose("tt", rank=2, scale=1.5)
    train(adapter)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.safetensors"
        (partial(save_legacy, adapter) if legacy else adapter.save)(path, bits=bits, head_bits=bits)
        return base, path.read_bytes()


BASE, PLAIN = _saved(None)
_, LOW_BIT = _saved(2)
_, PLAIN_V2 = _saved(None, legacy=True)
_, LOW_BIT_V3 = _saved(2, legacy=True)
FILES = {"plain": PLAIN, "low-bit": LOW_BIT, "plain-v2": PLAIN_V2, "low-bit-v3": LOW_BIT_V3}


def _outcome(data: bytes) -> list[str]:
    """What each entry point does with a file holding ``data``: "loaded" or "refused"; anything else raises.
    A loaded adapter must run."""
    found = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload.safetensors"
        path.write_bytes(data)
        for call in (lambda: factnet.file.info.load_spec(path), lambda: factnet.load(copy.deepcopy(BASE), path),
                     lambda: factnet.load_many(copy.deepcopy(BASE), [path], ["u"])):
            try:
                result = call()
            except factnet.FactnetError:
                found.append("refused")
                continue
            adapter = result if isinstance(result, factnet.Adapter) else next(iter(result.values()), None)
            if isinstance(adapter, factnet.Adapter):  # (load_spec gives a dict of the spec)
                with torch.no_grad():
                    adapter.model(torch.zeros(1, 3, 32, 32))
            found.append("loaded")
    return found


def _with_spec(original: bytes, edit) -> bytes:
    """``original`` with its spec JSON edited by ``edit`` (a function of the decoded spec) and the checksum
    recomputed: a crafted file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.safetensors"
        path.write_bytes(original)
        tensors = safetensors.torch.load_file(str(path))
        spec = _spec_of(original)
        text = edit(spec)
        text = text if isinstance(text, str) else json.dumps(spec)
        safetensors.torch.save_file(tensors, str(path), metadata={
            "factnet": text, "factnet.sha256": factnet.file.container.checksum(text, tensors)})
        return path.read_bytes()


# ---- property tests ------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=2048))
def test_any_bytes_are_loaded_or_refused(data):
    _outcome(data)


@FUZZ
@given(original=st.sampled_from(list(FILES.values())), edits=st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    min_size=1, max_size=4))
def test_damaged_files_are_loaded_or_refused(original, edits):
    data = bytearray(original)
    for kind, where, payload in edits:
        at = int(where * (len(data) - 1))
        if kind == "flip":
            data[at] ^= payload[0] or 1
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at] = payload
        if not data:
            break
    assert set(_outcome(bytes(data))) <= {"loaded", "refused"}


HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["__class__", "tt", "blocks.{0-99999999999}.attn.qkv[0-2]", "head", "", "float16", "NaN"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def _paths(value, prefix=()):
    """Every (key path) in a decoded JSON value."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield (*prefix, index)
            yield from _paths(child, (*prefix, index))


def _spec_of(data: bytes) -> dict:
    """The spec JSON of a file's bytes, read by hand."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8:8 + length])["__metadata__"]["factnet"])


SPEC_PATHS = {name: sorted(_paths(_spec_of(data)), key=str) for name, data in FILES.items()}


@FUZZ
@given(which=st.sampled_from(list(FILES)), picks=st.lists(st.tuples(st.integers(0, 10**6), HOSTILE),
                                                           min_size=1, max_size=3))
def test_spec_edits_with_a_recomputed_checksum_are_loaded_or_refused(which, picks):
    original = FILES[which]
    paths = SPEC_PATHS[which]

    def within(holder, key) -> bool:
        return key in holder if isinstance(holder, dict) else (
            isinstance(holder, list) and isinstance(key, int) and key < len(holder))

    def edit(spec):
        for index, value in picks:
            *parents, last = paths[index % len(paths)]
            holder = spec
            for key in parents:  # (an earlier pick may have replaced a parent)
                holder = holder[key] if within(holder, key) else None
            if isinstance(holder, dict) or within(holder, last):
                holder[last] = value

    assert set(_outcome(_with_spec(original, edit))) <= {"loaded", "refused"}


# ---- what the fuzzing found, and the cases the issue names ---------------------------------------------
@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,  # found: RecursionError from json.loads, not a FactnetError
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    '{"factnet_format_version": ' + "9" * 5000 + "}",  # int() of a huge literal
    "x" * (factnet.file.validate.MAX_SPEC_CHARACTERS + 1),  # huge JSON: refused unparsed
])
def test_hostile_json_is_refused(text):
    assert _outcome(_with_spec(PLAIN, lambda spec: text)) == ["refused"] * 3


@pytest.mark.parametrize("edit", [
    lambda s: s.update(rank=10**12), lambda s: s.update(rank=-3), lambda s: s.update(scale=float("nan")),
    lambda s: s.update(scale=float("inf")), lambda s: s.update(dropout=float("nan")), lambda s: s.update(dropout=5),
    lambda s: s.update(format="nope"), lambda s: s.update(format="__class__"), lambda s: s.update(head=["__class__"]),
])
@pytest.mark.parametrize("which", ["plain", "plain-v2"])
def test_crafted_specs_the_issue_names_are_refused(edit, which):
    assert _outcome(_with_spec(FILES[which], edit))[1:] == ["refused"] * 2  # (load_spec reads the spec as it is)


@pytest.mark.parametrize("edit", [
    lambda s: [g.update(shape=[g["shape"][0], 10**9, 10**9]) for g in s["groups"].values()],
    lambda s: [g.update(shape=[-1, 5, 5]) for g in s["groups"].values()],
    lambda s: [g.update(slices=["blocks.{0-999999999}.attn.qkv[0-2]"]) for g in s["groups"].values()],
    lambda s: [g.update(slices=["blocks.0.attn.qkv[0-99999999999]"], shape=[10**11, 48, 48]) for g in s["groups"].values()],
    lambda s: [g.update(slices=["nothere.{0-1}.x"] + g["slices"][1:]) for g in s["groups"].values()],
])
@pytest.mark.parametrize("version", [2, 4])
def test_crafted_slice_maps_are_refused(edit, version):
    """On a version-2 file, and on a version-4 file whose default slice map is written out as templates."""
    def listed(spec):
        if version == 4:
            groups = factnet.Tensorizer(tiny_vit()).groups
            spec.pop("default_groups")
            spec["groups"] = factnet.file.templates.group_templates(groups)
        edit(spec)

    assert _outcome(_with_spec(PLAIN_V2 if version == 2 else PLAIN, listed))[1:] == ["refused"] * 2


@pytest.mark.parametrize("which", ["plain", "low-bit"])
@pytest.mark.parametrize("edit", [
    lambda s: s.update(head_shapes={"head.weight": [10**6, 10**6], "head.bias": [5]}),
    lambda s: s.update(head_shapes={"head.weight": [5, 48], "head.bias": [5], "blocks.0.attn.qkv.weight": [144, 48]}),
    lambda s: s.update(head_shapes={"head.weight": [2**40, 2**40]}),
    lambda s: s["default_groups"].update(sha256="0" * 8), lambda s: s["default_groups"].update(by="__class__"),
    lambda s: s.update(groups={"48x48": {"shape": [24, 48, 48], "slices": ["blocks.{0-1}.attn.qkv[0-2]"]}}),
    lambda s: s.pop("default_groups"), lambda s: s.update(bits={"factors": 1, "head": 1, "group": 10**12}),
    lambda s: s.update(bits={"factors": 2, "head": 2, "group": 1}), lambda s: s.update(factors="iab,ja,kb,kc"),
])
def test_crafted_version_4_specs_are_refused(which, edit):
    assert _outcome(_with_spec(FILES[which], edit))[1:] == ["refused"] * 2


@pytest.mark.parametrize("edit", [
    lambda s: s.update(held={"factors": "float32"}), lambda s: s.update(held="float16"),
    lambda s: s.update(dtype="float16"), lambda s: s.pop("held"), lambda s: s.update(bits={"factors": 1, "head": None,
                                                                                          "group": 64}),
])
def test_crafted_version_4_dtypes_are_refused(edit):
    assert _outcome(_with_spec(PLAIN, edit))[1:] == ["refused"] * 2


def test_non_finite_values_are_refused():
    """Found: a file of NaN factors loaded (every answer for that user NaN); now a `FactnetError`."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.safetensors"
        path.write_bytes(PLAIN)
        tensors = safetensors.torch.load_file(str(path))
        tensors["float32"][0] = float("nan")  # (the first factor's first value)
        text = json.dumps(_spec_of(PLAIN))
        safetensors.torch.save_file(tensors, str(path), metadata={
            "factnet": text, "factnet.sha256": factnet.file.container.checksum(text, tensors)})
        with pytest.raises(factnet.FactnetError, match="NaN or infinite"):
            factnet.load(copy.deepcopy(BASE), path)


@pytest.mark.parametrize("claimed", [8 * 10**9, 2**63, 2**64 - 1])
def test_a_header_claiming_gigabytes_is_refused(claimed):
    assert _outcome(struct.pack("<Q", claimed) + PLAIN[8:]) == ["refused"] * 3


def test_memory_stays_bounded_on_bombs(tmp_path):
    """The files above that claim gigabytes (header length, shapes, slice ranges, low-bit shapes), loaded in a
    fresh process: its peak resident memory grows by less than 300 MB over loading a good file."""
    bombs = {"header": struct.pack("<Q", 8 * 10**9) + PLAIN[8:],
             "shape": _with_spec(PLAIN_V2, lambda s: [g.update(shape=[g["shape"][0], 10**6, 10**6])
                                                      for g in s["groups"].values()]),
             "range": _with_spec(PLAIN_V2, lambda s: [g.update(slices=["blocks.{0-999999999}.attn.qkv[0-2]"])
                                                      for g in s["groups"].values()]),
             "low-bit": _with_spec(LOW_BIT_V3, lambda s: s["bits"]["shapes"].update(
                 {k: [10**6, 10**6] for k in s["bits"]["shapes"]})),
             "head": _with_spec(PLAIN, lambda s: s["head_shapes"].update({"head.weight": [10**6, 10**6]})),
             "low-bit-head": _with_spec(LOW_BIT, lambda s: s["head_shapes"].update({"head.weight": [10**6, 10**6]}))}
    for name, data in {"good": PLAIN, **bombs}.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
    script = f"""
import resource, sys, copy, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import tiny_vit
import factnet
base = tiny_vit().eval()
factnet.load(copy.deepcopy(base), {str(tmp_path / 'good.safetensors')!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in {list(bombs)!r}:
    try:
        factnet.load(copy.deepcopy(base), {str(tmp_path)!r} + f"/{{name}}.safetensors")
        print("loaded", name)
    except factnet.FactnetError:
        pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split()
    assert "loaded" not in lines and int(lines[-1]) < 300, done.stdout
