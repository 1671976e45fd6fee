"""Factor math for one adapted module, never building the ``out × in`` update.

A :class:`LowRank` holds ``A`` of shape ``(r, in)`` and ``B`` of shape ``(out, r)`` in peft's orientation and
stands for the update ``ΔW = B @ A``. The adapter's scale (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA) is
always folded into ``B`` when a file is read, so every method sees plain products and writers emit ``alpha = r``.
Conv LoRAs keep their kernel size and store ``A`` flattened to ``(r, in * kh * kw)``.

All decompositions run in float64 (as the papers' reference code does) on small `r × r` matrices; the products over
`out` or `in` that map results back run at the inputs' precision (float32 at least), and results are cast back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .errors import IncompatibleAdaptersError, InvalidTensorError

__all__ = [
    "LowRank",
    "check_same_shape",
    "concat",
    "cosine",
    "gram",
    "inner",
    "norm",
    "orthonormal_bases",
    "pivot_signs",
    "range_basis",
    "stack_factors",
    "svd",
    "truncate",
]

COMPUTE_DTYPE = torch.float64


@dataclass(frozen=True)
class LowRank:
    """The update ``ΔW = B @ A`` of one module, scale folded into ``B``.

    Args:
        A (`torch.Tensor` of shape `(r, in)`): the input-side factor (peft `lora_A`, kohya `lora_down`).
        B (`torch.Tensor` of shape `(out, r)`): the output-side factor (peft `lora_B`, kohya `lora_up`).
        kernel_size (`tuple[int, ...]`, *optional*): the conv kernel size; `A` then holds `in * prod(kernel_size)`
            columns in the order of a flattened `(in, kh, kw)` kernel.
        magnitude (`torch.Tensor` of shape `(out,)`, *optional*): DoRA's magnitude vector, kept for writers and
            DoRA-aware merges; plain methods refuse modules that carry one.
    """

    A: torch.Tensor
    B: torch.Tensor
    kernel_size: tuple[int, ...] = ()
    magnitude: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise InvalidTensorError(
                f"LowRank factors must be 2-D (A: (r, in), B: (out, r)); got A {tuple(self.A.shape)}, "
                f"B {tuple(self.B.shape)}. Use LowRank.from_weights for conv kernels."
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise InvalidTensorError(
                f"A has {self.A.shape[0]} rows but B has {self.B.shape[1]} columns; they must share the rank."
            )
        if self.kernel_size and self.A.shape[1] % math.prod(self.kernel_size):
            raise InvalidTensorError(f"A's {self.A.shape[1]} columns do not divide by kernel size {self.kernel_size}.")

    @classmethod
    def from_weights(cls, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> LowRank:
        """Build from file-layout weights: `(r, in)`/`(out, r)`, or conv `(r, in, kh, kw)`/`(out, r, 1, 1)`.

        Raises:
            InvalidTensorError: when the shapes are not a LoRA pair.
        """
        kernel_size: tuple[int, ...] = ()
        if down.ndim > 2:
            kernel_size = tuple(down.shape[2:])
            down = down.reshape(down.shape[0], -1)
        if up.ndim > 2:
            if any(s != 1 for s in up.shape[2:]):
                raise InvalidTensorError(f"conv lora_B must have a 1×1 kernel; got shape {tuple(up.shape)}.")
            up = up.reshape(up.shape[0], up.shape[1])
        if scale != 1.0:
            up = up * scale
        return cls(down, up, kernel_size)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the flattened update (`in * kh * kw` for convs)."""
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the flattened update, `(out, in)`."""
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def num_parameters(self) -> int:
        return self.A.numel() + self.B.numel()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors in file layout: `(down, up)`, conv kernels restored."""
        if not self.kernel_size:
            return self.A, self.B
        in_channels = self.in_features // math.prod(self.kernel_size)
        return (
            self.A.reshape(self.rank, in_channels, *self.kernel_size),
            self.B.reshape(self.out_features, self.rank, *([1] * len(self.kernel_size))),
        )

    def scale(self, weight: float) -> LowRank:
        """The update times `weight` (folded into `B`)."""
        return replace(self, B=self.B * weight)

    def to(self, dtype: torch.dtype) -> LowRank:
        magnitude = None if self.magnitude is None else self.magnitude.to(dtype)
        return replace(self, A=self.A.to(dtype), B=self.B.to(dtype), magnitude=magnitude)

    def to_dense(self) -> torch.Tensor:
        """The full `(out, in)` update. For tests and small checks only: merges never call it."""
        return self.B.to(COMPUTE_DTYPE) @ self.A.to(COMPUTE_DTYPE)

    def check_finite(self) -> None:
        """Raise :class:`InvalidTensorError` if a factor holds NaN or Inf.

        A float32 sum is finite when every entry is, and is far cheaper than an element-wise check (which matters when
        a 7B adapter set is read); only a non-finite sum, which huge finite entries could also give, is checked
        entry by entry.
        """
        for name, tensor in (("A", self.A), ("B", self.B)):
            if not torch.isfinite(tensor.sum(dtype=torch.float32)) and not torch.isfinite(tensor).all():
                raise InvalidTensorError(f"factor {name} holds NaN or Inf values")


