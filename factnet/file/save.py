"""`save`: an adapter to one safetensors file (`factnet.file.writer`)."""

from __future__ import annotations

import os

import torch

from factnet.adapter import Adapter
from factnet.errors import FactnetError
from factnet.file.writer import Saved, write

__all__ = ["save"]


def save(adapter: Adapter, path: str | os.PathLike[str], include_head: bool = True,
         dtype: torch.dtype | None = None, *, bits: int | None = None, head_bits: int | None = None,
         group: int = 64) -> Saved:
    """Write ``adapter`` to ``path``: one safetensors file, atomically (see `factnet.file.packs` for its layout).

    From a model sharded with FSDP2 (``fully_shard``), call it on every rank: the full factors are
    gathered and rank 0 writes the one file.

    Holds the factors and, unless ``include_head=False``, the parameters of the trainable head, as they
    are (``dtype=None``) or cast to ``dtype`` (``torch.float16``, ``torch.bfloat16``, ``torch.float32`` or
    ``torch.float64``): ``torch.bfloat16`` stores 2 bytes a parameter, and `load` casts the values back to
    the model's dtypes. The size is the tensors' bytes plus the header: the tensors are packed, one per
    dtype, and the spec names the default targets by their grouping rule instead of listing them (format
    version 4, `factnet.file.packs`): with the default targets the header is 500 to 700 bytes (ViT-B,
    EfficientNet-Lite0 and every family of tests/zoo.py); other slices are listed as templates, which add their
    length.

    ``bits`` (1, 2, 4 or 8) stores the factors low-bit, ``head_bits`` the head: ``bits``-bit codes with a
    float16 scale (and offset) per ``group`` values (`factnet.quant`), about ``bits/8`` bytes a parameter;
    `load` reads them back as float32 values, exactly the stored ones, into the model's dtypes. Returns the
    file's path and size and, per low-bit tensor, the relative error of its stored values (`Saved`).
    """
    if not isinstance(adapter, Adapter):
        raise FactnetError(f"save needs a factnet Adapter, got {type(adapter).__name__}")
    return write(adapter, path, include_head, dtype, bits, head_bits, group)
