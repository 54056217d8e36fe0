"""Save and load: bitwise round trips on every format and model kind, a spec readable without factnet,
atomic writes under injected crashes, and damaged, foreign or hostile files rejected without unpickling."""

from __future__ import annotations

import copy
import hashlib
import json
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
    TinyGPT2,
    TinyNet,
    assert_same_model,
    randomize_factors,
    snapshot,
    tiny_swin,
    tiny_torchvision_vit,
    tiny_vit,
)
from torch import nn

import factnet
import factnet.files
import factnet.io
import factnet.spec

FORMATS = factnet.available_formats()


pytestmark = pytest.mark.usefixtures("one_thread")


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


def rewrite_spec(path: os.PathLike, edit, rename: dict | None = None) -> None:
    """Edit the spec JSON of an adapter file (and ``rename`` tensors) and write it back with a matching
    checksum (a crafted file)."""
    tensors = {(rename or {}).get(k, k): v for k, v in safetensors.torch.load_file(str(path)).items()}
    _, header = read_header(path)
    spec = json.loads(header["__metadata__"]["factnet"])
    edit(spec)
    text = json.dumps(spec)
    safetensors.torch.save_file(tensors, str(path), metadata={"factnet": text,
                                                              "factnet.sha256": factnet.spec._checksum(text, tensors)})


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


# ---- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(tmp_path, fmt):
    torch.manual_seed(0)
    base = tiny_vit()
    model, adapter, fresh, _ = round_trip(base, tmp_path, torch.randn(2, 3, 32, 32), format=fmt, rank=2, scale=3.0,
                                          dropout=0.1)
    # the whole state (backbone, head, factors) is bitwise the trained model's
    assert_bitwise(fresh.state_dict(), model.state_dict())


