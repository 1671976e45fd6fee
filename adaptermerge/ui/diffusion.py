"""The embedded default's diffusion part: a tiny Stable-Diffusion-1.x-style pipeline, seeded random LoRAs, a preview.

Everything is built in-process from config classes (no download, no file of the user's): a toy UNet with attention
in `down_blocks.0`/`up_blocks.1` (SD 1.x's layout at toy size), a tiny VAE, a tiny CLIP text encoder and a CLIP
tokenizer over a small vocabulary written to a temporary folder. The LoRAs are loaded once as one live `linear`
merge (:func:`adaptermerge.load_merged_adapters`); a slider move only rewrites the merged `lora_B` blocks in place
(:func:`adaptermerge.set_merge_weights`) and re-runs a few denoising steps at a tiny size with a fixed seed, so
equal weights always give the same image. diffusers and transformers are imported only when this is built.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter import Adapter, AdapterMetadata
from ..errors import InvalidParameterError
from ..lowrank import LowRank

__all__ = ["DIFFUSION_ADAPTERS", "DiffusionPreview", "random_pipeline_loras", "tiny_sd_pipeline"]

logger = logging.getLogger(__name__)
DIFFUSION_ADAPTERS = ("sparkle", "smudge", "stripes")
_TEXT_HIDDEN = 16
_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _tiny_tokenizer() -> Any:
    """A `CLIPTokenizer` over single letters (plus "the"), written to a temporary folder."""
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="adaptermerge-tokenizer-"))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters), "th", "the</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_sd_pipeline(*, seed: int = 0) -> Any:
    """A tiny `StableDiffusionPipeline` with random weights (the same for the same `seed`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=24,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=64,
        max_position_embeddings=16,
        projection_dim=_TEXT_HIDDEN,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=_tiny_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def random_pipeline_loras(pipe: Any, names: Sequence[str] = DIFFUSION_ADAPTERS, *, rank: int = 2) -> list[Adapter]:
    """One seeded random LoRA per name on the UNet's attention projections (the `i`-th seeded with `i`)."""
    layers = {
        f"unet.{name}": module.weight.shape
        for name, module in pipe.unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(_ATTENTION_TARGETS)
    }
    adapters = []
    for seed, name in enumerate(names):
        generator = torch.Generator().manual_seed(seed)
        modules = {
            module: LowRank(
                torch.randn(rank, shape[1], generator=generator) / shape[1] ** 0.5,
                torch.randn(shape[0], rank, generator=generator),
            )
            for module, shape in layers.items()
        }
        adapters.append(Adapter(modules, AdapterMetadata(format="diffusers"), name))
    return adapters


class DiffusionPreview:
    """A tiny pipeline with its LoRAs loaded once as a live linear merge; :meth:`render` re-weights and renders.

    Args:
        steps (`int`): denoising steps per image.
        size (`int`): image height and width in pixels (a multiple of 8).
        seed (`int`): the pipeline's weights and the initial noise.
        prompt (`str`): the prompt (the tokenizer knows lowercase letters only).
    """

    def __init__(self, *, steps: int = 3, size: int = 32, seed: int = 0, prompt: str = "the cat") -> None:
        import adaptermerge

        self.pipe = tiny_sd_pipeline(seed=seed)
        self.pipe.set_progress_bar_config(disable=True)
        self.adapters = random_pipeline_loras(self.pipe)
        self.steps, self.size, self.seed, self.prompt = steps, size, seed, prompt
        self._lock = threading.Lock()
        adaptermerge.load_merged_adapters(self.pipe, self.adapters, [0.0] * len(self.adapters), adapter_name="mix")

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @torch.no_grad()
    def render(self, weights: Sequence[float]) -> np.ndarray:
        """The image for `weights` (one per adapter) as `uint8` of shape `(size, size, 3)`.

        Raises:
            InvalidParameterError: for a weight list of the wrong length or a weight that is not finite.
        """
        import adaptermerge

        if len(weights) != len(self.adapters):
            raise InvalidParameterError(f"got {len(weights)} weights for {len(self.adapters)} diffusion adapters")
        with self._lock:
            adaptermerge.set_merge_weights(self.pipe, [float(w) for w in weights], adapter_name="mix")
            image = self.pipe(
                self.prompt,
                num_inference_steps=self.steps,
                height=self.size,
                width=self.size,
                generator=torch.Generator().manual_seed(self.seed),
                output_type="np",
            ).images[0]
        return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
