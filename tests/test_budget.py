"""Budget as input: the largest rank whose exact count fits, for every registered format."""

from __future__ import annotations

import pytest
import torch

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
    limit = max(max(s) for s in tz.group_shapes().values())  # no capped rank size can pass it
    while factnet.get_format(name, 1).diagonal_letters and _count(tz, name, limit + 1) <= budget:
        limit += 1  # a diagonal letter can: every rank that fits
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


def _file_factor_bytes(path) -> int:
    """Bytes of the factor tensors in a file saved without the head (codes, scales and offsets, or dense
    values): the file less its header."""
    import os
    import struct

    with open(path, "rb") as handle:
        (header,) = struct.unpack("<Q", handle.read(8))
    return os.path.getsize(path) - 8 - header


@pytest.mark.parametrize("name", ["tt", "tucker", "cp", "vera", "tt-seeded"])
@pytest.mark.parametrize("bits", [1, 4, None])
def test_a_byte_budget_holds_the_whole_file_saved_without_the_head(name, bits, tmp_path):
    import os
    import warnings

    tz = factnet.Tensorizer(tiny_vit())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank caps
        adapter = tz.decompose(name, budget="6KB", bits=bits, seed=0)
        saved = adapter.save(tmp_path / "a.safetensors", include_head=False)
        choice = tz.budget_choice(name, "6KB", bits, factnet.AdapterConfig(name, budget="6KB", bits=bits, seed=0))
        assert (adapter.format.rank, adapter.settings.bits) == (choice.rank, bits)
        assert saved.bytes == os.path.getsize(saved.path) == choice.file <= 6000  # the whole file
        assert _file_factor_bytes(saved.path) == choice.bytes < choice.file  # of it, the factors as counted
        larger = [r for r in range(choice.rank + 1, 49) if tz.num_parameters(name, r) > choice.params]
        if larger:  # the next rank that trains more parameters no longer fits, in its own file
            bigger = factnet.Tensorizer(tiny_vit()).decompose(name, rank=larger[0], bits=bits, seed=0)
            assert bigger.save(tmp_path / "b.safetensors", include_head=False).bytes > 6000


def test_a_byte_budget_below_the_smallest_file_says_what_the_file_needs(tmp_path):
    tz = factnet.Tensorizer(tiny_vit())
    smallest = factnet.Tensorizer(tiny_vit()).decompose("tt", rank=1, bits=1, budget=None)
    size = smallest.save(tmp_path / "a.safetensors", include_head=False).bytes
    factors = _file_factor_bytes(tmp_path / "a.safetensors")
    with pytest.raises(FactnetError, match=rf"rank 1 needs a {size:,}-byte file \({factors:,} bytes of factors, the "
                                           r"rest its header and spec\) at 1 bit"):
        tz.budget_choice("tt", f"{size - 1}B", bits=1)
    assert tz.budget_choice("tt", f"{size}B", bits=1).file == size


@pytest.mark.parametrize("name", ["tt", "tucker", "cp"])
@pytest.mark.parametrize("budget", ["1KB", "3KB", "20KB", "1MB"])
def test_a_byte_budget_without_bits_takes_2_bits_or_more_where_they_cost_no_rank(name, budget):
    from factnet.budget import PREFERRED_BITS

    tz = factnet.Tensorizer(tiny_vit())
    widths = {}
    for bits in (1, 2, 4, 8, None):  # each width alone, through rank_for_budget
        try:
            widths[bits] = tz.num_parameters(name, tz.rank_for_budget(name, budget, bits=bits))
        except FactnetError:
            continue
    chosen = tz.budget_choice(name, budget)
    order = [1, 2, 4, 8, None]
    if PREFERRED_BITS in widths:  # the widest width that trains as many parameters as 2 bits
        expected = max((b for b in widths if widths[b] >= widths[PREFERRED_BITS]), key=order.index)
    else:
        expected = max(widths, key=lambda b: (widths[b], order.index(b)))
    assert chosen.bits == expected and chosen.params == widths[expected]
    if budget == "1MB":  # every rank capped at every width: nothing to gain from fewer bits
        assert chosen.bits is None
    assert tz.budget_choice(name, 12_000).bits is None  # a budget in parameters keeps the dtype


def test_a_weightless_model_has_the_same_file_sizes_and_refuses_to_save(tmp_path):
    with torch.device("meta"):
        meta = tiny_vit()
    for format, budget in (("tt", "2KB"), ("vera", "6KB"), ("tucker", "20KB")):  # a file's size needs no values
        assert factnet.Tensorizer(meta).budget_choice(format, budget) == factnet.Tensorizer(tiny_vit()).budget_choice(
            format, budget)
    adapter = factnet.Tensorizer(meta).decompose("tt", rank=2)
    with pytest.raises(FactnetError, match="on the meta device .* nothing to save"):
        adapter.save(tmp_path / "a.safetensors")
