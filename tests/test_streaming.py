"""Merges stream module by module: peak memory does not grow with the inputs' size, only with the output's."""

import torch

from adaptermerge import Adapter, AdapterMetadata, LowRank, save_adapter
from benchmarks.bench_scale import timed_run


def write_adapters(root, n_modules, n_adapters=4, width=512, rank=32):
    paths = []
    for t in range(n_adapters):
        g = torch.Generator().manual_seed(t)
        modules = {
            f"model.layers.{i}.proj": LowRank(
                torch.randn(rank, width, generator=g), torch.randn(width, rank, generator=g)
            )
            for i in range(n_modules)
        }
        paths.append(save_adapter(Adapter(modules, AdapterMetadata(format="peft")), root / f"n{n_modules}_{t}"))
    return paths


def peak_rss_mb(paths, out):
    """Peak resident memory of one `adaptermerge merge` process truncating to rank 4 (a small output)."""
    _, peak_mb, code = timed_run(["-q", "merge", *map(str, paths), "--rank", "4", "-o", str(out)])
    assert code == 0
    return peak_mb


def test_peak_memory_stays_flat_as_the_module_count_grows(tmp_path):
    sizes = {}
    for n_modules in (50, 200):
        paths = write_adapters(tmp_path, n_modules)
        inputs_mb = sum((p / "adapter_model.safetensors").stat().st_size for p in paths) / 2**20
        sizes[n_modules] = (inputs_mb, peak_rss_mb(paths, tmp_path / f"out{n_modules}"))
    input_growth = sizes[200][0] - sizes[50][0]
    peak_growth = sizes[200][1] - sizes[50][1]
    # Holding the inputs would add their full size (75 MB); streaming adds the larger output and allocator slack.
    assert peak_growth < 0.25 * input_growth, f"peak grew {peak_growth:.0f} MB for {input_growth:.0f} MB more input"
