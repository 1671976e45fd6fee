"""Where tensors come from: a lazily opened safetensors file, an in-memory state dict, or an opted-in pickle.

Every format module reads through a :class:`TensorSource`, and :class:`LazyModules` turns the key pairs a
format found into :class:`~adaptermerge.lowrank.LowRank` objects only when a module is accessed, so a merge
holds one module of each input at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..adapter import Adapter, AdapterMetadata
from ..errors import AdapterFormatError, InvalidTensorError, UnsafeFormatError
from ..lowrank import LowRank
from ._validate import factor_shapes, warn_zero_scales

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class TensorSource:
    """A read-only set of named tensors with shapes known before data is read."""

    name: str
    metadata: Mapping[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """A safetensors file, validated and indexed by `safe_open`; each tensor is read on :meth:`get`.

    Tensor data is read with a positioned read into a fresh buffer instead of through the memory map, so a merge
    that streams over a large adapter set keeps only the modules it holds resident, not every page it has touched.
    """

    def __init__(self, path: str | Path) -> None:
        self.name = str(path)
        path = Path(path)
        if not path.is_file():
            raise AdapterFormatError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise AdapterFormatError(f"{path}: the file is empty")
        try:
            self._file = safe_open(str(path), framework="pt")
            self._keys = list(self._file.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # RuntimeError: the map does not fit
            raise AdapterFormatError(
                f"{path}: not a readable safetensors file ({err}); it may be truncated or another format"
            ) from None
        self.metadata = self._file.metadata() or {}
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            self._entries = json.loads(handle.read(header_size))
        self._data_start = 8 + header_size
        self._path = path

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES.get(self._file.get_slice(key).get_dtype(), torch.float32)

    def get(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise AdapterFormatError(f"{self.name}: tensor {key!r} has dtype {entry['dtype']}, not a float type")
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        try:
            with self._path.open("rb") as handle:
                handle.seek(self._data_start + begin)
                if handle.readinto(buffer) != len(buffer):
                    raise OSError("the file ended early")
        except OSError as err:
            raise AdapterFormatError(f"{self.name}: cannot read tensor {key!r} ({err})") from None
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


class DictSource(TensorSource):
    """An in-memory state dict (what host libraries pass around)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>", metadata=None) -> None:
        self.name = name
        self._tensors = dict(state_dict)
        self.metadata = dict(metadata or {})
        for key, value in self._tensors.items():
            if not isinstance(value, torch.Tensor):
                raise AdapterFormatError(f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def open_source(path: str | Path, *, allow_pickle: bool = False) -> TensorSource:
    """Open a weights file: safetensors lazily, a pickle checkpoint only when `allow_pickle` is set.

    Raises:
        UnsafeFormatError: for `.bin`/`.pt`/`.pth`/`.ckpt` without `allow_pickle` (unpickling can run code).
        AdapterFormatError: for a missing, empty, truncated or unreadable file.
    """
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeFormatError(
                f"{path}: refusing to read a pickle checkpoint, since unpickling can run arbitrary code. Convert it "
                "to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust its origin."
            )
        if not path.is_file() or path.stat().st_size == 0:
            raise AdapterFormatError(f"{path}: the file is missing or empty")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt pickles
            raise AdapterFormatError(f"{path}: cannot read the pickle checkpoint ({err})") from None
        if not isinstance(state_dict, Mapping):
            raise AdapterFormatError(f"{path}: the checkpoint holds a {type(state_dict).__name__}, not a state dict")
        return DictSource(state_dict, name=str(path))
    return SafetensorsSource(path)


@dataclass(frozen=True)
class ModuleEntry:
    """Where one module's factors live in a source, and the scale to fold into `B`."""

    down_key: str
    up_key: str
    scale: float = 1.0
    magnitude_key: str | None = None
    # `(start, stop)` row ranges of `up` that make this module's `B`, in order: one part of a fused projection
    # (a kohya Flux qkv read as q, k and v sharing A) or a permutation of its rows; empty for all rows.
    rows: tuple[tuple[int, int], ...] = ()

    def take_rows(self, up: torch.Tensor) -> torch.Tensor:
        """This module's rows of the file's `up` tensor (a view when they are one range)."""
        if len(self.rows) == 1:
            return up[self.rows[0][0] : self.rows[0][1]]
        return torch.cat([up[start:stop] for start, stop in self.rows]) if self.rows else up


class LazyModules(Mapping[str, LowRank]):
    """Module name → LowRank, read from the source on access and checked for NaN/Inf then.

    Shapes are validated from the header when the mapping is built, so mismatched factors fail before any
    merge starts, and :meth:`shape_of` answers without reading tensor data.
    """

    def __init__(self, source: TensorSource, entries: Mapping[str, ModuleEntry]) -> None:
        self.source = source
        self.entries = dict(entries)
        self._shapes = {name: self._check_shapes(name, entry) for name, entry in self.entries.items()}

    def _check_shapes(self, name: str, entry: ModuleEntry) -> tuple[int, ...]:
        if not isinstance(entry, ModuleEntry):  # a LyCORIS module (io.lycoris.LycorisEntry) checks itself
            return entry.check(self.source, name)
        down, up = factor_shapes(self.source, name, entry.down_key, entry.up_key, entry.magnitude_key)
        in_flat = down[1] * (down[2] * down[3] if len(down) == 4 else 1)
        out = sum(stop - start for start, stop in entry.rows) if entry.rows else up[0]
        if any(stop > up[0] for _, stop in entry.rows):
            raise AdapterFormatError(
                f"{self.source.name}: module {name!r} takes rows up to {max(s for _, s in entry.rows)} of a fused "
                f"up/B factor of shape {up}"
            )
        return (out, in_flat, *down[2:])

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def rank_of(self, name: str) -> int:
        entry = self.entries[name]
        return self.source.shape(entry.down_key)[0] if isinstance(entry, ModuleEntry) else entry.rank(self.source)

    def dtype_of(self, name: str) -> torch.dtype:
        entry = self.entries[name]
        return self.source.dtype(entry.down_key) if isinstance(entry, ModuleEntry) else entry.dtype(self.source)

    def has_magnitude(self, name: str) -> bool:
        """Whether the module is DoRA, from its keys alone."""
        return self.entries[name].magnitude_key is not None

    def __getitem__(self, name: str) -> LowRank:
        entry = self.entries[name]
        if not isinstance(entry, ModuleEntry):
            lowrank = entry.read(self.source, name)
        else:
            up = entry.take_rows(self.source.get(entry.up_key))
            lowrank = LowRank.from_weights(self.source.get(entry.down_key), up, entry.scale)
        if entry.magnitude_key is not None:
            magnitude = self.source.get(entry.magnitude_key).reshape(-1)
            lowrank = LowRank(lowrank.A, lowrank.B, lowrank.kernel_size, magnitude)
        try:
            lowrank.check_finite()
        except InvalidTensorError as err:
            raise InvalidTensorError(f"{self.source.name}: module {name!r}: {err}") from None
        return lowrank

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries


class LazyTensors(Mapping[str, torch.Tensor]):
    """Side-car name → dense tensor, read from the source on access: `(key, rows)` per name, rows as in
    :class:`ModuleEntry` (a fused module's bias or delta split like its `B`)."""

    def __init__(self, source: TensorSource, keys: Mapping[str, tuple[str, tuple[tuple[int, int], ...]]]) -> None:
        self.source = source
        self.keys_of = dict(keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        key, rows = self.keys_of[name]
        tensor = ModuleEntry(key, key, rows=rows).take_rows(self.source.get(key))
        if not torch.isfinite(tensor).all():
            raise InvalidTensorError(f"{self.source.name}: side-car tensor {key!r} holds NaN or Inf values")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_of)

    def __len__(self) -> int:
        return len(self.keys_of)


def lazy_adapter(
    source: TensorSource,
    entries: Mapping[str, ModuleEntry],
    name: str,
    side_cars: Mapping[str, tuple[str, tuple[tuple[int, int], ...]]] | None = None,
    **metadata: Any,
) -> Adapter:
    """An adapter whose modules (and side-car tensors) are read from `source` on access; `metadata` fills
    :class:`AdapterMetadata`.

    Raises:
        AdapterFormatError: when the source holds no LoRA module.
    """
    modules = LazyModules(source, entries)
    if not modules:
        raise AdapterFormatError(f"{source.name}: holds no LoRA modules")
    warn_zero_scales(
        source, {module: entry.scale for module, entry in modules.entries.items() if isinstance(entry, ModuleEntry)}
    )
    dtype = modules.dtype_of(next(iter(modules)))
    metadata = AdapterMetadata(source=source.name, dtype=dtype, **metadata)
    return Adapter(modules, metadata, name, LazyTensors(source, side_cars or {}))


_SKIPPED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("skipped_unknown_keys", default=None)


@contextlib.contextmanager
def skipping_unknown_keys(skip: bool = True) -> Iterator[list[str]]:
    """Within the block, format parsers leave out keys they do not understand instead of refusing the file, and
    the yielded list collects them (with `skip` false, nothing changes and the list stays empty)."""
    skipped: list[str] = []
    token = _SKIPPED.set(skipped if skip else None)
    try:
        yield skipped
    finally:
        _SKIPPED.reset(token)


def unknown_keys_skipped() -> bool:
    """Whether parsers are inside :func:`skipping_unknown_keys`."""
    return _SKIPPED.get() is not None


def take_unused(keys: list[str], used: set[str], source: TensorSource, what: str) -> None:
    """Fail loudly, as diffusers' converters do, when a format parser left keys it did not understand (inside
    :func:`skipping_unknown_keys`, record them instead)."""
    left = [k for k in keys if k not in used]
    if left and (skipped := _SKIPPED.get()) is not None:
        skipped.extend(left)
    elif left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise AdapterFormatError(f"{source.name}: keys that are not {what} LoRA weights: {shown}")
