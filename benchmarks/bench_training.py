"""Do OSRM and orthogonal adaptation make LoRAs interfere less when summed? Measured on scikit-learn's digits.

Setup: the 8×8 digits are drawn on a 16×16 canvas. An MLP (256 → 64 → 64 → 10) is pre-trained on digits in the
top-left corner. Each task is the same ten-class problem in another input domain (digits in the top-right,
bottom-left, bottom-right corner or the centre; disjoint images per task), read by the pre-trained head.
One rank-4 LoRA per task is trained with peft on `fc1` and `fc2`, in three ways:

- plain: peft's default initialisation, `lora_A` and `lora_B` trained;
- OSRM (mean / covariance): `lora_A` initialised orthogonal to the other tasks' input statistics, both trained;
- orthogonal: `lora_A` frozen to a disjoint block of the shared random orthogonal basis, only `lora_B` trained.

The adapters are read through adaptermerge's PEFT reader and merged by a plain sum (`linear`, weight 1 each), as
both papers do. Reported per method, averaged over seeds: each adapter's accuracy on its own task, the merged
model's accuracy per task, and the cross-task output change `‖f_merged(X_j) − f_j(X_j)‖ / ‖f_j(X_j) − f_0(X_j)‖`
(how far the other tasks' adapters move task `j`'s logits, relative to how far its own adapter moved them).

Run: `python benchmarks/bench_training.py [--seeds 0 1 2] [--steps 300]`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adaptermerge import Adapter, AdapterMergeWarning, merge_adapters
from adaptermerge.io import peft as peft_io
from adaptermerge.training import OSRM, BasisAllocator, apply_orthogonal_basis

METHODS = ("plain", "osrm-mean", "osrm-covariance", "orthogonal")
RANK = 4
TARGETS = ["fc1", "fc2"]


SIDE = 16  # the digits are drawn on a 16×16 canvas; each task puts them somewhere else


def _placed(row: int, col: int):
    def place(x: torch.Tensor) -> torch.Tensor:
        canvas = torch.zeros(len(x), SIDE, SIDE)
        canvas[:, row : row + 8, col : col + 8] = x.reshape(-1, 8, 8)
        return canvas.reshape(len(x), SIDE * SIDE)

    return place


def _domains() -> dict[str, callable]:
    return {
        "top-right": _placed(0, 8),
        "bottom-left": _placed(8, 0),
        "bottom-right": _placed(8, 8),
        "centre": _placed(4, 4),
    }


@dataclass
class Split:
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def load_tasks(seed: int = 0) -> tuple[Split, dict[str, Split]]:
    """The plain digits (for pre-training) and one split per input domain, disjoint images for each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    domains = _domains()
    chunks = order.chunk(len(domains) + 1)

    def split(indices: torch.Tensor, transform=lambda x: x) -> Split:
        cut = len(indices) * 2 // 3
        train, test = indices[:cut], indices[cut:]
        return Split(transform(X[train]), y[train], transform(X[test]), y[test])

    return split(chunks[0], _placed(0, 0)), {
        name: split(idx, fn) for (name, fn), idx in zip(domains.items(), chunks[1:])
    }


class MLP(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(SIDE * SIDE, width), nn.Linear(width, width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _fit(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    model.eval()


def pretrain(base: Split, *, seed: int, steps: int = 300) -> MLP:
    torch.manual_seed(seed)
    model = MLP()
    _fit(model, base.X_train, base.y_train, steps=steps, lr=1e-2)
    return model


def train_adapter(
    backbone: MLP, task: str, split: Split, method: str, *, osrm: OSRM | None, allocator: BasisAllocator, steps: int
) -> Adapter:
    """One task's LoRA trained with `method`, returned as an adaptermerge Adapter (read from peft's state dict)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(backbone), config)
    if method.startswith("osrm"):
        osrm.init_lora(model, task=task)
    elif method == "orthogonal":
        apply_orthogonal_basis(model, allocator.allocate(task, RANK))
    _fit(model, split.X_train, split.y_train, steps=steps, lr=1e-2)
    state = get_peft_model_state_dict(model)
    return peft_io.from_state_dict(state, config.to_dict(), name=task).materialize()


def with_update(backbone: MLP, adapter: Adapter | None) -> MLP:
    """A copy of the backbone with the adapter's update added to its weights (the dense check, tiny layers)."""
    model = copy.deepcopy(backbone)
    if adapter is not None:
        with torch.no_grad():
            for name, lowrank in adapter.items():
                model.get_submodule(name).weight += lowrank.to_dense().float()
    return model.eval()


def _accuracy(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        return (model(split.X_test).argmax(1) == split.y_test).float().mean().item()


def evaluate(backbone: MLP, adapters: dict[str, Adapter], tasks: dict[str, Split]) -> dict[str, float]:
    """Own-task accuracy, merged accuracy and cross-task output change, averaged over tasks."""
    merged = with_update(backbone, merge_adapters(list(adapters.values()), method="linear"))
    base = with_update(backbone, None)
    own, joint, change = [], [], []
    with torch.no_grad():
        for task, split in tasks.items():
            alone = with_update(backbone, adapters[task])
            own.append(_accuracy(alone, split))
            joint.append(_accuracy(merged, split))
            f_j, f_0, f_m = alone(split.X_test), base(split.X_test), merged(split.X_test)
            change.append(((f_m - f_j).norm() / (f_j - f_0).norm()).item())
    return {
        "base": statistics.mean(_accuracy(base, s) for s in tasks.values()),
        "individual": statistics.mean(own),
        "merged": statistics.mean(joint),
        "interference": statistics.mean(change),
    }


def run(seeds: Sequence[int] = (0, 1, 2), *, steps: int = 300, methods: Sequence[str] = METHODS) -> dict:
    """Method → metric → list of values, one per seed."""
    results: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for seed in seeds:
        base, tasks = load_tasks(seed)
        backbone = pretrain(base, seed=seed)
        fitted = {}
        for statistic in ("mean", "covariance"):
            if f"osrm-{statistic}" in methods:
                batches = {task: [split.X_train] for task, split in tasks.items()}
                fitted[statistic] = OSRM(statistic, target_modules=TARGETS).fit(backbone, batches)
        for method in methods:
            torch.manual_seed(seed)
            allocator = BasisAllocator(seed=seed)
            osrm = fitted.get(method.removeprefix("osrm-"))
            adapters = {
                task: train_adapter(backbone, task, split, method, osrm=osrm, allocator=allocator, steps=steps)
                for task, split in tasks.items()
            }
            for metric, value in evaluate(backbone, adapters, tasks).items():
                results[method].setdefault(metric, []).append(value)
    return results


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per adapter (full batch).")
    args = parser.parse_args()
    start = time.perf_counter()
    with warnings.catch_warnings():  # OSRM warns that covariance statistics leave no direction free
        warnings.simplefilter("ignore", AdapterMergeWarning)
        results = run(args.seeds, steps=args.steps)
    print(f"digits on a 16×16 canvas, 4 placement tasks, rank-{RANK} LoRA on fc1/fc2, plain-sum merge; mean ± sd")
    print(f"{'method':<16} {'base acc':>10} {'individual':>14} {'merged':>14} {'interference':>14}")
    for method, metrics in results.items():
        cells = [
            f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")
            for v in (metrics["base"], metrics["individual"], metrics["merged"], metrics["interference"])
        ]
        print(f"{method:<16} {cells[0][:5]:>10} {cells[1]:>14} {cells[2]:>14} {cells[3]:>14}")
    print(f"({len(args.seeds)} seeds, {args.steps} steps, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
