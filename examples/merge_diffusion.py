"""Merge LoRAs into a diffusion pipeline with `pipe.load_merged_adapters`, then move a weight slider live.

Offline by default: builds the tiny Stable-Diffusion-style pipeline of adaptermerge's UI from configs (UNet, VAE,
CLIP text encoder, a tokenizer over a small local vocabulary) and two random LoRAs for it. With hub ids (or local
paths) it runs the same steps on real models and saves the images:

    python examples/merge_diffusion.py
    python examples/merge_diffusion.py --model stabilityai/stable-diffusion-xl-base-1.0 \
        --adapters user/style-lora user/subject-lora.safetensors --method ties --density 0.5 --prompt "a cat"
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

import adaptermerge
from adaptermerge.ui.diffusion import tiny_sd_pipeline


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

            pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.float16)
            pipe.to("cuda" if torch.cuda.is_available() else "cpu")
            adapters = args.adapters or parser.error("--adapters is required with --model")
            steps, size = args.steps, None
        else:
            pipe = tiny_sd_pipeline()
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
