"""Flux.1 layouts: kohya sd-scripts, ComfyUI and fal name BFL's modules; the canonical names are diffusers'.

BFL's `double_blocks.N` are `FluxTransformer2DModel.transformer_blocks.N`, `single_blocks.N` its
`single_transformer_blocks.N`. Their fused projections (`img_attn.qkv`, `txt_attn.qkv`, and `linear1` = q, k, v and
the MLP input of a single block) are read as modules sharing `A`, as diffusers'
`_convert_kohya_flux_lora_to_diffusers` splits them, and joined again when written in a BFL layout.

- `kohya-flux`: sd-scripts' `networks/lora_flux.py`: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
  `lora_te1_` for CLIP-L, `lora_te3_` for T5.
- `comfyui-flux`: ComfyUI's saved LoRAs: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`,
  `text_encoders.clip_l.transformer.` and `text_encoders.t5xxl.transformer.`.
- `fal-flux`: fal's Kontext trainer: `base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight`.
- `xlabs-flux`: XLabs' x-flux: `double_blocks.0.processor.qkv_lora1.down.weight` (no alphas).
OneTrainer's `lora_transformer_` files name diffusers modules and are read by the kohya reader.
"""

from __future__ import annotations

from ._layout import COMFYUI_FACTORS, Layout, NameMap, Rule

FAMILY = "Flux.1"

_DOUBLE = "transformer_blocks.{i}"
_SINGLE = "single_transformer_blocks.{i}"
# BFL names that Flux.1 and Flux.2 share, with one diffusers name: double-block attention, embedders, final layer.
SHARED_RULES = (
    Rule("double_blocks.{i}.img_attn.qkv", tuple(f"{_DOUBLE}.attn.to_{p}" for p in "qkv")),
    Rule("double_blocks.{i}.txt_attn.qkv", tuple(f"{_DOUBLE}.attn.add_{p}_proj" for p in "qkv")),
    Rule("double_blocks.{i}.img_attn.proj", (f"{_DOUBLE}.attn.to_out.0",)),
    Rule("double_blocks.{i}.txt_attn.proj", (f"{_DOUBLE}.attn.to_add_out",)),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
)
NAMES = NameMap(
    "transformer",
    [
        *SHARED_RULES,
        Rule("double_blocks.{i}.img_mlp.0", (f"{_DOUBLE}.ff.net.0.proj",)),
        Rule("double_blocks.{i}.img_mlp.2", (f"{_DOUBLE}.ff.net.2",)),
        Rule("double_blocks.{i}.txt_mlp.0", (f"{_DOUBLE}.ff_context.net.0.proj",)),
        Rule("double_blocks.{i}.txt_mlp.2", (f"{_DOUBLE}.ff_context.net.2",)),
        Rule("double_blocks.{i}.img_mod.lin", (f"{_DOUBLE}.norm1.linear",)),
        Rule("double_blocks.{i}.txt_mod.lin", (f"{_DOUBLE}.norm1_context.linear",)),
        Rule(
            "single_blocks.{i}.linear1",
            (f"{_SINGLE}.attn.to_q", f"{_SINGLE}.attn.to_k", f"{_SINGLE}.attn.to_v", f"{_SINGLE}.proj_mlp"),
            sizes=(1, 1, 1, 4),
        ),
        Rule("single_blocks.{i}.linear2", (f"{_SINGLE}.proj_out",)),
        Rule("single_blocks.{i}.modulation.lin", (f"{_SINGLE}.norm.linear",)),
        Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
        Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ],
)

KOHYA = Layout(
    "kohya-flux",
    FAMILY,
    NAMES,
    "lora_unet_",
    flat=True,
    text_encoders={"lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2"},
)
COMFYUI = Layout(
    "comfyui-flux",
    FAMILY,
    NAMES,
    "diffusion_model.",
    factors=COMFYUI_FACTORS,
    text_encoders={
        "text_encoders.clip_l.transformer.": "text_encoder",
        "text_encoders.t5xxl.transformer.": "text_encoder_2",
    },
)
FAL = Layout("fal-flux", FAMILY, NAMES, "base_model.model.", factors=((".lora_A.weight", ".lora_B.weight"),))

# XLabs' x-flux trains attention processors: `qkv_lora1`/`proj_lora1` on the image stream, `…2` on the text stream.
_XLABS = "double_blocks.{i}.processor"
XLABS_NAMES = NameMap(
    "transformer",
    [
        Rule(f"{_XLABS}.qkv_lora1", tuple(f"{_DOUBLE}.attn.to_{p}" for p in "qkv")),
        Rule(f"{_XLABS}.qkv_lora2", tuple(f"{_DOUBLE}.attn.add_{p}_proj" for p in "qkv")),
        Rule(f"{_XLABS}.proj_lora1", (f"{_DOUBLE}.attn.to_out.0",)),
        Rule(f"{_XLABS}.proj_lora2", (f"{_DOUBLE}.attn.to_add_out",)),
        Rule("single_blocks.{i}.processor.qkv_lora", tuple(f"{_SINGLE}.attn.to_{p}" for p in "qkv")),
        Rule("single_blocks.{i}.processor.proj_lora", (f"{_SINGLE}.proj_out",)),
    ],
)
XLABS = Layout("xlabs-flux", FAMILY, XLABS_NAMES, "", factors=((".down.weight", ".up.weight"),), alphas=False)
LAYOUTS = (KOHYA, COMFYUI, FAL, XLABS)
