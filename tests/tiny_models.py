"""Tiny models built from config classes (no downloads), and random LoRA adapters for them.

- :func:`tiny_sd_pipeline`: the UI's tiny Stable-Diffusion-1.x-style `StableDiffusionPipeline`
  (:func:`adaptermerge.ui.diffusion.tiny_sd_pipeline`: UNet with attention in `down_blocks.0`/`up_blocks.1`, tiny
  VAE, tiny CLIP text encoder, a CLIP tokenizer from a local vocabulary).
- :func:`tiny_sdxl_pipeline`: the SDXL counterpart with two text encoders (`text_encoder_2` keeps `text_model.`),
  from the same VAE, text-encoder config and tokenizer builders.
- :func:`tiny_flux_pipeline`: a Flux-style DiT `FluxPipeline` (one double and one single transformer block) without
  text encoders: call it with `prompt_embeds` and `pooled_prompt_embeds` (:func:`flux_prompt_embeds`).
- :func:`tiny_llama`: a Llama-style causal LM.
- :func:`save_random_llama_lora`, :func:`save_random_pipeline_lora`: random LoRAs (random `lora_B`, so the update
  is not zero) written by peft's `save_pretrained` and diffusers' `save_lora_weights` themselves.

Builds are cached per session; every public builder returns a fresh deep copy, since loading a LoRA mutates it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from adaptermerge.ui import diffusion
from adaptermerge.ui.diffusion import tiny_clip_tokenizer

__all__ = [
    "LLAMA_TARGETS",
    "TEXT_ENCODER_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "UNET_CONV_TARGETS",
    "adapted_weight",
    "flux_prompt_embeds",
    "pipeline_module",
    "randomize_lora_B",
    "save_random_llama_lora",
    "save_random_pipeline_lora",
    "tiny_clip_tokenizer",
    "tiny_flux_pipeline",
    "tiny_llama",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
]

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNET_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "conv"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_TEXT_HIDDEN = 16  # the tiny CLIP text encoders' width (adaptermerge.ui.diffusion's)


@functools.cache
def _sd_pipeline():
    return diffusion.tiny_sd_pipeline(seed=0)


def tiny_sd_pipeline():
    """A fresh tiny SD-1.x-style `StableDiffusionPipeline` (same weights every call).

    The UNet mirrors SD 1.x's layout at toy size: attention in `down_blocks.0` and `up_blocks.1`, none in
    `down_blocks.1`/`up_blocks.0`, two resnets per down block, so LDM/SGM block names map as on the real model.
    """
    return copy.deepcopy(_sd_pipeline())


@functools.cache
def _sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=2 * _TEXT_HIDDEN + 6 * 4,
        cross_attention_dim=2 * _TEXT_HIDDEN,
        norm_num_groups=4,
    )
    return StableDiffusionXLPipeline(
        vae=diffusion.tiny_vae(),
        text_encoder=CLIPTextModel(diffusion.tiny_clip_text_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(diffusion.tiny_clip_text_config()).eval(),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(),
    )


def tiny_sdxl_pipeline():
    """A fresh tiny SDXL-style `StableDiffusionXLPipeline` (two CLIP text encoders, text-time conditioning)."""
    return copy.deepcopy(_sdxl_pipeline())


@functools.cache
def _flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline():
    """A fresh tiny Flux-style `FluxPipeline` (the diffusers test suite's sizes; same weights every call)."""
    return copy.deepcopy(_flux_pipeline())


def flux_prompt_embeds(seed: int = 0) -> dict[str, torch.Tensor]:
    """`prompt_embeds` (1, 8, 32) and `pooled_prompt_embeds` (1, 32) for :func:`tiny_flux_pipeline`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, 8, 32, generator=generator),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=generator),
    }


@functools.cache
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llama():
    """A fresh tiny `LlamaForCausalLM` (hidden 16, 2 layers, GQA with one KV head; same weights every call)."""
    return copy.deepcopy(_llama())


def randomize_lora_B(model: torch.nn.Module, *, seed: int = 0, std: float = 0.2) -> None:
    """Give every `lora_B` weight random values (peft initialises them to zero, which makes the update zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def randomize_dora_magnitudes(model: torch.nn.Module, *, seed: int = 0) -> None:
    """Move every DoRA magnitude off its initial row norm (peft initialises them so that the update starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=generator))


def save_random_llama_lora(path: str | Path, *, seed: int = 0, **lora_config) -> Path:
    """Write a random PEFT LoRA for :func:`tiny_llama` with `PeftModel.save_pretrained`; returns the folder.

    Args:
        lora_config: `LoraConfig` fields (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`,
            `use_dora`, `target_modules`, ...); by default rank 4, alpha 8, every linear layer of the blocks. A DoRA
            adapter also gets random magnitudes.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, **lora_config})
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), config)
    randomize_lora_B(model, seed=seed)
    if config.use_dora:
        randomize_dora_magnitudes(model, seed=seed)
    model.save_pretrained(str(path))
    return Path(path)


def peft_merged_weights(adapter_path: str | Path) -> dict[str, torch.Tensor]:
    """Every layer's weight (float64) of :func:`tiny_llama` after peft's own `merge_and_unload` of the adapter."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(adapter_path)).merge_and_unload()
    return {name: m.weight.detach().double() for name, m in model.named_modules() if hasattr(m, "weight")}


def save_random_pipeline_lora(
    pipe,
    path: str | Path,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float | None = None,
    unet_targets: list[str] | None = None,
    text_encoder: bool = True,
    rank_pattern: dict[str, int] | None = None,
    with_metadata: bool = True,
    use_dora: bool = False,
) -> Path:
    """Write a random LoRA for `pipe` (not modified) with the pipeline class's own `save_lora_weights`.

    Adapts the UNet (`unet_targets`, attention layers by default) and, when `text_encoder`, every text encoder's
    attention and MLP; `use_dora` makes it DoRA, with magnitudes moved off their initial row norms. Returns the
    folder holding `pytorch_lora_weights.safetensors`.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    layers, metadata = {}, {}
    encoders = [n for n in ("text_encoder", "text_encoder_2") if hasattr(pipe, n)] if text_encoder else []
    components = ["unet", *encoders]
    for offset, component in enumerate(components):
        model = copy.deepcopy(getattr(pipe, component))
        targets = (unet_targets or UNET_ATTENTION_TARGETS) if component == "unet" else TEXT_ENCODER_TARGETS
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, use_dora=use_dora)
        config.rank_pattern = rank_pattern or {}
        model.add_adapter(config)
        randomize_lora_B(model, seed=seed + offset)
        if use_dora:
            randomize_dora_magnitudes(model, seed=seed + offset)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        if with_metadata:
            metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(str(path), **layers, **metadata, safe_serialization=True)
    return Path(path)


def adapted_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight of a (possibly LoRA-wrapped, fused) layer, flattened to `(out, in * kh * kw)` in float64."""
    base = getattr(module, "base_layer", module)
    return base.weight.detach().to(torch.float64).reshape(base.weight.shape[0], -1)


def pipeline_module(pipe, name: str) -> torch.nn.Module:
    """The layer of `pipe` named by an adapter module name (`unet.down_blocks…`, `text_encoder.text_model…`)."""
    component, module = name.split(".", 1)
    model = getattr(pipe, component)
    if component.startswith("text_encoder") and not hasattr(model, "text_model"):
        module = module.removeprefix("text_model.")
    return model.get_submodule(module)
