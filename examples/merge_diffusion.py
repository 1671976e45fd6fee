"""Merge LoRAs into a diffusion pipeline with `pipe.load_merged_adapters`, then move a weight slider live.

Offline by default: builds a tiny Stable-Diffusion-style pipeline from configs (UNet, VAE, CLIP text encoder, a
tokenizer over a small local vocabulary) and two random LoRAs for it. With hub ids (or local paths) it runs the same
steps on real models and saves the images:

    python examples/merge_diffusion.py
    python examples/merge_diffusion.py --model stabilityai/stable-diffusion-xl-base-1.0 \
        --adapters user/style-lora user/subject-lora.safetensors --method ties --density 0.5 --prompt "a cat"
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import adaptermerge


def tiny_pipeline(folder: Path):
    """A Stable-Diffusion-1.x-style pipeline at toy size, built from configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=16,
            intermediate_size=24,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=64,
            max_position_embeddings=16,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def random_loras(pipe, folder: Path) -> list[Path]:
    """Two random LoRAs (UNet attention + text encoder), written by the pipeline's own `save_lora_weights`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    paths = []
    for seed in range(2):
        layers = {}
        for component, targets in [("unet", ["to_q", "to_k", "to_v", "to_out.0"]), ("text_encoder", ["q_proj"])]:
            model = copy.deepcopy(getattr(pipe, component))
            model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets), adapter_name="demo")
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():  # peft starts lora_B at zero; give the demo adapters a visible effect
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model, adapter_name="demo")
        type(pipe).save_lora_weights(str(folder / f"lora_{seed}"), **layers)
        paths.append(folder / f"lora_{seed}")
    return paths


def render(pipe, prompt: str, steps: int, size: int | None):
    generator = torch.Generator().manual_seed(0)
    kwargs = {"height": size, "width": size} if size else {}
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pil", **kwargs).images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or path of a diffusers pipeline (default: a tiny offline one)")
    parser.add_argument("--adapters", nargs="+", help="hub ids or paths of LoRAs (kohya, diffusers or PEFT files)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default 1.0 each)")
    parser.add_argument("--method", default="ties", help="merge method (see `adaptermerge methods`)")
    parser.add_argument("--density", type=float, default=0.5, help="density for ties/dare methods")
    parser.add_argument("--prompt", default="a photo of a cat", help="the prompt")
    parser.add_argument("--steps", type=int, default=25, help="inference steps (real models)")
    parser.add_argument("--output", type=Path, default=Path("merged_images"), help="folder for the images")
    args = parser.parse_args()
    adaptermerge.patch()  # adds load_merged_adapters / set_merge_weights to every LoRA-capable pipeline

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float16)
            pipe.to("cuda" if torch.cuda.is_available() else "cpu")
            adapters = args.adapters or parser.error("--adapters is required with --model")
            steps, size = args.steps, None
        else:
            pipe = tiny_pipeline(Path(tmp))
            adapters, steps, size = random_loras(pipe, Path(tmp)), 2, 16
        args.output.mkdir(parents=True, exist_ok=True)
        images = {"base": render(pipe, args.prompt, steps, size)}

        params = {"density": args.density} if args.method in ("ties", "dare_ties", "dare_linear") else {}
        merged = pipe.load_merged_adapters(adapters, args.weights, method=args.method, **params)
        print(f"{args.method}: merged {len(merged)} modules; active adapters {pipe.get_active_adapters()}")
        images[args.method] = render(pipe, args.prompt, steps, size)
        pipe.fuse_lora()  # the merged adapter is an ordinary diffusers LoRA: fuse, unfuse, delete all work
        images[f"{args.method}_fused"] = render(pipe, args.prompt, steps, size)
        pipe.unfuse_lora()

        # A linear merge can be re-weighted in place, without reading the files again: a slider.
        pipe.load_merged_adapters(adapters, args.weights, method="linear", adapter_name="slider")
        for t in (0.0, 0.5, 1.0):
            pipe.set_merge_weights([1.0 - t, *[t] * (len(adapters) - 1)], adapter_name="slider")
            images[f"linear_t{t}"] = render(pipe, args.prompt, steps, size)

        base = np.asarray(images["base"], dtype=np.float32)
        for name, image in images.items():
            image.save(args.output / f"{name}.png")
            diff = np.abs(np.asarray(image, dtype=np.float32) - base).mean()
            print(f"{name:<14} mean |pixel - base| = {diff:6.2f}  -> {args.output / f'{name}.png'}")


if __name__ == "__main__":
    main()
