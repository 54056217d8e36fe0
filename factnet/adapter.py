"""`Adapter`: the trainable factors of every group, attached to a frozen model."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from factnet import attach as sites
from factnet.adapter_set import AdapterSet
from factnet.errors import FactnetError
from factnet.factors import GroupFactors
from factnet.config import AdapterConfig
from factnet.formats import NormalForm, get_format
from factnet.head_bits import HeadQuantizer, head_modules, quantized_head
from factnet.increment import Increment, delta_weight
from factnet.placement import Placement, cut, shared_placement
from factnet.slices import Matrix, Slice

if TYPE_CHECKING:
    from factnet.budget import AutoChoice
    from factnet.file.writer import Saved

__all__ = ["Adapter", "GroupFactors"]


@dataclass
class Settings:
    """What every attached matrix reads of the adapter's `AdapterConfig` (``config``, resolved), with the scale
    ``s`` it resolves to on these groups (``config.scale``, or its gain times `Tensorizer.stable_scale`), the
    values per low-bit scale, and ``path`` ("auto", "activation"), which picks the kernel."""

    config: AdapterConfig
    scale: float
    group: int = 64  # values per low-bit scale
    path: str = "auto"

    @property
    def dropout(self) -> float:
        return float(self.config.dropout)

    @dropout.setter
    def dropout(self, value: float) -> None:
        """Factor-space dropout changed in place (the config follows, checked)."""
        self.config = replace(self.config, dropout=value)

    @property
    def bits(self) -> int | None:
        """Factors trained as stored in a ``bits``-bit file (`GroupFactors.values`)."""
        return self.config.bits  # type: ignore[return-value]  (resolved: never "auto")

    @property
    def head_bits(self) -> int | None:
        """The head trained as stored in a ``head_bits``-bit file (`factnet.head_bits`)."""
        return self.config.head_bits

    @property
    def stable(self) -> bool:
        """The rank-stable parametrization: factors used times `Format.multipliers`."""
        return self.config.scale is None


class Adapter(nn.Module):
    """Factors of every group, attached to a frozen model (create it with `Tensorizer.decompose`).

    The model's forward includes ``s·ΔW`` for every targeted slice while this adapter is the
    active one of ``model.factnet`` (an `AdapterSet`); only the factors (and the head, unless
    ``train_head=False``) require grad: optimize ``adapter.trainable_parameters()``.
    """

    def __init__(self, model: nn.Module, groups: Mapping[str, tuple[Slice, ...]], config: AdapterConfig, scale: float,
                 name: str = "default", generator: torch.Generator | None = None, register: bool = True,
                 group: int = 64) -> None:
        super().__init__()
        reference = next(p for n, p in model.named_parameters() if not n.startswith("factnet."))
        dtype = factor_dtype(model)
        self.name = name
        self.format = fmt = get_format(config.format, config.rank)
        self.settings = Settings(config, float(scale), group)
        bits, stable, seed, head_bits = self.settings.bits, self.settings.stable, config.seed or 0, config.head_bits
        head = list(config.head or ())
        self.group_names = list(groups)
        self.seed = seed  # group number g's seeded factors (`Format.seeded`) are drawn from seed + g
        self.groups = nn.ModuleDict(
            {group_key(g): GroupFactors(fmt, members, dtype, reference.device, generator, bits, group, stable,
                                        seed + number)
             for number, (g, members) in enumerate(groups.items())}
        )
        self.matrices: dict[str, Matrix] = {}
        self.placements: dict[str, list[Placement]] = {}
        for group, members in groups.items():
            for matrix, chosen in _by_matrix(members).items():
                self.matrices[matrix.name] = matrix
                self.placements.setdefault(matrix.name, []).append(shared_placement(
                    group_key(group), tuple(chosen), tuple(members[p].index for p in chosen), *matrix.cut,
                    fmt.projections_per_slice))
        self.head = head
        self._merged = False
        self.picked: AutoChoice | None = None  # what a byte budget with no format chose, and why (`decompose`)
        self._detached_head: dict[str, Tensor] | None = None  # the head's values it left its set with (`leave`)
        self._increments: dict[str, tuple[list[NormalForm], torch.dtype, list[Increment]]] = {}
        self._cuts: dict[str, tuple[NormalForm, torch.dtype, dict[str, Increment]]] = {}
        self._by_group: dict[str, list[tuple[str, Placement]]] = {}
        for matrix_name, found in self.placements.items():
            for p in found:
                self._by_group.setdefault(p.group, []).append((matrix_name, p))
        self.__dict__["model"] = model
        self._head_quantizer = None if head_bits is None else HeadQuantizer(
            head_modules(model, head), head_bits, self.settings.group, lambda: self.__dict__.get("model") is not None
            and self._set.active == self.name)
        if register:  # (else the caller adds it once its values are in: `factnet.file.load`)
            AdapterSet.of(model).add(name, self)

    @property
    def config(self) -> AdapterConfig:
        """The settings it was made with, resolved: the format, rank and bits a budget picked, the targets,
        grouping and head used (`AdapterConfig`; ``print(adapter)`` says what a budget picked)."""
        return self.settings.config

    def increments(self, matrix: str, weight: Tensor) -> list[Increment]:
        """The increments of ``matrix`` for its ``weight`` (whether or not this adapter is active); the
        same objects while the normal forms are, so a matrix used twice in a step cuts them once."""
        groups = self._modules["groups"]._modules  # (hot path: no Module.__getattr__)
        placements = self.placements[matrix]
        forms = [groups[p.group].normal_form() for p in placements]
        key = weight.dtype, self._fold()
        cached = self._increments.get(matrix)
        if cached is None or cached[1] != key or not all(map(operator.is_, cached[0], forms)):
            cached = forms, key, [self._cut(p.group, f, *key)[matrix] for p, f in zip(placements, forms)]
            self._increments[matrix] = cached
        return cached[2]

    def all_increments(self, weights: list[Tensor]) -> dict[str, list[Increment]]:
        """The increments of every matrix in ``matrices`` (``weights`` in that order; only their dtypes are
        read), cut group by group: the same dict while the normal forms and the dtypes are, so a forward
        checks its factors once per group."""
        groups = self._modules["groups"]._modules
        forms = [group.normal_form() for group in groups.values()]
        key = [weight.dtype for weight in weights], self._fold()
        cached = self.__dict__.get("_all")
        if cached is None or cached[1] != key or not all(map(operator.is_, cached[0], forms)):
            dtypes = dict(zip(self.matrices, key[0]))
            found: dict[str, list[Increment]] = {name: [] for name in self.matrices}
            for group, form in zip(groups, forms):  # (the order of each matrix's placements)
                for dtype in {dtypes[name] for name, _ in self._by_group[group]}:
                    for name, increment in self._cut(group, form, dtype, key[1]).items():
                        if dtypes[name] == dtype:
                            found[name].append(increment)
            cached = forms, key, found
            self.__dict__["_all"] = cached
        return cached[2]

    def _cut(self, group: str, form: NormalForm, dtype: torch.dtype, fold: str) -> dict[str, Increment]:
        """The increments of every matrix ``group`` has slices in, cut from ``form`` at once (one gather),
        their cores folded for the kernel (`placement.cut`)."""
        found = self._cuts.get(group)
        if found is None or found[0] is not form or found[1] != (dtype, fold):
            names, placements = zip(*self._by_group[group])
            found = self._cuts[group] = form, (dtype, fold), dict(zip(names, cut(placements, form, dtype, fold)))
        return found[2]

    def _fold(self) -> str:
        """How the kernel's cores fold: only into input projections while factor-space dropout acts (its
        mask sits after the core), anywhere otherwise."""
        return "in" if self.training and self.settings.dropout > 0 else "any"

    def build_increments(self, matrix: str, dtype: torch.dtype, forms: dict[str, NormalForm]) -> list[Increment]:
        """The increments of ``matrix``, built anew (no cache kept: mixed batches of many adapters), from
        the normal forms in ``forms`` (by group; missing ones are built and added)."""
        found = []
        for placement in self.placements[matrix]:
            if placement.group not in forms:
                group = self.groups[placement.group]
                forms[placement.group] = group.format.normal_form(group.values())
            found.append(placement.increment(forms[placement.group], dtype))
        return found

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) leave the cached increments behind: they may hold a graph."""
        return {**self.__dict__, "_increments": {}, "_cuts": {}, "_all": None}

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged

    @property
    def active(self) -> bool:
        """Whether this adapter is the one acting in the model (see `activate`)."""
        return self.__dict__.get("model") is not None and self._set.active == self.name

    def activate(self) -> Adapter:
        """Make this the adapter that acts in the model and trains (the others are frozen)."""
        self._check_attached()
        self._set.activate(self.name)
        return self

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Fold ``s·ΔW`` into the weights: the model then costs what the base model costs.

        With ``safe`` (the default) every merged weight is computed and checked for NaN/inf
        before any weight is touched (one matrix at a time, so memory does not double), and
        a diverged adapter cannot corrupt the model. Only the active adapter merges. Refused while
        forwards or `use`/`per_sample` blocks of other threads run on the model (the weights change).
        """
        self._check_attached()
        self._check_unsharded("merge")
        if self._merged:
            raise FactnetError("adapter is already merged; call unmerge() before merging again")
        with self._set.traffic.lock:
            self._set.traffic.check_quiet(self._set, "merge", blocks=True)
            if not self.active:
                raise FactnetError(f"adapter {self.name!r} is not the active one ({self._set.active!r} is); "
                                   "activate() it before merging")
            for name, matrix in self.matrices.items() if safe else ():
                weight = sites.weight_view(self.model, matrix)
                if not torch.isfinite(weight + self.delta_weight(name).to(weight.dtype)).all():
                    raise FactnetError(f"merging would put non-finite values into {name} (the factors or scale "
                                       "diverged); nothing was changed. Inspect the factors, or merge(safe=False)")
            for name, matrix in self.matrices.items():
                weight = sites.weight_view(self.model, matrix)
                weight.add_(self.delta_weight(name).to(weight.dtype))
            self._merged = True
            self._set.sync()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``s·ΔW`` from the weights again (exact up to float rounding). Refused, as `merge`, while
        other threads' calls run (a merged model in eval mode runs bare: its forwards are not seen)."""
        self._check_attached()
        if not self._merged:
            raise FactnetError("adapter is not merged; nothing to unmerge")
        with self._set.traffic.lock:
            self._set.traffic.check_quiet(self._set, "unmerge", blocks=True)
            self._merged = False
            for name, matrix in self.matrices.items():
                weight = sites.weight_view(self.model, matrix)
                weight.sub_(self.delta_weight(name).to(weight.dtype))
            self._set.sync()

    @contextmanager
    def disable(self) -> Iterator[None]:
        """Run the base model inside the block (a merged adapter is unmerged meanwhile)."""
        self._check_attached()
        with self._set.disable():
            yield

    def detach(self, keep_merged: bool = False) -> nn.Module:
        """Remove this adapter from the model and give the model back; once the last adapter is
        gone, the model is exactly as it was before `decompose` (but for a trained head).

        A merged adapter has changed the weights: ``unmerge()`` first (exact up to float
        rounding), or pass ``keep_merged=True`` to keep ``W + s·ΔW`` as the model's weights.
        """
        self._check_attached()
        return self._set.delete(self.name, keep_merged)

    def leave(self, head: dict[str, Tensor] | None) -> None:
        """Let go of the model, as `AdapterSet.delete` removes this adapter from it: not merged any more
        (merged weights stay as they are), ``head`` kept as its head values (its whole head, when the set
        kept it apart; None when the model's head holds it), the head's low-bit hooks out."""
        self._merged = False
        self._detached_head = head
        if self._head_quantizer is not None:
            self._head_quantizer.remove()
        self.__dict__["model"] = None

    def _check_unsharded(self, action: str) -> None:
        tensors = [*self.parameters(), *(sites.base_weight(self.model, m) for m in self.matrices.values())]
        if any(callable(getattr(t, "full_tensor", None)) for t in tensors):
            raise FactnetError(f"cannot {action} a sharded model (FSDP2's DTensors): the weights live on several "
                               "ranks. Save the adapter (adapter.save(path) on every rank gathers the factors), "
                               "then factnet.load it into an unsharded copy of the base model and merge there")

    @property
    def _set(self) -> AdapterSet:
        return self.model.factnet

    def _check_attached(self) -> None:
        if self.__dict__.get("model") is None:
            raise FactnetError("adapter was detached; decompose the model again to adapt it")

    def head_state(self) -> dict[str, Tensor]:
        """This adapter's head parameters by model name (the model's own while it is active)."""
        if self.__dict__.get("model") is not None:
            return self._set.heads.state(self)
        if self._detached_head is None:
            raise FactnetError("adapter was detached, so its head is no longer known")
        return dict(self._detached_head)

    def head_values(self) -> dict[str, Tensor]:
        """The head as this adapter's forward uses it: `head_state`, detached, or for ``head_bits`` its
        low-bit values (what a file stores)."""
        values = {n: v.detach() for n, v in self.head_state().items()}
        bits = self.settings.head_bits
        return values if bits is None else quantized_head(self, values, bits, self.settings.group)

    # ---- views of the increment ----------------------------------------------------------
    def group(self, name: str) -> GroupFactors:
        """The factors of group ``name`` (as in `group_names`)."""
        if name not in self.group_names:
            raise FactnetError(f"no group {name!r}; groups are {self.group_names}")
        return self.groups[group_key(name)]

    @torch.no_grad()
    def delta_weight(self, matrix: str) -> Tensor:
        """``s·ΔW`` of one adapted matrix, dense ``(d_out, d_in)`` in linear convention."""
        if matrix not in self.matrices:
            raise FactnetError(f"{matrix!r} is not adapted; adapted matrices: {list(self.matrices)[:4]}, ...")
        deltas = []
        for placement in self.placements[matrix]:
            form = self.groups[placement.group].normal_form()
            deltas.append(delta_weight(placement.increment(form, form.p_in_t.dtype)))
        return self.settings.scale * sum(deltas)

    def save(self, path: str, include_head: bool = True, dtype: torch.dtype | None = None, *,
             bits: int | None = None, head_bits: int | None = None, group: int = 64) -> Saved:
        """Write the factors (and the head unless ``include_head=False``) with their spec to one
        safetensors file at ``path`` (a str or os.PathLike), atomically; `factnet.load` rebuilds it.
        ``dtype`` (``torch.bfloat16``, ``torch.float16``, ``torch.float32`` or ``torch.float64``) stores the
        tensors cast to it (bfloat16: 2 bytes a parameter); `factnet.load` casts them to the model's dtypes.
        ``bits``/``head_bits`` (1, 2, 4, 8) store the factors/head low-bit (see `factnet.save`); an adapter
        trained low-bit (``decompose(..., bits=b)``) stores its factors in ``b`` bits unless told otherwise."""
        from factnet.file.writer import write

        return write(self, path, include_head, dtype, bits, head_bits, group)

    # ---- reports ---------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Trainable factor parameters of the backbone (the head is counted apart)."""
        return sum(self.num_parameters_by_group().values())

    def num_parameters_by_group(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in self.groups[group_key(name)].parameters()) for name in self.group_names}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What to give the optimizer: the factors, then the head (unless ``train_head=False``)."""
        self._check_attached()
        return [*self.parameters(), *self.head_state().values()]

    def num_head_parameters(self) -> int:
        """Parameters of the trainable head (0 with ``train_head=False`` or no head)."""
        return sum(p.numel() for p in self.head_state().values()) if self.__dict__.get("model") is not None else 0

    def group_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {name: self.groups[group_key(name)].shape for name in self.group_names}

    def plan_report(self, tokens: int = 1024) -> str:
        """The contractions the adapter runs, with opt-einsum's cost, for ``tokens`` rows of input."""
        from factnet.report import plan_report

        return plan_report(self, tokens)

    def extra_repr(self) -> str:
        s = self.settings
        bits = "" if s.bits is None else f"bits={s.bits}, "
        bits += "" if s.head_bits is None else f"head_bits={s.head_bits}, "
        picked = "" if self.picked is None else f",\npicked by the budget: {self.picked}"
        return (f"format={self.format.name}, rank={self.format.rank}, scale={s.scale}, dropout={s.dropout}, {bits}"
                f"parameters={self.num_parameters():,}{picked}")


def factor_dtype(model: nn.Module) -> torch.dtype:
    """The factors' dtype on ``model``: its own if float32/float64, else float32 (bf16/fp16 models
    keep float32 factors; autocast runs the kernel in low precision)."""
    reference = next(p for n, p in model.named_parameters() if not n.startswith("factnet."))
    return reference.dtype if reference.dtype in (torch.float32, torch.float64) else torch.float32


def group_key(group: str) -> str:
    """A ModuleDict-safe key for a group name (dots are not allowed there)."""
    return group.replace(".", "_")


def _by_matrix(members: tuple[Slice, ...]) -> dict[Matrix, list[int]]:
    """Group member positions, by the matrix each slice belongs to."""
    found: dict[Matrix, list[int]] = {}
    for pos, piece in enumerate(members):
        found.setdefault(piece.matrix, []).append(pos)
    return found
