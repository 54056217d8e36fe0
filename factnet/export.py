"""Export an adapter as a PEFT LoRA adapter directory: exact wherever a module's increment is low rank.

One placement's share of a module's increment is, in normal form (see `factnet.increment`),

    ΔW = P_out · coreᵀ · P_in,   P_in: (m_in·α, d_in),  core: (m_in·α, m_out·β),  P_out: (d_out, m_out·β)

with ``P_in`` / ``P_out`` block-diagonal (one block per input / output block of the matrix).
That is a LoRA ``B @ A`` of rank ``min(m_in·α, m_out·β)``: ``A = P_in``, ``B = s·P_out·coreᵀ``
or ``A = coreᵀ·P_in``, ``B = s·P_out``, whichever is thinner; several placements on one
matrix (a matrix whose slices sit in several groups) concatenate along the rank. No SVD, no
rounding beyond the two products: TT, Tucker, CP and batch-matrix export exactly at their
own rank. Where that rank exceeds the matrix's (tensor-ring's ``r²`` projections at high rank)
or a ``max_rank`` the caller sets, the dense ``s·ΔW`` is cut by a truncated SVD instead and
the report gives the relative error ``‖ΔW − BA‖_F / ‖ΔW‖_F`` of the weights written.

The directory holds what ``peft.PeftModel.from_pretrained(base_model, directory)`` reads:
``adapter_config.json`` (``lora_alpha = r`` per module, so PEFT's scaling is 1 and ``s`` lives in
``B``; exact module names as an anchored regex) and ``adapter_model.safetensors``, each written
atomically. Writing it needs no PEFT; the model is only read. ``nn.MultiheadAttention``'s
``in_proj`` exports; its ``out_proj`` does not: PEFT's LoRA adds that delta twice in forward and
merge (huggingface/peft#3774), so an exported one could not be exact.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from factnet.adapter import Adapter
from factnet.attach import AdaptedMatrix
from factnet.errors import FactnetError
from factnet.file.container import write_atomically
from factnet.increment import Increment, as_dense
from factnet.slices import Matrix

__all__ = ["ExportReport", "ExportedMatrix", "export_lora", "lora_factors", "relative_error", "truncated_svd"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules in its state_dict


# ---- pure functions -------------------------------------------------------------------------------
def lora_factors(increment: Increment, scale: float) -> tuple[Tensor, Tensor]:
    """Exact LoRA factors ``A: (r, d_in)``, ``B: (d_out, r)`` with ``B @ A = scale · delta_weight(increment)``
    and ``r = min(m_in·α, m_out·β)``."""
    if increment.diagonal:
        return _diagonal_lora_factors(increment, scale)
    a_t, core, b_t = increment.tensors()
    p_in = torch.block_diag(*a_t.expand(increment.m_in, -1, -1).unbind(0))  # (m_in·α, d_in)
    p_out = torch.block_diag(*b_t.expand(increment.m_out, -1, -1).transpose(1, 2).unbind(0))  # (d_out, m_out·β)
    if core is None:  # the identity: block p of the input side meets block p of the output side
        return p_in, scale * p_out
    if core.shape[0] <= core.shape[1]:
        return p_in, scale * (p_out @ core.t())
    return core.t() @ p_in, scale * p_out


def _diagonal_lora_factors(increment: Increment, scale: float) -> tuple[Tensor, Tensor]:
    """`lora_factors` of a diagonal increment: its core made dense, the output scaling on ``B``'s rows (per input
    block where each has its own: then ``B``'s column block ``p`` meets input block ``p`` only, rank ``m_in·α``)."""
    dense = as_dense(increment) if increment.core is not None else increment
    plain = Increment(*dense.tensors(), dense.m_in, dense.m_out)
    if increment.out_scale is None:
        return lora_factors(plain, scale)
    if increment.m_in == 1:
        a, b = lora_factors(plain, scale)
        return a, b * increment.out_scale[0, :, None]
    a_t, core, b_t = plain.tensors()
    p_in = torch.block_diag(*a_t.expand(increment.m_in, -1, -1).unbind(0))  # (m_in·α, d_in)
    blocks = (b_t[0].t() @ core.t()).view(b_t.shape[2], increment.m_in, -1)  # (d_out, m_in, α): P_out D_pᵀ
    return p_in, scale * (blocks * increment.out_scale.t().unsqueeze(-1)).reshape(b_t.shape[2], -1)


def _rank(increment: Increment) -> int:
    """The rank of the LoRA pair `lora_factors` makes of ``increment``: ``min(m_in·α, m_out·β)``, or ``m_in·α``
    where each input block has an output scaling of its own."""
    alpha = increment.m_in * increment.a_t.shape[1]
    if increment.diagonal and increment.out_scale is not None and increment.m_in > 1:
        return alpha
    return min(alpha, increment.m_out * increment.b_t.shape[1])


