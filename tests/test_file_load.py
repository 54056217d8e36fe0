"""Files of format versions 2 and 3, written by the factnet before version 4 (tests/v23_fixture.py), still load
to the outputs they gave then, bit for bit; the tests' writer of those versions (tests/legacy_files.py) writes
what that factnet wrote; version-2 files loaded and saved again are version-4 files of the same adapter."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from io_support import factors_of, head_parameters
from legacy_files import save_legacy
from safetensors import safe_open
from v23_fixture import DATA, FILES, OUTPUTS, build, input_for, outputs

import factnet
import factnet.file.info
from factnet.quant import Quantized, dequantize, stored_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _stored_values(name: str) -> dict[str, torch.Tensor]:
    """The values a version-2/3 file holds, read with safetensors and `factnet.quant` only: ``{key: values}``."""
    path = DATA / f"{name}.safetensors"
    raw = safetensors.torch.load_file(str(path))
    spec = factnet.file.info.load_spec(path)
    bits = spec.get("bits")
    if bits is None:
        return raw
    values = {key: value for key, value in raw.items() if key.rpartition(".")[0] not in bits["shapes"]}
    for key, shape in bits["shapes"].items():
        width = bits[key.partition(".")[0]]
        values[key] = dequantize(Quantized(raw[f"{key}.codes"], raw[f"{key}.scale"], raw.get(f"{key}.offset"),
                                           tuple(shape), width, bits["group"]))
    return values


def test_old_files_load_to_the_outputs_they_gave():
    """Each file's outputs now (`outputs`: one thread, the kernel's default variants) against those the factnet
    that wrote it gave: bit for bit on the machine that wrote them (this one), within rounding on another."""
    now, then = outputs(), safetensors.torch.load_file(str(OUTPUTS))
    assert list(now) == list(FILES) and sorted(then) == sorted(FILES)
    for name, output in now.items():
        assert output.dtype == then[name].dtype, name
        torch.testing.assert_close(output, then[name], msg=name)


@pytest.mark.parametrize("name", list(FILES))
def test_old_files_load_the_values_they_hold(name):
    path = DATA / f"{name}.safetensors"
    assert factnet.file.info.load_spec(path)["factnet_format_version"] == int(name[1])
    model = build(name)
    adapter = factnet.load(model, path)
    stored = _stored_values(name)  # every factor and head parameter is the file's value, in the model's dtype
    loaded = {f"factors.{g}.{k}": v for g in adapter.group_names  # (the values the increment uses)
              for k, v in adapter.group(g).trained_values(quantized=False).items()}
    loaded |= {f"head.{n}": v for n, v in head_parameters(model, adapter).items() if f"head.{n}" in stored}
    assert sorted(loaded) == sorted(stored)
    for key, value in stored.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


def test_old_files_load_many():
    """load_many of the float32 files onto one model: each adapter's outputs are those `factnet.load` gives."""
    names = [n for n in FILES if FILES[n][0] == torch.float32]
    model = build(names[0])
    adapters = factnet.load_many(model, [DATA / f"{n}.safetensors" for n in names])
    assert list(adapters) == names
    x = input_for(torch.float32)
    with torch.no_grad():
        for name in names:
            model.factnet.activate(name)
            alone = build(name)
            factnet.load(alone, DATA / f"{name}.safetensors")
            assert torch.equal(model(x), alone(x)), name


def _trained(name: str) -> factnet.Adapter:
    """The adapter tests/v23_fixture.py saved as ``name``, trained the same way."""
    _, settings, by, targets, _ = FILES[name]
    adapter = factnet.Tensorizer(build(name), targets).group(by).decompose(**settings)
    generator = torch.Generator().manual_seed(list(FILES).index(name))
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return adapter


@pytest.mark.parametrize("name", list(FILES))
def test_the_legacy_writer_writes_what_factnet_wrote(name, tmp_path):
    """tests/legacy_files.py, used to write old files in other tests, gives the fixture's spec and tensors."""
    path = tmp_path / "a.safetensors"
    save_legacy(_trained(name), path, **FILES[name][4])
    with safe_open(str(path), "pt") as mine, safe_open(str(DATA / f"{name}.safetensors"), "pt") as theirs:
        assert mine.metadata() == theirs.metadata() and sorted(mine.keys()) == sorted(theirs.keys())
        for key in theirs.keys():
            assert torch.equal(mine.get_tensor(key), theirs.get_tensor(key)), key


