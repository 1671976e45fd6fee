"""No `out × in` matrix on the merge path: every tensor any torch op creates during a merge is recorded.

A `TorchDispatchMode` sees the output of every aten operator (matmuls, SVDs, random draws, casts, concatenations)
run while it is active. Merging three rank-8 adapters of a 4096×4096 module must never create a tensor anywhere
near `4096 · 4096` entries: the largest allowed is a couple of `out × R` bases (R = 24 here), which also keeps the
memory a small multiple of the adapters' own size.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adaptermerge import Adapter, list_methods, merge_adapters
from tests.factories import make_adapter
from tests.test_methods_common import PAIRS_ONLY

OUT, IN, RANK, T = 4096, 4096, 8, 3
SLOW = {"lora_lego": "its k-means over 8192-wide units takes ~16 s at this width on 2 CPUs"}


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any operator while active, and the operator that produced it."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.op = tensor.numel(), str(func)
        return out


@pytest.fixture(scope="module")
def big_adapters():
    return [make_adapter({"layer.q_proj": (OUT, IN)}, RANK, seed=s, name=f"a{s}") for s in range(T)]


def test_the_detector_sees_a_dense_update():
    update = make_adapter({"m": (300, 200)}, RANK)["m"]
    with LargestTensor() as seen:
        update.to_dense()
    assert seen.numel == 300 * 200


@pytest.mark.parametrize(
    "method", [pytest.param(m.name, marks=pytest.mark.slow) if m.name in SLOW else m.name for m in list_methods()]
)
def test_merge_creates_no_out_by_in_tensor(method, big_adapters):
    inputs = big_adapters[:2] if method in PAIRS_ONLY else big_adapters
    with LargestTensor() as seen:
        result = merge_adapters(inputs, [0.5, 1.0, -0.7][: len(inputs)], method)
    if isinstance(result, Adapter):
        assert result["layer.q_proj"].shape == (OUT, IN)
    adapters_numel = T * RANK * (OUT + IN)
    assert seen.numel <= 2 * adapters_numel, f"{method}: {seen.op} made a tensor of {seen.numel} entries"
    assert seen.numel < OUT * IN // 50
