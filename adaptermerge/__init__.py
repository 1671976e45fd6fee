"""adaptermerge: merge LoRA adapters in low-rank form, from file to file."""

from .adapter import Adapter, AdapterMetadata
from .errors import AdapterMergeError, AdapterMergeWarning
from .io import load_adapter, save_adapter
from .lowrank import LowRank
from .merge import merge_adapters
from .methods import get_method, list_methods

__all__ = [
    "Adapter",
    "AdapterMergeError",
    "AdapterMergeWarning",
    "AdapterMetadata",
    "LowRank",
    "get_method",
    "list_methods",
    "load_adapter",
    "merge_adapters",
    "save_adapter",
]

__version__ = "0.1.0"
