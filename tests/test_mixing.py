"""Mixed-adapter batches (`model.factnet.per_sample`) on the model zoo, every builtin format.

A batch of four samples names ``["a", None, "b", "a"]``: each output row must equal the forward of
that sample alone with its adapter active (``None``: no adapter, the head as before any adapter
trained it), each adapter with its own random factors and head; rows of the base model's samples
must equal the base model's forward of the same batch bit for bit where no module of the model had
to run split (readers of weights as attributes and the head run once per adapter, on fewer rows).
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUILTIN_FORMATS, perturb_head, randomize_factors
from zoo import FAMILIES, inputs, prototype, run

import factnet
from factnet import FactnetError

NAMES = ["a", None, "b", "a"]
RANK = 2


# tiny tensors: one thread; the libraries' warnings about tiny configs are noise here
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


def _batch(family: str) -> tuple[tuple, dict]:
    """Four samples: two draws of the zoo's two-sample inputs, concatenated."""
    (args1, kwargs1), (args2, kwargs2) = inputs(family, seed=1), inputs(family, seed=2)
    args = tuple(torch.cat([a, b]) for a, b in zip(args1, args2))
    return args, {key: torch.cat([kwargs1[key], kwargs2[key]]) for key in kwargs1}


def _sample(args: tuple, kwargs: dict, index: int) -> tuple[tuple, dict]:
    return tuple(a[index: index + 1] for a in args), {k: v[index: index + 1] for k, v in kwargs.items()}


def _two_adapters(family: str, fmt: str, train_head: bool = True) -> torch.nn.Module:
    model = prototype(family).eval()
    for seed, name in enumerate(["a", "b"]):
        tensorizer = factnet.Tensorizer(model, FAMILIES[family].targets)
        rank = min([RANK, *(factnet.get_format(fmt, RANK).max_rank(*s) for s in tensorizer.group_shapes().values())])
        adapter = tensorizer.decompose(fmt, rank=rank, scale=1.5, name=name, train_head=train_head)
        randomize_factors(adapter, seed=seed)
        perturb_head(adapter, 10 + seed)
    return model


def _alone(model, args, kwargs) -> torch.Tensor:
    rows = []
    for index, name in enumerate(NAMES):
        model.factnet.activate(name)
        part_args, part_kwargs = _sample(args, kwargs, index)
        rows.append(run(model, part_args, part_kwargs))
    return torch.cat(rows)


@pytest.mark.parametrize("fmt", BUILTIN_FORMATS)
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_mixed_batch_equals_each_sample_alone(family, fmt):
    model = _two_adapters(family, fmt)
    args, kwargs = _batch(family)
    expected = _alone(model, args, kwargs)
    model.factnet.activate(None)
    base = run(model, args, kwargs)
    model.factnet.activate("b")  # the active adapter does not matter
    with model.factnet.per_sample(NAMES):
        mixed = run(model, args, kwargs)
    assert mixed.shape == expected.shape
    error = (mixed - expected).norm() / expected.norm()
    assert error < 1e-6, f"relative error {error:.2e}"
    for index, name in enumerate(NAMES):  # each row has its own adapter: not the same as another's
        if name is not None:
            assert not torch.allclose(mixed[index], base[index], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-10, atol=1e-12)
    assert model.factnet.active == "b" and model.factnet.mix is None


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_base_model_samples_are_the_base_models_bit_for_bit(family):
    """Without heads to run per adapter, and where no module reads weights as attributes, a base-model
    sample's row of a mixed batch is the base model's row of the same batch, bit for bit."""
    model = _two_adapters(family, "tt", train_head=False)
    args, kwargs = _batch(family)
    model.factnet.activate(None)
    base = run(model, args, kwargs)
    with model.factnet.per_sample(NAMES):
        mixed = run(model, args, kwargs)
    if model.factnet.split_readers:
        torch.testing.assert_close(mixed[1], base[1], rtol=1e-10, atol=1e-12)
    else:
        assert torch.equal(mixed[1], base[1]), "a base-model sample changed"


def test_the_split_readers_are_the_ones_that_read_weights():
    """BEiT reads qkv.weight in its attention's forward; torchvision's ViT runs nn.MultiheadAttention:
    those (and nothing else) run once per adapter."""
    expected = {"timm-beit": {"blocks.0.attn", "blocks.1.attn"},
                "torchvision-vit": {"encoder.layers.encoder_layer_0.self_attention",
                                    "encoder.layers.encoder_layer_1.self_attention"},
                "timm-vit": set()}
    for family, readers in expected.items():
        model = _two_adapters(family, "tt")
        args, kwargs = _batch(family)
        with torch.no_grad(), model.factnet.per_sample(NAMES):
            run(model, args, kwargs)
        assert model.factnet.split_readers == readers, family


