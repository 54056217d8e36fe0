"""Export to a PEFT LoRA adapter: PEFT itself loads the directory onto the base model and gives factnet's
outputs; the written ``B @ A`` is factnet's ``s·ΔW`` (exact) or its best truncation (SVD, error as reported)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import factnet
from conftest import (
    TinyGPT2,
    TinyNet,
    assert_same_model,
    max_rel_error,
    randomize_factors,
    snapshot,
    tiny_convnext,
    tiny_torchvision_vit,
    tiny_transformer_encoder,
    tiny_vit,
)

peft = pytest.importorskip("peft")
PREFIX = "base_model.model."


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers ---------------------------------------------------------------------------------------
def train_steps(model: nn.Module, adapter: factnet.Adapter, x: torch.Tensor, steps: int = 3) -> None:
    """A few AdamW steps on a made-up loss: every factor (the zero one too) and the head move."""
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        (out.square().mean() + out.mean()).backward()
        optimizer.step()
    model.eval()


def perturb_head(adapter: factnet.Adapter, seed: int = 0) -> None:
    factors = {id(p) for p in adapter.parameters()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            if id(param) not in factors:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def peft_model(base: nn.Module, directory) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def written(directory) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(adapter_config.json, {PEFT module: (A, B)})`` read back from the directory."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(str(directory / "adapter_model.safetensors"))
    lora = {key[len(PREFIX):-len(".lora_A.weight")]: (value, tensors[key.replace("lora_A", "lora_B")])
            for key, value in tensors.items() if key.endswith(".lora_A.weight")}
    return config, lora


def as_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B @ A`` in float64, Conv2d LoRA factors flattened."""
    return b.flatten(1).double() @ a.flatten(1).double()


def check_against_peft(base: nn.Module, model: nn.Module, adapter: factnet.Adapter, x: torch.Tensor, directory,
                       tol: float = 1e-5) -> None:
    """PEFT's model on ``base`` gives factnet's outputs; the written ``B @ A`` is ``s·ΔW`` of each matrix."""
    expected = outputs(model, x)
    assert max_rel_error(outputs(base.eval(), x), expected) > 1e-3  # the adapter does change the outputs
    assert max_rel_error(outputs(peft_model(base, directory), x), expected) <= tol
    _, lora = written(directory)
    for name in adapter.matrices:
        delta = adapter.delta_weight(name).double()
        assert max_rel_error(as_matrix(*lora[name]), delta) <= 1e-6 * max(1.0, delta.abs().max().item()), name


# ---- exact export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tt", "tucker", "batch-matrix", "cp"])
def test_exact_export_on_a_vit_with_fused_qkv_and_sliced_mlp(tmp_path, fmt):
    torch.manual_seed(0)
    base = tiny_vit().eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose(fmt, rank=3, scale=4.0)
    x = torch.randn(2, 3, 32, 32)
    train_steps(model, adapter, x)
    report = factnet.export_lora(adapter, tmp_path / "lora")
    check_against_peft(base, model, adapter, x, tmp_path / "lora")

    config, lora = written(tmp_path / "lora")
    assert report.exact and report.relative_error == 0.0 and report.head == ("head",)
    assert config["modules_to_save"] == ["head"] and config["peft_type"] == "LORA"
    assert sorted(lora) == sorted(adapter.matrices)  # qkv, proj, fc1, fc2 of each block, nothing else
    # each module at its own rank, which PEFT built: a factnet rank-r increment is LoRA rank <= 4r
    ranks = {m.name: m.rank for m in report.matrices}
    assert ranks == {name: a.shape[0] for name, (a, _) in lora.items()}
    assert all(rank <= 4 * 3 for rank in ranks.values())
    if fmt == "batch-matrix":  # one rank-3 term per slice: qkv 9, proj 3, fc1 and fc2 12
        assert ranks["blocks.0.attn.qkv"] == 9 and ranks["blocks.0.attn.proj"] == 3
        assert ranks["blocks.0.mlp.fc1"] == ranks["blocks.0.mlp.fc2"] == 12
    assert report.num_parameters == sum(a.numel() + b.numel() for a, b in lora.values())


