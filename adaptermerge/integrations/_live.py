"""Host-independent parts of `load_merged_adapters`: building the merged adapter and live re-weighting.

A `linear` merge is the concatenation of every adapter's factors, `A = [A_1; …; A_T]` and `B = [w_1 B_1 … w_T B_T]`,
so its rank `Σ r_t` does not depend on the weights. :class:`LiveMerge` keeps each adapter's factors in memory, and
:meth:`LiveMerge.set_weights` rewrites only the columns of the host's `lora_B` weights in place: no file is read, no
layer is rebuilt, and the cost is proportional to the size of the `lora_B` factors, not of the base model. A zero
weight zeroes its block instead of dropping it, so the layers keep their shape.

In a diffusers pipeline the weights may be step schedules (:mod:`.schedule`): the live merge then rewrites, between
denoising steps, only the modules whose weights changed. Live modes such as `k_lora` give their own per-module
weights as a function of the progress.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapter import Adapter, AdapterMetadata, check_compatible, module_shape, module_union
from ..errors import IncompatibleAdaptersError, InvalidParameterError
from ..lowrank import LowRank, concat
from ..merge import AdapterLike, load_adapters, merge_adapters
from ..weights import Weight, check_weights
from .k_lora import klora_weights
from .schedule import WeightSchedule

__all__ = ["HostWeights", "LiveMerge", "ProgressWeights", "build_merge", "check_host_modules", "scheduled_weights"]

logger = logging.getLogger(__name__)
LIVE_ATTRIBUTE = "_adaptermerge_live"

# Live modes: method name → `mode(adapters, params)`, which returns how the adapters' weights become a live merge's
# `ProgressWeights` (so `set_merge_weights` keeps the mode).
LIVE_MODES = {"k_lora": klora_weights}

# The weights of a live merge at a denoising progress in [0, 1): `at(progress)(adapter index, module) -> weight`.
ProgressWeights = Callable[[float], Callable[[int, str], float]]
# What a live merge's `weigh` returns: the weights at each progress, and whether they change with the progress.
Weighing = tuple[ProgressWeights, bool]


def scheduled_weights(weights: Sequence[Weight] | None, *, n_adapters: int, allow_schedules: bool) -> Weighing:
    """The per-module weights of `weights` (schedules allowed when `allow_schedules`) at each progress, and whether
    any is a schedule.

    Raises:
        InvalidParameterError: for bad weights, or for a schedule where `allow_schedules` is false.
    """
    schedule = WeightSchedule([1.0] * n_adapters if weights is None else weights)
    if schedule.dynamic and not allow_schedules:
        raise InvalidParameterError(
            "weight schedules apply between denoising steps, to a live 'linear' merge of plain LoRAs (no rank, no "
            "DoRA) in a diffusers pipeline; give plain numbers here"
        )
    check_weights(schedule.at(0.0), n_adapters)  # refuse bad weights now, not at the first step

    def at(progress: float) -> Callable[[int, str], float]:
        resolvers = check_weights(schedule.at(progress), n_adapters)
        return lambda index, module: resolvers[index](module)

    return at, schedule.dynamic


@dataclass
class LiveMerge:
    """The sources of a live merge (`linear`, or a live mode such as `k_lora`) loaded into a host, to re-weight it in
    place.

    Only the `B` factors are kept (the weights scale `B` alone), moved to the device of the host's layers.

    Args:
        adapter_name (`str`): the host's name of the merged adapter.
        sources (`dict[str, list[tuple[int, torch.Tensor]]]`): per module, `(adapter index, B of shape (out, r))`
            in the column order of the merged `lora_B`.
        weigh (`Callable`): maps the adapters' weights (as `set_weights` takes them) to the weights at each
            denoising progress and whether they change with it: plain numbers and schedules for `linear`, the
            switches of a live mode such as `k_lora`.
        weights_at (`ProgressWeights`): the weights in use, at each progress.
        dynamic (`bool`): whether `weights_at` changes with the progress (a schedule, `k_lora`).
        on_set_weights (`Callable`, *optional*): called with the live merge after `set_weights`, for the host to
            start or stop applying the progress (the diffusers denoiser hook).
    """

    adapter_name: str
    sources: dict[str, list[tuple[int, torch.Tensor]]]
    weigh: Callable[[Sequence[Weight] | None], Weighing]
    weights_at: ProgressWeights
    dynamic: bool = False
    on_set_weights: Callable[[LiveMerge], None] | None = None
    layers: dict[str, torch.nn.Module] = field(default_factory=dict)
    _written: dict[str, tuple[float, ...]] = field(default_factory=dict)
    _progress: dict[str | None, float] = field(default_factory=dict)

    def attach(self, find: Callable[[str], torch.nn.Module]) -> None:
        """Record the host's LoRA layer of every module (`find(module)`) and move the sources to its device."""
        self.layers = {module: find(module) for module in self.sources}
        for module, sources in self.sources.items():
            weight = self._lora_B(module)
            self.sources[module] = [(i, up.to(weight.device, weight.dtype)) for i, up in sources]

    def set_weights(self, weights: Sequence[Weight]) -> None:
        """Write the blocks `w_t B_t` into the host's merged `lora_B` weights, in place (those of progress 0 for
        step schedules).

        Raises:
            InvalidParameterError: for a weight list of the wrong length, a weight that is not a finite number, or a
                schedule in a host without denoising steps.
            IncompatibleAdaptersError: when the merged adapter was fused, deleted or replaced in the host.
        """
        self.weights_at, self.dynamic = self.weigh(weights)
        self._written.clear()
        self._progress.clear()
        self.apply(0.0)
        if self.on_set_weights is not None:
            self.on_set_weights(self)

    def apply(self, progress: float, *, component: str | None = None) -> int:
        """Write the weights at `progress` into the modules whose weights changed since the last write.

        Args:
            progress (`float`): the denoising progress in `[0, 1)`.
            component (`str`, *optional*): only the modules of this host component (`"unet"`: `unet.…`); all by
                default. Nothing is computed when the component is already at `progress`.

        Returns:
            `int`: how many modules were rewritten.
        """
        if self._progress.get(component) == progress:
            return 0
        weight = self.weights_at(progress)
        prefix = "" if component is None else f"{component}."
        changed = 0
        with torch.no_grad():
            for module, sources in self.sources.items():
                if not module.startswith(prefix):
                    continue
                values = tuple(weight(index, module) for index, _ in sources)
                if self._written.get(module) == values:
                    continue
                lora_B = self._lora_B(module)
                offset = 0
                for (_, up), value in zip(sources, values):
                    lora_B[:, offset : offset + up.shape[1]].copy_(up).mul_(value)
                    offset += up.shape[1]
                self._written[module] = values
                changed += 1
        if component is None:
            self._progress.clear()
        else:
            self._progress.pop(None, None)
        self._progress[component] = progress
        return changed

    def _lora_B(self, module: str) -> torch.Tensor:
        """The merged `lora_B` weight of `module`, viewed as `(out, R)`; refuses fused or removed adapters."""
        layer = self.layers[module]
        lora_B = getattr(layer, "lora_B", {})
        if self.adapter_name not in lora_B:
            raise IncompatibleAdaptersError(
                f"module {module!r} no longer holds adapter {self.adapter_name!r} (deleted or unloaded); "
                "call load_merged_adapters again"
            )
        if self.adapter_name in getattr(layer, "merged_adapters", ()):
            raise IncompatibleAdaptersError(
                f"adapter {self.adapter_name!r} is fused into module {module!r}; call unfuse_lora() before "
                "set_merge_weights, and fuse again afterwards"
            )
        weight = lora_B[self.adapter_name].weight
        return weight.view(weight.shape[0], weight.shape[1])


