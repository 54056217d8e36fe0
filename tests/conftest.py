"""Shared helpers: tiny models, user-defined formats, random factors and comparisons (the dense oracle:
`oracle_support`)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import tensorly as tl
import torch
from hypothesis import settings
from torch import nn

import factnet
from factnet import autotune

settings.register_profile("factnet", deadline=None, max_examples=40, print_blob=True)
settings.register_profile("factnet-ci", deadline=None, max_examples=40, print_blob=True, derandomize=True)
settings.load_profile(os.environ.get("FACTNET_HYPOTHESIS_PROFILE", "factnet"))

BUILTIN_FORMATS = ["batch-matrix", "cp", "tensor-ring", "tt", "tucker"]


# ---- user-defined formats: registered by subclassing only, no edit to factnet ----------------
class UserTT(factnet.Format, name="user-tt"):
    """FacT-TT written by a user: ``ΔW[i] = u σ_i vᵀ``."""

    factors = {"sigma": "iab", "u": "ja", "v": "kb"}
    zero = "v"

    def reference(self, factors):
        return torch.einsum("iab,ja,kb->ijk", factors["sigma"], factors["u"], factors["v"])


class UserOutPerSlice(factnet.Format, name="user-out-per-slice"):
    """Shared input projection, per-slice core and per-slice output projection."""

    factors = {"u": "ja", "g": "iab", "v": "ikb"}
    zero = "v"

    def reference(self, factors):
        u, g, v = factors["u"], factors["g"], factors["v"]
        return torch.stack([u @ g[i] @ v[i].T for i in range(g.shape[0])])


class UserInPerSlice(factnet.Format, name="user-in-per-slice"):
    """Per-slice input projection, one shared core, shared output projection (a Tucker-2-like chain)."""

    factors = {"u": "ija", "g": "ab", "v": "kb"}
    zero = "v"

    def reference(self, factors):
        u, g, v = factors["u"], factors["g"], factors["v"]
        return torch.stack([u[i] @ g @ v.T for i in range(u.shape[0])])


class UserBlockTerm(factnet.Format, name="user-block-term"):
    """Two Tucker terms summed; the term letter ``t`` has its own size (2), not the rank."""

    factors = {"core": "tabc", "p": "ita", "u": "jtb", "v": "ktc"}
    zero = "v"
    own_sizes = {"t": 2}  # letters not sized by the rank (read by the tests too)

    def sizes(self, n, d_in, d_out):
        return {**super().sizes(n, d_in, d_out), **self.own_sizes}

    def reference(self, factors):
        with tl.backend_context("pytorch"):
            return sum(tl.tucker_to_tensor((factors["core"][t], [factors[f][:, t] for f in "puv"])) for t in range(2))


class UserDiagonalInPerSlice(factnet.Format, name="user-diagonal-in-per-slice"):
    """A diagonal core with a per-slice input projection: ``ΔW[i] = u[i] diag(d[i]) vᵀ`` (a matrix cut into
    output blocks meets several slices' ``u``: the core is folded into ``v`` for it)."""

    factors = {"d": "ia", "u": "ija", "v": "ka"}
    zero = "v"

    def reference(self, factors):
        return torch.einsum("ia,ija,ka->ijk", factors["d"], factors["u"], factors["v"])


USER_FORMATS = ["user-block-term", "user-diagonal-in-per-slice", "user-in-per-slice", "user-out-per-slice", "user-tt"]


@pytest.fixture(autouse=True)
def _default_kernel_variants(request):
    """Pin every kernel op to its default variant: autotuning picks variants by timing them, so a
    test's floating-point path would depend on the machine and its load. tests/test_autotune.py
    runs every variant against the dense oracle, and is left to choose."""
    if request.module.__name__.rpartition(".")[2] == "test_autotune":
        yield
        return
    with autotune.force(**{op: names[0] for op, names in autotune.VARIANTS.items()}):
        yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread keeps a shared machine from oversubscribing (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tiny models --------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Linear layers of shapes (d, d) ``proj``, (3d, d) ``qkv``, (4d, d) ``fc1``, (d, 4d) ``fc2``,
    optionally a whole non-square ``odd`` (d+1, d), and a ``head``. ``x: (..., d) -> (..., n_out)``."""

    def __init__(self, d: int = 4, bias: bool = True, odd: bool = False, n_out: int = 3) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.fc1 = nn.Linear(d, 4 * d, bias=bias)
        self.fc2 = nn.Linear(4 * d, d, bias=bias)
        self.odd = nn.Linear(d, d + 1, bias=bias) if odd else None
        self.head = nn.Linear(d + 1 if odd else d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = x + self.proj(torch.tanh(q) * k + v)
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        if self.odd is not None:
            h = torch.tanh(self.odd(h))
        return self.head(h)


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer (as in transformers.pytorch_utils): ``weight: (nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(size_out)


class GPT2Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(3 * d, d)
        self.attn.c_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(4 * d, d)
        self.mlp.c_proj = Conv1D(d, 4 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp.c_proj(torch.nn.functional.gelu(self.mlp.c_fc(self.ln_2(x))))


class TinyGPT2(nn.Module):
    """A GPT-2-style language model built from `Conv1D` layers; ``tokens: (b, t) -> (b, t, vocab)``."""

    def __init__(self, vocab: int = 11, d: int = 8, layers: int = 2, heads: int = 2, positions: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(positions, d)
        self.h = nn.ModuleList(GPT2Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_vit(**kwargs):
    import timm

    config = dict(pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    config.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **config)


def tiny_swin(**kwargs):
    import timm

    config = dict(pretrained=False, num_classes=3, img_size=56, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                  window_size=7, drop_path_rate=0.0)
    config.update(kwargs)
    return timm.create_model("swin_tiny_patch4_window7_224", **config)


def tiny_convnext(conv_mlp: bool = True, **kwargs):
    import timm

    config = dict(pretrained=False, num_classes=3, dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), conv_mlp=conv_mlp)
    config.update(kwargs)
    return timm.create_model("convnext_atto", **config)


def tiny_torchvision_vit():
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=64, num_classes=5)


def tiny_transformer_encoder():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


# ---- factors ------------------------------------------------------------------------------------
@pytest.fixture
def vit():
    """A tiny timm ViT in float64, eval mode (seeded)."""
    torch.manual_seed(0)
    return tiny_vit().double().eval()


@pytest.fixture
def images():
    """Two float64 32x32 images for `vit`."""
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def randomize_factors(adapter: factnet.Adapter, std: float = 0.5, seed: int = 0) -> None:
    """Overwrite every factor with N(0, std²) values (in place, as a user would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in adapter.groups.values():
            for factor in group.factors.values():
                factor.copy_(torch.randn(factor.shape, generator=generator, dtype=torch.float64) * std)


def mixed_against_alone(model: nn.Module, x: torch.Tensor, order: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-sample mixed output, the same rows from each adapter alone)`` for the adapters named in ``order``
    (one name per sample of ``x``), without grad."""
    with torch.no_grad():
        alone = {}
        for name in dict.fromkeys(order):
            model.factnet.activate(name)
            alone[name] = model(x)
        with model.factnet.per_sample(order):
            mixed = model(x)
    return mixed, torch.stack([alone[name][i] for i, name in enumerate(order)])


def perturb_head(adapter: factnet.Adapter, seed: int) -> None:
    """Add N(0, 1) noise (from generator ``seed``) to the adapter's head parameters, in place: a head of its own."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.head_state().values():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype))


def factor_leaves(adapter: factnet.Adapter) -> dict[str, dict[str, torch.Tensor]]:
    """Detached leaf copies of every group's factors (requires_grad) for the differentiable oracle."""
    return {
        key: {name: p.detach().clone().requires_grad_(True) for name, p in group.factors.items()}
        for key, group in adapter.groups.items()
    }


# ---- comparisons --------------------------------------------------------------------------------
def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max(1, max|e|)``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
    return err / max(1.0, expected.detach().abs().max().item() if expected.numel() else 0.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    err = max_rel_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def snapshot(model: nn.Module) -> dict:
    """Everything `detach()` and failed calls must leave untouched."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "adapter": getattr(model, "factnet", None),
    }


def assert_same_model(model: nn.Module, before: dict, tol: float | None = None) -> None:
    """The model is as `snapshot` saw it: bit for bit, or (``tol``) weights within relative ``tol``."""
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        if tol is None:
            assert equal_or_both_nan(after["state"][key], value), f"{key} changed"
        else:
            assert_close(after["state"][key], value, tol, key)
    assert after["adapter"] is before["adapter"]
    if before["adapter"] is None:
        assert "factnet" not in dict(model.named_children())


def assert_refused(model: nn.Module, match: str, call: Callable[[], object]) -> str:
    """``call()`` raises FactnetError matching ``match`` and leaves ``model`` exactly as it was (`snapshot`);
    returns the error's message."""
    before = snapshot(model)
    with pytest.raises(factnet.FactnetError, match=match) as info:
        call()
    assert_same_model(model, before)
    return str(info.value)


def equal_or_both_nan(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """``torch.equal``, with a NaN equal to a NaN in the same place (a refused call leaves a NaN it found)."""
    return torch.equal(actual, expected) or (torch.equal(actual.isnan(), expected.isnan())
                                              and torch.equal(actual[~actual.isnan()], expected[~expected.isnan()]))
