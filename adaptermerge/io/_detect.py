"""Format detection: one entry point that asks each format module whether a path is its own."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

from ..errors import AdapterFormatError
from . import diffusers, flux, flux2, hunyuan_video, kohya, ltx_video, peft, peft_state_dict, qwen_image, sd3, wan
from ._layout import Layout
from ._source import PICKLE_SUFFIXES, open_source

# Order matters: a PEFT folder is recognised by its config before any key sniffing.
FORMATS: dict[str, ModuleType] = {"peft": peft, "diffusers": diffusers, "kohya": kohya}
# Trainer layouts of DiT families, each a name map onto its family's diffusers names; checked before the formats
# above, since kohya Flux and musubi Wan keys also start with `lora_unet_` and fal's with `base_model.model.`.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        *flux2.LAYOUTS,  # before Flux.1's, whose names it shares: it claims only files of Flux.2's shapes
        *flux.LAYOUTS,
        *sd3.LAYOUTS,
        *hunyuan_video.LAYOUTS,
        *wan.LAYOUTS,
        *qwen_image.LAYOUTS,
        *ltx_video.LAYOUTS,
        *peft_state_dict.LAYOUTS,
    )
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def is_hub_id(text: str) -> bool:
    """Whether `text` is a hub repository id, `owner/name`, by huggingface_hub's rules (no `..`, `--` or `.git`)."""
    return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith(".git")


def format_module(name: str) -> ModuleType | Layout:
    """The io module of format `name`, or the :class:`Layout` of a trainer layout.

    Raises:
        AdapterFormatError: listing the known formats.
    """
    known = {**FORMATS, **LAYOUTS}
    try:
        return known[name]
    except KeyError:
        raise AdapterFormatError(f"unknown adapter format {name!r}; choose one of: {', '.join(known)}") from None


def _weights_candidates(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return files


def detect_format(path: str | Path, *, allow_pickle: bool = False) -> str:
    """The format of the adapter at `path` (a folder or a weights file).

    Raises:
        AdapterFormatError: when no format claims it, naming what was found.
        UnsafeFormatError: for a pickle checkpoint without `allow_pickle` (its keys can only be read by unpickling).
    """
    path = Path(path)
    if not path.exists():
        hint = " (it looks like a hub id: is the network reachable?)" if is_hub_id(str(path)) else ""
        raise AdapterFormatError(f"{path}: no such file or folder{hint}")
    if path.is_dir():
        # Folders are recognised by their file names (adapter_config.json, pytorch_lora_weights.*).
        for name, module in FORMATS.items():
            if module.detect(path, []):
                return name
    files = _weights_candidates(path) if path.is_dir() else [path]
    if len(files) != 1:
        raise AdapterFormatError(
            f"{path}: expected one adapter weights file in the folder, found {len(files)} "
            f"({', '.join(p.name for p in files) or 'none'}); pass the file itself"
        )
    file = files[0]
    source = open_source(file, allow_pickle=allow_pickle)
    keys = source.keys()
    for name, layout in LAYOUTS.items():
        if layout.detect(file, keys, source):
            return name
    for name, module in FORMATS.items():
        if module.detect(file, keys):
            return name
    shown = ", ".join(keys[:3]) or "no tensors"
    raise AdapterFormatError(
        f"{file}: not a LoRA file of a known format ({', '.join(FORMATS)}); its first keys are: {shown}"
    )
