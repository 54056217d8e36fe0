"""Budgets: a number of trained parameters, or the bytes of the file an adapter is saved in.

A budget in parameters picks the largest rank whose exact count fits. A budget in bytes (``"10KB"``) holds the
whole file saved without the head (``adapter.save(path, include_head=False)``): the factors as
`factnet.quant.stored_bytes` stores them at ``bits`` (codes plus the float16 constants of each group of 64
values) or at the factors' dtype without ``bits`` (seeded factors cost nothing), and the header and spec,
measured on the file the choice writes (`_fit_file`: 500 to 700 bytes with the default targets). With
``bits="auto"`` (``decompose``'s default) a byte budget chooses the bits too (`choose`): at each width of
`BUDGET_BITS` the largest rank whose file fits, and of those `PREFERRED_BITS` (measured), more bits where they
train as many parameters, 1 bit where 2 fit no rank (`_pick`). The head is not counted
(`factnet.file.writer.Saved` reports its bytes apart).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from factnet.errors import FactnetError
from factnet.formats import Format, get_format
from factnet.quant import check_bits, stored_bytes

__all__ = ["AUTO_RULE", "BUDGET_BITS", "PREFERRED_BITS", "AutoChoice", "Budget", "Choice", "FormatRule", "choose",
           "choose_format", "factor_bytes", "parse_budget", "read_budget"]

BUDGET_BITS: tuple[int | None, ...] = (1, 2, 4, 8, None)  # the widths a byte budget chooses from (None: dtype)
# the width a byte budget takes (`_pick`): on the demo's wide backbone at equal file bytes (docs/bytes/README.md)
# 1 bit won below about 4 KB, 4 bits at 8-16 KB, 2 bits from 32 KB up, 8 bits and float32 never; 1 bit loses
# most at high rank. 2 is the middle of the widths that won (their differences are about the seed noise)
PREFERRED_BITS = 2

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_BUDGET = re.compile(r"^\s*(?P<number>\d+(\.\d+)?)\s*(?P<prefix>[kmg]i?)?(?P<bytes>b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """``amount`` parameters, or bytes if ``in_bytes``."""

    amount: int
    in_bytes: bool

    def __str__(self) -> str:
        return f"{self.amount:,} {'bytes' if self.in_bytes else 'parameters'}"


def read_budget(budget: int | str) -> Budget:
    """``10_000`` or ``"10k"`` parameters, ``"40KB"`` / ``"40KiB"`` bytes."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise FactnetError(f"budget must be a number of parameters or a string such as '10k' or '40KB', got {budget!r}")
    if isinstance(budget, int):
        amount, in_bytes = budget, False
    else:
        parsed = _BUDGET.match(budget)
        if parsed is None or (parsed["prefix"] or "").lower().endswith("i") and not parsed["bytes"]:
            raise FactnetError(f"cannot read budget {budget!r}: use parameters ('10000', '10k', '1.5M') or bytes "
                               "('40KB', '40KiB', '2MB')")
        amount, in_bytes = int(float(parsed["number"]) * _UNITS[(parsed["prefix"] or "").lower()]), bool(parsed["bytes"])
    if amount < 1:
        raise FactnetError(f"budget {budget!r} allows no parameter at all")
    return Budget(amount, in_bytes)


def parse_budget(budget: int | str, itemsize: int = 4) -> int:
    """A budget as parameters: ``10_000`` or ``"10k"`` parameters, ``"40KB"`` / ``"40KiB"`` bytes at
    ``itemsize`` bytes a parameter."""
    read = read_budget(budget)
    count = read.amount // itemsize if read.in_bytes else read.amount
    if count < 1:
        raise FactnetError(f"budget {budget!r} allows no parameter at all")
    return count


def factor_bytes(fmt: Format, shapes: Iterable[tuple[int, int, int]], bits: int | None, itemsize: int,
                 group: int = 64) -> int:
    """Bytes of the trained factor tensors of groups of ``shapes`` as a file stores them: ``bits``-bit
    codes and constants per tensor, or ``itemsize`` bytes a value (``bits=None``)."""
    sizes = [math.prod(shape) for n, d_in, d_out in shapes
             for name, shape in fmt.shapes(n, d_in, d_out).items() if name not in fmt.seeded]
    return sum(stored_bytes(size, bits, group) if bits is not None else size * itemsize for size in sizes)


