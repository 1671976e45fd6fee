"""RMM: a reversible merge, `k` basis updates per module from which every task's update is recovered.

After Alipour & Amiri, "Towards Reversible Model Merging For Low-rank Weights", 2025,
https://arxiv.org/abs/2510.14163: instead of one merged adapter, keep a compact basis and per-task coefficients,
chosen in closed form and without data, so that each task comes back as a linear combination of the basis.

**What `rmm` computes is our derivation, not the paper's formulation.** Per the summaries we could read, the paper
solves its closed form on the factors, position by position (each row of `B` and each column of `A`, across the
tasks). That depends on how each adapter happens to be factored (`B G`, `G⁻¹ A` is the same update). `rmm` solves
the same kind of problem on whole updates instead, which is gauge-invariant and optimal in Frobenius norm:

    minimise  Σ_t ‖ΔW_t − Σ_{j≤k} c_tj E_j‖²_F.

With the `T × T` Gram matrix `G_st = ⟨ΔW_s, ΔW_t⟩_F` (computed on factors, `r × r` products only) and its
eigendecomposition `G = W Λ Wᵀ` (descending), the optimum (Eckart–Young on the stacked, vectorised updates) is
`E_j = λ_j^{-1/2} Σ_t W_tj ΔW_t` (Frobenius-orthonormal) and `c_tj = λ_j^{1/2} W_tj`; the error is `Σ_{j>k} λ_j`,
and `k = T` is exact. Each `E_j` is stored in core space: shared bases `U_B`, `U_A` of the stacked factors and a
`p × q` core `C_j = λ_j^{-1/2} Σ_t W_tj M_t`, where `M_t = U_Bᵀ ΔW_t U_A` is task `t`'s core.

Measured limits (`adaptermerge bench quality`, digits suite, 8 tasks of rank 8): the shared bases `U_B`, `U_A` are as
large as the stacked factors, so a bundle is larger than the separate adapters (1.9× at `k = 4`); and since distinct
tasks have nearly orthogonal updates, `k = T/2` keeps the largest tasks almost whole and loses the others (recovered
accuracy 0.10-1.00 of each task's own, mean 0.50). Rescaling a recovered update to its task's norm does not help
(mean 0.49). The per-position factor reading of the paper (a rank-`k` PCA across tasks of each row of `B` and each
column of `A`, coefficients per position) kept 0.85-0.99 (mean 0.94) there, at the size of the separate adapters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..adapter import Adapter, AdapterMetadata, check_compatible, module_union
from ..bundle import BundleModule, ReversibleBundle
from ..errors import IncompatibleAdaptersError, InvalidParameterError
from ..lowrank import COMPUTE_DTYPE, LowRank, gram, orthonormal_bases, pivot_signs
from ._registry import register_method

__all__ = ["RmmParams", "rmm", "rmm_module", "task_cores"]

_EIGEN_RTOL = 1e-12


@dataclass(frozen=True)
class RmmParams:
    """Parameters of `rmm`.

    Args:
        basis_size (`int`, *optional*): `k`, the number of basis updates kept per module, at most the number of
            adapters `T`; `min(2, T)` by default ("an equivalent of holding two models", as the paper puts it).
            `k = T` recovers every task exactly.
    """

    basis_size: int | None = field(
        default=None, metadata={"help": "RMM: basis updates kept per module (k ≤ number of adapters; default 2)."}
    )

    def __post_init__(self) -> None:
        if self.basis_size is not None and self.basis_size < 1:
            raise ValueError(f"basis_size must be a positive number of basis updates; got {self.basis_size}")


def task_cores(updates: Sequence[LowRank]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared core-space bases and every update's core: `ΔW_t = U_B M_t U_Aᵀ` exactly.

    Returns:
        `(U_B, U_A, cores)`: `(out, p)`, `(in, q)`, `(T, p, q)`, float64.
    """
    U_B, U_A = orthonormal_bases(updates)
    cores = torch.stack([(U_B.T @ u.B.to(COMPUTE_DTYPE)) @ (u.A.to(COMPUTE_DTYPE) @ U_A) for u in updates])
    return U_B, U_A, cores


def rmm_module(
    updates: Sequence[LowRank], basis_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ΔW-level reversible basis of one module's updates (our derivation; see the module docstring).

    Eigenvalues below `1e-12 · λ_max` are dropped before `λ^{-1/2}`, so a module of duplicated or zero updates keeps
    fewer than `basis_size` elements.

    Returns:
        `(U_B, U_A, basis_cores, coefficients, eigenvalues)` of shapes `(out, p)`, `(in, q)`, `(k', p, q)`,
        `(T, k')` and `(T,)` (descending), float64, with `k' ≤ basis_size`.
    """
    U_B, U_A, cores = task_cores(updates)
    eigenvalues, vectors = torch.linalg.eigh(gram(updates))
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    vectors = vectors * pivot_signs(vectors)
    top = float(eigenvalues[0]) if eigenvalues.numel() else 0.0
    keep = min(basis_size, int((eigenvalues > _EIGEN_RTOL * top).sum())) if top > 0 else 0
    root = eigenvalues[:keep].sqrt()
    basis = torch.einsum("tj,tpq->jpq", vectors[:, :keep] / root, cores)
    return U_B, U_A, basis, vectors[:, :keep] * root, eigenvalues


@register_method(
    "rmm",
    params=RmmParams,
    pretty_name="Reversible merge (RMM-style basis, ΔW-level Gram solution)",
    reference_url="https://arxiv.org/abs/2510.14163",
    per_module=False,
)
def rmm(adapters: Sequence[Adapter], weights: Sequence[float], params: RmmParams) -> ReversibleBundle:
    """Build a reversible bundle: per module, `k` basis updates and per-task coefficients from the Gram matrix.

    The closed form is the ΔW-level Gram solution (our derivation, gauge-invariant), not the paper's per-position
    factor formulation; see :mod:`adaptermerge.methods.rmm`. A task missing a module is a zero update there (its
    coefficients are zero). `weights` become the bundle's default weights for :meth:`ReversibleBundle.merge`; they
    do not change what is stored.

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
        U_B, U_A, basis, coefficients, eigenvalues = rmm_module(updates, k)
        full = torch.zeros(T, basis.shape[0], dtype=COMPUTE_DTYPE)
        full[present] = coefficients
        ranks = [0] * T
        for t, update in zip(present, updates):
            ranks[t] = update.rank
        bundle_modules[name] = BundleModule(U_B, U_A, basis, full, eigenvalues, tuple(ranks), updates[0].kernel_size)
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
    return ReversibleBundle(bundle_modules, tuple(names), tuple(weights), k, metadata)
