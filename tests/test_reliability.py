"""Reliability acceptance: a table of bad inputs across the whole API. Each raises `FactnetError` with a
message naming the problem and leaves the model exactly as it was (every parameter and buffer bitwise,
module structure and types, requires_grad, train/eval). (Repetition: tests/test_repetition.py.)"""

from __future__ import annotations

import math
import pathlib
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import (
    TinyGPT2,
    TinyNet,
    assert_same_model,
    randomize_factors,
    snapshot,
    tiny_torchvision_vit,
    tiny_vit,
)
from torch import nn

import factnet
import factnet.file.container
import factnet.file.info

pytestmark = pytest.mark.usefixtures("one_thread")


class _HeadOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "tiny": lambda: TinyNet(d=4, odd=True).double(),  # qkv 12x4, proj 4x4, fc1 16x4, fc2 4x16, odd 5x4, head
    "vit": lambda: tiny_vit(),
    "vit-deep": lambda: tiny_vit(depth=3),
    "gpt2": lambda: TinyGPT2(),  # conftest's Conv1D, not transformers'
    "mha": lambda: tiny_torchvision_vit(),
    "conv-only": lambda: nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 3)),
    "head-only": _HeadOnly,
}


class Env:
    """A fresh model of one kind, a scratch directory and ways to prepare state before the bad call."""

    def __init__(self, kind: str, tmp: pathlib.Path) -> None:
        torch.manual_seed(0)
        self.kind, self.tmp = kind, tmp
        self.model = MODELS[kind]()

    def adapter(self, fmt: str = "tt", rank: int = 2, targets: list[str] | None = None, **kwargs) -> factnet.Adapter:
        adapter = factnet.Tensorizer(self.model, targets).decompose(fmt, rank=rank, **kwargs)
        randomize_factors(adapter, std=0.3)
        return adapter

    def saved(self, build: Callable[[], nn.Module] | None = None, name: str = "a.safetensors") -> pathlib.Path:
        """A good adapter file, saved from another model (of this kind unless ``build`` says otherwise)."""
        other = (build or MODELS[self.kind])()
        adapter = factnet.Tensorizer(other).decompose("tt", rank=2)
        randomize_factors(adapter, std=0.3)
        adapter.save(self.tmp / name)
        return self.tmp / name

    def file(self, data: bytes, name: str = "bad.safetensors") -> pathlib.Path:
        (self.tmp / name).write_bytes(data)
        return self.tmp / name

    def damaged(self, edit: Callable[[bytearray], None]) -> pathlib.Path:
        data = bytearray(self.saved().read_bytes())
        edit(data)
        return self.file(bytes(data))


@dataclass(frozen=True)
class Bad:
    """One bad input: ``setup(env)`` prepares any state and returns the bad call; ``match`` is a regex the
    FactnetError message must match."""

    id: str
    model: str
    setup: Callable[[Env], Callable[[], Any]]
    match: str
    marks: tuple = ()


def _tz(env: Env, *args, **kwargs) -> factnet.Tensorizer:
    return factnet.Tensorizer(env.model, *args, **kwargs)


def _int8_fc1(env: Env) -> Callable[[], Any]:
    env.model.fc1.weight = nn.Parameter(torch.zeros(16, 4, dtype=torch.int8), requires_grad=False)
    return lambda: _tz(env)


def _merged(env: Env) -> factnet.Adapter:
    adapter = env.adapter()
    adapter.merge()
    return adapter


def _detached(env: Env) -> factnet.Adapter:
    adapter = env.adapter()
    adapter.detach()
    return adapter


def _diverged(env: Env) -> Callable[[], Any]:
    adapter = env.adapter()
    with torch.no_grad():
        next(iter(adapter.group(adapter.group_names[0]).factors.values()))[0].fill_(math.inf)
    return adapter.merge


def _state(env: Env, **changes) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in env.model.state_dict().items()}
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


def _nan_fc1(env: Env) -> dict[str, torch.Tensor]:
    state = _state(env)
    state["fc1.weight"][0, 0] = math.nan
    return state


def _spec_edit(env: Env, edit: Callable[[dict], None]) -> pathlib.Path:
    """A saved file whose spec is edited and re-signed with a matching checksum (a crafted file)."""
    import json

    path = env.saved()
    tensors = safetensors.torch.load_file(str(path))
    spec = factnet.file.info.load_spec(path)
    edit(spec)
    text = json.dumps(spec)
    safetensors.torch.save_file(tensors, str(path), metadata={"factnet": text,
                                                              "factnet.sha256": factnet.file.container.checksum(text, tensors)})
    return path