class HostWeights(Mapping[str, torch.Tensor]):
    """A loaded host's base weights `W0` for the modules of a merge, the `base` of DoRA merges.

    A layer that a LoRA already wraps gives its `base_layer`'s weight: the host's own weight without any adapter.

    Args:
        find (`Callable[[str], torch.nn.Module | None]`): the host's layer for a module name, None when absent.
        modules (`Sequence[str]`): the module names the merge covers.
    """

    def __init__(self, find: Callable[[str], torch.nn.Module | None], modules: Sequence[str]) -> None:
        self._find = find
        self._modules = dict.fromkeys(modules)  # ordered, with constant-time membership

    def __getitem__(self, module: str) -> torch.Tensor:
        if module not in self._modules:
            raise KeyError(module)
        layer = self._find(module)
        fused = list(getattr(layer, "merged_adapters", ()))
        if fused:
            raise IncompatibleAdaptersError(
                f"module {module!r} has adapter(s) {fused} fused into its weight, which is then not the base weight a "
                "DoRA merge needs; unmerge them first (peft: unmerge_adapter(), diffusers: unfuse_lora())"
            )
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise IncompatibleAdaptersError(f"the host has no weight for module {module!r}; is it the adapters' base?")
        return weight.detach()

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def _refuse_side_cars(adapters: Sequence[Adapter]) -> None:
    """A host's LoRA loader holds LoRA factors only: full-rank side-cars (bias, norm deltas) would be lost."""
    for adapter in adapters:
        if adapter.side_cars:
            names = sorted(adapter.side_cars)
            raise IncompatibleAdaptersError(
                f"{adapter.name} carries {len(names)} side-car tensors ({names[0]}, ...: dense bias or norm deltas) "
                "that the host's LoRA loader cannot hold, so a live merge would drop them; merge to a file in the "
                f"inputs' layout (adaptermerge merge ... --format {adapter.metadata.format}) and load that with the "
                "trainer's or ComfyUI's loader"
            )


