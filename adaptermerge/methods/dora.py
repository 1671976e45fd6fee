"""Exact weighted task arithmetic of DoRA adapters, in factored form, given the base weight.

A DoRA module (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353) gives
the weight `W_i = f_i ⊙ (W0 + B_i A_i)` with the per-output-row factor `f_i = m_i / ‖W0 + B_i A_i‖_row` (peft's
definition; scale folded into `B_i`). Its update `W_i − W0` is full-rank, so no LoRA can hold it without `W0`; but
the weighted sum `W* = W0 + Σ w_i (W_i − W0)` is again a DoRA module:

    c = 1 + Σ w_i (f_i − 1),   B' = [(w_i f_i / c) ⊙ B_i],   A' = [A_i],   m' = c ⊙ ‖W0 + B' A'‖_row,

of rank `Σ r_i`. A plain LoRA module takes part with `f_i = 1`. The row norms come from `W0`, `W0 A'ᵀ` and the
`r × r` Gram of `A'`, so no `out × in` update is formed (`W0` itself is the base model's own matrix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import IncompatibleAdaptersError
from ..lowrank import COMPUTE_DTYPE, LowRank

__all__ = ["merge_dora", "row_norms"]


def row_norms(base: torch.Tensor, lowrank: LowRank) -> torch.Tensor:
    """`‖W0 + B A‖` per output row, through `W0 Aᵀ` and `A Aᵀ` (float64, shape `(out,)`)."""
    A, B = lowrank.A.to(COMPUTE_DTYPE), lowrank.B.to(COMPUTE_DTYPE)
    squared = base.square().sum(dim=1) + 2 * ((base @ A.T) * B).sum(dim=1) + ((B @ (A @ A.T)) * B).sum(dim=1)
    return squared.clamp_min(0).sqrt()


def merge_dora(updates: Sequence[LowRank], weights: Sequence[float], base: torch.Tensor) -> LowRank:
    """The DoRA module equal to `W0 + Σ w_i (W_i − W0)` for DoRA (or plain LoRA) modules of one layer.

    Args:
        updates (`list[LowRank]`): the modules; those with a `magnitude` are DoRA, the others plain LoRA.
        weights (`list[float]`): one weight per module.
        base (`torch.Tensor` of shape `(out, in[, kh, kw])`): the base layer's weight `W0`.

    Returns:
        `LowRank` of rank `Σ r_i` with a magnitude vector.

    Raises:
        IncompatibleAdaptersError: when `W0` does not fit the modules, or a row's combined factor `c` is zero (the
            merged weight then has a zero row, which DoRA cannot represent).
    """
    first = updates[0]
    W0 = base.to(COMPUTE_DTYPE).reshape(base.shape[0], -1)
    if tuple(W0.shape) != first.shape:
        raise IncompatibleAdaptersError(
            f"the base weight has shape {tuple(base.shape)}, the adapters' modules {first.shape}: wrong base model?"
        )
    factors = [
        lr.magnitude.to(COMPUTE_DTYPE).reshape(-1) / row_norms(W0, lr)
        if lr.magnitude is not None
        else torch.ones(first.out_features, dtype=COMPUTE_DTYPE)
        for lr in updates
    ]
    c = 1 + sum(w * (f - 1) for w, f in zip(weights, factors))
    if (c.abs() < 1e-12).any():
        raise IncompatibleAdaptersError(
            f"{int((c.abs() < 1e-12).sum())} output rows cancel out exactly (c = 0); DoRA cannot represent them"
        )
    A = torch.cat([lr.A.to(COMPUTE_DTYPE) for lr in updates], dim=0)
    B = torch.cat([(w * f / c)[:, None] * lr.B.to(COMPUTE_DTYPE) for lr, w, f in zip(updates, weights, factors)], 1)
    merged = LowRank(A, B, first.kernel_size)
    return LowRank(A, B, first.kernel_size, c * row_norms(W0, merged))
