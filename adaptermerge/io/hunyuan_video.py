"""HunyuanVideo layouts: Tencent's original module names (`double_blocks.0.img_attn_qkv`, `single_blocks.0.linear1`,
the text token refiner `txt_in.…`) under ComfyUI's `diffusion_model.` prefix; the canonical names are those of
diffusers' `HunyuanVideoTransformer3DModel`, as `_convert_hunyuan_video_lora_to_diffusers` renames them.

- `comfyui-hunyuan-video`: `diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight` (or `.lora_down.weight`).
Fused projections (`img_attn_qkv`, `txt_attn_qkv`, the refiner's `self_attn_qkv`, and `linear1` = q, k, v and the
MLP input of a single block) are read as parts sharing A, as for Flux.1.
"""

from __future__ import annotations

from ._layout import COMFYUI_FACTORS, Layout, NameMap, Rule

FAMILY = "HunyuanVideo"

_DOUBLE = "transformer_blocks.{i}"
_SINGLE = "single_transformer_blocks.{i}"
_REFINER = "context_embedder.token_refiner.refiner_blocks.{i}"
_STREAMS = {
    "img": ("to_{}", "attn.to_out.0", "ff", "norm1"),
    "txt": ("add_{}_proj", "attn.to_add_out", "ff_context", "norm1_context"),
}
NAMES = NameMap(
    "transformer",
    [
        *(
            rule
            for stream, (qkv, proj, ff, norm) in _STREAMS.items()
            for rule in (
                Rule(
                    f"double_blocks.{{i}}.{stream}_attn_qkv", tuple(f"{_DOUBLE}.attn.{qkv.format(p)}" for p in "qkv")
                ),
                Rule(f"double_blocks.{{i}}.{stream}_attn_proj", (f"{_DOUBLE}.{proj}",)),
                Rule(f"double_blocks.{{i}}.{stream}_mlp.fc1", (f"{_DOUBLE}.{ff}.net.0.proj",)),
                Rule(f"double_blocks.{{i}}.{stream}_mlp.fc2", (f"{_DOUBLE}.{ff}.net.2",)),
                Rule(f"double_blocks.{{i}}.{stream}_mod.linear", (f"{_DOUBLE}.{norm}.linear",)),
            )
        ),
        Rule(
            "single_blocks.{i}.linear1",
            (f"{_SINGLE}.attn.to_q", f"{_SINGLE}.attn.to_k", f"{_SINGLE}.attn.to_v", f"{_SINGLE}.proj_mlp"),
            sizes=(1, 1, 1, 4),
        ),
        Rule("single_blocks.{i}.linear2", (f"{_SINGLE}.proj_out",)),
        Rule("single_blocks.{i}.modulation.linear", (f"{_SINGLE}.norm.linear",)),
        Rule(
            "txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv",
            tuple(f"{_REFINER}.attn.to_{p}" for p in "qkv"),
        ),
        Rule("txt_in.individual_token_refiner.blocks.{i}.self_attn_proj", (f"{_REFINER}.attn.to_out.0",)),
        Rule("txt_in.individual_token_refiner.blocks.{i}.mlp.fc1", (f"{_REFINER}.ff.net.0.proj",)),
        Rule("txt_in.individual_token_refiner.blocks.{i}.mlp.fc2", (f"{_REFINER}.ff.net.2",)),
        Rule("txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1", (f"{_REFINER}.norm_out.linear",)),
        Rule("txt_in.input_embedder", ("context_embedder.proj_in",)),
        Rule("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        Rule("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        Rule("guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",)),
        Rule("guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",)),
        Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ],
)

COMFYUI = Layout("comfyui-hunyuan-video", FAMILY, NAMES, "diffusion_model.", factors=COMFYUI_FACTORS)
LAYOUTS = (COMFYUI,)
