"""`merge_adapters`: read adapters, merge them module by module with a registered method, return an adapter.

Inputs stay lazy: each module is read from every input, merged, and released before the next, so memory holds
the output plus one module of each input. Factors are computed in at least float32 and the output keeps the
first input's dtype unless `dtype` says otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .adapter import Adapter, AdapterMetadata, check_compatible, module_union, side_car_module
from .errors import IncompatibleAdaptersError, InvalidParameterError, InvalidTensorError
from .io import check_same_family, load_adapter
from .io.base import BaseWeights
from .lowrank import LowRank, truncate
from .methods import get_method
from .methods.dora import merge_dora
from .weights import Weight, check_weights

__all__ = ["load_adapters", "merge_adapters"]

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


# glibc keeps freed memory, and the peak then grows with the number of modules even though each module's tensors
# are released; handing it back after every module costs a page fault on every later allocation (a second of system
# time on a 7B adapter set), so it is handed back every few modules.
_TRIM_EVERY = 16


def _release_freed_memory() -> None:
    """Hand memory freed by the last modules back to the system."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


AdapterLike = Adapter | str | Path


def load_adapters(
    adapters: Sequence[AdapterLike], *, allow_pickle: bool = False, skip_unknown: bool = False
) -> list[Adapter]:
    """Adapters as objects: paths and hub ids are read lazily, names made unique for tables and errors."""
    if not adapters:
        raise IncompatibleAdaptersError("no adapters given; pass at least one path, hub id or Adapter")
    loaded = [
        a if isinstance(a, Adapter) else load_adapter(a, allow_pickle=allow_pickle, skip_unknown=skip_unknown)
        for a in adapters
    ]
    seen: dict[str, int] = {}
    unique = []
    for adapter in loaded:
        count = seen[adapter.name] = seen.get(adapter.name, 0) + 1
        unique.append(adapter if count == 1 else dataclasses.replace(adapter, name=f"{adapter.name}_{count}"))
    return unique


def _check_dora(
    adapter: str, module: str, method: str, base: BaseWeights | Mapping[str, torch.Tensor] | None, rank: int | None
) -> None:
    """Refuse DoRA merges that cannot be exact, naming the adapter, the module and what to change."""
    where = f"adapter {adapter!r} is DoRA (module {module!r})"
    if method != "linear":
        raise IncompatibleAdaptersError(f"{where}: DoRA adapters merge exactly only with method 'linear'")
    if base is None:
        raise IncompatibleAdaptersError(
            f"{where}: merging DoRA needs the base model's weights; pass base= (CLI: --base PATH_OR_HUB_ID)"
        )
    if rank is not None:
        raise IncompatibleAdaptersError(f"{where}: a DoRA merge keeps rank Σ r_t; drop rank (--rank)")


