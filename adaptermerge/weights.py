"""Per-adapter merge weights, resolved to one number per module.

An adapter's weight is one of:

- a number, applied to every module;
- a mapping from module-name patterns to numbers, matched as peft matches `rank_pattern` keys (a key is a regular
  expression that must match a whole dotted tail of the module name; a leading `^` anchors it to the start); when
  several keys match, the longest wins; the key `default` gives the rest (1.0 when absent);
- a diffusers-style nested dict, as `set_adapters` accepts it: `{"unet": {"down": …, "mid": …, "up": …},
  "text_encoder": 0.5}`, where `down`/`up` take a number or `{"block_i": number | [one per layer]}`. Unlike
  diffusers, which scales only attention layers and silently leaves resnets and samplers at 1.0, every module of a
  named block gets the block's weight: the `j`-th entry of a list applies to `attentions.j` and `resnets.j`, and
  a block's samplers take its last entry; components not named keep 1.0. A DiT component (`transformer`) takes
  its block lists by name: `{"transformer": {"transformer_blocks": [one per block] | {"3": …} | number,
  "single_transformer_blocks": …, "blocks": …}}` (Flux double and single blocks, SD3 and Qwen-Image
  `transformer_blocks`, Wan `blocks`); a block a dict or list leaves out keeps 1.0 (dict) or is an error (list),
  and other keys are module patterns. Unlike diffusers' substring rule, `transformer_blocks.1` never reaches
  `single_transformer_blocks.1` or `transformer_blocks.10`;
- an A1111 LoRA Block Weight vector: `{"lbw": [17, 12, 20, 26 or 61 numbers] | "PRESET", "multiplier": 1.0}`
  (SD1.x 17/26, SDXL 12/20), mapped to blocks by the LDM numbering (IN00…IN11, M00, OUT00…OUT11); slots the vector
  does not name get 0, as in the extension, and modules outside the blocks (time embedding, conv_out) keep 1.0.
  The extension's Flux vector has 61 values: CLIP (`text_encoder`), T5 (`text_encoder_2`), IN (the input
  embedders), D00–D18 (`transformer_blocks.N`), S00–S37 (`single_transformer_blocks.N`) and OUT (`norm_out`,
  `proj_out`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

from .errors import InvalidParameterError

__all__ = ["LBW_PRESETS", "ModuleWeights", "Weight", "check_weights"]

Weight = float | int | Mapping[str, Any]

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

_SD1_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
_SDXL_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]
_SD1_26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
_SDXL_20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
_FLUX_61 = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]
LBW_LAYOUTS = {17: _SD1_17, 12: _SDXL_12, 26: _SD1_26, 20: _SDXL_20, 61: _FLUX_61}
# The extension's default presets (17 wide: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03…OUT11).
LBW_PRESETS = {
    "NONE": [0] * 17,
    "ALL": [1] * 17,
    "ALL0.5": [0.5] * 17,
    "INS": [1, 1, 1, 1] + [0] * 13,
    "IND": [1, 0, 0, 0, 1, 1, 1] + [0] * 10,
    "INALL": [1] * 7 + [0] * 10,
    "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTS": [1] + [0] * 11 + [1] * 5,
    "OUTALL": [1] + [0] * 7 + [1] * 9,
    "FLUXALL": [1] * 61,
}
_DIT_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|blocks)\.(\d+)\.")
_FLUX_IN = ("x_embedder", "context_embedder", "time_text_embed")
_FLUX_OUT = ("norm_out", "proj_out")
_UNET_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(?:(attentions|resnets)\.(\d+)|(?:downsamplers|upsamplers)\.\d+)")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise InvalidParameterError(f"{where} must be a finite number; got {value!r}")
    return float(value)


class ModuleWeights:
    """One adapter's weight, callable on a module name; keeps the user's spec for provenance."""

    def __init__(self, spec: Weight, resolve: Callable[[str], float]) -> None:
        self.spec = spec
        self._resolve = resolve

    def __call__(self, module: str) -> float:
        return self._resolve(module)

    @property
    def uniform(self) -> float | None:
        """The weight when it is one number for every module, else None."""
        return float(self.spec) if isinstance(self.spec, Real) else None


def _pattern_weights(spec: Mapping[str, Any], where: str) -> Callable[[str], float]:
    default = _number(spec.get("default", 1.0), f"{where}['default']")
    compiled = []
    for key, value in spec.items():
        if key == "default":
            continue
        try:
            compiled.append((len(key), re.compile(rf"(.*\.)?({key})$"), _number(value, f"{where}[{key!r}]")))
        except re.error as err:
            raise InvalidParameterError(
                f"{where}: pattern {key!r} is not a valid regular expression ({err})"
            ) from None
    compiled.sort(key=lambda item: -item[0])

    def resolve(module: str) -> float:
        return next((value for _, regex, value in compiled if regex.match(module)), default)

    return resolve


def _unet_block_weight(spec: Any, module: str, where: str) -> float:
    """A module's weight under diffusers' `{"down", "mid", "up"}` schema (module name without `unet.`)."""
    if not isinstance(spec, Mapping):
        return _number(spec, where)
    unknown = set(spec) - {"down", "mid", "up"}
    if unknown:
        raise InvalidParameterError(f"{where}: unknown UNet keys {sorted(unknown)}; use 'down', 'mid' and 'up'")
    if module.startswith("mid_block."):
        mid = spec.get("mid", 1.0)
        if isinstance(mid, list):
            if len(mid) != 1:
                raise InvalidParameterError(f"{where}['mid'] takes one number or a 1-element list; got {mid!r}")
            mid = mid[0]
        return _number(mid, f"{where}['mid']")
    match = _UNET_BLOCK.match(module)
    if not match:
        return 1.0
    side, block, kind, layer = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    value = spec.get(side, 1.0)
    if isinstance(value, Mapping):
        value = value.get(f"block_{block}", 1.0)
    if isinstance(value, list):
        index = int(layer) if kind else len(value) - 1
        if len(value) == 1:
            index = 0
        if index >= len(value):
            raise InvalidParameterError(
                f"{where}['{side}']['block_{block}'] has {len(value)} entries but module {module!r} is layer {index}"
            )
        value = value[index]
    return _number(value, f"{where}['{side}']")


def _transformer_weights(spec: Mapping[str, Any], where: str) -> Callable[[str], float]:
    """A DiT component's weights: block lists by name (`transformer_blocks`, ...), other keys as module patterns."""
    blocks = {
        name: spec[name] for name in ("transformer_blocks", "single_transformer_blocks", "blocks") if name in spec
    }
    patterns = _pattern_weights({k: v for k, v in spec.items() if k not in blocks}, where)
    for name, value in blocks.items():  # validate numbers now rather than at the first module
        values = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else [value]
        for v in values:
            _number(v, f"{where}[{name!r}]")

    def resolve(module: str) -> float:
        match = _DIT_BLOCK.match(module)
        if match is None or match[1] not in blocks:
            return patterns(module)
        value, index = blocks[match[1]], int(match[2])
        if isinstance(value, Mapping):
            return float(value.get(match[2], value.get(f"block_{index}", 1.0)))
        if isinstance(value, list):
            if index >= len(value):
                raise InvalidParameterError(
                    f"{where}[{match[1]!r}] has {len(value)} entries but module {module!r} is in block {index}"
                )
            return float(value[index])
        return float(value)

    return resolve


