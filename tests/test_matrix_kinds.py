"""Matrix kinds (`factnet.matrix_kinds`): every registered kind's linear view is the matrix its module's
forward applies, and a kind defined here, as one class, is found, adapted, trained, merged and saved
against a dense oracle written out here (``x @ (K + s·ΔW) + b`` with ``ΔW`` from the format's reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Conv1D, assert_close, factor_leaves, mixed_against_alone, randomize_factors
from oracle_support import reference
from torch import Tensor, nn
from torch.func import functional_call

import factnet
from factnet import FactnetError
from factnet.matrix_kinds import KINDS, MatrixKind, register
from factnet.slices import find_matrices

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- every registered kind: the linear view against the module's own forward ----------------------
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ Wᵀ + b``, written out."""
    return x @ weight.T + (0 if bias is None else bias)


def _attention(module: nn.MultiheadAttention, x: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """Self-attention of ``x: (b, t, d)`` from the in/out projections as ``(d_out, d_in)`` matrices."""
    b, t, d = x.shape
    heads = module.num_heads
    q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2)
               for z in _linear(x, w_in, module.in_proj_bias).chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
    return _linear((weights @ v).transpose(1, 2).reshape(b, t, d), w_out, module.out_proj.bias)


def _mha() -> nn.Module:
    return nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))


def _check_mha(model: nn.Module, views: dict[str, Tensor], x: Tensor) -> None:
    module = model[0]
    expected = _attention(module, x, views["0"], views["0.out_proj"])
    assert_close(module(x, x, x, need_weights=False)[0], expected, 1e-12, "attention")


# kind name -> (the model holding one, the matrices `find_matrices` finds in it, a forward check from the views)
EXAMPLES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 10)), {"0": (10, 6)},
               lambda model, views, x: assert_close(model(x), _linear(x, views["0"], model[0].bias), 1e-12)),
    "conv1x1": (lambda: nn.Sequential(nn.Conv2d(6, 10, 1)), {"0": (10, 6)},
                lambda model, views, x: assert_close(
                    model(x[:, :, None, :].transpose(1, 3)),  # (b, 6, t, 1) images
                    _linear(x, views["0"], model[0].bias)[:, :, None, :].transpose(1, 3), 1e-12)),
    "conv1d": (lambda: nn.Sequential(Conv1D(10, 6)), {"0": (10, 6)},
               lambda model, views, x: assert_close(model(x), _linear(x, views["0"], model[0].bias), 1e-12)),
    "mha-in": (_mha, {"0": (24, 8), "0.out_proj": (8, 8)}, _check_mha),
    "mha-out": (_mha, {"0": (24, 8), "0.out_proj": (8, 8)}, _check_mha),
}
INPUTS = {"linear": (2, 5, 6), "conv1x1": (2, 5, 6), "conv1d": (2, 5, 6), "mha-in": (2, 5, 8), "mha-out": (2, 5, 8)}


def test_every_registered_kind_has_an_example_and_a_name_of_its_own():
    assert set(EXAMPLES) == set(KINDS)
    with pytest.raises(FactnetError, match="registered already"):
        register(type(KINDS["linear"]))


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_the_linear_view_is_the_matrix_the_forward_applies(kind):
    torch.manual_seed(0)
    build, shapes, check = EXAMPLES[kind]
    model = build().double()
    found = find_matrices(model)
    assert {m.name: (m.d_out, m.d_in) for m in found} == shapes
    assert kind in {m.kind for m in found}
    params = dict(model.named_parameters())
    views = {}
    for matrix in found:
        rules = matrix.rules
        weight = params[f"{matrix.name}.{rules.parameter}"]
        view = rules.to_linear(weight)
        assert view.shape == (matrix.d_out, matrix.d_in)
        assert torch.equal(rules.from_linear(view, weight), weight)
        with torch.no_grad():  # a view: writes reach the parameter
            view[0, 0] += 1.0
        assert weight.detach().flatten()[0] == view[0, 0]
        views[matrix.name] = view.detach()
    check(model, views, torch.randn(*INPUTS[kind], dtype=torch.float64))


# ---- a new kind, one class ----------------------------------------------------------------------------
class Dense(nn.Module):
    """``x @ kernel + bias`` with ``kernel: (d_in, d_out)``: a transposed weight under another name."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.kernel + self.bias


class DenseKernel(MatrixKind):
    name = "test-dense-kernel"
    parameter = "kernel"
    fan_in_fan_out = True

    def match(self, module: nn.Module, parent: nn.Module | None) -> tuple[int, int] | None:
        return (module.kernel.shape[1], module.kernel.shape[0]) if isinstance(module, Dense) else None

    def to_linear(self, weight: Tensor) -> Tensor:
        return weight.t()

    def from_linear(self, linear: Tensor, weight: Tensor) -> Tensor:
        return linear.t()


class Block(nn.Module):
    """``up`` (8x4, cut along its output), ``down`` (4x8, along its input) called; ``mix`` (4x4) only read as
    an attribute, by this block's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.mix = Dense(4, 8), Dense(8, 4), Dense(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.down(torch.tanh(self.up(x)))
        return h + torch.tanh(h) @ self.mix.kernel + self.mix.bias


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Block(), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x))


@pytest.fixture
def dense_kind():
    register(DenseKernel)
    yield
    del KINDS[DenseKernel.name]


