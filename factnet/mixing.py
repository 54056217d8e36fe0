"""Adapters chosen per call: sample ``b`` uses adapter ``names[b]`` (`AdapterSet.per_sample`), or every sample
one adapter (`AdapterSet.use`), without touching what other threads' calls use.

Every adapted matrix runs the frozen base op on the whole batch, then adds each adapter's
``s · x ΔWᵀ`` to the rows of its own samples by thin products (`factnet.kernel.delta_rows`): the
rows are gathered once, sorted by adapter, and scattered back once; no dense ``ΔW`` is formed.
Rows of base-model samples (``None``) get nothing added, so they equal the base model's bit for bit.

Two kinds of module run instead once per adapter on its own samples (`Mix.split`): the task head
(on a copy of the head module holding that adapter's head values, so the model's own head, which the
active adapter trains, is never written to) and any module whose forward reads an adapted weight as an
attribute (BEiT's ``F.linear(x, self.qkv.weight)``, ``nn.MultiheadAttention``), which cannot be
given one weight per sample. Such a reader is found by its first read in a mixed batch (its forward
is stopped there and rerun split) and remembered.

The batch layout: along ``batch_dim`` of each matrix input (and of a split module's first argument)
the ``B`` samples own consecutive equal blocks of rows (``k·B`` rows, sample-major, as in Swin's
windows); ``nn.MultiheadAttention`` is split by its own signature.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from factnet.attach import AdaptedMatrix
from factnet.errors import FactnetError
from factnet.increment import Increment, effective_weight
from factnet.kernel import delta_rows

if TYPE_CHECKING:
    from factnet.adapter import Adapter
    from factnet.adapter_set import AdapterSet

__all__ = ["Mix", "check_batch"]

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class SplitHere(Exception):
    """Raised by a read of an adapted weight in a mixed batch: ``module`` must run once per adapter."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(f"{type(module).__name__} reads an adapted weight as an attribute")
        self.module = module


