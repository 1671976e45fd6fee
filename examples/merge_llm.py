"""Merge LoRA adapters into a causal LM with `model.load_merged_adapters`, then move a weight slider live.

Offline by default: builds a tiny Llama from a config and two random LoRAs for it (nothing is downloaded).
With hub ids (or local paths) it runs the same steps on real models:

    python examples/merge_llm.py
    python examples/merge_llm.py --model meta-llama/Llama-3.2-1B --adapters user/lora-a user/lora-b \
        --method ties --density 0.5 --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import adaptermerge


def tiny_model_and_adapters(folder: Path) -> tuple[torch.nn.Module, None, list[Path]]:
    """A tiny Llama built from a config and two random rank-4 PEFT LoRAs saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    model = LlamaForCausalLM(config).eval()
    adapters = []
    for seed, targets in enumerate([["q_proj", "v_proj", "o_proj"], ["q_proj", "up_proj", "down_proj"]]):
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # peft starts lora_B at zero; give the demo adapters a visible effect
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        peft_model.save_pretrained(str(folder / f"lora_{seed}"))
        model = peft_model.unload()
        adapters.append(folder / f"lora_{seed}")
    return model, None, adapters


def generate(model, tokenizer, prompt: str) -> str:
    if tokenizer is None:
        ids = torch.tensor([[1, 5, 9, 14]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        return " ".join(str(t) for t in out[0].tolist())
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or path of the base model (default: a tiny offline Llama)")
    parser.add_argument("--adapters", nargs="+", help="hub ids or paths of PEFT LoRAs for --model")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default 1.0 each)")
    parser.add_argument("--method", default="ties", help="merge method (see `adaptermerge methods`)")
    parser.add_argument("--density", type=float, default=0.5, help="density for ties/dare methods")
    parser.add_argument("--prompt", default="Once upon a time", help="prompt for generation (real models)")
    parser.add_argument("--output", type=Path, help="save the merged adapter here (PEFT folder)")
    args = parser.parse_args()
    adaptermerge.patch()  # adds load_merged_adapters / set_merge_weights to PreTrainedModel and PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            adapters = args.adapters or parser.error("--adapters is required with --model")
        else:
            model, tokenizer, adapters = tiny_model_and_adapters(Path(tmp))
        print("base:  ", generate(model, tokenizer, args.prompt))

        params = {"density": args.density} if args.method in ("ties", "dare_ties", "dare_linear") else {}
        merged = model.load_merged_adapters(adapters, args.weights, method=args.method, **params)
        print(f"{args.method}:", generate(model, tokenizer, args.prompt), f"({len(merged)} modules)")
        if args.output:
            print("saved", adaptermerge.save_adapter(merged, args.output, format="peft", overwrite=True))

        # A linear merge can be re-weighted in place, without reading the files again: a slider.
        model.load_merged_adapters(adapters, args.weights, method="linear", adapter_name="slider")
        for t in (0.0, 0.5, 1.0):
            model.set_merge_weights([1.0 - t, *[t] * (len(adapters) - 1)], adapter_name="slider")
            print(f"linear slider t={t}:", generate(model, tokenizer, args.prompt))
        model.disable_adapters()
        print("disabled:", generate(model, tokenizer, args.prompt))


if __name__ == "__main__":
    main()