@dataclass(frozen=True)
class Choice:
    """A rank and a width (``bits=None``: the factors' dtype) that fit a budget: ``params`` trained
    parameters in ``bytes`` bytes of factors, and in a ``file``-byte file without the head where a byte budget
    measured it (the factors plus the header and spec)."""

    rank: int
    bits: int | None
    params: int
    bytes: int
    file: int | None = None


def choose(format: str, shapes: list[tuple[int, int, int]], budget: Budget, bits: int | None, itemsize: int,
           choose_bits: bool, file_bytes: Callable[[Choice], int] | None = None) -> Choice:
    """The largest rank of ``format`` that fits ``budget`` at ``bits`` (of ranks with equal counts, the
    smallest); with ``choose_bits`` (a byte budget) at each width of `BUDGET_BITS`, then `_pick`. Every rank up
    to the groups' largest size is tried; a format with a diagonal letter (`Format.diagonal_letters`) is also
    searched above it, where its count grows with the rank. With ``file_bytes`` (a choice's file without the
    head, measured) a byte budget holds the whole file (`_fit_file`), else the factors."""
    if bits is not None:
        check_bits(bits)
    widths = BUDGET_BITS if choose_bits else (bits,)
    limit = max(max(shape) for shape in shapes)  # no capped rank letter grows past the largest size
    formats = [get_format(format, rank) for rank in range(1, limit + 1)]
    counts = [sum(fmt.num_parameters(*s) for s in shapes) for fmt in formats]  # the same at every width

    points = {width: [Choice(rank, width, count, factor_bytes(fmt, shapes, width, itemsize))
                      for rank, (fmt, count) in enumerate(zip(formats, counts), start=1)] for width in widths}

    def best_at(width: int | None, amount: int) -> Choice | None:
        """The width's largest choice within ``amount`` (of ``budget``'s unit)."""
        within, best = Budget(amount, budget.in_bytes), None
        for point in points[width]:
            if _cost(point, within) <= amount and (best is None or point.params > best.params):
                best = point
        if formats[0].diagonal_letters:  # a diagonal letter grows past every size: search above the largest
            above = _largest_above(limit, lambda rank: _point(format, rank, shapes, width, itemsize), within)
            if above is not None and (best is None or above.params > best.params):
                best = above
        return best

    whole_file = file_bytes is not None and budget.in_bytes
    smallest = {width: found[0] for width, found in points.items()}
    fitting: list[Choice] = []
    for width in widths:
        if whole_file:
            best = _fit_file(lambda amount, width=width: best_at(width, amount), smallest[width], budget.amount,
                             file_bytes)
        else:
            best = best_at(width, budget.amount)
        if best is not None:
            fitting.append(best)
    if not fitting:
        need = min(smallest.values(), key=lambda c: c.bytes if budget.in_bytes else c.params)
        cost = f"{need.bytes:,} bytes" if budget.in_bytes else f"{need.params:,} parameters"
        if whole_file:
            cost = f"a {file_bytes(need):,}-byte file ({need.bytes:,} bytes of factors, the rest its header and spec)"
        at = "" if need.bits is None else f" at {need.bits} bit{'s' if need.bits > 1 else ''}"
        raise FactnetError(f"no rank of {format!r} fits a budget of {budget} here: rank 1 needs {cost}{at}; raise "
                           "the budget or target fewer matrices")
    return _pick(fitting)


def _fit_file(best_at: Callable[[int], Choice | None], smallest: Choice, amount: int,
              file_bytes: Callable[[Choice], int]) -> Choice | None:
    """The largest choice whose whole file fits ``amount`` bytes, with its ``file`` bytes (None if not even
    ``smallest``'s does). ``best_at(a)``: the largest choice whose factors fit ``a`` bytes. Down: the largest whose
    factors fit ``amount`` less what the last file measured held besides its factors (header and spec, which grow
    every round, so this ends), else ``smallest``; up: where a larger choice's header is a few bytes shorter (fewer
    digits), the largest whose factors fit ``amount`` less the fewest such bytes seen, while it fits."""
    fit, others = None, []
    best = best_at(amount)
    while best is not None:
        size = file_bytes(best)
        others.append(size - best.bytes)
        if size <= amount:
            fit = replace(best, file=size)
            break
        best = best_at(amount - others[-1])
    if fit is None:
        size = file_bytes(smallest)
        if size > amount:
            return None
        fit, others = replace(smallest, file=size), [*others, size - smallest.bytes]
    while (up := best_at(amount - min(others))) is not None and up.params > fit.params:
        size = file_bytes(up)
        others.append(size - up.bytes)
        if size > amount:
            break
        fit = replace(up, file=size)
    return fit


