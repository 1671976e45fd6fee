"""An adapter as a mapping of module names to low-rank updates, plus what is known about where it came from.

Module names are the dotted paths of the adapted modules in the model they were trained on. Diffusion adapters
put the pipeline component first (``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``transformer.``), so a
kohya file and a diffusers file for the same model name the same modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import IncompatibleAdaptersError
from .lowrank import LowRank

__all__ = ["Adapter", "AdapterMetadata", "check_compatible", "module_union"]

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DIFFUSION_COMPONENTS = ("unet", "transformer", *_TEXT_ENCODERS, "prior")


@dataclass(frozen=True)
class AdapterMetadata:
    """What is known about an adapter besides its factors.

    Args:
        base_model (`str`, *optional*): the base model's id or path, when the file says.
        format (`str`): the format it was read from (`"peft"`, `"kohya"`, `"diffusers"`) or `"memory"`.
        source (`str`, *optional*): the path or hub id it was read from.
        dtype (`torch.dtype`): the dtype of its factors on disk; writers keep it unless told otherwise.
        extra (`dict`): format-specific facts worth carrying to the output (peft's `task_type`, ...).
    """

    base_model: str | None = None
    format: str = "memory"
    source: str | None = None
    dtype: torch.dtype = torch.float32
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter(Mapping[str, LowRank]):
    """An adapter: module name → :class:`~adaptermerge.lowrank.LowRank`, read lazily when loaded from a file.

    Args:
        modules (`Mapping[str, LowRank]`): the updates, scale folded in. Loaders pass a lazy mapping that reads
            one module's tensors when it is accessed, so merges stream module by module.
        metadata (`AdapterMetadata`): base model, format, source and dtype.
        name (`str`, *optional*): a short name for tables and error messages.
        side_cars (`Mapping[str, torch.Tensor]`, *optional*): full-rank tensors some trainers save beside the LoRA
            factors, named `<module>.<kind>`: `diff` (a full weight delta, such as a norm's), `diff_b` (a bias delta;
            peft's `lora_B.bias`), `diff_m` (Wan's modulation delta). They are small vectors, not low-rank, so every
            merge method sums them with the adapters' weights, exactly.
    """

    modules: Mapping[str, LowRank]
    metadata: AdapterMetadata = field(default_factory=AdapterMetadata)
    name: str = "adapter"
    side_cars: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, module: str) -> LowRank:
        return self.modules[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, module: object) -> bool:
        return module in self.modules

    def __repr__(self) -> str:
        return f"Adapter(name={self.name!r}, modules={len(self)}, format={self.metadata.format!r})"

    @property
    def num_parameters(self) -> int:
        return sum(lr.num_parameters for lr in self.values())

    @property
    def is_dora(self) -> bool:
        """Whether any module is DoRA (has a magnitude vector), without reading tensors when the adapter is lazy."""
        has_magnitude = getattr(self.modules, "has_magnitude", None)
        if has_magnitude is not None:
            return any(has_magnitude(module) for module in self.modules)
        return any(lr.magnitude is not None for lr in self.values())

    def with_modules(self, modules: Mapping[str, LowRank], **metadata: Any) -> Adapter:
        """A new adapter with other modules and, optionally, changed metadata fields."""
        return replace(self, modules=modules, metadata=replace(self.metadata, **metadata))

    def materialize(self) -> Adapter:
        """Read every module now (a lazy adapter stays tied to its file otherwise)."""
        return replace(
            self, modules={name: lr for name, lr in self.items()}, side_cars={k: t for k, t in self.side_cars.items()}
        )


def side_car_module(name: str) -> str:
    """The module a side-car tensor belongs to (`transformer.blocks.0.attn1.to_q.diff_b` → `….to_q`)."""
    return name.rpartition(".")[0]


def module_union(adapters: Sequence[Adapter]) -> list[str]:
    """All module names of the adapters, in order of first appearance."""
    return list(dict.fromkeys(name for adapter in adapters for name in adapter))


def check_compatible(adapters: Sequence[Adapter], modules: Sequence[str] | None = None) -> None:
    """Raise :class:`IncompatibleAdaptersError` if the adapters cannot be merged.

    They must agree on the shape of every module they share, name the same base model when they name one, and be
    of one model: two adapters that share no module must at least share a module root (`model`, `unet`,
    `transformer`, ...), as attention-only and MLP-only adapters of one model do (a pipeline adapter of text encoders
    only goes with any pipeline adapter). Shapes are read from each file's
    header, so checking a lazy adapter reads no tensor data.
    """
    _check_same_model(adapters)
    bases = {a.metadata.base_model for a in adapters if a.metadata.base_model}
    if len(bases) > 1:
        named = ", ".join(f"{a.name}: {a.metadata.base_model}" for a in adapters if a.metadata.base_model)
        raise IncompatibleAdaptersError(
            f"the adapters were trained on different base models ({named}); merge adapters of one base model"
        )
    for module in modules if modules is not None else module_union(adapters):
        seen: dict[tuple[int, ...], str] = {}
        for adapter in adapters:
            shape = module_shape(adapter, module)
            if shape is not None:
                seen.setdefault(shape, adapter.name)
        if len(seen) > 1:
            described = "; ".join(f"{name}: out×in{'×kernel' if len(s) > 2 else ''} = {s}" for s, name in seen.items())
            raise IncompatibleAdaptersError(
                f"module {module!r} has different shapes in different adapters ({described}); "
                "they were trained on different base models or layers"
            )


def _related(roots: set[str], other: set[str]) -> bool:
    """Whether two adapters' module roots allow one model: a shared root, or a text-encoder-only pipeline adapter."""
    if roots & other:
        return True
    both_pipelines = roots | other <= set(DIFFUSION_COMPONENTS)
    return both_pipelines and (roots <= set(_TEXT_ENCODERS) or other <= set(_TEXT_ENCODERS))


def _check_same_model(adapters: Sequence[Adapter]) -> None:
    """Refuse two adapters with no module and no module root in common (an LLM LoRA and a UNet LoRA, say)."""
    roots = [{module.partition(".")[0] for module in adapter} for adapter in adapters]
    for i, adapter in enumerate(adapters):
        for j in range(i):
            other = adapters[j]
            if _related(roots[i], roots[j]) or not set(adapter).isdisjoint(other):
                continue
            raise IncompatibleAdaptersError(
                f"adapters {other.name!r} and {adapter.name!r} have no module in common and adapt different models "
                f"({other.name}: {next(iter(other))}, ...; {adapter.name}: {next(iter(adapter))}, ...); "
                "merge adapters of one base model"
            )


def module_shape(adapter: Adapter, module: str) -> tuple[int, ...] | None:
    """The `(out, in, *kernel)` shape of a module's update, without reading its tensors when the adapter is lazy."""
    if module not in adapter.modules:
        return None
    shape_of = getattr(adapter.modules, "shape_of", None)
    if shape_of is not None:
        return shape_of(module)
    lr = adapter.modules[module]
    return (*lr.shape, *lr.kernel_size)
