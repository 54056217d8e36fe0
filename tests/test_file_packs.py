"""Format version 4: the fixed cost of a file (the safetensors header with the spec) within 1 KiB on any model,
the packed tensors (one per dtype, split by the documented order), bitwise round trips of every kind of file,
exact byte counts, and crafted packs and specs refused."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import safetensors.torch
import torch
from conftest import tiny_swin, tiny_vit
from io_support import read_header, rejected, rewrite_spec, split_packs, train

import factnet
import factnet.file.info
import factnet.file.templates
from factnet.quant import fake_quantize, stored_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER_LIMIT = 1024  # bytes of the safetensors header and its length field, the spec and checksum inside it
ROUND_TRIP_FORMATS = ["tt", "tucker", "cp", "vera", "tt-seeded", "batch-matrix"]


def header_bytes(path: os.PathLike) -> int:
    """The file's fixed cost: the header's length (its first 8 bytes, little-endian) plus those 8 bytes."""
    return 8 + read_header(path)[0]


def tensor_bytes(adapter: factnet.Adapter, bits: int | None, head: bool, head_bits: int | None = None) -> int:
    """The bytes the factors (and the head) take as stored: 4 a float32 value, or `stored_bytes` low-bit."""
    factors = [t.numel() for g in adapter.group_names for t in adapter.group(g).trained_values().values()]
    heads = [p.numel() for p in adapter.head_state().values()] if head else []
    return (sum(4 * n if bits is None else stored_bytes(n, bits) for n in factors)
            + sum(4 * n if head_bits is None else stored_bytes(n, head_bits) for n in heads))


# ---- the fixed cost --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tf_efficientnet_lite0", "vit_base_patch16_224"])
def real_model(request):
    """A real architecture (random weights, nothing downloaded) with a default FacT-TT rank-1 adapter."""
    import timm

    model = timm.create_model(request.param, pretrained=False)
    return request.param, factnet.Tensorizer(model).decompose("tt", rank=1)


@pytest.mark.slow
@pytest.mark.parametrize("include_head, bits", [(False, None), (True, None), (False, 1), (True, 1)])
def test_the_header_of_a_real_model_is_within_1_kib(real_model, tmp_path, include_head, bits):
    """The issue's measurement: EfficientNet-Lite0 (60 tensors, 10 groups in version 3: a 7,272-byte header)
    and ViT-B, saved with and without the 1000-class head, in full precision and at 1 bit (head too)."""
    name, adapter = real_model
    path = tmp_path / "a.safetensors"
    head_bits = bits if include_head else None
    saved = adapter.save(path, include_head=include_head, bits=bits, head_bits=head_bits)
    header = header_bytes(path)
    print(f"\n{name} TT r1, head {include_head}, bits {bits}: {saved.bytes:,} bytes, header and spec {header}")
    assert header <= HEADER_LIMIT
    assert saved.bytes == os.path.getsize(path) == header + tensor_bytes(adapter, bits, include_head, head_bits)
    assert saved.head_bytes == tensor_bytes(adapter, bits, include_head, head_bits) - tensor_bytes(adapter, bits, False)
    spec = factnet.file.info.load_spec(path)
    assert spec["default_groups"]["by"] == "shape" and "groups" not in spec
    assert set(read_header(path)[1]) - {"__metadata__"} == ({"float32"} if bits is None else {"uint8", "float16"})


def test_the_header_of_every_zoo_family_is_within_1_kib(tmp_path):
    """Every architecture family of tests/zoo.py, default targets, FacT-TT rank 1, with the head at 1 bit: the
    header stays under 1 KiB however many groups, and the file loads back."""
    from zoo import FAMILIES

    sizes = {}
    for name, family in FAMILIES.items():
        torch.manual_seed(0)
        model = family.build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = factnet.Tensorizer(model, family.targets).decompose("tt", rank=1, seed=0)
        path = tmp_path / f"{name}.safetensors"
        adapter.save(path, bits=1, head_bits=1 if adapter.head else None)
        sizes[name] = header_bytes(path)
        torch.manual_seed(0)
        loaded = factnet.load(family.build(), path)
        assert loaded.group_shapes() == adapter.group_shapes(), name
    assert len(sizes) == 32 and max(sizes.values()) <= HEADER_LIMIT, sizes


# ---- bitwise round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "bits-1", "bits-2", "bits-4", "head-bits-2"])
@pytest.mark.parametrize("fmt", ROUND_TRIP_FORMATS)
def test_round_trip_outputs_bit_for_bit(fmt, storage, tmp_path):
    """A trained adapter saved and loaded onto a fresh model gives the saved adapter's outputs bit for bit: as
    held, in bfloat16 (the adapter's values rounded to it), trained and stored at 1, 2 or 4 bits (head too), or
    with only the head low-bit; the packs, split by hand in the documented order, hold the loaded values, and
    the file's bytes are the header plus the values as stored."""
    torch.manual_seed(0)
    base = tiny_vit().eval()
    model = copy.deepcopy(base)
    bits = int(storage[-1]) if storage.startswith("bits") else None
    head_bits = int(storage[-1]) if "bits" in storage else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (rank caps)
        adapter = factnet.Tensorizer(model).decompose(fmt, rank=2, seed=3, bits=bits, head_bits=head_bits)
    train(adapter)
    path = tmp_path / "a.safetensors"
    dtype = torch.bfloat16 if storage == "bfloat16" else None
    saved = adapter.save(path, dtype=dtype)
    if dtype is not None:  # the adapter as the file stores it
        with torch.no_grad():
            for g in adapter.group_names:
                adapter.group(g).assign({k: v.to(dtype).float() for k, v in adapter.group(g).trained_values().items()})
            for p in adapter.head_state().values():
                p.copy_(p.to(dtype).float())
    fresh = copy.deepcopy(base)
    loaded = factnet.load(fresh, path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    spec = factnet.file.info.load_spec(path)
    assert spec["factnet_format_version"] == 4 and spec["default_groups"]["by"] == "shape"
    assert spec.get("bits") == (None if head_bits is None else {"factors": bits, "head": head_bits, "group": 64})
    assert spec.get("dtype") == (None if dtype is None else "bfloat16")
    assert spec.get("held") == (None if dtype is not None or bits is not None else "float32")  # (as held: which)
    split = split_packs(path, adapter)
    for g in loaded.group_names:
        for k, value in loaded.group(g).trained_values(quantized=False).items():
            assert torch.equal(split[f"factors.{g}.{k}"].float(), value), (g, k)
    for n, value in loaded.head_state().items():
        assert torch.equal(split[f"head.{n}"].float(), value), n
    itemsize = 2 if dtype is not None else 4
    factors = [t.numel() for g in adapter.group_names for t in adapter.group(g).trained_values().values()]
    heads = [p.numel() for p in adapter.head_state().values()]
    head_bytes = sum(itemsize * n if head_bits is None else stored_bytes(n, head_bits) for n in heads)
    factor_bytes = sum(itemsize * n if bits is None else stored_bytes(n, bits) for n in factors)
    assert saved.head_bytes == head_bytes
    assert saved.bytes == os.path.getsize(path) == header_bytes(path) + factor_bytes + head_bytes


def test_low_bit_values_are_those_the_forward_used(tmp_path):
    """bits=2 on an adapter trained in full precision: the file holds `fake_quantize`'s values."""
    torch.manual_seed(0)
    base = tiny_vit().eval()
    adapter = factnet.Tensorizer(copy.deepcopy(base)).decompose("tucker", rank=3)
    train(adapter)
    adapter.save(tmp_path / "a.safetensors", bits=2, head_bits=4, group=16)
    loaded = factnet.load(copy.deepcopy(base), tmp_path / "a.safetensors")
    for g in adapter.group_names:
        for k, v in adapter.group(g).trained_values().items():
            assert torch.equal(loaded.group(g).trained_values(quantized=False)[k], fake_quantize(v, 2, 16)), k
    for n, v in adapter.head_state().items():
        assert torch.equal(loaded.head_state()[n], fake_quantize(v.detach(), 4, 16)), n


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_as_held_in_the_models_dtypes(dtype, tmp_path):
    """A float64 model's file holds float64 values; a bfloat16 model's holds float32 factors and a bfloat16
    head (``held`` names each), and loads back bit for bit."""
    torch.manual_seed(0)
    base = tiny_vit().to(dtype).eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    train(adapter)
    adapter.save(tmp_path / "a.safetensors")
    spec = factnet.file.info.load_spec(tmp_path / "a.safetensors")
    packs = safetensors.torch.load_file(str(tmp_path / "a.safetensors"))
    if dtype == torch.float64:
        assert spec["held"] == "float64" and list(packs) == ["float64"]
    else:
        assert spec["held"] == {"factors": "float32", "head.weight": "bfloat16", "head.bias": "bfloat16"}
        assert {k: v.numel() for k, v in packs.items()} == {"float32": adapter.num_parameters(),
                                                           "bfloat16": adapter.num_head_parameters()}
    fresh = copy.deepcopy(base)
    factnet.load(fresh, tmp_path / "a.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_stage_groups_and_listed_groups(tmp_path):
    """The default targets grouped by stage are named by their rule; other groupings are listed as templates."""
    torch.manual_seed(0)
    base = tiny_swin().eval()
    for by, rule in (("stage", "stage"), ({"attention": "*.attn.*", "mlp": "*.mlp.*"}, None)):
        model = copy.deepcopy(base)
        tensorizer = factnet.Tensorizer(model)
        if rule is None:  # (attention and MLP of one shape only: the first stage)
            tensorizer = factnet.Tensorizer(model, ["layers.0.*"]).group(by)
        else:
            tensorizer = tensorizer.group(by)
        adapter = tensorizer.decompose("cp", rank=2, name=str(rule))
        train(adapter)
        path = tmp_path / f"{rule}.safetensors"
        adapter.save(path)
        spec = factnet.file.info.load_spec(path)
        if rule is None:
            assert list(spec["groups"]) == ["attention", "mlp"] and "default_groups" not in spec
        else:
            assert spec["default_groups"]["by"] == "stage" and "groups" not in spec
        fresh = copy.deepcopy(base)
        loaded = factnet.load(fresh, path)
        assert loaded.group_names == adapter.group_names
        x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))


# ---- crafted files (valid checksum) -----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """A trained tiny-ViT adapter saved as version 4 in float32 and low-bit: ``(base, float path, low-bit path)``."""
    torch.manual_seed(0)
    base = tiny_vit().eval()
    adapter = factnet.Tensorizer(copy.deepcopy(base)).decompose("tt", rank=2)
    train(adapter)
    adapter.save(tmp_path / "float.safetensors")
    adapter.save(tmp_path / "low.safetensors", bits=2, head_bits=1)
    return base, tmp_path / "float.safetensors", tmp_path / "low.safetensors"


def _shorter(pack: str, by: int = 1):
    return lambda tensors: tensors.update({pack: tensors[pack][:-by]})


def _longer(pack: str, dtype: torch.dtype):
    return lambda tensors: tensors.update({pack: torch.cat([tensors.get(pack, torch.zeros(0, dtype=dtype)),
                                                            torch.zeros(3, dtype=dtype)])})


@pytest.mark.parametrize("which, edit_tensors, match", [
    ("float", _shorter("float32"), "float32: needs 533 values, holds 532"),
    ("float", _longer("float32", torch.float32), "does not hold the tensors its spec and this model need.*float32"),
    ("float", _longer("uint8", torch.uint8), "uint8: needs 0 values, holds 3"),
    ("float", lambda t: t.update(float16=t.pop("float32")), "tensor 'float16' .torch.float32"),
    ("float", lambda t: t.update(float32=t["float32"][:532].reshape(2, 266)), "flat packs named by their dtype"),
    ("float", lambda t: t.update(weights=t.pop("float32")), "holds the tensor 'weights'"),
    ("low", _shorter("uint8"), "uint8: needs [0-9]+ values, holds"),
    ("low", _shorter("float16", 2), "float16: needs [0-9]+ values, holds"),
    ("low", _longer("float32", torch.float32), "float32: needs 0 values, holds 3"),
], ids=["float-short", "float-long", "extra-pack", "misnamed-pack", "2d-pack", "foreign-name", "codes-short",
        "constants-short", "extra-float-pack"])
def test_a_pack_of_the_wrong_size_is_refused(saved, which, edit_tensors, match):
    base, plain, low = saved
    path = plain if which == "float" else low
    rewrite_spec(path, lambda spec: None, edit_tensors=edit_tensors)
    rejected(copy.deepcopy(base), path, match)


@pytest.mark.parametrize("which, edit, match", [
    ("float", lambda s: s.update(rank=3), r"needs [0-9,]+ values, holds"),
    ("float", lambda s: s["head_shapes"].update({"head.weight": [4, 48], "head.bias": [53]}),
     r"head.head.weight: expected \(5, 48\), got \(4, 48\)"),
    ("float", lambda s: s["head_shapes"].pop("head.bias"), "needs .* values, holds"),
    ("float", lambda s: s["head_shapes"].update({"head.weight": [240], "head.bias": [5]}),
     r"head.head.weight: expected \(5, 48\), got \(240,\)"),
    ("float", lambda s: s.update(head_shapes={"head.weight": [5, 48], "blocks.0.norm1.bias": [5]}),
     r"the model's head \['head'\] has parameters \['head.bias', 'head.weight'\], but .* saved "
     r"\['blocks.0.norm1.bias', 'head.weight'\]"),
    ("float", lambda s: s["default_groups"].update(sha256="0123abcd"), "another slice map .*load it onto"),
    ("float", lambda s: s["default_groups"].update(by="stage"), "another slice map"),
    ("float", lambda s: s["default_groups"].update(by="layer"), "default groups are by 'layer'"),
    ("float", lambda s: s["default_groups"].update(sha256="xyz"), "not 8 hex digits"),
    ("float", lambda s: s.update(groups=factnet.file.templates.group_templates(factnet.Tensorizer(tiny_vit()).groups)),
     "both groups and default_groups"),
    ("float", lambda s: s.pop("default_groups"), "malformed factnet spec .*at least one group"),
    ("float", lambda s: s.update(factors="iab,ja,kc"), "registered with factors"),
    ("float", lambda s: s.update(factors={"sigma": "iab", "u": "ja", "v": "kb"}), "malformed factnet spec"),
    ("float", lambda s: s.pop("held"), "does not say in which dtype"),
    ("float", lambda s: s.update(held={"factors": "float32"}), "does not say in which dtype head.head"),
    ("float", lambda s: s.update(held={"factors": "float32", "head.weight": "float32", "x": "float32"}),
     "values x were held"),
    ("float", lambda s: s.update(held="int8"), "held in 'int8'"),
    ("float", lambda s: s.update(dtype="float32"), "both a storage dtype and"),
    ("float", lambda s: s.update(held="float64"), "float64: needs"),
    ("float", lambda s: s.update(dropout=None), "malformed factnet spec"),
    ("float", lambda s: s.update(factnet_format_version=5), "factnet_format_version 5.*upgrade factnet"),
    ("low", lambda s: s.update(bits={"factors": 2, "head": 1}), "malformed factnet spec"),
    ("low", lambda s: s["bits"].update(factors=3), "stored in 3 bits"),
    ("low", lambda s: s["bits"].update(group=0), "group size 0"),
    ("low", lambda s: s["bits"].update(group=32), "needs [0-9]+ values, holds"),
    ("low", lambda s: s["bits"].update(factors=None, head=None), "store nothing low-bit"),
    ("low", lambda s: s["bits"].update(head=2), "uint8: needs"),
    ("low", lambda s: s["head_shapes"].update({"head.weight": [10**6, 10**6]}), "uint8: needs"),
    ("low", lambda s: s["head_shapes"].update({"head.weight": [0, 48]}), "not up to 8 positive sizes"),
], ids=["rank", "head-shapes-swapped", "head-shape-missing", "head-reshaped", "head-of-backbone", "digest",
        "rule-other", "rule-unknown", "digest-format", "both-maps", "no-map", "factor-letters", "factors-v2-style",
        "no-held", "held-partial", "held-unknown-key", "held-dtype", "dtype-and-held", "held-lies", "dropout-null",
        "newer-version", "bits-layout", "bits-width", "bits-group-0", "bits-group-other", "bits-nothing",
        "bits-head-lies", "head-huge", "head-zero"])
def test_crafted_version_4_specs_are_refused(saved, which, edit, match):
    base, plain, low = saved
    path = plain if which == "float" else low
    rewrite_spec(path, edit)
    rejected(copy.deepcopy(base), path, match)