def _point(format: str, rank: int, shapes: list[tuple[int, int, int]], bits: int | None, itemsize: int) -> Choice:
    fmt = get_format(format, rank)
    return Choice(rank, bits, sum(fmt.num_parameters(*s) for s in shapes), factor_bytes(fmt, shapes, bits, itemsize))


def _cost(point: Choice, budget: Budget) -> int:
    return point.bytes if budget.in_bytes else point.params


def _largest_above(limit: int, point: Callable[[int], Choice], budget: Budget) -> Choice | None:
    """The largest rank above ``limit`` whose ``point`` fits ``budget`` (None if ``limit + 1`` does not), by
    doubling then bisection: above every size only diagonal letters grow, so the cost grows with the rank."""
    if _cost(point(limit + 1), budget) > budget.amount:
        return None
    low, high = limit + 1, 2 * (limit + 1)  # low fits; find a high that does not
    while _cost(point(high), budget) <= budget.amount:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _cost(point(middle), budget) <= budget.amount else (low, middle)
    return point(low)


def _pick(fitting: list[Choice]) -> Choice:
    """Of the widths that fit one byte budget: `PREFERRED_BITS`, or more bits where they train as many
    parameters (every rank letter capped, so more bits cost no rank); 1 bit where 2 bits fit no rank. (One
    width alone: that one.)"""
    preferred = next((c for c in fitting if c.bits == PREFERRED_BITS), None)
    if preferred is None:
        return max(fitting, key=lambda c: (c.params, _width(c)))
    return max((c for c in fitting if c.params >= preferred.params), key=_width)


def _width(choice: Choice) -> int:
    return 64 if choice.bits is None else choice.bits


@dataclass(frozen=True)
class FormatRule:
    """One line of `AUTO_RULE`: from a budget of ``min_bytes`` bytes on, ``format`` at ``bits`` ("auto":
    as `choose` picks them), for the reason ``measured`` (what `print(adapter)` and ``factnet info --budget`` say).
    ``lrs``: the learning rates (AdamW, the default rank-stable parametrization) that trained it best on the models
    measured, one per model where they differ: train at one, or choose among them on validation data."""

    min_bytes: int
    format: str
    bits: int | None | str
    lrs: tuple[float, ...]
    measured: str
    max_bytes: int | None = None  # a larger budget spends only this many bytes: more bought nothing measured


