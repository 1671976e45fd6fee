"""Start-up time of the `adaptermerge` command: `--help`, `methods`, an argument error and a small `merge`.

Each command runs in a fresh interpreter, `--repeat` times, for every checkout given (a folder holding the
`adaptermerge` package, put first on PYTHONPATH), so an old and a new checkout are measured side by side in one run.
Also reports `python -X importtime -c "import adaptermerge.cli"` (cumulative microseconds of the package import)
and whether torch was imported.

    python benchmarks/bench_cli_startup.py /path/to/old-checkout .
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "--help": ["--help"],
    "methods": ["methods"],
    "argument error": ["merge"],
    "merge (2 tiny LoRAs)": ["merge", "{a}", "{b}", "-o", "{out}", "--overwrite"],
}


def _tiny_adapters(folder: Path, checkout: Path) -> tuple[str, str]:
    """Two rank-4 PEFT adapters on two 64-wide modules, written by the checkout under test."""
    code = """
import sys, torch
from adaptermerge import Adapter, AdapterMetadata, LowRank, save_adapter
for i in (1, 2):
    g = torch.Generator().manual_seed(i)
    modules = {f"model.layers.{k}.q_proj": LowRank(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))
               for k in range(2)}
    save_adapter(Adapter(modules, AdapterMetadata(base_model="tiny")), f"{sys.argv[1]}/lora{i}", format="peft")
"""
    subprocess.run([sys.executable, "-c", code, str(folder)], env=_env(checkout), cwd=checkout, check=True)
    return str(folder / "lora1"), str(folder / "lora2")


def _env(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout.resolve())}


def _wall(argv: list[str], checkout: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "adaptermerge", *argv], env=_env(checkout), cwd=checkout, capture_output=True
    )
    return time.perf_counter() - start


def _import_profile(checkout: Path) -> tuple[float, bool]:
    code = "import sys, adaptermerge.cli; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=_env(checkout),
        cwd=checkout,
        capture_output=True,
        text=True,
    )
    line = next(line for line in result.stderr.splitlines() if line.endswith("| adaptermerge.cli"))
    return int(line.split("|")[1]) / 1e6, result.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _tiny_adapters(Path(tmp), args.checkouts[-1])
        for checkout in args.checkouts:
            seconds, torch_loaded = _import_profile(checkout)
            row = {"checkout": str(checkout), "import adaptermerge.cli": f"{seconds:.2f} s (torch: {torch_loaded})"}
            for label, argv in COMMANDS.items():
                argv = [part.format(a=a, b=b, out=Path(tmp) / "merged") for part in argv]
                times = [_wall(argv, checkout) for _ in range(args.repeat)]
                row[label] = f"{statistics.median(times):.2f} s"
            rows.append(row)
    for key in rows[0]:
        print(f"{key:<24}" + "".join(f"{row[key]:<28}" for row in rows))


if __name__ == "__main__":
    main()
