"""Task arithmetic: the exact weighted sum of the updates, by concatenating factors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..lowrank import LowRank, concat
from ._registry import register_method


@dataclass(frozen=True)
class LinearParams:
    """`linear` takes no method-wide parameters; pass `rank=` to `merge_adapters` to truncate the result."""


@register_method(
    "linear",
    params=LinearParams,
    pretty_name="Task arithmetic (exact weighted sum)",
    reference_url="https://arxiv.org/abs/2212.04089",
    float32_inputs=False,
)
def linear(updates: Sequence[LowRank], weights: Sequence[float], params: LinearParams) -> LowRank:
    """Exact weighted sum `Σ w_t B_t A_t`, rank `Σ r_t` (peft's `cat`; unlike peft's `linear`, no cross-terms).

    Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic") on LoRA updates: concatenating the
    factors sums the updates exactly, so nothing is approximated until a `rank` truncation is asked for.
    """
    return concat(updates, weights)
