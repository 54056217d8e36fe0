"""The dense oracle, independent of factnet's kernel: it takes a copy of the model made *before* `decompose`,
reconstructs every group tensor with the format's tensorly reference (or a plain ``torch.einsum`` for the formats
the tests define), adds ``scale · ΔW[i]ᵀ`` to the block of the weight each slice names, and runs the copy with those
weights through ``torch.func.functional_call``. Built from leaf copies of the factors it is differentiable, so it
also gives the reference gradients."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

import factnet


def reference(fmt: factnet.Format, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The oracle reconstruction ``(n, d_in, d_out)``: tensorly's (built-in formats) or the
    user format's own einsum; never factnet's planned contraction."""
    return fmt.reference(factors)


def weight_param(model: nn.Module, module_name: str):
    """``(parameter name, to_linear, from_linear)`` for the matrix of ``module_name`` in ``model``
    (the unadapted copy), decided from the module's own type: linear convention is
    ``W: (d_out, d_in)`` with ``y = x Wᵀ``."""
    module = model.get_submodule(module_name)
    prefix = f"{module_name}." if module_name else ""
    same = lambda w: w  # noqa: E731
    if isinstance(module, nn.MultiheadAttention):
        return prefix + "in_proj_weight", same, same
    if isinstance(module, nn.Linear):
        return prefix + "weight", same, same
    if isinstance(module, nn.Conv2d):
        assert module.kernel_size == (1, 1), module
        shape = module.weight.shape
        return prefix + "weight", lambda w: w.reshape(shape[0], shape[1]), lambda w: w.reshape(shape)
    if type(module).__name__ == "Conv1D":
        return prefix + "weight", lambda w: w.t(), lambda w: w.t()
    raise AssertionError(f"oracle does not know {type(module).__name__} at {module_name!r}")


def effective_params(base: nn.Module, adapter: factnet.Adapter, scale: float,
                     factors: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """``{parameter name: W + scale·ΔW}`` for every adapted matrix, in the parameter's own layout.

    ``base`` is a copy of the model taken before `decompose`. ``factors`` (default: the adapter's
    own, detached) may be leaf tensors that require grad: the result is differentiable in them.
    """
    params = dict(base.named_parameters())
    linear: dict[str, torch.Tensor] = {}
    back = {}
    for key, group in adapter.groups.items():
        values = factors[key] if factors is not None else {n: p.detach() for n, p in group.factors.items()}
        dtype = next(iter(values.values())).dtype  # seeded factors (`Format.seeded`), in the given factors' dtype
        dense = reference(group.format, values | {k: b.to(dtype) for k, b in group.seeded.named_buffers()})
        assert dense.shape == (len(group.slices), group.slices[0].d_in, group.slices[0].d_out)
        for i, piece in enumerate(group.slices):
            name, to_linear, from_linear = weight_param(base, piece.module)
            if name not in linear:
                linear[name] = to_linear(params[name].detach()).clone()
                back[name] = from_linear
            weight = linear[name]
            block = scale * dense[i].T.to(weight.dtype)  # (d_out of slice, d_in of slice)
            if piece.side == "out":
                rows = slice(piece.index * piece.d_out, (piece.index + 1) * piece.d_out)
                weight[rows, :] = weight[rows, :] + block
            elif piece.side == "in":
                cols = slice(piece.index * piece.d_in, (piece.index + 1) * piece.d_in)
                weight[:, cols] = weight[:, cols] + block
            else:
                assert piece.side == "none"
                weight[:, :] = weight + block
    return {name: back[name](w) for name, w in linear.items()}


def oracle_forward(base: nn.Module, adapter: factnet.Adapter, scale: float, *args,
                   factors: dict[str, dict[str, torch.Tensor]] | None = None, **kwargs):
    """The base copy run with ``W + scale·ΔW`` for every adapted matrix."""
    return functional_call(base, effective_params(base, adapter, scale, factors), args, kwargs)


def zero_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def blockwise_delta(weight: torch.Tensor, a_t: torch.Tensor, core: torch.Tensor, b_t: torch.Tensor, m_in: int,
                    m_out: int, g_in: int, g_out: int, d: int) -> torch.Tensor:
    """Dense ``ΔW`` of one kernel `Increment`, block by block from its definition (the kernel's oracle):
    block ``(q, p)`` is ``P_out[q] · core[p, :, q, :]ᵀ · P_in[p]ᵀ``, in ``weight``'s shape; ``core=None`` is the
    identity of size ``m_in·α = m_out·β``."""
    alpha, beta = a_t.shape[1], b_t.shape[1]
    if core is None:
        core = torch.eye(m_in * alpha, dtype=a_t.dtype)
    blocks = core.reshape(m_in, alpha, m_out, beta)
    delta = torch.zeros_like(weight)
    for p in range(m_in):
        for q in range(m_out):
            a, b = a_t[p if g_in > 1 else 0], b_t[q if g_out > 1 else 0]
            delta[q * d:(q + 1) * d, p * d:(p + 1) * d] = b.T @ blocks[p, :, q, :].T @ a
    return delta


def dense_core(form, n: int) -> torch.Tensor:
    """A normal form's ``core: (n, a, b)``: as it is, from its diagonal ``(n | 1, a)``, or the identity (None)."""
    if form.core is None:
        return torch.eye(form.p_in_t.shape[1], dtype=form.p_in_t.dtype).expand(n, -1, -1)
    if form.core.dim() == 2:
        return torch.diag_embed(form.core).expand(n, -1, -1)
    return form.core
