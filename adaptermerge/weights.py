"""Per-adapter merge weights: one number per adapter, resolved for each module.

A weight is a number applied to every module of its adapter. Layer- and block-wise weights (mappings from
module patterns to numbers) resolve through :func:`module_weight` as well, so methods only ever see numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

from .errors import InvalidParameterError

__all__ = ["Weight", "check_weights", "module_weight"]

Weight = float | int


def check_weights(weights: Sequence[Weight] | None, n_adapters: int) -> list[Weight]:
    """One weight per adapter (1.0 each when `weights` is None), each a finite number.

    Raises:
        InvalidParameterError: for a length mismatch or a weight that is not a finite number.
    """
    if weights is None:
        return [1.0] * n_adapters
    weights = list(weights)
    if len(weights) != n_adapters:
        raise InvalidParameterError(f"got {len(weights)} weights for {n_adapters} adapters; give one per adapter")
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            raise InvalidParameterError(f"weight {i} must be a finite number; got {weight!r}")
    return weights


def module_weight(weight: Weight, module: str) -> float:
    """The number that `weight` gives to `module`."""
    return float(weight)
