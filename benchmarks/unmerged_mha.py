"""Inference with an unmerged adapter against the merged model on a torchvision ViT-S (nn.MultiheadAttention).

    PYTHONPATH=. python benchmarks/unmerged_mha.py

ViT-S/16 at 224x224 (random weights), batch 16, eval mode, no grad, 1 torch thread; FacT-TT rank 8 with random
factors. After one forward each (the first-forward guard runs torch's unfused path), five pairs of forwards,
unmerged then merged, interleaved; prints each time and the median ratio of the pairs.
"""

from __future__ import annotations

import statistics
import time

import torch
from torchvision.models import VisionTransformer

import factnet


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384,
                              mlp_dim=1536).eval()
    x = torch.randn(16, 3, 224, 224)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=8, train_head=False, seed=0)
    unmerged, merged = [], []
    with torch.no_grad():
        for group in adapter.groups.values():
            for factor in group.factors.values():
                factor.normal_(0, 0.05)
        model(x)
        for _ in range(5):
            start = time.perf_counter()
            model(x)
            unmerged.append(time.perf_counter() - start)
            adapter.merge()
            start = time.perf_counter()
            model(x)
            merged.append(time.perf_counter() - start)
            adapter.unmerge()
    print("unmerged ms", [round(1000 * t) for t in unmerged], "merged ms", [round(1000 * t) for t in merged])
    print("median ratio unmerged / merged", round(statistics.median(u / m for u, m in zip(unmerged, merged)), 3))


if __name__ == "__main__":
    main()
