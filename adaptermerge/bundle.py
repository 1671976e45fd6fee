"""A reversible bundle: per module, a basis of each factor and per-task coefficients, from which every task comes back.

Made by the `rmm` method (:mod:`adaptermerge.methods.rmm`). Per module and factor the bundle holds, for every
position `p` (a row of `B`, a column of `A`), a basis `W_p` (`r × k`) and coefficients `C_p` (`k × T`, or one `C`
shared by every position), so that task `t`'s factors are recovered row by row (column by column) as
`W_p C_p[:, t]`, and any weighted merge is the concatenation of the recovered `w_t B̂_t Â_t`, without building an
`out × in` matrix.

On disk a bundle is one directory: `rmm_bundle.safetensors` (the tensors, keyed `<module>.<B|A>_<name>`) and
`rmm_bundle.json` (the manifest: task names, default weights, per-module shapes and task ranks, provenance),
written atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .adapter import Adapter, AdapterMetadata
from .errors import AdapterFormatError, InvalidParameterError
from .io._write import atomic_path, save_tensors
from .lowrank import COMPUTE_DTYPE, LowRank, concat, truncate

__all__ = ["BundleModule", "FactorBasis", "ReversibleBundle", "is_bundle", "load_bundle"]

MANIFEST_NAME = "rmm_bundle.json"
TENSORS_NAME = "rmm_bundle.safetensors"
FORMAT_TAG = "adaptermerge.rmm_bundle"
FORMAT_VERSION = 2
_TENSOR_FIELDS = ("basis", "coefficients")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class FactorBasis:
    """One factor of one module: position `p`'s vector of task `t` is `basis[p] @ coefficients[p or 0][:, t]`.

    Args:
        basis (`torch.Tensor` of shape `(P, r, k)`): per position, `k` basis vectors of length `r`.
        coefficients (`torch.Tensor` of shape `(P, k, T)` or `(1, k, T)`): per position, or shared by all.
    """

    basis: torch.Tensor
    coefficients: torch.Tensor

    def vectors(self, task: int) -> torch.Tensor:
        """Task `task`'s `(P, r)` vectors, in float64."""
        coefficients = self.coefficients[:, :, task].to(COMPUTE_DTYPE)
        return (self.basis.to(COMPUTE_DTYPE) * coefficients[:, None, :]).sum(dim=-1)

    @property
    def num_parameters(self) -> int:
        return self.basis.numel() + self.coefficients.numel()


@dataclass(frozen=True)
class BundleModule:
    """One module of a bundle.

    Args:
        B (`FactorBasis`): the rows of the tasks' `B`s (positions: `out`), zero-padded to the largest rank `r`.
        A (`FactorBasis`): the columns of the tasks' `A`s (positions: `in`).
        ranks (`tuple[int, ...]`): each task's input rank in this module, `0` where the task lacks the module.
        residual (`torch.Tensor`, 0-d): `Σ_t ‖ΔW_t − ΔŴ_t‖² / Σ_t ‖ΔW_t‖²` over the tasks present, measured when built.
        kernel_size (`tuple[int, ...]`): the conv kernel size, `()` for linear layers.
    """

    B: FactorBasis
    A: FactorBasis
    ranks: tuple[int, ...]
    residual: torch.Tensor
    kernel_size: tuple[int, ...] = ()

    def factors(self, task: int) -> LowRank:
        """Task `task`'s recovered update `B̂ Â`, at the padded rank `r`, in float64."""
        return LowRank(self.A.vectors(task).T.contiguous(), self.B.vectors(task), self.kernel_size)

    @property
    def basis_kept(self) -> int:
        return max(self.B.basis.shape[2], self.A.basis.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.basis.shape[0], self.A.basis.shape[0])

    @property
    def num_parameters(self) -> int:
        return self.B.num_parameters + self.A.num_parameters

    @property
    def separate_parameters(self) -> int:
        """Parameters of the tasks' own factors in this module, `Σ_t r_t (out + in)`."""
        return sum(self.ranks) * sum(self.shape)

    @property
    def relative_residual(self) -> float:
        """The relative squared error of the recovered updates, `Σ_t ‖ΔW_t − ΔŴ_t‖² / Σ_t ‖ΔW_t‖²`."""
        return float(self.residual)


