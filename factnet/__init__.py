"""factnet: parameter-efficient fine-tuning by Factor-Tuning (FacT) for any PyTorch model.

    adapter = Tensorizer(model).group("stage").decompose("tucker", rank=8, scale=10)

Stack a model's same-shaped weight matrices into group tensors, train only a decomposed
increment ``s·ΔW`` of each (zero at start, backbone frozen), merge it in for inference.
"""

from factnet.adapter import Adapter
from factnet.compression import compress, rank_sweep
from factnet.errors import FactnetError
from factnet.formats import Format, available_formats, get_format
from factnet.slices import Slice
from factnet.tensorizer import Tensorizer

__all__ = [
    "Adapter", "FactnetError", "Format", "Slice", "Tensorizer", "available_formats", "compress",
    "get_format", "rank_sweep",
]
__version__ = "0.1.0"
