"""End to end on small real architectures: timm ViT, Swin, ConvNeXt (1x1 conv and Linear MLPs),
torchvision ViT and nn.TransformerEncoder (nn.MultiheadAttention), GPT-2 style `Conv1D`,
a plain nn.Sequential. Each: targets found, grouping, zero at init, forward and gradients
against the dense oracle (train mode and eval/no-grad inference), merge, detach."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

import factnet
from conftest import (
    TinyGPT2,
    assert_close,
    assert_same_model,
    factor_leaves,
    randomize_factors,
    snapshot,
    tiny_convnext,
    tiny_swin,
    tiny_torchvision_vit,
    tiny_transformer_encoder,
    tiny_vit,
)
from oracle_support import effective_params, oracle_forward, zero_dropout


@dataclass
class Spec:
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    kinds: set[str]
    slices: int
    stages: dict | None = None  # expected group("stage") shapes
    output: Callable = field(default=lambda y: y)


def _images(size):
    return lambda g: (torch.randn(2, 3, size, size, generator=g, dtype=torch.float64),)


def _hf_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2Model(config)


def _sequential():
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 8))


SPECS = {
    "timm-vit": Spec(tiny_vit, _images(32), {"linear"}, 2 * 12,
                     {"blocks.0": (12, 48, 48), "blocks.1": (12, 48, 48)}),
    "timm-swin": Spec(tiny_swin, _images(56), {"linear"}, 4 * 12,
                      {"layers.0": (24, 24, 24), "layers.1": (24, 48, 48)}),
    "timm-convnext-conv1x1": Spec(lambda: tiny_convnext(conv_mlp=True), _images(32), {"conv1x1"}, 5 * 8,
                                  {"stages.0": (8, 8, 8), "stages.1": (8, 16, 16), "stages.2": (16, 24, 24),
                                   "stages.3": (8, 32, 32)}),
    "timm-convnext-linear": Spec(lambda: tiny_convnext(conv_mlp=False), _images(32), {"linear"}, 5 * 8,
                                 {"stages.0": (8, 8, 8), "stages.1": (8, 16, 16), "stages.2": (16, 24, 24),
                                  "stages.3": (8, 32, 32)}),
    "torchvision-vit": Spec(tiny_torchvision_vit, _images(32), {"mha-in", "mha-out", "linear"}, 2 * 12),
    "transformer-encoder": Spec(tiny_transformer_encoder,
                                lambda g: (torch.randn(2, 5, 16, generator=g, dtype=torch.float64),),
                                {"mha-in", "mha-out", "linear"}, 2 * 12),
    "gpt2-conv1d": Spec(TinyGPT2, lambda g: (torch.randint(0, 11, (2, 6), generator=g),), {"conv1d"}, 2 * 12,
                        {"h.0": (12, 8, 8), "h.1": (12, 8, 8)}),
    "hf-gpt2": Spec(_hf_gpt2, lambda g: (torch.randint(0, 50, (2, 6), generator=g),), {"conv1d"}, 2 * 12,
                    {"h.0": (12, 16, 16), "h.1": (12, 16, 16)}, output=lambda y: y.last_hidden_state),
}


def make(name):
    spec = SPECS[name]
    torch.manual_seed(0)
    model = zero_dropout(spec.build()).double()
    inputs = spec.inputs(torch.Generator().manual_seed(1))
    return spec, model, inputs


@pytest.mark.parametrize("name", list(SPECS))
def test_default_targets_and_stage_groups(name):
    spec, model, _ = make(name)
    tensorizer = factnet.Tensorizer(model)
    assert {s.matrix.kind for s in tensorizer.slices} == spec.kinds
    assert len(tensorizer.slices) == spec.slices
    for piece in tensorizer.slices:
        segments = piece.module.split(".")
        assert not {"head", "heads", "lm_head", "patch_embed", "conv_proj", "stem", "downsample"} & set(segments)
    if spec.stages is not None:
        assert tensorizer.group("stage").group_shapes() == spec.stages
    # the table names every adapted module
    text = repr(tensorizer)
    assert all(piece.module in text for piece in tensorizer.slices)


def _run(spec, model, inputs):
    return spec.output(model(*inputs))


def _oracle(spec, base, adapter, scale, inputs, factors=None):
    return spec.output(oracle_forward(base, adapter, scale, *inputs, factors=factors))


def _adapt(name, fmt, scale=1.5):
    spec, model, inputs = make(name)
    base = copy.deepcopy(model)
    tensorizer = factnet.Tensorizer(model)
    if spec.stages is not None:
        tensorizer = tensorizer.group("stage")
    return spec, model, base, inputs, tensorizer.decompose(fmt, rank=2, scale=scale)


@pytest.mark.parametrize("name", list(SPECS))
def test_zero_at_init_is_the_base_model_bit_for_bit(name):
    spec, model, base, inputs, adapter = _adapt(name, "tt", scale=10.0)
    model.train()
    base.train()
    assert torch.equal(_run(spec, model, inputs), _run(spec, base, inputs)), "train mode at init"
    model.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(_run(spec, model, inputs), _run(spec, base, inputs)), "inference at init"


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
@pytest.mark.parametrize("name", list(SPECS))
def test_end_to_end_against_dense_oracle(name, fmt):
    scale = 1.5
    spec, model, base, inputs, adapter = _adapt(name, fmt, scale)
    before = snapshot(base)
    randomize_factors(adapter, std=0.3, seed=2)

    # training forward and gradients
    model.train()
    base.train()
    y = _run(spec, model, inputs)
    weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
    (y * weights).sum().backward()
    leaves = factor_leaves(adapter)
    y_oracle = _oracle(spec, base, adapter, scale, inputs, leaves)
    (y_oracle * weights).sum().backward()
    assert_close(y, y_oracle, 1e-9, "training forward")
    for key, group in adapter.groups.items():
        for fname, factor in group.factors.items():
            assert_close(factor.grad, leaves[key][fname].grad, 1e-8, f"grad {key}.{fname}")

    # merge: weights are W + s·ΔW and the forward is unchanged
    adapter.merge()
    params = dict(model.named_parameters())
    for pname, weight in effective_params(base, adapter, scale).items():
        key = pname if pname in params else _parametrized(pname)
        assert_close(params[key], weight, 1e-12, f"merged {pname}")
    assert_close(_run(spec, model, inputs), y, 1e-9, "merged forward")
    adapter.unmerge()
    assert_close(_run(spec, model, inputs), y, 1e-9, "unmerged forward")

    # detach (after merge/unmerge: weights back up to rounding; bit for bit is tested below)
    adapter.detach()
    base.zero_grad(set_to_none=True)
    assert_same_model(model, before, tol=1e-12)
    model.eval()
    base.eval()
    with torch.no_grad():
        assert_close(_run(spec, model, inputs), _run(spec, base, inputs), 1e-12, "after detach")


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
@pytest.mark.parametrize("name", list(SPECS))
def test_inference_matches_dense_oracle(name, fmt):
    """eval mode, with and without grad: fused inference fast paths must see the increment too."""
    scale = 1.5
    spec, model, base, inputs, adapter = _adapt(name, fmt, scale)
    randomize_factors(adapter, std=0.3, seed=2)
    model.eval()
    base.eval()
    with torch.no_grad():
        expected = _oracle(spec, base, adapter, scale, inputs)
        assert_close(_run(spec, model, inputs), expected, 1e-9, "eval/no-grad forward")
    assert_close(_run(spec, model, inputs), expected, 1e-9, "eval forward with grad")
    adapter.merge()
    with torch.no_grad():
        assert_close(_run(spec, model, inputs), expected, 1e-9, "merged eval/no-grad forward")


@pytest.mark.parametrize("name", list(SPECS))
def test_detach_restores_each_model_bitwise(name):
    spec, model, inputs = make(name)
    base = copy.deepcopy(model)
    model.train()
    before = snapshot(model)
    tensorizer = factnet.Tensorizer(model)
    adapter = tensorizer.decompose("tucker", rank=2, scale=3.0)
    randomize_factors(adapter, seed=1)
    _run(spec, model, inputs).sum().backward()
    adapter.detach()
    assert_same_model(model, before)
    model.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(_run(spec, model, inputs), _run(spec, base, inputs))


def _parametrized(name):
    """Where torch.nn.utils.parametrize keeps an MHA weight while it is parametrized."""
    owner, _, attribute = name.rpartition(".")
    return f"{owner}.parametrizations.{attribute}.original"


def test_transformer_encoder_inference_uses_the_increment():
    """nn.TransformerEncoderLayer has a fused inference path (eval, and no tensor argument
    requiring grad) that reads ``linear1.weight`` / ``linear2.weight`` directly: the adapted
    output must still include s·ΔW. With only the MLP adapted every weight it reads is frozen,
    so the fused path runs even with grad enabled."""
    spec, model, inputs = make("transformer-encoder")
    base = copy.deepcopy(model)
    adapter = factnet.Tensorizer(model, ["layers.*.linear1", "layers.*.linear2"]).decompose("tucker", rank=2, scale=1.0)
    randomize_factors(adapter, seed=5)
    model.eval()
    base.eval()
    with_grad = model(*inputs)
    with torch.no_grad():
        without_grad = model(*inputs)
        expected = oracle_forward(base, adapter, 1.0, *inputs)
    assert_close(with_grad, expected, 1e-9, "eval with grad")
    assert_close(without_grad, expected, 1e-9, "eval without grad (fast path)")


def test_sequential_model_runs_after_decompose():
    """A plain nn.Sequential: the adapter must not become one of its stages."""
    torch.manual_seed(0)
    model = _sequential().double()
    base = copy.deepcopy(model)
    x = torch.randn(4, 8, dtype=torch.float64)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2, scale=1.5)
    assert {s.module for s in adapter.groups["8x8"].slices} == {"0", "2", "4"}
    randomize_factors(adapter, seed=1)
    assert_close(model(x), oracle_forward(base, adapter, 1.5, x), 1e-10, "sequential forward")
    adapter.detach()
    assert torch.equal(model(x), base(x))


def test_bfloat16_model_float32_factors():
    torch.manual_seed(0)
    model = tiny_vit().to(torch.bfloat16)
    base = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2, scale=2.0)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert torch.equal(model(x), base(x))
    randomize_factors(adapter, std=0.2, seed=1)
    y = model(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():  # the oracle in float32: bf16 rounding only, far below the increment's effect
        reference = copy.deepcopy(base).float()
        expected = oracle_forward(reference, adapter, 2.0, x.float())
        base_out = reference(x.float())
    error = (y.float() - expected).norm()
    assert error < 0.1 * (expected - base_out).norm(), (error, (expected - base_out).norm())
    y.float().square().sum().backward()
    for p in adapter.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    adapter.detach()
    assert torch.equal(model(x), base(x))


FUSED_KERNELS = ("_native_multi_head_attention", "_transformer_encoder_layer_fwd")


def _fused_calls(model: nn.Module, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, int]:
    """``model(x)`` (eval, no grad) and how many times it called torch's fused attention kernels."""
    count = [0]
    for name in FUSED_KERNELS:
        original = getattr(torch, name)

        def spy(*args, _original=original, **kwargs):
            count[0] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    with torch.no_grad():
        y = model(x)
    monkeypatch.undo()
    return y, count[0]