def build_merge(
    adapters: Sequence[AdapterLike],
    weights: Sequence[Weight] | None,
    method: str,
    *,
    adapter_name: str,
    dtype: torch.dtype | None,
    params: dict[str, Any],
    find: Callable[[str], torch.nn.Module | None] | None = None,
    allow_schedules: bool = False,
) -> tuple[Adapter, LiveMerge | None]:
    """The merged adapter to load and, for a plain `linear` merge or a live mode, the state that re-weights it live.

    `linear` without `rank` concatenates every adapter that has a module, zero weights included (as zero blocks),
    so later weights can be written into the same layers; its weights may be step schedules when `allow_schedules`
    (the merge is built with those of progress 0). A live mode of `LIVE_MODES` (`k_lora`) is loaded the same way, its
    weights switching per module over the progress. Every other method goes through :func:`merge_adapters`, and so do
    DoRA adapters: their merged magnitudes depend on the weights and on `W0`, which `find` (the host's layer for a
    module name) supplies from the host itself.
    """
    loaded = load_adapters(adapters)
    _refuse_side_cars(loaded)
    modules = module_union(loaded)
    base = None if find is None else HostWeights(find, modules)
    mode = LIVE_MODES.get(method)
    if mode is not None:
        if not allow_schedules:
            raise InvalidParameterError(
                f"{method!r} switches adapters between denoising steps: diffusers pipelines only"
            )
        weigh = mode(loaded, params)
    elif method == "linear" and not params and not any(adapter.is_dora for adapter in loaded):
        weigh = functools.partial(scheduled_weights, n_adapters=len(loaded), allow_schedules=allow_schedules)
    else:
        scheduled_weights(weights, n_adapters=len(loaded), allow_schedules=False)  # refuses schedules
        merged = merge_adapters(loaded, weights, method, dtype=dtype, adapter_name=adapter_name, base=base, **params)
        return merged, None
    check_compatible(loaded, modules)
    weights_at, dynamic = weigh(weights)
    weight = weights_at(0.0)
    out_dtype = dtype or loaded[0].metadata.dtype
    sources: dict[str, list[tuple[int, torch.Tensor]]] = {}
    merged: dict[str, LowRank] = {}
    for module in modules:
        pairs = [(i, a[module].to(out_dtype)) for i, a in enumerate(loaded) if module in a]
        sources[module] = [(i, update.B) for i, update in pairs]
        merged[module] = concat([u for _, u in pairs], [weight(i, module) for i, _ in pairs]).to(out_dtype)
    first = loaded[0].metadata
    described = WeightSchedule([1.0] * len(loaded) if weights is None else weights).describe()
    provenance = {"method": method, "params": params, "weights": described, "sources": [a.name for a in loaded]}
    metadata = AdapterMetadata(
        base_model=first.base_model,
        format=first.format,
        dtype=out_dtype,
        extra={**first.extra, "provenance": provenance},
    )
    state = LiveMerge(adapter_name, sources, weigh, weights_at, dynamic)
    return Adapter(merged, metadata, adapter_name), state


def check_host_modules(adapter: Adapter, find: Callable[[str], torch.nn.Module | None], host: str) -> None:
    """Every module of `adapter` exists in the host (`find` returns it, or None) with the adapter's shape.

    Raises:
        IncompatibleAdaptersError: naming the first module that is missing or has another shape.
    """
    for module in adapter:
        layer = find(module)
        if layer is None:
            raise IncompatibleAdaptersError(
                f"module {module!r} of adapter {adapter.name!r} does not exist in {host}; the adapters were trained "
                "on another base model (or for another pipeline component)"
            )
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        expected = module_shape(adapter, module)
        found = None if weight is None else (weight.shape[0], weight[0].numel(), *weight.shape[2:])
        if found is None or found[:2] != expected[:2] or (len(expected) > 2 and found[2:] != expected[2:]):
            raise IncompatibleAdaptersError(
                f"module {module!r} of adapter {adapter.name!r} has shape {expected} (out, in, kernel) but the "
                f"layer in {host} has {None if weight is None else tuple(weight.shape)}; the adapters were trained "
                "on another base model"
            )


def host_live(host: Any) -> dict[str, LiveMerge]:
    """The live merges recorded on a host object (created on first use)."""
    live = getattr(host, LIVE_ATTRIBUTE, None)
    if live is None:
        live = {}
        setattr(host, LIVE_ATTRIBUTE, live)
    return live


def set_merge_weights(host: Any, weights: Sequence[Weight], *, adapter_name: str = "merged") -> None:
    """Change the weights of a `linear` merge loaded by `load_merged_adapters`, in place (see module docstring).

    In a diffusers pipeline the weights may be step schedules (see :mod:`.schedule`); those of progress 0 are
    written now, the others by the pipeline's denoiser hook during denoising.

    Raises:
        InvalidParameterError: when no live `linear` merge of that name is loaded in `host`, or for bad weights.
    """
    live = host_live(host).get(adapter_name)
    if live is None:
        raise InvalidParameterError(
            f"no live linear merge named {adapter_name!r} on this {type(host).__name__}; only "
            "load_merged_adapters(..., method='linear') of plain LoRAs without rank= can be re-weighted in place "
            "(a DoRA merge's magnitudes depend on the weights). Call load_merged_adapters again with the new weights"
        )
    live.set_weights(weights)
    logger.debug("re-weighted %s: %d modules", adapter_name, len(live.sources))
