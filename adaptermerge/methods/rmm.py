"""RMM: a reversible merge, a compact basis per module from which every task's factors are recovered.

After Alipour & Amiri, "Towards Reversible Model Merging For Low-rank Weights", 2025,
https://arxiv.org/abs/2510.14163: instead of one merged adapter, keep a compact basis, "an equivalent of holding
k models", and per-task coefficients, chosen in closed form and without data, so that each task comes back as a
linear combination. The paper works on the factors, position by position: for a row `p` of `B` (or a column `q`
of `A`), the `r`-vectors of the `T` tasks form `X_p` (`r × T`). Its closed form could not be read (see the project's
research notes); two readings fit the text, both uncentred Eckart–Young solutions on the factors, zero-padded to
the module's largest rank `r` (padding changes no update):

- `coefficients="position"` (default): per position, `X_p ≈ W_p C_p` with `W_p` the top-`k` left singular vectors
  of `X_p` (`r × k`) and `C_p = W_pᵀ X_p` (`k × T`). Stores `k · (r + T)` numbers per position,
  `(out + in) · k · (r + T)` per module: smaller than the separate adapters (`(out + in) · Σ r_t`) when
  `k < r T / (r + T)`, e.g. `k < 3.2` for four rank-16 LoRAs; exact once `k ≥ min(r, T)`.
- `coefficients="layer"`: one `C` (`k × T`) per module and factor, shared by every position: the top-`k`
  eigenvectors of the `T × T` Gram of the flattened factors, basis `W_p = X_p Cᵀ`, i.e. `k` basis adapters.
  Stores `k · r · (out + in) + 2 k T`: smaller than the adapters for every `k < T`, exact at `k = T`.

Measured with `adaptermerge bench quality` (recovery of each task at `k = T / 2`): see the README. Like the
paper's method, both act on the raw factors: two adapters with the same update factored differently (`B G`,
`G⁻¹ A`) give different bases. The earlier `rmm` (a Gram of whole updates `ΔW`) stored more than the adapters and
recovered less, so it is not offered.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..adapter import Adapter, AdapterMetadata, check_compatible, module_union
from ..bundle import BundleModule, FactorBasis, ReversibleBundle
from ..errors import AdapterMergeWarning, IncompatibleAdaptersError, InvalidParameterError
from ..lowrank import COMPUTE_DTYPE, LowRank, inner
from ._registry import register_method

__all__ = ["RmmParams", "position_basis", "rmm", "rmm_module", "shared_basis"]

Coefficients = Literal["position", "layer"]
_RTOL = 1e-12


@dataclass(frozen=True)
class RmmParams:
    """Parameters of `rmm`.

    Args:
        basis_size (`int`, *optional*): `k`, at most the number of adapters `T`; `min(2, T)` by default ("an
            equivalent of holding two models", as the paper puts it). `k = T` recovers every task exactly.
        coefficients (`"position"` or `"layer"`, defaults to `"position"`): a basis and coefficients per position
            of each factor, or coefficients shared by a module's factor (see the module docstring).
    """

    basis_size: int | None = field(
        default=None, metadata={"help": "RMM: basis elements kept (k ≤ number of adapters; default 2)."}
    )
    coefficients: Coefficients = field(
        default="position",
        metadata={"help": "RMM: coefficients per factor position (`position`) or per module (`layer`)."},
    )

    def __post_init__(self) -> None:
        if self.basis_size is not None and (isinstance(self.basis_size, bool) or self.basis_size < 1):
            raise ValueError(f"basis_size must be a positive number of basis elements; got {self.basis_size}")
        if self.coefficients not in ("position", "layer"):
            raise ValueError(f"`coefficients` must be 'position' or 'layer'; got {self.coefficients!r}")


def position_basis(positions: torch.Tensor, basis_size: int) -> FactorBasis:
    """Per position `p`, the best rank-`k` approximation `W_p C_p` of `positions[p]` (`r × T`).

    Singular values below `1e-12 · σ_max` of a position are zeroed, so its error stays that of the best rank-`k` fit.
    """
    U, S, Vh = torch.linalg.svd(positions.to(COMPUTE_DTYPE), full_matrices=False)
    keep = min(basis_size, S.shape[1])
    S = torch.where(S > _RTOL * S[:, :1], S, 0.0)
    return FactorBasis(U[:, :, :keep], S[:, :keep, None] * Vh[:, :keep])


def shared_basis(positions: torch.Tensor, basis_size: int) -> FactorBasis:
    """One `C` (`k × T`) for every position: the top-`k` eigenvectors of `Σ_p X_pᵀ X_p`, basis `W_p = X_p Cᵀ`.

    Eigenvalues below `1e-12 · λ_max` are dropped, so duplicated or zero factors keep fewer than `basis_size`.
    """
    X = positions.to(COMPUTE_DTYPE)
    flat = X.permute(2, 0, 1).reshape(X.shape[2], -1)
    eigenvalues, vectors = torch.linalg.eigh(flat @ flat.T)
    eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0), vectors.flip(1)
    top = float(eigenvalues[0]) if eigenvalues.numel() else 0.0
    keep = min(basis_size, int((eigenvalues > _RTOL * top).sum())) if top > 0 else 0
    C = vectors[:, :keep].T
    return FactorBasis(X @ C.T, C[None])


def rmm_module(
    updates: Sequence[LowRank], basis_size: int, coefficients: Coefficients, *, tasks: int, present: Sequence[int]
) -> BundleModule:
    """One module's bundle: a basis of the rows of the tasks' `B`s and one of the columns of their `A`s.

    Args:
        updates (`list[LowRank]`): the updates of the tasks that have the module.
        basis_size (`int`): `k`.
        coefficients (`"position"` or `"layer"`): which closed form.
        tasks (`int`): the number of tasks of the bundle; absent tasks get zero coefficients.
        present (`list[int]`): the task index of each update.
    """
    rank = max(update.rank for update in updates)
    first = updates[0]
    B = torch.zeros(first.out_features, rank, tasks, dtype=COMPUTE_DTYPE)  # position p = row p of every B_t
    A = torch.zeros(first.A.shape[1], rank, tasks, dtype=COMPUTE_DTYPE)  # position q = column q of every A_t
    for t, update in zip(present, updates):
        B[:, : update.rank, t] = update.B.to(COMPUTE_DTYPE)
        A[:, : update.rank, t] = update.A.T.to(COMPUTE_DTYPE)
    solve = position_basis if coefficients == "position" else shared_basis
    ranks = [0] * tasks
    for t, update in zip(present, updates):
        ranks[t] = update.rank
    module = BundleModule(solve(B, basis_size), solve(A, basis_size), tuple(ranks), torch.zeros(()), first.kernel_size)
    # ‖ΔW − ΔŴ‖² = ‖ΔW‖² + ‖ΔŴ‖² − 2⟨ΔW, ΔŴ⟩, each from r × r products of the factors
    error = total = torch.zeros((), dtype=COMPUTE_DTYPE)
    for t, update in zip(present, updates):
        recovered = module.factors(t)
        own = inner(update, update)
        error = error + own + inner(recovered, recovered) - 2 * inner(update, recovered)
        total = total + own
    residual = (error.clamp_min(0) / total) if total > 0 else torch.zeros((), dtype=COMPUTE_DTYPE)
    return dataclasses.replace(module, residual=residual)


@register_method(
    "rmm",
    params=RmmParams,
    pretty_name="Reversible merge (RMM: a basis of the factors + per-task coefficients)",
    reference_url="https://arxiv.org/abs/2510.14163",
    per_module=False,
    returns_adapter=False,
)
def rmm(adapters: Sequence[Adapter], weights: Sequence[float], params: RmmParams) -> ReversibleBundle:
    """Build a reversible bundle: per module, a basis of each factor and each task's coefficients.

    Alipour & Amiri (https://arxiv.org/abs/2510.14163), on the factors (see :mod:`adaptermerge.methods.rmm` for the
    two readings). A task missing a module has zero coefficients there. `weights` become the bundle's default
    weights for :meth:`ReversibleBundle.merge`; they do not change what is stored. Bases and coefficients are saved
    in the adapters' dtype.

    Returns:
        `ReversibleBundle`: save it with `.save(path)`, recover a task with `.recover(name)`, or mix with `.merge(w)`.

    Raises:
        InvalidParameterError: when `basis_size` exceeds the number of adapters.
        IncompatibleAdaptersError: for adapters of different shapes, DoRA modules, or two adapters of one name.
    """
    T = len(adapters)
    k = min(2, T) if params.basis_size is None else params.basis_size
    if k > T:
        raise InvalidParameterError(
            f"rmm: basis_size k={k} exceeds the {T} adapters; pass --basis-size {T} (exact) or less (compressed)"
        )
    names = [a.name for a in adapters]
    if len(set(names)) < T:
        raise IncompatibleAdaptersError(
            f"rmm names each task by its adapter; give the adapters distinct names: {names}"
        )
    modules = module_union(adapters)
    check_compatible(adapters, modules)
    bundle_modules = {}
    for name in modules:
        present = [t for t, adapter in enumerate(adapters) if name in adapter]
        updates = []
        for t in present:
            update = adapters[t][name]
            if update.magnitude is not None:
                raise IncompatibleAdaptersError(
                    f"adapter {adapters[t].name!r}, module {name!r} is a DoRA module; rmm takes plain LoRA updates"
                )
            updates.append(update)
        bundle_modules[name] = rmm_module(updates, k, params.coefficients, tasks=T, present=present)
    first = adapters[0].metadata
    provenance = {
        "method": "rmm",
        "params": dataclasses.asdict(params),
        "weights": list(weights),
        "sources": [a.metadata.source or a.name for a in adapters],
    }
    metadata = AdapterMetadata(
        base_model=first.base_model,
        format=first.format,
        source=None,
        dtype=first.dtype,
        extra={**first.extra, "provenance": provenance},
    )
    bundle = ReversibleBundle(bundle_modules, tuple(names), tuple(weights), k, metadata)
    storage = bundle.storage()
    stored, separate = storage["bundle_parameters"], storage["separate_parameters"]
    if k < T and stored >= separate:
        warnings.warn(
            f"rmm: the {params.coefficients!r} bundle with basis_size {k} stores {stored:,} numbers, not fewer than "
            f"the {T} separate adapters' {separate:,} (per-position coefficients cost k·(r + T) a row or column: "
            "compact only while k < r·T / (r + T)); pass a smaller --basis-size, or --coefficients layer (k basis "
            "adapters, compact for every k < T)",
            AdapterMergeWarning,
            stacklevel=2,
        )
    return bundle
