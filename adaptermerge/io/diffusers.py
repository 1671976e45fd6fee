"""diffusers LoRA files: `pytorch_lora_weights.safetensors`, keys `<component>.<module>.lora_A.weight`.

Components are the pipeline's parts (`unet`, `transformer`, `text_encoder`, `text_encoder_2`, ...), and each
module name keeps its component first, as `pipe.save_lora_weights` writes them. `lora_A` is `(r, in)` (conv:
`(r, in, kh, kw)`), `lora_B` is `(out, r)` (conv: `(out, r, 1, 1)`); DoRA adds `….lora_magnitude_vector`.

Scale: the file stores no alphas. When the safetensors header holds `lora_adapter_metadata` (each component's
`LoraConfig` flattened under its prefix: `unet.r`, `unet.lora_alpha`, `unet.alpha_pattern`, ...), diffusers builds
that config whole, so it is honoured here too; without it every module has alpha = rank (scale 1). Older key
spellings (`….lora.down.weight`, `…_lora.down.weight` attention processors, `….lora_linear_layer.up.weight`) and
`<module>.alpha` scalars are read as well.

Written files fold the scale into `lora_B` and carry metadata with `lora_alpha = r` and exact, anchored
`rank_pattern`/`alpha_pattern` entries, so diffusers' `load_lora_weights` builds the right LoRA layers for
mixed ranks.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..adapter import DIFFUSION_COMPONENTS, Adapter
from ..errors import AdapterFormatError
from ..patterns import find_pattern_key
from ._source import DictSource, ModuleEntry, TensorSource, lazy_adapter, open_source, take_unused
from ._validate import alpha_tensor, factor_shapes, lora_config
from ._write import atomic_path, magnitude_tensor, provenance_metadata, save_tensors

FORMAT = "diffusers"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_lora_weights.bin"
METADATA_KEY = "lora_adapter_metadata"
TEXT_MODEL = "text_model."
# Module roots of a CLIP text model whose `text_model.` wrapper transformers 5 flattens away.
_CLIP_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")

_NEW_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<role>A|B)\.weight")
_OLD_KEY = re.compile(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight")
_OLD_ATTN_KEY = re.compile(r"(?P<module>.+?)(?:\.processor)?\.to_(?P<proj>q|k|v|out)_lora\.(?P<role>down|up)\.weight")
_MAGNITUDE_KEY = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?")
_ALPHA_KEY = re.compile(r"(?P<module>.+)\.alpha")
_ROLES = {"A": "down", "down": "down", "B": "up", "up": "up"}


def split_component(name: str) -> tuple[str, str] | None:
    """`("unet", "down_blocks.0...")` for a diffusion module name, None when it has no pipeline component."""
    component, _, rest = name.partition(".")
    return (component, rest) if component in DIFFUSION_COMPONENTS and rest else None


def canonical_name(component: str, module: str) -> str:
    """The adapter's name for `module` of `component`; CLIP text-encoder modules always keep `text_model.`."""
    if component.startswith("text_encoder") and module.startswith(_CLIP_ROOTS):
        module = TEXT_MODEL + module
    return f"{component}.{module}"


def require_components(adapter: Adapter, format_name: str) -> None:
    """Refuse adapters whose module names carry no diffusion component (LLM adapters)."""
    stray = [name for name in adapter if split_component(name) is None]
    if stray:
        raise AdapterFormatError(
            f"adapter {adapter.name!r} cannot be written as {format_name}: module {stray[0]!r} "
            f"(and {len(stray) - 1} more) does not start with a pipeline component "
            f"({', '.join(DIFFUSION_COMPONENTS)}); "
            "it is not a diffusion adapter, so write it with --format peft"
        )


def detect(path: Path, keys: list[str]) -> bool:
    """A `pytorch_lora_weights` file, or one whose LoRA keys all start with a pipeline component."""
    if path.is_dir():
        return (path / WEIGHTS_NAME).is_file() or (path / PICKLE_WEIGHTS_NAME).is_file()
    if path.stem == Path(WEIGHTS_NAME).stem:
        return True
    return bool(keys) and all(split_component(k) is not None for k in keys) and any("lora" in k for k in keys)


def _parse_key(component: str, rest: str) -> tuple[str, str] | None:
    """`(module, role)` of one key below its component, or None when it is no LoRA key."""
    if match := _NEW_KEY.fullmatch(rest) or _OLD_KEY.fullmatch(rest):
        return match["module"], _ROLES[match["role"]]
    if match := _OLD_ATTN_KEY.fullmatch(rest):
        proj = match["proj"]
        if component.startswith("text_encoder"):
            leaf = f"{proj}_proj"
        else:
            leaf = "to_out.0" if proj == "out" else f"to_{proj}"
        return f"{match['module']}.{leaf}", _ROLES[match["role"]]
    if match := _MAGNITUDE_KEY.fullmatch(rest):
        return match["module"], "magnitude"
    if match := _ALPHA_KEY.fullmatch(rest):
        return match["module"], "alpha"
    return None


def read_metadata(source: TensorSource) -> dict[str, dict[str, Any]]:
    """Each component's LoRA config from the `lora_adapter_metadata` header entry (empty when absent)."""
    raw = source.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{source.name}: {METADATA_KEY} in the header is not valid JSON ({err})") from None
    if not isinstance(flat, dict):
        raise AdapterFormatError(
            f"{source.name}: {METADATA_KEY} in the header is a JSON {type(flat).__name__}, not an object"
        )
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return {
        component: lora_config(config, f"{source.name} ({METADATA_KEY}, {component})")
        for component, config in configs.items()
    }


