"""Core Space: align the updates of one module in a shared low-dimensional basis and merge their small cores.

Per module, with `B_cat = [B_1 … B_T]` (`out × R`) and `A_stk = [A_1; …; A_T]` (`R × in`), `R = Σ r_t`:
`U_B` is an orthonormal basis of the column space of `B_cat` and `U_A` of the row space of `A_stk` (their left
singular vectors, float64, from :func:`adaptermerge.lowrank.range_basis`). Each task's core
`M_t = (U_Bᵀ B_t)(A_t U_A)` is at most `R × R` and holds its update exactly: `B_t A_t = U_B M_t U_Aᵀ`. A merge
method combines the cores into `M*`, and `U_B M* U_Aᵀ` comes back as a LowRank of rank at most `R` through an
SVD of `M*`. Nothing of size `out × in` is ever built.

Paper: Panariello, Marczak et al., "Accurate and Efficient Low-Rank Model Merging in Core Space" (NeurIPS 2025),
https://arxiv.org/abs/2509.17786. The scale `alpha / r` is already folded into `B` by the readers, which the
reference code omits (it is right there only because its adapters have `alpha = r`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidParameterError
from ..lowrank import COMPUTE_DTYPE, LowRank, check_same_shape, range_basis, stack_factors

__all__ = ["CoreSpace", "align", "check_density", "check_rank", "rank_field", "weight_vector"]


@dataclass(frozen=True)
class CoreSpace:
    """The shared bases of one module's updates, kept in factored form.

    The bases are never built: `U_B = B_cat @ X_B` and `U_A = A_stkᵀ @ X_A` with small `R × ρ` transforms from
    :func:`adaptermerge.lowrank.range_basis`, so aligning costs one Gram product per side and mapping back one
    matrix product per side.

    Args:
        B_cat (`torch.Tensor` of shape `(out, R)`): every update's `B`, side by side, at input precision (float32 at
            least).
        X_B (`torch.Tensor` of shape `(R, ρ_B)`): `U_B = B_cat @ X_B` has orthonormal columns spanning every `B_t`.
        A_stk (`torch.Tensor` of shape `(R, in)`): every update's `A`, stacked, at input precision.
        X_A (`torch.Tensor` of shape `(R, ρ_A)`): `U_A = A_stkᵀ @ X_A` has orthonormal columns spanning every `A_tᵀ`.
        kernel_size (`tuple[int, ...]`): the conv kernel size of the updates, `()` for linear layers.
        dtype (`torch.dtype`): the dtype results are cast back to.
    """

    B_cat: torch.Tensor
    X_B: torch.Tensor
    A_stk: torch.Tensor
    X_A: torch.Tensor
    kernel_size: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32

    @property
    def U_B(self) -> torch.Tensor:
        """The orthonormal basis of the `B` side, `(out, ρ_B)`, float64 (built on demand; merges never need it)."""
        return self.B_cat.to(COMPUTE_DTYPE) @ self.X_B

    @property
    def U_A(self) -> torch.Tensor:
        """The orthonormal basis of the `A` side, `(in, ρ_A)`, float64 (built on demand)."""
        return self.A_stk.T.to(COMPUTE_DTYPE) @ self.X_A

    @property
    def core_shape(self) -> tuple[int, int]:
        """`(ρ_B, ρ_A)`: `(R, R)` unless `R` exceeds `out` or `in`, or the stacked factors are rank-deficient."""
        return (self.X_B.shape[1], self.X_A.shape[1])

    def to_lowrank(self, core: torch.Tensor, *, rank: int | None = None) -> LowRank:
        """Map a merged core back to the update `U_B core U_Aᵀ`, factors balanced by `sqrt` of its singular values.

        Singular values below `max(ρ) · eps · σ_max` (numerically zero) are dropped, so the result is exact to
        float64 precision with rank at most `min(ρ_B, ρ_A)` (and at least 1, a zero update when the core is zero).

        Args:
            core (`torch.Tensor` of shape `(ρ_B, ρ_A)`): the merged core.
            rank (`int`, *optional*): keep only the `rank` largest singular triples (best rank-`rank` approximation).
        """
        P, S, Qh = torch.linalg.svd(core.to(COMPUTE_DTYPE), full_matrices=False)
        tolerance = max(core.shape) * torch.finfo(COMPUTE_DTYPE).eps * (S[0] if S.numel() else 0.0)
        keep = max(int((S > tolerance).sum()), 1)
        if rank is not None:
            keep = min(keep, rank)
        root = S[:keep].sqrt()
        B = self.B_cat @ (self.X_B @ (P[:, :keep] * root)).to(self.B_cat.dtype)
        A = ((root[:, None] * Qh[:keep]) @ self.X_A.T).to(self.A_stk.dtype) @ self.A_stk
        return LowRank(A.to(self.dtype), B.to(self.dtype), self.kernel_size)


def align(updates: Sequence[LowRank]) -> tuple[CoreSpace, torch.Tensor]:
    """The Core Space of `updates` and their stacked cores.

    With `U_Bᵀ B_cat = R_B` and `U_Aᵀ A_stkᵀ = R_A` from :func:`~adaptermerge.lowrank.range_basis`, task `t`'s core
    `U_Bᵀ B_t A_t U_A` is the product of its column blocks `R_B[:, t] R_A[:, t]ᵀ`: no further pass over the factors.

    Args:
        updates (`list[LowRank]`): the updates of one module, any mix of ranks.

    Returns:
        `(space, cores)`: the bases, and `cores` of shape `(T, ρ_B, ρ_A)` (float64) with
        `updates[t].B @ updates[t].A == space.U_B @ cores[t] @ space.U_A.T`.

    Raises:
        IncompatibleAdaptersError: when the updates are empty or differ in shape.
    """
    check_same_shape(updates)
    dtype = functools.reduce(torch.promote_types, (update.dtype for update in updates))
    if not dtype.is_floating_point:
        dtype = torch.float32
    B_cat, A_stk = stack_factors(updates, torch.promote_types(dtype, torch.float32))
    X_B, R_B = range_basis(B_cat)
    X_A, R_A = range_basis(A_stk.T)
    space = CoreSpace(B_cat, X_B, A_stk, X_A, updates[0].kernel_size, dtype)
    edges = list(itertools.accumulate((update.rank for update in updates), initial=0))
    cores = torch.stack([R_B[:, lo:hi] @ R_A[:, lo:hi].T for lo, hi in itertools.pairwise(edges)])
    return space, cores


def weight_vector(weights: Sequence[float], cores: torch.Tensor) -> torch.Tensor:
    """The per-task weights as a float64 tensor of shape `(T, 1, …)` that broadcasts against `cores`."""
    if len(weights) != cores.shape[0]:
        raise InvalidParameterError(f"got {len(weights)} weights for {cores.shape[0]} updates; give one per update")
    shape = (len(weights),) + (1,) * (cores.ndim - 1)
    return torch.tensor(list(weights), dtype=COMPUTE_DTYPE, device=cores.device).reshape(shape)


def check_density(density: Any) -> None:
    """Raise ValueError unless `0 < density <= 1` (the fraction of core entries kept)."""
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"`density` is the fraction of entries kept and must be in (0, 1]; got {density!r}")


def check_rank(rank: Any) -> None:
    """Raise ValueError unless `rank` is None or a positive integer."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"`rank` must be a positive integer (or unset to keep every component); got {rank!r}")


def rank_field() -> Any:
    """The `rank` field of a core-space method's parameters (filled from `merge_adapters(rank=...)` / `--rank`)."""
    return field(
        default=None,
        metadata={"help": "Output rank per module; by default every nonzero component (at most the sum of ranks)."},
    )
