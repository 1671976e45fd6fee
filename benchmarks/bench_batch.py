"""Throughput of batch merges and library similarity: local process pool vs a local Ray instance.

The library is 200 synthetic rank-16 float16 LoRAs on a 7B-like module set. A full Llama-7B set (32 layers × 7
modules = 224 modules) would be ~80 MB per adapter, 16 GB for 200, so this uses the real 7B shapes for the first
`--layers` decoder layers only (default 1: q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008; 2.5 MB per
adapter). Per-module cost is the same as in a full adapter, so throughput on full adapters is about these figures
divided by `32 / layers`.

Measured: merges per second (`--merges` jobs, each `linear` over `--per-merge` adapters truncated to rank 16,
written as PEFT folders) and similarity pairs per second (all n(n-1)/2 pairs over shared modules). Wall times
include starting the worker processes; Ray's own start (`ray.init`) is reported separately.

    python benchmarks/bench_batch.py                        # 200 adapters, 1 layer, 2 workers, local and ray
    python benchmarks/bench_batch.py --adapters 50 --backends local
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from adaptermerge import Adapter, AdapterMetadata, LowRank, save_adapter
from adaptermerge.batch import run_jobs
from adaptermerge.library import adapter_similarity
from adaptermerge.recipes import MergeJob

HIDDEN, INTERMEDIATE = 4096, 11008
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def make_library(folder: Path, *, adapters: int, layers: int, rank: int) -> list[Path]:
    """Write `adapters` random PEFT adapters with 7B shapes for `layers` layers, float16."""
    paths = []
    for k in range(adapters):
        g = torch.Generator().manual_seed(k)
        modules = {}
        for layer in range(layers):
            for name, (out_features, in_features) in PROJECTIONS.items():
                A = torch.randn(rank, in_features, generator=g) / in_features**0.5
                B = torch.randn(out_features, rank, generator=g) / rank
                modules[f"model.layers.{layer}.{name}"] = LowRank(A.half(), B.half())
        metadata = AdapterMetadata(base_model="synthetic/llama-7b-like", dtype=torch.float16)
        paths.append(save_adapter(Adapter(modules, metadata, f"lora_{k:03d}"), folder / f"lora_{k:03d}"))
    return paths


def bench(backend: str, paths: list[Path], out: Path, args: argparse.Namespace) -> None:
    jobs = [
        MergeJob(
            f"merge_{m:03d}",
            tuple(str(paths[(m * args.per_merge + t) % len(paths)]) for t in range(args.per_merge)),
            (1.0 / args.per_merge,) * args.per_merge,
            out / backend / f"merge_{m:03d}",
            rank=16,
        )
        for m in range(args.merges)
    ]
    if backend == "ray":
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        print(f"[ray] ray.init: {time.perf_counter() - start:.1f} s")
    try:
        start = time.perf_counter()
        results = run_jobs(jobs, backend=backend, workers=args.workers)
        seconds = time.perf_counter() - start
        failed = [r for r in results if r.status != "done"]
        assert not failed, failed[0].message
        rate = len(jobs) / seconds
        print(f"[{backend}] {len(jobs)} merges of {args.per_merge} adapters: {seconds:.1f} s, {rate:.2f} merges/s")
        start = time.perf_counter()
        result = adapter_similarity(paths[0].parent, backend=backend, workers=args.workers)
        seconds = time.perf_counter() - start
        pairs = len(paths) * (len(paths) - 1) // 2
        assert not result.unreadable and result.shared[0, 1] == 7 * args.layers
        print(f"[{backend}] similarity, {pairs} pairs: {seconds:.1f} s, {pairs / seconds:.0f} pairs/s")
    finally:
        if backend == "ray":
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--layers", type=int, default=1, help="7B decoder layers per adapter (7 modules each)")
    parser.add_argument("--merges", type=int, default=50)
    parser.add_argument("--per-merge", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", default="local,ray")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        start = time.perf_counter()
        paths = make_library(folder / "library", adapters=args.adapters, layers=args.layers, rank=16)
        size = sum(f.stat().st_size for f in (folder / "library").rglob("*") if f.is_file()) / 2**20
        print(
            f"library: {args.adapters} rank-16 fp16 adapters × {7 * args.layers} modules (7B shapes, "
            f"{args.layers} layer(s)), {size:.0f} MiB, written in {time.perf_counter() - start:.1f} s; "
            f"workers={args.workers}, torch threads={torch.get_num_threads()}"
        )
        for backend in args.backends.split(","):
            bench(backend, paths, folder / "out", args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
