"""Train a LoRA with OSRM initialisation, so it merges with other tasks' LoRAs with less interference.

1. Collect the other tasks' layer-input statistics on the pre-trained model (forward hooks), save them.
2. Create the new task's peft LoRA and set `lora_A` orthogonal to those statistics (`lora_B = 0`).
3. Fine-tune as usual and save the adapter; merge it later with `adaptermerge merge ... --method linear`.

Offline by default on a tiny Llama-style model built from a config, with token sequences as the "tasks":

    python examples/train_osrm.py --output_dir /tmp/osrm-out

With a real model (needs the hub or a local path) and a text file of examples per task (one per line):

    python examples/train_osrm.py --base meta-llama/Llama-3.2-1B --other_tasks sst2.txt rte.txt \
        --task_file mrpc.txt --output_dir out
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from adaptermerge.training import OSRM


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def token_task(low: int, high: int, n: int = 32, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """Batches of random token sequences drawn from one vocabulary band: a stand-in for one task's text."""
    ids = torch.randint(low, high, (n, length), generator=torch.Generator().manual_seed(low))
    return [{"input_ids": ids[i : i + 8], "attention_mask": torch.ones_like(ids[i : i + 8])} for i in range(0, n, 8)]


def text_task(tokenizer, path: str, n: int) -> list[dict[str, torch.Tensor]]:
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()][:n]
    return [dict(tokenizer(lines[i : i + 8], return_tensors="pt", padding=True)) for i in range(0, len(lines), 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="Hub id or path of a causal LM; a tiny Llama from config when omitted.")
    parser.add_argument("--other_tasks", nargs="*", default=[], help="Text files of the other tasks (with --base).")
    parser.add_argument("--task_file", help="Text file of the new task's examples (with --base).")
    parser.add_argument("--statistic", choices=["mean", "covariance"], default="mean")
    parser.add_argument("--target_modules", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max_samples", type=int, default=100)
    parser.add_argument("--max_train_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=4e-4)
    parser.add_argument("--output_dir", default="osrm-out")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    start = time.perf_counter()
    if args.base:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.base)
        tokenizer = AutoTokenizer.from_pretrained(args.base)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        others = {Path(p).stem: text_task(tokenizer, p, args.max_samples) for p in args.other_tasks}
        new_task = text_task(tokenizer, args.task_file, args.max_samples)
    else:
        model = tiny_llama()
        others = {"band_a": token_task(10, 80), "band_b": token_task(80, 160)}
        new_task = token_task(160, 250)

    output = Path(args.output_dir)
    osrm = OSRM(args.statistic, target_modules=args.target_modules, max_samples=args.max_samples).fit(model, others)
    osrm.save(output / "osrm_statistics", overwrite=True)  # reusable by every later task

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.target_modules)
    model = get_peft_model(model, config)
    initialised = osrm.init_lora(model, task="new")
    print(f"OSRM ({args.statistic}) initialised lora_A of {len(initialised)} modules")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model.train()
    for step in range(args.max_train_steps):
        batch = new_task[step % len(new_task)]
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.max_train_steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    # How much the new adapter moves the other tasks' layer inputs, relative to its own task's (lower is better).
    first = initialised[0]
    layer = model.base_model.model.get_submodule(first)
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    for task, stats in osrm.statistics_.items():
        mean = stats[first].float() if args.statistic == "mean" else None
        if mean is not None:
            print(f"{first}: ‖ΔW h̄_{task}‖ = {(delta @ mean).norm():.2e}")
    model.save_pretrained(output / "adapter")
    print(f"saved {output / 'adapter'} and {output / 'osrm_statistics'} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
