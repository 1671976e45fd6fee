"""TIES, DARE and magnitude pruning, with peft's names and parameters, computed on Core Space cores.

The pure functions (`ties_merge`, `dare_linear_merge`, `dare_ties_merge`, `magnitude_prune_merge`) take a stack of
task tensors `(T, …)` and per-task weights, as peft's `merge_utils` does, and follow its semantics: magnitude
pruning keeps the `int(density · numel)` largest entries of each task, DARE keeps each entry with probability
`density` and rescales by `1 / density`, the sign is elected on the pruned, unweighted tensors (`total`: sign of
the sum; `frequency`: sign of the count of signs; a zero elects `+`), and the disjoint merge averages the weighted
entries that agree with it. `density = 1` prunes nothing.

The registered methods run these functions on the `R × R` cores of :mod:`.core_space` instead of on dense `ΔW`
(peft's `*_svd` types) or on A and B separately (peft's plain types, which add cross-terms `B_i A_j`). Masks are
basis-dependent; the basis is the sign-fixed SVD basis of the stacked factors, as in the Core Space reference code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..lowrank import COMPUTE_DTYPE, LowRank
from ._registry import register_method
from .core_space import align, check_density, check_rank, rank_field, weight_vector

__all__ = [
    "check_sign_method",
    "dare_generator",
    "dare_linear_merge",
    "dare_ties_merge",
    "density_field",
    "disjoint_merge",
    "magnitude_prune_merge",
    "majority_sign_mask",
    "prune_magnitude",
    "prune_random",
    "sign_field",
    "ties_merge",
]

SignMethod = Literal["total", "frequency"]
TIES_URL = "https://arxiv.org/abs/2306.01708"
DARE_URL = "https://arxiv.org/abs/2311.03099"


def prune_magnitude(tensors: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density · numel)` largest-magnitude entries of each task tensor `tensors[t]`, zero the rest."""
    if density >= 1:
        return tensors
    flat = tensors.reshape(tensors.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, flat.abs().topk(k, dim=1).indices, True)
    return (flat * mask).reshape(tensors.shape)