def _config_scale(module: str, rank: int, config: Mapping[str, Any]) -> float:
    """`alpha / r` (rsLoRA: `alpha / sqrt(r)`) from a component's LoraConfig, as peft resolves its patterns."""
    alpha_pattern = config.get("alpha_pattern") or {}
    names = [module.removeprefix(TEXT_MODEL), module] if module.startswith(TEXT_MODEL) else [module]
    key = next((k for n in names if (k := find_pattern_key(alpha_pattern, n)) is not None), None)
    alpha = alpha_pattern[key] if key is not None else config.get("lora_alpha", rank)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def parse(source: TensorSource) -> dict[str, ModuleEntry]:
    """Module name → entry for every LoRA module of a diffusers state dict; refuses keys it cannot place."""
    keys = source.keys()
    configs = read_metadata(source)
    found: dict[tuple[str, str], dict[str, str]] = {}
    for key in keys:
        split = split_component(key)
        parsed = split and _parse_key(split[0], split[1])
        if parsed:
            found.setdefault((split[0], parsed[0]), {})[parsed[1]] = key
    entries = {}
    for (component, module), roles in found.items():
        name = canonical_name(component, module)
        if "down" not in roles or "up" not in roles:
            raise AdapterFormatError(f"{source.name}: module {name!r} has only one of lora_A/lora_B (down/up)")
        rank = factor_shapes(source, name, roles["down"], roles["up"])[0][0]
        if "alpha" in roles:
            scale = alpha_tensor(source, roles["alpha"], name) / rank
        elif component in configs:
            scale = _config_scale(module, rank, configs[component])
        else:
            scale = 1.0
        if name in entries:
            raise AdapterFormatError(f"{source.name}: module {name!r} appears twice (with and without text_model.)")
        entries[name] = ModuleEntry(roles["down"], roles["up"], scale, roles.get("magnitude"))
    take_unused(keys, {k for roles in found.values() for k in roles.values()}, source, "diffusers")
    return entries


def _adapter(source: TensorSource, name: str) -> Adapter:
    return lazy_adapter(source, parse(source), name, format=FORMAT)


def load(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a diffusers LoRA file (or a folder holding `pytorch_lora_weights.safetensors`), lazily.

    Raises:
        AdapterFormatError: for a missing weights file, unknown keys or factors that do not pair up.
        UnsafeFormatError: for `.bin` files without `allow_pickle`.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / WEIGHTS_NAME, path / PICKLE_WEIGHTS_NAME]
        file = next((p for p in candidates if p.is_file()), None)
        if file is None:
            raise AdapterFormatError(f"{path}: no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) in the folder")
        name = path.name
    else:
        file, name = path, path.stem
    return _adapter(open_source(file, allow_pickle=allow_pickle), name)


def from_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None, name: str = "adapter"
) -> Adapter:
    """An adapter from an in-memory diffusers state dict and, optionally, its flat `lora_adapter_metadata` dict."""
    header = {METADATA_KEY: json.dumps(dict(metadata))} if metadata else {}
    return _adapter(DictSource(state_dict, name=name, metadata=header), name)


def _pattern_key(component: str, module: str) -> str:
    """A rank/alpha pattern key matching exactly this module, with or without CLIP's `text_model.` wrapper."""
    if component.startswith("text_encoder") and module.startswith(TEXT_MODEL):
        return r"^(?:text_model\.)?" + re.escape(module.removeprefix(TEXT_MODEL))
    return "^" + re.escape(module)


def to_state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The diffusers state dict of an adapter and its flat `lora_adapter_metadata` (scale folded, alpha = r).

    Raises:
        AdapterFormatError: for module names without a pipeline component, or an empty adapter.
    """
    require_components(adapter, FORMAT)
    dtype = dtype or adapter.metadata.dtype
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    dora: set[str] = set()
    for name, lowrank in adapter.items():
        down, up = lowrank.to(dtype).weights()
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
        component, module = split_component(name)
        if lowrank.magnitude is not None:
            tensors[f"{name}.lora_magnitude_vector"] = magnitude_tensor(lowrank, dtype)
            dora.add(component)
        ranks.setdefault(component, {})[module] = lowrank.rank
    if not tensors:
        raise AdapterFormatError(f"adapter {adapter.name!r} has no modules to write")
    metadata: dict[str, Any] = {}
    for component, module_ranks in ranks.items():
        r = Counter(module_ranks.values()).most_common(1)[0][0]
        pattern = {_pattern_key(component, m): rank for m, rank in module_ranks.items() if rank != r}
        targets = sorted({m.removeprefix(TEXT_MODEL) for m in module_ranks})
        config = {
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": targets,
            "use_rslora": False,
            "use_dora": component in dora,
            "lora_dropout": 0.0,
            "bias": "none",
        }
        metadata.update({f"{component}.{key}": value for key, value in config.items()})
    return tensors, metadata


def save(adapter: Adapter, path: str | Path, *, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `adapter` as a diffusers LoRA file, atomically.

    `path` is either a `.safetensors` file or a folder, which then receives `pytorch_lora_weights.safetensors`.
    Returns the path written (the file or the folder).
    """
    tensors, lora_metadata = to_state_dict(adapter, dtype)
    header = {
        "format": "pt",
        METADATA_KEY: json.dumps(lora_metadata, indent=2, sort_keys=True),
        **provenance_metadata(adapter.metadata.extra),
    }
    path = Path(path)
    as_folder = path.suffix != ".safetensors"
    with atomic_path(path, overwrite=overwrite, directory=as_folder) as tmp:
        if as_folder:
            tmp.mkdir(exist_ok=True)
        save_tensors(tensors, tmp / WEIGHTS_NAME if as_folder else tmp, header)
    return path
