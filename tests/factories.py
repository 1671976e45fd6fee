"""Factories for random adapters of given shapes and ranks, and per-dtype tolerances."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adaptermerge import Adapter, AdapterMetadata, LowRank

TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_lowrank(
    out_features: int, in_features: int, rank: int, *, seed: int = 0, dtype=torch.float32, kernel_size=()
) -> LowRank:
    """A random LowRank whose update has entries of order 1."""
    g = torch.Generator().manual_seed(seed)
    flat_in = in_features * (kernel_size[0] * kernel_size[1] if kernel_size else 1)
    A = torch.randn(rank, flat_in, generator=g, dtype=torch.float64) / flat_in**0.25
    B = torch.randn(out_features, rank, generator=g, dtype=torch.float64) / rank**0.5
    return LowRank(A.to(dtype), B.to(dtype), tuple(kernel_size))


def make_adapter(
    shapes: Mapping[str, tuple[int, int]],
    rank: int | Mapping[str, int] = 4,
    *,
    seed: int = 0,
    dtype=torch.float32,
    name: str = "adapter",
    base_model: str | None = None,
) -> Adapter:
    """An in-memory adapter: module name → (out, in) shape, one rank for all or a rank per module."""
    modules = {}
    for i, (module, (out_features, in_features)) in enumerate(shapes.items()):
        r = rank[module] if isinstance(rank, Mapping) else rank
        modules[module] = random_lowrank(out_features, in_features, r, seed=seed * 1000 + i, dtype=dtype)
    return Adapter(modules, AdapterMetadata(base_model=base_model, dtype=dtype), name)


def dense(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Every module's dense update (tests only)."""
    return {name: lr.to_dense() for name, lr in adapter.items()}
