"""Seeded factors (`Format.seeded`): frozen, regenerated from the spec's seed, never trained or stored.

factnet-VeRA equals PEFT's VeRA; the hybrid TT with seeded ``u``, ``v`` trains ``n·r²`` parameters; seeded
formats keep files, low-bit files, merge, mixed batches and export working."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import peft
import pytest
import safetensors.torch
import torch
from conftest import mixed_against_alone, randomize_factors, tiny_vit
from io_support import rejected, rewrite_spec
from legacy_files import save_legacy
from test_export import check_against_peft

import factnet
from factnet.quant import fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDED = ["vera", "tt-seeded", "cp-seeded"]


def _adapted(fmt: str, name: str = "default", seed: int = 3) -> tuple[torch.nn.Module, torch.nn.Module, factnet.Adapter]:
    torch.manual_seed(0)
    base = tiny_vit().double().eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose(fmt, rank=2, scale=1.5, name=name, seed=seed)
    randomize_factors(adapter, std=0.3, seed=seed)
    return base, model, adapter


def _seeded(adapter: factnet.Adapter) -> dict[str, torch.Tensor]:
    return {f"{g}.{k}": v for g in adapter.group_names for k, v in adapter.group(g).seeded.named_buffers()}


def test_vera_equals_peft_vera():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Linear(12, 20), torch.nn.Linear(20, 12))
    model = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules=["0", "1", "2"]))
    layers = [model.base_model.model[i] for i in range(3)]
    with torch.no_grad():
        for layer in layers:  # PEFT starts b at zero: give every vector values
            layer.vera_lambda_b["default"].normal_()
            layer.vera_lambda_d["default"].normal_()
    fmt, x = factnet.get_format("vera", 4), torch.randn(5, 12)
    for group in ([0, 1], [2]):  # the two 12→20 layers share A, B as one group's slices; d_in differs for the third
        first = layers[group[0]]
        d_in, d_out = first.in_features, first.out_features
        factors = {"A": first.vera_A["default"][:, :d_in].t(), "B": first.vera_B["default"][:d_out],
                   "b": torch.stack([layers[i].vera_lambda_b["default"] for i in group]),
                   "d": torch.stack([layers[i].vera_lambda_d["default"] for i in group])}
        increment = fmt.reconstruct({k: v.detach() for k, v in factors.items()})
        form = fmt.normal_form({k: v.detach() for k, v in factors.items()})
        for slot, i in enumerate(group):
            inputs = torch.randn(5, d_in) if d_in != 12 else x
            with torch.no_grad():  # PEFT's Δy = b ⊙ (B (d ⊙ (A x)))
                peft_delta = layers[i](inputs) - layers[i].base_layer(inputs)
            assert (inputs @ increment[slot] - peft_delta).abs().max() <= 1e-6
            assert form.core.shape == (len(group), 4)  # VeRA's diagonal core: kept as d, no r x r core
            normal = (form.p_in_t[0].t() * form.core[slot]) @ form.p_out_t[0] * form.out_scale[slot]
            assert (inputs @ normal - peft_delta).abs().max() <= 1e-6


def test_vera_init_as_peft():
    fmt = factnet.get_format("vera", 4)
    values = fmt.seeded_values(3, 64, 32, seed=0)
    assert values["A"].abs().max() <= (6 / 64) ** 0.5 and values["A"].abs().max() > 0.9 * (6 / 64) ** 0.5
    assert values["B"].abs().max() <= (6 / 4) ** 0.5 and values["B"].abs().max() > 0.9 * (6 / 4) ** 0.5
    factors = {k: torch.empty(s) for k, s in fmt.shapes(3, 64, 32).items()}
    fmt.initialize(factors)
    assert torch.equal(factors["d"], torch.full((3, 4), 0.1)) and torch.equal(factors["b"], torch.zeros(3, 32))


@pytest.mark.parametrize("fmt", SEEDED)
def test_seeded_factors_are_not_trained_counted_or_stored(fmt, tmp_path):
    _, model, adapter = _adapted(fmt)
    trained = {"vera": ("b", "d"), "tt-seeded": ("sigma",), "cp-seeded": ("d",)}[fmt]
    for g in adapter.group_names:
        group = adapter.group(g)
        assert tuple(group.factors) == trained and all(p.requires_grad for p in group.factors.values())
        assert all(not b.requires_grad for b in group.seeded.buffers())
    assert not any(k.split(".")[-1] in ("A", "B", "u", "v") for k in adapter.state_dict())
    shapes = adapter.group_shapes().values()
    formula = {"vera": lambda n, d_in, d_out: n * (d_out + 2), "tt-seeded": lambda n, d_in, d_out: n * 2 * 2,
               "cp-seeded": lambda n, d_in, d_out: n * 2}[fmt]
    assert adapter.num_parameters() == sum(formula(*s) for s in shapes)
    saved = adapter.save(tmp_path / "a.safetensors", include_head=False)
    stored = safetensors.torch.load_file(str(saved.path))
    assert sum(t.numel() for t in stored.values()) == adapter.num_parameters()


def test_tt_seeded_counts_n_r_squared():
    fmt = factnet.get_format("tt-seeded", 8)
    for n, d_in, d_out in [(12, 768, 768), (3, 40, 50)]:
        assert fmt.num_parameters(n, d_in, d_out) == n * 8 * 8
    assert fmt.num_parameters(5, 4, 100) == 5 * 4 * 8  # a capped at d_in = 4 (as FacT-TT's)


@pytest.mark.parametrize("fmt", SEEDED)
def test_seeded_factors_regenerate_bit_for_bit_in_a_fresh_process(fmt, tmp_path):
    base, model, adapter = _adapted(fmt, seed=7)
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    assert factnet.file.info.load_spec(path)["seed"] == 7
    script = (f"import sys, torch; sys.path.insert(0, {os.path.dirname(__file__)!r}); from conftest import tiny_vit; "
              "import factnet; torch.manual_seed(0); m = tiny_vit().double().eval(); "
              f"a = factnet.load(m, {str(path)!r}); "
              "torch.save({f'{g}.{k}': v for g in a.group_names for k, v in a.group(g).seeded.named_buffers()}, "
              f"{str(tmp_path / 'seeded.pt')!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    regenerated, here = torch.load(tmp_path / "seeded.pt"), _seeded(adapter)
    assert regenerated.keys() == here.keys() and all(torch.equal(regenerated[k], here[k]) for k in here)
    other = factnet.Tensorizer(copy.deepcopy(base)).decompose(fmt, rank=2, seed=8)
    assert not any(torch.equal(v, _seeded(other)[k]) for k, v in here.items())  # the seed matters


@pytest.mark.parametrize("fmt", SEEDED)
def test_seeded_factor_given_values_is_an_error(fmt, tmp_path):
    base, _, adapter = _adapted(fmt)
    name = factnet.get_format(fmt, 2).seeded[0]
    group = adapter.group_names[0]
    with pytest.raises(factnet.FactnetError, match="seeded"):
        adapter.group(group).assign({name: _seeded(adapter)[f"{group}.{name}"]})
    path = tmp_path / "a.safetensors"
    save_legacy(adapter, path)  # version 2: one tensor per factor
    shape = adapter.group(group).seeded.get_buffer(name).shape
    tensors = safetensors.torch.load_file(str(path)) | {f"factors.{group}.{name}": torch.zeros(shape, dtype=torch.float64)}
    safetensors.torch.save_file(tensors, str(path), metadata=safetensors.safe_open(str(path), "pt").metadata())
    rewrite_spec(path, lambda spec: spec)  # a matching checksum: the file is crafted, not damaged
    rejected(copy.deepcopy(base), path, "seeded factors")
    adapter.save(path)  # version 4: the seeded values appended to the pack are values no factor takes
    seeded = torch.zeros(shape, dtype=torch.float64).reshape(-1)
    rewrite_spec(path, lambda spec: spec, edit_tensors=lambda t: t.update(float64=torch.cat([t["float64"], seeded])))
    rejected(copy.deepcopy(base), path, "float64: needs .*, holds")


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("fmt", SEEDED)
def test_low_bit_files_with_seeded_factors(fmt, bits, tmp_path):
    base, model, adapter = _adapted(fmt)
    path = tmp_path / "a.safetensors"
    adapter.save(path, bits=bits, group=16)
    loaded = factnet.load(copy.deepcopy(base), path)
    packs = safetensors.torch.load_file(str(path))  # the trained factors only: no seeded values stored
    trained = [t.numel() for g in adapter.group_names for t in adapter.group(g).trained_values().values()]
    assert {k: v.numel() for k, v in packs.items()} == {
        "uint8": sum(-(-n * bits // 8) for n in trained), "float16": sum((1 if bits == 1 else 2) * -(-n // 16)
                                                                        for n in trained),
        "float64": adapter.num_head_parameters()}  # (the head, as held)
    for g in adapter.group_names:
        assert all(torch.equal(v, _seeded(adapter)[f"{g}.{k}"]) for k, v in loaded.group(g).seeded.named_buffers())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for g in adapter.group_names:  # the file's values: what `fake_quantize` gives
            adapter.group(g).assign({k: fake_quantize(v, bits, 16) for k, v in adapter.group(g).trained_values().items()})
        expected = model(x)
        assert (loaded.model(x) - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("fmt", SEEDED)
def test_merge_mixed_batches_and_export_with_seeded_factors(fmt, tmp_path):
    base, model, adapter = _adapted(fmt, name="a", seed=1)
    other = factnet.Tensorizer(model).decompose(fmt, rank=2, scale=1.5, name="b", seed=2)
    randomize_factors(other, std=0.3, seed=2)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    mixed, expected = mixed_against_alone(model, x, ["a", "b", "b", "a"])
    assert (mixed - expected).abs().max() <= 1e-10
    with torch.no_grad():
        model.factnet.activate("a")
        alone = model(x)
        adapter.merge()
        assert (model(x) - alone).abs().max() <= 1e-10
        adapter.unmerge()
    other.detach()
    model.factnet.activate("a")
    factnet.export_lora(adapter, tmp_path / "lora")
    check_against_peft(base, model, adapter, x[:2], tmp_path / "lora")
