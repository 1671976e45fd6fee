"""KnOTS-style merging: align the tasks by one SVD of their concatenated updates, then TIES on the aligned parts.

KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025, https://arxiv.org/abs/2410.19735)
takes the SVD `[ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ]`, represents task `t` by `S V_tᵀ` in the shared left basis `U`,
merges the representations with TIES and returns `U · merged`. Here the same alignment runs on the Core Space cores
(https://arxiv.org/abs/2509.17786): the SVD of `[M_1 … M_T]` (`ρ_B × T ρ_A`) gives `U = U_B P` exactly, and the
representations are `Pᵀ M_t` (`k × ρ_A`, with `k` the numerical rank). Two documented differences from the paper:
the representations are expressed in the Core Space input basis `U_A` rather than in the model's input coordinates
(TIES masks depend on the basis), and the top-k mask is taken per module, whereas the paper flattens every module of
a task into one vector and takes one global top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..lowrank import LowRank
from ._registry import register_method
from .core_space import align, weight_vector
from .sparsify import TiesParams, ties_merge

__all__ = ["knots", "knots_align"]


def knots_align(cores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KnOTS' alignment of stacked cores `(T, ρ_B, ρ_A)`.

    Returns:
        `(P, representations)`: `P` of shape `(ρ_B, k)`, the left singular vectors of `[M_1 … M_T]` with nonzero
        singular values, and `representations` of shape `(T, k, ρ_A)` with `cores[t] == P @ representations[t]`.
    """
    stacked = torch.cat(list(cores), dim=1)
    P, S, _ = torch.linalg.svd(stacked, full_matrices=False)
    tolerance = max(stacked.shape) * torch.finfo(S.dtype).eps * (S[0] if S.numel() else 0.0)
    P = P[:, : max(int((S > tolerance).sum()), 1)]
    return P, P.T @ cores


@register_method(
    "knots",
    params=TiesParams,
    pretty_name="KnOTS-TIES (SVD alignment + TIES, in Core Space)",
    reference_url="https://arxiv.org/abs/2410.19735",
)
def knots(updates: Sequence[LowRank], weights: Sequence[float], params: TiesParams) -> LowRank:
    """KnOTS-TIES per module: SVD alignment of the tasks, then TIES on their aligned representations.

    Stoica et al., "Model merging with SVD to tie the KnOTS" (ICLR 2025), https://arxiv.org/abs/2410.19735,
    computed on the Core Space cores (https://arxiv.org/abs/2509.17786) with a per-module mask (the paper's mask is
    global over all modules; see the module docstring). Sign election and disjoint mean follow peft's `ties`. The
    paper's global coefficient α is the per-adapter `weights` here.

    Args:
        density (`float`, defaults to `0.2`): fraction of each representation's entries kept (the paper's top-K%,
            20 in its ViT configs; 1.0 keeps everything and gives the mean of the aligned tasks).
        majority_sign_method (`"total"` or `"frequency"`, defaults to `"total"`): how each entry's sign is elected.
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    P, representations = knots_align(cores)
    merged = ties_merge(
        representations,
        weight_vector(weights, representations),
        density=params.density,
        majority_sign_method=params.majority_sign_method,
    )
    return space.to_lowrank(P @ merged, rank=params.rank)