def check_same_shape(lowranks: Sequence[LowRank]) -> None:
    """Raise IncompatibleAdaptersError unless `lowranks` is a non-empty list of updates of one shape and kernel."""
    if not lowranks:
        raise IncompatibleAdaptersError("nothing to combine: the list of low-rank updates is empty")
    first = lowranks[0]
    for other in lowranks[1:]:
        if other.shape != first.shape or other.kernel_size != first.kernel_size:
            raise IncompatibleAdaptersError(
                f"updates of one module must have the same shape; got {first.shape} (kernel {first.kernel_size}) "
                f"and {other.shape} (kernel {other.kernel_size})"
            )


def concat(lowranks: Sequence[LowRank], weights: Sequence[float] | None = None) -> LowRank:
    """The exact weighted sum `Σ w_t B_t A_t` as one LowRank of rank `Σ r_t` (peft's `cat`).

    The factors keep the inputs' common dtype: a concatenation is exact in any precision, and each weighted entry of
    `B` is computed in float32 at least and rounded once.

    Raises:
        IncompatibleAdaptersError: when the updates have different shapes.
    """
    check_same_shape(lowranks)
    weights = [1.0] * len(lowranks) if weights is None else list(weights)
    if len(weights) != len(lowranks):
        raise IncompatibleAdaptersError(f"got {len(weights)} weights for {len(lowranks)} updates")
    dtype = functools.reduce(torch.promote_types, (lr.dtype for lr in lowranks))
    B, A = stack_factors(lowranks, dtype)
    if any(w != 1.0 for w in weights):  # each product rounded once, in the inputs' dtype
        columns = torch.tensor(weights, dtype=torch.promote_types(dtype, torch.float32))
        B = (B * torch.repeat_interleave(columns, torch.tensor([lr.rank for lr in lowranks]))).to(dtype)
    return LowRank(A, B, lowranks[0].kernel_size)


