"""The paper's published parameter counts on ViT-B/16 and Swin-B (random init, no download)."""

from __future__ import annotations

import pytest
import torch

import factnet

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def vit_base():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False)


@pytest.fixture(scope="module")
def swin_base():
    torch.manual_seed(0)
    return timm.create_model("swin_base_patch4_window7_224", pretrained=False)


def test_vit_base_groups(vit_base):
    tensorizer = factnet.Tensorizer(vit_base)
    assert tensorizer.group_shapes() == {"768x768": (144, 768, 768)}
    modules = {s.module for s in tensorizer.slices}
    assert all(m.startswith("blocks.") for m in modules)  # never head or patch embedding
    assert len(modules) == 12 * 4
    # the paper's slice order: per block q, k, v, o, fc1[0..3], fc2[0..3]
    first = [s.qualified_name for s in tensorizer.slices[:12]]
    assert first == ["blocks.0.attn.qkv[q]", "blocks.0.attn.qkv[k]", "blocks.0.attn.qkv[v]", "blocks.0.attn.proj",
                     *(f"blocks.0.mlp.fc1[{i}]" for i in range(4)), *(f"blocks.0.mlp.fc2[{i}]" for i in range(4))]


def test_vit_base_tt_rank4(vit_base):
    assert factnet.Tensorizer(vit_base).num_parameters("tt", 4) == 8_448


def test_vit_base_tucker_rank8(vit_base):
    assert factnet.Tensorizer(vit_base).num_parameters("tucker", 8) == 13_952


def test_vit_base_batch_matrix_on_q_v(vit_base):
    tensorizer = factnet.Tensorizer(vit_base, ["blocks.*.attn.qkv[q,v]"])
    assert tensorizer.group_shapes() == {"768x768": (24, 768, 768)}
    assert tensorizer.num_parameters("batch-matrix", 8) == 294_912


def test_vit_base_ablation_targets(vit_base):
    assert factnet.Tensorizer(vit_base, ["blocks.*.attn.*"]).group_shapes() == {"768x768": (48, 768, 768)}
    assert factnet.Tensorizer(vit_base, ["blocks.*.mlp.*"]).group_shapes() == {"768x768": (96, 768, 768)}


@pytest.mark.parametrize("fmt, rank, expected", [("tt", 4, 8_448), ("tucker", 8, 13_952)])
def test_vit_base_decomposed_count_equals_dry_run(vit_base, fmt, rank, expected):
    adapter = factnet.Tensorizer(vit_base).decompose(fmt, rank=rank)
    try:
        assert adapter.num_parameters() == expected
        assert sum(p.numel() for p in adapter.parameters()) == expected
        assert sum(p.numel() for n, p in vit_base.named_parameters() if p.requires_grad) == expected + 768 * 1000 + 1000
    finally:
        adapter.detach()
    assert getattr(vit_base, "factnet", None) is None


def test_swin_base_stage_groups(swin_base):
    tensorizer = factnet.Tensorizer(swin_base).group("stage")
    assert list(tensorizer.group_shapes().values()) == [
        (24, 128, 128), (24, 256, 256), (216, 512, 512), (24, 1024, 1024)]
    assert not any("downsample" in s.module or "reduction" in s.module or s.module.startswith("head")
                   for s in tensorizer.slices)


def test_swin_base_tt_rank16_per_stage(swin_base):
    assert factnet.Tensorizer(swin_base).group("stage").num_parameters("tt", 16) == 135_168


def test_swin_base_decomposed_count(swin_base):
    adapter = factnet.Tensorizer(swin_base).group("stage").decompose("tt", rank=16)
    try:
        assert adapter.num_parameters() == 135_168
        assert list(adapter.num_parameters_by_group().values()) == [
            2 * d * 16 + n * 256 for n, d in [(24, 128), (24, 256), (216, 512), (24, 1024)]]
    finally:
        adapter.detach()
