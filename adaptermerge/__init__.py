"""adaptermerge: merge LoRA adapters in low-rank form, from file to file.

Every public name loads on first use, so `import adaptermerge` (and the command line's `--help`) imports neither
torch nor any host library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapter import Adapter, AdapterMetadata
    from .errors import AdapterMergeError, AdapterMergeWarning
    from .integrations import load_merged_adapters, merge_schedule_callback, patch, set_merge_weights
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
    "load_merged_adapters",
    "merge_adapters",
    "merge_schedule_callback",
    "patch",
    "save_adapter",
    "set_merge_weights",
]

_HOMES = {
    "Adapter": "adapter",
    "AdapterMetadata": "adapter",
    "AdapterMergeError": "errors",
    "AdapterMergeWarning": "errors",
    "LowRank": "lowrank",
    "get_method": "methods",
    "list_methods": "methods",
    "load_adapter": "io",
    "save_adapter": "io",
    "merge_adapters": "merge",
    "load_merged_adapters": "integrations",
    "merge_schedule_callback": "integrations",
    "patch": "integrations",
    "set_merge_weights": "integrations",
}


def __getattr__(name: str):
    """Load a public name from the module that holds it on first use."""
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"