def _simple():
    model = _two_adapters("timm-vit", "tt")
    return model, _batch("timm-vit")[0][0]


def test_unknown_names_and_wrong_batch_are_errors_before_anything_runs():
    model, x = _simple()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(FactnetError, match="'nobody'"), model.factnet.per_sample(["a", "nobody", None, "b"]):
        pass
    with pytest.raises(FactnetError, match="is empty"), model.factnet.per_sample([]):
        pass
    with pytest.raises(FactnetError, match="names 3 adapters"), model.factnet.per_sample(["a", "b", None]):
        model(x)
    with pytest.raises(FactnetError, match="do not nest"), model.factnet.per_sample(NAMES), \
            model.factnet.per_sample(NAMES):
        pass
    assert calls == [] and model.factnet.mix is None
    model.factnet.activate(None)  # nothing acts: the model is bare, factnet's forward on the head is gone
    assert "forward" not in vars(model.head)


def test_merged_adapter_is_an_error_and_nothing_changes():
    model, x = _simple()
    model.factnet["a"].activate().merge()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(FactnetError, match="merged"), model.factnet.per_sample(NAMES):
        model(x)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.factnet["a"].merged


def test_heads_are_swapped_back_and_training_state_is_kept():
    model, x = _simple()
    model.factnet.activate("a")
    head = {n: p.clone() for n, p in model.head.named_parameters()}
    with torch.no_grad(), model.factnet.per_sample(["b", "b", None, "a"]):
        model(x)
    assert all(torch.equal(p, head[n]) for n, p in model.head.named_parameters())
    assert all(p.requires_grad for p in model.factnet["a"].parameters())
    assert not any(p.requires_grad for p in model.factnet["b"].parameters())


def test_gradients_reach_each_samples_adapter():
    """A mixed batch is differentiable: a loss on sample 0 (adapter "a") moves only "a"'s factors."""
    model, x = _simple()
    for adapter in (model.factnet["a"], model.factnet["b"]):
        adapter.requires_grad_(True)
    with model.factnet.per_sample(NAMES):
        out = model(x)
    out[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.factnet["a"].parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.factnet["b"].parameters())
    model.factnet.activate("a")  # the active adapter's samples train the model's head, which it holds
    with model.factnet.per_sample(NAMES):
        model(x)[0].sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_many_adapters_switch_in_constant_time():
    """Activating one of many adapters touches two adapters' flags (the old and the new), not all."""
    model = prototype("timm-vit").eval()
    for index in range(200):
        factnet.Tensorizer(model).decompose("tt", rank=2, name=f"u{index}")
    touched = []
    for adapter in model.factnet.adapters.values():
        original = adapter.requires_grad_
        adapter.requires_grad_ = lambda flag, o=original, a=adapter: (touched.append(a.name), o(flag))[1]
    model.factnet.activate("u3")
    assert sorted(touched) == ["u199", "u3"]
    assert all(p.requires_grad for p in model.factnet["u3"].parameters())
    assert not any(p.requires_grad for p in model.factnet["u199"].parameters())
    placements = {id(p) for a in model.factnet.adapters.values() for ps in a.placements.values() for p in ps}
    assert len(placements) == len(model.factnet["u3"].placements)  # one layout, shared


@torch.no_grad()
def test_sequence_first_model_with_batch_dim_1():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)
    model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False))
    model = model.double().eval()
    for seed, name in enumerate(["a", "b"]):
        randomize_factors(factnet.Tensorizer(model).decompose("tucker", rank=2, name=name), seed=seed)
    x = torch.randn(5, 4, 16, dtype=torch.float64)  # (length, batch, width)
    rows = []
    for index, name in enumerate(NAMES):
        model.factnet.activate(name)
        rows.append(model(x[:, index: index + 1]))
    with model.factnet.per_sample(NAMES, batch_dim=1):
        mixed = model(x)
    torch.testing.assert_close(mixed, torch.cat(rows, 1), rtol=1e-10, atol=1e-12)
    with pytest.raises(FactnetError, match="batch_dim="), model.factnet.per_sample(NAMES):
        model(x)  # the default batch_dim=0 is the length (5), not the 4 samples


@pytest.mark.parametrize("family", ["timm-vit", "timm-convnext", "hf-gpt2", "timm-swin"])
@torch.no_grad()
def test_one_adapter_for_every_sample_is_that_adapter_active(family):
    model = _two_adapters(family, "tucker")
    args, kwargs = _batch(family)
    model.factnet.activate("b")
    expected = run(model, args, kwargs)
    model.factnet.activate("a")
    with model.factnet.per_sample(["b"] * 4):
        mixed = run(model, args, kwargs)
    torch.testing.assert_close(mixed, expected, rtol=1e-10, atol=1e-12)
