"""Prefixless PEFT state dicts of DiT models: what `get_peft_model_state_dict(transformer)` returns and some
trainers save as is (`transformer_blocks.0.attn.to_q.lora_A.weight`), read as the diffusers `transformer.` component.
The model family is told by the module names (see `adaptermerge.families`).
"""

from __future__ import annotations

from ._layout import Layout, NameMap

LAYOUT = Layout(
    "peft-transformer",
    None,
    NameMap("transformer", identity=True),
    "",
    factors=((".lora_A.weight", ".lora_B.weight"),),
    marker=r"^(single_transformer_blocks|transformer_blocks|joint_blocks|blocks)\.\d+\.",
)
LAYOUTS = (LAYOUT,)