class Mix:
    """Which adapter each of ``len(names)`` samples uses, with the increments built for this block.

    ``names``: one adapter name per sample (``None``: the base model); ``names=None`` with ``name``: every
    sample, however many, uses ``name`` (`AdapterSet.use`). ``adapters`` are the adapters named, taken
    as the block opened (one deleted meanwhile stays whole until the block ends); ``heads`` their head
    values (``None``'s: the values before any adapter trained them). ``groups`` pairs each distinct name
    with its samples' indices. Increments are built once per adapter and matrix and dropped with the
    `Mix` (a set of 1,000 adapters keeps no per-adapter caches).
    """

    def __init__(self, owner: AdapterSet, names: Sequence[str | None] | None, batch_dim: int,
                 adapters: dict[str, Adapter], heads: dict[str | None, dict[str, Tensor]], name: str | None = None,
                 built: tuple[dict, dict] | None = None) -> None:
        self.set, self.batch_dim, self.adapters, self.heads = owner, batch_dim, adapters, heads
        self.names = None if names is None else list(names)
        self.batch = None if names is None else len(self.names)
        found: dict[str | None, list[int]] = {}
        for position, each in enumerate([name] if names is None else self.names):
            found.setdefault(each, []).append(position)
        self.groups = [(each, torch.tensor(found[each])) for each in found]
        self.adapted = adapted = [(each, idx) for each, idx in self.groups if each is not None]
        self.order = torch.cat([idx for _, idx in adapted]) if adapted else None  # samples sorted by adapter
        self.counts = [len(idx) for _, idx in adapted]
        position = {each: index for index, (each, _) in enumerate(adapted)}
        self.sample_adapter = None if names is None else torch.tensor(
            [position.get(n, len(adapted)) for n in self.names])  # base: last
        # (adapter, matrix) -> increments, adapter -> {group: normal form}: shared with `sub` mixes
        self._built: tuple[dict[tuple[str, str], list[Increment]], dict[str, dict]] = built or ({}, {})
        self.readers: list[nn.Module] = []  # the reader modules whose forward is running (innermost last)

    @property
    def uniform(self) -> bool:
        """Whether every sample uses the same adapter (or all the base model)."""
        return len(self.groups) == 1

    def sub(self, name: str | None) -> Mix:
        """The uniform mix of a split module's run on the samples of ``name`` (same built increments)."""
        return Mix(self.set, None, self.batch_dim, self.adapters, self.heads, name, self._built)

    def for_forward(self) -> Mix:
        """This mix for one model forward: its own stack of running readers, the same built increments."""
        copied = copy.copy(self)
        copied.readers = []
        return copied

    def increments(self, name: str, matrix: str, weight: Tensor) -> list[Increment]:
        """Adapter ``name``'s increments of ``matrix`` (``[]`` if it does not adapt it), built once per block."""
        built, forms = self._built
        key = (name, matrix)
        found = built.get(key)
        if found is None:
            adapter = self.adapters[name]
            found = built[key] = (adapter.build_increments(matrix, weight.dtype, forms.setdefault(name, {}))
                                  if matrix in adapter.placements else [])
        return found

    # ---- an adapted matrix's forward ------------------------------------------------------------
    def forward(self, module: AdaptedMatrix, x: Tensor) -> Tensor:
        """The base op on the whole batch plus each adapter's thin products on its samples' rows."""
        matrix, y = module.matrix, module.original(x)
        weight = matrix.rules.to_linear(module._parameters[matrix.rules.parameter])
        parts = [(name, self.increments(name, matrix.name, weight)) for name, _ in self.adapted]
        if not any(increments for _, increments in parts):
            return y
        self.set.dispatch.applied(matrix.name)
        pointwise = matrix.rules.pointwise
        if self.uniform:  # one adapter for every row: no layout needed
            name, increments = parts[0]
            scale = self.adapters[name].settings.scale
            if not pointwise and y.is_contiguous():  # added in place, one pass
                delta_rows(x.reshape(-1, matrix.d_in), increments, scale, out=y.view(-1, matrix.d_out))
                return y
            rows = _rows(x.unsqueeze(0), pointwise)
            return _add_rows(y.unsqueeze(0), delta_rows(rows, increments, scale), pointwise).squeeze(0)
        if not pointwise and self.batch_dim == 0 and y.is_contiguous():
            stacked = self._per_sample_factors(parts, x.shape[0])
            if stacked is not None:  # one batched thin product per step, every sample with its own factors
                a_t, core, b_t = stacked
                u = torch.bmm(x.reshape(self.batch, -1, a_t.shape[2]), a_t.transpose(1, 2))
                hidden = u if core is None else torch.bmm(u.reshape(self.batch, -1, core.shape[1]), core)
                y.view(self.batch, -1, b_t.shape[2]).baddbmm_(hidden.reshape(self.batch, -1, b_t.shape[1]), b_t)
                return y
        xs, ys = self._by_sample(x, matrix.name), self._by_sample(y, matrix.name)  # (B, k, ...)
        order = self.order.to(x.device)
        gathered = xs.index_select(0, order)
        rows = _rows(gathered, pointwise)  # (samples·k·..., d_in), sample-major, sorted by adapter
        per_sample = rows.shape[0] // len(self.order)
        deltas, start = [], 0
        for (name, increments), count in zip(parts, self.counts):
            chunk = rows[start: start + count * per_sample]
            deltas.append(delta_rows(chunk, increments, self.adapters[name].settings.scale) if increments
                          else chunk.new_zeros(chunk.shape[0], matrix.d_out))
            start += count * per_sample
        delta = _unrows(torch.cat(deltas), gathered.shape, matrix.d_out, pointwise)
        ys.index_add_(0, order, delta)
        return y

    def _per_sample_factors(self, parts: list[tuple[str, list[Increment]]],
                            rows: int) -> tuple[Tensor, Tensor | None, Tensor] | None:
        """Each sample's ``(P_inᵀ, s·core, P_outᵀ)`` (``(P_inᵀ, None, s·P_outᵀ)`` without a core), stacked
        ``(B, ...)`` (zeros for the base model), when every adapter has one increment of one layout with
        shared projections, one output block, no diagonal core; else None."""
        found = [increments for _, increments in parts if increments]
        first = found[0][0]

        def layout(inc: Increment) -> tuple:
            return inc.a_t.shape, None if inc.core is None else inc.core.shape, inc.b_t.shape, inc.m_in, inc.m_out

        shapes = layout(first)
        if rows % self.batch or first.a_t.shape[0] != 1 or first.b_t.shape[0] != 1 or first.m_out != 1 or any(
                len(i) != 1 or layout(i[0]) != shapes or i[0].diagonal for i in found):
            return None
        zero = [None if t is None else torch.zeros_like(t) for t in (first.a_t[0], first.core, first.b_t[0])]
        stacks: tuple[list, list, list] = ([], [], [])
        for name, increments in parts:
            if increments:
                inc, scale = increments[0], self.adapters[name].settings.scale
                values = ((inc.a_t[0], None, inc.b_t[0] * scale) if inc.core is None
                          else (inc.a_t[0], inc.core * scale, inc.b_t[0]))
            else:
                values = zero
            for stack, value in zip(stacks, values):
                stack.append(value)
        for stack, value in zip(stacks, zero):
            stack.append(value)  # the base model's samples: last
        which = self.sample_adapter.to(first.a_t.device)
        return tuple(None if stack[0] is None else torch.stack(stack).index_select(0, which)  # type: ignore[return-value]
                     for stack in stacks)

    def _by_sample(self, tensor: Tensor, where: str) -> Tensor:
        """``tensor`` viewed ``(B, k, ...)``: its ``batch_dim`` split into the samples' blocks."""
        dim = self.batch_dim
        if tensor.dim() <= dim or tensor.shape[dim] % self.batch:
            raise FactnetError(f"a mixed batch of {self.batch} samples reached {where} with shape "
                               f"{tuple(tensor.shape)}, whose dim {dim} is not a multiple of {self.batch}: pass the "
                               "model's batch dimension as batch_dim= (e.g. 1 for sequence-first models)")
        return tensor.unflatten(dim, (self.batch, -1)).movedim(dim, 0).movedim(dim + 1, 1)

    # ---- a read of an adapted weight as an attribute ----------------------------------------------
    def read(self, effective: Any, weight: Tensor) -> Tensor:
        """``W + s·ΔW`` of a uniform mix's adapter; in a mixed one, the reader must run split."""
        if not self.uniform:
            raise SplitHere(self.readers[-1])
        name, matrix = self.groups[0][0], effective.matrix
        kind = matrix.rules
        linear = kind.to_linear(weight)
        increments = [] if name is None else self.increments(name, matrix.name, linear)
        if not increments:
            return weight
        self.set.dispatch.applied(matrix.name)
        return kind.from_linear(effective_weight(linear, increments, self.adapters[name].settings.scale), weight)

    # ---- modules run once per adapter ------------------------------------------------------------
    def run(self, module: nn.Module, name: str, head: bool, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """The forward of a task head (``head``) or of a module that may read adapted weights, ``name`` in the
        model, in this mix: a head runs with each adapter's own head values; a reader runs once per adapter
        on its samples once it is known to read adapted weights (found by its first read, `SplitHere`)."""
        if head and self.uniform:
            return self._with_head(module, name, forward, self.groups[0][0])(*args, **kwargs)
        if head or name in self.set.split_readers:
            return self.split(module, forward, args, kwargs, name if head else None)
        self.readers.append(module)
        try:
            return forward(*args, **kwargs)
        except SplitHere as stop:
            if stop.module is not module:
                raise
            self.set.split_readers.add(name)
            return self.split(module, forward, args, kwargs)
        finally:
            self.readers.pop()

    def split(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict, head: str | None = None) -> Any:
        """``forward(*args, **kwargs)`` run once per adapter on its samples, the outputs put back in sample
        order; for the task head ``head`` (its name in the model), with that adapter's head values."""
        bind = _split_attention if isinstance(module, nn.MultiheadAttention) else self._split_first
        outputs, order = [], []
        for name, idx in self.groups:
            part_args, part_kwargs, join = bind(module, args, kwargs, idx)
            run = forward if head is None else self._with_head(module, head, forward, name)
            with self.set.mixing(self.sub(name)):
                outputs.append(run(*part_args, **part_kwargs))
            order.append(idx)
        inverse = torch.empty(self.batch, dtype=torch.long)
        inverse[torch.cat(order)] = torch.arange(self.batch)
        return join(outputs, [len(idx) for idx in order], inverse)

    def _with_head(self, module: nn.Module, name: str, forward: Callable, adapter: str | None) -> Callable:
        """``forward`` run on a copy of the head ``module`` (``name`` in the model) that holds adapter
        ``adapter``'s head values as the block opened, so an `activate` meanwhile does not disturb it; with
        grad on, the active adapter's own head (which it trains) runs instead."""
        if torch.is_grad_enabled() and adapter is not None and adapter == self.set.active:
            return forward
        view = _head_view(module, name, adapter, self.heads[adapter], self.set.heads.views)
        return getattr(forward, "__func__", type(module).forward).__get__(view)

    def _split_first(self, module: nn.Module, args: tuple, kwargs: dict, idx: Tensor):
        """Split the first positional argument along ``batch_dim``; the rest is passed whole."""
        if not args or not isinstance(args[0], Tensor):
            raise FactnetError(f"a mixed batch must run {type(module).__name__} once per adapter, splitting its first "
                               "argument by sample, but that argument is not a tensor; run such samples one adapter "
                               "at a time (model.factnet.activate)")
        part = self._by_sample(args[0], type(module).__name__).index_select(0, idx.to(args[0].device))
        dim = self.batch_dim
        return (_from_samples(part, dim), *args[1:]), kwargs, lambda outs, counts, inv: _join(outs, counts, inv, dim)


def _split_attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict, idx: Tensor):
    """``nn.MultiheadAttention``'s arguments for samples ``idx``: query, key and value along its batch
    dim, ``key_padding_mask`` and a per-sample ``attn_mask`` along dim 0; outputs joined likewise."""
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    values = dict(bound.arguments)
    dim = 0 if module.batch_first else 1
    for key in ("query", "key", "value"):
        values[key] = values[key].index_select(dim, idx.to(values[key].device))
    if values.get("key_padding_mask") is not None:
        values["key_padding_mask"] = values["key_padding_mask"].index_select(0, idx.to(values["key_padding_mask"].device))
    mask = values.get("attn_mask")
    if mask is not None and mask.dim() == 3:
        heads = module.num_heads
        values["attn_mask"] = mask.unflatten(0, (-1, heads)).index_select(0, idx.to(mask.device)).flatten(0, 1)
    values.pop("self")

    def join(outputs: list, counts: list[int], inverse: Tensor) -> tuple:
        attended = torch.cat([o[0] for o in outputs], dim)
        attended = attended.index_select(dim, inverse.to(attended.device))
        weights = None if outputs[0][1] is None else torch.cat([o[1] for o in outputs])
        return attended, None if weights is None else weights.index_select(0, inverse.to(weights.device))

    return (), values, join


