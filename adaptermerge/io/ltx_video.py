"""LTX-Video layouts: Lightricks' original module names under ComfyUI's `diffusion_model.` prefix; the canonical names
are those of diffusers' `LTXVideoTransformer3DModel`.

- `comfyui-ltx-video`: `diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight`, as LTX-Video-Trainer writes
  and diffusers reads (or ComfyUI's `.lora_down.weight` with `.alpha`); written with peft's suffixes and no alphas
  (the scale is folded into `lora_B`).
Block modules (`attn1`, `attn2`, `ff`), `caption_projection` and `proj_out` have diffusers' names already, which is
all `_convert_non_diffusers_ltxv_lora_to_diffusers` assumes (it only swaps the prefix); the patch embedder and the
timestep modulation are `patchify_proj` and `adaln_single` in the original model, renamed as diffusers' single-file
converter (`convert_ltx_transformer_checkpoint_to_diffusers`) renames them. The block names are shared with other DiTs
(Mochi, PixArt, CogView4, ...), so the family is named from the modules and widths (see `_family`), not the layout.
"""

from __future__ import annotations

from ._layout import COMFYUI_FACTORS, Layout, NameMap, Rule

_TIME = ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear")
NAMES = NameMap(
    "transformer",
    [
        Rule("patchify_proj", ("proj_in",)),
        *(Rule(f"adaln_single.{path}", (f"time_embed.{path}",)) for path in _TIME),
    ],
    identity=True,
)

COMFYUI = Layout(
    "comfyui-ltx-video",
    None,
    NAMES,
    "diffusion_model.",
    factors=COMFYUI_FACTORS[::-1],
    alphas=False,
    marker=r"^(patchify_proj|proj_in|adaln_single\.|time_embed\.|caption_projection\.|transformer_blocks\.\d+\.(attn1|attn2|ff)\.)",
)
LAYOUTS = (COMFYUI,)
