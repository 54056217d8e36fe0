"""Save and load when things go wrong: atomic writes under injected crashes; damaged, foreign, hostile
or crafted files and the wrong model rejected (without unpickling), the model unchanged."""

from __future__ import annotations

import copy
import re
import os
import pathlib
import pickle
import random
import stat
import struct

import pytest
import safetensors.torch
import torch
from conftest import (
    TinyNet,
    assert_same_model,
    snapshot,
    tiny_vit,
)
from io_support import (
    assert_bitwise,
    factors_of,
    head_parameters,
    read_header,
    rejected,
    rewrite_spec,
    train,
)

from legacy_files import save_legacy

import factnet
import factnet.file.container
import factnet.file.info
import factnet.file.spec

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- atomic writes --------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """A trained TinyNet adapter saved once: ``(base, path, factors, head, file bytes)``."""
    torch.manual_seed(0)
    base = TinyNet(d=4)
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    train(adapter)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    return base, path, factors_of(adapter), head_parameters(model, adapter), path.read_bytes(), adapter


def _partial_writer(exception: BaseException):
    def save_file(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise exception

    return save_file


@pytest.mark.parametrize("exception", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_crash_mid_save_leaves_the_old_file(saved, monkeypatch, exception):
    base, path, factors, head, old_bytes, adapter = saved
    train(adapter, seed=5)  # the new save would hold other values
    monkeypatch.setattr(factnet.file.container, "save_file", _partial_writer(exception))
    with pytest.raises(type(exception)):
        adapter.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    fresh = copy.deepcopy(base)
    loaded = factnet.load(fresh, path)
    assert_bitwise(factors_of(loaded), factors)
    assert_bitwise(head_parameters(fresh, loaded), head)


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_crash_before_the_rename_leaves_the_old_file(saved, monkeypatch, step):
    base, path, factors, _, old_bytes, adapter = saved
    train(adapter, seed=5)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, step, fail)
    with pytest.raises(KeyboardInterrupt):
        adapter.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes and os.listdir(path.parent) == [path.name]
    assert_bitwise(factors_of(factnet.load(copy.deepcopy(base), path)), factors)


def test_save_replaces_the_file_and_keeps_its_mode(saved):
    base, path, factors, _, old_bytes, adapter = saved
    os.chmod(path, 0o640)
    train(adapter, seed=5)
    adapter.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert path.read_bytes() != old_bytes
    assert_bitwise(factors_of(factnet.load(copy.deepcopy(base), path)), factors_of(adapter))


# ---- damaged, foreign and hostile files ----------------------------------------------------------------
def test_truncated_file_at_any_offset(saved, tmp_path):
    base, _, _, _, data, _ = saved
    (length,) = struct.unpack("<Q", data[:8])
    offsets = sorted({0, 1, 4, 7, 8, 9, 8 + length // 2, 8 + length - 1, 8 + length, 8 + length + 1,
                      (8 + length + len(data)) // 2, len(data) - 4, len(data) - 1})
    model = copy.deepcopy(base)
    cut = tmp_path / "cut.safetensors"
    for offset in offsets:
        cut.write_bytes(data[:offset])
        rejected(model, cut, "truncated or corrupt")


def test_every_flipped_byte_is_detected(saved, tmp_path):
    """Each byte of the file inverted, each lowest bit of the header flipped: always an error, never a load."""
    base, _, _, _, data, _ = saved
    model = copy.deepcopy(base)
    before = snapshot(model)
    damaged = tmp_path / "flipped.safetensors"
    (length,) = struct.unpack("<Q", data[:8])
    checksum_caught = 0
    for mask, positions in ((0xFF, range(len(data))), (0x01, range(8 + length))):  # bit flips: in the JSON header
        for position in positions:
            blob = bytearray(data)
            blob[position] ^= mask
            damaged.write_bytes(bytes(blob))
            with pytest.raises(factnet.FactnetError, match="corrupt|not a factnet adapter|malformed") as info:
                factnet.load(model, damaged)
            checksum_caught += "SHA-256" in str(info.value)
    assert_same_model(model, before)
    assert checksum_caught >= len(data) - 8 - length  # every flip in the tensor bytes, at least


def test_foreign_safetensors_file(saved, tmp_path):
    base, *_ = saved
    foreign = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"weight": torch.ones(3, 3)}, str(foreign), metadata={"format": "pt"})
    message = rejected(copy.deepcopy(base), foreign, "not a factnet adapter")
    assert "weight" in message


@pytest.mark.parametrize("size", [0, 3, 8, 100, 5000])
def test_random_bytes(saved, tmp_path, size):
    base, *_ = saved
    junk = tmp_path / "junk.bin"
    junk.write_bytes(random.Random(size).randbytes(size))
    rejected(copy.deepcopy(base), junk, "truncated or corrupt")


class _Payload:
    """Unpickling this writes a marker file: proof that a loader unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "unpickled")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_is_never_unpickled(saved, tmp_path, writer):
    base, *_ = saved
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload is live: unpickling it would leave the marker
    marker = tmp_path / "marker"
    hostile = tmp_path / "adapter.safetensors"
    if writer == "pickle":
        hostile.write_bytes(pickle.dumps({"factors": _Payload(marker)}))
    else:
        torch.save({"factors": _Payload(marker), "weight": torch.ones(2)}, hostile)
    rejected(copy.deepcopy(base), hostile, "truncated or corrupt")
    assert not marker.exists()


def test_missing_file_and_directory(saved, tmp_path):
    base, *_ = saved
    model = copy.deepcopy(base)
    rejected(model, tmp_path / "nope.safetensors", "does not exist")
    rejected(model, tmp_path, "is a directory")
    rejected(model, 42, "expected a file path")


# ---- the wrong model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved_on, loaded_on, named", [
    (dict(depth=2), dict(depth=3), ("with 8 matrices outside the head (fingerprint {saved}), this model has 12 "
                                    "(fingerprint {model}); the 8 matrices it adapts match; this model also has 4 "
                                    "matrices named like those but not in the file's slice map: blocks.2.attn.qkv: "
                                    "linear 144x48;")),
    (dict(depth=3), dict(depth=2), ("of the 12 matrices it adapts, 4 differ (d_out x d_in): blocks.2.attn.qkv: saved "
                                    "blocks 0-2 of 48x48, model has missing")),
    (dict(), dict(embed_dim=60), "blocks.0.attn.qkv: saved blocks 0-2 of 48x48, model has linear 180x60"),
    (dict(mlp_ratio=4.0), dict(mlp_ratio=2.0), "blocks.0.mlp.fc1: saved blocks 0-3 of 48x48, model has linear 96x48"),
], ids=["deeper", "shallower", "wider", "narrower-mlp"])
@pytest.mark.parametrize("version", [2, 4])
def test_wrong_model_lists_the_first_mismatches(tmp_path, saved_on, loaded_on, named, version):
    """A file keeps the base model's fingerprint and count: the message gives both, and which of the matrices
    the file adapts (its slice map: version 2's, or version 4's when it lists one) the model lacks or has of
    another shape."""
    torch.manual_seed(0)
    tensorizer = factnet.Tensorizer(tiny_vit(**saved_on))
    path = tmp_path / "a.safetensors"
    if version == 2:
        save_legacy(tensorizer.decompose("tt", rank=2), path)
    else:  # (the default targets, in a group of another name than by shape: listed)
        tensorizer.group({"all": "*"}).decompose("tt", rank=2).save(path)
        assert list(factnet.file.info.load_spec(path)["groups"]) == ["all"]
    fingerprints = {"saved": factnet.file.info.load_spec(path)["base"]["sha256"],
                    "model": factnet.file.spec.fingerprint(factnet.file.spec.base_matrices(tiny_vit(**loaded_on), ["head"]))}
    message = rejected(tiny_vit(**loaded_on), path, "does not fit this model")
    assert named.format(**fingerprints) in message and "same depth, width and module names" in message
    if "embed_dim" in loaded_on:
        assert "8 differ" in message and "and 3 more" in message  # 8 matrices differ, 5 listed


@pytest.mark.parametrize("saved_on, loaded_on", [(dict(depth=2), dict(depth=3)), (dict(), dict(embed_dim=60))])
def test_wrong_model_of_a_file_of_the_default_targets(tmp_path, saved_on, loaded_on):
    """A version-4 file of the default targets grouped by shape lists no matrix: the message gives the counts
    and fingerprints, and says which slices the file adapts."""
    torch.manual_seed(0)
    path = tmp_path / "a.safetensors"
    factnet.Tensorizer(tiny_vit(**saved_on)).decompose("tt", rank=2).save(path)
    saved = factnet.file.info.load_spec(path)["base"]
    model = factnet.file.spec.fingerprint(factnet.file.spec.base_matrices(tiny_vit(**loaded_on), ["head"]))
    message = rejected(tiny_vit(**loaded_on), path, "does not fit this model")
    assert (f"it was saved from a base model with 8 matrices outside the head (fingerprint {saved['sha256']}), this "
            f"model has {12 if 'depth' in loaded_on else 8} (fingerprint {model}); it adapts that model's default "
            "targets (grouped by shape); load it onto the architecture it was saved from") in message


def test_wrong_head_size_with_head(tmp_path):
    torch.manual_seed(0)
    factnet.Tensorizer(tiny_vit()).decompose("tt", rank=2).save(tmp_path / "a.safetensors")
    message = rejected(tiny_vit(num_classes=7), tmp_path / "a.safetensors", "does not hold the tensors")
    assert "head.head.weight: expected (7, 48), got (5, 48)" in message


def test_dtype_mismatch(saved):
    base, path, *_ = saved
    rejected(copy.deepcopy(base).double(), path, "torch.float32 tensors but the model would take torch.float64")


def test_not_a_module(saved):
    _, path, *_ = saved
    with pytest.raises(factnet.FactnetError, match="nn.Module"):
        factnet.load({"weight": torch.ones(1)}, path)


# ---- crafted version-2 specs (valid checksum; version 4's: tests/test_io_v4.py) -----------------------------
@pytest.fixture
def saved_v2(tmp_path):
    """A trained TinyNet adapter saved as a version-2 file (tests/legacy_files.py): ``(base, path)``."""
    torch.manual_seed(0)
    base = TinyNet(d=4)
    adapter = factnet.Tensorizer(copy.deepcopy(base)).decompose("tt", rank=2)
    train(adapter)
    path = tmp_path / "v2.safetensors"
    save_legacy(adapter, path)
    return base, path


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(factnet_format_version=5), "factnet_format_version 5.*upgrade factnet"),
    (lambda s: s.update(factnet_format_version="2"), "malformed factnet spec"),
    (lambda s: s.update(factnet_format_version=1), "malformed factnet spec"),
    (lambda s: s.update(format="block-term"), "'block-term' is not registered"),
    (lambda s: s.update(factors={"sigma": "iab", "u": "ja", "w": "kb"}), "registered with factors"),
    (lambda s: s.update(rank=0), "rank must be a positive integer"),
    (lambda s: s.update(rank=5), "does not hold the tensors"),
    (lambda s: s.update(scale=float("nan")), "scale must be a finite number"),
    (lambda s: s.pop("groups"), "malformed factnet spec"),
    (lambda s: s.update(groups={}), "at least one group"),
    (lambda s: s.update(dropout=1.5), "dropout must be in"),
    (lambda s: _slices(s).__setitem__(1, "proj[0]"), "slice map of group .*proj is whole here, cut into blocks in the file"),
    (lambda s: _slices(s).__setitem__(0, "qkv[0-1,7]"), "has blocks"),
    (lambda s: _slices(s).__setitem__(1, "ghost"), "slice map does not match this model.*matches no weight"),
    (lambda s: _slices(s).__setitem__(0, "qkv[0-1]"), "stand for 11 slices.* has 12"),
    (lambda s: s.update(head_parameters=["qkv.weight"]), "malformed factnet spec"),
], ids=["newer-version", "version-type", "version-1-layout", "unknown-format", "factor-letters", "rank-0", "rank-5",
        "nan-scale", "no-groups", "empty-groups", "dropout", "cut", "block", "unlisted-module", "count",
        "extra-key"])
def test_crafted_spec(saved_v2, edit, match):
    base, path = saved_v2
    assert factnet.file.info.load_spec(path)["groups"]["4x4"]["slices"] == ["qkv[0-2]", "proj", "fc1[0-3]", "fc2[0-3]"]
    rewrite_spec(path, edit)
    rejected(copy.deepcopy(base), path, match)


def _slices(spec: dict) -> list:
    return next(iter(spec["groups"].values()))["slices"]


def test_crafted_backbone_as_head(saved_v2):
    """The head parameters are the file's head.* tensors: one named for a backbone parameter is rejected."""
    base, path = saved_v2
    rewrite_spec(path, lambda s: None, rename={"head.head.weight": "head.qkv.weight"})
    message = rejected(copy.deepcopy(base), path, "the model's head")
    assert "['head.bias', 'head.weight'], but" in message and "['head.bias', 'qkv.weight']" in message


def test_crafted_spec_with_a_stale_checksum(saved):
    base, path, *_ = saved
    tensors = safetensors.torch.load_file(str(path))
    _, header = read_header(path)
    metadata = dict(header["__metadata__"])
    metadata["factnet"], replaced = re.subn(r'"scale":[-+0-9.eE]+', '"scale":2.0', metadata["factnet"], count=1)
    assert replaced == 1
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    rejected(copy.deepcopy(base), path, "SHA-256 does not match")


# ---- save errors --------------------------------------------------------------------------------------------
def test_save_errors(saved, tmp_path):
    _, path, _, _, data, adapter = saved
    with pytest.raises(factnet.FactnetError, match="is a directory"):
        adapter.save(tmp_path)
    with pytest.raises(factnet.FactnetError, match="does not exist; create it"):
        adapter.save(tmp_path / "missing" / "a.safetensors")
    with pytest.raises(factnet.FactnetError, match="needs a factnet Adapter"):
        factnet.save(adapter.groups, tmp_path / "b.safetensors")
    with pytest.raises(factnet.FactnetError, match="expected a file path"):
        adapter.save(None)
    adapter.detach()
    with pytest.raises(factnet.FactnetError, match="detached"):
        adapter.save(path)
    assert path.read_bytes() == data and sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]
