"""Subject + style fusion on a tiny diffusion pipeline: what each way of mixing keeps of each LoRA, and its cost.

Setting (offline, built here): the tiny SD-1.x-style pipeline of the tests (`adaptermerge.ui.diffusion`), random
weights. Two rank-4 LoRAs on the UNet's attention and transformer projections, trained here with the usual
noise-prediction loss on latents (8×8, 4 channels; the VAE is random, so everything is read in latent space):

- **subject**: a layout, a fixed spatial template (a bright diagonal bar on a dark ground, the same in every channel,
  zero mean per channel) plus noise;
- **style**: colour statistics, a fixed offset of the four channel means `(+1, -1, +1, -1) · 0.8` on random smooth
  layouts.

Generated latents (`--images` initial noises, DDIM `--steps`, no classifier-free guidance) are scored:

- subject fidelity: the correlation of the channel-averaged latent (its own mean removed) with the template;
- style fidelity: the channel-mean vector's projection on the style offset, as a fraction of the offset.

Both are given relative to the LoRA alone (1.0 = as much as the subject / style LoRA gives by itself, 0 = the base
model's). Modes: `linear` at several weights, `np_lora` at several `mu` (and its output-side and one-direction
variants), `k_lora` (`s*`, `s`), step schedules (subject early / style late), and diffusers' `set_adapters` with both
LoRAs loaded (the same sum as `linear` 1/1, run as two adapters). Time per image is the median of `--repeats` single
image calls at one torch thread, including the between-step rewrites of live modes (the denoiser hook). Writes an XY
grid (style weight × `mu`) of the latents' first three channels as RGB to `--grid`.

    python benchmarks/bench_fusion.py                       # ~2 min on 2 shared cores
    python benchmarks/bench_fusion.py --train-steps 600 --images 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptermerge import load_merged_adapters  # noqa: E402
from adaptermerge.integrations._live import host_live  # noqa: E402
from adaptermerge.ui.diffusion import tiny_sd_pipeline as tiny_sd_eps_pipeline  # noqa: E402
from adaptermerge.ui.fusion import compose_grid  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
STYLE_OFFSET = torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.8
SIZE = 16  # pixels; latents are SIZE / 2 wide
PROMPT = "the cat"


def tiny_sd_pipeline(seed: int = 0):
    """The tests' tiny SD pipeline, its scheduler predicting the clean sample (`x0`) rather than the noise: with
    random base weights a noise prediction makes DDIM sampling diverge (latent std ≈ 50), a sample prediction stays
    bounded."""
    from diffusers import DDIMScheduler

    pipe = tiny_sd_eps_pipeline(seed=seed)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def template(side: int) -> torch.Tensor:
    """The subject's layout: a diagonal bar, zero mean, unit standard deviation, `(side, side)`."""
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    bar = ((i - j).abs() <= side // 6).float()
    return (bar - bar.mean()) / bar.std()


def training_latents(kind: str, count: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """`count` target latents `(count, 4, side, side)` of the subject (layout) or the style (channel means)."""
    noise = torch.randn(count, 4, side, side, generator=generator)
    if kind == "subject":
        return template(side).expand(count, 4, side, side) + 0.3 * noise
    smooth = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1) * 1.5  # random layouts
    return smooth + STYLE_OFFSET[None, :, None, None]


def train_lora(pipe, kind: str, steps: int, folder: Path, *, seed: int) -> Path:
    """Train a rank-4 LoRA on `pipe`'s UNet (a copy) to produce `kind` latents; save it with diffusers; its file."""
    import copy

    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet).train()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
    side = SIZE // pipe.vae_scale_factor
    batch = 8
    for _ in range(steps):
        x0 = training_latents(kind, batch, side, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, hidden.expand(batch, -1, -1)).sample, x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layers = get_peft_model_state_dict(unet)
    type(pipe).save_lora_weights(str(folder / kind), unet_lora_layers=layers, safe_serialization=True)
    print(f"trained {kind}: final loss {loss.item():.3f}")
    return folder / kind


@torch.no_grad()
def latents(pipe, images: int, steps: int) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(images)]
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        num_images_per_prompt=images,
        generator=generators,
        output_type="latent",
    ).images


def fidelity(z: torch.Tensor) -> tuple[float, float]:
    """(subject, style) raw scores of latents `(n, 4, h, w)` (see the module docstring)."""
    spatial = z.mean(dim=1)
    spatial = spatial - spatial.mean(dim=(1, 2), keepdim=True)
    target = template(z.shape[-1])
    subject = (spatial * target).sum(dim=(1, 2)) / (spatial.flatten(1).norm(dim=1) * target.norm())
    style = z.mean(dim=(2, 3)) @ STYLE_OFFSET / STYLE_OFFSET.dot(STYLE_OFFSET)
    return float(subject.mean()), float(style.mean())


