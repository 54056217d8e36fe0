"""Kernel variants chosen by measuring them on the machine at hand, once per shape.

Several steps of `factnet.kernel` have more than one exact implementation whose speed depends on
the CPU, the BLAS, the thread count and the shape (a long reduction split per thread or not, a
thin product as ``x @ Pᵀ`` or ``(P @ xᵀ)ᵀ``, the effective weight built or the increment applied by
thin products). Each such step is an *op* with named *variants* (`VARIANTS`; the first is the
default). The first call of an op for a key (its operands' shapes and dtype) times every variant
on the real operands (five samples each of at least a millisecond, the best counted; some tens of
milliseconds in all) and remembers the fastest; later calls look it up. The key includes the
thread count and the device type, so a model run at another thread count measures again.

Every variant computes the same value (they differ only in floating-point rounding, and each is
tested against the dense oracle), so the choice changes speed, not results beyond rounding. The
choice is cached in memory for the process (`choices`, `clear`); ``FACTNET_AUTOTUNE_CACHE=path``
(or `load`/`save`) also persists it to a JSON file, for bitwise-reproducible choices across runs.

Override: ``FACTNET_KERNEL="outer=mm,times_t=nt"`` in the environment, or ``with force(outer="mm"):``
(the tests use it to run every variant). Nothing is measured while compiling or tracing, on devices
other than CPU and CUDA, or for tensor subclasses: the default variant runs there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping

import torch

from factnet.errors import FactnetError

__all__ = ["VARIANTS", "choices", "clear", "force", "forced", "load", "save"]

VARIANTS: dict[str, tuple[str, ...]] = {
    # dropout-free forward: one GEMM with W + s·ΔW, or the base GEMM plus thin products
    "forward": ("merged", "thin"),
    # backward's grad_x: grad_y (W + s·ΔW) with the weight rebuilt, or grad_y W plus thin products
    "grad_input": ("rebuild", "thin"),
    # Σ_n r_nᵀ x_n (the projection gradients): one TN GEMM, split per thread and summed, or (xᵀ r)ᵀ
    "outer": ("chunked", "mm", "tn"),
    # x Pᵀ with P stored rank-major (α, d): NT GEMM (F.linear), NN on a contiguous copy of Pᵀ, or (P xᵀ)ᵀ
    "times_t": ("nt", "nn", "tn"),
}

_REPS = 5  # samples per variant, the best one counted
_LEAST = 1e-3  # seconds a sample lasts at least
_MOST = 50  # runs per sample at most
_cache: dict[tuple, str] = {}
_forced: dict[str, str] = {}
_persisted: dict[str, str] = {}
_path: str | None = None


def _parse(spec: str) -> dict[str, str]:
    result = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        op, sep, name = item.partition("=")
        if not sep:
            raise FactnetError(f"FACTNET_KERNEL entry {item!r} is not op=variant (e.g. outer=mm)")
        result[op.strip()] = name.strip()
    return _checked(result)


def _checked(choice: Mapping[str, str]) -> dict[str, str]:
    for op, name in choice.items():
        if op not in VARIANTS:
            raise FactnetError(f"unknown kernel op {op!r}; the ops are {', '.join(VARIANTS)}")
        if name not in VARIANTS[op]:
            raise FactnetError(f"unknown variant {name!r} of {op!r}; choose one of {', '.join(VARIANTS[op])}")
    return dict(choice)


def forced() -> dict[str, str]:
    """The variants forced now (by ``FACTNET_KERNEL`` or `force`)."""
    return dict(_forced)


@contextlib.contextmanager
def force(**choice: str) -> Iterator[None]:
    """Run these variants (``op=variant``) inside the block, measuring nothing for those ops."""
    previous = dict(_forced)
    _forced.update(_checked(choice))
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def choices() -> dict[tuple, str]:
    """The variants measured so far: ``(op, key, threads, device) → variant``."""
    return dict(_cache)


def clear() -> None:
    """Forget the measured variants (the next call of each op measures again)."""
    _cache.clear()
    _persisted.clear()


def _signature() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def load(path: str) -> None:
    """Use the choices saved in ``path`` (ignored when written by another torch or CPU capability)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return
    if data.get("signature") == _signature():
        _persisted.update(data.get("choices", {}))


def save(path: str) -> None:
    """Write the choices known now (measured or loaded) to ``path`` as JSON."""
    entries = {**_persisted, **{repr(k): v for k, v in _cache.items()}}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"signature": _signature(), "choices": entries}, f, indent=0, sort_keys=True)
    os.replace(tmp, path)


def choice(op: str, key: tuple) -> str | None:
    """The variant of ``op`` for ``key`` when forced or known, else None (then call `measure`)."""
    name = _forced.get(op)
    if name is not None:
        return name
    return _cache.get((op, key, torch.get_num_threads()))


def _measurable(tensors: tuple[torch.Tensor, ...]) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return False
    return not (device == "cuda" and torch.cuda.is_current_stream_capturing())


def measure(op: str, key: tuple, variants: Mapping[str, Callable[[], object]],
            tensors: tuple[torch.Tensor, ...]) -> str:
    """Time each variant (``name → thunk``, in `VARIANTS` order) on the operands at hand, remember and
    return the fastest; the default (first) where nothing may be measured."""
    full = (op, key, torch.get_num_threads())
    if not _measurable(tensors):
        return next(iter(variants))
    if _path is not None and repr(full) in _persisted:
        _cache[full] = _persisted[repr(full)]
        return _cache[full]
    sync = torch.cuda.synchronize if tensors[0].device.type == "cuda" else (lambda: None)
    names = list(variants)
    best = dict.fromkeys(names, float("inf"))
    repeat = 1
    for rep in range(_REPS + 1):  # the first round warms up (allocations, BLAS packing) and sets `repeat`
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            sync()
            start = time.perf_counter()
            for _ in range(repeat):
                variants[name]()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / repeat)
        if not rep:  # a sample lasts at least _LEAST seconds, so a short variant is not timed by the clock's noise
            repeat = max(1, min(_MOST, int(_LEAST / min(best.values()))))
            best = dict.fromkeys(names, float("inf"))
    winner = min(names, key=lambda n: best[n])
    _cache[full] = winner
    if _path is not None:
        with contextlib.suppress(OSError):
            save(_path)
    return winner


_forced.update(_parse(os.environ.get("FACTNET_KERNEL", "")))
if os.environ.get("FACTNET_AUTOTUNE_CACHE"):
    _path = os.environ["FACTNET_AUTOTUNE_CACHE"]
    load(_path)
