"""`plan_report`: the contractions an adapter runs and what they cost."""

from __future__ import annotations

from typing import TYPE_CHECKING

import opt_einsum

if TYPE_CHECKING:
    from factnet.adapter import Adapter

__all__ = ["plan_report"]


def plan_report(adapter: Adapter, tokens: int) -> str:
    """Per group: the core plan from the format's einsum; per matrix layout: the kernel's thin
    products for ``tokens`` input rows and the ``ΔW`` build that merging uses."""
    fmt = adapter.format
    lines = [f"format {fmt.name} (rank {fmt.rank}): {fmt.equation}; scale {adapter.settings.scale}, "
             f"dropout {adapter.settings.dropout} -> "
             f"{'activation-side path in training' if adapter.settings.dropout > 0 else 'merged-weight path'}"]
    for name in adapter.group_names:
        group = adapter.groups[name.replace('.', '_')]
        lines += [f"\ngroup {name!r} {'x'.join(map(str, group.shape))}: "
                  f"{sum(p.numel() for p in group.parameters()):,} parameters",
                  _indent(fmt.core_plan_report(*group.shape))]
    seen = set()
    for matrix_name, placements in adapter.placements.items():
        matrix = adapter.matrices[matrix_name]
        for placement in placements:
            form = adapter.groups[placement.group].normal_form()
            inc = placement.increment(form, form.p_in_t.dtype)
            core = None if inc.core is None else tuple(inc.core.shape)
            layout = (matrix.d_out, matrix.d_in, tuple(inc.a_t.shape), core, tuple(inc.b_t.shape))
            if layout in seen:
                continue
            seen.add(layout)
            lines.append(f"\nmatrix {matrix.d_out}x{matrix.d_in} ({matrix.kind}, e.g. {matrix_name}), "
                         f"group {placement.group!r}: {_kernel_cost(inc, tokens, matrix.d_in, matrix.d_out)}")
            lines.append(_indent(_delta_plan(inc)))
    return "\n".join(lines)


def _kernel_cost(inc, tokens: int, d_in: int, d_out: int) -> str:
    alpha = inc.m_in * inc.a_t.shape[1]
    beta = inc.m_out * inc.b_t.shape[1]
    thin = 2 * tokens * (d_in * inc.a_t.shape[1] + d_out * inc.b_t.shape[1])
    dense = 2 * tokens * d_in * d_out
    return (f"x P_in -> ({tokens}, {alpha}), grad_y P_out -> ({tokens}, {beta}); "
            f"per step ~{5 * thin / 1e6:.1f} MFLOP in thin products vs {2 * dense / 1e6:.1f} MFLOP for "
            "the frozen layer's forward and input gradient")


def _delta_plan(inc) -> str:
    """The ``W_eff`` build: ``L = P_out·coreᵀ`` by opt-einsum, then one addmm ``W + s·L P_inᵀ``."""
    if inc.core is None:
        return ("W_eff (merged forward, rebuilt in backward; merge adds the same ΔW): no core (the identity: a "
                "diagonal core folded into a projection), L = P_out block by block, then W_eff = W + s·L P_inᵀ")
    b_shape = tuple(inc.b_t.shape) if inc.b_t.shape[0] > 1 else tuple(inc.b_t.shape[1:])
    blocks = (inc.m_in, inc.a_t.shape[1], inc.m_out, inc.b_t.shape[1])
    equation = f"{'qbk' if len(b_shape) == 3 else 'bk'},paqb->qkpa"
    _, info = opt_einsum.contract_path(equation, b_shape, blocks, shapes=True, optimize="optimal")
    rows = inc.m_out * inc.b_t.shape[2] * inc.m_in
    last = (f"then W_eff = addmm(W viewed ({rows}, {inc.a_t.shape[2]}), L, P_inᵀ)" if inc.a_t.shape[0] == 1
            else "then per input block: einsum rpa,paj->rpj")
    return f"W_eff (merged forward, rebuilt in backward; merge adds the same ΔW): L = {equation}\n{info}\n{last}"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
