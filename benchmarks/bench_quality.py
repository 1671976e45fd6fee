"""Merge-quality benchmark on real offline data; same as `adaptermerge bench quality [--suite digits|text|all]`.

Usage: python benchmarks/bench_quality.py [--suite all] [--out bench-quality]
"""

from adaptermerge.cli._bench import quality

if __name__ == "__main__":
    quality()
