"""A folder of adapters as a library: an index of what is there, and how much their updates overlap.

:func:`scan_library` reads only file headers (formats, base models, modules, ranks, sizes), so indexing thousands
of adapters is quick. :func:`adapter_similarity` computes, for every pair of adapters, the cosine similarity of
their whole updates over the modules both adapt,

    cos(i, j) = Σ_m <ΔW_i^m, ΔW_j^m> / sqrt(Σ_m ‖ΔW_i^m‖² · Σ_m ‖ΔW_j^m‖²)     (m over the shared modules)

with every inner product and norm taken on the factors (:func:`adaptermerge.lowrank.gram`), never on a dense
update. Pairs with cosine near 1 are near-duplicates (merging them adds little); strongly negative pairs pull
the same weights in opposite directions and interfere when summed; near 0 they are independent, which is where
merges work best. Pairs are computed in tiles, each tile reading one module of its adapters at a time, on the
same local or Ray backends as batch merges.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import Adapter, module_shape, module_union
from .batch import Backend, map_tasks
from .io import load_adapter, model_family
from .io._source import PICKLE_SUFFIXES
from .io.peft import CONFIG_NAME
from .lowrank import gram

__all__ = ["LibraryEntry", "LibraryIndex", "SimilarityResult", "adapter_similarity", "find_adapters", "scan_library"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LibraryEntry:
    """One adapter of a library, described from its headers."""

    path: str
    format: str
    base_model: str | None
    family: str | None
    modules: int
    ranks: tuple[int, ...]
    parameters: int
    size_bytes: int
    dtype: str


@dataclass(frozen=True)
class LibraryIndex:
    """A scanned folder: the readable adapters, and the unreadable candidates with the reason."""

    folder: str
    entries: tuple[LibraryEntry, ...]
    unreadable: tuple[tuple[str, str], ...]

    def write(self, path: str | Path) -> Path:
        """Write the index as JSON (`.json`, everything) or CSV (`.csv`, one row per file; reason for unreadable)."""
        path = Path(path)
        if path.suffix == ".json":
            data = {
                "folder": self.folder,
                "adapters": [asdict(e) for e in self.entries],
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
            }
            path.write_text(json.dumps(data, indent=2))
            return path
        if path.suffix != ".csv":
            raise ValueError(f"{path}: write the index as .json or .csv")
        fields = [*LibraryEntry.__dataclass_fields__, "error"]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fields)
            writer.writeheader()
            for entry in self.entries:
                writer.writerow({**asdict(entry), "ranks": " ".join(map(str, entry.ranks)), "error": ""})
            for file, reason in self.unreadable:
                writer.writerow({"path": file, "error": reason})
        return path


def find_adapters(folder: str | Path) -> list[Path]:
    """Adapter candidates under `folder`: PEFT folders (not entered), and `.safetensors`/pickle files elsewhere.

    Hidden files and folders (such as unfinished atomic writes) are skipped.
    """
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if CONFIG_NAME in files:
            found.append(Path(root))
            dirs.clear()
            continue
        found += [Path(root, f) for f in sorted(files) if f.endswith((".safetensors", *PICKLE_SUFFIXES))]
    return found


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _describe(adapter: Adapter, path: Path, folder: Path) -> LibraryEntry:
    rank_of = getattr(adapter.modules, "rank_of", None)
    ranks = [rank_of(m) if rank_of else adapter[m].rank for m in adapter]
    parameters = sum(r * (s[0] + s[1]) for r, s in zip(ranks, (module_shape(adapter, m) for m in adapter)))
    return LibraryEntry(
        path=str(path.relative_to(folder)),
        format=adapter.metadata.format,
        base_model=adapter.metadata.base_model,
        family=model_family(adapter),
        modules=len(adapter),
        ranks=tuple(sorted(set(ranks))),
        parameters=parameters,
        size_bytes=_size(path),
        dtype=str(adapter.metadata.dtype).removeprefix("torch."),
    )


def scan_library(folder: str | Path, *, allow_pickle: bool = False) -> LibraryIndex:
    """Index the adapters under `folder`, reading headers only.

    Args:
        folder (`str` or `Path`): the library folder, searched recursively.
        allow_pickle (`bool`, defaults to `False`): read pickle checkpoints too (only for files you trust).

    Returns:
        `LibraryIndex`: readable adapters and, for every candidate that could not be read, the reason.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder; give the folder that holds the adapters")
    entries, unreadable = [], []
    for path in find_adapters(folder):
        try:
            entries.append(_describe(load_adapter(path, allow_pickle=allow_pickle), path, folder))
        except Exception as err:  # a library scan lists bad files instead of stopping at the first one
            unreadable.append((str(path.relative_to(folder)), str(err) or type(err).__name__))
    return LibraryIndex(str(folder), tuple(entries), tuple(unreadable))