def stack_factors(lowranks: Sequence[LowRank], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B_cat, A_stk)`: every update's `B` side by side (`out × R`) and every `A` stacked (`R × in`), in `dtype`."""
    check_same_shape(lowranks)
    B_cat = torch.cat([lr.B.to(dtype) for lr in lowranks], dim=1)
    A_stk = torch.cat([lr.A.to(dtype) for lr in lowranks], dim=0)
    return B_cat, A_stk


def pivot_signs(columns: torch.Tensor) -> torch.Tensor:
    """The sign (±1) that makes each column's largest-magnitude entry positive: a reproducible sign convention for
    singular and eigenvectors, which decompositions return with arbitrary signs (zero columns get +1)."""
    signs = torch.sign(columns[columns.abs().argmax(dim=0), torch.arange(columns.shape[1])])
    return torch.where(signs == 0, 1.0, signs).to(columns.dtype)


def _gram(matrix: torch.Tensor) -> torch.Tensor:
    """`matrixᵀ matrix` in float64 (`COMPUTE_DTYPE`).

    On the CPU it goes through numpy, whose BLAS computes the product of a matrix with its own transpose as a
    symmetric rank-k update: half the work of the general product torch runs, and 2-4× faster in float64 here.
    """
    matrix = matrix.to(COMPUTE_DTYPE)
    if matrix.device.type != "cpu" or (matrix.requires_grad and torch.is_grad_enabled()):
        return matrix.T @ matrix
    array = matrix.detach().numpy()
    return torch.from_numpy(array.T @ array)


def range_basis(matrix: torch.Tensor, *, singular_vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`(X, R)`: `matrix @ X` has orthonormal columns spanning `matrix`'s columns, and `matrix = (matrix @ X) @ R`.

    For a tall `m × k` factor stack. The only pass over the tall side is one float64 product, the Gram
    `matrixᵀ matrix`; the rest is `k × k` work. That is several times faster than a Householder QR or SVD of the
    stack, and it is what makes whole-model merges fast. The Gram's columns are equilibrated (scaled to unit
    diagonal) before its eigendecomposition, so factors of very different scales, such as adapters trained with
    different learning rates, keep full accuracy. With `singular_vectors`, a final `k × k` SVD turns the basis into
    the left singular vectors of `matrix`: `matrix @ X = U` of its thin SVD `U S Vᵀ` (columns by decreasing singular
    value), `R = S Vᵀ`, and each column of `V` has its largest-magnitude entry positive, so the basis is
    reproducible. Basis-dependent methods (TIES, DARE) need that; a product that is decomposed next does not.

    Directions whose singular value, after equilibration, is below `sqrt(16 k eps)` of the largest (about 3e-7 at
    `k = 64`, under float32 resolution) are dropped as numerically zero; at least one is kept (a zero column for a
    zero matrix).

    Returns:
        `(X, R)` of shapes `(k, ρ)` and `(ρ, k)`, float64, `ρ` the numerical rank.
    """
    gram = _gram(matrix)
    norms = gram.diagonal().sqrt()
    norms = torch.where(norms > 0, norms, 1.0)
    eigenvalues, V = torch.linalg.eigh(gram / norms[:, None] / norms[None, :])
    eigenvalues, V = eigenvalues.flip(0), V.flip(1)
    threshold = eigenvalues[0] * 16 * eigenvalues.numel() * torch.finfo(COMPUTE_DTYPE).eps
    keep = max(int((eigenvalues > threshold).sum()), 1)
    root = eigenvalues[:keep].clamp_min(0).sqrt()
    V = V[:, :keep]
    # `matrix @ X_Q` is an orthonormal basis and `matrix = (matrix @ X_Q) @ R_Q`; the SVD of the small `R_Q` rotates
    # it onto the singular vectors.
    X_Q = V / torch.where(root > 0, root, 1.0) / norms[:, None]
    R_Q = root[:, None] * V.T * norms[None, :]
    if not singular_vectors:
        return X_Q, R_Q
    P, S, Vh = torch.linalg.svd(R_Q, full_matrices=False)
    signs = pivot_signs(Vh.T)
    return X_Q @ (P * signs), (S * signs)[:, None] * Vh


def _svd_transforms(lowrank: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(X_U, S, X_V)` with `U = B @ X_U` and `Vh = X_V @ A` the thin SVD of `B @ A`, from `r × r` work only."""
    X_B, R_B = range_basis(lowrank.B, singular_vectors=False)
    X_A, R_A = range_basis(lowrank.A.T, singular_vectors=False)
    P, S, Qh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return X_B @ P, S, Qh @ X_A.T


def svd(lowrank: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `ΔW = U diag(S) Vh` from the factors, in float64.

    Orthonormal bases of `B`'s columns and `A`'s rows (:func:`range_basis`) reduce the problem to an SVD of an
    `r × r` core, so the cost is `O((out + in) r²)` instead of `O(out · in · min(out, in))`.

    Returns:
        `(U, S, Vh)` of shapes `(out, k)`, `(k,)`, `(k, in)` with `k` the numerical rank (at most
        `min(r, out, in)`, at least 1), singular values descending.
    """
    X_U, S, X_V = _svd_transforms(lowrank)
    return lowrank.B.to(COMPUTE_DTYPE) @ X_U, S, X_V @ lowrank.A.to(COMPUTE_DTYPE)


