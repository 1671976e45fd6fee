"""Image previews for diffusion bases: a user's diffusers pipeline (`--base`) or the embedded tiny one.

:class:`PipelinePreview` loads the workbench's adapters into the pipeline once, as one live `linear` merge named
`mix` (:func:`adaptermerge.load_merged_adapters` with zero weights). A `linear` slider move then only rewrites the
merged `lora_B` blocks in place (:func:`adaptermerge.set_merge_weights`) and re-runs the pipeline with a fixed seed,
so equal weights always give the same image and nothing is re-read or rebuilt. Per-module ("advanced") weights are
folded into the adapters' factors by the workbench; the live merge is reloaded once when they (or the adapters)
change, not when a slider moves. Other methods are merged by the workbench and loaded as a second adapter,
`preview`, replaced at each move.

The embedded default (:class:`DiffusionPreview`) is a toy Stable-Diffusion-1.x-style pipeline built in-process from
config classes (no download): attention in `down_blocks.0`/`up_blocks.1` at toy size, a tiny VAE, a tiny CLIP text
encoder and a CLIP tokenizer over a small vocabulary, with three seeded random LoRAs. diffusers and transformers are
imported only when a pipeline is built.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter import Adapter, AdapterMetadata
from ..errors import AdapterMergeError
from ..lowrank import LowRank

__all__ = [
    "DIFFUSION_ADAPTERS",
    "DiffusionPreview",
    "PipelinePreview",
    "is_pipeline",
    "load_pipeline",
    "random_pipeline_loras",
    "tiny_clip_text_config",
    "tiny_clip_tokenizer",
    "tiny_sd_pipeline",
    "tiny_vae",
    "torch_threads",
]

logger = logging.getLogger(__name__)
DIFFUSION_ADAPTERS = ("sparkle", "smudge", "stripes")
PIPELINE_INDEX = "model_index.json"
_TEXT_HIDDEN = 16
_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def is_pipeline(base: str) -> bool:
    """Whether `base` is a diffusers pipeline: a local folder with `model_index.json`, or a hub repo holding one.

    A local path is decided on disk alone; a hub id by huggingface_hub's cache, then the hub (False when offline).
    """
    path = Path(base)
    if path.exists():
        return (path / PIPELINE_INDEX).is_file()
    from huggingface_hub import file_exists, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(base, PIPELINE_INDEX), str):
            return True
        return file_exists(base, PIPELINE_INDEX)
    except Exception as err:  # invalid ids, offline mode and network errors differ across huggingface_hub versions
        logger.debug("cannot tell whether %r is a diffusers pipeline: %s", base, err)
        return False


def load_pipeline(base: str) -> Any:
    """The diffusers pipeline at `base` (local folder or hub id), in float16 on CUDA when there is one, else float32.

    Raises:
        AdapterMergeError: when diffusers cannot load it, with its reason.
    """
    from diffusers import DiffusionPipeline

    cuda = torch.cuda.is_available()
    try:
        pipe = DiffusionPipeline.from_pretrained(base, dtype=torch.float16 if cuda else torch.float32)
    except (OSError, ValueError, TypeError) as err:
        raise AdapterMergeError(f"cannot load diffusers pipeline {base!r}: {err}") from None
    if not hasattr(pipe, "load_lora_weights"):
        raise AdapterMergeError(f"{type(pipe).__name__} ({base}) cannot load LoRAs; use a LoRA-capable pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda") if cuda else pipe


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block on `count` torch threads (unchanged when None), restoring the number after.

    Tiny models run several times faster on one thread than on threads that contend with other work.
    """
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class PipelinePreview:
    """Images from a diffusers pipeline with the workbench's merge loaded (see the module docstring).

    Args:
        pipe: a diffusers pipeline with LoRA support.
        steps (`int`): denoising steps per image.
        size (`int`, *optional*): image height and width in pixels (a multiple of 8); the pipeline's default if None.
        seed (`int`): the initial noise, the same for every image.
        prompt (`str`): the prompt; the page's prompt box changes it.
        threads (`int`, *optional*): torch threads while rendering (see :func:`torch_threads`).
    """

    def __init__(
        self,
        pipe: Any,
        *,
        steps: int = 20,
        size: int | None = None,
        seed: int = 0,
        prompt: str,
        threads: int | None = None,
    ) -> None:
        self.pipe = pipe
        self.steps, self.size, self.seed, self.prompt, self.threads = steps, size, seed, prompt, threads
        self._lock = threading.Lock()
        self._loaded: list[Adapter] = []  # the adapters of the live merge `mix`, in slider order
        self._active: str | None = None  # the adapter in use: `mix`, `preview`, `fusion`, or None for the base
        self._fusion: tuple | None = None  # (adapter ids, method) of a live `fusion`, re-weighted in place

    def check(self, adapter: Adapter) -> None:
        """Refuse an adapter the pipeline cannot hold, before it joins the workbench.

        Raises:
            IncompatibleAdaptersError: naming a module the pipeline does not have or has with another shape.
        """
        from ..integrations._live import check_host_modules
        from ..integrations.diffusers import find_pipeline_module

        check_host_modules(adapter, lambda module: find_pipeline_module(self.pipe, module), type(self.pipe).__name__)

    def base_weights(self, modules: Sequence[str]) -> Mapping[str, torch.Tensor]:
        """The pipeline's own base weights `W0` of `modules`: what a DoRA merge needs (no file is read)."""
        from ..integrations._live import HostWeights
        from ..integrations.diffusers import find_pipeline_module

        return HostWeights(functools.partial(find_pipeline_module, self.pipe), modules)

    def load(self, adapters: Sequence[Adapter]) -> None:
        """Load `adapters` as the live linear merge `mix`, all weights zero (replacing an earlier one).

        Raises:
            IncompatibleAdaptersError: naming a module the pipeline does not have or has with another shape.
        """
        import adaptermerge

        if self._active is None and self.pipe.get_list_adapters():
            self.pipe.enable_lora()  # LoRAs were off for a base-model image
        adaptermerge.load_merged_adapters(self.pipe, list(adapters), [0.0] * len(adapters), adapter_name="mix")
        self._loaded, self._active = list(adapters), "mix"

    def reweight(self, adapters: Sequence[Adapter], weights: Sequence[float]) -> np.ndarray:
        """The image of the linear merge `Σ w_t ΔW_t`, re-weighted in place (reloaded only for other `adapters`)."""
        import adaptermerge

        with self._lock:
            if len(adapters) != len(self._loaded) or any(a is not b for a, b in zip(adapters, self._loaded)):
                self.load(adapters)
            self._activate("mix")
            adaptermerge.set_merge_weights(self.pipe, [float(w) for w in weights], adapter_name="mix")
            return self._render()

    def __call__(self, merged: Adapter | None) -> np.ndarray:
        """The image with `merged` loaded as the adapter `preview` (the base model's when None)."""
        import adaptermerge

        with self._lock:
            if merged is None:
                self._activate(None)
            else:
                self._activate("preview")
                adaptermerge.load_merged_adapters(self.pipe, [merged], adapter_name="preview")
            return self._render()

    def fuse(self, adapters: Sequence[Adapter], weights: Sequence[Any], method: str, **params: Any) -> np.ndarray:
        """The image of `[subject, style]` fused by `method` (`linear` weights may be step schedules; `k_lora`
        switches layers between steps), loaded as the adapter `fusion`.

        A `linear` or `k_lora` fusion of the same pair is re-weighted in place; other methods (`np_lora`) are merged
        again for each image.
        """
        import adaptermerge

        with self._lock:
            self._activate("fusion")
            key = (tuple(id(a) for a in adapters), method)
            if method in ("linear", "k_lora") and self._fusion == key and not params:
                adaptermerge.set_merge_weights(self.pipe, list(weights), adapter_name="fusion")
            else:
                adaptermerge.load_merged_adapters(
                    self.pipe, list(adapters), list(weights), method, adapter_name="fusion", **params
                )
                self._fusion = key if method in ("linear", "k_lora") and not params else None
            return self._render()  # a schedule or k_lora applies itself through the denoiser hook

    def _activate(self, name: str | None) -> None:
        """Make `name` the pipeline's only active adapter (None: LoRAs off), calling diffusers only on a change."""
        if name == self._active:
            return
        if name is None:
            self.pipe.disable_lora()
        else:
            if self._active is None and self.pipe.get_list_adapters():
                self.pipe.enable_lora()
            if name in {n for names in self.pipe.get_list_adapters().values() for n in names}:
                self.pipe.set_adapters([name])
        self._active = name

    @torch.no_grad()
    def _render(self) -> np.ndarray:
        size = {"height": self.size, "width": self.size} if self.size else {}
        with torch_threads(self.threads):
            image = self.pipe(
                self.prompt,
                num_inference_steps=self.steps,
                generator=torch.Generator().manual_seed(self.seed),
                output_type="np",
                **size,
            ).images[0]
        return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


