"""SD3 / SD3.5 layouts: kohya sd-scripts (`networks/lora_sd3.py`) names Stability's MMDiT modules; the canonical
names are those of diffusers' `SD3Transformer2DModel`, as diffusers' single-file converter
(`convert_sd3_transformer_checkpoint_to_diffusers`) renames the same modules of a checkpoint.

- `kohya-sd3`: `lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight` (fused q, k, v of the image stream;
  `context_block` is the text stream, `x_block_attn2` the second attention of SD3.5 Medium), `lora_te1_`/`lora_te2_`
  for the CLIP encoders and `lora_te3_` for T5. diffusers has no converter for these files.
The last block's text stream is "pre-only": its `adaLN_modulation` has two chunks (shift, scale) where diffusers'
`norm1_context` holds (scale, shift), so its halves are swapped as the single-file converter swaps them.
"""

from __future__ import annotations

from ._layout import Layout, NameMap, Rule

FAMILY = "SD3"

_BLOCK = "transformer_blocks.{i}"
_STREAMS = {
    "x_block": ("to_{}", "attn.to_out.0", "ff", "norm1"),
    "context_block": ("add_{}_proj", "attn.to_add_out", "ff_context", "norm1_context"),
}
NAMES = NameMap(
    "transformer",
    [
        *(
            rule
            for stream, (qkv, proj, ff, norm) in _STREAMS.items()
            for rule in (
                Rule(f"joint_blocks.{{i}}.{stream}.attn.qkv", tuple(f"{_BLOCK}.attn.{qkv.format(p)}" for p in "qkv")),
                Rule(f"joint_blocks.{{i}}.{stream}.attn.proj", (f"{_BLOCK}.{proj}",)),
                Rule(f"joint_blocks.{{i}}.{stream}.mlp.fc1", (f"{_BLOCK}.{ff}.net.0.proj",)),
                Rule(f"joint_blocks.{{i}}.{stream}.mlp.fc2", (f"{_BLOCK}.{ff}.net.2",)),
                Rule(
                    f"joint_blocks.{{i}}.{stream}.adaLN_modulation.1",
                    (f"{_BLOCK}.{norm}.linear",),
                    swap_two_chunks=stream == "context_block",
                ),
            )
        ),
        Rule("joint_blocks.{i}.x_block.attn2.qkv", tuple(f"{_BLOCK}.attn2.to_{p}" for p in "qkv")),
        Rule("joint_blocks.{i}.x_block.attn2.proj", (f"{_BLOCK}.attn2.to_out.0",)),
        Rule("context_embedder", ("context_embedder",)),
        Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ],
)

KOHYA = Layout(
    "kohya-sd3",
    FAMILY,
    NAMES,
    "lora_unet_",
    flat=True,
    text_encoders={"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"},
)
LAYOUTS = (KOHYA,)
