"""The model zoo (tests/zoo.py) against every builtin format: factnet's default targets on real
architectures from timm, Hugging Face transformers, torchvision and torch, small random configs in
float64, dropout off, constant parameters revived so every matrix shows in the output.

For every family and format (rank 2, scale 1.5):
1. exact at init: the adapted model's output is the base model's, bit for bit (train mode, and
   eval without grad);
2. a backward in train mode gives every group a nonzero factor gradient, and no backbone parameter
   (anything but the factors and the head) a ``.grad``;
3. with random factors, the unmerged train-mode forward and the factor gradients equal the dense
   oracle's (conftest.oracle_forward: ``W + s·ΔW`` by tensorly, run on an unadapted copy): a matrix
   whose increment never reaches the forward, or reaches it twice, fails here;
4. the merged forward (no grad) equals the unmerged one;
5. unmerge restores the stored parameters;
6. save -> load on a fresh copy of the base model gives the adapted model's outputs (before the
   merge) bit for bit, in train mode and in eval without grad.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings

import pytest
import torch

import factnet
from conftest import BUILTIN_FORMATS, assert_close, factor_leaves, oracle_forward, randomize_factors
from zoo import FAMILIES, inputs, main_output, prototype, run

RANK, SCALE = 2, 1.5
NAMES = list(FAMILIES)


@pytest.fixture(autouse=True)
def _quiet_and_one_thread():
    """Tiny tensors: one thread; the libraries' warnings about tiny configs are noise here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


def _tensorizer(name, model):
    return factnet.Tensorizer(model, FAMILIES[name].targets)


@pytest.mark.parametrize("name", NAMES)
def test_family_is_deterministic_and_default_targets_are_found(name):
    """The prototype runs the same twice in train mode (no dropout left), and the default targets
    find the expected kinds of matrix, never the head or patch embedding."""
    model = prototype(name)
    args, kwargs = inputs(name)
    first, second = run(model, args, kwargs), run(model, args, kwargs)
    assert torch.equal(first, second), "train mode is not deterministic: some dropout is left"
    assert torch.isfinite(first).all()
    tensorizer = _tensorizer(name, model)
    assert tensorizer.slices
    assert {s.matrix.kind for s in tensorizer.slices} == FAMILIES[name].kinds
    adapter = tensorizer.decompose("tt", rank=RANK)
    for piece in tensorizer.slices:
        assert not any(piece.module == h or piece.module.startswith(h + ".") for h in adapter.head), piece
        assert not any(fnmatch.fnmatchcase(s, p) for s in piece.module.split(".")
                       for p in ("patch_embed", "embeddings", "conv_proj", "stem")), piece


@pytest.mark.parametrize("fmt", BUILTIN_FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_zoo(name, fmt, tmp_path):
    model = prototype(name)
    base = copy.deepcopy(model)
    args, kwargs = inputs(name)
    adapter = _tensorizer(name, model).decompose(fmt, rank=RANK, scale=SCALE, seed=0)
    head = adapter.head

    def is_head(param_name):
        return any(param_name.startswith(h + ".") for h in head)

    # 1. exact at init
    model.train()
    base.train()
    y0 = run(model, args, kwargs)
    assert torch.equal(y0, run(base, args, kwargs)), "train mode at init differs from the base model"
    model.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(run(model, args, kwargs), run(base, args, kwargs)), "eval/no-grad at init differs"
    model.train()
    base.train()

    # 2. gradients reach every group and nothing in the backbone
    weights = torch.randn(y0.shape, dtype=y0.dtype, generator=torch.Generator().manual_seed(3))
    (y0 * weights).sum().backward()
    for key, group in adapter.groups.items():
        grads = {f: p.grad for f, p in group.factors.items()}
        assert any(g is not None and bool(g.ne(0).any()) for g in grads.values()), \
            f"group {key}: no factor got a nonzero gradient at init"
    leaked = [n for n, p in model.named_parameters()
              if not n.startswith("factnet.") and not is_head(n) and p.grad is not None]
    assert not leaked, f"backbone parameters got gradients: {leaked[:5]}"
    model.zero_grad(set_to_none=True)

    # 3. random factors: forward and factor gradients against the dense oracle
    randomize_factors(adapter, std=0.3, seed=2)
    y = run(model, args, kwargs)
    (y * weights).sum().backward()
    leaves = factor_leaves(adapter)
    y_oracle = main_output(oracle_forward(base, adapter, SCALE, *args, factors=leaves, **kwargs))
    (y_oracle * weights).sum().backward()
    assert_close(y, y_oracle, 1e-9, "train-mode forward vs the dense oracle")
    assert not torch.equal(y, y0), "random factors left the output unchanged"
    for key, group in adapter.groups.items():
        for fname, factor in group.factors.items():
            assert factor.grad is not None, f"{key}.{fname} got no gradient"
            assert_close(factor.grad, leaves[key][fname].grad, 1e-8, f"gradient of {key}.{fname} vs the oracle")
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        y_eval = run(model, args, kwargs)
    model.train()

    # 4. merged forward
    adapter.merge()
    with torch.no_grad():
        assert_close(run(model, args, kwargs), y, 1e-9, "merged forward vs unmerged")

    # 5. unmerge restores the stored parameters
    adapter.unmerge()
    params = dict(model.named_parameters())
    assert set(params) == set(stored)
    for pname, value in stored.items():
        assert_close(params[pname], value, 1e-10, f"{pname} after merge/unmerge")
    for pname, value in base.named_parameters():
        assert_close(params[pname], value, 1e-10, f"{pname} after merge/unmerge vs the base model")

    # 6. save -> load on a fresh copy of the base model
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    fresh = copy.deepcopy(base)
    loaded = factnet.load(fresh, path)
    assert loaded.group_names == adapter.group_names
    for key, group in adapter.groups.items():
        for fname, factor in group.factors.items():
            assert torch.equal(loaded.groups[key].factors[fname], factor), f"{key}.{fname} not loaded as saved"
    # the weights of `model` are W + s·ΔW - s·ΔW now (rounding); `fresh` has W, as `model` had for y
    assert torch.equal(run(fresh, args, kwargs), y), "loaded adapter: train-mode output differs"
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(run(fresh, args, kwargs), y_eval), "loaded adapter: eval/no-grad output differs"
