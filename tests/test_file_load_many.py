"""`factnet.load_many`: N files onto one base model equal N single loads; the base model is checked once per
fingerprint and the slices rebuilt once per slice map; all or nothing, with errors naming the file."""

from __future__ import annotations

import copy
import pathlib

import pytest
import torch
from conftest import assert_same_model, snapshot, tiny_vit
from io_support import factors_of, train

import factnet
import factnet.file.load

pytestmark = pytest.mark.usefixtures("one_thread")

# (format, rank, targets, include_head, dtype) of the files
KINDS = [
    ("tt", 2, None, True, None),
    ("tucker", 3, None, False, None),
    ("cp", 2, ["blocks.*.attn.qkv[q,v]"], True, torch.bfloat16),
    ("tt", 2, None, True, None),
    ("batch-matrix", 2, ["blocks.*.attn.qkv[q,v]"], False, None),
    ("tt", 3, None, True, torch.float16),
]


def head_state(adapter: factnet.Adapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.head_state().items()}


@pytest.fixture
def files(tmp_path) -> tuple[torch.nn.Module, list[pathlib.Path]]:
    torch.manual_seed(0)
    base = tiny_vit()
    paths = []
    for i, (fmt, rank, targets, include_head, dtype) in enumerate(KINDS):
        model = copy.deepcopy(base)
        adapter = factnet.Tensorizer(model, targets).decompose(fmt, rank=rank, scale=1.0 + i)
        train(adapter, seed=i)
        paths.append(tmp_path / f"task{i}.safetensors")
        adapter.save(paths[-1], include_head=include_head, dtype=dtype)
    return base, paths


def test_equals_single_loads(files):
    base, paths = files
    many, single = copy.deepcopy(base), copy.deepcopy(base)
    adapters = factnet.load_many(many, paths)
    for path in paths:
        factnet.load(single, path, name=path.stem)
    assert list(adapters) == [p.stem for p in paths] == many.factnet.names == single.factnet.names
    assert many.factnet.active == single.factnet.active == paths[-1].stem
    for name, adapter in adapters.items():
        other = single.factnet[name]
        assert adapter is many.factnet[name]
        assert (adapter.format.name, adapter.format.rank, adapter.settings, adapter.head) == (
            other.format.name, other.format.rank, other.settings, other.head)
        for key, value in factors_of(other).items():
            assert torch.equal(factors_of(adapter)[key], value), (name, key)
        for key, value in head_state(other).items():
            assert torch.equal(head_state(adapter)[key], value), (name, key)
    # the whole state (backbone, active head, every factor) bitwise
    state, expected = many.state_dict(), single.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], v) for k, v in expected.items())


def test_names_and_a_model_with_adapters(files):
    base, paths = files
    model = copy.deepcopy(base)
    first = factnet.load(model, paths[0], name="mine")
    adapters = factnet.load_many(model, paths[1:3], names=["a", "b"])
    assert list(adapters) == ["a", "b"] and model.factnet.names == ["mine", "a", "b"]
    assert model.factnet["mine"] is first and model.factnet.active == "b"
    assert factnet.load_many(model, []) == {} and model.factnet.names == ["mine", "a", "b"]


def test_base_checked_once_per_fingerprint_and_slices_once_per_map(files, monkeypatch):
    base, paths = files
    calls = {"base": 0, "rebuild": 0}
    for name, key in (("check_base", "base"), ("rebuild_templates", "rebuild"), ("rebuild_default", "rebuild")):
        original = getattr(factnet.file.load, name)

        def counted(*args, _original=original, _key=key):
            calls[_key] += 1
            return _original(*args)

        monkeypatch.setattr(factnet.file.load, name, counted)
    factnet.load_many(copy.deepcopy(base), [*paths, *paths], names=[f"n{i}" for i in range(2 * len(paths))])
    # one head, one base model; slice maps: the default targets and q, v only
    assert calls == {"base": 1, "rebuild": 2}


def unchanged(model, paths, match, **kwargs) -> str:
    """load_many raises FactnetError matching ``match``; the model, its adapters and heads are as they were."""
    before = snapshot(model)
    names = list(model.factnet.names) if hasattr(model, "factnet") else None
    active = model.factnet.active if names is not None else None
    heads = {n: head_state(model.factnet[n]) for n in names or []}
    with pytest.raises(factnet.FactnetError, match=match) as info:
        factnet.load_many(model, paths, **kwargs)
    assert_same_model(model, before)
    if names is not None:
        assert model.factnet.names == names and model.factnet.active == active
        for n, state in heads.items():
            assert all(torch.equal(head_state(model.factnet[n])[k], v) for k, v in state.items())
    return str(info.value)


@pytest.mark.parametrize("with_adapter", [False, True], ids=["bare", "with-an-adapter"])
def test_all_or_nothing_on_a_corrupt_file(files, with_adapter):
    base, paths = files
    model = copy.deepcopy(base)
    if with_adapter:
        factnet.load(model, paths[0], name="mine")
    data = bytearray(paths[-1].read_bytes())
    data[-3] ^= 0xFF
    paths[-1].write_bytes(bytes(data))
    message = unchanged(model, paths, "SHA-256 does not match")
    assert str(paths[-1]) in message


def test_all_or_nothing_on_another_base_model(files, tmp_path):
    base, paths = files
    other = tmp_path / "other.safetensors"
    factnet.Tensorizer(tiny_vit(depth=3)).decompose("tt", rank=2).save(other)
    message = unchanged(copy.deepcopy(base), [*paths[:2], other, paths[2]], "does not fit this model")
    assert message.startswith(f"{other} does not fit this model: it was saved from a base model with 12 matrices")


def test_all_or_nothing_when_attaching_fails(files, monkeypatch):
    """An error while adding the adapters (after every check passed) removes the ones added."""
    base, paths = files
    model = copy.deepcopy(base)
    factnet.load(model, paths[0], name="mine")
    model.factnet["mine"].activate()
    attach, count = factnet.file.load._attach, []

    def failing(*args, **kwargs):
        count.append(1)
        if len(count) == 4:
            raise RuntimeError("disk on fire")
        return attach(*args, **kwargs)

    monkeypatch.setattr(factnet.file.load, "_attach", failing)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="disk on fire"):
        factnet.load_many(model, paths)
    assert_same_model(model, before)
    assert model.factnet.names == ["mine"] and model.factnet.active == "mine"


def test_name_errors(files, tmp_path):
    base, paths = files
    model = copy.deepcopy(base)
    (tmp_path / "again").mkdir()
    twin = tmp_path / "again" / paths[1].name
    twin.write_bytes(paths[1].read_bytes())
    message = unchanged(model, [paths[0], paths[1], twin], "would both be adapter 'task1'")
    assert str(twin) in message and str(paths[1]) in message
    dotted = tmp_path / "a.b.safetensors"
    dotted.write_bytes(paths[0].read_bytes())
    assert str(dotted) in unchanged(model, [dotted], "adapter names are non-empty strings without dots")
    unchanged(model, paths[:2], "2 files but 1 names", names=["x"])
    unchanged(model, str(paths[0]), "takes a list of adapter files")
    factnet.load(model, paths[0], name="task0")
    assert str(paths[0]) in unchanged(model, paths[:2], "already has an adapter named 'task0'")


def test_progress_bar(files, capsys):
    base, paths = files
    factnet.load_many(copy.deepcopy(base), paths[:2], progress=True)
    assert "load_many" in capsys.readouterr().err
    factnet.load_many(copy.deepcopy(base), paths[:2], progress=False)
    assert capsys.readouterr().err == ""