def _from_samples(part: Tensor, dim: int) -> Tensor:
    """Inverse of `Mix._by_sample` for a selection of samples: ``(n, k, ...) → (..., n·k, ...)``."""
    return part.movedim(1, dim + 1).movedim(0, dim).flatten(dim, dim + 1)


def _join(outputs: list, counts: list[int], inverse: Tensor, dim: int) -> Any:
    """Each run's output (a tensor, or a tuple/list of them and None) put back in sample order."""
    first = outputs[0]
    if isinstance(first, Tensor):
        pieces = []
        for out, count in zip(outputs, counts):
            if out.dim() <= dim or out.shape[dim] % count:
                raise FactnetError(f"a module run per adapter returned shape {tuple(out.shape)}, which does not "
                                   f"split into {count} samples along dim {dim}; run such samples one adapter at a "
                                   "time (model.factnet.activate)")
            pieces.append(out.unflatten(dim, (count, -1)))
        joined = torch.cat(pieces, dim)
        return joined.index_select(dim, inverse.to(joined.device)).flatten(dim, dim + 1)
    if isinstance(first, (tuple, list)):
        return type(first)(_join([o[i] for o in outputs], counts, inverse, dim) for i in range(len(first)))
    if first is None or all(o == first for o in outputs):
        return first
    raise FactnetError(f"a module run per adapter returned {type(first).__name__} values that differ by adapter; run "
                       "such samples one adapter at a time (model.factnet.activate)")


