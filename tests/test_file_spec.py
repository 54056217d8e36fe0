"""The spec: version-1 files still load bitwise, and every older spec read is upgraded into the current form;
half-precision storage, the slice-map templates (checked against the slices themselves), crafted version-2
specs and the fingerprint mismatch message."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random

import pytest
import safetensors.torch
import torch
from conftest import TinyNet, snapshot, tiny_swin, tiny_vit
from io_support import (  # noqa: F401 (saved_v2: a fixture)
    factors_of,
    head_parameters,
    read_header,
    rejected,
    rewrite_spec,
    saved_v2,
    split_packs,
    train,
)
from v1_fixture import DATA, FILES, build_model

import v23_fixture

import factnet
import factnet.file.info
import factnet.file.spec
import factnet.file.templates

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- version 1 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FILES))
def test_v1_fixture_loads_bitwise(name):
    """A file written by factnet's version-1 code (tests/v1_fixture.py) loads onto the same tiny ViT with
    every factor and head tensor equal to the file's, read with safetensors directly."""
    path = DATA / f"{name}.safetensors"
    expected = safetensors.torch.load_file(str(path))
    assert factnet.file.info.load_spec(path)["factnet_format_version"] == 1
    settings, targets, include_head = FILES[name]
    model = build_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = factnet.load(model, path)
    assert (adapter.format.name, adapter.format.rank) == (settings["format"], settings["rank"])
    assert adapter.settings.scale == settings.get("scale", 1.0)
    assert adapter.settings.dropout == settings.get("dropout", 0.0)
    reference = factnet.Tensorizer(build_model(), targets)
    assert [p.qualified_name for g in adapter.group_names for p in adapter.group(g).slices] == \
        [p.qualified_name for p in reference.slices]
    loaded = {f"factors.{g}.{k}": v for (g, k), v in factors_of(adapter).items()}
    loaded |= {f"head.{n}": v for n, v in head_parameters(model, adapter).items()} if include_head else {}
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    if not include_head:  # the base model's head, untouched
        assert all(torch.equal(v, before[n]) for n, v in head_parameters(model, adapter).items())


def test_v1_fixtures_load_many():
    model = build_model()
    paths = [DATA / f"{name}.safetensors" for name in FILES]
    adapters = factnet.load_many(model, paths)
    assert list(adapters) == list(FILES) == model.factnet.names
    for name, path in zip(FILES, paths):
        expected = safetensors.torch.load_file(str(path))
        for (group, key), value in factors_of(adapters[name]).items():
            assert torch.equal(value, expected[f"factors.{group}.{key}"])


# ---- older specs upgraded when read --------------------------------------------------------------------
@pytest.mark.parametrize("name", [*FILES, *v23_fixture.FILES])
def test_old_specs_read_as_the_spec_of_the_same_adapter_saved_now(name, tmp_path):
    """A version-1/2/3 spec as read (`read_spec`) holds what the version-4 spec of the same adapter, loaded and
    saved again, holds: format and factor letters, settings, head, the base model's fingerprint (version 1: of
    its listing of matrices), the slice map (the digest of the templates where version 4 names the default
    targets), storage dtype and bits; only the tensors' layout (packs) differs."""
    path = DATA / f"{name}.safetensors"
    if name in FILES:
        model, save = build_model(), {"include_head": FILES[name][2]}
    else:
        head_bits = v23_fixture.FILES[name][1].get("head_bits")  # (a loaded adapter trains its head as held)
        model, save = v23_fixture.build(name), v23_fixture.FILES[name][4] | ({"head_bits": head_bits} if head_bits
                                                                             else {})
    factnet.load(model, path).save(tmp_path / "now.safetensors", **save)
    old, now = (factnet.file.info.read(str(p))[0] for p in (path, tmp_path / "now.safetensors"))
    written = factnet.file.info.load_spec(path)
    assert written["factnet_format_version"] == int(name[1]) and old.written == written and now.packed

    def current(spec: factnet.file.spec.Spec) -> dict:
        letters = spec.factors if isinstance(spec.factors, str) else ",".join(spec.factors.values())
        return {"format": spec.format, "rank": spec.rank, "factors": letters, "scale": spec.scale,
                "dropout": spec.dropout, "stable": spec.stable, "seed": spec.seed, "head": spec.head, "base": spec.base,
                "dtype": spec.dtype, "bits": spec.bits}

    assert current(old) == current(now)  # (version 1's base: the fingerprint of its listing, equal to the model's)
    if name in FILES:  # version 1 lists every slice: kept as listed, checked against the model on load
        assert (old.groups, old.default_groups, old.listed) == (None, None, written["groups"])
    elif now.default_groups is not None:
        digest = hashlib.sha256(json.dumps(old.groups, separators=(",", ":")).encode()).hexdigest()[:8]
        assert old.groups == written["groups"] and digest == now.default_groups["sha256"]
    else:
        assert old.groups == now.groups
    assert (old.low_bit, old.packed) == (written["bits"]["shapes"] if "bits" in written else None, False)


