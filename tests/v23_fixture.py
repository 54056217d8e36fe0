"""Writes tests/data/v2_*.safetensors and v3_*.safetensors: adapter files of factnet's format versions 2 (one
tensor per factor and head parameter) and 3 (low-bit: codes and constants per tensor), the layouts before
version 4, and tests/data/v23_outputs.safetensors, the adapted model's output on `INPUT` for each file as the
factnet that wrote them computed it. `tests/test_file_load.py` checks that they still load to those outputs.

Run from the repository root (``python tests/v23_fixture.py``) only to regenerate them with a version-2/3
factnet; the committed files were written by factnet at commit a364838.
"""

from __future__ import annotations

import pathlib

import torch
from safetensors.torch import save_file
from v1_fixture import build_model

DATA = pathlib.Path(__file__).parent / "data"
OUTPUTS = DATA / "v23_outputs.safetensors"

# name -> (model dtype, decompose settings, grouping, targets, save settings)
FILES = {
    "v2_tt_head": (torch.float32, {"format": "tt", "rank": 2}, "shape", None, {}),
    "v2_tucker_bf16": (torch.float32, {"format": "tucker", "rank": 2, "scale": 2.0, "dropout": 0.1}, "shape",
                       ["blocks.*.attn.qkv[q,v]", "blocks.*.mlp.fc2"], {"dtype": torch.bfloat16}),
    "v2_batch_matrix_f64": (torch.float64, {"format": "batch-matrix", "rank": 2}, "shape", None, {}),
    "v2_tt_seeded_stage": (torch.float32, {"format": "tt-seeded", "rank": 2, "seed": 5}, "stage", None,
                           {"include_head": False}),
    "v2_tt_bf16_model": (torch.bfloat16, {"format": "tt", "rank": 2}, "shape", None, {}),  # head bf16, factors f32
    "v3_cp_bits2_head4": (torch.float32, {"format": "cp", "rank": 2}, "shape", None,
                          {"bits": 2, "head_bits": 4, "group": 16}),
    "v3_vera_bits1": (torch.float32, {"format": "vera", "rank": 4, "seed": 3}, "shape", None,
                      {"bits": 1, "include_head": False}),
    "v3_tt_head_bits8": (torch.float64, {"format": "tt", "rank": 2, "head_bits": 8}, "shape", None, {}),
}


def input_for(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)


def build(name: str) -> torch.nn.Module:
    """The base model of file ``name``: `build_model` in the file's dtype, in eval mode."""
    return build_model().to(FILES[name][0]).eval()


def outputs() -> dict[str, torch.Tensor]:
    """Each file loaded onto its model: the output on `input_for`, on one thread with the kernel's default
    variants (`factnet.autotune.force`), so that only rounding of the machine's BLAS can differ."""
    import factnet
    from factnet.autotune import VARIANTS, force

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    found = {}
    try:
        with force(**{op: variants[0] for op, variants in VARIANTS.items()}), torch.no_grad():
            for name in FILES:
                model = build(name)
                factnet.load(model, DATA / f"{name}.safetensors")
                found[name] = model(input_for(FILES[name][0])).contiguous()
    finally:
        torch.set_num_threads(threads)
    return found


def main() -> None:
    import factnet

    DATA.mkdir(exist_ok=True)
    for seed, (name, (_, settings, by, targets, save)) in enumerate(FILES.items()):
        model = build(name)
        adapter = factnet.Tensorizer(model, targets).group(by).decompose(**settings)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in adapter.trainable_parameters():  # stand-in for training: factors and head random
                param.copy_(torch.randn(param.shape, generator=generator))
        adapter.save(DATA / f"{name}.safetensors", **save)
    save_file(outputs(), str(OUTPUTS))  # the outputs the files give (low-bit: as stored)


if __name__ == "__main__":
    main()
