"""One merge done twice: by peft's dense path and on the factors, timed side by side on one layer.

peft's `add_weighted_adapter(combination_type="svd")` builds each layer's full `out × in` update and takes its SVD;
:func:`adaptermerge.merge_adapters` with `method="svd"` computes the same best rank-`r` approximation of the
weighted sum from the stacked factors (QR of both sides and an SVD of the small core). Both results are compared
on their factors: they agree to float precision, so the only difference is the time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..adapter import Adapter, AdapterMetadata
from ..io import peft as peft_format
from ..lowrank import LowRank, inner, norm
from ..merge import merge_adapters

__all__ = ["SpeedResult", "peft_vs_factors"]

MODULE = "q_proj"


@dataclass(frozen=True)
class SpeedResult:
    """Seconds of each merge and how far apart their results are (relative Frobenius norm of the difference)."""

    shape: tuple[int, int]
    adapters: int
    rank: int
    peft_seconds: float
    ours_seconds: float
    relative_difference: float

    @property
    def speedup(self) -> float:
        return self.peft_seconds / self.ours_seconds if self.ours_seconds > 0 else float("inf")


def _factors(shape: tuple[int, int], adapters: int, rank: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(A, B)` per adapter, scaled as trained LoRAs are (`B` small but nonzero)."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rank, in_features, generator=generator) / in_features**0.5,
            torch.randn(out_features, rank, generator=generator) * 0.01 / rank**0.5,
        )
        for _ in range(adapters)
    ]


def _peft_svd(factors, shape, weights, rank) -> tuple[Adapter, float]:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    out_features, in_features = shape
    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
    model = model.to_empty(device="cpu")  # never read: peft's svd merge uses only the LoRA factors
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=[MODULE], init_lora_weights=False)
    names = [f"task{t}" for t in range(len(factors))]
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    layer = peft_model.base_model.model.q_proj
    with torch.no_grad():
        for name, (A, B) in zip(names, factors):
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)
    start = time.perf_counter()
    peft_model.add_weighted_adapter(names, weights, "merged", combination_type="svd", svd_rank=rank)
    seconds = time.perf_counter() - start
    state = get_peft_model_state_dict(peft_model, adapter_name="merged")
    merged_config = peft_model.peft_config["merged"].to_dict()
    merged = peft_format.from_state_dict({k: v.detach().clone() for k, v in state.items()}, merged_config, "peft")
    return merged, seconds


def peft_vs_factors(
    *, shape: tuple[int, int] = (4096, 4096), adapters: int = 4, rank: int = 16, seed: int = 0
) -> SpeedResult:
    """Merge `adapters` random rank-`rank` LoRAs of one `shape` layer with peft's dense `svd` and with ours.

    Args:
        shape (`tuple[int, int]`, defaults to `(4096, 4096)`): `(out, in)` of the layer (Llama-2-7B's `q_proj`).
        adapters (`int`, defaults to 4): how many LoRAs, each weighted 1 / `adapters`.
        rank (`int`, defaults to 16): the LoRAs' rank and the merged rank (peft's `svd_rank`).
        seed (`int`, defaults to 0): the factors' seed.

    Returns:
        `SpeedResult`: each merge's wall time (the merge call alone) and the relative difference of the results.
    """
    factors = _factors(shape, adapters, rank, seed)
    weights = [1.0 / adapters] * adapters
    theirs, peft_seconds = _peft_svd(factors, shape, weights, rank)
    inputs = [Adapter({MODULE: LowRank(A, B)}, AdapterMetadata(), f"task{t}") for t, (A, B) in enumerate(factors)]
    start = time.perf_counter()
    ours = merge_adapters(inputs, weights, "svd", rank=rank)
    ours_seconds = time.perf_counter() - start
    x, y = ours[MODULE], theirs[next(iter(theirs))]
    difference = (norm(x) ** 2 + norm(y) ** 2 - 2 * inner(x, y)).clamp_min(0).sqrt() / norm(x)
    return SpeedResult(shape, adapters, rank, peft_seconds, ours_seconds, float(difference))