@functools.cache
def _tokenizer_dir() -> str:
    folder = Path(tempfile.mkdtemp(prefix="adaptermerge-tokenizer-"))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters), "th", "the</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return str(folder)


def tiny_clip_tokenizer() -> Any:
    """A `CLIPTokenizer` over single letters (plus "the"), 56 tokens, max length 16; written once per process."""
    from transformers import CLIPTokenizer

    folder = Path(_tokenizer_dir())
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_clip_text_config(**overrides: Any) -> Any:
    """A `CLIPTextConfig` of hidden size 16, 2 layers and 2 heads over a 64-token vocabulary (`overrides` win)."""
    from transformers import CLIPTextConfig

    config = dict(
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
    return CLIPTextConfig(**{**config, **overrides})


def tiny_vae() -> Any:
    """A two-block `AutoencoderKL` with 4 latent channels (random weights from torch's current seed)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def tiny_sd_pipeline(*, seed: int = 0) -> Any:
    """A tiny `StableDiffusionPipeline` with random weights (the same for the same `seed`).

    The UNet mirrors SD 1.x's layout at toy size: attention in `down_blocks.0` and `up_blocks.1`, none in
    `down_blocks.1`/`up_blocks.0`, two resnets per down block, so LDM/SGM block names map as on the real model.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

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
    vae = tiny_vae()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(tiny_clip_text_config()).eval(),
        tokenizer=tiny_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def random_pipeline_loras(pipe: Any, names: Sequence[str] = DIFFUSION_ADAPTERS, *, rank: int = 2) -> list[Adapter]:
    """One seeded random LoRA per name on the denoiser's attention projections (the `i`-th seeded with `i`): the
    UNet's, or a DiT pipeline's `transformer`."""
    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    layers = {
        f"{component}.{name}": module.weight.shape
        for name, module in getattr(pipe, component).named_modules()
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


class DiffusionPreview(PipelinePreview):
    """The embedded default: :func:`tiny_sd_pipeline` with :func:`random_pipeline_loras` loaded as a live merge.

    Args:
        steps (`int`): denoising steps per image.
        size (`int`): image height and width in pixels (a multiple of 8).
        seed (`int`): the pipeline's weights and the initial noise.
        prompt (`str`): the prompt (the tokenizer knows lowercase letters only).
    """

    def __init__(self, *, steps: int = 3, size: int = 32, seed: int = 0, prompt: str = "the cat") -> None:
        pipe = tiny_sd_pipeline(seed=seed)
        pipe.set_progress_bar_config(disable=True)
        super().__init__(pipe, steps=steps, size=size, seed=seed, prompt=prompt, threads=1)
        self.adapters = random_pipeline_loras(pipe)
        self.load(self.adapters)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def render(self, weights: Sequence[float]) -> np.ndarray:
        """The image for `weights` (one per adapter) as `uint8` of shape `(size, size, 3)`.

        Raises:
            InvalidParameterError: for a weight list of the wrong length or a weight that is not finite.
        """
        return self.reweight(self.adapters, weights)
