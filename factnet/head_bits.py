"""The task head trained as a low-bit file stores it: ``decompose(..., head_bits=b)``.

While its adapter is the active one, each module of the head reads its own parameters as their
``b``-bit values (`factnet.quant.fake_quantize`, straight-through gradient to the float values the
optimizer updates), so ``adapter.save`` writes in ``b`` bits exactly the head that was trained. The
other readers of an adapter's head (mixed batches, LoRA export) take `quantized_head`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from factnet.quant import fake_quantize

__all__ = ["HeadQuantizer", "head_modules", "quantized_head"]


class HeadQuantizer:
    """Forward hooks on every module of the head that holds parameters of its own: inside its forward,
    ``module.<name>`` is the ``bits``-bit value of parameter ``<name>`` (an instance attribute shadowing
    the parameter) while ``acting()``; calls from several threads share it and the last one out
    removes it. `remove` takes the hooks off."""

    def __init__(self, modules: list[nn.Module], bits: int, group: int, acting: Callable[[], bool]) -> None:
        self.modules, self.bits, self.group, self.acting = modules, bits, group, acting
        self._depth: dict[int, int] = {}
        self._lock = threading.Lock()
        self._handles = [handle for m in modules for handle in (m.register_forward_pre_hook(self._enter),
                                                               m.register_forward_hook(self._leave))]

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if not any(module is m for m in self.modules) or not self.acting():  # a mixed batch's copy: values set
            return
        with self._lock:
            depth = self._depth.get(id(module), 0)
            if depth == 0:
                for name, param in module._parameters.items():
                    if param is not None:
                        module.__dict__[name] = fake_quantize(param, self.bits, self.group)
            self._depth[id(module)] = depth + 1

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        with self._lock:
            depth = self._depth.get(id(module), 0)
            if depth == 0:
                return
            if depth == 1:
                for name in module._parameters:
                    module.__dict__.pop(name, None)
            self._depth[id(module)] = depth - 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __getstate__(self) -> dict:  # (copies and pickles of the model: a lock is neither)
        return {**self.__dict__, "_lock": None, "_depth": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


def head_modules(model: nn.Module, head: list[str]) -> list[nn.Module]:
    """Every module under the ``head`` modules that holds floating parameters of its own."""
    found: dict[int, nn.Module] = {}
    for name in head:
        for module in model.get_submodule(name).modules():
            if any(p is not None and p.is_floating_point() for p in module._parameters.values()):
                found.setdefault(id(module), module)
    return list(found.values())


_CACHE_KEY = "_quantized_head"


def quantized_head(owner: object, values: Mapping[str, Tensor], bits: int, group: int) -> dict[str, Tensor]:
    """``values`` (parameter name → tensor) as their ``bits``-bit values, detached; kept on ``owner`` while
    ``values`` are the same tensors at the same versions, so a reader that caches by tensor sees the same
    objects."""
    key = tuple((name, id(v), v._version) for name, v in values.items())
    cached = owner.__dict__.get(_CACHE_KEY)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            stored = {name: fake_quantize(v, bits, group) for name, v in values.items()}
        cached = owner.__dict__[_CACHE_KEY] = key, stored
    return cached[1]