# ---- half-precision storage ----------------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tucker", rank=3, scale=2.0)
    train(adapter)
    return base, model, adapter


@pytest.mark.parametrize("dtype, code, itemsize", [
    (torch.bfloat16, "BF16", 2), (torch.float16, "F16", 2), (torch.float32, "F32", 4), (torch.float64, "F64", 8)])
def test_storage_dtype(trained, tmp_path, dtype, code, itemsize):
    base, model, adapter = trained
    path = tmp_path / "a.safetensors"
    adapter.save(path, dtype=dtype)
    length, header = read_header(path)
    parameters = adapter.num_parameters() + adapter.num_head_parameters()
    assert os.path.getsize(path) == 8 + length + itemsize * parameters
    assert {entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {code}
    assert factnet.file.info.load_spec(path)["dtype"] == str(dtype).removeprefix("torch.")
    stored = split_packs(path, adapter)
    fresh = copy.deepcopy(base)
    loaded = factnet.load(fresh, path)
    # the loaded values are the stored ones cast to float32 (exact upcasts for bf16/fp16), and those are the
    # trained values rounded to the storage dtype
    for (group, key), value in factors_of(loaded).items():
        assert value.dtype == torch.float32
        assert torch.equal(value, stored[f"factors.{group}.{key}"].float())
        assert torch.equal(value, adapter.group(group).factors[key].detach().to(dtype).float())
    for name, value in head_parameters(fresh, loaded).items():
        assert torch.equal(value, stored[f"head.{name}"].float())
        assert torch.equal(value, model.get_parameter(name).detach().to(dtype).float())


def test_bf16_file_onto_a_float64_model(trained, tmp_path):
    """A file with a storage dtype is cast to the model's factor dtype, whatever it is."""
    base, _, adapter = trained
    adapter.save(tmp_path / "a.safetensors", dtype=torch.bfloat16)
    stored = split_packs(tmp_path / "a.safetensors", adapter)
    loaded = factnet.load(copy.deepcopy(base).double(), tmp_path / "a.safetensors")
    for (group, key), value in factors_of(loaded).items():
        assert value.dtype == torch.float64 and torch.equal(value, stored[f"factors.{group}.{key}"].double())


def test_bf16_halves_the_vit_file(trained, tmp_path):
    _, _, adapter = trained
    adapter.save(tmp_path / "f32.safetensors", include_head=False)
    adapter.save(tmp_path / "bf16.safetensors", include_head=False, dtype=torch.bfloat16)
    tensors = {name: os.path.getsize(tmp_path / f"{name}.safetensors") - 8 - read_header(
        tmp_path / f"{name}.safetensors")[0] for name in ("f32", "bf16")}
    assert tensors == {"f32": 4 * adapter.num_parameters(), "bf16": 2 * adapter.num_parameters()}


@pytest.mark.parametrize("dtype", [torch.int8, torch.complex64, "bfloat16", 2])
def test_storage_dtype_must_be_a_float_dtype(trained, tmp_path, dtype):
    _, _, adapter = trained
    with pytest.raises(factnet.FactnetError, match="dtype must be None .* or one of torch.float16"):
        adapter.save(tmp_path / "a.safetensors", dtype=dtype)
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_vit_b_tt_r8_bf16_file_size(tmp_path):
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=8)
    count = adapter.num_parameters() + adapter.num_head_parameters()
    adapter.save(tmp_path / "a.safetensors", dtype=torch.bfloat16)
    size = os.path.getsize(tmp_path / "a.safetensors")
    assert size - 2 * count <= 1024 and size == 8 + read_header(tmp_path / "a.safetensors")[0] + 2 * count


