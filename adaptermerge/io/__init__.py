"""Reading and writing adapters: PEFT folders, kohya/A1111 files and diffusers LoRA files.

Each format module offers the same verbs: `detect`, `load`, `save`, and pure `from_state_dict`/`to_state_dict`
converters. :func:`load_adapter` detects the format (or takes `format=`), resolves hub ids through
huggingface_hub, and reads lazily; :func:`save_adapter` writes atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import AdapterFormatError
from ._detect import FORMATS, LAYOUTS, detect_format, format_module, is_hub_id
from ._family import check_same_family, model_family
from ._layout import Layout
from ._source import skipping_unknown_keys
from ._write import check_not_input

__all__ = [
    "FORMATS",
    "HUB_PREFIX",
    "LAYOUTS",
    "check_not_input",
    "check_same_family",
    "detect_format",
    "is_hub_id",
    "load_adapter",
    "model_family",
    "resolve_path",
    "save_adapter",
]

HUB_PREFIX = "hub:"
# The layout kohya's own trainers write for a family whose modules they name as the original code does.
KOHYA_LAYOUTS = {"Flux.1": "kohya-flux", "Flux.2": "kohya-flux2", "SD3": "kohya-sd3", "Wan": "musubi-wan"}


def resolve_path(path_or_id: str | Path, *, allow_pickle: bool = False) -> Path:
    """A local path for `path_or_id`: the path itself when it exists, else a hub snapshot of the repository.

    `hub:owner/name` is only ever resolved through huggingface_hub, never as a local path (recipes write hub entries
    so). Only adapter files are downloaded (`*.safetensors`, `*.json`, and pickles when `allow_pickle`).

    Raises:
        AdapterFormatError: for a `hub:` entry that is not a repository id, or a repository the hub cannot provide.
    """
    text = str(path_or_id)
    if text.startswith(HUB_PREFIX):
        repo_id = text.removeprefix(HUB_PREFIX)
        if not is_hub_id(repo_id):
            raise AdapterFormatError(f"{text}: not a hub repository id (owner/name)")
        return _snapshot(repo_id, allow_pickle, f"{text}: the hub repository could not be reached")
    path = Path(path_or_id)
    if path.exists() or not is_hub_id(text):
        return path
    # a mistyped local path looks like a hub id: say first that the path does not exist
    failure = f"{text}: no such file or folder, and no hub repository of that name could be reached"
    return _snapshot(text, allow_pickle, failure)


def _snapshot(repo_id: str, allow_pickle: bool, failure: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.safetensors", "*.json"] + (["*.bin", "*.pt", "*.ckpt"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:  # ValueError: an invalid id
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise AdapterFormatError(f"{failure} ({reason})") from None


def load_adapter(
    path: str | Path,
    *,
    format: str = "auto",
    allow_pickle: bool = False,
    name: str | None = None,
    skip_unknown: bool = False,
) -> Adapter:
    """Read an adapter lazily from a local path or hub id.

    Args:
        path (`str` or `Path`): a PEFT folder, a `.safetensors` LoRA file, or a hub id (`hub:owner/name` for one
            that is never read as a local path).
        format (`str`, defaults to `"auto"`): `"peft"`, `"kohya"`, `"diffusers"`, a trainer layout (`"kohya-flux"`,
            `"comfyui-wan"`, ...; see `LAYOUTS`), or `"auto"` to detect.
        allow_pickle (`bool`, defaults to `False`): read `.bin`/`.pt`/`.ckpt` checkpoints (unpickling can run code).
        name (`str`, *optional*): the adapter's name in tables and errors; the file or folder stem by default.
        skip_unknown (`bool`, defaults to `False`): read a file even when it holds keys nothing understands (a
            module with such a key is left out whole), listing them in `metadata.extra["unused_keys"]`.

    Raises:
        AdapterFormatError: for unknown formats and unreadable, empty or truncated files.
        UnsafeFormatError: for pickle checkpoints without `allow_pickle`.
    """
    local = resolve_path(path, allow_pickle=allow_pickle)
    fmt = detect_format(local, allow_pickle=allow_pickle) if format == "auto" else format
    with skipping_unknown_keys(skip_unknown) as unused:
        adapter = format_module(fmt).load(local, allow_pickle=allow_pickle)
    if unused:
        adapter = adapter.with_modules(adapter.modules, extra={**adapter.metadata.extra, "unused_keys": unused})
    stem = local.stem if local.is_file() and local.name != "adapter_model.safetensors" else local.name
    return Adapter(adapter.modules, adapter.metadata, name or stem or adapter.name, adapter.side_cars)


def save_adapter(
    adapter: Adapter,
    path: str | Path,
    *,
    format: str | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an adapter atomically in `format` (the adapter's own format by default).

    A Flux.1 or Wan adapter written as `"kohya"` gets its family's kohya layout (`kohya-flux`, `musubi-wan`), the
    BFL/Wan module names that sd-scripts and musubi-tuner write and that diffusers' kohya converters read.

    Raises:
        OutputExistsError: when `path` exists and `overwrite` is false.
        AdapterFormatError: for an unknown format or modules the format cannot express.
    """
    known = adapter.metadata.format in FORMATS or adapter.metadata.format in LAYOUTS
    fmt = format or (adapter.metadata.format if known else "peft")
    if fmt == "kohya" and model_family(adapter) in KOHYA_LAYOUTS:
        fmt = KOHYA_LAYOUTS[model_family(adapter)]
    writer = format_module(fmt)
    if adapter.side_cars and not isinstance(writer, Layout):
        shown = ", ".join(list(adapter.side_cars)[:3])
        own = adapter.metadata.format
        layout = own if own in LAYOUTS else f"one of {', '.join(LAYOUTS)}"
        raise AdapterFormatError(
            f"adapter {adapter.name!r} carries {len(adapter.side_cars)} side-car tensors ({shown}, ...), which "
            f"{fmt} files cannot hold; write it in a trainer layout (--format {layout})"
        )
    return writer.save(adapter, path, overwrite=overwrite, dtype=dtype)