def _component_weights(spec: Mapping[str, Any], where: str) -> Callable[[str], float]:
    unknown = set(spec) - set(COMPONENTS)
    if unknown:
        raise InvalidParameterError(
            f"{where}: {sorted(unknown)} are not pipeline components; use {', '.join(COMPONENTS)}, or give module "
            "patterns without component keys"
        )

    def resolve(module: str) -> float:
        component, _, rest = module.partition(".")
        if component not in spec:
            return 1.0
        value = spec[component]
        if component == "unet":
            return _unet_block_weight(value, rest, f"{where}['unet']")
        if isinstance(value, Mapping):
            return resolvers[component](rest)
        return _number(value, f"{where}[{component!r}]")

    resolvers = {
        component: (_transformer_weights if component == "transformer" else _pattern_weights)(
            value, f"{where}[{component!r}]"
        )
        for component, value in spec.items()
        if isinstance(value, Mapping) and component != "unet"
    }
    for component in spec:  # validate numbers now rather than at the first module
        if not isinstance(spec[component], Mapping):
            _number(spec[component], f"{where}[{component!r}]")
    return resolve


def _lbw_block(module: str) -> str | None:
    """The LDM block id (BASE, IN00…, M00, OUT00…) of a diffusers module name, or None outside the blocks."""
    component, _, rest = module.partition(".")
    if component in _TEXT_ENCODERS:
        return "BASE"
    if component != "unet":
        return None
    if rest.startswith("conv_in."):
        return "IN00"
    if rest.startswith("mid_block."):
        return "M00"
    match = _UNET_BLOCK.match(rest)
    if not match:
        return None
    side, block, kind, layer = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    if side == "down":
        return f"IN{1 + 3 * block + int(layer):02d}" if kind else f"IN{3 + 3 * block:02d}"
    return f"OUT{3 * block + int(layer):02d}" if kind else f"OUT{3 * block + 2:02d}"