# ---- the slice-map templates -------------------------------------------------------------------------------
def _expanded(spec: dict) -> dict[str, set[tuple[str, int]]]:
    return {group: {pair for text in entry["slices"] for pair in factnet.file.templates.parse_template(text).expand()}
            for group, entry in spec["groups"].items()}


@pytest.mark.parametrize("seed", range(6))
def test_templates_stand_for_exactly_the_slices(tmp_path, seed):
    """Random selections of blocks on a Swin (two numeric name segments), grouped by stage or shape: the
    templates expand to exactly the adapter's (module, block) pairs, and the file loads back the same slices."""
    rng = random.Random(seed)
    torch.manual_seed(0)
    base = tiny_swin()
    everything = factnet.Tensorizer(base).slices
    chosen = rng.sample(everything, rng.randint(1, len(everything)))
    targets = {}
    for piece in chosen:
        targets.setdefault(piece.module, []).append(str(piece.index))
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model, [f"{m}[{','.join(b)}]" for m, b in targets.items()]).group(
        rng.choice(["stage", "shape"])).decompose("cp", rank=2)
    adapter.save(tmp_path / "a.safetensors")
    spec = factnet.file.info.load_spec(tmp_path / "a.safetensors")
    if "default_groups" in spec:  # (every default target chosen: the slice map is not written, its digest is)
        spec["groups"] = factnet.file.templates.group_templates({g: adapter.group(g).slices for g in adapter.group_names})
        assert spec["default_groups"]["sha256"] == factnet.file.templates.groups_digest(
            {g: adapter.group(g).slices for g in adapter.group_names})
    assert _expanded(spec) == {g: {(p.module, p.index) for p in adapter.group(g).slices} for g in adapter.group_names}
    for group, entry in spec["groups"].items():  # whole matrices have no brackets, cut ones do
        sides = {p.module: p.side for p in adapter.group(group).slices}
        for text in entry["slices"]:
            template = factnet.file.templates.parse_template(text)
            assert {sides[m] == "none" for m, _ in template.expand()} == {template.blocks is None}
    loaded = factnet.load(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert [p.qualified_name for g in loaded.group_names for p in loaded.group(g).slices] == \
        [p.qualified_name for g in adapter.group_names for p in adapter.group(g).slices]


def test_templates_of_the_swin_stages():
    adapter = factnet.Tensorizer(tiny_swin()).group("shape").decompose("tt", rank=2)
    groups = factnet.file.templates.group_templates({g: adapter.group(g).slices for g in adapter.group_names})
    assert groups["24x24"]["slices"] == [
        "layers.0.blocks.{0-1}.attn.qkv[0-2]", "layers.0.blocks.{0-1}.attn.proj", "layers.0.blocks.{0-1}.mlp.fc1[0-3]",
        "layers.0.blocks.{0-1}.mlp.fc2[0-3]"]
    assert groups["48x48"]["shape"] == [24, 48, 48]


def test_runs():
    assert factnet.file.templates.runs([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    assert factnet.file.templates.parse_runs("0-2,5,7-8") == [(0, 2), (5, 5), (7, 8)]
    for bad in ["", "2-1", "1,1", "3,1", "01", "1-", "-1", "a", "1,,2"]:
        assert factnet.file.templates.parse_runs(bad) is None, bad


# ---- crafted version-2 specs (valid checksum) -------------------------------------------------------------
def _group(spec: dict) -> dict:
    return spec["groups"]["4x4"]


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(dtype="int8"), "storage dtype 'int8' is not one of"),
    (lambda s: s.update(dtype="bfloat16"), "says it stores bfloat16, but .* is torch.float32"),
    (lambda s: s.update(dtype=1), "malformed factnet spec"),
    (lambda s: s["base"].update(sha256="xyz"), "fingerprint 'xyz' is not 16 hex digits"),
    (lambda s: s["base"].update(sha256="0" * 16), "does not fit this model.*fingerprint 0000000000000000"),
    (lambda s: s.pop("base"), "malformed factnet spec"),
    (lambda s: _group(s).update(shape=[12, 4]), r"shape \[12, 4\], not \[n, d_in, d_out\]"),
    (lambda s: _group(s).update(shape=[12, 4, 5]), r"shape \[12, 4, 4\], not \[12, 4, 5\]"),
    (lambda s: _group(s).update(shape=[10**12, 4, 4]), "stand for 12 slices"),
    (lambda s: _group(s)["slices"].__setitem__(1, "qkv[0]"), r"slice qkv\[0\] is in its slice map twice"),
    (lambda s: _group(s)["slices"].__setitem__(0, "qkv[0-"), "slice template 'qkv.0-'"),
    (lambda s: _group(s)["slices"].__setitem__(0, "q{0-1}kv[0]"), "slice template"),
    (lambda s: _group(s)["slices"].__setitem__(0, "{2-1}.qkv[0]"), "slice template"),
    (lambda s: _group(s)["slices"].__setitem__(0, "{0-999999999}.x[0-2]"), "stand for 3000000009 slices"),
    (lambda s: _group(s)["slices"].__setitem__(0, "{0-999999999}.x[0-2]") or _group(s).update(shape=[3 * 10**9 + 9, 4, 4]),
     "slice map has 3000000009 slices, but this model's matrices have 12"),
    (lambda s: s.update(head=["nohead"]), "does not fit this model"),
], ids=["dtype-int8", "dtype-lies", "dtype-type", "fingerprint-format", "fingerprint-other", "no-base", "shape-2d",
        "shape-differs", "shape-huge", "duplicate-slice", "template-syntax", "template-brace", "template-runs",
        "template-huge", "template-huge-and-shape", "head-elsewhere"])
