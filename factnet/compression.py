"""`compress`: a dense fine-tuned increment ``W_ft - W_base`` as an `Adapter` in a format.

Every targeted slice of the increment is stacked exactly as `Tensorizer` stacks the weights
(``ΔW[i] = block_iᵀ: (d_in, d_out)``), divided by ``scale``, decomposed with tensorly (in
float64) and copied into the factors of an adapter attached to ``base``:

    adapter, errors = factnet.compress(base, finetuned, "tt", rank=8)
    errors          # {group: ‖ΔW - s·ΔŴ‖ / ‖ΔW‖}
    rank_sweep(base, finetuned, "tucker", [2, 4, 8, 16])   # prints error vs parameters

When the increment is exactly representable in the format at the rank, ``tt``, ``tucker`` and
``batch-matrix`` recover it to float precision (one SVD pass); ``cp`` and ``tensor-ring`` run
ALS and usually do (random restarts while the error is above `EXACT`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorly as tl
import torch
from tensorly.decomposition import parafac, tensor_ring, tensor_ring_als, tensor_train, tucker
from torch import Tensor, nn
from tqdm import tqdm

from factnet.adapter import Adapter
from factnet.errors import FactnetError
from factnet.formats import Format, get_format
from factnet.grouping import GroupBy
from factnet.slices import Matrix, Slice
from factnet.tensorizer import Tensorizer

__all__ = ["compress", "group_increment", "rank_sweep"]

EXACT = 1e-6  # ALS formats stop restarting once a decomposition's relative error is below this
# (float32 weights put a rounding floor of about 1e-7 under W_ft - W_base)


@dataclass(frozen=True)
class _Options:
    """How the iterative decompositions run (`compress`'s ``n_iter_max``, ``restarts``, ``seed``)."""

    n_iter_max: int
    restarts: int
    seed: int


def compress(
    base: nn.Module,
    finetuned: nn.Module | Mapping[str, Tensor],
    format: str | Format,
    rank: int | None = None,
    *,
    targets: Sequence[str] | None = None,
    group: GroupBy = "shape",
    scale: float = 1.0,
    progress: bool = True,
    n_iter_max: int = 500,
    restarts: int = 2,
    seed: int = 0,
    name: str = "default",
) -> tuple[Adapter, dict[str, float]]:
    """Decompose ``finetuned - base`` on the targeted slices and attach it to ``base``.

    ``base`` is a model (it receives the adapter, as `Tensorizer.decompose` would give it, with
    ``train_head=False``); ``finetuned`` a model of the same architecture or its state dict
    (same parameter names). ``targets``, ``group`` and ``scale`` are those of `Tensorizer` and
    `Tensorizer.decompose`, ``name`` that of the adapter in ``base.factnet``. Returns the
    adapter and ``{group: ‖ΔW - s·ΔŴ‖ / ‖ΔW‖}`` (0 for a
    zero increment), measured with the adapter's own factors.

    ``n_iter_max`` bounds the ALS iterations of ``cp``/``tensor-ring`` (and Tucker's HOOI);
    ``restarts`` extra random starts are tried by ``cp``/``tensor-ring`` while the error is above
    `EXACT`, the best kept; ``seed`` fixes them. Only the targeted matrices are compressed: other
    tensors that differ (a new head, biases, norms) are reported in a warning, not copied.
    """
    fmt = get_format(format, rank)
    decomposer = _DECOMPOSERS.get(fmt.name)
    if decomposer is None:
        raise FactnetError(f"compress has no tensorly decomposition for format {fmt.name!r}; it supports "
                           f"{', '.join(sorted(_DECOMPOSERS))}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
        raise FactnetError(f"compress divides the increment by scale, so it must be a finite non-zero number, "
                           f"got {scale!r}")
    for option, value, least in (("n_iter_max", n_iter_max, 1), ("restarts", restarts, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise FactnetError(f"{option} must be an integer >= {least}, got {value!r}")
    if not isinstance(base, nn.Module):
        raise FactnetError(f"base must be the torch.nn.Module the adapter attaches to, got {type(base).__name__}")
    base_state = _state(base, "base")
    finetuned_state = _state(finetuned, "finetuned")
    tensorizer = Tensorizer(base, targets, by=group)
    matrices = list(dict.fromkeys(s.matrix for s in tensorizer.slices))
    _check_finetuned(matrices, base_state, finetuned_state)
    adapter = tensorizer.decompose(fmt, scale=scale, train_head=False, name=name)
    options = _Options(n_iter_max, restarts, seed)
    errors: dict[str, float] = {}
    try:
        for group in tqdm(adapter.group_names, desc=f"compress ({fmt.name} r{fmt.rank})", unit="group",
                          disable=not progress):
            factors = adapter.group(group).factors
            delta = group_increment(tensorizer.groups[group], base_state, finetuned_state)
            with torch.no_grad():
                if torch.count_nonzero(delta).item() == 0:
                    for factor in factors.values():
                        factor.zero_()
                    errors[group] = 0.0
                    continue
                with tl.backend_context("pytorch"):
                    found = _fit_to_rank(fmt, fmt.from_tensorly(decomposer(delta / scale, fmt, options)))
                adapter.group(group).assign(found)
                rebuilt = adapter.group(group).reconstruct().to(torch.float64) * scale
                errors[group] = (torch.linalg.vector_norm(delta - rebuilt) / torch.linalg.vector_norm(delta)).item()
    except BaseException:
        adapter.detach()  # a failed compress leaves base as it was
        raise
    _warn_other_differences(matrices, base_state, finetuned_state)
    return adapter, errors


def rank_sweep(
    base: nn.Module,
    finetuned: nn.Module | Mapping[str, Tensor],
    format: str,
    ranks: Sequence[int],
    *,
    show: bool = True,
    **options: Any,
) -> list[tuple[int, int, dict[str, float]]]:
    """`compress` at each rank: ``[(rank, factor parameters, {group: relative error})]``.

    ``base`` is left as it was (each adapter is detached after measuring); ``options`` go to
    `compress` (``targets``, ``group``, ``scale``, ...). With ``show`` a table of error vs
    parameters is printed.
    """
    options.setdefault("progress", False)
    rows = []
    for rank in ranks:
        adapter, errors = compress(base, finetuned, format, rank, **options)
        rows.append((rank, adapter.num_parameters(), errors))
        adapter.detach()
    if show:
        print(_table(format, rows))
    return rows


def group_increment(members: Sequence[Slice], base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> Tensor:
    """The dense increment of one group, ``(n, d_in, d_out)`` float64: ``ΔW[i]`` is the block of
    ``W_ft - W_base`` (linear convention ``(d_out, d_in)``) slice ``i`` names, transposed."""
    blocks = []
    for piece in members:
        key = _weight_key(piece.matrix)
        weight = base[key].double()
        kind = piece.matrix.rules
        delta = kind.to_linear(finetuned[key].to(weight)) - kind.to_linear(weight)
        start = piece.index * (piece.d_out if piece.side == "out" else piece.d_in)
        if piece.side == "out":
            delta = delta[start:start + piece.d_out, :]
        elif piece.side == "in":
            delta = delta[:, start:start + piece.d_in]
        blocks.append(delta.t())
    return torch.stack(blocks)


# ---- one tensorly decomposition per format: (ΔW / s: (n, d_in, d_out) float64) -> to_tensorly's object --
def _tensor_train(delta: Tensor, fmt: Format, options: _Options) -> Any:
    """TT-SVD over modes (j, i, k), the mode order of `TensorTrain.to_tensorly`."""
    return tensor_train(delta.permute(1, 0, 2), rank=[1, fmt.rank, fmt.rank, 1])


def _tucker(delta: Tensor, fmt: Format, options: _Options) -> Any:
    """HOSVD-initialized HOOI."""
    return tucker(delta, rank=[fmt.rank] * 3, n_iter_max=options.n_iter_max, tol=1e-10)


def _batch_matrix(delta: Tensor, fmt: Format, options: _Options) -> Any:
    """Truncated SVD of each slice, split evenly: ``u_i = U_i √S_i``, ``v_i = V_i √S_i``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:, : fmt.rank].sqrt().unsqueeze(1)
    return fmt.to_tensorly({"u": u[..., : fmt.rank] * root, "v": vh[:, : fmt.rank].mT * root})


def _parafac(delta: Tensor, fmt: Format, options: _Options) -> Any:
    """CP-ALS from the SVD init, then from random inits while the error is above `EXACT`."""
    def attempt(start: int) -> Any:
        init = {"init": "svd"} if start == 0 else {"init": "random", "random_state": options.seed + start}
        return parafac(delta, rank=fmt.rank, n_iter_max=options.n_iter_max, tol=1e-12,
                                        normalize_factors=False, **init)

    return _best_of(attempt, delta, fmt, options.restarts + 1)


def _tensor_ring(delta: Tensor, fmt: Format, options: _Options) -> Any:
    """TR-ALS from random inits (TR-SVD is tried first where its ranks fit; it is rarely exact)."""
    def attempt(start: int) -> Any:
        if start == 0:
            try:
                return tensor_ring(delta, rank=[fmt.rank] * 4)
            except ValueError:  # TR-SVD needs rank² ≤ n; ALS has no such limit
                return None
        return tensor_ring_als(delta, fmt.rank, n_iter_max=options.n_iter_max, tol=1e-12,
                                                random_state=options.seed + start)

    return _best_of(attempt, delta, fmt, options.restarts + 2)


def _best_of(attempt: Callable[[int], Any], delta: Tensor, fmt: Format, count: int) -> Any:
    """The decomposition of least error among ``attempt(0), attempt(1), ...``; stops below `EXACT`."""
    best, best_error = None, math.inf
    for start in range(count):
        found = attempt(start)
        if found is None:
            continue
        rebuilt = fmt.reconstruct(fmt.from_tensorly(found))
        error = (torch.linalg.vector_norm(delta - rebuilt) / torch.linalg.vector_norm(delta)).item()
        if error < best_error:  # a NaN error never wins
            best, best_error = found, error
        if best_error < EXACT:
            break
    if best is None:
        raise FactnetError(f"every {fmt.name} decomposition diverged (non-finite error); try another seed or rank")
    return best


_DECOMPOSERS: dict[str, Callable[[Tensor, Format, _Options], Any]] = {
    "tt": _tensor_train,
    "tucker": _tucker,
    "cp": _parafac,
    "tensor-ring": _tensor_ring,
    "batch-matrix": _batch_matrix,
}


def _fit_to_rank(fmt: Format, factors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Zero-pad each rank axis of ``factors`` up to its size in ``fmt`` (the rank, capped per mode;
    tensorly caps ranks at the sizes a decomposition can reach; zero padding leaves the tensor unchanged)."""
    modes = {c: size for name, letters in fmt.factors.items() for c, size in zip(letters, factors[name].shape)}
    target = fmt.sizes(modes["i"], modes["j"], modes["k"])
    fitted = {}
    for name, letters in fmt.factors.items():
        tensor = factors[name]
        pads: list[int] = []
        for letter, size in zip(reversed(letters), reversed(tensor.shape)):
            if letter in "ijk":
                pads += [0, 0]
                continue
            if size > target[letter]:
                raise FactnetError(f"decomposition factor {name!r} has rank {size} > {target[letter]} on axis {letter!r}")
            pads += [0, target[letter] - size]
        fitted[name] = torch.nn.functional.pad(tensor, pads)
    return fitted


# ---- reading the weights ----------------------------------------------------------------------------
def _state(source: nn.Module | Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """``{parameter name: tensor}`` of a model (merged adapter allowed) or a state dict."""
    if isinstance(source, nn.Module):
        active = getattr(getattr(source, "factnet", None), "active_adapter", None)
        if active is not None and not active.merged:
            raise FactnetError(f"{what} carries an active, unmerged factnet adapter ({active.name!r}), so its weights "
                               f"are not the fine-tuned ones; call {what}.factnet[{active.name!r}].merge() first")
        return {key: value for key, value in source.state_dict().items() if not key.startswith("factnet.")}
    if isinstance(source, Mapping):
        return dict(source)
    raise FactnetError(f"{what} must be a torch.nn.Module or a state dict (Mapping[str, Tensor]), "
                       f"got {type(source).__name__}")


def _weight_key(matrix: Matrix) -> str:
    prefix = f"{matrix.name}." if matrix.name else ""
    return prefix + matrix.rules.parameter


def _check_finetuned(matrices: list[Matrix], base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> None:
    missing = [_weight_key(m) for m in matrices if _weight_key(m) not in finetuned]
    if missing:
        raise FactnetError(f"finetuned has no weight {missing[0]!r} ({len(missing)} targeted weights missing); "
                           "pass the fine-tuned model of the same architecture or its state_dict()")
    for matrix in matrices:
        key = _weight_key(matrix)
        tuned = finetuned[key]
        if not isinstance(tuned, Tensor) or not tuned.is_floating_point():
            kind = tuned.dtype if isinstance(tuned, Tensor) else type(tuned).__name__
            raise FactnetError(f"finetuned {key!r} is {kind}; compress needs floating-point weights "
                               "(dequantize the fine-tuned model first)")
        if tuned.shape != base[key].shape:
            raise FactnetError(f"finetuned {key!r} has shape {tuple(tuned.shape)}, base has "
                               f"{tuple(base[key].shape)}; both must be the same architecture")
        if not torch.isfinite(tuned).all():
            raise FactnetError(f"finetuned {key!r} has non-finite values")


def _warn_other_differences(matrices: list[Matrix], base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> None:
    """Warn about tensors that differ outside the compressed matrices: the adapter lacks them."""
    compressed = {_weight_key(m) for m in matrices}
    differ = [key for key, value in base.items()
              if key not in compressed and key in finetuned and value.is_floating_point()
              and (finetuned[key].shape != value.shape or not torch.equal(finetuned[key].to(value), value))]
    if differ:
        shown = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
        warnings.warn(f"{len(differ)} tensors outside the compressed matrices differ between base and finetuned "
                      f"({shown}); the adapter does not carry them: copy them into base "
                      "(base.load_state_dict(..., strict=False)) if the task needs them", stacklevel=3)


def _table(format: str, rows: list[tuple[int, int, dict[str, float]]]) -> str:
    """``rank  parameters  <group errors>`` as aligned text."""
    groups = list(rows[0][2]) if rows else []
    header = ["rank", "parameters", *(f"error {g}" for g in groups)]
    body = [[str(rank), f"{params:,}", *(f"{errors[g]:.3e}" for g in groups)] for rank, params, errors in rows]
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *body]]
    return "\n".join([f"rank sweep: {format}", *lines])
