"""The first-forward guard: a targeted matrix is never skipped silently.

`factnet.attach` gives ``W + s·ΔW`` to both ways a weight usually reaches the forward (its module's
forward, a read of its attribute). A model may still use the bare weight some other way: a tensor
cached before `decompose`, ``module._parameters["weight"]``, a fused kernel handed the parameter.
On the first forward of each newly adapted matrix a `WeightWatch` (a ``TorchFunctionMode``) sees
every torch call: a matrix whose bare weight went into a computation while its increment was
never applied is an error that names it. A matrix that took no part at all (a pooler the task
ignores, an expert no token was routed to) trains nothing from that input; it gets a warning,
and training goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

from torch import Tensor
from torch.overrides import TorchFunctionMode

from factnet.errors import FactnetError

__all__ = ["WeightWatch"]

_SHOWN = 6


class WeightWatch(TorchFunctionMode):
    """Records which watched weights went into a computation (an op returning a tensor) and which
    matrices had their increment applied (`applied`) while it is active."""

    def __init__(self, weights: Mapping[int, str]) -> None:
        super().__init__()
        self.weights = dict(weights)  # id(parameter) -> matrix name
        self.seen: set[str] = set()
        self.applied: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if _holds_tensor(result):
            for value in _tensors(args, kwargs):
                name = self.weights.get(id(value))
                if name is not None:
                    self.seen.add(name)
        return result

    def verdict(self) -> set[str]:
        """The matrices verified; raises `FactnetError` for a weight used without its increment."""
        skipped = sorted(self.seen - self.applied)
        if skipped:
            raise FactnetError(
                f"{len(skipped)} adapted matrices had their weight used in the forward without their increment: "
                f"{_names(skipped)}. The model reads them by a way factnet does not see (a weight cached before "
                "decompose, module._parameters, a read by the model's own forward rather than a submodule's), so "
                "training would not reach them and merge() would change the model. Leave them out of targets=, "
                "read them as module.weight inside a submodule's forward, or wrap the model in a container module")
        unused = sorted(set(self.weights.values()) - self.seen - self.applied)
        if unused:
            warnings.warn(f"{len(unused)} adapted matrices took no part in the first forward, so their increments get "
                          f"no gradient from it: {_names(unused)} (expected for a pooler the task ignores or an "
                          "expert no input was routed to; otherwise leave them out of targets=)", stacklevel=4)
        return set(self.weights.values())


def _holds_tensor(value: object) -> bool:
    if isinstance(value, Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value)


def _tensors(args: Iterable, kwargs: Mapping) -> Iterable[object]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, (tuple, list)):
            yield from value
        else:
            yield value


def _names(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
