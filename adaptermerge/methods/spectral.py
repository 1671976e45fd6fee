"""Spectral merges on Core Space cores: peft's `svd`, TSV-M (task singular vectors) and Iso-C (isotropic merging).

Each pure function takes the weighted cores `(T, ρ_B, ρ_A)` and returns the merged core; `tsv` and `iso_c` align
the updates with :mod:`.core_space`, merge and map back. Because the Core Space bases are orthonormal, an SVD of a
core is the SVD of the update it stands for, so these merges are the full-space methods restricted to the span of
the inputs. `svd` needs no alignment: it truncates the exact sum through `lowrank.truncate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..lowrank import COMPUTE_DTYPE, LowRank, concat, truncate
from ._registry import register_method
from .core_space import align, check_rank, rank_field, weight_vector

__all__ = ["isotropize", "polar", "task_singular_vectors"]


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor `P Qᵀ` of `matrix = P Σ Qᵀ` (its nearest matrix with orthonormal columns/rows)."""
    P, _, Qh = torch.linalg.svd(matrix, full_matrices=False)
    return P @ Qh


def task_singular_vectors(cores: torch.Tensor, quotas: Sequence[int]) -> torch.Tensor:
    """TSV-M on weighted cores: each task's leading singular triples, decorrelated by polar factors.

    Task `t` contributes its `quotas[t]` leading singular triples; the stacked left vectors `Ũ` and right vectors
    `Ṽᵀ` are replaced by their polar factors, and the result is `polar(Ũ) diag(s̃) polar(Ṽᵀ)`.
    """
    U, S, Vh = torch.linalg.svd(cores, full_matrices=False)  # one batched call for every task
    lefts = torch.cat([U[t, :, :quota] for t, quota in enumerate(quotas)], dim=1)
    values = torch.cat([S[t, :quota] for t, quota in enumerate(quotas)])
    rights = torch.cat([Vh[t, :quota] for t, quota in enumerate(quotas)], dim=0)
    return (polar(lefts) * values) @ polar(rights)


def isotropize(core: torch.Tensor) -> torch.Tensor:
    """Iso-C's flattening of the spectrum: `U (mean(S) I) Vᵀ` over the numerically nonzero singular values."""
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    tolerance = max(core.shape) * torch.finfo(S.dtype).eps * (S[0] if S.numel() else 0.0)
    keep = max(int((S > tolerance).sum()), 1)
    return S[:keep].mean() * (U[:, :keep] @ Vh[:keep])


def _tsv_quotas(updates: Sequence[LowRank], width: int) -> list[int]:
    """Slots per task: its own rank when the ranks fit in the core, else `width // T` each (the reference's rule),
    never more than the task's rank: its singular vectors beyond it span nothing of the task, and any choice of them
    would change the polar factors."""
    ranks = [update.rank for update in updates]
    return ranks if sum(ranks) <= width else [min(width // len(ranks), rank) for rank in ranks]


@dataclass(frozen=True)
class SvdParams:
    """Parameters of `svd`: the output rank, the largest input rank when unset (as in peft)."""

    rank: int | None = rank_field()

    def __post_init__(self) -> None:
        check_rank(self.rank)


@dataclass(frozen=True)
class SpectralParams:
    """Parameters of `tsv` and `iso_c`: an optional output rank."""

    rank: int | None = rank_field()

    def __post_init__(self) -> None:
        check_rank(self.rank)


@register_method(
    "svd",
    params=SvdParams,
    pretty_name="Weighted sum + truncated SVD (peft's svd, on factors)",
    reference_url="https://github.com/kohya-ss/sd-scripts/blob/main/networks/svd_merge_lora.py",
)
def svd(updates: Sequence[LowRank], weights: Sequence[float], params: SvdParams) -> LowRank:
    """The weighted sum truncated to `rank` by SVD: peft's `add_weighted_adapter(combination_type="svd")`.

    peft (after kohya's `svd_merge_lora`) builds every dense `ΔW`, sums and runs a full SVD; here the exact sum is
    kept as concatenated factors and truncated through orthonormal bases of both factors (from their small Gram
    matrices) and an SVD of the `R × R` core, which gives the same best rank-`rank` approximation (Eckart–Young)
    without any `out × in` matrix.

    Args:
        rank (`int`, *optional*): the output rank; the largest input rank by default, as in peft.
    """
    rank = params.rank if params.rank is not None else max(update.rank for update in updates)
    return truncate(concat(updates, weights), rank)


@register_method(
    "tsv",
    params=SpectralParams,
    pretty_name="TSV-M task singular vectors (in Core Space)",
    reference_url="https://arxiv.org/abs/2412.00081",
)
def tsv(updates: Sequence[LowRank], weights: Sequence[float], params: SpectralParams) -> LowRank:
    """TSV-Merge: keep each task's singular vectors and decorrelate them across tasks, on the Core Space cores.

    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025),
    https://arxiv.org/abs/2412.00081, applied to the weighted cores as in the Core Space code
    (https://arxiv.org/abs/2509.17786). Each task keeps its own rank's worth of singular triples (with equal ranks
    this is the reference's `R / T` quota; when the ranks exceed the core width, `width // T` each, at most its
    rank); the stacked singular vectors are orthogonalised by their polar factors. The papers' global coefficient α
    is the per-adapter `weights` here (scale all weights by α).

    Args:
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    weighted = cores * weight_vector(weights, cores)
    merged = task_singular_vectors(weighted, _tsv_quotas(updates, min(space.core_shape)))
    return space.to_lowrank(merged, rank=params.rank)


@register_method(
    "iso_c",
    params=SpectralParams,
    pretty_name="Iso-C isotropic merging (in Core Space)",
    reference_url="https://arxiv.org/abs/2502.04959",
)
def iso_c(updates: Sequence[LowRank], weights: Sequence[float], params: SpectralParams) -> LowRank:
    """Iso-C: the weighted sum with its spectrum flattened to the mean singular value, on the Core Space cores.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
    (ICML 2025), https://arxiv.org/abs/2502.04959, in Core Space (https://arxiv.org/abs/2509.17786: `ta` followed by
    `isotropize`). Only the numerically nonzero singular values of the sum are averaged and kept, so directions
    outside the inputs' span get nothing (full-space Iso-C on LoRA sums would average over `min(out, in)` values,
    mostly zero, and return a full-rank update; the two are not equal). The papers tune a global coefficient α:
    scale all `weights` by it (typical values are well above 1, since isotropizing shrinks the top direction).

    Args:
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    merged = isotropize((cores * weight_vector(weights, cores)).sum(dim=0).to(COMPUTE_DTYPE))
    return space.to_lowrank(merged, rank=params.rank)
