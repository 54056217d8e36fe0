"""The one training kernel: a linear layer plus increments in normal form.

Each `factnet.increment.Increment` is one group's share of the module's ``ΔW``; its projections are
stored rank-major (``a_t`` is ``P_inᵀ``), and which GEMM layout runs them fastest is measured on the
machine at hand (below). A `diagonal` increment runs through autograd (`factnet.diagonal`).

One forward and one backward (`_forward`, `_backward`), with no dense weight gradient, serve two
autograd functions:
- `_MergedLinear` (no dropout): the forward runs one GEMM with ``W + s·ΔW`` (built by one ``addmm``
  pass over ``W``, not stored) or the base GEMM plus the thin products ``y += s·(x P_in core) P_outᵀ``
  (``core=None``: folded into a projection, one GEMM fewer), saving their small ``u = x P_in``;
- `_ActivationLinear` (factor-space dropout in training): the thin forward with the mask on ``h``.
The backward gets the factor gradients from thin products with ``x`` and ``grad_y`` and ``grad_x`` from
``grad_y W`` plus a thin correction, or from the rebuilt ``W + s·ΔW``. The scale rides in the GEMMs
(``alpha``), not in separate passes.

Where more than one exact layout or order exists (build ``W + s·ΔW`` or apply the increment by thin
products, in forward and for ``grad_x``; how to run the long ``Σ_n`` reductions and the thin ``x Pᵀ``),
the kernel measures the variants on the machine at hand once per shape and keeps the fastest
(`factnet.autotune`: the cache, ``FACTNET_KERNEL`` and ``force`` to pin a variant). Every variant is
exact; they differ in rounding only.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from factnet import autotune
from factnet.diagonal import diagonal_rows, dropout_mask
from factnet.increment import Increment, effective_weight
from factnet.products import add_times, outer, scaled_mm, times, times_t

__all__ = ["adapted_linear", "base_op", "delta_rows"]


def delta_rows(rows: Tensor, increments: list[Increment], scale: float, out: Tensor | None = None) -> Tensor:
    """``s · Σ rows ΔWᵀ`` by thin products, never forming ``ΔW``: ``(N, d_in) → (N, d_out)``, or added
    in place to ``out: (N, d_out)`` when given (mixed-adapter batches: each adapter's rows get its own)."""
    for inc in increments:
        if inc.diagonal:
            delta = diagonal_rows(rows, inc, scale)
            out = delta if out is None else out.add_(delta)
            continue
        hidden = _hidden(times_t(rows, inc.a_t, inc.m_in), inc.core, scale)  # (N, m_out·β)
        if out is None:
            out = times(hidden, inc.b_t, inc.m_out)
        else:
            add_times(out, hidden, inc.b_t, inc.m_out)
    return out


def _masked_hidden(u: Tensor, core: Tensor | None, scale: float, mask: Tensor | None) -> tuple[Tensor, float]:
    """``(h, alpha)`` with ``alpha · h = s · mask ⊙ (u core)``, the forward's and the backward's hidden
    activations: ``h = s · mask ⊙ (u core)`` at ``alpha = 1``, or for a folded core ``h = mask ⊙ u`` at
    ``alpha = s`` (the scale rides in the next product)."""
    if core is None:
        return (u if mask is None else u * mask), scale
    h = scaled_mm(u, core, scale)
    if mask is not None:
        h.mul_(mask)
    return h, 1.0


def _hidden(u: Tensor, core: Tensor | None, scale: float) -> Tensor:
    """``s · u core`` (``u: (N, m_in·α)``), or ``s · u`` for a folded core (``u`` itself at ``s = 1``)."""
    if core is None:
        return u if scale == 1.0 else u * scale
    return scaled_mm(u, core, scale)


class _MergedLinear(torch.autograd.Function):
    """``y = x (W + s·Σ ΔW)ᵀ + bias`` (dropout-free) with factor gradients from thin projections.

    The forward runs one GEMM with the effective weight (``mode`` "merged": built by one ``addmm`` pass
    over ``W``) or the base GEMM plus the thin products ("thin"), and the backward gets ``grad_x`` from
    the rebuilt effective weight or from ``grad_y W`` plus a thin product: whichever measures faster for
    the shape (`factnet.autotune` ops ``forward`` and ``grad_input``; ``mode="merged"`` forces the weight).
    Neither saves more than ``x``, the factors and (thin forward) the small ``u = x P_in``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, layout, pointwise, as_trained, mode, *factors):  # type: ignore[override]
        return _forward(ctx, x, weight, bias, scale, layout, pointwise, as_trained, mode, (), factors)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        grad_x, grad_weight, grad_bias, grad_factors = _backward(ctx, grad_y)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, *grad_factors


class _ActivationLinear(torch.autograd.Function):
    """``y = x Wᵀ + bias + s · Σ (mask ⊙ x P_in core) P_outᵀ``: factor-space dropout.

    ``masks`` are the dropout masks already scaled by ``1 / (1 - p)`` (all ones for none). Forward and
    backward are `_MergedLinear`'s thin ones, masked; no dense ``ΔW`` is ever formed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, layout, pointwise, as_trained, masks, *factors):  # type: ignore[override]
        return _forward(ctx, x, weight, bias, scale, layout, pointwise, as_trained, "thin", masks, factors)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        grad_x, grad_weight, grad_bias, grad_factors = _backward(ctx, grad_y)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, *grad_factors


def _forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, layout: tuple[tuple[int, int], ...],
             pointwise: bool, as_trained: bool, mode: str | None, masks: tuple[Tensor, ...],
             factors: tuple[Tensor, ...]) -> Tensor:
    """Both kernels' forward. "thin" saves each increment's ``u = x P_in: (N, m_in·α)`` (small), so the
    backward does not pass over ``x`` again for it (``h = s · mask ⊙ (u core)`` it recomputes: one tiny GEMM)."""
    x, weight, bias, factors, autocast = _in_compute_dtype(ctx, x, weight, bias, factors)
    key = ctx.key = (x.shape, weight.shape, weight.stride(), layout, *[None if f is None else f.shape for f in factors],
                     x.dtype, pointwise)
    saved: list[Tensor] = []
    with _no_autocast(x) if autocast else contextlib.nullcontext():
        if mode is None:
            mode = autotune.choice("forward", key) or _measure_forward(key, x, weight, scale, layout, factors, pointwise)
        if mode == "merged":
            effective = effective_weight(weight, _unflatten(layout, factors), scale)
            y = base_op(x, _like_trained(effective, as_trained, x, pointwise), bias, pointwise)
        else:
            y = base_op(x, _like_trained(weight, as_trained, x, pointwise), bias, pointwise)
            rows = _rows(x, pointwise)
            for pos, (m_in, m_out) in enumerate(layout):
                a_t, core, b_t = factors[3 * pos: 3 * pos + 3]
                u = times_t(rows, a_t, m_in)
                h, alpha = _masked_hidden(u, core, scale, masks[pos] if masks else None)
                _add_increment(y, h, b_t, m_out, pointwise, alpha)
                saved.append(u)
    ctx.save_for_backward(x, weight, *factors, *masks, *saved)
    ctx.scale, ctx.layout, ctx.has_bias, ctx.pointwise, ctx.x_shape = scale, layout, bias is not None, pointwise, x.shape
    ctx.masked = bool(masks)
    return y


