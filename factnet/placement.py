"""`Placement`: where a group's slices sit in one matrix, and how the group's normal form is cut for it.

A group's normal form holds one ``a x b`` core per slice, ``core: (n, a, b)``. A matrix cut into
blocks holds some of those slices; its kernel `Increment` needs the module core
``(row_blocks·a, col_blocks·b)`` with member ``q``'s core at block row ``in[q]`` and block column
``out[q]``, zeros elsewhere. Every entry of it is one entry of the flattened group core (or a zero),
so cutting is a gather by a fixed index (`Placement.core_index`). `cut` runs one gather per kind of
matrix of a group (all its layers' ``qkv`` at once), once per step, so the backward scatters into the
group's core once per kind, not once per matrix. For the kernel it also folds the core into a
projection where that pays (`cut`), one product per kind of matrix: ``ΔW = (P_out coreᵀ) P_inᵀ`` is
then a pair of thin factors, as in LoRA, and a step runs three thin products fewer for that matrix.

A diagonal core (``core: (n | 1, a)``, `NormalForm`) is cut into a *diagonal* `Increment`: each block's
diagonal and output scaling picked from the slice there (`_diagonal_increment`), the projections as
they are. The identity (``core=None``: batch-matrix), or a diagonal core whose projections differ per slice on
the side not cut into blocks, goes into thin pairs (`_identity_increment`, the diagonal and the output
scaling folded into a projection): the blocked side's projections side by side, or stacked on the rank
where the other side differs per slice too, zeros for a block no member holds. No ``a x a`` core is
built, so the cost does not grow with the square of the rank.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from factnet.formats import NormalForm
from factnet.increment import Increment

__all__ = ["Placement", "cut", "shared_placement"]


class Placement:
    """Where a group's slices sit in one matrix, and how to cut its normal form for it.

    ``members`` are positions in the group, ``blocks`` their block index in the matrix. The
    recipe (which projection is shared, where each member's core goes) is fixed here once.
    """

    def __init__(self, group: str, members: list[int], blocks: list[int], n_blocks: int, side: str,
                 per_slice: tuple[bool, bool]) -> None:
        self.group, self.n_blocks, self.side = group, n_blocks, side
        self.members, self.blocks = torch.tensor(members), torch.tensor(blocks)
        self.m_in = n_blocks if side == "in" else 1
        self.m_out = n_blocks if side == "out" else 1
        ordered = blocks == list(range(n_blocks))
        self.at_block: tuple[int | None, ...] = tuple(members[blocks.index(b)] if b in blocks else None
                                                      for b in range(n_blocks))  # the group position at each block
        self._in = self._side_recipe("in", per_slice[0], ordered)
        self._out = self._side_recipe("out", per_slice[1], ordered)
        self._index: dict[tuple[int, int, int], tuple[Tensor, bool]] = {}

    def _side_recipe(self, side: str, per_slice: bool, ordered: bool) -> tuple[str, Tensor, int]:
        """``(how to build the projection, block of each member, number of blocks)``."""
        count = len(self.members)
        if self.side == side:
            how = ("own" if ordered else "own-scattered") if per_slice else "shared"
            return how, self.blocks, self.n_blocks
        if per_slice:  # one shared activation: the members' projections concatenated on the rank
            return "concat", torch.arange(count), count
        return "shared", torch.zeros(count, dtype=torch.long), 1

    def core_index(self, n: int, a: int, b: int) -> tuple[Tensor, bool]:
        """Where each entry of this matrix's core, row-major ``(row_blocks·a, col_blocks·b)``, sits in the
        flattened group core ``(n, a, b)``, ``n·a·b`` for a zero; and whether there is any zero."""
        if (n, a, b) not in self._index:
            (_, rows, row_blocks), (_, cols, col_blocks) = self._in, self._out
            index = torch.full((row_blocks, a, col_blocks, b), n * a * b, dtype=torch.long)
            index[rows, :, cols, :] = (self.members.view(-1, 1, 1) * a + torch.arange(a).view(-1, 1)) * b + torch.arange(b)
            self._index[n, a, b] = index.reshape(-1), bool((index == n * a * b).any())
        return self._index[n, a, b]

    def core_shape(self, a: int, b: int) -> tuple[int, int]:
        return self._in[2] * a, self._out[2] * b

    def projection(self, p_t: Tensor, side: str) -> Tensor:
        """The matrix's input (``side="in"``) or output projection from the group's ``p_t: (n | 1, r, d)``."""
        how = (self._in if side == "in" else self._out)[0]
        if how == "shared":
            return p_t
        own = p_t[self.members]
        if how == "own":
            return own
        if how == "concat":
            return own.reshape(1, -1, own.shape[2])
        return own.new_zeros(self.n_blocks, *own.shape[1:]).index_copy(0, self.blocks, own)

    def increment(self, form: NormalForm, dtype: torch.dtype) -> Increment:
        """This matrix's share of the group's ``ΔW`` as a kernel `Increment`."""
        return cut((self,), form, dtype)[0]


def cut(placements: Sequence[Placement], form: NormalForm, dtype: torch.dtype, fold: str | None = None) -> list[Increment]:
    """The `Increment` of each placement (one group's, in different matrices) from the group's normal
    form, in ``dtype``: one gather of the core per kind of matrix (same core shape), then its members.

    With ``fold``, a matrix whose input is one block and whose projections are both the group's shared
    ones gets its core folded into a projection (``core=None``), by one product for all the matrices
    of its kind (same blocks): ``fold="any"`` into ``P_out``; ``"in"`` (factor-space dropout, whose
    mask sits after the core) into ``P_in``, only for whole matrices (``u = x P_in core``). Matrices
    cut into input blocks keep their core: folded, their products measured slower (ViT-S ``fc2``).
    Each kind costs the backward a few autograd nodes, whatever its number of matrices."""
    if form.core is None or form.core.dim() == 2:
        return _cut_diagonal(placements, form, dtype)
    n, a, b = form.core.shape
    zeros, kinds = _joined(tuple(placements), n, a, b, fold)
    flat = form.core.reshape(-1).to(dtype)
    if zeros:
        flat = torch.cat([flat, flat.new_zeros(1)])
    p_in_t, p_out_t = form.p_in_t.to(dtype), form.p_out_t.to(dtype)
    found: list[Increment | None] = [None] * len(placements)
    shared_in, shared_out = (p_in_t[0], p_out_t[0]) if fold else (None, None)  # (one view each for all kinds)
    for how, members, index in kinds:
        count = len(members)
        if how == "plain":  # index (count, rows, cols): each member's core as is
            for member, core in zip(members, flat[index].unbind(0)):
                p = placements[member]
                found[member] = Increment(p.projection(p_in_t, "in"), core, p.projection(p_out_t, "out"),
                                          p.m_in, p.m_out)
            continue
        if how == "out":  # m_in = 1, index (count·a·m_out, b): P_out ← core P_out per output block
            folded = torch.mm(flat[index], shared_out).view(count, 1, a, -1).unbind(0)
            pairs = [(p_in_t, f) for f in folded]
        else:  # a whole matrix under dropout, index (count·b, a) of coreᵀ: P_in ← coreᵀ P_in
            folded = torch.mm(flat[index], shared_in).view(count, 1, b, -1).unbind(0)
            pairs = [(f, p_out_t) for f in folded]
        for member, (a_t, b_t) in zip(members, pairs):
            found[member] = Increment(a_t, None, b_t, 1, 1)
    return found  # type: ignore[return-value]


class _Views:
    """One projection ``p_t: (n | 1, r, d)`` of a group, per slice as views (one autograd node for all)."""

    def __init__(self, p_t: Tensor) -> None:
        self.p_t, self.shared = p_t, p_t.shape[0] == 1
        self.each = (p_t[0],) if self.shared else p_t.unbind(0)
        self._zero: Tensor | None = None

    def of(self, member: int | None) -> Tensor:
        """Slice ``member``'s projection ``(r, d)`` (zeros for no member)."""
        if member is None:
            if self._zero is None:
                self._zero = self.p_t.new_zeros(self.p_t.shape[1:])
            return self._zero
        return self.each[0 if self.shared else member]

    def blocks(self, placement: Placement) -> list[Tensor]:
        """The projection of the slice at each block of ``placement`` (zeros where none)."""
        return [self.of(member) for member in placement.at_block]


def _cut_diagonal(placements: Sequence[Placement], form: NormalForm, dtype: torch.dtype) -> list[Increment]:
    """The increments of a normal form with a diagonal core (or none): see the module doc."""
    p_in_t, p_out_t = form.p_in_t.to(dtype), form.p_out_t.to(dtype)
    core = None if form.core is None else _Views(form.core.to(dtype))
    scale = None if form.out_scale is None else _Views(form.out_scale.to(dtype))
    views, folded = (_Views(p_in_t), _Views(p_out_t)), None
    found = []
    for p in placements:
        if core is not None and _thin_sides(p, p_in_t, p_out_t):
            found.append(_diagonal_increment(p, *views, core, scale))
            continue
        if core is not None and folded is None:  # per-slice projections across blocks: fold, then pair
            out = p_out_t * form.core.to(dtype).unsqueeze(-1)
            if form.out_scale is not None:
                out = out * form.out_scale.to(dtype).unsqueeze(1)
            folded = _Views(p_in_t), _Views(out)
        found.append(_identity_increment(p, *(folded or views)))
    return found


def _thin_sides(p: Placement, p_in_t: Tensor, p_out_t: Tensor) -> bool:
    """Whether the side(s) of ``p`` not cut into blocks hold one projection (shared, or one member)."""
    one = len(p.members) == 1
    return ((p.side == "out" or p_out_t.shape[0] == 1 or one)  # P_out, unless cut into output blocks
            and (p.side == "in" or p_in_t.shape[0] == 1 or one))  # P_in, unless cut into input blocks


def _diagonal_increment(p: Placement, p_in: _Views, p_out: _Views, core: _Views, scale: _Views | None) -> Increment:
    """The diagonal `Increment` of ``p``: its projections, and each block's diagonal (and output scaling) taken
    from the slice at that block (zeros where none)."""
    first = int(p.members[0])

    def projection(views: _Views, blocked: bool) -> Tensor:
        if views.shared:
            return views.p_t
        return torch.stack(views.blocks(p)) if blocked else views.of(first).unsqueeze(0)

    a_t, b_t = projection(p_in, p.side == "in"), projection(p_out, p.side == "out")
    diagonals = torch.stack(core.blocks(p))  # (n_blocks, a)
    if p.side == "in":
        out_scale = None if scale is None else torch.stack(scale.blocks(p))  # (m_in, d_out)
        return Increment(a_t, diagonals.unsqueeze(1), b_t, p.n_blocks, 1, out_scale)
    out_scale = None if scale is None else torch.cat(scale.blocks(p)).unsqueeze(0)  # (1, m_out·d)
    return Increment(a_t, diagonals.unsqueeze(0), b_t, 1, p.n_blocks, out_scale)


def _identity_increment(p: Placement, p_in: _Views, p_out: _Views) -> Increment:
    """The `Increment` of a placement when each slice's core is the identity: ``ΔW = Σ_q E_q P_out[q] P_in[q]ᵀ``.

    On the blocked side the members' projections go side by side (a zero block where none), so a shared
    projection on the other side makes one thin pair; where the other side differs per slice too, its
    projections are stacked on the rank (block by block), so each block's hidden activations meet
    their own slice's projection."""
    if p.side == "out":  # m_in = 1: output rows in blocks
        outs = p_out.blocks(p)
        if p_in.shared:
            return Increment(p_in.p_t, None, torch.cat(outs, dim=1).unsqueeze(0), 1, 1)
        b_t = p_out.p_t if p_out.shared else torch.stack(outs)
        return Increment(torch.cat(p_in.blocks(p)).unsqueeze(0), None, b_t, 1, p.n_blocks)
    ins = p_in.blocks(p)  # m_out = 1: input columns in blocks
    if p_out.shared:
        return Increment(torch.cat(ins, dim=1).unsqueeze(0), None, p_out.p_t, 1, 1)
    a_t = p_in.p_t if p_in.shared else torch.stack(ins)
    return Increment(a_t, None, torch.cat(p_out.blocks(p)).unsqueeze(0), p.n_blocks, 1)


@functools.lru_cache(maxsize=4096)
def _joined(placements: tuple[Placement, ...], n: int, a: int, b: int,
            fold: str | None) -> tuple[bool, list[tuple[str, list[int], Tensor]]]:
    """Whether any placement's core has a zero, and the kinds the placements come in:
    ``(how, positions, index into the flattened group core)``, ``how`` "plain" (its cores as they are,
    same shape) or the side its core folds into ("out", "in": the same blocks), the index shaped for
    the kind's one gather (see `cut`)."""
    kinds: dict[tuple, tuple[str, list[int]]] = {}
    for position, p in enumerate(placements):
        shared = fold is not None and p._in[0] == "shared" and p._out[0] == "shared"
        how = "plain"
        if shared and p.m_in == 1:
            how = "out" if fold == "any" else "in" if p.m_out == 1 else "plain"
        shape = p.core_shape(a, b)
        kinds.setdefault((how, shape), (how, []))[1].append(position)
    found = []
    for (how, (rows, cols)), (_, members) in kinds.items():
        index = torch.stack([placements[i].core_index(n, a, b)[0].view(rows, cols) for i in members])
        if how == "out":  # (count, a, m_out·b) -> rows (count, a, m_out) of b
            index = index.reshape(-1, b)
        elif how == "in":  # (count, a, b) -> coreᵀ, rows (count, b) of a
            index = index.transpose(1, 2).reshape(-1, a)
        found.append((how, members, index))
    return any(placements[i].core_index(n, a, b)[1] for i in range(len(placements))), found


@functools.lru_cache(maxsize=4096)
def shared_placement(group: str, members: tuple[int, ...], blocks: tuple[int, ...], n_blocks: int, side: str,
              per_slice: tuple[bool, bool]) -> Placement:
    """One `Placement` per layout, shared by every adapter of that layout (1,000 adapters of one
    model hold one set, not 1,000)."""
    return Placement(group, list(members), list(blocks), n_blocks, side, per_slice)
