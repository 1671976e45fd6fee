"""Spectral merges: peft's `svd`, TSV-M (task singular vectors), Iso-C and Iso-CTS (isotropic merging), STAR.

Each pure function takes the weighted cores `(T, ρ_B, ρ_A)` and returns the merged core; `tsv`, `iso_c` and
`iso_cts` align the updates with :mod:`.core_space`, merge and map back. Because the Core Space bases are
orthonormal, an SVD of a core is the SVD of the update it stands for, so these merges are the full-space methods
restricted to the span of the inputs. `svd` needs no alignment: it truncates the exact sum through
`lowrank.truncate`; `star` works on each update's own SVD (from its factors) and concatenates the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..lowrank import COMPUTE_DTYPE, LowRank, concat, truncate
from ..lowrank import svd as lowrank_svd
from ._registry import register_method
from .core_space import align, check_rank, rank_field, weight_vector

__all__ = ["common_and_task_sizes", "iso_cts_merge", "isotropize", "polar", "star_truncate", "task_singular_vectors"]


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


def _numerical_rank(S: torch.Tensor, shape: Sequence[int], largest: torch.Tensor | float | None = None) -> int:
    """How many of the descending singular values `S` exceed `max(shape) · eps · largest` (`S[0]` by default)."""
    largest = (S[0] if S.numel() else 0.0) if largest is None else largest
    return int((S > max(shape) * torch.finfo(S.dtype).eps * largest).sum())


def isotropize(core: torch.Tensor) -> torch.Tensor:
    """Iso-C's flattening of the spectrum: `U (mean(S) I) Vᵀ` over the numerically nonzero singular values."""
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    keep = max(_numerical_rank(S, core.shape), 1)
    return S[:keep].mean() * (U[:, :keep] @ Vh[:keep])


