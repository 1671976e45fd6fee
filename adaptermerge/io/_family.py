"""Which model family an adapter was trained on, from its layout or its canonical module names and shapes.

A trainer layout names its family (kohya Flux is Flux.1). Otherwise the diffusers module names tell DiT families
apart (`single_transformer_blocks` is Flux.1, `blocks.N.attn1` Wan, `img_mlp` Qwen-Image), and where names are shared,
a width: a UNet's cross-attention keys tell SD1 (768), SD2 (1024) and SDXL (2048) apart. Only file
headers are read. An adapter whose family is not recognised (an LLM adapter, a DiT family without a marker here)
has none, and merges with anything of the same shapes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..adapter import Adapter, module_shape
from ..errors import IncompatibleAdaptersError
from ._detect import LAYOUTS

__all__ = ["check_same_family", "model_family"]

# (family, a regex some module name matches); the first family with a match wins.
_MARKERS = (
    ("Flux.2", r"^transformer\.single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj$"),
    ("HunyuanVideo", r"^transformer\.context_embedder\.token_refiner\."),
    ("Flux.1", r"^transformer\.single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)$"),
    ("Qwen-Image", r"^transformer\.transformer_blocks\.\d+\.(img_mlp|txt_mlp|img_mod|txt_mod)\."),
    ("Wan", r"^transformer\.blocks\.\d+\.(attn1|attn2|ffn)\."),
    ("Lumina2", r"^transformer\.(noise_refiner|context_refiner)\.\d+\."),
)
# Module names shared by several families, told apart by a width: a UNet's cross-attention key input (the text
# encoder's width), and a joint block's context projection (SD3 Medium/3.5 Medium 1536, SD3.5 Large 2432; Flux.1 and
# Qwen-Image double blocks are 3072 wide and have the same names, so they stay unnamed without another marker).
_BY_WIDTH = (
    (re.compile(r"^unet\..*\.attn2\.to_k$"), {768: "SD1", 1024: "SD2", 2048: "SDXL"}),
    (re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.add_q_proj$"), {1536: "SD3", 2432: "SD3"}),
)


def model_family(adapter: Adapter) -> str | None:
    """The model family of `adapter` (`"Flux.1"`, `"SDXL"`, `"Wan"`, ...), or None when it is not recognised."""
    layout = LAYOUTS.get(adapter.metadata.format)
    if layout is not None and layout.family is not None:
        return layout.family
    names = list(adapter)
    for family, marker in _MARKERS:
        pattern = re.compile(marker)
        if any(pattern.search(name) for name in names):
            return family
    if any(name.startswith("text_encoder_2.") for name in names) and any(n.startswith("unet.") for n in names):
        return "SDXL"
    for pattern, widths in _BY_WIDTH:
        if name := next((n for n in names if pattern.match(n)), None):
            return widths.get(module_shape(adapter, name)[1])
    return None


def check_same_family(adapters: Sequence[Adapter]) -> None:
    """Raise :class:`IncompatibleAdaptersError` when the adapters belong to different model families, naming both."""
    families = {}
    for adapter in adapters:
        if (family := model_family(adapter)) is not None:
            families.setdefault(family, adapter.name)
    if len(families) > 1:
        named = ", ".join(f"{name!r} is {family}" for family, name in families.items())
        raise IncompatibleAdaptersError(
            f"the adapters belong to different model families ({named}); merge adapters of one family"
        )
