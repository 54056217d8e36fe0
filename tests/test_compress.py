"""`factnet.compress`: a dense increment decomposed with tensorly into an adapter.

Exactness is tested on increments that are representable by construction: a copy of the base
model gets an adapter with random factors in the format at the rank, which is merged; compress
must then recover ``W_ft - W_base`` per group (relative error < 1e-5) and the compressed model
must compute what the fine-tuned one does. Also: `from_tensorly` inverts `to_tensorly` for every
built-in format, the rank sweep's error does not grow with rank, inputs are left untouched, and
bad inputs raise `FactnetError` before anything is attached.
"""

from __future__ import annotations

import copy

import pytest
import tensorly as tl
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import factnet
import factnet.compression as compress_module
from conftest import (
    BUILTIN_FORMATS,
    USER_FORMATS,
    TinyGPT2,
    TinyNet,
    assert_close,
    assert_same_model,
    randomize_factors,
    snapshot,
    tiny_convnext,
    tiny_swin,
    tiny_torchvision_vit,
    tiny_transformer_encoder,
    tiny_vit,
)
from factnet.compression import compress, rank_sweep

EXACT = 1e-5  # the bound on the relative error of an exactly representable increment
SWEEP_FORMATS = ["batch-matrix", "tt", "tucker"]  # one SVD pass: error non-increasing in rank


# ---- helpers ------------------------------------------------------------------------------------
def finetune_exactly(build, fmt, rank, *, scale=1.0, targets=None, group="shape", seed=0):
    """``(base, finetuned)``: finetuned = base + scale·ΔW with ΔW random in ``fmt`` at ``rank``
    (merged, then detached: a plain model of the same architecture)."""
    torch.manual_seed(seed)
    base = build().eval()
    tuned = copy.deepcopy(base)
    adapter = factnet.Tensorizer(tuned, targets, by=group).decompose(fmt, rank, scale=scale, train_head=False)
    randomize_factors(adapter, std=0.5, seed=seed)
    adapter.merge()
    return base, adapter.detach(keep_merged=True)


def finetune_densely(build, *, seed=0, std=0.05):
    """``(base, finetuned state dict)`` with i.i.d. noise on every targeted weight (full rank)."""
    torch.manual_seed(seed)
    base = build().eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    for matrix in {s.matrix for s in factnet.Tensorizer(base).slices}:
        key = f"{matrix.name}.{'in_proj_weight' if matrix.kind == 'mha-in' else 'weight'}"
        state[key] += std * torch.randn(state[key].shape, generator=generator)
    return base, state


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_net():
    return TinyNet(d=6)


def outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def images(size):
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5)),)


def tokens():
    return (torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(5)),)


def sequence():
    return (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5)),)


# ---- from_tensorly ------------------------------------------------------------------------------
@st.composite
def problem(draw, name):
    n, d_in, d_out = (draw(st.integers(1, 9)) for _ in range(3))
    limit = factnet.get_format(name, 1).max_rank(n, d_in, d_out)
    return name, n, d_in, d_out, draw(st.integers(1, max(1, min(limit, 5))))


def random_factors(fmt, n, d_in, d_out, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator, dtype=torch.float64)
            for name, shape in fmt.shapes(n, d_in, d_out).items()}