def test_several_groups_on_one_matrix_and_a_partial_qkv(tmp_path):
    """q and v of each qkv in two groups (k not adapted): one LoRA per matrix, the groups' ranks stacked."""
    torch.manual_seed(0)
    base = tiny_vit().eval()
    model = copy.deepcopy(base)
    adapter = (factnet.Tensorizer(model, ["blocks.*.attn.qkv[q,v]", "blocks.*.mlp.fc2[1]"])
               .group({"q": "*.qkv[q]", "v": ["*.qkv[v]", "*.fc2[1]"]}).decompose("tt", rank=2, scale=3.0))
    randomize_factors(adapter, std=0.3)
    perturb_head(adapter)
    x = torch.randn(2, 3, 32, 32)
    report = factnet.export_lora(adapter, tmp_path / "lora")
    check_against_peft(base, model, adapter, x, tmp_path / "lora")
    assert {m.name: m.rank for m in report.matrices if m.name.endswith("qkv")} == {
        "blocks.0.attn.qkv": 4, "blocks.1.attn.qkv": 4}


def test_conv1x1_export(tmp_path):
    torch.manual_seed(0)
    base = tiny_convnext(conv_mlp=True).eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tucker", rank=2, scale=2.0)
    randomize_factors(adapter, std=0.3)
    perturb_head(adapter)
    report = factnet.export_lora(adapter, tmp_path / "lora")
    assert {m.kind for m in report.matrices} == {"conv1x1"}
    _, lora = written(tmp_path / "lora")
    assert all(a.dim() == 4 and a.shape[2:] == (1, 1) for a, _ in lora.values())
    check_against_peft(base, model, adapter, torch.randn(2, 3, 32, 32), tmp_path / "lora")


def test_gpt2_conv1d_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2, scale=4.0)
    assert {m.kind for m in adapter.matrices.values()} == {"conv1d"}
    tokens = torch.randint(0, 50, (2, 9))
    train_steps(model, adapter, tokens)
    factnet.export_lora(adapter, tmp_path / "lora", include_head=False)  # lm_head is tied to the embedding
    check_against_peft(base, model, adapter, tokens, tmp_path / "lora")
    config_written, _ = written(tmp_path / "lora")
    assert config_written["fan_in_fan_out"] is True and config_written["modules_to_save"] is None


def test_multihead_attention_in_proj_export(tmp_path):
    torch.manual_seed(0)
    base = tiny_torchvision_vit().eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model, ["*.self_attention", "*.mlp.0", "*.mlp.3"]).decompose("tt", rank=2)
    randomize_factors(adapter, std=0.3)
    perturb_head(adapter)  # torchvision zero-initializes the head
    report = factnet.export_lora(adapter, tmp_path / "lora")
    check_against_peft(base, model, adapter, torch.randn(2, 3, 32, 32), tmp_path / "lora")
    assert {m.kind for m in report.matrices} == {"mha-in", "linear"}
    tensors = safetensors.torch.load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    out_proj = [v for k, v in tensors.items() if ".base_layer.out_proj.lora_" in k]
    assert len(out_proj) == 4 and all(not v.any() for v in out_proj)  # PEFT's out_proj LoRA, zero


