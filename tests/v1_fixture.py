"""Writes tests/data/v1_*.safetensors: adapter files of factnet's format version 1 (the layout before
version 2), kept so that `tests/test_file_spec.py` checks old files still load, bitwise.

Run from the repository root (``python tests/v1_fixture.py``) only to regenerate them with a version-1
factnet; the committed files were written by factnet at commit e0d5bd6.
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

DATA = pathlib.Path(__file__).parent / "data"

# name -> (decompose settings, targets, include_head)
FILES = {
    "v1_tt_head": ({"format": "tt", "rank": 2, "scale": 3.0, "dropout": 0.1}, None, True),
    "v1_cp_qv": ({"format": "cp", "rank": 2}, ["blocks.*.attn.qkv[q,v]", "blocks.1.mlp.fc1[1]"], False),
}


def build_model() -> nn.Module:
    """A tiny timm ViT (2 blocks, width 16, 3 classes), built with seed 0."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=16, patch_size=8,
                             depth=2, embed_dim=16, num_heads=2)


def main() -> None:
    import factnet

    DATA.mkdir(exist_ok=True)
    for seed, (name, (settings, targets, include_head)) in enumerate(FILES.items()):
        model = build_model()
        adapter = factnet.Tensorizer(model, targets).decompose(**settings)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in adapter.trainable_parameters():  # stand-in for training: factors and head random
                param.copy_(torch.randn(param.shape, generator=generator))
        adapter.save(DATA / f"{name}.safetensors", include_head=include_head)


if __name__ == "__main__":
    main()
