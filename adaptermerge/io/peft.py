"""PEFT LoRA adapters: a folder with `adapter_config.json` and `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight` `(r, in)` and `….lora_B.weight` `(out, r)`; DoRA adds
`….lora_magnitude_vector`. The scale of each module is `alpha / r` (rsLoRA: `alpha / sqrt(r)`) with `r` and
`alpha` taken from `rank_pattern`/`alpha_pattern` the way peft resolves them. Written adapters carry the scale
folded into `lora_B`, so every module has `alpha = r`, `use_rslora` is off, and modules whose rank differs from
`r` are listed in `rank_pattern`/`alpha_pattern` under exact, `^`-anchored names.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import AdapterFormatError
from ..patterns import anchored, find_pattern_key
from ._source import DictSource, ModuleEntry, TensorSource, lazy_adapter, open_source, take_unused
from ._validate import factor_shapes, lora_config, warn
from ._write import atomic_path, magnitude_tensor, provenance_metadata, save_tensors

FORMAT = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude"}
# Config fields that describe the adapter rather than its scale; carried to the output unchanged.
_CARRIED = ("task_type", "base_model_name_or_path", "fan_in_fan_out", "revision")


def detect(path: Path, keys: list[str]) -> bool:
    """A folder with `adapter_config.json`, or a file whose keys all start with `base_model.model.`."""
    if path.is_dir():
        return (path / CONFIG_NAME).is_file()
    return bool(keys) and all(k.startswith(PREFIX) for k in keys) and any(".lora_A." in k for k in keys)


def _weights_file(path: Path) -> Path:
    for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        if (path / name).is_file():
            return path / name
    raise AdapterFormatError(f"{path}: has {CONFIG_NAME} but neither {WEIGHTS_NAME} nor {PICKLE_WEIGHTS_NAME}")


def read_config(path: Path) -> dict[str, Any]:
    """The adapter config, checked to be a LoRA config."""
    try:
        config = lora_config(json.loads(path.read_text()), str(path))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        if isinstance(err, AdapterFormatError):
            raise
        raise AdapterFormatError(f"{path}: not a readable JSON adapter config ({err})") from None
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{path}: peft_type is {peft_type!r}; only LORA adapters can be merged")
    if config.get("lora_bias"):
        raise AdapterFormatError(f"{path}: lora_bias adapters are not supported (their bias cannot be merged exactly)")
    return config


def module_scale(name: str, rank: int, config: Mapping[str, Any]) -> float:
    """`alpha / r` (or `alpha / sqrt(r)` with rsLoRA) for one module, resolving peft's patterns."""
    alpha_pattern = config.get("alpha_pattern") or {}
    key = find_pattern_key(alpha_pattern, name)
    alpha = alpha_pattern[key] if key is not None else config.get("lora_alpha", 8)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_against_config(source: TensorSource, ranks: Mapping[str, int], dora: bool, config: Mapping[str, Any]):
    """Warn when the config's `r` (or `rank_pattern`) or `use_dora` disagrees with the tensors, which win."""
    rank_pattern = config.get("rank_pattern") or {}
    if "r" in config:
        expected = {m: rank_pattern.get(find_pattern_key(rank_pattern, m), config["r"]) for m in ranks}
        differ = [m for m in ranks if ranks[m] != expected[m]]
        if differ:
            warn(
                f"{source.name}: the config gives {len(differ)} modules another rank than their tensors (first: "
                f"{differ[0]!r}, rank {expected[differ[0]]} in the config, {ranks[differ[0]]} in the file); "
                "the tensors' ranks are used"
            )
    if config.get("use_dora") and not dora:
        warn(f"{source.name}: the config says use_dora but no module has a lora_magnitude_vector; read as plain LoRA")


def parse(source: TensorSource, config: Mapping[str, Any]) -> dict[str, ModuleEntry]:
    """Module name → entry for every LoRA module in a PEFT state dict; refuses keys it cannot place."""
    config = lora_config(config, source.name)
    keys = source.keys()
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        for suffix, role in _SUFFIXES.items():
            if key.startswith(PREFIX) and key.endswith(suffix):
                found.setdefault(key[len(PREFIX) : -len(suffix)], {})[role] = key
    entries, ranks = {}, {}
    for name, roles in found.items():
        if "down" not in roles or "up" not in roles:
            raise AdapterFormatError(f"{source.name}: module {name!r} has only one of lora_A/lora_B")
        rank = ranks[name] = factor_shapes(source, name, roles["down"], roles["up"])[0][0]
        entries[name] = ModuleEntry(
            roles["down"], roles["up"], module_scale(name, rank, config), roles.get("magnitude")
        )
    take_unused(keys, {k for roles in found.values() for k in roles.values()}, source, "PEFT")
    _check_against_config(source, ranks, any(e.magnitude_key for e in entries.values()), config)
    return entries


def _adapter(source: TensorSource, config: Mapping[str, Any], name: str) -> Adapter:
    return lazy_adapter(
        source,
        parse(source, config),
        name,
        format=FORMAT,
        base_model=config.get("base_model_name_or_path"),
        extra={k: config[k] for k in _CARRIED if config.get(k) is not None},
    )


def load(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT adapter folder (or its weights file with the config beside it), lazily.

    Raises:
        AdapterFormatError: for a missing config or weights file, a non-LoRA config, or unknown keys.
        UnsafeFormatError: for `adapter_model.bin` without `allow_pickle`.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterFormatError(f"{folder}: no {CONFIG_NAME}; a PEFT adapter is a folder with config and weights")
    weights = _weights_file(folder) if path.is_dir() else path
    config = read_config(folder / CONFIG_NAME)
    return _adapter(open_source(weights, allow_pickle=allow_pickle), config, folder.name)


def from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], name: str = "adapter"
) -> Adapter:
    """An adapter from an in-memory PEFT state dict and its config (as a dict)."""
    return _adapter(DictSource(state_dict, name=name), config, name)


def to_state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT state dict and `adapter_config.json` contents of an adapter, scale folded (alpha = r)."""
    dtype = dtype or adapter.metadata.dtype
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, lowrank in adapter.items():
        down, up = lowrank.to(dtype).weights()
        tensors[f"{PREFIX}{name}.lora_A.weight"] = down
        tensors[f"{PREFIX}{name}.lora_B.weight"] = up
        if lowrank.magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude_tensor(lowrank, dtype)
        ranks[name] = lowrank.rank
    if not ranks:
        raise AdapterFormatError(f"adapter {adapter.name!r} has no modules to write")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {anchored(name): rank for name, rank in ranks.items() if rank != r}
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": adapter.is_dora,
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": adapter.metadata.base_model,
    }
    config.update({k: v for k, v in adapter.metadata.extra.items() if k in _CARRIED and k not in config})
    return tensors, config


def save(adapter: Adapter, path: str | Path, *, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `adapter` as a PEFT folder at `path`, atomically. Returns the folder."""
    tensors, config = to_state_dict(adapter, dtype)
    with atomic_path(path, overwrite=overwrite, directory=True) as tmp:
        tmp.mkdir(exist_ok=True)
        save_tensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt", **provenance_metadata(adapter.metadata.extra)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(path)
