"""DreamBooth-LoRA with orthogonal adaptation: each concept trains `lora_B` on a frozen, disjoint `lora_A` block.

Concepts trained this way by different people, from one `--allocation_file` (or distinct `--concept` blocks of one
`--basis_seed`), merge by a plain sum: `adaptermerge merge a b --method linear`. The block is written into the
saved LoRA's safetensors header, and `adaptermerge.training.check_disjoint` warns when two blocks overlap.

Offline by default on a tiny pipeline built from configs and random images (a smoke run, < 1 min on a CPU):

    python examples/train_orthogonal_diffusion.py --concept dog --output_dir /tmp/orth-dog

A real run, as diffusers' train_dreambooth_lora.py:

    python examples/train_orthogonal_diffusion.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --concept dog --rank 4 \
        --allocation_file allocations.json --resolution 512 --max_train_steps 800 --output_dir lora-dog
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptermerge.training import BasisAllocator, apply_orthogonal_basis, check_disjoint, write_allocation


def tiny_pipeline(folder: Path) -> dict:
    """A tiny UNet / VAE / CLIP text encoder / tokenizer from configs (random weights), for offline smoke runs."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    words = ["a", "photo", "of", "sks", "dog", "cat", "<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz")) + [w + "</w>" for w in words])}
    vocab.update({w: len(vocab) + i for i, w in enumerate(words[-2:])})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16)
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=16,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )  # fmt: skip
    scheduler = DDPMScheduler()
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def load_pipeline(name: str) -> dict:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(name)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "vae": pipe.vae, "unet": pipe.unet,
            "scheduler": scheduler}  # fmt: skip


def instance_images(folder: str | None, resolution: int) -> torch.Tensor:
    """The instance images in [-1, 1], `(n, 3, resolution, resolution)`; random images when no folder is given."""
    if folder is None:
        return torch.rand(4, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    from PIL import Image
    from torchvision import transforms

    to_tensor = transforms.Compose(
        [transforms.Resize(resolution), transforms.CenterCrop(resolution), transforms.ToTensor(),
         transforms.Normalize([0.5], [0.5])]
    )  # fmt: skip
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    return torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_model_name_or_path", help="Hub id or path; a tiny pipeline when omitted.")
    parser.add_argument("--instance_data_dir", help="Folder of the concept's images; random images when omitted.")
    parser.add_argument("--instance_prompt", default="a photo of sks dog")
    parser.add_argument("--concept", default="sks", help="The concept's name in the allocation.")
    parser.add_argument("--allocation_file", help="BasisAllocator JSON shared by all concepts (created if missing).")
    parser.add_argument("--basis_seed", type=int, default=0, help="Public seed of the shared orthogonal bases.")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=10)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="orthogonal-lora")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    output = Path(args.output_dir)
    parts = (
        load_pipeline(args.pretrained_model_name_or_path)
        if args.pretrained_model_name_or_path
        else tiny_pipeline(output / "tiny_tokenizer")
    )
    unet, vae, text_encoder, tokenizer, scheduler = (parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer",
                                                                        "scheduler"))  # fmt: skip
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)

    allocation_file = Path(args.allocation_file) if args.allocation_file else None
    if allocation_file is not None and allocation_file.exists():
        allocator = BasisAllocator.load(allocation_file)
    else:
        allocator = BasisAllocator(seed=args.basis_seed)
    allocation = allocator.allocate(args.concept, args.rank)
    if allocation_file is not None:
        allocator.save(allocation_file, overwrite=True)

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(config)
    modules = apply_orthogonal_basis(unet, allocation)  # lora_A frozen to the concept's rows, lora_B = 0
    print(f"concept {args.concept!r}: rows {allocation.start}:{allocation.stop} of the shared bases in {len(modules)} "
          "modules; lora_A frozen")  # fmt: skip

    images = instance_images(args.instance_data_dir, args.resolution)
    ids = tokenizer(args.instance_prompt, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        prompt_embeds = text_encoder(ids)[0]
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    unet.train()
    for step in range(args.max_train_steps):
        batch = images[torch.randint(len(images), (args.train_batch_size,))]
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, prompt_embeds.expand(len(latents), -1, -1)).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.max_train_steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(output, unet_lora_layers=lora_layers)
    weights = write_allocation(output / "pytorch_lora_weights.safetensors", allocation)
    print(f"saved {weights} with its block in the header; check_disjoint -> {check_disjoint([weights])}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
