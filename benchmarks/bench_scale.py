"""End-to-end merge of a whole Llama-2-7B adapter set, from files to a file, against the time to just read it.

Writes 4 rank-16 PEFT adapters over the full Llama-2-7B module set (32 layers; q, k, v, o 4096×4096; gate, up
11008×4096; down 4096×11008; 224 modules) once, then measures in one run:

- the time to read every tensor of the inputs with safetensors (the floor any tool pays), and a bare interpreter
  start with `import adaptermerge`;
- for each method, the wall time of `adaptermerge merge` as a subprocess (start, read, merge, write), its ratio
  to the read time and to the goal `3 × read + start` (at most 1 meets it), and its peak RSS (per process).

    python benchmarks/bench_scale.py [--methods linear,ties,tsv,svd] [--dtype float16] [--cold] [--workdir DIR]

By default the inputs are read from the page cache (warm, the best case for the read); `--cold` drops the cache
before the read and before each merge, so both read from disk as on a first run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

LLAMA_7B = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def write_adapters(workdir: Path, n_adapters: int, rank: int, layers: int, dtype: torch.dtype) -> list[Path]:
    """Random PEFT adapters (lora_B non-zero, as after training), written once and reused."""
    from adaptermerge import Adapter, AdapterMetadata, LowRank, save_adapter

    paths = []
    for t in range(n_adapters):
        path = workdir / f"lora_{t}"
        paths.append(path)
        if path.exists():
            continue
        g = torch.Generator().manual_seed(t)
        modules = {}
        for layer in range(layers):
            for name, (out_features, in_features) in LLAMA_7B.items():
                A = torch.randn(rank, in_features, generator=g) / in_features**0.5
                B = torch.randn(out_features, rank, generator=g) / rank**0.5 * 0.01
                modules[f"model.layers.{layer}.{name}"] = LowRank(A.to(dtype), B.to(dtype))
        metadata = AdapterMetadata(base_model="meta-llama/Llama-2-7b-hf", format="peft", dtype=dtype)
        save_adapter(Adapter(modules, metadata, f"lora_{t}"), path, format="peft")
    return paths


def read_all(paths: list[Path]) -> float:
    """Seconds to read every tensor of every input with safetensors."""
    start = time.perf_counter()
    for path in paths:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    return time.perf_counter() - start


# Runs `adaptermerge ARGS` and writes the process's own peak RSS (VmHWM) at exit. A child's ru_maxrss would also count
# the parent's pages that it shared between fork and exec, so it grows with whatever the parent holds.
_REPORT_PEAK = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as status:
        peak_kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["ADAPTERMERGE_PEAK_FILE"], "w") as out:
        out.write(peak_kb)
atexit.register(report)
sys.argv = ["adaptermerge", *sys.argv[1:]]
runpy.run_module("adaptermerge", run_name="__main__")
"""


def drop_page_cache() -> None:
    """Empty the kernel's page cache so the next read comes from disk (Linux, root only)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as err:
        raise SystemExit(f"--cold needs root on Linux to drop the page cache ({err}); run without --cold") from None


def timed_run(args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of `adaptermerge ARGS` (`[]` times the bare start)."""
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak_file:
        command = (
            [sys.executable, "-c", _REPORT_PEAK, *args] if args else [sys.executable, "-c", _REPORT_PEAK, "--help"]
        )
        start = time.perf_counter()
        process = subprocess.run(
            command, env={**os.environ, "ADAPTERMERGE_PEAK_FILE": peak_file.name}, capture_output=True, text=True
        )
        elapsed = time.perf_counter() - start
        if process.returncode:
            sys.stderr.write(process.stderr[-2000:])
        peak_kb = float(Path(peak_file.name).read_text() or 0)
    return elapsed, peak_kb / 1024, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="linear,ties,tsv,svd", help="comma-separated method names")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before the read and before each merge (root only)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "adaptermerge-bench-scale")
    args = parser.parse_args()

    from adaptermerge.methods import list_methods

    dtype = getattr(torch, args.dtype)
    workdir = args.workdir / f"{args.adapters}x_r{args.rank}_l{args.layers}_{args.dtype}"
    workdir.mkdir(parents=True, exist_ok=True)
    paths = write_adapters(workdir, args.adapters, args.rank, args.layers, dtype)
    size_mb = sum((p / "adapter_model.safetensors").stat().st_size for p in paths) / 2**20
    if args.cold:
        drop_page_cache()
        read_s = read_all(paths)
    else:
        read_all(paths)  # warm the page cache so every row below reads from memory alike
        read_s = min(read_all(paths) for _ in range(3))
    if args.cold:
        drop_page_cache()
    start_s, start_rss, _ = timed_run([])

    table = Table(title=f"{args.adapters} rank-{args.rank} adapters, {args.layers * 7} modules, {size_mb:.0f} MB")
    goal_s = 3 * read_s + start_s
    for column in ("what", "seconds", "× read", f"÷ goal {goal_s:.2f} s", "peak RSS (MB)", "output (MB)"):
        table.add_column(column, justify="right" if column != "what" else "left")
    table.add_row("read all inputs (safetensors)", f"{read_s:.2f}", "1.0", "", "", "")
    table.add_row("adaptermerge --help (interpreter start)", f"{start_s:.2f}", "", "", f"{start_rss:.0f}", "")
    known = {m.name for m in list_methods()}
    for method in args.methods.split(","):
        if method not in known:
            table.add_row(f"merge --method {method}", "not registered", "", "", "")
            continue
        out = workdir / f"merged_{method}"
        shutil.rmtree(out, ignore_errors=True)
        command = ["-q", "merge", *map(str, paths), "-m", method, "-o", str(out)]
        if method == "svd":
            command += ["--rank", str(args.rank)]
        if args.cold:
            drop_page_cache()
        seconds, rss, code = timed_run(command)
        out_mb = sum(f.stat().st_size for f in out.glob("*")) / 2**20 if code == 0 else 0
        status = f"{seconds:.2f}" if code == 0 else f"failed ({code})"
        table.add_row(
            f"merge --method {method}",
            status,
            f"{seconds / read_s:.1f}",
            f"{seconds / goal_s:.2f}",
            f"{rss:.0f}",
            f"{out_mb:.0f}",
        )
    Console(width=max(Console().width, 110)).print(table)


if __name__ == "__main__":
    main()