def modes(subject: Path, style: Path) -> dict[str, tuple[list, list, str, dict]]:
    """Mode name → (adapters, weights, method, params) for `load_merged_adapters`."""
    pair = [subject, style]
    table: dict[str, tuple[list, list, str, dict]] = {
        "subject alone": ([subject], [1.0], "linear", {}),
        "style alone": ([style], [1.0], "linear", {}),
    }
    for weights in ([1.0, 1.0], [0.7, 0.7], [1.0, 0.5], [0.5, 1.0]):
        table[f"linear {weights[0]:g}/{weights[1]:g}"] = (pair, weights, "linear", {})
    for mu in (0.5, 1.0):
        table[f"np_lora mu={mu:g}"] = (pair, [1.0, 1.0], "np_lora", {"mu": mu})
    table["np_lora mu=1 output side"] = (pair, [1.0, 1.0], "np_lora", {"mu": 1.0, "side": "output"})
    table["np_lora mu=1 1 direction"] = (pair, [1.0, 1.0], "np_lora", {"mu": 1.0, "directions": 1})
    for pattern in ("s*", "s"):
        table[f"k_lora {pattern}"] = (pair, [1.0, 1.0], "k_lora", {"pattern": pattern})
    table["schedule subj 0-0.6, style 0.3-1"] = (pair, [[[0.0, 1.0], [0.6, 0.0]], [[0.3, 1.0]]], "linear", {})
    table["schedule style from 0.5"] = (pair, [1.0, [[0.5, 1.0]]], "linear", {})
    table["schedule style from 0.9"] = (pair, [1.0, [[0.9, 1.0]]], "linear", {})
    return table


def latent_rgb(z: torch.Tensor) -> np.ndarray:
    """The first three channels of one latent `(4, h, w)` as an RGB uint8 image (values -1.5…1.5 mapped to 0…255)."""
    return ((z[:3].permute(1, 2, 0).clamp(-1.5, 1.5) + 1.5) / 3 * 255).round().byte().numpy()


def seconds_per_image(pipe, steps: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        latents(pipe, 1, steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=8, help="initial noises scored per mode")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--repeats", type=int, default=5, help="single-image calls timed per mode")
    parser.add_argument("--grid", type=Path, default=Path("fusion_xy_grid.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    started = time.perf_counter()
    subject, style = (
        train_lora(pipe, kind, args.train_steps, folder, seed=i) for i, kind in enumerate(("subject", "style"))
    )
    print(f"trained both LoRAs in {time.perf_counter() - started:.0f} s ({args.train_steps} steps each)")

    raw = {"base": fidelity(latents(pipe, args.images, args.steps))}
    timing = {"base": seconds_per_image(pipe, args.steps, args.repeats)}
    shares = {}  # k_lora: the fraction of (layer, step) pairs that use the subject
    for name, (adapters, weights, method, params) in modes(subject, style).items():
        load_merged_adapters(pipe, adapters, weights, method, **params)
        raw[name] = fidelity(latents(pipe, args.images, args.steps))
        if method == "k_lora":
            live_merge = host_live(pipe)["merged"]
            shared = [m for m, sources in live_merge.sources.items() if len(sources) == 2]
            chosen = [live_merge.weights_at(i / args.steps)(0, m) != 0 for i in range(args.steps) for m in shared]
            shares[name] = sum(chosen) / len(chosen)
        timing[name] = seconds_per_image(pipe, args.steps, args.repeats)

    host = tiny_sd_pipeline(seed=0)
    host.set_progress_bar_config(disable=True)
    host.load_lora_weights(str(subject), adapter_name="subject")
    host.load_lora_weights(str(style), adapter_name="style")
    host.set_adapters(["subject", "style"], [1.0, 1.0])
    raw["set_adapters 1/1 (diffusers)"] = fidelity(latents(host, args.images, args.steps))
    timing["set_adapters 1/1 (diffusers)"] = seconds_per_image(host, args.steps, args.repeats)

    (s0, c0), (s1, _), (_, c1) = raw["base"], raw["subject alone"], raw["style alone"]
    print(
        f"\n{args.images} images, {args.steps} DDIM steps, latents {SIZE // 2}×{SIZE // 2}; fidelity relative to "
        f"each LoRA alone (raw base / alone: subject {s0:.3f} / {s1:.3f}, style {c0:.3f} / {c1:.3f})"
    )
    print(f"{'mode':34s} {'subject':>8s} {'style':>8s} {'ms/image':>9s}")
    for name, (s, c) in raw.items():
        print(f"{name:34s} {(s - s0) / (s1 - s0):8.2f} {(c - c0) / (c1 - c0):8.2f} {1000 * timing[name]:9.1f}")

    for name, share in shares.items():
        print(f"{name}: the subject in {share:.0%} of layer-steps")

    cells = []
    for mu in (0.0, 0.5, 1.0):
        row = []
        for weight in (0.0, 0.5, 1.0):
            load_merged_adapters(pipe, [subject, style], [1.0, weight], "np_lora", mu=mu)
            row.append(latent_rgb(latents(pipe, 1, args.steps)[0]))
        cells.append(row)
    from PIL import Image

    grid = compose_grid(cells, [f"style {w:g}" for w in (0.0, 0.5, 1.0)], [f"mu {m:g}" for m in (0.0, 0.5, 1.0)])
    Image.fromarray(grid).save(args.grid)
    print(f"\nXY grid (np_lora, style weight × mu, latent channels 0-2 as RGB): {args.grid}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