def _flip(position: Callable[[bytearray], int]) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        data[position(data)] ^= 0xFF

    return edit


def _nonempty_dir(env: Env) -> pathlib.Path:
    (env.tmp / "lora").mkdir()
    (env.tmp / "lora" / "README.md").write_text("mine")
    return env.tmp / "lora"


BAD: list[Bad] = [
    # ---- Tensorizer: model and targets
    Bad("not-a-module", "tiny", lambda e: lambda: factnet.Tensorizer({"weight": torch.ones(2, 2)}), "nn.Module"),
    Bad("no-adaptable-matrix", "conv-only", lambda e: lambda: _tz(e), "no Linear, 1x1 Conv2d, Conv1D"),
    Bad("only-a-head", "head-only", lambda e: lambda: _tz(e), "no default targets"),
    Bad("pattern-matches-nothing", "tiny", lambda e: lambda: _tz(e, ["blocks.*.attn.qkv"]),
        r"target 'blocks.\*.attn.qkv' matches no weight matrix"),
    Bad("pattern-is-a-substring", "tiny", lambda e: lambda: _tz(e, ["fc"]), "'fc' matches no weight matrix"),
    Bad("empty-selection", "tiny", lambda e: lambda: _tz(e, ["qkv[]"]), "empty selection"),
    Bad("unknown-block-label", "tiny", lambda e: lambda: _tz(e, ["qkv[x]"]),
        r"has blocks \['q', 'k', 'v'\], not \['x'\]"),
    Bad("block-index-out-of-range", "tiny", lambda e: lambda: _tz(e, ["fc1[4]"]), r"not \['4'\]"),
    Bad("malformed-pattern", "tiny", lambda e: lambda: _tz(e, ["qkv[q"]), "bad target pattern 'qkv\\[q'"),
    Bad("empty-pattern", "tiny", lambda e: lambda: _tz(e, [""]), "bad target pattern ''"),
    Bad("non-string-pattern", "tiny", lambda e: lambda: _tz(e, [42]), "bad target pattern 42"),
    Bad("overlapping-patterns", "tiny", lambda e: lambda: _tz(e, ["qkv", "qkv[q]"]),
        r"slice qkv\[q\] is selected by both"),
    Bad("empty-target-list", "tiny", lambda e: lambda: _tz(e, []).decompose("tt", rank=2), "targets is empty"),
    Bad("integer-weights", "tiny", _int8_fc1, "fc1 has torch.int8 weights.*floating-point"),
    # ---- grouping
    Bad("group-mixes-shapes", "tiny", lambda e: lambda: _tz(e).group({"all": ["*"]}), "group 'all' mixes slice shapes"),
    Bad("group-regex-misses-a-slice", "tiny", lambda e: lambda: _tz(e, ["qkv"]).group(r"(qkv)\[[qk]\]"),
        r"does not match slice qkv\[v\]"),
    Bad("group-regex-invalid", "tiny", lambda e: lambda: _tz(e, ["qkv"]).group("(unclosed"), "valid regex"),
    Bad("group-dict-misses-a-slice", "tiny", lambda e: lambda: _tz(e, ["qkv", "fc1"]).group({"attention": "qkv"}),
        r"fc1\[0\] matches no group"),
    Bad("group-dict-two-groups", "tiny", lambda e: lambda: _tz(e, ["qkv", "fc1"]).group({"a": ["qkv", "fc1"],
                                                                                         "b": "fc1[0]"}),
        "several groups"),
    Bad("group-callable-gives-none", "tiny", lambda e: lambda: _tz(e, ["qkv"]).group(lambda piece: None),
        "expected a non-empty group name"),
    Bad("group-by-stage-without-index", "tiny", lambda e: lambda: _tz(e).group("stage"), "no stage index"),
    Bad("group-by-a-number", "tiny", lambda e: lambda: _tz(e, ["qkv"]).group(42), "group by 42"),
    Bad("group-names-collide", "tiny",
        lambda e: lambda: _tz(e, ["qkv", "fc1"]).group({"a.b": "qkv", "a_b": "fc1"}).decompose("tt", rank=2),
        "collide once dots become underscores"),
    # ---- decompose
    Bad("unknown-format", "tiny", lambda e: lambda: _tz(e).decompose("tensor-train", rank=2),
        "unknown format 'tensor-train'; known formats: batch-matrix, cp"),
    Bad("rank-zero", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=0),
        "rank must be a positive integer, got 0"),
    Bad("rank-negative", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=-1), "positive integer, got -1"),
    Bad("rank-float", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2.5), "positive integer, got 2.5"),
    Bad("rank-bool", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=True), "positive integer, got True"),
    Bad("rank-string", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank="4"), "positive integer, got '4'"),
    Bad("rank-missing", "tiny", lambda e: lambda: _tz(e).decompose("tt"), "'tt' needs a rank"),
    Bad("scale-nan", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2, scale=math.nan), "scale must be a"),
    Bad("scale-inf", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2, scale=math.inf), "scale must be a"),
    Bad("scale-string", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2, scale="2"), "scale must be a finite"),
    Bad("dropout-one", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2, dropout=1.0),
        r"dropout must be in \[0, 1\)"),
    Bad("dropout-negative", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2, dropout=-0.1), "dropout must be"),
    Bad("dropout-nan", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2, dropout=math.nan), "dropout must be"),
    Bad("unknown-head", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2, head=["classifier"]),
        r"head \['classifier'\] is not a submodule"),
    Bad("adapter-name-taken", "tiny", lambda e: (e.adapter(), lambda: _tz(e).decompose("cp", rank=2))[1],
        "already has an adapter named 'default'"),
    Bad("adapter-name-with-dot", "tiny", lambda e: lambda: _tz(e).decompose("tt", rank=2, name="a.b"),
        "adapter names are non-empty strings without dots"),
    # ---- lifecycle
    Bad("merge-twice", "tiny", lambda e: _merged(e).merge, "already merged"),
    Bad("unmerge-without-merge", "tiny", lambda e: e.adapter().unmerge, "not merged"),
    Bad("detach-twice", "tiny", lambda e: _detached(e).detach, "detached"),
    Bad("merge-after-detach", "tiny", lambda e: _detached(e).merge, "detached"),
    Bad("detach-while-merged", "tiny", lambda e: _merged(e).detach, "is merged.*unmerge\\(\\) first"),
    Bad("merge-non-finite-factors", "tiny", _diverged, "non-finite values into .*nothing was changed"),
    Bad("merge-an-inactive-adapter", "tiny",
        lambda e: (lambda first: (e.adapter(name="second"), first.merge)[1])(e.adapter(name="first")),
        "'first' is not the active one"),
    Bad("add-while-merged", "tiny", lambda e: (_merged(e), lambda: _tz(e).decompose("tt", rank=2, name="x"))[1],
        "is merged into the weights; unmerge"),
    Bad("activate-unknown-adapter", "tiny", lambda e: (e.adapter(), lambda: e.model.factnet.activate("zzz"))[1],
        "no adapter named 'zzz'"),
    Bad("delta-weight-of-unadapted-matrix", "tiny",
        lambda e: (lambda a: lambda: a.delta_weight("fc1"))(e.adapter(targets=["qkv"])), "'fc1' is not adapted"),
    Bad("unknown-group", "tiny", lambda e: (lambda a: lambda: a.group("8x8"))(e.adapter()), "no group '8x8'"),
    # ---- save
    Bad("save-to-a-directory", "tiny", lambda e: (lambda a: lambda: a.save(e.tmp))(e.adapter()), "is a directory"),
    Bad("save-into-a-missing-directory", "tiny",
        lambda e: (lambda a: lambda: a.save(e.tmp / "no" / "a.safetensors"))(e.adapter()), "does not exist; create it"),
    Bad("save-a-non-adapter", "tiny", lambda e: lambda: factnet.save(e.model, e.tmp / "a.safetensors"),
        "needs a factnet Adapter, got TinyNet"),
    Bad("save-a-detached-adapter", "tiny", lambda e: (lambda a: lambda: a.save(e.tmp / "a.safetensors"))(_detached(e)),
        "detached"),
    Bad("save-to-a-non-path", "tiny", lambda e: (lambda a: lambda: a.save(3.5))(e.adapter()), "expected a file path"),
    # ---- load
    Bad("load-truncated-file", "tiny",
        lambda e: (lambda p: lambda: factnet.load(e.model, e.file(p.read_bytes()[:-7])))(e.saved()),
        "truncated or corrupt"),
    Bad("load-file-cut-in-the-header", "tiny",
        lambda e: (lambda p: lambda: factnet.load(e.model, e.file(p.read_bytes()[:40])))(e.saved()),
        "truncated or corrupt"),
    Bad("load-flipped-tensor-byte", "tiny", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        e.damaged(_flip(lambda d: len(d) - 3))), "SHA-256 does not match"),
    Bad("load-flipped-header-byte", "tiny", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        e.damaged(_flip(lambda d: 100))), "corrupt"),
    Bad("load-foreign-safetensors", "tiny", lambda e: (
        safetensors.torch.save_file({"w": torch.ones(2)}, str(e.tmp / "f.safetensors")),
        lambda: factnet.load(e.model, e.tmp / "f.safetensors"))[1], "not a factnet adapter"),
    Bad("load-random-bytes", "tiny", lambda e: lambda: factnet.load(e.model, e.file(random.Random(1).randbytes(999))),
        "truncated or corrupt"),
    Bad("load-a-pickle", "tiny", lambda e: lambda: factnet.load(e.model, e.file(pickle.dumps({"u": [1.0]}))),
        "truncated or corrupt"),
    Bad("load-an-empty-file", "tiny", lambda e: lambda: factnet.load(e.model, e.file(b"")), "truncated or corrupt"),
    Bad("load-missing-file", "tiny", lambda e: lambda: factnet.load(e.model, e.tmp / "none.safetensors"),
        "does not exist"),
    Bad("load-a-directory", "tiny", lambda e: lambda: factnet.load(e.model, e.tmp), "is a directory"),
    Bad("load-onto-a-non-module", "tiny", lambda e: (lambda p: lambda: factnet.load({"x": 1}, p))(e.saved()),
        "needs a torch.nn.Module"),
    Bad("load-onto-a-deeper-model", "vit-deep", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        e.saved(tiny_vit)), "with 8 matrices outside the head .*this model has 12 .*default targets"),
    Bad("load-onto-a-shallower-model", "vit", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        e.saved(lambda: tiny_vit(depth=3))), "with 12 matrices outside the head .*this model has 8 "),
    Bad("load-onto-a-wider-model", "vit", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        e.saved(lambda: tiny_vit(embed_dim=60))), r"with 8 matrices .*fingerprint [0-9a-f]{16}\), this model has 8"),
    Bad("load-onto-another-architecture", "tiny", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        e.saved(tiny_vit)), "does not fit this model"),
    Bad("load-onto-another-head-size", "vit", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        e.saved(lambda: tiny_vit(num_classes=9))), r"head.head.weight: expected \(5, 48\), got \(9, 48\)"),
    Bad("load-float32-file-onto-float64-model", "tiny", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        e.saved(lambda: TinyNet(d=4, odd=True))), "float32 tensors but the model would take torch.float64"),
    Bad("load-newer-format-version", "tiny", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        _spec_edit(e, lambda s: s.update(factnet_format_version=7))), "version 7.*upgrade factnet"),
    Bad("load-unregistered-format", "tiny", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        _spec_edit(e, lambda s: s.update(format="block-term"))), "'block-term' is not registered"),
    Bad("load-malformed-spec", "tiny", lambda e: (lambda p: lambda: factnet.load(e.model, p))(
        _spec_edit(e, lambda s: s.update(groups=[]))), "malformed factnet spec"),
    # ---- export
    Bad("export-into-a-non-empty-directory", "tiny",
        lambda e: (lambda a, d: lambda: factnet.export_lora(a, d))(e.adapter(), _nonempty_dir(e)), "is not empty"),
    Bad("export-onto-a-file", "tiny",
        lambda e: (lambda a: lambda: factnet.export_lora(a, e.file(b"x", "lora")))(e.adapter()), "is not a directory"),
    Bad("export-max-rank-zero", "tiny",
        lambda e: (lambda a: lambda: factnet.export_lora(a, e.tmp / "l", max_rank=0))(e.adapter()),
        "max_rank must be a positive integer"),
    Bad("export-a-detached-adapter", "tiny",
        lambda e: (lambda a: lambda: factnet.export_lora(a, e.tmp / "l"))(_detached(e)), "detached"),
    Bad("export-to-a-non-path", "tiny", lambda e: (lambda a: lambda: factnet.export_lora(a, None))(e.adapter()),
        "expected a directory path"),
    Bad("export-a-non-adapter", "tiny", lambda e: lambda: factnet.export_lora(e.model, e.tmp / "l"),
        "needs a factnet Adapter"),
    Bad("export-a-conv1d-peft-cannot-wrap", "gpt2",
        lambda e: (lambda a: lambda: factnet.export_lora(a, e.tmp / "l"))(e.adapter()),
        "only transformers.pytorch_utils.Conv1D"),
    Bad("export-multihead-attention-out-proj", "mha",
        lambda e: (lambda a: lambda: factnet.export_lora(a, e.tmp / "l"))(e.adapter()), "out_proj.*peft#3774"),
    # ---- compress
    Bad("compress-mismatched-shapes", "tiny",
        lambda e: lambda: factnet.compress(e.model, _state(e, qkv__weight=torch.zeros(3, 3)), "tt", 2, progress=False),
        r"finetuned 'qkv.weight' has shape \(3, 3\), base has \(12, 4\)"),
    Bad("compress-missing-weight", "tiny",
        lambda e: lambda: factnet.compress(e.model, _state(e, fc1__weight=None), "tt", 2, progress=False),
        "finetuned has no weight 'fc1.weight'"),
    Bad("compress-non-finite", "tiny",
        lambda e: lambda: factnet.compress(e.model, _nan_fc1(e), "tt", 2, progress=False),
        "'fc1.weight' has non-finite values"),
    Bad("compress-integer-finetuned", "tiny", lambda e: lambda: factnet.compress(
        e.model, _state(e, fc1__weight=torch.zeros(16, 4, dtype=torch.int8)), "tt", 2, progress=False),
        "torch.int8; compress needs floating-point"),
    Bad("compress-scale-zero", "tiny", lambda e: lambda: factnet.compress(e.model, _state(e), "tt", 2, scale=0,
                                                                          progress=False), "non-zero number, got 0"),
    Bad("compress-format-without-decomposition", "tiny",
        lambda e: lambda: factnet.compress(e.model, _state(e), "user-tt", 2, progress=False),
        "no tensorly decomposition for format 'user-tt'"),
    Bad("compress-finetuned-of-wrong-type", "tiny", lambda e: lambda: factnet.compress(e.model, 42, "tt", 2),
        "must be a torch.nn.Module or a state dict"),
    Bad("compress-n-iter-max-zero", "tiny",
        lambda e: lambda: factnet.compress(e.model, _state(e), "tt", 2, n_iter_max=0, progress=False),
        "n_iter_max must be an integer >= 1"),
]


