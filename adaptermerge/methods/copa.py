"""CoPA-Merging / RobustMerge: prune each factor, rescale `B` by what pruning removed from `A`, normalise across tasks.

Zeng et al., "Parameter Efficient Merging for Multimodal Large Language Models with Complementary Parameter
Adaptation" (arXiv 2502.17159 v1), published as "RobustMerge" (NeurIPS 2025), https://arxiv.org/abs/2502.17159.
The steps and defaults follow the authors' code (AuroraZengfh/RobustMerge, `llava/model/builder.py`), read for
``research/algos-copa-osrm-orth.md`` §1. Like peft's `linear`, the method merges `A` and `B` separately, so the
product holds cross-terms `B_i A_j`: it is not a weighted sum of the updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import IncompatibleAdaptersError
from ..lowrank import COMPUTE_DTYPE, LowRank
from ._registry import register_method

__all__ = ["CopaParams", "complementary_scales", "copa", "magnitude_prune"]


@dataclass(frozen=True)
class CopaParams:
    """Parameters of `copa` (the authors' code defaults).

    Args:
        density (`float`, defaults to `0.2`): the fraction of entries kept in each factor of each task, by magnitude
            (the code's `mask_ratio`).
        att_ratio (`float`, defaults to `0.2`): the per-rank scales of a task are clamped from below at their
            `floor(r * (1 - att_ratio))`-th smallest value (the code's `att_ratio`).
        fuse_weight (`float`, defaults to `2.0`): `λ`, multiplying both merged factors, so the update by `λ²`.
    """

    density: float = field(default=0.2, metadata={"help": "Fraction of entries kept (by magnitude)."})
    att_ratio: float = field(
        default=0.2, metadata={"help": "CoPA: per-rank scales are clamped at their (1 - att_ratio) quantile."}
    )
    fuse_weight: float = field(default=2.0, metadata={"help": "CoPA: λ multiplying both merged factors (λ² on ΔW)."})

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density is the fraction of entries kept, in (0, 1]; got {self.density}")
        if not 0.0 <= self.att_ratio <= 1.0:
            raise ValueError(f"att_ratio must lie in [0, 1]; got {self.att_ratio}")
        if not (math.isfinite(self.fuse_weight) and self.fuse_weight > 0):
            raise ValueError(f"fuse_weight must be a positive number; got {self.fuse_weight}")


def magnitude_prune(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries of `x` whose magnitude reaches the `floor((1 - density) * numel)`-th smallest (ties kept).

    This is the reference code's threshold (`kthvalue` over the whole matrix); with `density = 1`, or a matrix too
    small for the threshold index to reach 1, nothing is pruned.
    """
    index = math.floor((1.0 - density) * x.numel() + 1e-9)
    if index < 1:
        return x.clone()
    threshold = x.abs().flatten().kthvalue(index).values
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def complementary_scales(
    A: torch.Tensor, A_pruned: torch.Tensor, att_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-rank scale `σ[j] = Σ|A[j]| / Σ|Ã[j]|` (≥ 1), and its clamp `σ̂` between two of its order statistics.

    `σ̂ = clip(σ, sorted(σ)[floor(r (1 - att_ratio))], max(σ))` (the index is capped at `r - 1`). A row that pruning
    emptied (or that was zero) gets `σ = 1` before the clamp (ours: the reference code divides by zero there).

    Returns:
        `(sigma, sigma_hat)`, both of shape `(r,)`.
    """
    kept = A_pruned.abs().sum(dim=1)
    total = A.abs().sum(dim=1)
    sigma = torch.where(kept > 0, total / torch.where(kept > 0, kept, torch.ones_like(kept)), torch.ones_like(kept))
    ordered = sigma.sort().values
    low = ordered[min(math.floor(sigma.numel() * (1.0 - att_ratio) + 1e-9), sigma.numel() - 1)]
    return sigma, sigma.clamp(min=low, max=ordered[-1])


@register_method(
    "copa",
    params=CopaParams,
    pretty_name="CoPA-Merging / RobustMerge",
    reference_url="https://arxiv.org/abs/2502.17159",
)
def copa(updates: Sequence[LowRank], weights: Sequence[float], params: CopaParams) -> LowRank:
    """Prune each factor, scale `B`'s columns by what pruning removed from `A`, sum `A`, average `B` (CoPA-Merging).

    Per module, with `Ã_t`, `B̃_t` the pruned factors (:func:`magnitude_prune`) and `σ̂_t` the clamped per-rank
    scales of task `t` (:func:`complementary_scales`):

    - `A* = λ Σ_t Ã_t` (a plain sum, no `1/T`, as the reference code);
    - `B*[:, j] = λ Σ_t σ̂_t[j] B̃_t[:, j] / Σ_t σ̂_t[j]` (cross-task normalisation).

    Ours, not the reference code's: each adapter's scale `alpha / r` and its merge weight are folded into `B_t`
    before pruning (the code assumes equal scales and has no weights; pruning is per matrix and scale-free, so the
    weight only enters the normalised average of `B`).

    Raises:
        IncompatibleAdaptersError: when the adapters' ranks differ in this module (the method pairs rank `j` of
            every task; zero-padding would change the pruning thresholds).
    """
    ranks = [u.rank for u in updates]
    if len(set(ranks)) > 1:
        raise IncompatibleAdaptersError(
            f"copa merges rank j of every adapter with rank j of the others, so all ranks must be equal; got {ranks}. "
            "Use a method that accepts different ranks (linear, lora_lego, ties) or retrain at one rank"
        )
    dtype = torch.promote_types(updates[0].dtype, torch.float32)
    A_sum = None
    B_num = None
    sigma_sum = None
    for update, weight in zip(updates, weights):
        A = update.A.to(COMPUTE_DTYPE)
        A_pruned = magnitude_prune(A, params.density)
        B_pruned = magnitude_prune(update.B.to(COMPUTE_DTYPE) * weight, params.density)
        _, sigma_hat = complementary_scales(A, A_pruned, params.att_ratio)
        A_sum = A_pruned if A_sum is None else A_sum + A_pruned
        B_num = B_pruned * sigma_hat if B_num is None else B_num + B_pruned * sigma_hat
        sigma_sum = sigma_hat if sigma_sum is None else sigma_sum + sigma_hat
    A_merged = params.fuse_weight * A_sum
    B_merged = params.fuse_weight * B_num / sigma_sum
    return LowRank(A_merged.to(dtype), B_merged.to(dtype), updates[0].kernel_size)
