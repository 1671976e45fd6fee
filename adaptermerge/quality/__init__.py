"""Merge quality on real, offline data: task suites with one LoRA per task, and the benchmark that merges them.

`load_demo_suite()` returns the small digits suite (`bench quality`'s default and `adaptermerge ui --suite digits`;
trained once, then cached); its `evaluate(adapter)` gives per-task test accuracy in a few tens of milliseconds. The
demo and the UI's default use the text suite, :func:`adaptermerge.quality.wordnet.load_text_suite`.
"""

from __future__ import annotations

from pathlib import Path

from .suite import Suite, SuiteConfig, TaskData, cache_root

__all__ = ["Suite", "SuiteConfig", "TaskData", "cache_root", "load_demo_suite"]


def load_demo_suite(*, cache_dir: str | Path | None = None) -> Suite:
    """The digits suite (8 tasks on a pretrained MLP), built on first use and read from the cache after.

    Returns:
        `Suite`: `backbone`, `heads`, `data`, `adapter_paths` (PEFT folders), `descriptions`, and
        `evaluate(adapter, split="test") -> {task: accuracy}`.
    """
    from .digits import load_digits_suite

    return load_digits_suite(cache_dir=cache_dir)
