"""Checks every reader applies to what it reads: config fields, factor shapes, alphas.

A value that cannot be right is refused with one :class:`~adaptermerge.errors.AdapterFormatError` naming the file, the
module and what was expected; a value that is legal but most likely a mistake (a zero alpha, a config rank the tensors
contradict, DoRA promised but absent) is read and warned about with :class:`~adaptermerge.errors.AdapterMergeWarning`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import AdapterFormatError, AdapterMergeWarning

if TYPE_CHECKING:
    from ._source import TensorSource

_PATTERNS = ("rank_pattern", "alpha_pattern")


def warn(message: str) -> None:
    """Warn about input that is read as it is but is likely a mistake."""
    warnings.warn(message, AdapterMergeWarning, stacklevel=3)


def _is_number(value: Any) -> bool:
    """A finite int or float that converts to a float (not a bool, not an integer past float's range)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def lora_config(config: Any, where: str) -> dict[str, Any]:
    """A LoRA config (peft's `adapter_config.json`, a diffusers component's metadata) with its fields type-checked.

    A `rank_pattern`/`alpha_pattern` that is not a mapping is dropped with a warning, as peft cannot use it either.

    Raises:
        AdapterFormatError: when the config is not a mapping, `r` is not a positive integer, `lora_alpha` or a pattern
            value is not a finite number, or a pattern key is not a regular expression.
    """
    if not isinstance(config, Mapping):
        raise AdapterFormatError(f"{where}: the LoRA config is a JSON {type(config).__name__}, not an object")
    config = dict(config)
    if "r" in config and not (_is_number(config["r"]) and config["r"] == int(config["r"]) and config["r"] > 0):
        raise AdapterFormatError(f"{where}: r must be a positive integer; got {config['r']!r}")
    if not isinstance(config.get("base_model_name_or_path", ""), str | None):
        raise AdapterFormatError(
            f"{where}: base_model_name_or_path must be a string; got {config['base_model_name_or_path']!r}"
        )
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise AdapterFormatError(f"{where}: lora_alpha must be a finite number; got {config['lora_alpha']!r}")
    for field in _PATTERNS:
        pattern = config.get(field)
        if pattern is None or pattern == {}:
            continue
        if not isinstance(pattern, Mapping):
            warn(
                f"{where}: {field} is a JSON {type(pattern).__name__}, not an object of module patterns; it is ignored"
            )
            config[field] = {}
            continue
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as err:
                raise AdapterFormatError(f"{where}: {field} key {key!r} is not a regular expression ({err})") from None
            if not _is_number(value) or (field == "rank_pattern" and (value != int(value) or value <= 0)):
                raise AdapterFormatError(f"{where}: {field}[{key!r}] must be a positive number; got {value!r}")
    return config


def factor_shapes(
    source: TensorSource, module: str, down_key: str, up_key: str, magnitude_key: str | None = None
) -> tuple[tuple[int, ...], ...]:
    """The shapes of a module's `down`/`A` and `up`/`B` factors, checked to form a LoRA pair of rank 1 or more.

    A DoRA magnitude vector, when given, must hold one value per output.

    Raises:
        AdapterFormatError: naming the module and both shapes.
    """
    down, up = source.shape(down_key), source.shape(up_key)
    paired = len(down) in (2, 4) and len(up) == len(down) and up[1] == down[0] and all(s == 1 for s in up[2:])
    if not paired or 0 in down or 0 in up:
        raise AdapterFormatError(
            f"{source.name}: module {module!r} has factors of shapes {down} (down/A) and {up} (up/B), "
            "which do not form a LoRA pair of rank 1 or more (A: (r, in[, kh, kw]), B: (out, r[, 1, 1]))"
        )
    if magnitude_key is not None and math.prod(magnitude := source.shape(magnitude_key)) != up[0]:
        raise AdapterFormatError(
            f"{source.name}: module {module!r} has a DoRA magnitude of shape {magnitude}; expected {up[0]} values"
        )
    return down, up


def alpha_tensor(source: TensorSource, key: str, module: str) -> float:
    """The value of a module's `.alpha` tensor, checked to be one finite number.

    Raises:
        AdapterFormatError: for an alpha of several values or NaN/Inf.
    """
    shape = source.shape(key)
    if math.prod(shape) != 1:
        raise AdapterFormatError(f"{source.name}: module {module!r} has an alpha of shape {shape}; expected one value")
    alpha = float(source.get(key).reshape(()))
    if not math.isfinite(alpha):
        raise AdapterFormatError(f"{source.name}: module {module!r} has alpha {alpha}; expected a finite number")
    return alpha


def warn_zero_scales(source: TensorSource, scales: Mapping[str, float]) -> None:
    """Warn once when modules have scale 0 (alpha 0): their updates are zero, which is rarely meant."""
    zero = [module for module, scale in scales.items() if scale == 0]
    if zero:
        warn(
            f"{source.name}: {len(zero)} of {len(scales)} modules have alpha 0, so their updates are zero "
            f"(first: {zero[0]!r})"
        )
