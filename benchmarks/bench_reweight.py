"""Live re-weighting of a loaded `linear` merge vs loading it again.

Three ways to move a slider from one set of merge weights to another, timed (median of `--repeats`):

- `set_merge_weights`: rewrites the `lora_B` columns of the loaded merged adapter in place (no file, no new layers);
- `load_merged_adapters`: the full path again (read the adapter files, merge, hand the result to the host loader);
- host reload: the merged file loaded again by the host alone (diffusers `load_lora_weights` / transformers
  `load_adapter` of a saved PEFT folder), after deleting the previous adapter; the floor for any file-based path.

For the pipeline, diffusers' own `set_adapters` over the separately loaded adapters is shown too: it is as cheap to
change, but every adapter then runs at inference. Two hosts: the tiny SD pipeline of the tests (two LoRAs on UNet
attention and the text encoder) and a bigger synthetic Llama-style model built from a config (`--hidden`,
`--layers`; four rank-16 LoRAs on every linear layer of the blocks).

    python benchmarks/bench_reweight.py
    python benchmarks/bench_reweight.py --hidden 2048 --layers 16 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptermerge import load_merged_adapters, save_adapter, set_merge_weights  # noqa: E402
from tests.tiny_models import LLAMA_TARGETS, randomize_lora_B, save_random_pipeline_lora, tiny_sd_pipeline  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def size_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def report(host: str, rows: dict[str, float], adapter_mb: float, base_mb: float) -> None:
    print(f"\n{host}: merged adapter {adapter_mb:.2f} MB, base model {base_mb:.1f} MB")
    fastest = rows["set_merge_weights"]
    for name, seconds in rows.items():
        print(f"  {name:<34} {seconds * 1e3:10.2f} ms  {seconds / fastest:8.1f}x")


def bench_pipeline(folder: Path, repeats: int) -> None:
    pipe = tiny_sd_pipeline()
    loras = [save_random_pipeline_lora(pipe, folder / f"sd{i}", seed=i, rank=4) for i in range(2)]
    weights = [[0.1 * (i % 10), 1.0 - 0.1 * (i % 10)] for i in range(repeats)]
    merged = load_merged_adapters(pipe, loras, [1.0, 1.0])
    merged_file = save_adapter(merged, folder / "sd_merged", format="diffusers")

    def reload(i):
        pipe.delete_adapters("merged")
        pipe.load_lora_weights(str(merged_file), adapter_name="merged")

    rows = {"set_merge_weights": median_seconds(lambda i: set_merge_weights(pipe, weights[i]), repeats)}
    rows["load_merged_adapters"] = median_seconds(lambda i: load_merged_adapters(pipe, loras, weights[i]), repeats)
    rows["diffusers load_lora_weights (file)"] = median_seconds(reload, repeats)
    host = tiny_sd_pipeline()
    for i, path in enumerate(loras):
        host.load_lora_weights(str(path), adapter_name=f"a{i}")
    live = median_seconds(lambda i: host.set_adapters(["a0", "a1"], weights[i]), repeats)
    rows["diffusers set_adapters (2 live)"] = live
    base = [p for c in ("unet", "text_encoder", "vae") for p in getattr(pipe, c).parameters()]
    report("tiny SD pipeline", rows, size_mb(t for lr in merged.values() for t in (lr.A, lr.B)), size_mb(base))


def bench_llm(folder: Path, repeats: int, hidden: int, layers: int, n_adapters: int, rank: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    loras = []
    for i in range(n_adapters):
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=LLAMA_TARGETS))
        randomize_lora_B(peft_model, seed=i)
        peft_model.save_pretrained(str(folder / f"llm{i}"))
        model = peft_model.unload()
        loras.append(folder / f"llm{i}")
    weights = [[(i + t) % 3 / 2 for t in range(n_adapters)] for i in range(repeats)]
    merged = load_merged_adapters(model, loras)
    merged_folder = save_adapter(merged, folder / "llm_merged", format="peft")

    def reload(i):
        model.delete_adapter("merged")
        model.load_adapter(str(merged_folder), adapter_name="merged")

    rows = {"set_merge_weights": median_seconds(lambda i: set_merge_weights(model, weights[i]), repeats)}
    rows["load_merged_adapters"] = median_seconds(lambda i: load_merged_adapters(model, loras, weights[i]), repeats)
    rows["transformers load_adapter (folder)"] = median_seconds(reload, repeats)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    host = f"Llama-style hidden {hidden}, {layers} layers, {n_adapters} rank-{rank} LoRAs on 7 projections"
    report(host, rows, size_mb(t for lr in merged.values() for t in (lr.A, lr.B)), size_mb(base))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per row; the median is shown")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic Llama")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the synthetic Llama")
    parser.add_argument("--adapters", type=int, default=4, help="LoRAs merged on the synthetic Llama")
    parser.add_argument("--rank", type=int, default=16, help="rank of each synthetic LoRA")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="bench_reweight_") as tmp:
        bench_pipeline(Path(tmp), args.repeats)
        bench_llm(Path(tmp), args.repeats, args.hidden, args.layers, args.adapters, args.rank)


if __name__ == "__main__":
    main()