def _rows(x: Tensor, pointwise: bool) -> Tensor:
    """``(n, k, ..., d)`` (or a pointwise conv's ``(n, k, d, H, W)``) as ``(rows, d)``, sample-major."""
    return x.movedim(2, -1).reshape(-1, x.shape[2]) if pointwise else x.reshape(-1, x.shape[-1])


def _unrows(rows: Tensor, shape: torch.Size, d_out: int, pointwise: bool) -> Tensor:
    if pointwise:
        return rows.reshape(*shape[:2], *shape[3:], d_out).movedim(-1, 2)
    return rows.reshape(*shape[:-1], d_out)


def _add_rows(y: Tensor, delta: Tensor, pointwise: bool) -> Tensor:
    return y.add_(_unrows(delta, y.shape, delta.shape[1], pointwise))


def _head_view(module: nn.Module, name: str, adapter: str | None, values: dict[str, Tensor],
               cache: dict[tuple[str, str | None], tuple[tuple, nn.Module]]) -> nn.Module:
    """A shallow copy of the head ``module`` (``name`` in the model) and its children whose parameters are
    ``values`` (adapter ``adapter``'s, by model name), buffers and hooks shared; kept in ``cache`` while
    ``values`` are the same tensors (the cached copy holds them, so their ids cannot be reused)."""
    held = tuple(id(v) for n, v in values.items() if n.startswith(name + "."))
    found = cache.get((name, adapter))
    if found is None or found[0] != held:
        found = cache[(name, adapter)] = held, _copy_holding(module, name, values)
    return found[1]


def _copy_holding(module: nn.Module, name: str, values: dict[str, Tensor]) -> nn.Module:
    view = copy.copy(module)
    view.__dict__.pop("forward", None)  # factnet's forward on the head (`factnet.attach`): the class's runs
    for shadowed in module._parameters:  # a low-bit head's values inside its own forward (`factnet.head_bits`)
        view.__dict__.pop(shadowed, None)
    view._parameters = {k: values.get(f"{name}.{k}", p) for k, p in module._parameters.items()}
    view._modules = {k: None if c is None else _copy_holding(c, f"{name}.{k}", values) for k, c in module._modules.items()}
    return view


def check_batch(mix: Mix, args: tuple, kwargs: dict) -> None:
    """Before the model runs: its first tensor input has ``len(names)`` samples along ``batch_dim``."""
    if mix.batch is None:
        return
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
    dim = mix.batch_dim
    if first is not None and (first.dim() <= dim or first.shape[dim] != mix.batch):
        raise FactnetError(f"a mixed batch names {mix.batch} adapters (one per sample), but the model's input has "
                           f"shape {tuple(first.shape)} (dim {dim} is its batch): pass one name per sample, or the "
                           "batch dimension as batch_dim=")