def _measure_forward(key: tuple, x: Tensor, weight: Tensor, scale: float, layout: tuple[tuple[int, int], ...],
                     factors: tuple[Tensor, ...], pointwise: bool) -> str:
    """Time the work the two forwards do differently, as they do it: building ``W + s·ΔW`` (and, later,
    ``u`` and ``h`` in the backward) against adding ``h P_outᵀ`` to the output in place."""
    rows, increments = _rows(x, pointwise), _unflatten(layout, factors)
    y = x.new_zeros(x.shape[0], weight.shape[0], *x.shape[2:]) if pointwise else x.new_zeros(*x.shape[:-1], weight.shape[0])

    def hidden(inc: Increment) -> Tensor:
        return _hidden(times_t(rows, inc.a_t, inc.m_in), inc.core, 1.0)

    return autotune.measure("forward", key, {
        "merged": lambda: (effective_weight(weight, increments, scale), [hidden(inc) for inc in increments]),
        "thin": lambda: [_add_increment(y, hidden(inc), inc.b_t, inc.m_out, pointwise) for inc in increments],
    }, (rows, weight))


def _backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, list[Tensor]]:
    """Both kernels' backward: ``(grad_x, grad_weight, grad_bias, factor gradients)``."""
    x, weight, *rest = ctx.saved_tensors
    count, scale, needs = len(ctx.layout), ctx.scale, ctx.needs_input_grad
    factors = rest[: 3 * count]
    masks = rest[3 * count: 4 * count] if ctx.masked else ()
    saved = rest[3 * count + len(masks):]
    x, grad_y = _rows(x, ctx.pointwise), _rows(grad_y.to(x.dtype), ctx.pointwise).contiguous()
    grad_factors: list[Tensor] = []
    thin: list[tuple[Tensor, float]] = []  # per increment, grad_x's correction r (times alpha)
    wanted = needs[8:]  # which factors need a gradient (a seeded projection does not)
    for pos, (m_in, m_out) in enumerate(ctx.layout):
        a_t, core, b_t = factors[3 * pos: 3 * pos + 3]
        want_a, want_core, want_b = wanted[3 * pos: 3 * pos + 3]
        t = times_t(grad_y, b_t, m_out)  # grad_y P_out: (N, m_out·β); the scale goes into r and grad_core
        if masks:
            t.mul_(masks[pos])
        u = saved[pos] if saved else times_t(x, a_t, m_in)  # x P_in: (N, m_in·α)
        h, alpha = _masked_hidden(u, core, scale, masks[pos] if masks else None)
        if core is None:  # folded or identity: r = s·t, the scale in the products
            grad_factors += [outer(t, x, m_in, a_t.shape[0], scale) if want_a else None, None,
                             outer(h, grad_y, m_out, b_t.shape[0], alpha) if want_b else None]
            thin.append((t, scale))
            continue
        r = scaled_mm(t, core.t(), scale)  # (N, m_in·α)
        grad_factors += [outer(r, x, m_in, a_t.shape[0]) if want_a else None,
                         scaled_mm(u.t(), t, scale) if want_core else None,
                         outer(h, grad_y, m_out, b_t.shape[0], alpha) if want_b else None]
        thin.append((r, 1.0))
    grad_x = None
    if needs[0]:
        mode = "thin" if ctx.masked else autotune.choice("grad_input", ctx.key)
        if mode is None:
            increments = _unflatten(ctx.layout, factors)
            buffer = x.new_zeros(x.shape)  # (the thin variant adds into grad_x in place)
            mode = autotune.measure("grad_input", ctx.key, {
                "rebuild": lambda: effective_weight(weight, increments, scale),
                "thin": lambda: [add_times(buffer, r, inc.a_t, inc.m_in, alpha) for (r, alpha), inc in zip(thin, increments)],
            }, (grad_y, weight))
        if mode == "rebuild":
            grad_x = torch.mm(grad_y, effective_weight(weight, _unflatten(ctx.layout, factors), scale))
        else:
            grad_x = torch.mm(grad_y, weight)
            for (r, alpha), (m_in, _), a_t in zip(thin, ctx.layout, factors[::3]):
                add_times(grad_x, r, a_t, m_in, alpha)
        grad_x = _unrows(grad_x, ctx)
    grad_weight = torch.mm(grad_y.t(), x) if needs[1] else None
    grad_bias = grad_y.sum(0) if ctx.has_bias and needs[2] else None
    grad_x, grad_weight, grad_bias = _in_input_dtypes(ctx, grad_x, grad_weight, grad_bias)
    return grad_x, grad_weight, grad_bias, _factor_dtypes(ctx, grad_factors)


