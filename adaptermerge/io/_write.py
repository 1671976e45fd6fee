"""Atomic writes: an output is complete or absent, never half-written, and never replaced unless asked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import OutputExistsError
from ..lowrank import LowRank


def check_writable(path: Path, overwrite: bool) -> None:
    """Raise :class:`OutputExistsError` if `path` exists and `overwrite` is false."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; choose another output path or pass overwrite=True", path=path)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it into place in one rename.

    For a directory output the old directory, if any, is moved aside first and removed only after the new one is in
    place, so an interruption leaves either the old or the new output.
    """
    path = Path(path)
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp if directory else tmp / path.name
    try:
        yield target
        if directory and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def magnitude_tensor(lowrank: LowRank, dtype: torch.dtype) -> torch.Tensor:
    """A DoRA module's `lora_magnitude_vector` as peft holds it: `(out,)`, or `(1, out, 1, 1)` for a conv layer."""
    magnitude = lowrank.magnitude.to(dtype)
    return magnitude.reshape(1, -1, *([1] * len(lowrank.kernel_size))) if lowrank.kernel_size else magnitude


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None) -> None:
    """Write a safetensors file with contiguous copies of the tensors (safetensors refuses views)."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))


def provenance_metadata(extra: Mapping[str, Any]) -> dict[str, str]:
    """The `adaptermerge` entry of the safetensors header: how this file was made, as JSON."""
    provenance = extra.get("provenance")
    return {"adaptermerge": json.dumps(provenance, default=str)} if provenance else {}
