"""factnet: parameter-efficient fine-tuning by Factor-Tuning (FacT) for any PyTorch model.

    adapter = Tensorizer(model).group("stage").decompose("tucker", rank=8, scale=10)

Stack a model's same-shaped weight matrices into group tensors, train only a decomposed
increment ``s·ΔW`` of each (zero at start, backbone frozen), merge it in for inference.

This package is the library; the ``factnet`` command and the demo live in `factnet.app`, which uses
only this API. The public surface: the names below (``factnet.__all__``) and three modules, `factnet.formats`
(`Format` and `NormalForm`: writing a format), `factnet.budget` (`AUTO_RULE`: what a byte budget picks) and
`factnet.autotune` (`force`: pin a kernel variant). Every other module is internal: its names may change. The
map of modules: docs/ARCHITECTURE.md.
"""

from factnet.adapter import Adapter
from factnet.adapter_set import AdapterSet
from factnet.budget import read_budget
from factnet.compression import compress, rank_sweep
from factnet.config import AdapterConfig
from factnet.errors import FactnetError
from factnet.export import ExportReport, export_lora
from factnet.formats import Format, NormalForm, available_formats, get_format
from factnet.file.container import write_atomically
from factnet.file.info import file_info
from factnet.file.load import load, load_many
from factnet.file.save import save
from factnet.file.writer import Saved
from factnet.slices import Slice
from factnet.tensorizer import Tensorizer, parse_budget
from factnet.version import __version__ as __version__

__all__ = [
    "Adapter", "AdapterConfig", "AdapterSet", "ExportReport", "FactnetError", "Format", "NormalForm", "Saved", "Slice",
    "Tensorizer", "available_formats", "compress", "export_lora", "file_info", "get_format", "load", "load_many",
    "parse_budget", "rank_sweep", "read_budget", "save", "write_atomically",
]
