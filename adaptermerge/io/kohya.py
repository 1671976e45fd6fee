"""kohya-ss / A1111 LoRA files: one `.safetensors`, keys `<lora_name>.lora_down.weight`, `.lora_up.weight`, `.alpha`.

`lora_name` is a prefix (`lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`, `lora_te3_`) plus the module's dotted
path with every `.` turned into `_`. `lora_down` is A `(r, in)` (conv: `(r, in, kh, kw)`), `lora_up` is B
`(out, r)` (conv: `(out, r, 1, 1)`), and ΔW = (alpha / r) · up @ down; a module without `.alpha` has alpha = r.

Since real module names contain `_` too (`to_q`, `transformer_blocks`), paths are rebuilt from a vocabulary of the
identifiers that diffusers and transformers models use, and LDM/SGM block names (SDXL's `input_blocks_4_1_…`)
are renumbered as diffusers renumbers them, so a kohya file and a diffusers file of one model name the same
modules (`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).

Written files use diffusers module names (as diffusers' `convert_state_dict_to_kohya` does; sd-scripts, A1111
and diffusers all read them), fold each module's scale into `lora_up`, and give every module the same `.alpha`
(the most common rank). A module of another rank r carries the factor r / alpha in `lora_up`: a shared alpha is
what diffusers' `load_lora_weights` reads correctly, since its per-module alpha patterns miss attention layers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import AdapterFormatError
from . import lycoris
from ._source import (
    PICKLE_SUFFIXES,
    DictSource,
    ModuleEntry,
    TensorSource,
    lazy_adapter,
    open_source,
    take_unused,
    unknown_keys_skipped,
)
from ._validate import alpha_tensor, factor_shapes
from ._write import atomic_path, provenance_metadata, save_tensors
from .diffusers import canonical_name, require_components, split_component

FORMAT = "kohya"
PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_transformer_": "transformer",  # OneTrainer's DiT files (Flux.1), diffusers module names
}
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_LYCORIS = ("lora_mid", "dora_scale", ".diff", "oft_")
_FUSED_QKV_BLOCKS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_joint_blocks_")
# Identifiers with underscores in diffusers UNets/transformers, transformers' CLIP/T5 and LDM/SGM UNets. Every
# other `_` of a kohya name is a `.`.
_WORDS = frozenset(
    {
        *("add_embedding", "add_k_proj", "add_q_proj", "add_v_proj", "caption_projection", "class_embedding"),
        *("context_embedder", "conv_in", "conv_norm_out", "conv_out", "conv_shortcut", "down_blocks"),
        *("emb_layers", "encoder_hid_proj", "ff_context", "final_layer_norm", "guidance_embedder", "in_layers"),
        *("input_blocks", "k_proj", "label_emb", "linear_1", "linear_2", "mid_block", "middle_block"),
        *("norm1_context", "norm_out", "out_layers", "out_proj", "output_blocks", "pos_embed", "position_embedding"),
        *("proj_in", "proj_mlp", "proj_out", "q_proj", "self_attn", "single_transformer_blocks", "skip_connection"),
        *("text_embedder", "text_model", "text_projection", "time_emb_proj", "time_embed", "time_embedding"),
        *("time_text_embed", "timestep_embedder", "to_add_out", "to_k", "to_out", "to_q", "to_v", "token_embedding"),
        *("transformer_blocks", "up_blocks", "v_proj", "wi_0", "wi_1", "x_embedder"),
        *("img_in", "img_mlp", "img_mod", "txt_in", "txt_mlp", "txt_mod"),  # Qwen-Image
    }
)
_LONGEST_WORD = max(word.count("_") + 1 for word in _WORDS)
_UNET_ROOTS = frozenset(
    {
        *("add_embedding", "class_embedding", "conv_in", "conv_norm_out", "conv_out", "down_blocks"),
        *("encoder_hid_proj", "input_blocks", "label_emb", "mid_block", "middle_block", "out", "output_blocks"),
        *("time_embed", "time_embedding", "up_blocks"),
    }
)
# LDM/SGM UNets of SD1/SD2/SDXL all have two resnets per down block (three per up block).
_LAYERS_PER_BLOCK = 2
_SGM_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj"}
_SGM_FIXED = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}


def detect(path: Path, keys: list[str]) -> bool:
    """A file whose keys all start with a kohya prefix and hold at least one `lora_down` (or LoHa/LoKr factor)."""
    if path.is_dir():
        return False
    markers = (".lora_down.", *lycoris.SUFFIXES)
    return (
        bool(keys) and all(k.startswith(tuple(PREFIXES)) for k in keys) and any(m in k for k in keys for m in markers)
    )


def _dotted(flat: str) -> str:
    """Rebuild a dotted path from its underscored form, keeping the known identifiers whole."""
    tokens = flat.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for size in range(min(_LONGEST_WORD, len(tokens) - i), 0, -1):
            word = "_".join(tokens[i : i + size])
            if size == 1 or word in _WORDS:
                parts.append(word)
                i += size
                break
    return ".".join(parts)


def _resnet(inner: str) -> str:
    for sgm, name in _SGM_RESNET.items():
        if inner == sgm or inner.startswith(sgm + "."):
            return name + inner[len(sgm) :]
    return inner.replace("skip_connection", "conv_shortcut")


def from_sgm(path: str) -> str:
    """A diffusers UNet path for an LDM/SGM one (`input_blocks.4.1.proj_in` → `down_blocks.1.attentions.0.proj_in`).

    Follows diffusers' `_maybe_map_sgm_blocks_to_diffusers` with two layers per block; other paths are returned
    unchanged.
    """
    for sgm, name in _SGM_FIXED.items():
        if path == sgm or path.startswith(sgm + "."):
            return name + path[len(sgm) :]
    match = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?\.(.+)", path)
    if match is None:
        return path
    kind, index, inner, rest = match[1], int(match[2]), match[3], match[4]
    if kind == "middle_block":
        if index > 2:
            return path
        tail = rest if inner is None else f"{inner}.{rest}"
        slot = ("resnets.0", "attentions.0", "resnets.1")[index]
        return f"mid_block.{slot}." + (tail if index == 1 else _resnet(tail))
    if inner is None:
        return path
    inner_index = int(inner)
    if kind == "input_blocks":
        block, layer = divmod(index - 1, _LAYERS_PER_BLOCK + 1)
        if rest == "op" or rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv" + rest[2:]
        slot = "resnets" if inner_index == 0 else "attentions"
        prefix = f"down_blocks.{block}"
    else:
        block, layer = divmod(index, _LAYERS_PER_BLOCK + 1)
        prefix = f"up_blocks.{block}"
        if inner_index == 2 or (inner_index == 1 and rest == "conv"):
            return f"{prefix}.upsamplers.0.{rest}"
        slot = "resnets" if inner_index == 0 else "attentions"
    return f"{prefix}.{slot}.{layer}.{_resnet(rest) if slot == 'resnets' else rest}"


def module_name(lora_name: str) -> str:
    """The adapter's module name for a kohya `lora_name` (`lora_te1_text_model_…` → `text_encoder.text_model.…`).

    Raises:
        AdapterFormatError: for unknown prefixes and kohya Flux/SD3 names (fused qkv, BFL/SAI block names).
    """
    prefix = next((p for p in PREFIXES if lora_name.startswith(p)), None)
    if prefix is None:
        raise AdapterFormatError(f"{lora_name!r} has none of the kohya prefixes {', '.join(PREFIXES)}")
    if lora_name.startswith(_FUSED_QKV_BLOCKS):
        raise AdapterFormatError(
            f"{lora_name!r} is a kohya Flux/SD3 module (BFL/SAI names, fused qkv); Flux.1 files are read by the "
            "kohya-flux layout (format='kohya-flux'), which takes files whose every key is a Flux.1 module"
        )
    path = _dotted(lora_name[len(prefix) :])
    component = PREFIXES[prefix]
    if component == "unet":
        path = from_sgm(path)
        if path.split(".")[0] not in _UNET_ROOTS:
            component = "transformer"
    return canonical_name(component, path)


def component_path(component: str, path: str, *, flat: bool) -> str:
    """The adapter's name of a module of `component` named by its path, dotted or kohya-flattened (`flat`)."""
    return canonical_name(component, _dotted(path) if flat else path)


