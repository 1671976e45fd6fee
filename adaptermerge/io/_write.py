"""Atomic writes: an output is complete or absent, never half-written, and never replaced unless asked."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import InvalidTensorError, OutputExistsError, OutputPathError, WriteError
from ..lowrank import LowRank


def check_writable(path: Path, overwrite: bool, *, directory: bool = False) -> None:
    """Raise :class:`OutputExistsError` if `path` exists and `overwrite` is false.

    Raises:
        OutputExistsError: when `path` exists and `overwrite` is false.
        OutputPathError: when a file output would replace a folder (which may hold anything).
    """
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; choose another output path or pass overwrite=True", path=path)
    if not directory and path.is_dir() and not path.is_symlink():
        raise OutputPathError(
            f"{path} is a folder, and the output is one file; remove the folder or choose another path"
        )


def check_not_input(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is, contains or lies inside one of the local `inputs` (hub ids are skipped).

    Raises:
        OutputPathError: naming the output and the input, whatever `overwrite` says.
    """
    target = Path(output).resolve()
    for item in inputs:
        source = Path(item)
        if not source.exists():
            continue
        source = source.resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            relation = "is" if target == source else "contains" if source.is_relative_to(target) else "lies inside"
            raise OutputPathError(
                f"the output {output} {relation} the input {item}; writing it would change an input, so choose "
                "an output path outside the inputs"
            )


def _temporary_name(path: Path) -> str:
    """The prefix of this process's temporary folders for `path`: the output's name and our process id."""
    return f".{path.name}.adaptermerge-{os.getpid()}."


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary folders for `path` that a killed run of this tool left (their process is gone)."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.adaptermerge-(\d+)\.[\w]+\.tmp")
    for entry in path.parent.glob(f".{glob.escape(path.name)}.adaptermerge-*.tmp"):
        match = stale.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it into place in one rename.

    Everything lives in one temporary folder beside `path`, removed on the way out: the new output until it is
    moved into place and, for a folder output, the old output (file, folder or link) once it is moved aside. A file
    replaces the old one in one rename; a folder leaves the old output in the temporary folder only between two
    renames. The temporary folder a killed run left is removed by the next write to `path`.
    """
    path = Path(path)
    check_writable(path, overwrite, directory=directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_name(path), suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if directory and (path.exists() or path.is_symlink()):  # a rename cannot replace a folder: move it aside
            os.replace(path, tmp / ".old")
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def magnitude_tensor(lowrank: LowRank, dtype: torch.dtype) -> torch.Tensor:
    """A DoRA module's `lora_magnitude_vector` as peft holds it: `(out,)`, or `(1, out, 1, 1)` for a conv layer."""
    magnitude = lowrank.magnitude.to(dtype)
    return magnitude.reshape(1, -1, *([1] * len(lowrank.kernel_size))) if lowrank.kernel_size else magnitude


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None) -> None:
    """Write a safetensors file with contiguous copies of the tensors (safetensors refuses views).

    Raises:
        InvalidTensorError: when a tensor holds NaN or Inf (a file that no reader would accept).
        WriteError: when the file cannot be written (no space left, no permission).
    """
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            hint = "; write float32 or bfloat16 (--dtype)" if tensor.dtype == torch.float16 else ""
            raise InvalidTensorError(f"{key} holds NaN or Inf in {str(tensor.dtype).removeprefix('torch.')}{hint}")
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    except (SafetensorError, OSError) as err:
        raise WriteError(f"cannot write {path.name} into {path.parent.parent} ({err})") from None


def provenance_metadata(extra: Mapping[str, Any]) -> dict[str, str]:
    """The `adaptermerge` entry of the safetensors header: how this file was made, as JSON."""
    provenance = extra.get("provenance")
    return {"adaptermerge": json.dumps(provenance, default=str)} if provenance else {}