@dataclass(frozen=True)
class _Tile:
    paths: tuple[str, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    allow_pickle: bool


def _similarity_tile(tile: _Tile) -> list[tuple[int, int, float, float, float, int]]:
    """`(i, j, Σ inner, Σ ‖i‖², Σ ‖j‖², shared modules)` for the tile's pairs `i < j`, one module at a time."""
    involved = sorted(set(tile.rows) | set(tile.cols))
    adapters = {k: load_adapter(tile.paths[k], allow_pickle=tile.allow_pickle) for k in involved}
    pairs = [(i, j) for i in tile.rows for j in tile.cols if i < j]
    sums = {pair: [0.0, 0.0, 0.0, 0] for pair in pairs}
    for module in module_union(list(adapters.values())):
        by_shape = defaultdict(list)
        for k, a in adapters.items():
            if module in a:
                by_shape[module_shape(a, module)].append(k)
        for members in by_shape.values():
            G = gram([adapters[k][module] for k in members]).tolist()
            position = {k: p for p, k in enumerate(members)}
            for i, j in pairs:
                if i in position and j in position:
                    p, q = position[i], position[j]
                    acc = sums[(i, j)]
                    acc[0] += G[p][q]
                    acc[1] += G[p][p]
                    acc[2] += G[q][q]
                    acc[3] += 1
    return [(i, j, *acc) for (i, j), acc in sums.items()]


@dataclass(frozen=True)
class SimilarityResult:
    """Pairwise cosine similarity of adapters' updates over shared modules.

    Args:
        names (`tuple[str, ...]`): the adapters, as paths relative to the library folder.
        cosine (`torch.Tensor` of shape `(n, n)`): float64, 1 on the diagonal, NaN for pairs sharing no module.
        shared (`torch.Tensor` of shape `(n, n)`): the number of modules each pair shares (same shape in both).
        unreadable (`tuple`): `(path, reason)` for candidates that could not be read, or tiles that failed.
    """

    names: tuple[str, ...]
    cosine: torch.Tensor
    shared: torch.Tensor
    unreadable: tuple[tuple[str, str], ...]

    def pairs(self, *, most: str = "similar", top: int = 5) -> list[tuple[str, str, float]]:
        """The `top` most similar pairs (highest cosine) or, with `most="interfering"`, the most negative ones."""
        i, j = torch.triu_indices(len(self.names), len(self.names), offset=1)
        values = self.cosine[i, j]
        keep = ~values.isnan() & (values < 0 if most == "interfering" else torch.ones_like(values, dtype=torch.bool))
        order = values[keep].argsort(descending=most != "interfering")[:top]
        rows, cols, vals = i[keep][order], j[keep][order], values[keep][order]
        return [(self.names[a], self.names[b], float(v)) for a, b, v in zip(rows.tolist(), cols.tolist(), vals)]

    def write(self, path: str | Path) -> Path:
        """Write the matrix as CSV (names in the first row and column) or JSON (with shared-module counts)."""
        path = Path(path)
        matrix = [[None if math.isnan(v) else round(v, 6) for v in row] for row in self.cosine.tolist()]
        if path.suffix == ".json":
            data = {
                "adapters": list(self.names),
                "cosine": matrix,
                "shared_modules": self.shared.tolist(),
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
            }
            path.write_text(json.dumps(data, indent=2))
        elif path.suffix == ".csv":
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["adapter", *self.names])
                writer.writerows(
                    [name, *("" if v is None else v for v in row)] for name, row in zip(self.names, matrix)
                )
        else:
            raise ValueError(f"{path}: write the matrix as .csv or .json")
        return path

    def heatmap(self, path: str | Path) -> Path:
        """Save a heatmap PNG of the matrix (matplotlib, Agg backend; labels shown up to 40 adapters)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.names)
        size = min(4 + 0.25 * n, 20)
        figure, axes = plt.subplots(figsize=(size + 1.5, size))
        image = axes.imshow(self.cosine.numpy(), cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
        figure.colorbar(image, ax=axes, label="cosine similarity of updates")
        if n <= 40:
            axes.set_xticks(range(n), self.names, rotation=90, fontsize=7)
            axes.set_yticks(range(n), self.names, fontsize=7)
        axes.set_title(f"{n} adapters: cosine similarity over shared modules")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return Path(path)


def adapter_similarity(
    folder_or_paths: str | Path | Sequence[str | Path],
    *,
    allow_pickle: bool = False,
    backend: Backend = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    progressbar: bool = False,
) -> SimilarityResult:
    """Pairwise cosine similarity of adapters' updates over their shared modules, on factors.

    Args:
        folder_or_paths (`str`, `Path` or a list of them): a library folder (scanned like :func:`scan_library`) or
            adapter paths.
        allow_pickle (`bool`, defaults to `False`): read pickle checkpoints too.
        backend, workers, ray_address: where tiles run, as for :func:`adaptermerge.batch.map_tasks`.
        progressbar (`bool`, defaults to `False`): show a progress bar over tiles.

    Returns:
        `SimilarityResult`: the matrix, shared-module counts and what could not be read.
    """
    if isinstance(folder_or_paths, (str, Path)):
        folder = Path(folder_or_paths)
        index = scan_library(folder, allow_pickle=allow_pickle)
        paths = [str(folder / e.path) for e in index.entries]
        names, unreadable = [e.path for e in index.entries], list(index.unreadable)
    else:
        paths, unreadable = [], []
        for path in map(str, folder_or_paths):
            try:
                load_adapter(path, allow_pickle=allow_pickle)
                paths.append(path)
            except Exception as err:  # listed, not fatal: the other adapters are still compared
                unreadable.append((path, str(err)))
        names = paths
    n = len(paths)
    cosine = torch.full((n, n), math.nan, dtype=torch.float64)
    cosine.fill_diagonal_(1.0)
    shared = torch.zeros(n, n, dtype=torch.int64)
    blocks = max(1, min(n, 2 * (workers if workers is not None else (os.cpu_count() or 1))))
    bounds = [round(b * n / blocks) for b in range(blocks + 1)]
    ranges = [tuple(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    tiles = [_Tile(tuple(paths), r, c, allow_pickle) for a, r in enumerate(ranges) for c in ranges[a:]]
    finished = map_tasks(_similarity_tile, tiles, backend=backend, workers=workers, ray_address=ray_address)
    bar = tqdm(finished, total=len(tiles), desc="similarity", unit="tile", disable=not progressbar or n < 2)
    for k, result in bar:
        if isinstance(result, BaseException):
            unreadable.append((f"tile {k} (adapters {tiles[k].rows[0]}..{tiles[k].cols[-1]})", str(result)))
            continue
        for i, j, dot, sq_i, sq_j, count in result:
            shared[i, j] = shared[j, i] = count
            if count:
                denominator = math.sqrt(sq_i * sq_j)
                cosine[i, j] = cosine[j, i] = dot / denominator if denominator > 0 else 0.0
    for i in range(n):
        shared[i, i] = len(load_adapter(paths[i], allow_pickle=allow_pickle))
    return SimilarityResult(tuple(names), cosine, shared, tuple(unreadable))
