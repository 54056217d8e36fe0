"""`factnet.report`: `Adapter.plan_report`, the contractions an adapter runs and what they cost."""

from __future__ import annotations

import pytest

import factnet

FORMATS = factnet.available_formats()


@pytest.mark.parametrize("fmt", FORMATS)
def test_plan_report_names_the_equation_and_groups(fmt, vit):
    rank = min(2, factnet.get_format(fmt, 1).max_rank(24, 48, 48))
    adapter = factnet.Tensorizer(vit).group("stage").decompose(fmt, rank=rank, scale=3.0)
    report = adapter.plan_report()
    assert isinstance(report, str)
    assert adapter.format.equation in report
    assert fmt in report
    for group in ("blocks.0", "blocks.1"):
        assert group in report