def merge_side_cars(
    adapters: Sequence[Adapter], resolvers: Sequence[Callable[[str], float]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The weighted sum of the adapters' side-car tensors (biases, norm and modulation deltas), under any method.

    Side-cars are full-rank but small (a vector per module), so they are summed exactly, each with its adapter's
    weight for the module it belongs to; one that only some adapters have counts as zero in the others.

    Raises:
        IncompatibleAdaptersError: when adapters hold a side-car of one name with different shapes.
    """
    merged: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(n for adapter in adapters for n in adapter.side_cars):
        module = side_car_module(name)
        terms = [(a, resolve(module)) for a, resolve in zip(adapters, resolvers) if name in a.side_cars]
        tensors = [(a.side_cars[name], weight, a.name) for a, weight in terms if weight != 0.0]
        if not tensors:
            continue
        shapes = {tuple(t.shape): adapter for t, _, adapter in tensors}
        if len(shapes) > 1:
            raise IncompatibleAdaptersError(
                f"side-car tensor {name!r} has different shapes in different adapters ({shapes}); "
                "they were trained on different base models"
            )
        total = sum(weight * t.to(torch.promote_types(t.dtype, torch.float32)) for t, weight, _ in tensors)
        merged[name] = total.to(dtype)
    return merged


def _cast_finite(result: LowRank, dtype: torch.dtype, module: str) -> LowRank:
    """`result` in the output dtype, refused when a value is NaN or Inf there, so no such file is ever written."""
    cast = result.to(dtype)
    try:
        cast.check_finite()
    except InvalidTensorError:
        largest = max(float(factor.abs().max()) for factor in (result.A, result.B))
        computed = str(result.dtype).removeprefix("torch.")
        if math.isfinite(largest):
            hint = "; write float32 or bfloat16 (--dtype)" if torch.float16 in (dtype, result.dtype) else ""
            found = f"its largest value is {largest:.4g}, which {str(dtype).removeprefix('torch.')} cannot hold{hint}"
        else:
            found = f"it overflowed in {computed} (largest value {largest}); check the weights and the inputs' scales"
        raise InvalidTensorError(f"merged module {module!r} is not finite: {found}") from None
    return cast


def merge_adapters(
    adapters: Sequence[AdapterLike],
    weights: Sequence[Weight] | None = None,
    method: str = "linear",
    *,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    adapter_name: str = "merged",
    allow_pickle: bool = False,
    base: str | Path | Mapping[str, torch.Tensor] | None = None,
    num_workers: int | None = None,
    progressbar: bool = False,
    skip_unknown: bool = False,
    **params: Any,
) -> Adapter:
    """Merge adapters into one, on their low-rank factors.

    Args:
        adapters (`list` of `Adapter`, paths or hub ids): the adapters to merge, all of one base model.
        weights (`list`, *optional*): one weight per adapter, 1.0 each by default: a number, or per-module weights
            (module patterns, diffusers block dicts or A1111 block-weight vectors; see `adaptermerge.weights`).
        method (`str`, defaults to `"linear"`): a registered method name (see `adaptermerge methods`).
        rank (`int`, *optional*): the output rank per module. Methods with a `rank` parameter use it; for the
            others the result is truncated by a low-rank SVD.
        dtype (`torch.dtype`, *optional*): the output dtype; the first adapter's by default.
        adapter_name (`str`, defaults to `"merged"`): the name of the result.
        allow_pickle (`bool`, defaults to `False`): allow reading pickle checkpoints.
        base (`str`, `Path` or mapping, *optional*): the base model (folder, file or hub id), read one layer at a
            time, or a mapping from module name to its base weight `W0` (such as a loaded model's). DoRA modules
            need it: their updates depend on `W0`, and with it the `linear` merge is exact (see
            `adaptermerge.methods.dora`). Without it, merging DoRA adapters is refused rather than approximated.
        num_workers (`int`, *optional*): threads merging modules side by side; one per core (at most 8) by default.
        progressbar (`bool`, defaults to `False`): show a progress bar over modules.
        skip_unknown (`bool`, defaults to `False`): merge files that hold keys nothing understands, leaving those
            modules out (each input lists the keys in `metadata.extra["unused_keys"]`).
        **params: the method's parameters (e.g. `density=0.5`, `majority_sign_method="total"`, `seed=0`).

    Returns:
        `Adapter`: the merged adapter, in memory; its metadata records the method, weights and parameters.

    Raises:
        UnknownMethodError: for an unregistered method.
        InvalidParameterError: for unknown or out-of-range parameters, weights or rank.
        InvalidTensorError: when a merged module holds NaN or Inf in the output dtype.
        IncompatibleAdaptersError: for adapters of different base models or module shapes, or DoRA adapters
            without `base`, with a method other than `linear`, or with `rank`.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidParameterError(f"rank must be a positive integer (the output rank per module); got {rank!r}")
    merge_method = get_method(method)
    takes_rank = "rank" in merge_method.param_names
    if takes_rank and rank is not None:
        params = {**params, "rank": rank}
    method_params = merge_method.make_params(params)
    loaded = load_adapters(adapters, allow_pickle=allow_pickle, skip_unknown=skip_unknown)
    check_same_family(loaded)
    resolvers = check_weights(weights, len(loaded))
    out_dtype = dtype or loaded[0].metadata.dtype
    provenance = {
        "method": method,
        "params": dataclasses.asdict(method_params),
        "weights": [r.spec for r in resolvers],
        "rank": rank,
        "sources": [a.metadata.source or a.name for a in loaded],
        "unused_keys": {
            a.name: list(a.metadata.extra["unused_keys"]) for a in loaded if "unused_keys" in a.metadata.extra
        },
    }
    if not merge_method.per_module:
        if any(r.uniform is None for r in resolvers):
            raise InvalidParameterError(f"method {method!r} takes one number per adapter, not per-module weights")
        result = merge_method.fn(loaded, [r.uniform for r in resolvers], method_params)
        if not isinstance(result, Mapping):  # a result of its own kind (rmm's bundle)
            return result
        merged = {module: _cast_finite(update, out_dtype, module) for module, update in result.items()}
        return _merged_adapter(merged, loaded, resolvers, provenance, out_dtype, adapter_name)

    modules = module_union(loaded)
    check_compatible(loaded, modules)
    base_weights = base if base is None or isinstance(base, Mapping) else BaseWeights(base)

    def merge_module(module: str) -> LowRank | None:
        pairs = [(a, resolve(module)) for a, resolve in zip(loaded, resolvers) if module in a]
        pairs = [(a, w) for a, w in pairs if w != 0.0]
        if not pairs:
            return None
        updates = [adapter[module] for adapter, _ in pairs]
        if merge_method.float32_inputs:
            updates = [u.to(torch.promote_types(u.dtype, torch.float32)) for u in updates]
        dora = next((a.name for (a, _), u in zip(pairs, updates) if u.magnitude is not None), None)
        if dora is not None:
            _check_dora(dora, module, method, base_weights, rank)
            result = merge_dora(updates, [w for _, w in pairs], base_weights[module])
        else:
            result = merge_method.fn(updates, [w for _, w in pairs], method_params)
        if rank is not None and not takes_rank and result.rank > rank:
            result = truncate(result, rank)
        return _cast_finite(result, out_dtype, module)

    # Modules are independent: a few threads (one torch and one BLAS thread each) keep every core busy on the small
    # per-module decompositions, and each reads its own module only when it starts, so memory stays at a few modules.
    workers = num_workers or min(os.cpu_count() or 1, 8)
    threads = torch.get_num_threads()
    merged = {}
    try:
        with (
            threadpool_limits(1, user_api="blas"),
            ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool,
        ):
            results = pool.map(merge_module, modules)
            bar = tqdm(total=len(modules), desc=f"merging ({method})", unit="module", disable=not progressbar)
            with bar:
                for count, (module, result) in enumerate(zip(modules, results), start=1):
                    bar.update()
                    if result is not None:
                        merged[module] = result
                    if count % _TRIM_EVERY == 0:
                        _release_freed_memory()
    finally:
        torch.set_num_threads(threads)
    return _merged_adapter(merged, loaded, resolvers, provenance, out_dtype, adapter_name)


def _merged_adapter(
    merged: dict[str, LowRank],
    loaded: list[Adapter],
    resolvers: list,
    provenance: dict[str, Any],
    dtype: torch.dtype,
    name: str,
) -> Adapter:
    """The merged modules as an adapter with the first input's metadata, the merge's provenance and side-cars."""
    first = loaded[0].metadata
    metadata = AdapterMetadata(
        base_model=first.base_model,
        format=first.format,
        source=None,
        dtype=dtype,
        extra={**{k: v for k, v in first.extra.items() if k != "unused_keys"}, "provenance": provenance},
    )
    return Adapter(merged, metadata, name, merge_side_cars(loaded, resolvers, dtype))