def full_snapshot(model: nn.Module) -> dict:
    """conftest's snapshot plus every parameter and buffer (non-persistent ones too) and the module tree."""
    state = snapshot(model)
    state["tensors"] = {f"{kind}:{name}": tensor.detach().clone()
                        for kind, named in (("p", model.named_parameters(remove_duplicate=False)),
                                            ("b", model.named_buffers(remove_duplicate=False)))
                        for name, tensor in named}
    state["tree"] = [(name, type(module)) for name, module in model.named_modules(remove_duplicate=False)]
    return state


def assert_unchanged(model: nn.Module, before: dict) -> None:
    assert_same_model(model, before)
    after = full_snapshot(model)
    assert after["tree"] == before["tree"]
    assert list(after["tensors"]) == list(before["tensors"])
    for key, value in before["tensors"].items():
        assert after["tensors"][key].dtype == value.dtype and torch.equal(after["tensors"][key], value), key


@pytest.mark.parametrize("bad", [pytest.param(b, id=b.id, marks=b.marks) for b in BAD])
def test_bad_input_raises_and_leaves_the_model_unchanged(bad, tmp_path):
    env = Env(bad.model, tmp_path)
    call = bad.setup(env)
    before = full_snapshot(env.model)
    with pytest.raises(factnet.FactnetError, match=bad.match):
        call()
    assert_unchanged(env.model, before)


def test_the_table():
    ids = [b.id for b in BAD]
    assert len(ids) == len(set(ids))
    assert len(BAD) >= 40
    print(f"\n{len(BAD)} bad inputs, {sum(1 for b in BAD if b.marks)} expected to fail (xfail)")
