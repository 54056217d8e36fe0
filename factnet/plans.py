"""Contraction plans: every einsum factnet runs is planned once per shape by opt-einsum."""

from __future__ import annotations

import functools

import opt_einsum
from opt_einsum.contract import ContractExpression

__all__ = ["planned"]


@functools.lru_cache(maxsize=1024)
def planned(equation: str, *shapes: tuple[int, ...]) -> ContractExpression:
    """A reusable opt-einsum expression for ``equation`` on operands of these shapes."""
    return opt_einsum.contract_expression(equation, *shapes, optimize="optimal")