def lora_name(name: str, *, two_text_encoders: bool = False) -> str:
    """The kohya `lora_name` of an adapter module name (`unet.down_blocks.0…` → `lora_unet_down_blocks_0…`)."""
    component, module = split_component(name)
    if component in ("unet", "transformer"):
        prefix = "lora_unet_"
    elif component == "text_encoder":
        prefix = "lora_te1_" if two_text_encoders else "lora_te_"
    else:
        prefix = f"lora_te{component.removeprefix('text_encoder_')}_"
    return prefix + module.replace(".", "_")


def parse(source: TensorSource) -> dict[str, ModuleEntry]:
    """Module name → entry for every module of a kohya state dict; refuses keys it cannot place."""
    keys = source.keys()
    unsupported = next((k for k in keys if any(marker in k for marker in _LYCORIS)), None)
    if unsupported is not None and unknown_keys_skipped():
        # A module with a key we cannot read (a Tucker core, a DoRA scale) is left out whole: its other factors
        # alone would be another update.
        skipped = {k.split(".")[0] for k in keys if any(marker in k for marker in _LYCORIS)}
        keys = [k for k in keys if k.split(".")[0] not in skipped]
        take_unused(source.keys(), set(keys), source, "kohya")
    elif unsupported is not None:
        raise AdapterFormatError(
            f"{source.name}: key {unsupported!r} belongs to a LyCORIS module (Tucker LoCon, DoRA, OFT or full diff); "
            "only LoRA/LoCon, LoHa and LoKr modules can be merged"
        )
    found: dict[str, dict[str, str]] = {}
    roles_by_suffix = {**_SUFFIXES, **{suffix: suffix[1:] for suffix in lycoris.SUFFIXES}}
    for key in keys:
        for suffix, role in roles_by_suffix.items():
            if key.endswith(suffix) and key.startswith(tuple(PREFIXES)):
                found.setdefault(key[: -len(suffix)], {})[role] = key
    entries: dict[str, ModuleEntry | lycoris.LycorisEntry] = {}
    for flat, roles in found.items():
        name = module_name(flat)
        factors = {role: key for role, key in roles.items() if role.startswith(("hada_", "lokr_"))}
        if factors:  # a LoHa or LoKr module, read as its exact low-rank form
            entries[name] = lycoris.LycorisEntry(factors, roles.get("alpha"))
            lycoris.warn_if_full_rank(source, name, entries[name])
            continue
        if "down" not in roles or "up" not in roles:
            raise AdapterFormatError(f"{source.name}: module {flat!r} has only one of lora_down/lora_up")
        if name in entries:
            raise AdapterFormatError(f"{source.name}: two kohya modules map to {name!r} (the second is {flat!r})")
        rank = factor_shapes(source, flat, roles["down"], roles["up"])[0][0]
        alpha = alpha_tensor(source, roles["alpha"], flat) if "alpha" in roles else 0.0
        # sd-scripts and A1111 treat a missing (or zero) alpha as alpha = rank.
        entries[name] = ModuleEntry(roles["down"], roles["up"], alpha / rank if alpha else 1.0)
    take_unused(keys, {k for roles in found.values() for k in roles.values()}, source, "kohya")
    return entries