def _oracle_params(base: nn.Module, adapter: factnet.Adapter, scale: float,
                   factors: dict[str, dict[str, Tensor]] | None = None) -> dict[str, Tensor]:
    """``{name.kernel: K + scale·ΔW}`` in the kernel's own ``(d_in, d_out)`` layout, block by block from the
    format's reference reconstruction ``ΔW: (n, d_in, d_out)`` (``x @ block``, as the kernel is applied)."""
    kernels = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith(".kernel")}
    for key, group in adapter.groups.items():
        values = factors[key] if factors is not None else {n: p.detach() for n, p in group.factors.items()}
        dense = reference(group.format, values | dict(group.seeded.named_buffers()))
        for i, piece in enumerate(group.slices):
            kernel, block = kernels[f"{piece.module}.kernel"], scale * dense[i]
            if piece.side == "out":
                cols = slice(piece.index * piece.d_out, (piece.index + 1) * piece.d_out)
                kernel[:, cols] = kernel[:, cols] + block
            elif piece.side == "in":
                rows = slice(piece.index * piece.d_in, (piece.index + 1) * piece.d_in)
                kernel[rows, :] = kernel[rows, :] + block
            else:
                kernel[:, :] = kernel + block
    return kernels


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_a_kind_defined_as_one_class_is_adapted_trained_merged_and_saved(dense_kind, fmt, tmp_path):
    torch.manual_seed(0)
    model = Net().double()
    base = copy.deepcopy(model)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    assert [(m.name, m.kind, m.d_out, m.d_in) for m in find_matrices(model)] == [
        ("block.up", "test-dense-kernel", 8, 4), ("block.down", "test-dense-kernel", 4, 8),
        ("block.mix", "test-dense-kernel", 4, 4), ("head", "linear", 3, 4)]

    adapter = factnet.Tensorizer(model).decompose(fmt, rank=2, scale=1.5, seed=0, train_head=False)
    assert sorted(s.qualified_name for g in adapter.groups.values() for s in g.slices) == [
        "block.down[0]", "block.down[1]", "block.mix", "block.up[0]", "block.up[1]"]
    assert model.state_dict().keys() - {k for k in model.state_dict() if k.startswith("factnet.")} == \
        base.state_dict().keys()  # the stand-ins hold the same "kernel" and "bias"
    randomize_factors(adapter, std=0.3, seed=1)

    # forward and backward against the oracle, differentiable in its own copies of the factors
    leaves = factor_leaves(adapter)
    expected = functional_call(base, _oracle_params(base, adapter, 1.5, leaves), (x,))
    out = model(x)
    assert_close(out, expected, 1e-12, "forward")
    weights = torch.randn(out.shape, dtype=torch.float64)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for key, group in adapter.groups.items():
        for name, factor in group.factors.items():
            assert_close(factor.grad, leaves[key][name].grad, 1e-10, f"gradient of {key}.{name}")
    with torch.no_grad():
        assert_close(model(x), expected, 1e-12, "forward without grad")

    # merge: the model is the base model's modules holding K + s·ΔW; unmerge gives K back
    oracle = _oracle_params(base, adapter, 1.5)
    adapter.merge()
    model.eval()
    assert type(model.block.up) is Dense and type(model.block.mix) is Dense
    for name, kernel in oracle.items():
        assert_close(model.get_parameter(name), kernel, 1e-12, f"merged {name}")
    with torch.no_grad():
        assert_close(model(x), expected, 1e-12, "merged forward")
    adapter.unmerge()
    for name, kernel in base.named_parameters():
        assert_close(model.get_parameter(name), kernel, 1e-12, f"unmerged {name}")

    # a file records the kind; loaded onto a fresh copy of the base it gives the same outputs
    path = tmp_path / "dense.safetensors"
    adapter.save(path)
    fresh = copy.deepcopy(base)
    factnet.load(fresh, path)
    with torch.no_grad():
        assert_close(fresh(x), expected, 1e-12, "loaded")


def test_the_stand_in_of_a_new_kind_holds_its_parameter_under_its_own_name(dense_kind):
    torch.manual_seed(0)
    model = Net().double()
    base = copy.deepcopy(model)
    adapter = factnet.Tensorizer(model, ["block.mix"]).decompose("tt", rank=2, scale=1.0, train_head=False)
    randomize_factors(adapter, seed=2)
    mix, x = model.block.mix, torch.randn(2, 4, dtype=torch.float64)
    assert type(mix) is not Dense and set(dict(mix.named_parameters())) == {"kernel", "bias"}
    assert mix.kernel is mix._parameters["kernel"]  # outside a forward that may read it: the parameter itself
    kernel = _oracle_params(base, adapter, 1.0)["block.mix.kernel"]
    with torch.no_grad():
        assert_close(mix(x), x @ kernel + base.block.mix.bias, 1e-12, "stand-in forward")


def test_a_new_kind_runs_in_a_mixed_batch(dense_kind):
    torch.manual_seed(0)
    model = Net().double()
    base = copy.deepcopy(model)
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    for seed, name in enumerate(["a", "b"]):
        adapter = factnet.Tensorizer(model).decompose("tt", rank=2, scale=1.5, name=name, train_head=False)
        randomize_factors(adapter, std=0.3, seed=seed)
        with torch.no_grad():  # each alone: the oracle
            model.factnet.activate(name)
            assert_close(model(x), functional_call(base, _oracle_params(base, adapter, 1.5), (x,)), 1e-12, name)
    mixed, alone = mixed_against_alone(model, x, ["a", "b", "b", "a"])
    assert_close(mixed, alone, 1e-12, "mixed batch")
    assert model.factnet.split_readers == {"block"}  # it reads block.mix.kernel: run once per adapter
