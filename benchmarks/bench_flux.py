"""A Flux.1-sized merge in kohya layout, from files to a file, against the time to just read the inputs.

Writes 4 rank-32 kohya Flux.1 LoRAs over the real Flux.1-dev module shapes once (19 double blocks: fused
`img_attn_qkv`/`txt_attn_qkv` 9216×3072, `*_attn_proj` 3072×3072, `*_mlp_0` 12288×3072, `*_mlp_2` 3072×12288,
`*_mod_lin` 18432×3072; 38 single blocks: fused `linear1` 21504×3072, `linear2` 3072×15360, `modulation_lin`
9216×3072; 304 kohya modules, 494 once the fused ones are split), then measures in one run:

- the time to read every tensor of the inputs with safetensors (the floor any tool pays);
- for each method, the wall time of `adaptermerge merge` as a subprocess (read, split the fused projections into
  parts sharing A, merge, join them back, write kohya Flux), its ratio to the read time, and its peak RSS.

    python benchmarks/bench_flux.py [--methods linear,ties,svd] [--rank 32] [--dtype bfloat16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_scale import timed_run
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file

HIDDEN = 3072
DOUBLE = {
    "attn_qkv": (3 * HIDDEN, HIDDEN),
    "attn_proj": (HIDDEN, HIDDEN),
    "mlp_0": (4 * HIDDEN, HIDDEN),
    "mlp_2": (HIDDEN, 4 * HIDDEN),
    "mod_lin": (6 * HIDDEN, HIDDEN),
}
SINGLE = {"linear1": (7 * HIDDEN, HIDDEN), "linear2": (HIDDEN, 5 * HIDDEN), "modulation_lin": (3 * HIDDEN, HIDDEN)}


def flux_modules() -> dict[str, tuple[int, int]]:
    """kohya `lora_name` → (out, in) of every Flux.1-dev transformer module sd-scripts trains."""
    modules = {}
    for block in range(19):
        for stream in ("img", "txt"):
            for name, shape in DOUBLE.items():
                modules[f"lora_unet_double_blocks_{block}_{stream}_{name}"] = shape
    for block in range(38):
        for name, shape in SINGLE.items():
            modules[f"lora_unet_single_blocks_{block}_{name}"] = shape
    return modules


def write_loras(workdir: Path, n_loras: int, rank: int, dtype: torch.dtype) -> list[Path]:
    """Random kohya Flux LoRAs (lora_up non-zero, as after training), written once and reused."""
    paths = []
    for t in range(n_loras):
        path = workdir / f"flux_lora_{t}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        g = torch.Generator().manual_seed(t)
        tensors = {}
        for name, (out_features, in_features) in flux_modules().items():
            tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_features, generator=g) / in_features**0.5).to(
                dtype
            )
            tensors[f"{name}.lora_up.weight"] = (torch.randn(out_features, rank, generator=g) * 0.01).to(dtype)
            tensors[f"{name}.alpha"] = torch.tensor(float(rank // 2), dtype=dtype)
        save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_flux"})
    return paths


def read_all(paths: list[Path]) -> float:
    """Seconds to read every tensor of every input with safetensors."""
    start = time.perf_counter()
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="linear,ties,svd", help="comma-separated method names")
    parser.add_argument("--loras", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "adaptermerge-bench-flux")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    workdir = args.workdir / f"{args.loras}x_r{args.rank}_{args.dtype}"
    workdir.mkdir(parents=True, exist_ok=True)
    paths = write_loras(workdir, args.loras, args.rank, dtype)
    size_mb = sum(p.stat().st_size for p in paths) / 2**20
    read_all(paths)  # warm the page cache so every row below reads from memory alike
    read_s = min(read_all(paths) for _ in range(3))

    table = Table(
        title=f"{args.loras} rank-{args.rank} kohya Flux.1-dev LoRAs, {len(flux_modules())} modules, {size_mb:.0f} MB"
    )
    for column in ("what", "seconds", "× read", "peak RSS (MB)", "output (MB)"):
        table.add_column(column, justify="right" if column != "what" else "left")
    table.add_row("read all inputs (safetensors)", f"{read_s:.2f}", "1.0", "", "")
    for method in args.methods.split(","):
        out = workdir / f"merged_{method}.safetensors"
        out.unlink(missing_ok=True)
        command = ["-q", "merge", *map(str, paths), "-m", method, "-o", str(out)]
        if method == "svd":
            command += ["--rank", str(args.rank)]
        seconds, rss, code = timed_run(command)
        out_mb = out.stat().st_size / 2**20 if code == 0 else 0
        status = f"{seconds:.2f}" if code == 0 else f"failed ({code})"
        table.add_row(f"merge --method {method}", status, f"{seconds / read_s:.1f}", f"{rss:.0f}", f"{out_mb:.0f}")
    Console(width=max(Console().width, 100)).print(table)


if __name__ == "__main__":
    main()
