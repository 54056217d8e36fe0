"""The model zoo (tests/zoo.py) against every builtin format: factnet's default targets on real
architectures from timm, Hugging Face transformers, torchvision and torch, small random configs in
float64, dropout off, constant parameters revived so every matrix shows in the output.

For every family and format (rank 2, or the format's limit where lower; scale 1.5):
1. exact at init: the adapted model's output, and the output of each of its modules, is the base
   model's, bit for bit, in train mode with grad and in eval mode without (the base in the
   requires_grad state factnet leaves it in, see `_as_factnet_leaves`);
2. a backward in train mode gives every group a nonzero factor gradient, and no backbone parameter
   (anything but the factors and the head) a ``.grad``;
3. with random factors, the unmerged train-mode forward and the factor gradients equal the dense
   oracle's (oracle_support.oracle_forward: ``W + s·ΔW`` by tensorly, run on an unadapted copy): a matrix
   whose increment never reaches the forward, or reaches it twice, fails here;
4. the merged forward (no grad) equals the unmerged one;
5. unmerge restores the stored parameters;
6. save -> load on a fresh copy of the base model gives the adapted model's outputs (before the
   merge) bit for bit, in train mode and in eval without grad.

Every check of a case runs even when an earlier one fails; the case then fails listing them all.
"""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
from conftest import BUILTIN_FORMATS, assert_close, factor_leaves, randomize_factors
from oracle_support import oracle_forward, weight_param
from zoo import FAMILIES, inputs, main_output, prototype, run

import factnet

RANK, SCALE = 2, 1.5
NAMES = list(FAMILIES)


# tiny tensors: one thread; the libraries' warnings about tiny configs are noise here
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


def _tensorizer(name, model):
    return factnet.Tensorizer(model, FAMILIES[name].targets)


def _rank(tensorizer, fmt):
    """RANK, or the largest rank the format allows on every group where that is lower (Tucker on
    a one-slice group allows rank 1)."""
    spec = factnet.get_format(fmt, RANK)
    return min([RANK, *(spec.max_rank(*shape) for shape in tensorizer.group_shapes().values())])


def _as_factnet_leaves(base, model, adapter, grad):
    """A copy of ``base`` with every parameter requiring grad as it does in the adapted ``model``
    (backbone frozen, head trainable), and each adapted weight requiring grad exactly when grad
    mode is on (``W + s·ΔW`` is built from trainable factors then, and from nothing that requires
    grad under no_grad).

    torch chooses kernels by ``requires_grad`` even under no_grad (``matmul`` folds a non-contiguous
    3-D input into one mm only for a weight that requires grad; the CPU attention backend depends on
    whether a bias parameter does), so freezing alone moves a model's output by rounding. This copy
    is the base model an adapted model at init can equal bit for bit."""
    ref = copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapted = {weight_param(base, name)[0] for name in adapter.matrices}
    for pname, param in ref.named_parameters():
        param.requires_grad_(grad if pname in adapted else flags[pname])
    return ref


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in map(_first_tensor, value) if t is not None), None)
    return getattr(value, "logits", getattr(value, "last_hidden_state", None))