def prune_random(tensors: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability `density`, divide the kept ones by `density`.

    The mask is drawn from `generator` as `rand < density`, task by task in order, on the tensors' device.
    """
    if density >= 1:
        return tensors
    draws = torch.rand(tensors.shape, generator=generator, dtype=COMPUTE_DTYPE, device=generator.device)
    return tensors * (draws.to(tensors.device) < density) / density


def majority_sign_mask(tensors: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Where each task's entry agrees with the elected sign (`total`: of the sum; `frequency`: of the sign count)."""
    signs = tensors.sign()
    votes = tensors.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(tensors.dtype)
    return signs == elected


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over tasks of the entries kept by `mask` (0 where none is kept)."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


def ties_merge(
    tensors: torch.Tensor, weights: torch.Tensor, *, density: float, majority_sign_method: SignMethod = "total"
) -> torch.Tensor:
    """TIES: trim by magnitude, elect the sign on the trimmed tensors, disjoint mean of the weighted entries."""
    trimmed = prune_magnitude(tensors, density)
    return disjoint_merge(trimmed * weights, majority_sign_mask(trimmed, majority_sign_method))


def magnitude_prune_merge(tensors: torch.Tensor, weights: torch.Tensor, *, density: float) -> torch.Tensor:
    """Magnitude pruning of each task tensor, then the weighted sum."""
    return (prune_magnitude(tensors, density) * weights).sum(dim=0)


def dare_linear_merge(
    tensors: torch.Tensor, weights: torch.Tensor, *, density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE: random drop and rescale of each task tensor, then the weighted sum."""
    return (prune_random(tensors, density, generator) * weights).sum(dim=0)


def dare_ties_merge(
    tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: float,
    generator: torch.Generator,
    trim_density: float = 1.0,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """DARE, then TIES on the dropped and rescaled tensors: magnitude trim to `trim_density`, sign election, disjoint
    mean of the weighted entries (`trim_density = 1` skips the trim, as peft's `dare_ties`)."""
    dropped = prune_random(tensors, density, generator)
    return ties_merge(dropped, weights, density=trim_density, majority_sign_method=majority_sign_method)


def dare_generator(seed: int, updates: Sequence[LowRank]) -> torch.Generator:
    """A CPU generator seeded from `seed` and a digest of the updates' factors (shapes, dtypes and bytes).

    Each module thus gets its own stream, the same whatever order modules are merged in and whatever the module is
    called (a kohya file and its peft conversion merge alike); the same inputs and seed give the same masks.
    """
    digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=8)
    for update in updates:
        for tensor in (update.A, update.B):
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


def density_field(default: float) -> Any:
    return field(
        default=default, metadata={"help": f"Fraction of each core's entries kept, in (0, 1] (default {default})."}
    )


def sign_field() -> Any:
    return field(
        default="total",
        metadata={"help": "Sign election: `total` (sign of the sum) or `frequency` (most frequent sign)."},
    )


def _seed_field() -> Any:
    return field(
        default=0, metadata={"help": "Random seed; the same seed gives the same result (DARE: masks per module)."}
    )


def check_sign_method(method: str) -> None:
    if method not in ("total", "frequency"):
        raise ValueError(f"`majority_sign_method` must be 'total' or 'frequency'; got {method!r}")


@dataclass(frozen=True)
class TiesParams:
    """Parameters of `ties` (peft's names)."""

    density: float = density_field(0.2)
    majority_sign_method: SignMethod = sign_field()
    rank: int | None = rank_field()

    def __post_init__(self) -> None:
        check_density(self.density)
        check_sign_method(self.majority_sign_method)
        check_rank(self.rank)


@dataclass(frozen=True)
class MagnitudePruneParams:
    """Parameters of `magnitude_prune` (peft's names)."""

    density: float = density_field(0.2)
    rank: int | None = rank_field()

    def __post_init__(self) -> None:
        check_density(self.density)
        check_rank(self.rank)


@dataclass(frozen=True)
class DareLinearParams:
    """Parameters of `dare_linear`; `seed` makes the random masks reproducible."""

    density: float = density_field(0.8)
    seed: int = _seed_field()
    rank: int | None = rank_field()

    def __post_init__(self) -> None:
        check_density(self.density)
        check_rank(self.rank)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer; got {self.seed!r}")


@dataclass(frozen=True)
class DareTiesParams(DareLinearParams):
    """Parameters of `dare_ties`: those of `dare_linear` plus TIES' magnitude trim and sign election."""

    trim_density: float = field(
        default=0.2,
        metadata={
            "help": "dare_ties: fraction of each dropped core's entries TIES then keeps by magnitude (default 0.2)."
        },
    )
    majority_sign_method: SignMethod = sign_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_density(self.trim_density)
        check_sign_method(self.majority_sign_method)


@register_method("ties", params=TiesParams, pretty_name="TIES (in Core Space)", reference_url=TIES_URL)
def ties(updates: Sequence[LowRank], weights: Sequence[float], params: TiesParams) -> LowRank:
    """TIES-Merging on the Core Space cores: trim, elect sign, disjoint mean.

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023),
    https://arxiv.org/abs/2306.01708, with peft's semantics, applied to the `R × R` cores of Core Space
    (https://arxiv.org/abs/2509.17786) so no dense update is built. The Core Space (and TIES) reference code keeps
    `int(density · K) + 1` of a core's `K` entries (a `kthvalue` threshold); here `int(density · K)`, the fraction
    `density` names, as in peft. Otherwise the two are equal (tests/test_methods_golden.py); the one extra entry per
    task moves ΔW by 0-11 % at densities 0.2 and 0.5 on the golden tests' seeds.

    Args:
        density (`float`, defaults to `0.2`): fraction of each core's entries kept by magnitude (the paper's top-k%).
        majority_sign_method (`"total"` or `"frequency"`, defaults to `"total"`): how each entry's sign is elected.
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    merged = ties_merge(
        cores, weight_vector(weights, cores), density=params.density, majority_sign_method=params.majority_sign_method
    )
    return space.to_lowrank(merged, rank=params.rank)


@register_method(
    "magnitude_prune",
    params=MagnitudePruneParams,
    pretty_name="Magnitude pruning (in Core Space)",
    reference_url=TIES_URL,
)
def magnitude_prune(updates: Sequence[LowRank], weights: Sequence[float], params: MagnitudePruneParams) -> LowRank:
    """Magnitude pruning of each task's core, then the weighted sum (peft's `magnitude_prune`).

    TIES' trimming step alone (Yadav et al., https://arxiv.org/abs/2306.01708), on the Core Space cores
    (https://arxiv.org/abs/2509.17786).

    Args:
        density (`float`, defaults to `0.2`): fraction of each core's entries kept by magnitude.
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    merged = magnitude_prune_merge(cores, weight_vector(weights, cores), density=params.density)
    return space.to_lowrank(merged, rank=params.rank)


@register_method("dare_linear", params=DareLinearParams, pretty_name="DARE (in Core Space)", reference_url=DARE_URL)
def dare_linear(updates: Sequence[LowRank], weights: Sequence[float], params: DareLinearParams) -> LowRank:
    """DARE on the `R × R` Core Space cores, not on ΔW: drop core entries at random, rescale, weighted sum.

    Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"
    (ICML 2024), https://arxiv.org/abs/2311.03099, applied to the cores of https://arxiv.org/abs/2509.17786 as the
    Core Space code does. What that means: the paper drops entries of the dense `ΔW` (`out · in` of them), whose
    error spreads over the whole space and mostly misses the inputs the adapters act on; here the entries dropped are
    those of each task's core (`R²`), so the result stays in the adapters' span and keeps the exact sum in
    expectation, but all of its error lies inside that span. On inputs in the row space of the `A`s the output error
    is about 3× dense DARE's at every density (256 × 192, three rank-8 updates): about 100 % of the update at
    density 0.5, 50 % at 0.8, 34 % at 0.9.

    Args:
        density (`float`, defaults to `0.8`): probability of keeping each core entry (`1 - p` in the paper). Chosen
            from the quality suites: picking among 0.2, 0.5 and 0.8 on validation (both suites, seeds 0-2),
            `dare_linear` took 0.8 in 4 of 6 runs and `dare_ties` in 6 of 6; neither beat `linear`.
        seed (`int`, defaults to `0`): seed of the masks; each module's generator is seeded from it and a digest of
            the module's factors, so results repeat exactly and do not depend on the order modules are merged in.
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    generator = dare_generator(params.seed, updates)
    merged = dare_linear_merge(cores, weight_vector(weights, cores), density=params.density, generator=generator)
    return space.to_lowrank(merged, rank=params.rank)


@register_method("dare_ties", params=DareTiesParams, pretty_name="DARE-TIES (in Core Space)", reference_url=DARE_URL)
def dare_ties(updates: Sequence[LowRank], weights: Sequence[float], params: DareTiesParams) -> LowRank:
    """DARE's random drop of core entries with rescale, then TIES (trim, sign election, disjoint mean) on the cores.

    Yu et al. (https://arxiv.org/abs/2311.03099) combined with Yadav et al. (https://arxiv.org/abs/2306.01708) as
    the Core Space code's `dare-ties` does (DARE, then its full TIES with a top-k trim), on the cores of
    https://arxiv.org/abs/2509.17786; `trim_density=1` leaves out the trim, which is peft's `dare_ties`. The drop
    acts on core entries, not on ΔW: see `dare_linear`.

    Args:
        density (`float`, defaults to `0.8`): probability of keeping each core entry (see `dare_linear`).
        seed (`int`, defaults to `0`): seed of the masks (combined with a digest of each module's factors).
        trim_density (`float`, defaults to `0.2`): fraction of each dropped core's entries kept by magnitude.
        majority_sign_method (`"total"` or `"frequency"`, defaults to `"total"`): how each entry's sign is elected.
        rank (`int`, *optional*): truncate the result to this rank.
    """
    space, cores = align(updates)
    generator = dare_generator(params.seed, updates)
    merged = dare_ties_merge(
        cores,
        weight_vector(weights, cores),
        density=params.density,
        generator=generator,
        trim_density=params.trim_density,
        majority_sign_method=params.majority_sign_method,
    )
    return space.to_lowrank(merged, rank=params.rank)
