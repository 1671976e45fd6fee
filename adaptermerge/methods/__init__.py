"""Merge methods, each registered by name. Import a method's module here to register it."""

from . import copa, knots, linear, lora_lego, np_lora, rmm, sparsify, spectral
from ._registry import MergeMethod, get_method, list_methods, register_method

__all__ = [
    "MergeMethod",
    "copa",
    "get_method",
    "knots",
    "linear",
    "list_methods",
    "lora_lego",
    "np_lora",
    "register_method",
    "rmm",
    "sparsify",
    "spectral",
]