def common_and_task_sizes(width: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """Iso-CTS' split of `width` directions into `k` common ones and `s` per task, with `k + tasks · s = width`.

    The reference's rule: `k0 = int(width · f)`, `s = round((width - k0) / tasks)` (Python's rounding), `k = width -
    tasks · s`. Where rounding up leaves no room for the common space (`k < 0`, a small `width` and `f`), `s` is
    rounded down instead.
    """
    free = width - int(width * common_space_fraction)
    per_task = round(free / tasks)
    if tasks * per_task > width:
        per_task = free // tasks
    return width - tasks * per_task, per_task


def iso_cts_merge(cores: torch.Tensor, ranks: Sequence[int], common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS on weighted cores: the sum's top singular directions plus each task's own, with a flat spectrum.

    The `k` leading left/right singular vectors of the sum form the common subspace; each task's core, with the
    common left subspace projected out, adds its `s` leading singular triples (at most its rank and its numerical
    rank: directions with no singular value are arbitrary); the stacked vectors are orthogonalised by their polar
    factors and every kept direction gets the mean of the kept singular values. `k` and `s` come from
    :func:`common_and_task_sizes` over the core width (the stacked rank `R`, not `min(out, in)`).
    """
    total = cores.sum(dim=0)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    common, per_task = common_and_task_sizes(min(total.shape), cores.shape[0], common_space_fraction)
    common = min(common, _numerical_rank(S, total.shape))
    U_c = U[:, :common]
    lefts, values, rights = [U_c], [S[:common]], [Vh[:common]]
    U_t, S_t, Vh_t = torch.linalg.svd(cores - U_c @ (U_c.T @ cores), full_matrices=False)  # every task at once
    for t, rank in enumerate(ranks):
        keep = min(per_task, rank, _numerical_rank(S_t[t], total.shape, S[0]))
        lefts.append(U_t[t, :, :keep])
        values.append(S_t[t, :keep])
        rights.append(Vh_t[t, :keep])
    values = torch.cat(values)
    if values.numel() == 0:  # the weighted cores sum to zero and have nothing of their own
        return torch.zeros_like(total)
    return values.mean() * (polar(torch.cat(lefts, dim=1)) @ polar(torch.cat(rights, dim=0)))


def star_truncate(update: LowRank, eta: float) -> LowRank:
    """STAR on one update: keep the fewest leading singular triples whose values sum to `eta` % of the nuclear norm
    (the reference's `searchsorted(cumsum(S), eta / 100 · ΣS) + 1`), scaled so the nuclear norm is unchanged.

    Computed from the factors (:func:`adaptermerge.lowrank.svd`); the result has rank at most the update's, its
    factors balanced by `sqrt` of the rescaled singular values.
    """
    U, S, Vh = lowrank_svd(update)
    total = S.sum()
    keep = min(int(torch.searchsorted(S.cumsum(0), total * eta / 100)) + 1, S.numel())
    root = (S[:keep] * (total / S[:keep].sum())).sqrt()
    dtype = update.dtype if update.dtype.is_floating_point else torch.float32
    return LowRank((root[:, None] * Vh[:keep]).to(dtype), (U[:, :keep] * root).to(dtype), update.kernel_size)


def _tsv_quotas(updates: Sequence[LowRank], width: int) -> list[int]:
    """Slots per task: its own rank when the ranks fit in the core, else `width // T` each (the reference's rule),
    never more than the task's rank: its singular vectors beyond it span nothing of the task, and any choice of them
    would change the polar factors."""
    ranks = [update.rank for update in updates]
    return ranks if sum(ranks) <= width else [min(width // len(ranks), rank) for rank in ranks]


@dataclass(frozen=True)
class IsoCtsParams:
    """Parameters of `iso_cts` (the reference's name and default for the common-space fraction)."""

    common_space_fraction: float = field(
        default=0.8,
        metadata={"help": "Fraction of the core width given to the sum's common subspace, in (0, 1] (default 0.8)."},
    )
    rank: int | None = rank_field()

    def __post_init__(self) -> None:
        f = self.common_space_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise ValueError(f"`common_space_fraction` must be in (0, 1]; got {f!r}")
        check_rank(self.rank)


@dataclass(frozen=True)
class StarParams:
    """Parameters of `star` (the reference's `eta`, in percent)."""

    eta: float = field(
        default=40.0,
        metadata={"help": "Percent of each update's nuclear norm its kept singular values must reach (default 40)."},
    )
    rank: int | None = rank_field()

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, int | float) or not 0 < self.eta <= 100:
            raise ValueError(f"`eta` is a percentage of the nuclear norm and must be in (0, 100]; got {self.eta!r}")
        check_rank(self.rank)


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
    this is the reference's `int(R / T)` quota and the result equals the reference's; when the ranks exceed the core
    width, `width // T` each, at most its rank); the stacked singular vectors are orthogonalised by their polar
    factors. Deviation on purpose, for mixed ranks: the reference's `int(R / T)` slots give a low-rank task null-space
    vectors (arbitrary, σ = 0, yet they change the polar factors) and cut a high-rank task's spectrum; with ranks
    [4, 8, 12] the two differ by 60-66 % of ΔW. The papers' global coefficient α
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
    mostly zero, and return a full-rank update; the two are not equal). The Core Space reference averages all `R`
    values of the core: equal to this for generic inputs, but when the stacked factors are rank-deficient (a task
    given twice) it averages zeros in and gives their arbitrary vectors the mean (58 % of ΔW apart in the golden
    test). The papers tune a global coefficient α:
    scale all `weights` by it (typical values are well above 1, since isotropizing shrinks the top direction).

    Args:
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    merged = isotropize((cores * weight_vector(weights, cores)).sum(dim=0).to(COMPUTE_DTYPE))
    return space.to_lowrank(merged, rank=params.rank)


@register_method(
    "iso_cts",
    params=IsoCtsParams,
    pretty_name="Iso-CTS isotropic merging with task subspaces (in Core Space)",
    reference_url="https://arxiv.org/abs/2502.04959",
)
def iso_cts(updates: Sequence[LowRank], weights: Sequence[float], params: IsoCtsParams) -> LowRank:
    """Iso-CTS: the weighted sum's common subspace enriched with each task's own directions, spectrum flattened.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
    (ICML 2025), https://arxiv.org/abs/2502.04959, following the authors' `iso_cts` (danielm1405/iso-merging), on the
    Core Space cores (https://arxiv.org/abs/2509.17786). Deviation on purpose: the reference sizes the subspaces from
    `min(out, in)` and flattens that many singular values; on LoRAs all but `R = Σ r_t` of them are zero and their
    vectors arbitrary, so the literal method returns a full-rank update made mostly of noise directions. Here the
    width is the core's (`R`), and a task contributes no more directions than its rank. The paper tunes a global
    coefficient α (0.1 to 3.0 on validation): scale all `weights` by it.

    Args:
        common_space_fraction (`float`, defaults to `0.8`): the share of the `R` directions taken from the sum.
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    weighted = cores * weight_vector(weights, cores)
    merged = iso_cts_merge(weighted, [update.rank for update in updates], params.common_space_fraction)
    return space.to_lowrank(merged, rank=params.rank)


@register_method(
    "star",
    params=StarParams,
    pretty_name="STAR spectral truncation and rescale",
    reference_url="https://arxiv.org/abs/2502.10339",
)
def star(updates: Sequence[LowRank], weights: Sequence[float], params: StarParams) -> LowRank:
    """STAR: truncate each update's small singular components, rescale to keep its nuclear norm, then sum.

    Lee et al., "STAR: Spectral Truncation and Rescale for Model Merging" (NAACL 2025),
    https://arxiv.org/abs/2502.10339, following the authors' `star` (IBM/STAR), computed from each update's factors.
    Each adapter's weight multiplies its truncated update: the paper averages, which is weights of `1 / T` (the
    default weights of 1 give the sum). The output rank is the sum of the kept ranks.

    Args:
        eta (`float`, defaults to `40`): percent of the nuclear norm (sum of singular values, not of their squares)
            the kept components must reach; 100 keeps everything.
        rank (`int`, *optional*): truncate the result to this rank.
    """
    merged = concat([star_truncate(update, params.eta) for update in updates], weights)
    return merged if params.rank is None else truncate(merged, params.rank)
