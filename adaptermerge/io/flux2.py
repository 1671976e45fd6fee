"""Flux.2 layouts: BFL's module names (shared with Flux.1 for most of them) under ai-toolkit's/ComfyUI's
`diffusion_model.` prefix, kohya's `lora_unet_` and fal's `base_model.model.`; the canonical names are those of
diffusers' `Flux2Transformer2DModel`, as `_convert_non_diffusers_flux2_lora_to_diffusers` and
`_convert_kohya_flux2_lora_to_diffusers` rename them.

Unlike Flux.1, a single block's fused `linear1` (q, k, v and the MLP input) stays one module in diffusers
(`attn.to_qkv_mlp_proj`), the MLPs are `ff.linear_in`/`linear_out` and the modulation is shared by all blocks
(`double_stream_modulation_img.lin`, `single_stream_modulation.lin`). The final layer's `adaLN_modulation` halves are
swapped as for Flux.1 (diffusers' single-file converter swaps them; its LoRA converter does not).

Flux.1 and Flux.2 files carry the same key names wherever a LoRA trains attention, so these layouts claim a file only
when its modules' shapes say Flux.2 (`_flux2_shaped`); attention-only files are read by the Flux.1 layouts, under the
same canonical names, and their family is left open (see `_family`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ._layout import COMFYUI_FACTORS, Layout, NameMap, Rule
from .flux import SHARED_RULES

FAMILY = "Flux.2"

_DOUBLE = "transformer_blocks.{i}"
_SINGLE = "single_transformer_blocks.{i}"
_EMBEDDERS = {"time_in": "timestep_embedder", "guidance_in": "guidance_embedder"}
_MODULATIONS = ("single_stream_modulation", "double_stream_modulation_img", "double_stream_modulation_txt")
NAMES = NameMap(
    "transformer",
    [
        *SHARED_RULES,
        *(
            Rule(f"double_blocks.{{i}}.{stream}_mlp.{index}", (f"{_DOUBLE}.{ff}.linear_{io}",))
            for stream, ff in (("img", "ff"), ("txt", "ff_context"))
            for index, io in (("0", "in"), ("2", "out"))
        ),
        Rule("single_blocks.{i}.linear1", (f"{_SINGLE}.attn.to_qkv_mlp_proj",)),
        Rule("single_blocks.{i}.linear2", (f"{_SINGLE}.attn.to_out",)),
        *(
            Rule(f"{original}.{layer}_layer", (f"time_guidance_embed.{embedder}.linear_{n}",))
            for original, embedder in _EMBEDDERS.items()
            for n, layer in ((1, "in"), (2, "out"))
        ),
        *(Rule(f"{module}.lin", (f"{module}.linear",)) for module in _MODULATIONS),
    ],
)

# Modules whose widths tell the families apart, as `(pattern, Flux.2 ratio, Flux.1 ratio, ratio of out to in)`:
# Flux.2's SwiGLU MLP is 6x its width in and 3x back (Flux.1's GELU MLP 4x and 4x), its single-block linear1 9x
# (Flux.1 7x) and linear2 4x back (Flux.1 5x).
_RATIOS = (
    (re.compile(r"transformer\.transformer_blocks\.\d+\.ff(_context)?\.linear_in"), 6, 4, True),
    (re.compile(r"transformer\.transformer_blocks\.\d+\.ff(_context)?\.linear_out"), 3, 4, False),
    (re.compile(r"transformer\.single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj"), 9, 7, True),
    (re.compile(r"transformer\.single_transformer_blocks\.\d+\.attn\.to_out"), 4, 5, False),
)
_OWN = re.compile(rf"transformer\.({'|'.join(_MODULATIONS)})\.linear")


def _flux2_shaped(shapes: Mapping[str, tuple[int, int]]) -> bool:
    """Whether modules read by Flux.2's names (`{canonical name: (out, in)}`) are Flux.2's: some module only Flux.2
    has or has at that shape, and none that has Flux.1's shape."""
    votes = set()
    for name, (out_features, in_features) in shapes.items():
        if _OWN.fullmatch(name):
            votes.add(True)
        for pattern, flux2, flux1, outward in _RATIOS:
            if pattern.fullmatch(name):
                wide, narrow = (out_features, in_features) if outward else (in_features, out_features)
                if wide in (flux2 * narrow, flux1 * narrow):
                    votes.add(wide == flux2 * narrow)
    return votes == {True}


COMFYUI = Layout(
    "comfyui-flux2",
    FAMILY,
    NAMES,
    "diffusion_model.",
    factors=COMFYUI_FACTORS[::-1],
    alphas=False,
    shapes_fit=_flux2_shaped,
)
KOHYA = Layout("kohya-flux2", FAMILY, NAMES, "lora_unet_", flat=True, shapes_fit=_flux2_shaped)
FAL = Layout(
    "fal-flux2",
    FAMILY,
    NAMES,
    "base_model.model.",
    factors=((".lora_A.weight", ".lora_B.weight"),),
    alphas=False,
    shapes_fit=_flux2_shaped,
)
LAYOUTS = (COMFYUI, KOHYA, FAL)
# The Flux.1 layouts these mirror: a file they read whose modules are all `SHARED_RULES` ones may be either family.
FLUX1_TWINS = ("comfyui-flux", "kohya-flux", "fal-flux")
