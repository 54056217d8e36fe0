"""Budget as input: the largest rank whose exact count fits, for every registered format."""

from __future__ import annotations

import pytest

import factnet
from conftest import tiny_swin, tiny_vit
from factnet import FactnetError
from factnet.tensorizer import parse_budget


def _count(tensorizer: factnet.Tensorizer, name: str, rank: int) -> int:
    """The format's own formula, group by group (independent of Tensorizer.num_parameters)."""
    fmt = factnet.get_format(name, rank)
    return sum(fmt.num_parameters(*shape) for shape in tensorizer.group_shapes().values())


@pytest.mark.parametrize("name", factnet.available_formats())
@pytest.mark.parametrize("budget", [3_000, 7_777, 40_000])
def test_budget_picks_the_largest_fitting_rank_of_every_format(name, budget):
    tz = factnet.Tensorizer(tiny_swin()).group("stage")
    limit = max(max(s) for s in tz.group_shapes().values())  # no rank size can pass it
    counts = {r: _count(tz, name, r) for r in range(1, limit + 1)}
    fitting = [r for r in counts if counts[r] <= budget]
    if not fitting:
        with pytest.raises(FactnetError, match="no rank"):
            tz.rank_for_budget(name, budget)
        return
    rank = tz.rank_for_budget(name, budget)
    best = max(counts[r] for r in fitting)
    assert rank == min(r for r in fitting if counts[r] == best) and counts[rank] <= budget
    assert all(counts[r] <= best for r in fitting)
    adapter = tz.decompose(name, budget=budget)
    assert adapter.format.rank == rank and adapter.num_parameters() == _count(tz, name, rank) <= budget


def test_budget_units_and_errors():
    assert parse_budget(10_000) == parse_budget("10k") == parse_budget("40KB") == 10_000
    assert parse_budget("40KiB") == 10_240 and parse_budget("1.5M") == 1_500_000 and parse_budget("80KB", 8) == 10_000
    for bad in ("lots", "10 KiX", "-5", 0, 2.5, True, "3Ki"):
        with pytest.raises(FactnetError, match="budget"):
            parse_budget(bad)
    tz = factnet.Tensorizer(tiny_vit())
    with pytest.raises(FactnetError, match="not both"):
        tz.decompose("tt", rank=2, budget=1000)
    with pytest.raises(FactnetError, match="rank 1 needs"):
        tz.decompose("tt", budget=10)
    assert "factnet" not in dict(tz.model.named_children())  # nothing attached by a refused budget


def test_vit_b_at_10k_is_the_paper_fact_tt_rank_4():
    timm = pytest.importorskip("timm")
    tz = factnet.Tensorizer(timm.create_model("vit_base_patch16_224", pretrained=False))
    assert tz.rank_for_budget("tt", "10k") == 4 and tz.num_parameters("tt", 4) == 8_448
