"""Low-bit adapter files (``save(bits=b, head_bits=b)``): every registered format at every width comes back
exactly as stored, the file's bytes are the formula's, the error of the stored values is reported, and a
crafted low-bit file is a `FactnetError` before anything is allocated from it."""

from __future__ import annotations

import copy
import os

import pytest
import safetensors.torch
import torch
from conftest import tiny_vit
from io_support import FORMATS, head_parameters, read_header, rejected, rewrite_spec, train
from legacy_files import save_legacy

import factnet
import factnet.file.info
from factnet.quant import BITS, fake_quantize, stored_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapted(fmt: str) -> tuple[torch.nn.Module, torch.nn.Module, factnet.Adapter]:
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    model = copy.deepcopy(base)
    rank = min(2, *(factnet.get_format(fmt, 2).max_rank(*s) for s in factnet.Tensorizer(model).group_shapes().values()))
    adapter = factnet.Tensorizer(model).decompose(fmt, rank=rank, scale=1.5)
    train(adapter)
    return base, model, adapter


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_low_bit_files_come_back_as_stored(fmt, bits, tmp_path):
    base, model, adapter = _adapted(fmt)
    path = tmp_path / "a.safetensors"
    saved = adapter.save(path, bits=bits, head_bits=bits, group=16)
    loaded = factnet.load(copy.deepcopy(base), path)
    for group in adapter.group_names:  # exactly the stored values: what fake_quantize gives in training
        for key, factor in adapter.group(group).factors.items():
            assert torch.equal(loaded.group(group).factors[key], fake_quantize(factor, bits, 16).detach()), key
    heads = head_parameters(model, adapter)
    for name, value in head_parameters(loaded.model, loaded).items():
        assert torch.equal(value, fake_quantize(heads[name], bits, 16)), name
    sizes = [t.numel() for g in adapter.group_names for t in adapter.group(g).factors.values()]
    sizes += [t.numel() for t in heads.values()]
    header, _ = read_header(path)
    assert os.path.getsize(path) == saved.bytes == 8 + header + sum(stored_bytes(n, bits, 16) for n in sizes)
    assert set(saved.errors) == {f"factors.{g}.{k}" for g in adapter.group_names
                                 for k in adapter.group(g).factors} | {f"head.{n}" for n in heads}
    assert all(0 < error < 1.5 for error in saved.errors.values())
    spec = factnet.file.info.load_spec(path)  # the shapes follow from the format, the slices and the head's shapes
    assert spec["bits"] == {"factors": bits, "head": bits, "group": 16} and "held" not in spec
    assert spec["head_shapes"] == {n: list(t.shape) for n, t in heads.items()}
    assert set(safetensors.torch.load_file(str(path))) == {"uint8", "float16"}


def test_more_bits_store_closer_values_and_a_head_not_low_bit_is_exact(tmp_path):
    base, model, adapter = _adapted("tt")
    errors = [max(adapter.save(tmp_path / f"{b}.safetensors", bits=b).errors.values()) for b in BITS]
    assert errors == sorted(errors, reverse=True)
    loaded = factnet.load(copy.deepcopy(base), tmp_path / "4.safetensors")  # head not low-bit: as it was
    heads = head_parameters(model, adapter)
    for name, value in head_parameters(loaded.model, loaded).items():
        assert value.dtype == torch.float64 and torch.equal(value, heads[name]), name


@pytest.mark.parametrize("bits, head_bits, group", [(3, None, 64), (None, 16, 64), (True, None, 64), (4, None, 0)])
def test_bad_bits_are_errors(bits, head_bits, group, tmp_path):
    _, _, adapter = _adapted("tt")
    with pytest.raises(factnet.FactnetError, match="bits must be|group must be"):
        adapter.save(tmp_path / "a.safetensors", bits=bits, head_bits=head_bits, group=group)
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["bits"].update(factors=3), "stored in 3 bits"),
    (lambda s: s["bits"].update(group=0), "group size 0"),
    (lambda s: s["bits"]["shapes"].update({"factors.blocks_0.u": [2 ** 50]}), "positive sizes of at most"),
    (lambda s: s["bits"]["shapes"].update({next(iter(s["bits"]["shapes"])): [10 ** 9]}), "needs codes"),
    (lambda s: s["bits"].update(head=None), "not stored low-bit|needs"),
    (lambda s: s["bits"].pop("group"), "malformed factnet spec"),
])
def test_crafted_low_bit_files_are_errors(edit, match, tmp_path):
    """Version 3 (tests/legacy_files.py): its ``bits`` lists each low-bit tensor's shape. (Version 4's:
    tests/test_file_packs.py.)"""
    base, _, adapter = _adapted("tt")
    path = tmp_path / "a.safetensors"
    save_legacy(adapter, path, bits=2, head_bits=4)
    rewrite_spec(path, edit)
    rejected(copy.deepcopy(base), path, match)
