"""Decomposition formats, registered by name. A new format is one subclass of `Format`."""

from factnet.formats import batch_matrix, cp, seeded, tensor_ring, tt, tucker  # noqa: F401  (registers)
from factnet.formats.base import Format, available_formats, get_format
from factnet.formats.normal_form import NormalForm

__all__ = ["Format", "NormalForm", "available_formats", "get_format"]
