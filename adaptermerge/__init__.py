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
    "load_merged_adapters",
    "merge_adapters",
    "merge_schedule_callback",
    "patch",
    "save_adapter",
    "set_merge_weights",
]

_INTEGRATIONS = ("load_merged_adapters", "merge_schedule_callback", "patch", "set_merge_weights")


def __getattr__(name: str):
    """Integrations load on first use, so `import adaptermerge` imports no host library."""
    if name in _INTEGRATIONS:
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
