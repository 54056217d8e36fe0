"""Files of format versions 2 and 3, written by the factnet before version 4 (tests/v23_fixture.py), still load
to the outputs they gave then, bit for bit; the tests' writer of those versions (tests/legacy_files.py) writes
what that factnet wrote."""

from __future__ import annotations


import pytest
import safetensors.torch
import torch
from io_support import factors_of, head_parameters
from legacy_files import save_legacy
from safetensors import safe_open
from v23_fixture import DATA, FILES, OUTPUTS, build, input_for, outputs

import factnet
import factnet.io
from factnet.quant import Quantized, dequantize

pytestmark = pytest.mark.usefixtures("one_thread")


def _stored_values(name: str) -> dict[str, torch.Tensor]:
    """The values a version-2/3 file holds, read with safetensors and `factnet.quant` only: ``{key: values}``."""
    path = DATA / f"{name}.safetensors"
    raw = safetensors.torch.load_file(str(path))
    spec = factnet.io.load_spec(path)
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
    assert factnet.io.load_spec(path)["factnet_format_version"] == int(name[1])
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