# The format a byte budget takes when none is named (`choose_format`), from the wide backbone's runs (docs/bytes:
# fixed_lr.md and vera_lr.md; test %, seed 0 unless a ± says 3 seeds; file bytes without the head). 1-bit FacT-TT:
# r4 2.0 KB 72.2, r16 3.9 KB 75.3 (73.5 on vera_lr.md's re-pretrained backbone); vera (seeded A, B, trained
# per-slice b and d, lr 0.1): 1 bit r16 2.6 KB 57.2, r192 4.0 KB 80.0; 2 bits r192 7.0 KB 88.3 ± 1.0, r512 11.2 KB
# 89.8 ± 2.8, r1024 19.5 KB 89.2, r4096 65.6 KB 89.2 (r192 1 bit and r512 up on the re-pretrained backbone, where
# r192 2 bits scored 87.7). The lines start at the files of vera r192 at 1 and 2 bits there (3,536 and 6,416 bytes)
# and stop spending at r4096's 2-bit file (64,976 bytes). Checked on EfficientNet-Lite0 + Fashion-MNIST
# (docs/real_model/frontier/auto_check.md, 3 seeds) while a budget still counted only the factors: the picks at 2,
# 8, 32, 128 KB and 1 MB scored 74.1, 80.3, 80.0, 81.1, 81.1, with 2-bit vera at lr 0.03 (and 1-bit vera r64 best at
# 0.01 in the frontier's lr validation): at the wide backbone's 0.1 vera diverged there at every bit width, hence
# two rates per vera line.
AUTO_RULE: tuple[FormatRule, ...] = (
    FormatRule(0, "tt", "auto", (1e-2,),
               "below about 3.5 KB low-bit FacT-TT was factnet's best on the wide backbone (1 bit: 72-75% test at 2-4 "
               "KB files)"),
    FormatRule(3_536, "vera", 1, (1e-2, 0.1),
               "from vera r192 at 1 bit (a 3,536-byte file) factnet's vera led on the wide backbone (80.0% test at "
               "4.0 KB against 1-bit FacT-TT r16's 73.5 at 3.5 KB)"),
    FormatRule(6_416, "vera", 2, (3e-2, 0.1),
               "from vera r192 at 2 bits (a 6,416-byte file) factnet's vera led the wide backbone's bytes frontier "
               "(88.3 ± 1.0% test at 7.0 KB, r512 89.8 ± 2.8 at 11.2 KB, r1024 89.2 at 19.5 KB); above r4096's "
               "64,976-byte file (89.2) more rank bought nothing, so a larger budget spends that much",
               max_bytes=64_976),
)


@dataclass(frozen=True)
class AutoChoice:
    """The format a byte budget picked (`choose_format`), its rank and bits (`choice`), and why (`rule`)."""

    format: str
    choice: Choice
    rule: FormatRule

    def __str__(self) -> str:
        bits = "full precision" if self.choice.bits is None else f"{self.choice.bits} bit{'s' * (self.choice.bits > 1)}"
        size = f"{self.choice.bytes:,} bytes of factors" if self.choice.file is None else (
            f"a {self.choice.file:,}-byte file ({self.choice.bytes:,} bytes of factors)")
        return (f"{self.format} rank {self.choice.rank}, {bits}: {self.choice.params:,} parameters in {size}; train "
                f"it at {self.learning_rate}; {self.rule.measured}")

    @property
    def learning_rate(self) -> str:
        """How to train it: ``"lr 0.01 (AdamW)"``, or the measured rates to choose among on validation data."""
        lrs = sorted(self.rule.lrs)
        if len(lrs) == 1:
            return f"lr {lrs[0]:g} (AdamW)"
        return (f"lr {' or '.join(f'{lr:g}' for lr in lrs)} (AdamW; the best differed by model, so choose on "
                "validation data)")


def choose_format(shapes: list[tuple[int, int, int]], budget: Budget, itemsize: int, bits: int | None = None,
                  choose_bits: bool = True,
                  file_bytes: Callable[[str], Callable[[Choice], int]] | None = None) -> AutoChoice:
    """The format `AUTO_RULE` names for a byte ``budget``, with the rank (and, with ``choose_bits``, the bits; else
    at ``bits``) `choose` picks for it; where that format fits no rank, the rule's line below it, and so on.
    ``file_bytes(format)``: a choice's file bytes in that format (the budget then holds the whole file)."""
    if not budget.in_bytes:
        raise FactnetError(f"a budget in parameters ({budget}) does not pick a format: name one "
                           "(decompose('tt', budget=...)), or give the budget in bytes ('16KB') for factnet to pick")
    lines = [rule for rule in AUTO_RULE if rule.min_bytes <= budget.amount] or [AUTO_RULE[0]]
    for rule in reversed(lines):
        auto = choose_bits and rule.bits == "auto"
        width = bits if not choose_bits else None if auto else rule.bits
        spent = budget if rule.max_bytes is None else Budget(min(budget.amount, rule.max_bytes), True)
        measure = None if file_bytes is None else file_bytes(rule.format)
        try:
            return AutoChoice(rule.format, choose(rule.format, shapes, spent, width, itemsize, auto, measure), rule)
        except FactnetError:
            continue
    # nothing fits: the smallest line's error says what its rank 1 needs
    first = AUTO_RULE[0].format
    choose(first, shapes, budget, bits, itemsize, choose_bits, None if file_bytes is None else file_bytes(first))
    raise AssertionError("unreachable: choose raised for every rule line")
