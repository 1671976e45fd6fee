"""Qwen-Image layouts: its original module names are already diffusers' `QwenImageTransformer2DModel` names, so
ComfyUI files (`diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight`) differ from diffusers files only
in prefix and suffixes, as `_convert_non_diffusers_qwen_lora_to_diffusers` reads them. kohya files of Qwen-Image
(`lora_unet_transformer_blocks_…`) are read by the kohya reader.
"""

from __future__ import annotations

from ._layout import COMFYUI_FACTORS, Layout, NameMap

FAMILY = "Qwen-Image"

COMFYUI = Layout(
    "comfyui-qwen-image",
    FAMILY,
    NameMap("transformer", identity=True),
    "diffusion_model.",
    factors=COMFYUI_FACTORS,
    marker=r"^transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp|img_mod|txt_mod)\.",
)
LAYOUTS = (COMFYUI,)
