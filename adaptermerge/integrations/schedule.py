"""Step schedules: merge weights that change over the denoising progress, applied between steps.

Any number in a weight spec (an adapter's weight, a block's or a module pattern's, an A1111 block-weight entry) may be
a schedule over the progress `p ∈ [0, 1)` of the denoising loop (step `i` of `N` runs at `p = i / N`):

- keyframes `[[p_0, w_0], [p_1, w_1], …]` with increasing `p`: the weight is `w_j` from `p_j` until the next
  keyframe, and 0 before the first, as ComfyUI's hook keyframes and A1111's `start=`/`stop=` hold their values.
  `[[0.0, 1.0], [0.6, 0.2]]` is 1.0 for the first 60% of the steps and 0.2 after; `[[0.3, 0.8]]` starts an adapter
  at 30% of the steps; `[[0.0, 1.0], [0.5, 0.0]]` stops one half-way. Give more keyframes (or a callable) for a ramp;
- a callable `f(p) -> float`.

A pipeline applies a schedule by itself, on a plain `pipe(prompt)` call: a hook on its denoiser writes the weights of
the step being denoised into the live merge in place, only the modules whose weights changed, and those of progress 0
after the last step, ready for the next image (load and `set_merge_weights` write progress 0 too); see
:mod:`adaptermerge.integrations.diffusers` for how the step is read from the scheduler. Text encoders run once,
before the first step, and keep the weights at progress 0.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

from ..errors import InvalidParameterError

__all__ = ["WeightSchedule", "is_keyframes", "keyframe_value"]


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def is_keyframes(value: Any) -> bool:
    """Whether `value` is a keyframe list: a non-empty sequence of `[progress, weight]` number pairs."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(
            isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2 and all(map(_is_number, pair))
            for pair in value
        )
    )


def _check_keyframes(keyframes: Sequence[Sequence[float]], where: str) -> tuple[list[float], list[float]]:
    starts = [float(p) for p, _ in keyframes]
    values = [float(w) for _, w in keyframes]
    if any(not 0.0 <= p <= 1.0 for p in starts) or any(b <= a for a, b in zip(starts, starts[1:])):
        raise InvalidParameterError(
            f"{where}: keyframe progresses must increase strictly within [0, 1]; got {[list(k) for k in keyframes]}"
        )
    if not all(math.isfinite(w) for w in values):
        raise InvalidParameterError(f"{where}: keyframe weights must be finite numbers; got {values}")
    return starts, values


def keyframe_value(starts: Sequence[float], values: Sequence[float], progress: float) -> float:
    """The weight held at `progress`: the value of the last keyframe starting at or before it, 0 before the first."""
    index = bisect.bisect_right(starts, progress) - 1
    return values[index] if index >= 0 else 0.0


class WeightSchedule:
    """Per-adapter weights whose numbers may be schedules (see the module docstring).

    Args:
        weights (`list`): one weight spec per adapter; any number in it may be keyframes or a callable of progress.

    Raises:
        InvalidParameterError: for keyframes out of order or outside `[0, 1]`, or non-finite keyframe weights.
    """

    def __init__(self, weights: Sequence[Any]) -> None:
        self.spec = list(weights)
        self._leaves: list[Callable[[float], float]] = []
        self._template = [self._compile(w, f"weight {i}") for i, w in enumerate(self.spec)]

    @property
    def dynamic(self) -> bool:
        """Whether any weight changes with the progress."""
        return bool(self._leaves)

    def _compile(self, spec: Any, where: str) -> Any:
        """`spec` with every schedule replaced by a `_Leaf` placeholder (its index in `_leaves`)."""
        if callable(spec):
            self._leaves.append(spec)
            return _Leaf(len(self._leaves) - 1)
        if is_keyframes(spec):
            starts, values = _check_keyframes(spec, where)
            self._leaves.append(lambda progress: keyframe_value(starts, values, progress))
            return _Leaf(len(self._leaves) - 1)
        if isinstance(spec, Mapping):
            return {key: self._compile(value, f"{where}[{key!r}]") for key, value in spec.items()}
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            return [self._compile(value, f"{where}[{i}]") for i, value in enumerate(spec)]
        return spec

    def describe(self) -> list[Any]:
        """The specs with each callable named (`"callable:<qualified name>"`), for provenance metadata."""
        return [_describe(spec) for spec in self.spec]

    def at(self, progress: float) -> list[Any]:
        """The plain weight specs at `progress` (every schedule replaced by its value)."""
        values = [leaf(progress) for leaf in self._leaves]
        return [_fill(spec, values) for spec in self._template]


def _describe(spec: Any) -> Any:
    if callable(spec):
        return f"callable:{getattr(spec, '__qualname__', type(spec).__name__)}"
    if isinstance(spec, Mapping):
        return {key: _describe(value) for key, value in spec.items()}
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [_describe(value) for value in spec]
    return spec


class _Leaf(int):
    """The position of a schedule in :attr:`WeightSchedule._leaves`, inside a compiled spec."""


def _fill(spec: Any, values: Sequence[float]) -> Any:
    if isinstance(spec, _Leaf):
        return values[spec]
    if isinstance(spec, Mapping):
        return {key: _fill(value, values) for key, value in spec.items()}
    if isinstance(spec, list):
        return [_fill(value, values) for value in spec]
    return spec