def _add_increment(y: Tensor, hidden: Tensor, b_t: Tensor, m_out: int, pointwise: bool, alpha: float = 1.0) -> None:
    """``y += alpha · hidden ⊗ P_out`` in place (``hidden: (N, m_out·β)``, already masked)."""
    if pointwise:
        y.add_(times(hidden, b_t, m_out).reshape(y.shape[0], *y.shape[2:], -1).movedim(-1, 1), alpha=alpha)
    elif y.is_contiguous():
        add_times(y, hidden, b_t, m_out, alpha)
    else:
        y.add_(times(hidden, b_t, m_out).view(y.shape), alpha=alpha)


def adapted_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    increments: list[Increment],
    scale: float,
    dropout: float = 0.0,
    path: str = "auto",
    pointwise: bool = False,
) -> Tensor:
    """``x: (..., d_in) → (..., d_out)``: the frozen layer plus ``s·ΔW`` of each increment.

    The frozen layer runs the base model's own op on ``x`` as it comes (a linear on ``(..., d_in)``,
    contiguous or not; with ``pointwise``, a 1x1 convolution on ``x: (N, d_in, H, W)``), so a zero
    increment gives the base model's output bit for bit. Factor-space ``dropout`` (active when > 0) needs
    the activation-side path; otherwise `_MergedLinear` runs (the effective weight or thin products
    forward, whichever measures faster for the shape; thin products backward). ``path`` forces
    ``"activation"`` or ``"merged"`` (one GEMM with ``W + s·ΔW``; only without dropout), for benchmarks.
    A `diagonal` increment runs through autograd (`diagonal_rows`: thin products or its dense ``ΔW``; its
    dropout drops the rows it reads).
    """
    if not increments:
        return base_op(x, weight, bias, pointwise)
    if any([inc.diagonal for inc in increments]):  # thin products and scalings, through autograd
        others = [inc for inc in increments if not inc.diagonal]
        trained = torch.is_grad_enabled() and any([t is not None and t.requires_grad for inc in increments
                                                   for t in (*inc.tensors(), inc.out_scale)])
        y = (adapted_linear(x, weight, bias, others, scale, dropout, path, pointwise) if others
             else base_op(x, _like_trained(weight, trained, x, pointwise), bias, pointwise))
        rows = _rows(x, pointwise)
        for inc in increments:
            if inc.diagonal:
                mask = dropout_mask(*rows.shape, dropout, x) if dropout > 0 else None
                y = y + _unrows_like(diagonal_rows(rows, inc, scale, mask), y, pointwise)
        return y
    layout = tuple([(inc.m_in, inc.m_out) for inc in increments])
    factors = [t for inc in increments for t in (inc.a_t, inc.core, inc.b_t)]
    as_trained = torch.is_grad_enabled() and any([t is not None and t.requires_grad for t in factors])
    if dropout > 0 or path == "activation":
        rows = x.numel() // (x.shape[1] if pointwise else x.shape[-1])
        keep = 1.0 - dropout
        masks = tuple(
            x.new_empty(rows, inc.m_out * inc.b_t.shape[1]).bernoulli_(keep).div_(keep) if dropout > 0
            else x.new_ones(1, inc.m_out * inc.b_t.shape[1])
            for inc in increments
        )
        return _ActivationLinear.apply(x, weight, bias, scale, layout, pointwise, as_trained, masks, *factors)
    mode = "merged" if path == "merged" else None
    return _MergedLinear.apply(x, weight, bias, scale, layout, pointwise, as_trained, mode, *factors)


