"""The container (`factnet.file.container`): atomic writes under injected crashes; damaged, foreign or hostile
files and a stale checksum rejected (without unpickling), the model unchanged."""

from __future__ import annotations

import copy
import os
import pathlib
import pickle
import random
import re
import stat
import struct

import pytest
import safetensors.torch
import torch
from conftest import assert_same_model, snapshot
from io_support import (  # noqa: F401 (saved: a fixture)
    assert_bitwise,
    factors_of,
    head_parameters,
    read_header,
    rejected,
    saved,
    train,
)

import factnet
import factnet.file.container

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_crafted_spec_with_a_stale_checksum(saved):
    base, path, *_ = saved
    tensors = safetensors.torch.load_file(str(path))
    _, header = read_header(path)
    metadata = dict(header["__metadata__"])
    metadata["factnet"], replaced = re.subn(r'"scale":[-+0-9.eE]+', '"scale":2.0', metadata["factnet"], count=1)
    assert replaced == 1
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    rejected(copy.deepcopy(base), path, "SHA-256 does not match")