def test_crafted_v2_spec(saved_v2, edit, match):
    base, path = saved_v2
    rewrite_spec(path, edit)
    rejected(copy.deepcopy(base), path, match)


# ---- the base model's fingerprint ------------------------------------------------------------------------
def test_fingerprint_is_the_sha256_of_the_listing():
    model = TinyNet(d=4)
    listing = "".join(f"{name}\tlinear\t{m.out_features}\t{m.in_features}\n"
                      for name, m in sorted(model.named_children()) if name != "head")
    assert factnet.file.spec.fingerprint(factnet.file.spec.base_matrices(model, ["head"])) == \
        hashlib.sha256(f"4\n{listing}".encode()).hexdigest()[:16]


def test_fingerprint_mismatch_outside_the_adapted_matrices(tmp_path):
    """Only q and v adapted, the MLP of the other model narrower: the adapted matrices match, so the message
    gives counts and fingerprints and says the difference is elsewhere; the model stays unchanged."""
    torch.manual_seed(0)
    factnet.Tensorizer(tiny_vit(), ["blocks.*.attn.qkv[q,v]"]).decompose("tt", rank=2).save(tmp_path / "a.safetensors")
    other = tiny_vit(mlp_ratio=2.0)
    fingerprint = factnet.file.spec.fingerprint(factnet.file.spec.base_matrices(other, ["head"]))
    before = snapshot(other)
    message = rejected(other, tmp_path / "a.safetensors", "does not fit this model")
    saved = factnet.file.info.load_spec(tmp_path / "a.safetensors")["base"]["sha256"]
    assert (f"it was saved from a base model with 8 matrices outside the head (fingerprint {saved}), this model has "
            f"8 (fingerprint {fingerprint}); the 2 matrices it adapts match, so others differ; load it onto the "
            "architecture it was saved from") in message
    assert str(tmp_path / "a.safetensors") in message and before["adapter"] is None