def base_op(x: Tensor, weight: Tensor, bias: Tensor | None, pointwise: bool) -> Tensor:
    """The base model's op with ``weight: (d_out, d_in)``: a linear, or a 1x1 convolution."""
    if pointwise:
        return F.conv2d(x, weight.reshape(*weight.shape, 1, 1), bias)
    return F.linear(x, weight, bias)


def _like_trained(weight: Tensor, as_trained: bool, x: Tensor, pointwise: bool) -> Tensor:
    """``weight``, flagged as requiring grad when the weight it stands for (``W + s·ΔW`` of trainable
    factors) would and the flag can change torch's path: a non-contiguous input is folded into one mm
    only for such a weight (a contiguous one always is), and a convolution may pick its algorithm by
    it. The base model's path is the one to take, bit for bit."""
    if as_trained and weight.is_floating_point() and (pointwise or not x.is_contiguous()):
        return weight.detach().requires_grad_()
    return weight


def _rows(x: Tensor, pointwise: bool) -> Tensor:
    """The ``(N, d)`` rows of an input or output: ``(..., d)`` flattened, or a pointwise conv's
    ``(B, d, H, W)`` as ``(B·H·W, d)``."""
    return x.movedim(1, -1).reshape(-1, x.shape[1]) if pointwise else x.reshape(-1, x.shape[-1])


def _unrows_like(rows: Tensor, y: Tensor, pointwise: bool) -> Tensor:
    """``(N, d_out)`` rows in the layout of the output ``y`` (a pointwise conv's ``(B, d_out, H, W)``)."""
    if not pointwise:
        return rows.view(y.shape)
    return rows.reshape(y.shape[0], *y.shape[2:], y.shape[1]).movedim(-1, 1)


def _unrows(rows: Tensor, ctx) -> Tensor:
    """Inverse of `_rows` for the gradient of the input, whose shape is ``ctx.x_shape``."""
    shape = ctx.x_shape  # (not ctx.saved_tensors: checkpointing lets backward unpack them once)
    if not ctx.pointwise:
        return rows.reshape(shape)
    return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def _in_compute_dtype(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, factors: tuple[Tensor, ...]):
    """Cast to the autocast dtype when autocast is on (else the weight's), remembering the inputs'
    dtypes so the backward returns gradients in them; the last value says whether autocast is on."""
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype
    ctx.cast = not (x.dtype == dtype and weight.dtype == dtype and (bias is None or bias.dtype == dtype)
                    and all([f is None or f.dtype == dtype for f in factors]))
    if not ctx.cast:  # (the common case: no casts to dispatch, forward or backward)
        return x, weight, bias, factors, autocast
    ctx.input_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.factor_dtypes = tuple(None if f is None else f.dtype for f in factors)
    cast = tuple(None if f is None else f.to(dtype) for f in factors)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), cast, autocast


def _no_autocast(x: Tensor) -> torch.autocast:
    return torch.autocast(x.device.type, enabled=False)


def _in_input_dtypes(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...] | list[Tensor | None]:
    if not ctx.cast:
        return grads
    return [None if g is None else g.to(d) for g, d in zip(grads, ctx.input_dtypes)]


def _factor_dtypes(ctx, grads: list[Tensor]) -> list[Tensor]:
    if not ctx.cast:
        return grads
    return [None if g is None else g.to(d) for g, d in zip(grads, ctx.factor_dtypes)]


def _unflatten(layout: tuple[tuple[int, int], ...], factors: tuple[Tensor, ...] | list[Tensor]) -> list[Increment]:
    return [Increment(*factors[3 * pos : 3 * pos + 3], m_in, m_out) for pos, (m_in, m_out) in enumerate(layout)]
