"""Adapter file bytes by storage width: FacT-TT on ViT-B/16, with and without a task head.

    python benchmarks/file_bytes.py [--model vit_base_patch16_224] [--ranks 4,8] [--classes 100] [--group 64]

Random weights (the size does not depend on them). Each file is written by ``adapter.save``: 32 and 16
bits as float32/bfloat16 tensors, 8/4/2/1 bits low-bit (``bits=b, head_bits=b``: codes plus a float16
scale, and offset above 1 bit, per ``--group`` values). Prints the file's bytes, without and with the
head, the bytes per factor parameter, and each file's fixed cost: its header (the safetensors header with
the JSON spec and checksum, and the 8 bytes giving its length).
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile

import timm
import torch

from factnet import Tensorizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--ranks", default="4,8")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--group", type=int, default=64)
    args = parser.parse_args()
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes)
    print(f"{args.model}, FacT-TT, {args.classes}-class head, low-bit group {args.group}\n")
    print("| rank | factors | bits | bytes, no head | bytes a factor | bytes, with head | header, no head | "
          "header, with head |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for rank in [int(r) for r in args.ranks.split(",")]:
            adapter = Tensorizer(model).decompose("tt", rank=rank, name=f"r{rank}")
            with torch.no_grad():
                for factor in adapter.parameters():
                    factor.normal_()
            count = adapter.num_parameters()
            for bits in (32, 16, 8, 4, 2, 1):
                sizes, headers = [], []
                for head in (False, True):
                    path = os.path.join(folder, "a.safetensors")
                    if bits == 32:
                        saved = adapter.save(path, include_head=head)
                    elif bits == 16:
                        saved = adapter.save(path, include_head=head, dtype=torch.bfloat16)
                    else:
                        saved = adapter.save(path, include_head=head, bits=bits, head_bits=bits, group=args.group)
                    sizes.append(saved.bytes)
                    headers.append(header_bytes(path))
                print(f"| {rank} | {count:,} | {bits} | {sizes[0]:,} | {sizes[0] / count:.3f} | {sizes[1]:,} | "
                      f"{headers[0]:,} | {headers[1]:,} |")
            model.factnet.delete(f"r{rank}")


def header_bytes(path: str) -> int:
    """A safetensors file's header with its length field: the little-endian u64 it starts with, plus 8."""
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


if __name__ == "__main__":
    main()