@pytest.mark.parametrize("build, shape", [(tiny_torchvision_vit, (4, 3, 32, 32)),
                                          (tiny_transformer_encoder, (4, 5, 16))])
def test_an_unmerged_adapter_keeps_torchs_fused_attention(build, shape, monkeypatch):
    """nn.MultiheadAttention and nn.TransformerEncoderLayer have fused inference kernels (eval, no grad).
    An unmerged adapter keeps them (they read the effective weights through the attributes) from the second
    forward on, as many calls as the bare model makes, with the output at init bit for bit the base's
    (float32). The first forward of a newly adapted matrix runs torch's unfused path: the first-forward
    guard is a TorchFunctionMode, which torch's fast-path checks refuse."""
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():  # torchvision's zero head would hide every difference
                parameter.normal_()
    x = torch.randn(*shape)
    base, base_calls = _fused_calls(model, x, monkeypatch)
    assert base_calls > 0  # the check can fail: the bare model does take the fused path
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2, train_head=False, seed=0)
    with torch.no_grad():
        model(x)  # the guarded first forward
    y, calls = _fused_calls(model, x, monkeypatch)
    assert calls == base_calls and torch.equal(y, base)
    randomize_factors(adapter, std=0.3, seed=1)
    y, calls = _fused_calls(model, x, monkeypatch)
    assert calls == base_calls and not torch.equal(y, base)