def truncate(lowrank: LowRank, rank: int | None = None, *, rtol: float = 0.0) -> LowRank:
    """The best rank-`rank` approximation of the update (Eckart–Young), factors balanced by `sqrt(S)`.

    Args:
        rank (`int`, *optional*): the number of singular triples to keep; all of them by default.
        rtol (`float`, defaults to `0.0`): also drop singular values below `rtol * S.max()`.
    """
    X_U, S, X_V = _svd_transforms(lowrank)
    keep = S.numel() if rank is None else min(rank, S.numel())
    if rtol > 0:
        keep = max(min(keep, int((S > rtol * S[0]).sum())), 1)
    root = S[:keep].sqrt()
    dtype = lowrank.dtype if lowrank.dtype.is_floating_point else torch.float32
    work = torch.promote_types(dtype, torch.float32)  # the products over `out` and `in` run at input precision
    A = ((root[:, None] * X_V[:keep]).to(work) @ lowrank.A.to(work)).to(dtype)
    B = (lowrank.B.to(work) @ (X_U[:, :keep] * root).to(work)).to(dtype)
    return replace(lowrank, A=A, B=B)


def inner(x: LowRank, y: LowRank) -> torch.Tensor:
    """Frobenius inner product `<B_x A_x, B_y A_y> = tr((B_xᵀ B_y)(A_y A_xᵀ))` through `r × r` products."""
    check_same_shape([x, y])
    bx, ax, by, ay = (t.to(COMPUTE_DTYPE) for t in (x.B, x.A, y.B, y.A))
    return ((bx.T @ by) * (ax @ ay.T)).sum()


def norm(x: LowRank) -> torch.Tensor:
    """Frobenius norm of the update."""
    return inner(x, x).clamp_min(0).sqrt()


def cosine(x: LowRank, y: LowRank) -> torch.Tensor:
    """Cosine similarity of two updates (0 when either is zero)."""
    denominator = norm(x) * norm(y)
    return inner(x, y) / denominator if denominator > 0 else torch.zeros((), dtype=COMPUTE_DTYPE)


def gram(lowranks: Sequence[LowRank]) -> torch.Tensor:
    """The `T × T` Gram matrix of Frobenius inner products of the updates, in float64."""
    B, A = stack_factors(lowranks, COMPUTE_DTYPE)
    # Entry (p, q) of (BᵀB) ⊙ (AAᵀ) is the inner product of rank-1 units p and q; summing it over each pair of
    # blocks gives every `inner` at once, from one product per side.
    owner = torch.repeat_interleave(torch.arange(len(lowranks)), torch.tensor([lr.rank for lr in lowranks]))
    blocks = torch.nn.functional.one_hot(owner, len(lowranks)).to(COMPUTE_DTYPE)
    G = blocks.T @ (_gram(B) * _gram(A.T)) @ blocks
    return (G + G.T) / 2


def orthonormal_bases(lowranks: Sequence[LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
    """Core-space bases: the left singular vectors of the stacked `B` columns and of the stacked `A` rows.

    Returns:
        `(U_B, U_A)` of shapes `(out, ρ_B)` and `(in, ρ_A)`, float64, orthonormal columns, `ρ` the numerical rank of
        each stack (at most `min(out, R)`, `min(in, R)`), with :func:`range_basis`'s sign convention so that
        basis-dependent methods (TIES, DARE) are reproducible.
    """
    B_cat, A_stk = stack_factors(lowranks, COMPUTE_DTYPE)
    return B_cat @ range_basis(B_cat)[0], A_stk.T @ range_basis(A_stk.T)[0]
