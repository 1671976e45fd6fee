"""No `out × in` matrix on the merge path: every tensor any torch op creates during a merge is recorded.

A `TorchDispatchMode` sees the output of every aten operator (matmuls, SVDs, random draws, casts, concatenations)
run while it is active. Modes are thread-local and `merge_adapters` merges modules in a thread pool, so the
recorder also runs every task submitted to a `ThreadPoolExecutor` under a mode of its own and keeps the largest
tensor of all threads; `test_a_planted_dense_product_is_caught` shows that a dense product hidden in a method is
seen through `merge_adapters`, the CLI and `load_merged_adapters`. Merging three rank-8 adapters of a 4096×4096
module must never create a tensor anywhere near `4096 · 4096` entries: the largest allowed is a couple of
`out × R` bases (R = 24 here), which also keeps the memory a small multiple of the adapters' own size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adaptermerge import Adapter, get_method, list_methods, load_merged_adapters, merge_adapters
from adaptermerge.cli import main
from adaptermerge.methods import _registry
from tests.factories import make_adapter
from tests.test_methods_common import PAIRS_ONLY
from tests.tiny_models import save_random_llama_lora, tiny_llama

OUT, IN, RANK, T = 4096, 4096, 8, 3
SLOW = {"lora_lego": "its k-means over 8192-wide units takes ~16 s at this width on 2 CPUs"}


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator allocates while active, and the operator; views of inputs are skipped
    (a host model's `W0.detach()` allocates nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and _storage(tensor) not in inputs:
                self.see(tensor.numel(), str(func))
        return out

    def see(self, numel: int, op: str | None) -> None:
        with self._lock:
            if numel > self.numel:
                self.numel, self.op = numel, op


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@contextlib.contextmanager
def largest_tensor():
    """A `LargestTensor` active in this thread and in every task submitted to a thread pool meanwhile."""
    seen = LargestTensor()
    submit = ThreadPoolExecutor.submit

    def recorded(fn, /, *args, **kwargs):
        with LargestTensor() as worker:
            try:
                return fn(*args, **kwargs)
            finally:
                seen.see(worker.numel, worker.op)

    def submit_recorded(pool, fn, /, *args, **kwargs):
        return submit(pool, functools.partial(recorded, fn), *args, **kwargs)

    ThreadPoolExecutor.submit = submit_recorded
    try:
        with seen:
            yield seen
    finally:
        ThreadPoolExecutor.submit = submit


@pytest.fixture(scope="module")
def big_adapters():
    return [make_adapter({"layer.q_proj": (OUT, IN)}, RANK, seed=s, name=f"a{s}") for s in range(T)]


def test_the_detector_sees_a_dense_update():
    update = make_adapter({"m": (300, 200)}, RANK)["m"]
    with largest_tensor() as seen:
        update.to_dense()
    assert seen.numel == 300 * 200


def test_the_detector_sees_pool_workers():
    update = make_adapter({"m": (300, 200)}, RANK)["m"]
    with largest_tensor() as seen, ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda lr: lr.to_dense(), [update, update]))
    assert seen.numel == 300 * 200


@pytest.mark.parametrize(
    "method", [pytest.param(m.name, marks=pytest.mark.slow) if m.name in SLOW else m.name for m in list_methods()]
)
def test_merge_creates_no_out_by_in_tensor(method, big_adapters):
    inputs = big_adapters[:2] if method in PAIRS_ONLY else big_adapters
    with largest_tensor() as seen:
        result = merge_adapters(inputs, [0.5, 1.0, -0.7][: len(inputs)], method)
    if isinstance(result, Adapter):
        assert result["layer.q_proj"].shape == (OUT, IN)
    adapters_numel = T * RANK * (OUT + IN)
    assert seen.numel <= 2 * adapters_numel, f"{method}: {seen.op} made a tensor of {seen.numel} entries"
    assert seen.numel < OUT * IN // 50


@pytest.fixture
def llama_loras(tmp_path):
    return [save_random_llama_lora(tmp_path / f"lora{seed}", seed=seed) for seed in (1, 2)]


def largest_through(path: str, paths, tmp_path) -> LargestTensor:
    """The largest tensor made while `paths` merge with `ties` through one user-facing path (the host model is built
    before recording starts)."""
    host = tiny_llama()
    with largest_tensor() as seen:
        if path == "merge_adapters":
            merge_adapters(paths, method="ties")
        elif path == "cli":
            args = ["-q", "merge", *map(str, paths), "-m", "ties", "-o", str(tmp_path / "out")]
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
        else:
            load_merged_adapters(host, paths, method="ties")
    return seen


@pytest.mark.parametrize("path", ["merge_adapters", "cli", "load_merged_adapters"])
def test_a_planted_dense_product_is_caught(path, llama_loras, tmp_path, monkeypatch):
    """A `ties` that also builds one dense `ΔW` is seen on every user-facing path; the real `ties` is not."""
    largest = 32 * 16  # the MLP projections of the tiny Llama
    seen = largest_through(path, llama_loras, tmp_path)
    assert seen.numel < largest, f"{seen.op} made a tensor of {seen.numel} entries"

    ties = get_method("ties")

    def planted(updates, weights, params):
        updates[0].to_dense()
        return ties.fn(updates, weights, params)

    monkeypatch.setitem(_registry._REGISTRY, "ties", dataclasses.replace(ties, fn=planted))
    assert largest_through(path, llama_loras, tmp_path / "planted").numel >= largest
