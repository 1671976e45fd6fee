"""NP-LoRA: fuse a subject LoRA with a style LoRA by projecting the subject away from the style's principal directions.

Chen, Zhou, Zhang, Huang, "Null Space Projection Unifies Subject and Style in LoRA Fusion" (arXiv 2511.11051),
https://arxiv.org/abs/2511.11051. What the paper's text (abstracts v1-v3 and the start of the introduction, the only
parts that could be read; no code was found) confirms: the style's principal directions come from an SVD of the
style update; the subject update is projected onto the orthogonal complement ("null space") of the style subspace;
a soft projection, posed as a regularised problem with a closed form, moves continuously from linear merging to the
hard projection with one parameter. What it does not confirm, and is decided here:

- **which side** is projected. Default `side="input"`: `ΔW_c (I − V_k V_kᵀ)` with `V_k` the style's top right
  singular vectors, so the subject no longer reacts to the inputs the style reacts to. That is the projection onto
  the style's null space in the literal sense (`ΔW_s x = 0` exactly for `x ⊥ V`); `side="output"` projects the
  subject's outputs away from the style's left singular vectors instead, `(I − U_k U_kᵀ) ΔW_c`.
- **the soft form**. The closed form of `min_X ‖X − ΔW_c‖² + λ ‖X V_k‖²` is `ΔW_c (I − c V_k V_kᵀ)` with
  `c = λ / (1 + λ)`; `mu` here is `c`, so it runs over `[0, 1]` (0: plain sum; 1: hard projection; `λ = μ/(1−μ)`).
- **the number of directions**. Default: every (numerically nonzero) direction of the style update, at most its
  rank `r_s`. A LoRA update has only `r_s` directions, so "the few principal directions that dominate" are all of
  them unless the user asks for fewer with `directions`.

Everything runs on the factors: the style's singular vectors come from an SVD of its `r_s × r_s` core
(:func:`adaptermerge.lowrank.svd`), the projection rewrites the subject's `A` (`O(r_c · in)`) or `B`, and the result
is the concatenation of rank `r_c + r_s`, exact to float precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import IncompatibleAdaptersError
from ..lowrank import COMPUTE_DTYPE, LowRank, concat, svd
from ._registry import register_method

__all__ = ["NpLoraParams", "np_lora", "style_directions"]


@dataclass(frozen=True)
class NpLoraParams:
    """Parameters of `np_lora`.

    Args:
        mu (`float`, defaults to `1.0`): the projection strength in `[0, 1]`: 0 is the plain weighted sum, 1 removes
            the subject's component along the style directions entirely.
        directions (`int`, *optional*): how many of the style's principal directions to project away; all of them
            (its numerical rank) by default.
        side (`"input"` or `"output"`, defaults to `"input"`): project the subject's inputs (right singular vectors
            of the style) or its outputs (left singular vectors).
    """

    mu: float = field(default=1.0, metadata={"help": "NP-LoRA projection strength: 0 plain sum, 1 hard projection."})
    directions: int | None = field(
        default=None, metadata={"help": "NP-LoRA: style principal directions removed (all by default)."}
    )
    side: Literal["input", "output"] = field(
        default="input", metadata={"help": "NP-LoRA: project the subject's inputs or outputs."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.mu, bool) or not isinstance(self.mu, int | float) or not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"mu is the projection strength and must lie in [0, 1]; got {self.mu!r}")
        if self.directions is not None and (
            isinstance(self.directions, bool) or not isinstance(self.directions, int) or self.directions < 1
        ):
            raise ValueError(f"directions must be a positive integer (or unset for all); got {self.directions!r}")
        if self.side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output'; got {self.side!r}")


def style_directions(style: LowRank, directions: int | None, side: str) -> torch.Tensor:
    """The style update's top singular vectors, float64: right ones `(in, k)` for `side="input"`, else left `(out, k)`.

    Directions with a zero singular value are dropped (a zero style has none).
    """
    U, S, Vh = svd(style)
    keep = int((S > 0).sum()) if directions is None else min(directions, int((S > 0).sum()))
    return Vh[:keep].T if side == "input" else U[:, :keep]


def _project(subject: LowRank, basis: torch.Tensor, mu: float, side: str) -> LowRank:
    """The subject with `mu` of its component along the orthonormal columns of `basis` removed, on one factor."""
    if basis.shape[1] == 0 or mu == 0.0:
        return subject
    if side == "input":
        A = subject.A.to(COMPUTE_DTYPE)
        return LowRank((A - mu * (A @ basis) @ basis.T).to(subject.dtype), subject.B, subject.kernel_size)
    B = subject.B.to(COMPUTE_DTYPE)
    return LowRank(subject.A, (B - mu * basis @ (basis.T @ B)).to(subject.dtype), subject.kernel_size)


@register_method(
    "np_lora",
    params=NpLoraParams,
    pretty_name="NP-LoRA subject/style null-space projection",
    reference_url="https://arxiv.org/abs/2511.11051",
)
def np_lora(updates: Sequence[LowRank], weights: Sequence[float], params: NpLoraParams) -> LowRank:
    """NP-LoRA per module for a (subject, style) pair: the subject projected away from the style, plus the style.

    Chen et al., "Null Space Projection Unifies Subject and Style in LoRA Fusion", https://arxiv.org/abs/2511.11051.
    With `V_k` the style's top right singular vectors, the result is
    `w_c ΔW_c (I − μ V_k V_kᵀ) + w_s ΔW_s` (`side="input"`; see the module docstring for what the paper confirms),
    of rank `r_c + r_s`. Give the adapters as `[subject, style]`. A module that only one of them adapts (or whose
    other adapter has weight 0) is passed through with its weight: there is nothing to project it against.

    Args:
        mu (`float`, defaults to `1.0`): projection strength in `[0, 1]`, from the plain sum (0) to the hard
            projection (1).
        directions (`int`, *optional*): the number of style directions projected away; all by default.
        side (`"input"` or `"output"`, defaults to `"input"`): which side of the subject update is projected.

    Raises:
        IncompatibleAdaptersError: when a module has more than two updates.
    """
    if len(updates) > 2:
        raise IncompatibleAdaptersError(
            f"np_lora fuses one subject and one style adapter, given in that order; got {len(updates)} adapters"
        )
    if len(updates) == 2:
        subject, style = updates
        basis = style_directions(style, params.directions, params.side)
        updates = [_project(subject, basis, params.mu, params.side), style]
    return concat(updates, weights)
