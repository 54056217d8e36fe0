"""Save and load: bitwise round trips on every format and model kind, a spec readable without factnet,
and the file sizes."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import safetensors.torch
import torch
from conftest import (
    TinyGPT2,
    TinyNet,
    tiny_swin,
    tiny_torchvision_vit,
    tiny_vit,
)
from io_support import (  # noqa: F401 (saved: a fixture)
    FORMATS,
    assert_bitwise,
    factors_of,
    head_parameters,
    read_header,
    round_trip,
    saved,
    train,
)
from torch import nn

import factnet
import factnet.file.info
import factnet.file.templates
import factnet.file.validate

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert spec["factnet_format_version"] == factnet.file.validate.FORMAT_VERSION == 4
    assert (spec["format"], spec["rank"], spec["factors"], spec["scale"], spec["dropout"]) == (
        "tt", 3, "iab,ja,kb", 10.0, 0.1)
    assert spec["head"] == ["head"] and spec["held"] == "float32" and "dtype" not in spec
    assert spec["head_shapes"] == {"head.weight": [5, 48], "head.bias": [5]}
    # the base model: a fingerprint of every nn.Linear outside the head, with its weight's shape (d_out, d_in),
    # read from the modules themselves, sorted by name, and their count
    linears = {n: m.weight.shape for n, m in tiny_vit().named_modules() if isinstance(m, nn.Linear) and n != "head"}
    listing = "".join(f"{n}\tlinear\t{shape[0]}\t{shape[1]}\n" for n, shape in sorted(linears.items()))
    digest = hashlib.sha256(f"{len(linears)}\n{listing}".encode()).hexdigest()
    assert spec["base"] == {"sha256": digest[:16], "matrices": 8}
    # the default targets grouped by shape: not listed, the SHA-256 of their templates kept to check them
    (name, members), = ((g, adapter.group(g).slices) for g in adapter.group_names)
    templates = factnet.file.templates.group_templates({name: members})
    assert templates == {name: {"shape": [2 * 12, 48, 48], "slices": [  # q, k, v, proj, 4 fc1, 4 fc2 per layer
        "blocks.{0-1}.attn.qkv[0-2]", "blocks.{0-1}.attn.proj", "blocks.{0-1}.mlp.fc1[0-3]",
        "blocks.{0-1}.mlp.fc2[0-3]"]}}  # fused qkv and fc1 cut along d_out, fc2 along d_in, proj whole
    text = json.dumps(templates, separators=(",", ":"))
    assert spec["default_groups"] == {"by": "shape", "sha256": hashlib.sha256(text.encode()).hexdigest()[:8]}
    assert "groups" not in spec and "base_rank" not in spec  # (scale=: the paper's parametrization)
    assert [s.qualified_name for s in members][:5] == [
        "blocks.0.attn.qkv[q]", "blocks.0.attn.qkv[k]", "blocks.0.attn.qkv[v]", "blocks.0.attn.proj",
        "blocks.0.mlp.fc1[0]"]
    # the tensors: one pack per dtype, the factors in the format's order, then the head
    assert set(header) - {"__metadata__"} == {"float32"}
    assert header["float32"]["dtype"] == "F32"
    assert header["float32"]["shape"] == [adapter.num_parameters() + adapter.num_head_parameters()]
    pack = safetensors.torch.load_file(str(path))["float32"]
    values = [adapter.group(name).factors[f] for f in ("sigma", "u", "v")] + [model.head.weight, model.head.bias]
    assert torch.equal(pack, torch.cat([v.detach().reshape(-1) for v in values]))


def test_custom_slices_list_their_templates(tmp_path):
    """Slices other than the default targets' (here q and v of the fused qkv) are listed as templates."""
    torch.manual_seed(0)
    adapter = factnet.Tensorizer(tiny_vit(), ["blocks.*.attn.qkv[q,v]"]).decompose("tt", rank=2)
    adapter.save(tmp_path / "a.safetensors", include_head=False)
    spec = factnet.file.info.load_spec(tmp_path / "a.safetensors")
    assert spec["groups"] == {"48x48": {"shape": [4, 48, 48], "slices": ["blocks.{0-1}.attn.qkv[0,2]"]}}
    assert "default_groups" not in spec and "head_shapes" not in spec


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
