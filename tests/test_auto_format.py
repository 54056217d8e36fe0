"""A byte budget with no format: `decompose(budget="16KB")` picks format, rank and bits (`factnet.budget.AUTO_RULE`)."""

from __future__ import annotations

import os

import pytest

import factnet
from conftest import assert_refused, tiny_vit
from factnet.budget import AUTO_RULE, read_budget
from factnet.errors import FactnetError

pytestmark = pytest.mark.usefixtures("one_thread")


def _data_bytes(path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    return os.path.getsize(path) - 8 - header


def _expected(tensorizer: factnet.Tensorizer, budget: str, config: factnet.AdapterConfig):
    """The rule read by hand: the last line starting at or below the budget whose format fits some rank at its
    bits (within its ``max_bytes``), and that choice (its file measured with ``config``'s settings)."""
    amount = read_budget(budget).amount
    for rule in sorted(AUTO_RULE, key=lambda r: r.min_bytes, reverse=True):
        if rule.min_bytes <= amount:
            spent = amount if rule.max_bytes is None else min(amount, rule.max_bytes)
            try:
                return rule, tensorizer.budget_choice(rule.format, f"{spent}B", rule.bits, config)
            except FactnetError:
                continue
    raise AssertionError("no line fits")


@pytest.mark.parametrize("budget", ["2KB", "4KB", "8KB", "32KB", "128KB", "1MB"])
@pytest.mark.parametrize("spelled", [None, "auto"])
def test_a_byte_budget_picks_format_rank_and_bits_and_the_file_has_those_bytes(budget, spelled, tmp_path):
    tensorizer = factnet.Tensorizer(tiny_vit())
    rule, choice = _expected(tensorizer, budget, factnet.AdapterConfig(budget=budget, seed=0))  # the same format
    # named, at the line's bits: the same rank
    expected = rule.format
    adapter = tensorizer.decompose(spelled, budget=budget, seed=0)
    assert adapter.format.name == expected and (adapter.format.rank, adapter.settings.bits) == (choice.rank, choice.bits)
    assert adapter.picked.format == expected and adapter.picked.choice == choice and adapter.picked.rule == rule
    rates = " or ".join(f"{lr:g}" for lr in sorted(rule.lrs))
    assert f"train it at lr {rates} (AdamW" in repr(adapter)
    assert adapter.num_parameters() == choice.params
    saved = adapter.save(tmp_path / "a.safetensors", include_head=False)
    assert saved.bytes == choice.file <= read_budget(budget).amount  # the whole file
    assert _data_bytes(saved.path) == choice.bytes  # of it, the factors
    if adapter.picked.rule.max_bytes is not None:  # more bytes than the rule found useful are not spent
        assert choice.file <= adapter.picked.rule.max_bytes
    text = repr(adapter)
    assert f"picked by the budget: {expected} rank {choice.rank}" in text
    assert adapter.picked.rule.measured in text  # says why
    loaded = factnet.load(tiny_vit(), saved.path)
    assert loaded.format.name == expected and loaded.format.rank == choice.rank


def test_the_rule_is_ordered_and_names_formats():
    assert AUTO_RULE[0].min_bytes == 0
    assert [r.min_bytes for r in AUTO_RULE] == sorted({r.min_bytes for r in AUTO_RULE})
    assert all(r.format in factnet.available_formats() and r.measured and r.lrs and min(r.lrs) > 0 for r in AUTO_RULE)
    assert all(r.bits in ("auto", None, 1, 2, 4, 8) for r in AUTO_RULE)


def test_bad_budgets_and_arguments_are_clear_errors():
    model = tiny_vit()
    tensorizer = factnet.Tensorizer(model)
    assert_refused(model, "in bytes", lambda: tensorizer.decompose(budget=10_000))  # parameters: no format to pick
    # nothing fits: rank 1 of the smallest line says what it needs
    assert_refused(model, "no rank", lambda: tensorizer.decompose(budget="10B"))
    assert_refused(model, "needs a format", tensorizer.decompose)
    assert_refused(model, "needs a format", lambda: tensorizer.decompose("auto", rank=4))
    assert_refused(model, "cannot read budget", lambda: tensorizer.decompose(budget="lots"))
    assert not hasattr(model, "factnet") or not model.factnet.names()
