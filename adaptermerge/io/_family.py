"""Which model family an adapter was trained on, from its layout or its canonical module names and shapes.

A trainer layout names its family (kohya Flux is Flux.1). Otherwise the diffusers module names tell DiT families
apart (`single_transformer_blocks` is Flux.1, `blocks.N.attn1` Wan, `img_mlp` Qwen-Image), and where names are shared,
a width: a UNet's cross-attention keys tell SD1 (768), SD2 (1024) and SDXL (2048) apart, and LTX-Video's own modules
its 2048 or 4096 wide blocks from other DiTs' (where they cannot, the family is an open one such as "LTX-Video or
another DiT", which is held against no other). Only file headers are read. An adapter whose family is not recognised
(an LLM adapter, a DiT family without a marker here) has none, and merges with anything of the same shapes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..adapter import Adapter, module_shape
from ..errors import IncompatibleAdaptersError
from . import flux, flux2
from ._detect import LAYOUTS

__all__ = ["AMBIGUOUS_FAMILIES", "check_same_family", "model_family"]

# (family, a regex some module name matches); the first family with a match wins.
_MARKERS = (
    (
        "Flux.2",
        r"^transformer\.(single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj$|time_guidance_embed\."
        r"|(single_stream_modulation|double_stream_modulation_(img|txt))\.linear$)",
    ),
    ("HunyuanVideo", r"^transformer\.context_embedder\.token_refiner\."),
    ("Flux.1", r"^transformer\.single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)$"),
    ("Qwen-Image", r"^transformer\.transformer_blocks\.\d+\.(img_mlp|txt_mlp|img_mod|txt_mod)\."),
    ("Wan", r"^transformer\.blocks\.\d+\.(attn1|attn2|ffn)\."),
    ("Lumina2", r"^transformer\.(noise_refiner|context_refiner)\.\d+\."),
    (
        "LTX-2",
        r"^transformer\.(audio_(proj_in|caption_projection|time_embed)\."
        r"|transformer_blocks\.\d+\.(audio_attn[12]|audio_ff|audio_to_video_attn|video_to_audio_attn)\.)",
    ),
)
# Module names shared by several families, told apart by a width: a UNet's cross-attention key input (the text
# encoder's width), and a joint block's context projection (SD3 Medium/3.5 Medium 1536, SD3.5 Large 2432; Flux.1 and
# Qwen-Image double blocks are 3072 wide and have the same names, so they stay unnamed without another marker).
_BY_WIDTH = (
    (re.compile(r"^unet\..*\.attn2\.to_k$"), {768: "SD1", 1024: "SD2", 2048: "SDXL"}),
    (re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.add_q_proj$"), {1536: "SD3", 2432: "SD3"}),
)

# LTX-Video (diffusers' `LTXVideoTransformer3DModel`) is 2048 wide (2B: 32 heads x 64, its cross-attention reading a
# 2048-wide caption projection) or 4096 (13B: 32 x 128, as wide as LTX-2's video stream). Its block modules
# (`transformer_blocks.N.attn1`, `attn2`, `ff`) are also Mochi's, PixArt's, CogView4's, Cosmos'..., so it is named
# from modules only LTX has at those widths: the patch embedder `proj_in`, the `time_embed` modulation and the
# caption projection (PixArt and Allegro call theirs `adaln_single`, Sana's are 1152 or 2240 wide, Stable Audio's
# `proj_in` 1536), or the 2B's cross-attention keys reading 2048 (Cosmos' read its 1024-wide text). Block modules
# alone, at one of those widths, leave the family open; such names are not held against other families.
LTX_OR_DIT = "LTX-Video or another DiT"
LTX_OR_LTX2 = "LTX-Video or LTX-2"
# Flux.1 and Flux.2 share BFL's attention, embedder and final-layer names (and diffusers'), and Flux.2 klein 4B is
# 3072 wide as Flux.1 is: a Flux.1-layout file of those modules alone is Flux.2 only when wider (klein 9B, dev).
FLUX_OPEN = "Flux.1 or Flux.2"
AMBIGUOUS_FAMILIES = frozenset({LTX_OR_DIT, LTX_OR_LTX2, FLUX_OPEN})
_FLUX_SHARED = tuple(pattern for rule in flux.SHARED_RULES for pattern in rule.canonical_patterns)
_FLUX_ATTENTION_INPUT = re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj)$")
_LTX_OWN = re.compile(
    r"^transformer\.(proj_in|time_embed\.emb\.timestep_embedder\.linear_[12]|caption_projection\.linear_[12])$"
)
_LTX_CROSS_KEY = re.compile(r"^transformer\.transformer_blocks\.\d+\.attn2\.to_k$")
_DIT_BLOCK = re.compile(r"^transformer\.transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.2)$")


def _ltx_family(adapter: Adapter, names: list[str]) -> str | None:
    """LTX-Video, an open name for LTX-shaped block modules, or None (every pattern's modules output the width)."""

    def widths(pattern: re.Pattern[str], axis: int) -> set[int]:
        return {module_shape(adapter, name)[axis] for name in names if pattern.match(name)}

    own = widths(_LTX_OWN, 0)
    if 2048 in own or 2048 in widths(_LTX_CROSS_KEY, 1):
        return "LTX-Video"
    if 4096 in own:
        return LTX_OR_LTX2
    return LTX_OR_DIT if widths(_DIT_BLOCK, 0) & {2048, 4096} else None


def model_family(adapter: Adapter) -> str | None:
    """The model family of `adapter` (`"Flux.1"`, `"SDXL"`, `"Wan"`, ...), one of `AMBIGUOUS_FAMILIES` when its modules
    fit several, or None when it is not recognised."""
    layout = LAYOUTS.get(adapter.metadata.format)
    if layout is not None and layout.family is not None:
        if layout.name in flux2.FLUX1_TWINS and all(
            any(p.fullmatch(name.removeprefix("transformer.")) for p in _FLUX_SHARED) for name in adapter
        ):
            widths = {module_shape(adapter, name)[1] for name in adapter if _FLUX_ATTENTION_INPUT.match(name)}
            return "Flux.2" if widths & {4096, 6144} else FLUX_OPEN
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
    return _ltx_family(adapter, names)


def check_same_family(adapters: Sequence[Adapter]) -> None:
    """Raise :class:`IncompatibleAdaptersError` when the adapters belong to different model families, naming both."""
    families = {}
    for adapter in adapters:
        if (family := model_family(adapter)) is not None and family not in AMBIGUOUS_FAMILIES:
            families.setdefault(family, adapter.name)
    if len(families) > 1:
        named = ", ".join(f"{name!r} is {family}" for family, name in families.items())
        raise IncompatibleAdaptersError(
            f"the adapters belong to different model families ({named}); merge adapters of one family"
        )