@pytest.mark.parametrize("name", list(FILES))
def test_an_old_file_saved_again_is_version_4_of_the_same_adapter(name, tmp_path):
    model = build(name)
    adapter = factnet.load(model, DATA / f"{name}.safetensors")
    settings = FILES[name][4]  # (a low-bit file loads trained low-bit: saved again, the same values)
    again = tmp_path / "again.safetensors"
    adapter.save(again, **settings)
    assert factnet.file.info.load_spec(again)["factnet_format_version"] == 4
    fresh = build(name)
    factnet.load(fresh, again)
    with torch.no_grad():
        x = input_for(FILES[name][0])
        assert torch.equal(fresh(x), model(x))


def test_version_2_and_4_files_of_one_adapter_load_alike():
    """The same trained adapter as a version-2 file (the legacy writer) and a version-4 file: equal factors,
    head and outputs."""
    adapter = _trained("v2_tt_head")
    with tempfile.TemporaryDirectory() as folder:
        old, new = Path(folder) / "v2.safetensors", Path(folder) / "v4.safetensors"
        save_legacy(adapter, old)
        adapter.save(new)
        assert [factnet.file.info.load_spec(p)["factnet_format_version"] for p in (old, new)] == [2, 4]
        models = [build("v2_tt_head") for _ in range(2)]
        loaded = [factnet.load(m, p) for m, p in zip(models, (old, new))]
    for (key, a), (_, b) in zip(factors_of(loaded[0]).items(), factors_of(loaded[1]).items()):
        assert torch.equal(a, b), key
    x = input_for(torch.float32)
    with torch.no_grad():
        assert torch.equal(models[0](x), models[1](x))
    assert loaded[1].settings == loaded[0].settings and loaded[1].head == loaded[0].head


@pytest.mark.parametrize("name", list(FILES))
def test_file_info_reads_every_version_alike(name, tmp_path):
    """`factnet.file_info` of a version-2/3 file and of the version-4 file of the same adapter: the same head,
    shapes and bytes as stored; the version-4 header is the smaller."""
    model = build(name)
    adapter = factnet.load(model, DATA / f"{name}.safetensors")
    again = tmp_path / "again.safetensors"
    settings = FILES[name][4]
    head_bits = FILES[name][1].get("head_bits")  # (a loaded adapter trains its head as held: given again)
    adapter.save(again, **settings, **({"head_bits": head_bits} if head_bits else {}))
    old, new = factnet.file_info(DATA / f"{name}.safetensors"), factnet.file_info(again)
    assert (old.version, new.version) == (int(name[1]), 4) and new.spec == factnet.file.info.load_spec(again)
    head = dict(model.head.named_parameters(prefix="head")) if settings.get("include_head", True) else {}
    assert old.head_shapes == new.head_shapes == {n: tuple(p.shape) for n, p in head.items()}
    bits, group = settings.get("head_bits") or FILES[name][1].get("head_bits"), settings.get("group", 64)
    dtype = settings.get("dtype")
    expected = sum(stored_bytes(p.numel(), bits, group) if bits else
                   p.numel() * (dtype or p.dtype).itemsize for p in head.values())
    assert old.head_bytes == new.head_bytes == expected
    assert new.bytes == os.path.getsize(again) == new.header_bytes + new.factor_bytes + new.head_bytes
    assert old.factor_bytes == new.factor_bytes and new.header_bytes < old.header_bytes


def test_file_info_of_version_1():
    info = factnet.file_info(DATA / "v1_tt_head.safetensors")
    assert info.version == 1 and info.head_shapes == {"head.weight": (3, 16), "head.bias": (3,)}
    assert info.head_bytes == 4 * 51 and info.bytes == os.path.getsize(DATA / "v1_tt_head.safetensors")