def _adapter(source: TensorSource, name: str) -> Adapter:
    return lazy_adapter(source, parse(source), name, format=FORMAT)


def load(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a kohya/A1111 LoRA file lazily (`.safetensors`; `.pt`/`.ckpt` only with `allow_pickle`).

    Raises:
        AdapterFormatError: for folders, unknown keys, LyCORIS modules, or factors that do not pair up.
        UnsafeFormatError: for pickle checkpoints without `allow_pickle`.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if len(files) != 1:
            raise AdapterFormatError(f"{path}: a kohya LoRA is one file; found {len(files)} weights files here")
        path = files[0]
    return _adapter(open_source(path, allow_pickle=allow_pickle), path.stem)


def from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str = "adapter") -> Adapter:
    """An adapter from an in-memory kohya state dict."""
    return _adapter(DictSource(state_dict, name=name), name)


def to_state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The kohya state dict of an adapter: diffusers names, scale folded, one shared `.alpha`.

    Raises:
        AdapterFormatError: for module names without a pipeline component, DoRA modules, or an empty adapter.
    """
    require_components(adapter, FORMAT)
    if not len(adapter):
        raise AdapterFormatError(f"adapter {adapter.name!r} has no modules to write")
    dtype = dtype or adapter.metadata.dtype
    two_text_encoders = any(name.startswith("text_encoder_2.") for name in adapter)
    ranks = {name: lowrank.rank for name, lowrank in adapter.items()}
    alpha = Counter(ranks.values()).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    for name, lowrank in adapter.items():
        if lowrank.magnitude is not None:
            raise AdapterFormatError(
                f"adapter {adapter.name!r}, module {name!r} is a DoRA module; kohya files written here hold plain "
                "LoRA only, so write it with --format diffusers or --format peft"
            )
        key = lora_name(name, two_text_encoders=two_text_encoders)
        down, up = lowrank.scale(lowrank.rank / alpha).to(dtype).weights()
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return tensors


def save(adapter: Adapter, path: str | Path, *, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `adapter` as one kohya `.safetensors` file, atomically. Returns the file.

    Raises:
        AdapterFormatError: when `path` does not end in `.safetensors`, or as :func:`to_state_dict`.
        OutputExistsError: when `path` exists and `overwrite` is false.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFormatError(f"{path}: a kohya LoRA is one file; give an output path ending in .safetensors")
    tensors = to_state_dict(adapter, dtype)
    ranks = Counter(lr.rank for lr in adapter.values())
    header = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": str(ranks.most_common(1)[0][0]),
        **provenance_metadata(adapter.metadata.extra),
    }
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_tensors(tensors, tmp, header)
    return path