def test_spec_is_plain_json_with_the_slice_map_and_shapes(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit()
    adapter = factnet.Tensorizer(model).decompose("tt", rank=3, scale=10.0, dropout=0.1)
    train(adapter)
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    _, header = read_header(path)
    spec = json.loads(header["__metadata__"]["factnet"])
    assert spec["factnet_format_version"] == factnet.io.FORMAT_VERSION == 2
    assert (spec["format"], spec["rank"], spec["scale"], spec["dropout"]) == ("tt", 3, 10.0, 0.1)
    assert spec["head"] == ["head"] and spec["dtype"] is None
    # the base model: a fingerprint of every nn.Linear outside the head, with its weight's shape (d_out, d_in),
    # read from the modules themselves, sorted by name, and their count
    linears = {n: m.weight.shape for n, m in tiny_vit().named_modules() if isinstance(m, nn.Linear) and n != "head"}
    listing = "".join(f"{n}\tlinear\t{shape[0]}\t{shape[1]}\n" for n, shape in sorted(linears.items()))
    digest = hashlib.sha256(f"{len(linears)}\n{listing}".encode()).hexdigest()
    assert spec["base"] == {"sha256": digest[:16], "matrices": 8}
    (name, group), = spec["groups"].items()
    assert group["shape"] == [2 * 12, 48, 48]  # q, k, v, proj, 4 fc1 blocks, 4 fc2 blocks per layer
    # module-name templates with numeric runs: fused qkv and fc1 cut along d_out, fc2 along d_in, proj whole
    assert group["slices"] == ["blocks.{0-1}.attn.qkv[0-2]", "blocks.{0-1}.attn.proj", "blocks.{0-1}.mlp.fc1[0-3]",
                               "blocks.{0-1}.mlp.fc2[0-3]"]
    assert [s.qualified_name for s in adapter.group(name).slices][:5] == [
        "blocks.0.attn.qkv[q]", "blocks.0.attn.qkv[k]", "blocks.0.attn.qkv[v]", "blocks.0.attn.proj",
        "blocks.0.mlp.fc1[0]"]
    # the tensors: one per factor and head parameter, float32, as the adapter holds them
    assert set(header) - {"__metadata__"} == {f"factors.{name}.{f}" for f in ("sigma", "u", "v")} | {
        "head.head.weight", "head.head.bias"}
    assert header[f"factors.{name}.sigma"]["dtype"] == "F32"
    assert header[f"factors.{name}.sigma"]["shape"] == [24, 3, 3]


def test_round_trip_swin_grouped_by_stage(tmp_path):
    torch.manual_seed(0)
    _, adapter, _, loaded = round_trip(tiny_swin(), tmp_path, torch.randn(1, 3, 56, 56), format="tucker", rank=3,
                                       by="stage")
    assert loaded.group_names == adapter.group_names == ["layers.0", "layers.1"]
    assert loaded.group_shapes() == {"layers.0": (24, 24, 24), "layers.1": (24, 48, 48)}


@pytest.mark.parametrize("kind", ["mha", "conv1d"])
def test_round_trip_mha_and_conv1d(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "mha":
        base, x = tiny_torchvision_vit(), torch.randn(2, 3, 32, 32)
    else:
        base, x = TinyGPT2(), torch.randint(0, 11, (2, 7))
    model, adapter, fresh, loaded = round_trip(base, tmp_path, x, format="tt", rank=2, scale=2.0)
    kinds = {m.kind for m in loaded.matrices.values()}
    assert kinds == ({"mha-in", "mha-out", "linear"} if kind == "mha" else {"conv1d"})
    assert_bitwise(fresh.state_dict(), model.state_dict())


def test_round_trip_several_groups_per_matrix(tmp_path):
    """q and v of one fused matrix in two groups, a whole non-square matrix in a third."""
    torch.manual_seed(0)
    base = TinyNet(d=4, odd=True)
    groups = {"q": ["qkv[q]"], "v": ["qkv[v]", "fc1[1]"], "odd": ["odd"]}
    round_trip(base, tmp_path, torch.randn(5, 4), format="cp", rank=2, targets=["qkv[q,v]", "fc1[1]", "odd"],
               by=groups)


def test_save_an_inactive_adapter_of_several(tmp_path):
    """Two adapters on one model: the inactive one saves its own head values, not the active one's."""
    torch.manual_seed(0)
    base = TinyNet(d=4)
    model = copy.deepcopy(base)
    first = factnet.Tensorizer(model, ["qkv", "fc1"]).decompose("tt", rank=2, name="first")
    train(first, seed=0)
    head = head_parameters(model, first)
    second = factnet.Tensorizer(model).decompose("cp", rank=2, name="second")
    train(second, seed=1)
    assert second.active and not first.active
    first.save(tmp_path / "first.safetensors")
    fresh = copy.deepcopy(base)
    loaded = factnet.load(fresh, tmp_path / "first.safetensors")
    assert_bitwise(factors_of(loaded), factors_of(first))
    assert_bitwise(head_parameters(fresh, loaded), head)
    first.activate()
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_include_head_false(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit()
    model, adapter, fresh, loaded = round_trip(base, tmp_path, include_head=False, format="tt", rank=2)
    path = tmp_path / "adapter.safetensors"
    _, header = read_header(path)
    assert not [key for key in header if key.startswith("head.")]
    assert "head_parameters" not in json.loads(header["__metadata__"]["factnet"])  # the head.* tensors say it
    assert_bitwise(head_parameters(fresh, loaded), head_parameters(base, adapter))  # the base model's head
    assert loaded.head == ["head"] and loaded.num_head_parameters() == 48 * 5 + 5  # still trainable
    # without the head the file fits a model with another head size
    other = tiny_vit(num_classes=7)
    loaded_other = factnet.load(other, path)
    assert_bitwise(factors_of(loaded_other), factors_of(adapter))


def test_file_size_is_the_tensors_plus_the_header(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit()
    adapter = factnet.Tensorizer(model).decompose("tucker", rank=4)
    for include_head, extra in ((True, 48 * 5 + 5), (False, 0)):
        path = tmp_path / f"{include_head}.safetensors"
        adapter.save(path, include_head=include_head)
        length, _ = read_header(path)
        assert os.path.getsize(path) == 8 + length + 4 * (adapter.num_parameters() + extra)
        assert length < 8192


@pytest.mark.slow
def test_vit_b_tt_r8_file_size(tmp_path):
    """The issue's measurement: ViT-B/16 (random weights), FacT-TT rank 8, against 4 bytes a parameter."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=8)
    factors, head = adapter.num_parameters(), adapter.num_head_parameters()
    assert (factors, head) == ((768 + 768) * 8 + 144 * 64, 768 * 1000 + 1000)
    sizes = {}
    for include_head, count in ((False, factors), (True, factors + head)):
        path = tmp_path / f"vit_b_{include_head}.safetensors"
        adapter.save(path, include_head=include_head)
        length, _ = read_header(path)
        sizes[include_head] = (os.path.getsize(path), 4 * count, length)
        assert os.path.getsize(path) == 8 + length + 4 * count
    print(f"\nViT-B TT r8 file bytes (file, 4 x parameters, header): factors only {sizes[False]}, "
          f"with head {sizes[True]}")
    for include_head in (False, True):  # version 2: the whole header (file bytes - tensor bytes) within 1 KiB
        file_bytes, tensor_bytes, _ = sizes[include_head]
        assert file_bytes - tensor_bytes <= 1024


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
    monkeypatch.setattr(factnet.files, "save_file", _partial_writer(exception))
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
def test_wrong_model_lists_the_first_mismatches(tmp_path, saved_on, loaded_on, named):
    """A version-2 file keeps the base model's fingerprint and count: the message gives both, and which of the
    matrices the file adapts (its slice map) the model lacks or has of another shape."""
    torch.manual_seed(0)
    adapter = factnet.Tensorizer(tiny_vit(**saved_on)).decompose("tt", rank=2)
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    fingerprints = {"saved": factnet.io.load_spec(path)["base"]["sha256"],
                    "model": factnet.spec._fingerprint(factnet.spec._matrices(tiny_vit(**loaded_on), ["head"]))}
    message = rejected(tiny_vit(**loaded_on), path, "does not fit this model")
    assert named.format(**fingerprints) in message and "same depth, width and module names" in message
    if "embed_dim" in loaded_on:
        assert "8 differ" in message and "and 3 more" in message  # 8 matrices differ, 5 listed


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


# ---- crafted specs (valid checksum) ----------------------------------------------------------------------
@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(factnet_format_version=3), "factnet_format_version 3.*upgrade factnet"),
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
def test_crafted_spec(saved, edit, match):
    base, path, *_ = saved
    assert factnet.io.load_spec(path)["groups"]["4x4"]["slices"] == ["qkv[0-2]", "proj", "fc1[0-3]", "fc2[0-3]"]
    rewrite_spec(path, edit)
    rejected(copy.deepcopy(base), path, match)


def _slices(spec: dict) -> list:
    return next(iter(spec["groups"].values()))["slices"]


def test_crafted_backbone_as_head(saved):
    """The head parameters are the file's head.* tensors: one named for a backbone parameter is rejected."""
    base, path, *_ = saved
    rewrite_spec(path, lambda s: None, rename={"head.head.weight": "head.qkv.weight"})
    message = rejected(copy.deepcopy(base), path, "the model's head")
    assert "['head.bias', 'head.weight'], but" in message and "['head.bias', 'qkv.weight']" in message


def test_crafted_spec_with_a_stale_checksum(saved):
    base, path, *_ = saved
    tensors = safetensors.torch.load_file(str(path))
    _, header = read_header(path)
    metadata = dict(header["__metadata__"])
    metadata["factnet"] = metadata["factnet"].replace('"scale":1.0', '"scale":2.0')
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
