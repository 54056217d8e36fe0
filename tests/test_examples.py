"""The example scripts, run on tiny generated checkpoints: the numbers they report are checked
against increments built here by hand (not by factnet)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import factnet
from conftest import randomize_factors

timm = pytest.importorskip("timm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL = "vit_tiny_patch16_224"
KWARGS = dict(num_classes=5, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
D, L = 48, 2  # 12·L = 24 slices of 48x48


def script(name: str):
    """Import ``examples/<name>.py`` as a module (its ``main(argv)`` returns what it printed)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model(MODEL, pretrained=False, **KWARGS).eval()


def model_args(*rest: str) -> list[str]:
    return ["--model", MODEL, "--model-kwargs", json.dumps(KWARGS), *rest]


def add_tt_increment(model, rank: int, seed: int) -> None:
    """Add an exactly TT-rank-``rank`` increment to every d x d block of the paper's targets, by hand:
    ``ΔW_i = U Σ_i Vᵀ`` (``d_in x d_out``); qkv and fc1 cut by rows, fc2 by columns, proj whole."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(D, rank, generator=generator) / D**0.5
    v = torch.randn(D, rank, generator=generator) / D**0.5
    with torch.no_grad():
        for block in model.blocks:
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                weight = linear.weight  # (d_out, d_in)
                rows, cols = weight.shape[0] // D, weight.shape[1] // D
                for b in range(max(rows, cols)):
                    sigma = torch.randn(rank, rank, generator=generator)
                    delta = (u @ sigma @ v.T).T  # (d_out, d_in) of this block
                    if rows > 1:
                        weight[b * D:(b + 1) * D, :] += delta
                    else:
                        weight[:, b * D:(b + 1) * D] += delta


@pytest.fixture
def checkpoints(tmp_path):
    """base.pt (torch.save) and finetuned.safetensors: rank-4 TT increment, a new head and one changed bias."""
    base = tiny()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    finetuned = copy.deepcopy(base)
    add_tt_increment(finetuned, rank=4, seed=1)
    with torch.no_grad():
        finetuned.head.weight.normal_(generator=torch.Generator().manual_seed(2))
        finetuned.blocks[0].norm1.bias.add_(0.5)
    save_file({k: v.contiguous() for k, v in finetuned.state_dict().items()}, tmp_path / "finetuned.safetensors")
    return base, finetuned, tmp_path


def test_compress_exact_rank_increment_round_trips(checkpoints):
    base, finetuned, tmp = checkpoints
    result = script("compress_checkpoint").main(model_args(
        "--base", str(tmp / "base.pt"), "--finetuned", str(tmp / "finetuned.safetensors"),
        "--format", "tt", "--rank", "4", "--out", str(tmp / "task.factnet"), "--rest", str(tmp / "rest.safetensors")))
    assert list(result["errors"]) == ["48x48"]
    assert result["errors"]["48x48"] < 1e-5
    assert result["parameters"] == 2 * D * 4 + 12 * L * 4**2  # 2dr + 12L r²
    assert result["dense_parameters"] == 12 * L * D * D
    assert 4 * result["parameters"] < result["bytes"] < 4 * result["parameters"] + 16_384
    assert result["rest"] == ["blocks.0.norm1.bias", "head.weight"]
    # rebuilt from the files on a fresh base, the model computes what the fine-tuned one does
    model = tiny()
    model.load_state_dict(load_file(tmp / "rest.safetensors"), strict=False)
    factnet.load(model, tmp / "task.factnet")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        error = (model(x) - finetuned(x)).abs().max().item()
        assert (base(x) - finetuned(x)).abs().max().item() > 1e-2  # the check can fail
    assert error < 1e-4  # float32 rounding: 1e-5 was exceeded (1.0014e-5) with ATEN_CPU_CAPABILITY=default


def test_compress_sweep_finds_the_rank(checkpoints):
    _, _, tmp = checkpoints
    result = script("compress_checkpoint").main(model_args(
        "--base", str(tmp / "base.pt"), "--finetuned", str(tmp / "finetuned.safetensors"),
        "--format", "tt", "--sweep", "2,4,8"))
    rows = {row["rank"]: row for row in result["sweep"]}
    assert {r: row["parameters"] for r, row in rows.items()} == {r: 2 * D * r + 12 * L * r * r for r in (2, 4, 8)}
    assert rows[2]["errors"]["48x48"] > 0.1  # a generic TT-rank-4 tensor has no rank-2 TT
    assert rows[4]["errors"]["48x48"] < 1e-5 and rows[8]["errors"]["48x48"] < 1e-5
    assert "errors" not in result  # no --rank: nothing compressed beyond the sweep


def test_export_of_compressed_adapter_matches_the_finetuned_model(tmp_path):
    """base -> (compress script) -> adapter -> (export script) -> PEFT LoRA == the fine-tuned model."""
    base = tiny()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    finetuned = copy.deepcopy(base)
    add_tt_increment(finetuned, rank=2, seed=5)  # Tucker ranks (4, 2, 2): mode i has rank ≤ 2·2
    torch.save(finetuned.state_dict(), tmp_path / "finetuned.pt")
    script("compress_checkpoint").main(model_args(
        "--base", str(tmp_path / "base.pt"), "--finetuned", str(tmp_path / "finetuned.pt"),
        "--format", "tucker", "--rank", "4", "--out", str(tmp_path / "task.factnet")))
    result = script("export_lora").main(model_args(
        "--base", str(tmp_path / "base.pt"), "--adapter", str(tmp_path / "task.factnet"),
        "--out", str(tmp_path / "lora")))
    assert result["ok"] and result["report"].exact and result["max_difference"] < 1e-5
    assert result["report"].head == ()
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny(), tmp_path / "lora").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (peft_model(x) - finetuned(x)).abs().max().item() < 1e-5


@pytest.mark.slow  # a fresh interpreter importing torch, timm and peft: ~10 s
def test_export_script_with_trained_head_runs_as_a_command(tmp_path):
    """The script as a user runs it: a subprocess, exit status 0, the head exported whole."""
    base = tiny()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).group("stage").decompose("tt", rank=4, scale=10.0)
    randomize_factors(adapter, std=0.05, seed=7)
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    adapter.save(tmp_path / "task.factnet")
    command = [sys.executable, str(EXAMPLES / "export_lora.py"), *model_args(
        "--base", str(tmp_path / "base.pt"), "--adapter", str(tmp_path / "task.factnet"),
        "--out", str(tmp_path / "lora"),
        "--tolerance", "1e-5")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "the head head is saved whole" in run.stdout
    difference = float(run.stdout.split("max |difference| ")[1].split()[0])
    assert difference < 1e-5
    # the export really holds the adapted model: PEFT on a fresh base equals the factnet model
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny(), tmp_path / "lora").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert (peft_model(x) - model.eval()(x)).abs().max().item() < 1e-5
        assert (peft_model(x) - base(x)).abs().max().item() > 1e-2


def test_serve_many_answers_a_mixed_batch_as_the_dense_oracle(tmp_path):
    """Each row of the example's mixed batch equals the dense ``W + s·ΔW`` model of its user (tensorly's
    reconstruction on an unadapted copy, with the user's saved head)."""
    from oracle_support import oracle_forward

    serve = script("serve_many")
    (tmp_path / "users").mkdir()
    serve.write_demo_adapters(tiny(), str(tmp_path / "users"), 3)
    torch.save(tiny().state_dict(), tmp_path / "base.pt")
    result = serve.main(model_args("--base", str(tmp_path / "base.pt"), "--adapters", str(tmp_path / "users"),
                                   "--batch", "5", "--check", "5"))
    assert result["ok"] and result["adapters"] == 3 and result["names"] == [f"user{b % 3:04d}" for b in range(5)]
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for b, name in enumerate(result["names"]):
        holder = tiny()
        adapter = factnet.load(holder, tmp_path / "users" / f"{name}.safetensors")
        base = tiny()
        base.load_state_dict({**base.state_dict(), **adapter.head_state()})
        with torch.no_grad():
            expected = oracle_forward(base, adapter, adapter.settings.scale, x[b: b + 1])[0]
        assert ((result["outputs"][b] - expected).norm() / expected.norm()).item() < 1e-5