def _traced(model, args, kwargs):
    """The main output and the (first tensor) output of every module call, in call order, as
    ``(module name, tensor)``: the models' own outputs are tiny (6 logits), a rounding difference
    inside shows here."""
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def record(module, inputs_, output):
            tensor = _first_tensor(output)
            if isinstance(tensor, torch.Tensor):
                seen.append((name, tensor.detach().clone()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not n.startswith("factnet")]
    try:
        return run(model, args, kwargs), seen
    finally:
        for handle in handles:
            handle.remove()


def _first_difference(trace, reference):
    """``None`` if every module call of ``trace`` gave what it gave in ``reference``, else where
    the first difference is."""
    common = {n for n, _ in trace} & {n for n, _ in reference}  # not modules only one of them has
    trace, reference = [c for c in trace if c[0] in common], [c for c in reference if c[0] in common]
    if [n for n, _ in trace] != [n for n, _ in reference]:
        return "the modules ran in another order"
    for (name, a), (_, b) in zip(trace, reference):
        if a.shape != b.shape:
            return f"module {name!r} returned shape {tuple(a.shape)}, in the base {tuple(b.shape)}"
        if not torch.equal(a, b):
            return f"first at module {name!r}, by {(a - b).abs().max().item():.3g}"
    return None


class Checks:
    """Collects failed checks so that one case reports all of them."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, condition, message):
        if not condition:
            self.failed.append(message)

    def close(self, actual, expected, tol, what):
        try:
            assert_close(actual, expected, tol, what)
        except AssertionError as error:
            self.failed.append(str(error))

    def done(self):
        assert not self.failed, "\n".join(self.failed)


@pytest.mark.parametrize("name", NAMES)
def test_family_is_deterministic_and_default_targets_are_found(name):
    """The prototype runs the same twice in train mode (no dropout left), and the default targets
    find the expected kinds of matrix, never the head, embeddings or stem."""
    model = prototype(name)
    args, kwargs = inputs(name)
    first, second = run(model, args, kwargs), run(model, args, kwargs)
    assert torch.equal(first, second), "train mode is not deterministic: some dropout is left"
    assert torch.isfinite(first).all()
    tensorizer = _tensorizer(name, model)
    assert tensorizer.slices
    assert {s.matrix.kind for s in tensorizer.slices} == FAMILIES[name].kinds
    adapter = tensorizer.decompose("tt", rank=1)
    for piece in tensorizer.slices:
        assert not any(piece.module == h or piece.module.startswith(h + ".") for h in adapter.head), piece
        assert not any(fnmatch.fnmatchcase(s, p) for s in piece.module.split(".")
                       for p in ("patch_embed", "embeddings", "conv_proj", "stem")), piece


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].library == "timm"])
def test_timm_classifier_is_the_trainable_head(name):
    """Every module timm's ``get_classifier()`` names (DeiT-distilled: ``head`` and ``head_dist``,
    whose outputs are averaged at inference) is part of the trainable head."""
    model = prototype(name)
    classifier = model.get_classifier()
    modules = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    names = [n for n, m in model.named_modules() if any(m is c for c in modules)]
    adapter = factnet.Tensorizer(model).decompose("tt", rank=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("factnet.")}
    for module_name in names:
        params = {f"{module_name}.{p}" for p, _ in model.get_submodule(module_name).named_parameters()}
        assert params <= trainable, f"classifier {module_name!r} is frozen (head: {adapter.head})"


@pytest.mark.parametrize("fmt", BUILTIN_FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_zoo(name, fmt, tmp_path):
    check = Checks()
    model = prototype(name)
    base = copy.deepcopy(model)
    args, kwargs = inputs(name)
    tensorizer = _tensorizer(name, model)
    adapter = tensorizer.decompose(fmt, rank=_rank(tensorizer, fmt), scale=SCALE, seed=0)
    head = adapter.head

    def is_head(param_name):
        return any(param_name.startswith(h + ".") for h in head)

    # 1. exact at init
    (y0, trace), (_, trace_ref) = (_traced(model, args, kwargs),
                                   _traced(_as_factnet_leaves(base, model, adapter, True), args, kwargs))
    differs = _first_difference(trace, trace_ref)
    check(differs is None, f"1. train mode at init differs from the base model: {differs}")
    reference = _as_factnet_leaves(base, model, adapter, False).eval()
    model.eval()
    with torch.no_grad():
        differs = _first_difference(_traced(model, args, kwargs)[1], _traced(reference, args, kwargs)[1])
        check(differs is None, f"1. eval/no-grad at init differs from the base model: {differs}")
    model.train()

    # 2. gradients reach every group and nothing in the backbone
    weights = torch.randn(y0.shape, dtype=y0.dtype, generator=torch.Generator().manual_seed(3))
    (y0 * weights).sum().backward()
    for key, group in adapter.groups.items():
        check(any(p.grad is not None and bool(p.grad.ne(0).any()) for p in group.factors.values()),
              f"2. group {key}: no factor got a nonzero gradient at init")
    leaked = [n for n, p in model.named_parameters()
              if not n.startswith("factnet.") and not is_head(n) and p.grad is not None]
    check(not leaked, f"2. backbone parameters got gradients: {leaked[:5]}")
    model.zero_grad(set_to_none=True)

    # 3. random factors: forward and factor gradients against the dense oracle
    randomize_factors(adapter, std=0.3, seed=2)
    y = run(model, args, kwargs)
    (y * weights).sum().backward()
    leaves = factor_leaves(adapter)
    y_oracle = main_output(oracle_forward(base, adapter, SCALE, *args, factors=leaves, **kwargs))
    (y_oracle * weights).sum().backward()
    check.close(y, y_oracle, 1e-9, "3. train-mode forward vs the dense oracle")
    check(not torch.equal(y, y0), "3. random factors left the output unchanged")
    for key, group in adapter.groups.items():
        for fname, factor in group.factors.items():
            if factor.grad is None:
                check(False, f"3. {key}.{fname} got no gradient")
            else:
                check.close(factor.grad, leaves[key][fname].grad, 1e-8, f"3. gradient of {key}.{fname} vs the oracle")
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        y_eval = run(model, args, kwargs)
    model.train()

    # 4. merged forward
    adapter.merge()
    with torch.no_grad():
        check.close(run(model, args, kwargs), y, 1e-9, "4. merged forward vs unmerged")

    # 5. unmerge restores the stored parameters
    adapter.unmerge()
    params = dict(model.named_parameters())
    check(set(params) == set(stored), "5. the parameter names changed")
    for pname, value in stored.items():
        check.close(params[pname], value, 1e-10, f"5. {pname} after merge/unmerge")

    # 6. save -> load on a fresh copy of the base model; the weights of `model` are W + s·ΔW - s·ΔW
    # now (rounding), `fresh` has W, as `model` had for y and y_eval
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    fresh = copy.deepcopy(base)
    loaded = factnet.load(fresh, path)
    check(loaded.group_names == adapter.group_names, "6. loaded groups differ")
    for key, group in adapter.groups.items():
        for fname, factor in group.factors.items():
            check(torch.equal(loaded.groups[key].factors[fname], factor), f"6. {key}.{fname} not loaded as saved")
    check(torch.equal(run(fresh, args, kwargs), y), "6. loaded adapter: train-mode output differs")
    fresh.eval()
    with torch.no_grad():
        check(torch.equal(run(fresh, args, kwargs), y_eval), "6. loaded adapter: eval/no-grad output differs")
    check.done()