@dataclass(frozen=True)
class ReversibleBundle:
    """`k` basis updates per module plus per-task coefficients: every task is recoverable, any mix is mergeable.

    Args:
        modules (`Mapping[str, BundleModule]`): module name → its bases, cores and coefficients.
        task_names (`tuple[str, ...]`): the tasks (input adapters), in coefficient-row order.
        weights (`tuple[float, ...]`): the default task weights of :meth:`merge`.
        basis_size (`int`): the `k` asked for (a module keeps fewer when its Gram matrix has lower rank).
        metadata (`AdapterMetadata`): base model, format and dtype of the sources, and provenance in `extra`.
    """

    modules: Mapping[str, BundleModule]
    task_names: tuple[str, ...]
    weights: tuple[float, ...]
    basis_size: int
    metadata: AdapterMetadata = field(default_factory=AdapterMetadata)

    def __repr__(self) -> str:
        tasks, k, modules = len(self.task_names), self.basis_size, len(self.modules)
        return f"ReversibleBundle(tasks={tasks}, basis_size={k}, modules={modules})"

    def task_index(self, task: str | int) -> int:
        """The row of `task` (a name, or an index).

        Raises:
            InvalidParameterError: for an unknown task, listing the known ones.
        """
        if isinstance(task, int) and 0 <= task < len(self.task_names):
            return task
        if task in self.task_names:
            return self.task_names.index(task)
        raise InvalidParameterError(f"the bundle holds no task {task!r}; its tasks are: {', '.join(self.task_names)}")

    def recover(self, task: str | int, *, truncate_rank: bool = True) -> Adapter:
        """Task `task`'s adapter, rebuilt from the basis (exact when `k` = the number of tasks).

        Args:
            task (`str` or `int`): a task name (see `task_names`) or its index.
            truncate_rank (`bool`, defaults to `True`): bring each module back to the task's own rank by a low-rank
                SVD (ours; exact when the recovery is, the best approximation at that rank otherwise). When false,
                the recovered factors are returned as they are, at the module's largest task rank.

        Raises:
            InvalidParameterError: for an unknown task.
        """
        t = self.task_index(task)
        modules = {}
        for name, module in self.modules.items():
            if module.ranks[t] == 0:
                continue
            lowrank = module.factors(t)
            modules[name] = truncate(lowrank, module.ranks[t]) if truncate_rank else lowrank
        return self._adapter(modules, self.task_names[t], {"recovered_task": self.task_names[t]})

    def merge(
        self, weights: Sequence[float] | None = None, *, rank: int | None = None, adapter_name: str = "merged"
    ) -> Adapter:
        """A plain adapter for `Σ_t w_t ΔŴ_t` (the bundle's default weights when `weights` is None).

        Args:
            weights (`list[float]`, *optional*): one weight per task, in `task_names` order.
            rank (`int`, *optional*): truncate each module to this rank by a low-rank SVD; the sum of the recovered
                ranks otherwise.
            adapter_name (`str`, defaults to `"merged"`): the result's name.

        Raises:
            InvalidParameterError: for a wrong number of weights.
        """
        weights = list(self.weights if weights is None else weights)
        if len(weights) != len(self.task_names):
            raise InvalidParameterError(
                f"got {len(weights)} weights for the bundle's {len(self.task_names)} tasks "
                f"({', '.join(self.task_names)}); give one per task"
            )
        modules = {}
        for name, module in self.modules.items():
            present = [t for t, r in enumerate(module.ranks) if r and weights[t] != 0.0]
            if not present:
                continue
            lowrank = concat([module.factors(t) for t in present], [weights[t] for t in present])
            modules[name] = truncate(lowrank, rank) if rank is not None else lowrank
        return self._adapter(modules, adapter_name, {"merged_weights": weights})

    def _adapter(self, modules: dict[str, LowRank], name: str, note: dict[str, Any]) -> Adapter:
        dtype = self.metadata.dtype
        provenance = {**self.metadata.extra.get("provenance", {}), **note}
        metadata = AdapterMetadata(
            base_model=self.metadata.base_model,
            format=self.metadata.format,
            source=None,
            dtype=dtype,
            extra={**self.metadata.extra, "provenance": provenance},
        )
        return Adapter({n: lr.to(dtype) for n, lr in modules.items()}, metadata, name)

    def storage(self) -> dict[str, Any]:
        """Sizes of the bundle and of the `T` separate adapters, and the predicted reconstruction errors."""
        bundle = sum(m.num_parameters for m in self.modules.values())
        separate = sum(m.separate_parameters for m in self.modules.values())
        itemsize = self.metadata.dtype.itemsize
        bundle_bytes, separate_bytes = bundle * itemsize, separate * itemsize
        per_module = []
        for name, m in self.modules.items():
            per_module.append(
                {
                    "module": name,
                    "shape": list(m.shape),
                    "task_ranks": list(m.ranks),
                    "basis_kept": m.basis_kept,
                    "basis_rank": m.B.basis.shape[1],
                    "parameters": m.num_parameters,
                    "separate_parameters": m.separate_parameters,
                    "relative_residual": m.relative_residual,
                }
            )
        return {
            "tasks": list(self.task_names),
            "basis_size": self.basis_size,
            "modules": len(self.modules),
            "dtype": str(self.metadata.dtype).removeprefix("torch."),
            "bundle_parameters": bundle,
            "separate_parameters": separate,
            "bundle_bytes": bundle_bytes,
            "separate_bytes": separate_bytes,
            "size_ratio": bundle_bytes / separate_bytes if separate_bytes else math.nan,
            "per_module": per_module,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the bundle directory atomically. Returns the directory.

        Raises:
            OutputExistsError: when `path` exists and `overwrite` is false.
        """
        dtype = self.metadata.dtype
        tensors, modules = {}, {}
        for name, m in self.modules.items():
            for side in ("B", "A"):
                for field_name in _TENSOR_FIELDS:
                    kept_dtype = dtype
                    tensors[f"{name}.{side}_{field_name}"] = getattr(getattr(m, side), field_name).to(kept_dtype)
            tensors[f"{name}.residual"] = m.residual.to(COMPUTE_DTYPE)
            modules[name] = {"shape": list(m.shape), "kernel_size": list(m.kernel_size), "ranks": list(m.ranks)}
        manifest = {
            "format": FORMAT_TAG,
            "version": FORMAT_VERSION,
            "method": "rmm",
            "tasks": list(self.task_names),
            "weights": list(self.weights),
            "basis_size": self.basis_size,
            "base_model": self.metadata.base_model,
            "source_format": self.metadata.format,
            "dtype": str(self.metadata.dtype).removeprefix("torch."),
            "extra": self.metadata.extra,
            "modules": modules,
        }
        with atomic_path(path, overwrite=overwrite, directory=True) as tmp:
            tmp.mkdir(exist_ok=True)
            save_tensors(tensors, tmp / TENSORS_NAME, {"format": "pt", FORMAT_TAG: str(FORMAT_VERSION)})
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ReversibleBundle:
        """Read a bundle directory written by :meth:`save`.

        Raises:
            AdapterFormatError: when `path` is not a bundle directory or its files disagree.
        """
        path = Path(path)
        if not is_bundle(path):
            raise AdapterFormatError(
                f"{path}: not a reversible bundle (no {MANIFEST_NAME} with format {FORMAT_TAG!r})"
            )
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        if manifest.get("version", 0) != FORMAT_VERSION:
            raise AdapterFormatError(
                f"{path}: bundle version {manifest.get('version')} is not this adaptermerge's ({FORMAT_VERSION}); "
                "merge the adapters with --method rmm again"
            )
        try:
            tensors = load_file(str(path / TENSORS_NAME))
            modules = {
                name: BundleModule(
                    *(FactorBasis(*(tensors[f"{name}.{side}_{f}"] for f in _TENSOR_FIELDS)) for side in ("B", "A")),
                    ranks=tuple(entry["ranks"]),
                    residual=tensors[f"{name}.residual"],
                    kernel_size=tuple(entry["kernel_size"]),
                )
                for name, entry in manifest["modules"].items()
            }
        except (OSError, KeyError) as err:
            raise AdapterFormatError(f"{path}: incomplete reversible bundle ({err}); write it again") from None
        metadata = AdapterMetadata(
            base_model=manifest.get("base_model"),
            format=manifest.get("source_format", "peft"),
            source=str(path),
            dtype=_DTYPES.get(manifest.get("dtype"), torch.float32),
            extra=manifest.get("extra", {}),
        )
        return cls(modules, tuple(manifest["tasks"]), tuple(manifest["weights"]), manifest["basis_size"], metadata)


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle directory (holds `rmm_bundle.json` marked as one)."""
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT_TAG
    except (OSError, json.JSONDecodeError):
        return False


def load_bundle(path: str | Path) -> ReversibleBundle:
    """Read a bundle directory (see :meth:`ReversibleBundle.load`)."""
    return ReversibleBundle.load(path)