def _lbw_flux_block(module: str) -> str | None:
    """The block id of the extension's Flux vector (CLIP, T5, IN, D00…, S00…, OUT) of a diffusers Flux module name."""
    component, _, rest = module.partition(".")
    if component in ("text_encoder", "text_encoder_2"):
        return "CLIP" if component == "text_encoder" else "T5"
    if component != "transformer":
        return None
    if (match := _DIT_BLOCK.match(rest)) and match[1] != "blocks":
        return f"{'S' if match[1].startswith('single') else 'D'}{int(match[2]):02d}"
    root = rest.partition(".")[0]
    if root in _FLUX_IN:
        return "IN"
    return "OUT" if root in _FLUX_OUT else None


def _lbw_weights(spec: Mapping[str, Any], where: str) -> Callable[[str], float]:
    unknown = set(spec) - {"lbw", "multiplier"}
    if unknown:
        raise InvalidParameterError(
            f"{where}: block-weight entries take 'lbw' and 'multiplier'; got {sorted(unknown)}"
        )
    vector = spec["lbw"]
    if isinstance(vector, str):
        if vector not in LBW_PRESETS:
            raise InvalidParameterError(
                f"{where}: unknown block-weight preset {vector!r}; presets: {', '.join(LBW_PRESETS)}"
            )
        vector = LBW_PRESETS[vector]
    if not isinstance(vector, Sequence) or len(vector) not in LBW_LAYOUTS:
        raise InvalidParameterError(
            f"{where}: a block-weight vector has 17 or 26 (SD1.x), 12 or 20 (SDXL) or 61 (Flux) values; got {vector!r}"
        )
    multiplier = _number(spec.get("multiplier", 1.0), f"{where}['multiplier']")
    ratios = {
        name: _number(v, f"{where}['lbw'][{i}]") for i, (name, v) in enumerate(zip(LBW_LAYOUTS[len(vector)], vector))
    }

    block_of = _lbw_flux_block if len(vector) == len(_FLUX_61) else _lbw_block

    def resolve(module: str) -> float:
        block = block_of(module)
        return multiplier * (1.0 if block is None else ratios.get(block, 0.0))

    return resolve


def _module_weights(spec: Weight, where: str) -> ModuleWeights:
    if not isinstance(spec, Mapping):
        value = _number(spec, where)
        return ModuleWeights(spec, lambda module: value)
    if "lbw" in spec:
        return ModuleWeights(spec, _lbw_weights(spec, where))
    if spec and set(spec) <= set(COMPONENTS):
        return ModuleWeights(spec, _component_weights(spec, where))
    return ModuleWeights(spec, _pattern_weights(spec, where))


def check_weights(weights: Sequence[Weight] | None, n_adapters: int) -> list[ModuleWeights]:
    """One resolver per adapter (1.0 each when `weights` is None), every number checked to be finite.

    Raises:
        InvalidParameterError: for a length mismatch, a weight that is not a finite number, an unknown component or
            preset, or a pattern that is not a valid regular expression.
    """
    if weights is None:
        weights = [1.0] * n_adapters
    weights = list(weights)
    if len(weights) != n_adapters:
        got = f"{len(weights)} weight" + ("s" if len(weights) != 1 else "")
        raise InvalidParameterError(
            f"got {got} for {n_adapters} adapter{'s' if n_adapters != 1 else ''}; give one weight per adapter"
        )
    return [_module_weights(weight, f"weight {i}") for i, weight in enumerate(weights)]