@pytest.mark.parametrize("name", BUILTIN_FORMATS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_from_tensorly_inverts_to_tensorly(name, data, seed):
    _, n, d_in, d_out, rank = data.draw(problem(name))
    fmt = factnet.get_format(name, rank)
    factors = random_factors(fmt, n, d_in, d_out, seed)
    back = fmt.from_tensorly(fmt.to_tensorly(factors))
    assert set(back) == set(fmt.factors)
    for key, value in factors.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("name", BUILTIN_FORMATS)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_lower_rank_decomposition_is_zero_padded_to_the_rank(name, data, seed):
    """A tensorly result below the adapter's rank maps to the same tensor at the full rank."""
    _, n, d_in, d_out, rank = data.draw(problem(name))
    low = data.draw(st.integers(1, rank))
    small, fmt = factnet.get_format(name, low), factnet.get_format(name, rank)
    factors = random_factors(small, n, d_in, d_out, seed)
    fitted = compress_module._fit_to_rank(fmt, fmt.from_tensorly(small.to_tensorly(factors)))
    assert {k: tuple(v.shape) for k, v in fitted.items()} == fmt.shapes(n, d_in, d_out)
    assert_close(fmt.reference(fitted), small.reference(factors), 1e-12, f"{name} padded {low}->{rank}")


def test_batch_matrix_from_tensorly_rejects_a_cp_that_mixes_slices():
    fmt = factnet.get_format("batch-matrix", 2)
    with tl.backend_context("pytorch"):
        cp = tl.random.random_cp((3, 4, 5), rank=6, random_state=0)
    with pytest.raises(factnet.FactnetError, match="mixes slices"):
        fmt.from_tensorly(cp)
    with pytest.raises(factnet.FactnetError, match="rank n·r"):
        fmt.from_tensorly(tl.cp_tensor.CPTensor((torch.ones(4), [torch.ones(3, 4), torch.ones(4, 4),
                                                                  torch.ones(5, 4)])))


@pytest.mark.parametrize("name", USER_FORMATS)
def test_formats_without_from_tensorly_say_so(name):
    fmt = factnet.get_format(name, 2)
    with pytest.raises(NotImplementedError, match=f"{name!r} does not implement from_tensorly"):
        fmt.from_tensorly(None)


# ---- exact recovery -----------------------------------------------------------------------------
# (format, rank): CP and tensor ring run ALS; at these sizes (24x48x48, rank <= 4) it converges to
# the float32 rounding floor (~1e-7) from the SVD init or within the random restarts.
EXACT_CASES = [("tt", 4), ("tucker", 4), ("batch-matrix", 4), ("cp", 4), ("tensor-ring", 2)]


@pytest.mark.parametrize(("fmt", "rank"), EXACT_CASES)
def test_exactly_representable_increment_is_recovered(fmt, rank):
    base, tuned = finetune_exactly(tiny_vit, fmt, rank, scale=2.0)
    state = state_of(tuned)
    adapter, errors = compress(base, state, fmt, rank, scale=2.0, progress=False)
    assert list(errors) == adapter.group_names == ["48x48"]
    assert all(error < EXACT for error in errors.values()), errors
    assert adapter.format.name == fmt and adapter.format.rank == rank and adapter.settings.scale == 2.0
    assert base.factnet["default"] is adapter and not adapter.merged
    inputs = images(32)
    assert_close(outputs(base, inputs), outputs(tuned, inputs), 1e-4, f"{fmt} compressed vs fine-tuned")
    # merged, the compressed model's weights are the fine-tuned weights
    adapter.merge()
    merged = state_of(base)
    for key in adapter.matrices:
        assert_close(merged[f"{key}.weight"], state[f"{key}.weight"], 1e-5, key)


MODELS = {
    "timm-swin-by-stage": (tiny_swin, lambda: images(56), "stage"),
    "convnext-conv1x1": (lambda: tiny_convnext(conv_mlp=True), lambda: images(32), "shape"),
    "gpt2-conv1d": (TinyGPT2, tokens, "shape"),
    "torchvision-vit-mha": (tiny_torchvision_vit, lambda: images(32), "shape"),
    "transformer-encoder-mha": (tiny_transformer_encoder, sequence, "shape"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_matrix_kind_and_grouping_is_stacked_as_the_tensorizer_does(name):
    build, inputs, group = MODELS[name]
    base, tuned = finetune_exactly(build, "tt", 2, group=group)
    adapter, errors = compress(base, tuned, "tt", 2, group=group, progress=False)
    assert list(errors) == list(factnet.Tensorizer(tuned, by=group).groups)
    assert all(error < EXACT for error in errors.values()), errors
    x = inputs()
    assert_close(outputs(base, x), outputs(tuned, x), 1e-4, f"{name}: compressed vs fine-tuned")


def test_selected_blocks_as_lora():
    """batch-matrix on the q and v blocks only (LoRA), with a scale."""
    targets = ["blocks.*.attn.qkv[q,v]"]
    base, tuned = finetune_exactly(tiny_vit, "batch-matrix", 3, targets=targets, scale=4.0)
    adapter, errors = compress(base, tuned, "batch-matrix", 3, targets=targets, scale=4.0, progress=False)
    assert adapter.group_shapes() == {"48x48": (4, 48, 48)}
    assert errors["48x48"] < EXACT
    assert_close(outputs(base, images(32)), outputs(tuned, images(32)), 1e-4, "LoRA compressed vs fine-tuned")


def test_finetuned_model_with_a_merged_adapter_is_read_through_its_parametrizations():
    base, _ = finetune_exactly(tiny_transformer_encoder, "tt", 2)
    tuned = copy.deepcopy(base)
    adapter = factnet.Tensorizer(tuned).decompose("tucker", 2, train_head=False)
    randomize_factors(adapter, seed=3)
    with pytest.raises(factnet.FactnetError, match="unmerged factnet adapter"):
        compress(base, tuned, "tucker", 2, progress=False)
    adapter.merge()
    compressed, errors = compress(base, tuned, "tucker", 2, progress=False)
    assert all(error < EXACT for error in errors.values()), errors
    assert_close(outputs(base, sequence()), outputs(tuned, sequence()), 1e-4, "compressed vs merged")


def test_zero_increment_gives_zero_factors_and_error():
    base = tiny_vit()
    adapter, errors = compress(base, state_of(base), "cp", 3, progress=False)
    assert errors == {"48x48": 0.0}
    assert torch.equal(adapter.group("48x48").reconstruct(), torch.zeros(24, 48, 48))


def test_compress_leaves_finetuned_untouched():
    base, tuned = finetune_exactly(tiny_net, "tt", 2)
    other = copy.deepcopy(base)
    before = snapshot(tuned)
    compress(base, tuned, "tt", 2, progress=False)
    assert_same_model(tuned, before)
    state = tuned.state_dict()
    copies = {k: v.clone() for k, v in state.items()}
    compress(other, state, "cp", 2, progress=False)
    assert list(state) == list(copies) and all(torch.equal(state[k], copies[k]) for k in copies)


def test_model_and_state_dict_give_the_same_adapter():
    base, tuned = finetune_exactly(tiny_net, "tucker", 3)
    other = copy.deepcopy(base)
    first, errors_model = compress(base, tuned, "tucker", 3, progress=False)
    second, errors_state = compress(other, state_of(tuned), "tucker", 3, progress=False)
    assert errors_model == errors_state
    for name in first.group_names:
        for key, value in first.group(name).factors.items():
            assert torch.equal(value, second.group(name).factors[key])


def test_other_differences_are_reported():
    base, tuned = finetune_exactly(tiny_net, "tt", 2)
    with torch.no_grad():
        tuned.head.weight.add_(1.0)
    with pytest.warns(UserWarning, match=r"1 tensors outside the compressed matrices differ .*head\.weight"):
        compress(base, tuned, "tt", 2, progress=False)


# ---- approximation: the rank sweep --------------------------------------------------------------
@pytest.mark.parametrize("fmt", SWEEP_FORMATS)
def test_rank_sweep_error_does_not_grow_with_rank(fmt, capsys):
    base, state = finetune_densely(tiny_vit)
    before = snapshot(base)
    rows = rank_sweep(base, state, fmt, [1, 2, 4, 8, 16])
    assert_same_model(base, before)  # each adapter was detached again
    assert [rank for rank, _, _ in rows] == [1, 2, 4, 8, 16]
    params = [p for _, p, _ in rows]
    assert params == sorted(params) and len(set(params)) == len(params)
    errors = [e["48x48"] for _, _, e in rows]
    assert all(0 < e < 1 for e in errors)
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    printed = capsys.readouterr().out
    assert f"rank sweep: {fmt}" in printed and "parameters" in printed
    assert f"{params[-1]:,}" in printed and f"{errors[-1]:.3e}" in printed


def test_batch_matrix_error_is_the_eckart_young_tail():
    """Per-slice truncated SVD is optimal: the error is the energy of the dropped singular values
    of each block of W_ft - W_base (blocks cut here by hand, independently of factnet)."""
    base, state = finetune_densely(tiny_net)
    blocks = []
    for name, parts, dim in (("qkv", 3, 0), ("proj", 1, 0), ("fc1", 4, 0), ("fc2", 4, 1)):
        delta = state[f"{name}.weight"].double() - base.state_dict()[f"{name}.weight"].double()
        blocks += delta.chunk(parts, dim=dim)
    singular = torch.stack([torch.linalg.svdvals(b) for b in blocks])  # (12, 6)
    rank = 2
    expected = (singular[:, rank:].square().sum() / singular.square().sum()).sqrt().item()
    _, errors = compress(base, state, "batch-matrix", rank, progress=False)
    assert errors["6x6"] == pytest.approx(expected, rel=1e-5)


# ---- errors -------------------------------------------------------------------------------------
def _bad(case, base):
    state = state_of(base)
    if case == "missing":
        del state["fc1.weight"]
        return state, "tt", 2, "no weight 'fc1.weight'"
    if case == "shape":
        state["qkv.weight"] = torch.zeros(18, 7)
        return state, "tt", 2, r"'qkv.weight' has shape \(18, 7\), base has \(18, 6\)"
    if case == "dtype":
        state["proj.weight"] = torch.zeros(6, 6, dtype=torch.int8)
        return state, "tt", 2, "torch.int8; compress needs floating-point"
    if case == "nan":
        state["proj.weight"] = torch.full((6, 6), float("nan"))
        return state, "tt", 2, "non-finite"
    if case == "unknown-format":
        return state, "block-term", 2, "unknown format 'block-term'"
    if case == "user-format":
        return state, "user-tt", 2, "no tensorly decomposition for format 'user-tt'"
    if case == "scale":
        return state, "tt", 2, "finite non-zero"
    assert case == "type"
    return [1, 2], "tt", 2, "state dict"


@pytest.mark.parametrize("case", ["missing", "shape", "dtype", "nan", "unknown-format", "user-format", "scale",
                                  "type"])
def test_bad_input_raises_and_leaves_base_untouched(case):
    base = tiny_net()
    finetuned, fmt, rank, message = _bad(case, base)
    before = snapshot(base)
    with pytest.raises(factnet.FactnetError, match=message):
        compress(base, finetuned, fmt, rank, scale=0.0 if case == "scale" else 1.0, progress=False)
    assert_same_model(base, before)


def test_failure_during_decomposition_detaches_the_adapter(monkeypatch):
    base, tuned = finetune_exactly(tiny_net, "tt", 2)
    before = snapshot(base)

    def broken(delta, fmt, options):
        raise RuntimeError("tensorly failed")

    monkeypatch.setitem(compress_module._DECOMPOSERS, "tt", broken)
    with pytest.raises(RuntimeError, match="tensorly failed"):
        compress(base, tuned, "tt", 2, progress=False)
    assert_same_model(base, before)


def test_base_must_be_a_model():
    with pytest.raises(factnet.FactnetError, match="base must be the torch.nn.Module"):
        compress(nn.Linear(4, 4).state_dict(), nn.Linear(4, 4), "tt", 1, progress=False)
