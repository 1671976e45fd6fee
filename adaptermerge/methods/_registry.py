"""The registry of merge methods: one decorator, one lookup, no string checks anywhere else.

A method is registered with its parameter dataclass (frozen, validated in ``__post_init__``), a pretty name and
the paper it implements. Most methods are *per-module*: a pure function
``fn(updates, weights, params) -> LowRank`` on the updates of one module, which :func:`adaptermerge.merge_adapters`
calls once per module. Methods that need every module at once (a global mask, a reversible bundle) register
with ``per_module=False`` and take ``fn(adapters, weights, params)`` instead, returning a mapping from module name
to merged ``LowRank`` (which ``merge_adapters`` turns into an adapter as for per-module methods) or a result of
their own kind.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameterError, UnknownMethodError

__all__ = ["MergeMethod", "get_method", "list_methods", "register_method"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: the lower-case name users pass as `method=` and `--method`.
        pretty_name: the name for tables and help.
        reference_url: the paper.
        params_cls: the frozen dataclass of method-wide parameters.
        fn: the implementation (per module, or per adapter list when `per_module` is false).
        per_module: whether `fn` works on one module's updates.
        returns_adapter: whether the result is an adapter (false for a method with a result of its own kind, such as
            rmm's reversible bundle), so front ends know which methods give something to load or preview.
        float32_inputs: whether `merge_adapters` hands `fn` factors in float32 at least; a method that is exact in
            any dtype (a concatenation) takes float16/bfloat16 factors as read, which saves two passes over them.
        summary: the first line of `fn`'s docstring.
    """

    name: str
    pretty_name: str
    reference_url: str
    params_cls: type
    fn: Callable[..., Any]
    per_module: bool = True
    float32_inputs: bool = True
    returns_adapter: bool = True

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""

    @property
    def param_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.params_cls)]

    def make_params(self, params: Mapping[str, Any] | None = None) -> Any:
        """Build the parameter dataclass, refusing names it does not know.

        Raises:
            InvalidParameterError: for an unknown parameter or a value its `__post_init__` rejects.
        """
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            known = ", ".join(self.param_names) or "none"
            raise InvalidParameterError(
                f"method {self.name!r} does not take parameter(s) {', '.join(unknown)}; its parameters are: {known}"
            )
        try:
            return self.params_cls(**params)
        except (TypeError, ValueError) as err:
            raise InvalidParameterError(f"method {self.name!r}: {err}") from None


_REGISTRY: dict[str, MergeMethod] = {}


def register_method(
    name: str,
    *,
    params: type,
    pretty_name: str,
    reference_url: str,
    per_module: bool = True,
    float32_inputs: bool = True,
    returns_adapter: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as merge method `name`.

    Raises:
        ValueError: for a name that is not lower-case or is already registered, or `params` that is not a dataclass.
    """
    if name != name.lower() or not name.isidentifier():
        raise ValueError(f"method names are lower-case identifiers; got {name!r}")
    if not dataclasses.is_dataclass(params):
        raise ValueError(f"params of method {name!r} must be a dataclass; got {params!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        _REGISTRY[name] = MergeMethod(
            name, pretty_name, reference_url, params, fn, per_module, float32_inputs, returns_adapter
        )
        return fn

    return decorator


def get_method(name: str) -> MergeMethod:
    """The method registered under `name`.

    Raises:
        UnknownMethodError: listing the known names and the closest match.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown merge method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_methods() -> list[MergeMethod]:
    """Every registered method, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
