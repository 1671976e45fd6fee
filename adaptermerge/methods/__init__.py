"""Merge methods, each registered by name. Import a method's module here to register it."""

from . import knots, linear, sparsify, spectral
from ._registry import MergeMethod, get_method, list_methods, register_method

__all__ = ["MergeMethod", "get_method", "knots", "linear", "list_methods", "register_method", "sparsify", "spectral"]
