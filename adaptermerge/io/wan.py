"""Wan 2.1/2.2 layouts: ComfyUI (and lightx2v, Kijai) and musubi-tuner name Wan's own modules; the canonical names
are those of diffusers' `WanTransformer3DModel`, as `_convert_non_diffusers_wan_lora_to_diffusers` and
`_convert_musubi_wan_lora_to_diffusers` rename them.

- `comfyui-wan`: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` (or `.lora_A.weight`), with the image
  cross-attention of the I2V models (`cross_attn.k_img`, `v_img`) and the image embedder (`img_emb.proj.1`, `.3`).
- `musubi-wan`: `lora_unet_blocks_0_self_attn_q.lora_down.weight`.
"""

from __future__ import annotations

from ._layout import COMFYUI_FACTORS, Layout, NameMap, Rule

FAMILY = "Wan"

_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
NAMES = NameMap(
    "transformer",
    [
        *(Rule(f"blocks.{{i}}.self_attn.{o}", (f"blocks.{{i}}.attn1.{c}",)) for o, c in _ATTENTION.items()),
        *(Rule(f"blocks.{{i}}.cross_attn.{o}", (f"blocks.{{i}}.attn2.{c}",)) for o, c in _ATTENTION.items()),
        Rule("blocks.{i}.cross_attn.k_img", ("blocks.{i}.attn2.add_k_proj",)),
        Rule("blocks.{i}.cross_attn.v_img", ("blocks.{i}.attn2.add_v_proj",)),
        Rule("blocks.{i}.ffn.0", ("blocks.{i}.ffn.net.0.proj",)),
        Rule("blocks.{i}.ffn.2", ("blocks.{i}.ffn.net.2",)),
        Rule("time_projection.1", ("condition_embedder.time_proj",)),
        Rule("head.head", ("proj_out",)),
        Rule("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
        Rule("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
        Rule("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
        Rule("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
        Rule("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
        Rule("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
    ],
)

COMFYUI = Layout(
    "comfyui-wan",
    FAMILY,
    NAMES,
    "diffusion_model.",
    factors=COMFYUI_FACTORS,
)
MUSUBI = Layout("musubi-wan", FAMILY, NAMES, "lora_unet_", flat=True)
LAYOUTS = (COMFYUI, MUSUBI)
