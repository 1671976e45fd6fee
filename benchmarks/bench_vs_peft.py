"""adaptermerge's Core Space merges against peft's dense `svd`, `ties_svd` and `dare_ties_svd`, side by side.

The same random LoRAs (lora_B non-zero, as after training; lora_alpha = 2r so the scale matters) are merged by
peft's `LoraModel.add_weighted_adapter` on a model of plain `nn.Linear` layers (4096×4096 and 11008×4096, as in
Llama-2-7B's attention and MLP) and by `adaptermerge.merge_adapters` with the matching method, all truncated to rank
r as peft does. Every measurement runs in its own subprocess: wall time of the merge call alone, and the growth of
peak RSS (`ru_maxrss`) during it (the base weights are allocated untouched, so they cost no RSS). For `svd`, where
both compute the same thing (the best rank-r approximation of the weighted sum), the relative Frobenius error
between the two results is computed from their factors. TIES/DARE masks act in different bases (dense entries in
peft, Core Space cores here), so no error is shown for them.

    python benchmarks/bench_vs_peft.py            # --quick: T=4, r=16, one layer of each shape (~5 min on 2 CPUs)
    python benchmarks/bench_vs_peft.py --full     # T in {2,4,8} × r in {8,16,64} (peft takes hours on a CPU)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"q_proj": (4096, 4096), "up_proj": (11008, 4096)}  # name: (out, in)
PAIRS = [("svd", "svd"), ("ties_svd", "ties"), ("dare_ties_svd", "dare_ties")]  # (peft, ours)
DENSITY = 0.5
WEIGHTS_SEED = 1234


def _factors(T: int, rank: int, layers: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Module name → T (A, B) pairs, the same in every process."""
    modules = {}
    for layer in range(layers):
        for name, (out_features, in_features) in SHAPES.items():
            module = f"layers.{layer}.{name}"
            pairs = []
            for t in range(T):
                g = torch.Generator().manual_seed(1000 * layer + 100 * t + list(SHAPES).index(name))
                A = torch.randn(rank, in_features, generator=g) / in_features**0.5
                B = torch.randn(out_features, rank, generator=g) / rank**0.5 * 0.01
                pairs.append((A, B))
            modules[module] = pairs
    return modules


def _weights(T: int) -> list[float]:
    g = torch.Generator().manual_seed(WEIGHTS_SEED)
    return (0.3 + torch.rand(T, generator=g)).tolist()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_peft(method: str, T: int, rank: int, layers: int, out: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    class Blocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.ModuleDict(
                    {name: torch.nn.Linear(i, o, bias=False, device="meta") for name, (o, i) in SHAPES.items()}
                )
                for _ in range(layers)
            )

    model = Blocks().to_empty(device="cpu")  # untouched pages: the base weights cost no RSS
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(SHAPES), init_lora_weights=False)
    names = [f"a{t}" for t in range(T)]
    model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    factors = _factors(T, rank, layers)
    with torch.no_grad():
        for module_name, pairs in factors.items():
            module = model.base_model.model.get_submodule(module_name)
            for name, (A, B) in zip(names, pairs):
                module.lora_A[name].weight.copy_(A)
                module.lora_B[name].weight.copy_(B)
    del factors
    before = _peak_mb()
    start = time.perf_counter()
    model.add_weighted_adapter(names, _weights(T), "merged", combination_type=method, svd_rank=rank, density=DENSITY)
    seconds = time.perf_counter() - start
    peak = _peak_mb() - before
    result = {}
    for module_name in (f"layers.{layer}.{n}" for layer in range(layers) for n in SHAPES):
        module = model.base_model.model.get_submodule(module_name)
        result[f"{module_name}.A"] = module.lora_A["merged"].weight.detach().contiguous()
        result[f"{module_name}.B"] = (module.lora_B["merged"].weight * module.scaling["merged"]).detach().contiguous()
    save_file(result, out)
    return {"seconds": seconds, "peak_mb": peak}


def _run_ours(method: str, T: int, rank: int, layers: int, out: Path) -> dict:
    from safetensors.torch import save_file

    from adaptermerge import Adapter, LowRank, merge_adapters

    factors = _factors(T, rank, layers)
    adapters = [
        Adapter({m: LowRank(pairs[t][0], pairs[t][1] * 2.0) for m, pairs in factors.items()}, name=f"a{t}")
        for t in range(T)
    ]
    del factors
    params = {} if method == "svd" else {"density": DENSITY}
    before = _peak_mb()
    start = time.perf_counter()
    merged = merge_adapters(adapters, _weights(T), method, rank=rank, **params)
    seconds = time.perf_counter() - start
    peak = _peak_mb() - before
    result = {}
    for module_name, update in merged.items():
        result[f"{module_name}.A"] = update.A.contiguous()
        result[f"{module_name}.B"] = update.B.contiguous()
    save_file(result, out)
    return {"seconds": seconds, "peak_mb": peak}