def test_an_inactive_adapter_exports_its_own_head(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit().eval()
    model = copy.deepcopy(base)
    first = factnet.Tensorizer(model, ["*.qkv", "*.fc1"]).decompose("tt", rank=2, scale=2.0, name="first")
    randomize_factors(first, std=0.3)
    perturb_head(first, seed=1)
    second = factnet.Tensorizer(model).decompose("tucker", rank=2, name="second")
    randomize_factors(second, std=0.3)
    perturb_head(second, seed=2)
    assert second.active
    factnet.export_lora(first, tmp_path / "first")
    first.activate()
    check_against_peft(base, model, first, torch.randn(2, 3, 32, 32), tmp_path / "first")


def test_merged_adapter_exports_the_same_files(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit().eval()
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    randomize_factors(adapter, std=0.3)
    factnet.export_lora(adapter, tmp_path / "unmerged")
    adapter.merge()
    before = snapshot(model)
    factnet.export_lora(adapter, tmp_path / "merged")
    assert_same_model(model, before)  # export only reads
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "unmerged" / name).read_bytes()


# ---- truncated export (SVD) ---------------------------------------------------------------------------------
def test_tensor_ring_truncated_by_svd_reports_the_true_error(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit().eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tensor-ring", rank=3, scale=2.0)  # LoRA rank 9 per block
    randomize_factors(adapter, std=0.3)
    report = factnet.export_lora(adapter, tmp_path / "lora", max_rank=4, include_head=False)
    _, lora = written(tmp_path / "lora")
    assert not report.exact and {m.method for m in report.matrices} == {"svd"}
    squared_error = squared_norm = 0.0
    for entry in report.matrices:
        delta = adapter.delta_weight(entry.name).double()
        a, b = lora[entry.name]
        assert a.shape[0] == b.shape[1] == entry.rank == 4
        error = (torch.linalg.matrix_norm(delta - as_matrix(a, b)) / torch.linalg.matrix_norm(delta)).item()
        sigma = torch.linalg.svdvals(delta)  # Eckart–Young: the best rank-4 error
        best = (sigma[4:].square().sum().sqrt() / sigma.square().sum().sqrt()).item()
        assert error > 1e-3
        assert math.isclose(entry.relative_error, error, rel_tol=1e-5)
        assert math.isclose(error, best, rel_tol=1e-5)
        squared_error += error**2 * torch.linalg.matrix_norm(delta).item() ** 2
        squared_norm += torch.linalg.matrix_norm(delta).item() ** 2
    assert math.isclose(report.relative_error, math.sqrt(squared_error / squared_norm), rel_tol=1e-9)
    # PEFT runs what was written: the base model with W + B A
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, (a, b) in lora.items():
            merged.get_submodule(name).weight.add_(as_matrix(a, b).float())
    x = torch.randn(2, 3, 32, 32)
    assert max_rel_error(outputs(peft_model(base, tmp_path / "lora"), x), outputs(merged, x)) <= 1e-5


def test_tensor_ring_at_a_rank_above_the_matrix_is_exported_at_full_rank(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit(embed_dim=24, num_heads=2).eval()
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tensor-ring", rank=5)  # r² = 25 > 24
    randomize_factors(adapter, std=0.3)
    perturb_head(adapter)
    report = factnet.export_lora(adapter, tmp_path / "lora")
    assert {m.method for m in report.matrices} == {"svd"} and {m.rank for m in report.matrices} == {24}
    assert report.relative_error < 1e-6
    check_against_peft(base, model, adapter, torch.randn(2, 3, 32, 32), tmp_path / "lora")


# ---- refusals -------------------------------------------------------------------------------------------------
def refused(model: nn.Module, match: str, call) -> None:
    before = snapshot(model)
    with pytest.raises(factnet.FactnetError, match=match):
        call()
    assert_same_model(model, before)


def test_existing_directory_and_overwrite(tmp_path):
    model = TinyNet(d=4)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    randomize_factors(adapter)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "notes.txt").write_text("keep me")
    refused(model, "exists and is not empty", lambda: factnet.export_lora(adapter, tmp_path / "lora"))
    assert [p.name for p in (tmp_path / "lora").iterdir()] == ["notes.txt"]
    factnet.export_lora(adapter, tmp_path / "lora", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    (tmp_path / "file").write_text("x")
    refused(model, "is not a directory", lambda: factnet.export_lora(adapter, tmp_path / "file"))
    refused(model, "max_rank must be a positive integer", lambda: factnet.export_lora(adapter, tmp_path / "a",
                                                                                      max_rank=0))
    assert not (tmp_path / "a").exists()


def test_out_proj_of_multihead_attention_is_refused(tmp_path):
    model = tiny_torchvision_vit()
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    refused(model, r"out_proj of an nn.MultiheadAttention.*peft#3774",
            lambda: factnet.export_lora(adapter, tmp_path / "lora"))
    assert not (tmp_path / "lora").exists()


def test_fused_transformer_layers_need_consent(tmp_path):
    model = tiny_transformer_encoder()
    adapter = factnet.Tensorizer(model, ["*.linear1", "*.linear2"]).decompose("tt", rank=2)
    refused(model, "inside an nn.TransformerEncoderLayer", lambda: factnet.export_lora(adapter, tmp_path / "lora"))
    factnet.export_lora(adapter, tmp_path / "lora", allow_fused_layers=True)


def test_unsupported_conv1d_class_and_detached_adapter(tmp_path):
    model = TinyGPT2()
    adapter = factnet.Tensorizer(model).decompose("tt", rank=2)
    refused(model, "only transformers.pytorch_utils.Conv1D", lambda: factnet.export_lora(adapter, tmp_path / "l"))
    adapter.detach()
    refused(model, "detached", lambda: factnet.export_lora(adapter, tmp_path / "l"))
    assert not (tmp_path / "l").exists()