def truncated_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` LoRA ``(A: (rank, d_in), B: (d_out, rank))`` of ``delta: (d_out, d_in)``
    (SVD in float64; the singular values split evenly between ``A`` and ``B``)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(delta.dtype), (u[:, :rank] * root).to(delta.dtype)


def relative_error(delta: Tensor, a: Tensor, b: Tensor) -> float:
    """``‖delta − b @ a‖_F / ‖delta‖_F`` in float64 (0 when both are zero)."""
    delta = delta.double()
    norm = torch.linalg.matrix_norm(delta).item()
    error = torch.linalg.matrix_norm(delta - b.double() @ a.double()).item()
    return error / norm if norm > 0 else (0.0 if error == 0 else math.inf)


# ---- the report -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportedMatrix:
    """One adapted matrix in the exported LoRA.

    ``target`` is the module PEFT wraps (the ``nn.MultiheadAttention`` for its in/out projections),
    ``method`` is ``"factors"`` (exact, from the normal form) or ``"svd"`` (truncated), and
    ``relative_error`` is ``‖ΔW − BA‖_F / ‖ΔW‖_F`` of what was written (0 for exact ones).
    """

    name: str
    kind: str
    target: str
    rank: int
    method: str
    relative_error: float


@dataclass(frozen=True)
class ExportReport:
    """What `export_lora` wrote: per matrix rank and error, the head saved whole, and totals.

    ``relative_error`` is over all matrices, ``sqrt(Σ‖ΔW − BA‖² / Σ‖ΔW‖²)``; ``num_parameters``
    counts the LoRA ``A`` and ``B`` entries written (not the head). ``head`` lists the modules
    saved whole through PEFT's ``modules_to_save`` (empty: save the head separately).
    """

    directory: Path
    matrices: tuple[ExportedMatrix, ...]
    head: tuple[str, ...]
    relative_error: float
    num_parameters: int

    @property
    def exact(self) -> bool:
        """Whether every matrix was exported from its factors (no SVD truncation)."""
        return all(m.method == "factors" for m in self.matrices)

    def __str__(self) -> str:
        rows = [("matrix", "kind", "rank", "method", "rel. error")]
        rows += [(m.name, m.kind, str(m.rank), m.method, f"{m.relative_error:.2e}") for m in self.matrices]
        widths = [max(len(row[c]) for row in rows) for c in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        head = ", ".join(self.head) if self.head else "not included (save it separately)"
        summary = (f"ExportReport({self.directory}: {len(self.matrices)} matrices, {self.num_parameters:,} LoRA "
                   f"parameters, {'exact' if self.exact else f'relative error {self.relative_error:.2e}'}; "
                   f"head: {head})")
        return "\n".join([summary, *lines])


# ---- export ---------------------------------------------------------------------------------------
@torch.no_grad()
def export_lora(
    adapter: Adapter,
    directory: str | os.PathLike,
    *,
    max_rank: int | None = None,
    include_head: bool = True,
    overwrite: bool = False,
    allow_fused_layers: bool = False,
) -> ExportReport:
    """Write ``adapter`` as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained`` loads
    onto the base model (the model without factnet: a copy taken before `decompose`).

    A matrix whose increment has rank at most ``max_rank`` (default: the matrix's own
    ``min(d_out, d_in)``) is exported exactly from its factors; a larger one by a truncated SVD of
    ``s·ΔW`` to that rank. With ``include_head`` the trained head goes along whole as PEFT's
    ``modules_to_save``. A merged adapter exports the same files as unmerged (the factors are
    read, not the weights); the model is not changed. ``overwrite`` replaces the two files in a
    non-empty ``directory``. Matrices inside ``nn.TransformerEncoderLayer`` need
    ``allow_fused_layers=True`` (see the error for why).
    """
    if not isinstance(adapter, Adapter):
        raise FactnetError(f"export_lora needs a factnet Adapter, got {type(adapter).__name__}")
    model = getattr(adapter, "model", None)
    if model is None:
        raise FactnetError("adapter was detached, so its model (and head) are gone; export before detach()")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise FactnetError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    targets = {name: _peft_target(model, matrix, allow_fused_layers) for name, matrix in adapter.matrices.items()}
    head = _head(model, adapter.head, targets.values()) if include_head else ()
    path = _directory(directory, overwrite)

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    exported: dict[str, tuple[str, float]] = {}
    squared_error = squared_norm = 0.0
    for name, matrix in adapter.matrices.items():
        delta = adapter.delta_weight(name)
        increments = []
        for placement in adapter.placements[name]:
            form = adapter.groups[placement.group].normal_form()
            increments.append(placement.increment(form, form.p_in_t.dtype))
        limit = min(max_rank or matrix.d_in, matrix.d_out, matrix.d_in)
        norm2 = torch.linalg.matrix_norm(delta.double()).item() ** 2
        squared_norm += norm2
        if sum(_rank(inc) for inc in increments) <= limit:
            pieces = [lora_factors(inc, adapter.settings.scale) for inc in increments]
            factors[name] = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces], dim=1)
            exported[name] = ("factors", 0.0)
        else:
            factors[name] = truncated_svd(delta, limit)
            exported[name] = ("svd", relative_error(delta, *factors[name]))
            squared_error += exported[name][1] ** 2 * norm2

    tensors, ranks = _peft_tensors(model, adapter.matrices, targets, factors)
    own = adapter.head_values()  # apart from the model's while inactive; low-bit as trained with head_bits
    tensors.update({f"{_PREFIX}{h}.{key}": own.get(f"{h}.{key}", value) for h in head
                    for key, value in model.get_submodule(h).state_dict().items()})
    tensors = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    fan_in_fan_out = any(m.rules.fan_in_fan_out for m in adapter.matrices.values())
    config = json.dumps(_config(ranks, head, fan_in_fan_out), indent=2, sort_keys=True) + "\n"
    path.mkdir(parents=True, exist_ok=True)
    write_atomically(str(path / WEIGHTS_NAME), lambda temp: save_file(tensors, temp, metadata={"format": "pt"}))
    write_atomically(str(path / CONFIG_NAME), lambda temp: Path(temp).write_text(config))

    matrices = tuple(ExportedMatrix(name, matrix.kind, targets[name], ranks[targets[name]], *exported[name])
                     for name, matrix in adapter.matrices.items())
    total = math.sqrt(squared_error / squared_norm) if squared_norm > 0 else 0.0
    parameters = sum(t.numel() for key, t in tensors.items() if ".lora_" in key)
    return ExportReport(path, matrices, head, total, parameters)


def _peft_target(model: nn.Module, matrix: Matrix, allow_fused_layers: bool) -> str:
    """The module PEFT puts the LoRA of ``matrix`` on (the module holding it), after checking PEFT can run
    it exactly (its kind's `check_peft`, then the checks for every kind)."""
    target = matrix.name
    if not target:
        raise FactnetError(f"the root module ({matrix.kind}) is adapted, but PEFT wraps submodules only: wrap the "
                           "model in a container module and adapt that")
    module = model.get_submodule(target)
    matrix.rules.check_peft(matrix.name, module.original if isinstance(module, AdaptedMatrix) else module)
    parent = model.get_submodule(target.rpartition(".")[0])
    if isinstance(parent, nn.TransformerEncoderLayer) and not allow_fused_layers:
        raise FactnetError(
            f"{matrix.name} is inside an nn.TransformerEncoderLayer, whose fused inference path (eval mode) reads "
            "the weights directly and silently skips PEFT's LoRA, so the exported adapter would not be exact. "
            "Run the PEFT model with torch.backends.mha.set_fastpath_enabled(False) (or in train mode) and pass "
            "allow_fused_layers=True, or merge factnet's increment into the weights instead")
    return target


def _head(model: nn.Module, heads: list[str], targets: Iterable[str]) -> tuple[str, ...]:
    """The trained head modules to save whole, checked against PEFT's name matching: PEFT wraps every
    module whose name ends with a head name and never puts LoRA on one matching ``(^|.*\\.)head($|\\..*)``."""
    names = [n for n, _ in model.named_modules()]
    for h in heads:
        excluded = re.compile(rf"(^|.*\.){h}($|\..*)")
        for target in dict.fromkeys(targets):
            inside = [n for n in names if n == target or n.startswith(target + ".")]
            clash = next((n for n in inside if excluded.match(n) or n.endswith(h)), None)
            if clash is not None:
                raise FactnetError(f"head {h!r} would be saved through PEFT's modules_to_save, which also matches the "
                                   f"LoRA module {clash!r}; export with include_head=False and save the head apart")
    return tuple(heads)


def _peft_tensors(model: nn.Module, matrices: dict[str, Matrix], targets: dict[str, str],
                  factors: dict[str, tuple[Tensor, Tensor]]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """PEFT's state_dict keys and layouts (each kind's `peft_tensors`), and the rank of every PEFT target."""
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name, matrix in matrices.items():
        target, (a, b) = targets[name], factors[name]
        module = model.get_submodule(target)
        tensors.update({f"{_PREFIX}{target}.{key}": t for key, t in matrix.rules.peft_tensors(module, a, b).items()})
        ranks[target] = a.shape[0]
    return tensors, ranks


def _config(ranks: dict[str, int], head: tuple[str, ...], fan_in_fan_out: bool) -> dict:
    """``adapter_config.json``: exact module names (anchored, escaped), ``lora_alpha = r`` per module."""
    pattern = {"^" + re.escape(target): rank for target, rank in ranks.items()}  # PEFT: re.match(rf"(.*\.)?({key})$")
    top = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": "(?:" + "|".join(re.escape(target) for target in ranks) + ")",  # PEFT: re.fullmatch
        "modules_to_save": list(head) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": False,
    }


def _directory(directory: str | os.PathLike, overwrite: bool) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise FactnetError(f"expected a directory path (str or os.PathLike), got {type(directory).__name__}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise FactnetError(f"{path} exists and is not a directory; give a new or empty directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FactnetError(f"{path} exists and is not empty; give a new or empty directory, or overwrite=True "
                           f"(which replaces {CONFIG_NAME} and {WEIGHTS_NAME} there)")
    return path
