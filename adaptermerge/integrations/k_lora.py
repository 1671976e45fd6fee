"""K-LoRA as a live mode: per layer and per denoising step, use the subject's update or the style's, never both.

Ouyang, Li, Hou, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs" (CVPR 2025,
https://arxiv.org/abs/2502.18461). The rule follows the authors' code (HVision-NKU/K-LoRA at 893d0f9, `klora.py`,
`utils.py`): for a layer with subject update `ΔW_c` and style update `ΔW_s`,

- `S_c`, `S_s`: the sums of the `K = r_c · r_s` largest entries of `|ΔW_c|` and `|ΔW_s|`;
- `γ`: the mean over layers of `Σ|ΔW_c| / Σ|ΔW_s|`, recomputed without the layers at 3× that mean or more;
- at progress `t`, `scale = α t + β` (pattern `"s"`), or `(α t + β) mod α` (pattern `"s*"`, the code's default,
  which restarts the scale once);
- the layer applies `ΔW_c` when `(S_c / γ) / (S_s · scale) > 1`, else `ΔW_s`: a hard switch.

`S_c`, `S_s` and `γ` depend on the factors only, so they are computed once, at load, in row tiles of `B A` (never a
whole `out × in` matrix); each step then compares two cached numbers per layer and rewrites only the layers whose
choice changed, in the live merge's `lora_B` blocks (the chosen adapter at its weight, the other at 0).

Where this differs from the code:

- **Step granularity.** The code advances one global counter on every hooked layer call and takes
  `t = (count mod sum_timesteps) / sum_timesteps`, with `sum_timesteps` fixed at 28000 for SDXL (50 steps × 560 layer
  calls) and `steps × layers` for FLUX. Here `t = i / N` at step `i` of `N`, for every layer: a layer called at
  position `j` of `L` in the step sees `t = i / N + (j + 1) / (N L)` in the code, so a layer whose switch point falls
  inside a step's window switches one step later here. The code's counter also runs on across images and does not
  follow the step count actually used (30 steps on SDXL cover `t < 0.6` there); here every image runs `t` over
  `[0, 1)`.
- **Layers.** The code hooks the UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`; FLUX: every
  LoRA'd layer for full-layer LoRAs), which are what its training script adapts, and takes `γ` over every layer of
  the files. Here the rule runs on every module both adapters adapt, and `γ` over the same modules; a module only one
  adapter has keeps that adapter at its weight.
- **Scale.** The code multiplies `up @ down` without `alpha / r`; here the updates carry their scale. With one scale
  per adapter (the code's DreamBooth LoRAs) the choices are the same, since `S_c / (γ S_s)` does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..adapter import Adapter
from ..errors import IncompatibleAdaptersError, InvalidParameterError
from ..lowrank import COMPUTE_DTYPE, LowRank
from ..weights import ModuleWeights, Weight, check_weights

__all__ = ["KLoraParams", "KLoraRule", "klora_rule", "klora_weights", "topk_abs_sum"]

TILE_ENTRIES = 1 << 18  # entries of `B A` held at once while scoring a layer


@dataclass(frozen=True)
class KLoraParams:
    """Parameters of the `k_lora` live mode (the authors' defaults).

    Args:
        pattern (`"s*"` or `"s"`, defaults to `"s*"`): the time scale; `"s*"` favours style blocks (recommended by
            the authors for FLUX), `"s"` texture.
        alpha (`float`, defaults to `1.5`): the slope of the time scale.
        beta (`float`, *optional*): its offset; `0.85 * alpha` for `"s*"`, 0.5 for `"s"` by default.
    """

    pattern: Literal["s*", "s"] = field(default="s*", metadata={"help": "K-LoRA time scale: 's*' or 's'."})
    alpha: float = field(default=1.5, metadata={"help": "K-LoRA: slope of the time scale."})
    beta: float | None = field(default=None, metadata={"help": "K-LoRA: offset (0.85 alpha for s*, 0.5 for s)."})

    def __post_init__(self) -> None:
        if self.pattern not in ("s*", "s"):
            raise ValueError(f"pattern must be 's*' or 's'; got {self.pattern!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number; got {self.alpha!r}")
        if self.beta is not None and (isinstance(self.beta, bool) or not isinstance(self.beta, int | float)):
            raise ValueError(f"beta must be a number; got {self.beta!r}")

    @property
    def offset(self) -> float:
        """`beta`, or its default for the pattern."""
        if self.beta is not None:
            return float(self.beta)
        return 0.85 * self.alpha if self.pattern == "s*" else 0.5

    def scale(self, progress: float) -> float:
        """The time scale at `progress`, computed as the code computes it."""
        scale = self.alpha * progress + self.offset
        return scale % self.alpha if self.pattern == "s*" else scale


def topk_abs_sum(update: LowRank, k: int, *, tile_entries: int = TILE_ENTRIES) -> tuple[float, float]:
    """`(sum of the k largest |ΔW| entries, sum of all |ΔW| entries)` of `ΔW = B A`, over row tiles of `B A`.

    At most `max(tile_entries, in)` entries of the product (plus the running top `k`) exist at once.
    """
    A, B = update.A.to(COMPUTE_DTYPE), update.B.to(COMPUTE_DTYPE)
    rows = max(1, tile_entries // A.shape[1])
    k = min(k, update.out_features * update.in_features)
    best = torch.empty(0, dtype=COMPUTE_DTYPE)
    total = 0.0
    for start in range(0, B.shape[0], rows):
        tile = (B[start : start + rows] @ A).abs_().flatten()
        total += float(tile.sum())
        best = torch.cat([best, tile]).topk(min(k, best.numel() + tile.numel())).values
    return float(best.sum()), total


@dataclass(frozen=True)
class KLoraRule:
    """The cached K-LoRA scores of a (subject, style) pair and the per-step choice they give.

    Args:
        scores (`dict[str, tuple[float, float]]`): per module both adapters have, `(S_c, S_s)`.
        gamma (`float`): the balance `γ` between the adapters.
        params (`KLoraParams`): the time scale.
    """

    scores: dict[str, tuple[float, float]]
    gamma: float
    params: KLoraParams

    def uses_subject(self, module: str, progress: float) -> bool:
        """Whether `module` applies the subject's update at `progress`: `(S_c / γ) / (S_s · scale) > 1`, with the
        code's float semantics where the denominator is 0 (`x / 0 = inf` for `x > 0`, `0 / 0` is NaN: the style)."""
        subject, style = self.scores[module]
        numerator, denominator = subject / self.gamma, style * self.params.scale(progress)
        return numerator > 0 if denominator == 0 else numerator / denominator > 1

    def weights_at(self, resolvers: Sequence[ModuleWeights]) -> Callable[[float], Callable[[int, str], float]]:
        """Per-progress weights for a live merge of `[subject, style]`: the chosen adapter at its weight, the other
        at 0, on the modules both have; the user's weight elsewhere."""

        def at(progress: float) -> Callable[[int, str], float]:
            def weight(index: int, module: str) -> float:
                if module in self.scores and self.uses_subject(module, progress) != (index == 0):
                    return 0.0
                return resolvers[index](module)

            return weight

        return at


def klora_rule(subject: Adapter, style: Adapter, params: KLoraParams) -> KLoraRule:
    """Score every module both adapters have and compute `γ` (see the module docstring)."""
    scores, ratios = {}, []
    for module in subject:
        if module not in style:
            continue
        content, styled = subject[module], style[module]
        k = content.rank * styled.rank
        (top_c, sum_c), (top_s, sum_s) = topk_abs_sum(content, k), topk_abs_sum(styled, k)
        scores[module] = (top_c, top_s)
        ratios.append(sum_c / sum_s if sum_s > 0 else float("inf"))
    mean = sum(ratios) / len(ratios) if ratios else float("inf")
    kept = [ratio for ratio in ratios if ratio < 3 * mean]
    gamma = sum(kept) / len(kept) if kept else float("inf")
    return KLoraRule(scores, gamma, params)


def klora_weights(
    adapters: Sequence[Adapter], params: dict[str, Any]
) -> Callable[[Sequence[Weight] | None], tuple[Callable[[float], Callable[[int, str], float]], bool]]:
    """The `k_lora` live mode for `[subject, style]`: the rule is scored once, here; the result maps the adapters'
    weights to the per-progress weights of the live merge (see the module docstring), which always change with
    the progress.

    Raises:
        IncompatibleAdaptersError: unless there are exactly two plain (not DoRA) adapters.
        InvalidParameterError: for unknown or bad parameters.
    """
    if len(adapters) != 2:
        raise IncompatibleAdaptersError(f"k_lora fuses [subject, style]: two adapters; got {len(adapters)}")
    dora = next((adapter.name for adapter in adapters if adapter.is_dora), None)
    if dora is not None:
        raise IncompatibleAdaptersError(f"k_lora switches plain LoRAs; adapter {dora!r} is DoRA")
    try:
        rule_params = KLoraParams(**params)
    except (TypeError, ValueError) as err:
        raise InvalidParameterError(f"k_lora: {err}") from None
    rule = klora_rule(adapters[0], adapters[1], rule_params)
    return lambda weights: (rule.weights_at(check_weights(weights, 2)), True)