def _measure(side: str, method: str, T: int, rank: int, layers: int, workdir: Path) -> dict:
    out = workdir / f"{side}_{method}_T{T}_r{rank}.safetensors"
    spec = json.dumps({"side": side, "method": method, "T": T, "rank": rank, "layers": layers, "out": str(out)})
    done = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{side} {method} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "out": out}


def _relative_error(ours: Path, theirs: Path) -> float:
    """‖ΔW_ours − ΔW_peft‖_F / ‖ΔW_peft‖_F over all modules, from the factors (QR-based, no dense matrix)."""
    from safetensors.torch import load_file

    from adaptermerge.lowrank import LowRank, concat, svd

    a, b = load_file(ours), load_file(theirs)
    modules = sorted({key.rsplit(".", 1)[0] for key in a})
    diff = ref = 0.0
    for m in modules:
        x, y = LowRank(a[f"{m}.A"], a[f"{m}.B"]), LowRank(b[f"{m}.A"], b[f"{m}.B"])
        diff += float((svd(concat([x.to(torch.float64), y.to(torch.float64)], [1.0, -1.0]))[1] ** 2).sum())
        ref += float((svd(y.to(torch.float64))[1] ** 2).sum())
    return (diff / ref) ** 0.5


def _truncation_errors(ours: Path, theirs: Path, T: int, rank: int, layers: int) -> tuple[float, float]:
    """‖ΔW − Σ w_t ΔW_t‖_F / ‖Σ w_t ΔW_t‖_F for our result and peft's: both should be the Eckart–Young optimum."""
    from safetensors.torch import load_file

    from adaptermerge.lowrank import LowRank, concat, svd

    exact = {
        m: concat([LowRank(A, B * 2.0).to(torch.float64) for A, B in pairs], _weights(T))
        for m, pairs in _factors(T, rank, layers).items()
    }
    reference = sum(float((svd(x)[1] ** 2).sum()) for x in exact.values())
    errors = []
    for path in (ours, theirs):
        tensors = load_file(path)
        residual = 0.0
        for m, x in exact.items():
            y = LowRank(tensors[f"{m}.A"], tensors[f"{m}.B"]).to(torch.float64)
            residual += float((svd(concat([y, x], [1.0, -1.0]))[1] ** 2).sum())
        errors.append((residual / reference) ** 0.5)
    return errors[0], errors[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="T=4, r=16 only (the default).")
    grid.add_argument("--full", action="store_true", help="T in {2,4,8} × r in {8,16,64}.")
    parser.add_argument("--layers", type=int, default=1, help="Layers, each one 4096×4096 and one 11008×4096 module.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        run = _run_peft if spec["side"] == "peft" else _run_ours
        print(json.dumps(run(spec["method"], spec["T"], spec["rank"], spec["layers"], Path(spec["out"]))))
        return
    configs = [(T, r) for T in (2, 4, 8) for r in (8, 16, 64)] if args.full else [(4, 16)]
    header = (
        f"{'T':>2} {'r':>3} {'peft method':<14} {'peft s':>8} {'ours s':>8} {'speed-up':>9} "
        f"{'peft MB':>8} {'ours MB':>8} {'mem ratio':>9} {'rel err':>9}"
    )
    print(f"layers: {args.layers} × (4096×4096 + 11008×4096), density {DENSITY}, {torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for T, rank in configs:
            for peft_method, our_method in PAIRS:
                theirs = _measure("peft", peft_method, T, rank, args.layers, workdir)
                ours = _measure("ours", our_method, T, rank, args.layers, workdir)
                error = f"{'—':>9}"
                if our_method == "svd":
                    error = f"{_relative_error(ours['out'], theirs['out']):9.1e}"
                    notes.append((T, rank, *_truncation_errors(ours["out"], theirs["out"], T, rank, args.layers)))
                speedup = theirs["seconds"] / ours["seconds"]
                memory = theirs["peak_mb"] / max(ours["peak_mb"], 1.0)
                print(
                    f"{T:>2} {rank:>3} {peft_method:<14} {theirs['seconds']:8.2f} {ours['seconds']:8.3f} "
                    f"{speedup:8.0f}× {theirs['peak_mb']:8.0f} {ours['peak_mb']:8.1f} {memory:8.0f}× {error}",
                    flush=True,
                )
    print("ours: adaptermerge.merge_adapters (Core Space); peft: add_weighted_adapter on the same LoRAs.")
    print("MB: growth of peak RSS during the merge call; mem ratio = peft / max(ours, 1 MB).")
    print("rel err: ‖ours − peft‖/‖peft‖ of the svd results. Distance of each to the exact weighted sum:")
    for T, rank, ours_error, peft_error in notes:
        print(f"  T={T} r={rank}: ours {ours_error:.6e}, peft {peft_error:.6e} (the optimum is the smaller)")


if __name__ == "__main__":
    main()
