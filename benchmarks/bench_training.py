"""Do OSRM and orthogonal adaptation make LoRAs interfere less when summed? Measured on scikit-learn's digits.

Setup: the 8×8 digits are drawn on a 16×16 canvas. An MLP (256 → 64 → 64 → 10) is pre-trained on digits in the
top-left corner. Each task is the same ten-class problem in another corner (top-right, bottom-left, bottom-right;
disjoint images per task), read by the pre-trained head, so the tasks' inputs live on disjoint pixels: the case
OSRM's mechanism is made for (tasks whose layer inputs have different statistics). One LoRA per task is trained
with peft, full-batch Adam, the same steps and learning rate for every method, in four ways:

- plain: rank 4, peft's default initialisation, `lora_A` and `lora_B` trained;
- OSRM (mean / covariance): rank 4, `lora_A` initialised orthogonal to the other tasks' input statistics (taken on
  the pre-trained model), both factors trained afterwards, as in the official code;
- orthogonal: `lora_A` frozen to a disjoint block of the shared random orthogonal basis, only `lora_B` trained. Its
  rank is 16, so it trains about as many parameters as the rank-4 plain LoRA (`out × 16` against
  `4 × (in + out)`) and reaches about the same accuracy alone; at rank 4 it is much weaker alone.

The adapters are read through adaptermerge's PEFT reader and merged by a plain sum (`linear`, weight 1 each), as
both papers do. Reported per method, averaged over seeds: each adapter's accuracy on its own task, the merged
model's accuracy per task, and the cross-task output change `‖f_merged(X_j) − f_j(X_j)‖ / ‖f_j(X_j) − f_0(X_j)‖`
(how far the other tasks' adapters move task `j`'s logits, relative to how far its own adapter moved them).

Four settings (`--setting`, all by default):

- `disjoint`: the three corner tasks, LoRA on `fc1` (whose inputs are the pixels);
- `disjoint+fc2`: the same tasks with LoRA on `fc1` and `fc2`; `fc2` reads the shared hidden features, which every
  task uses, so no input subspace is free of the other tasks there;
- `overlap`: the three corners plus a fourth task in the centre of the canvas, whose pixels overlap every corner
  (LoRA on `fc1`);
- `concept-tokens`: the regime orthogonal adaptation was designed for (Mix-of-Show's ED-LoRA): four new concept
  tokens, each with its embedding trained together with a LoRA on the `to_k`/`to_v` of a tiny cross-attention digit
  detector with CLIP's text width 768 (`benchmarks/_concept_tokens.py`); all methods at rank 4, lr 1e-3 by default.

Measured (3 seeds, defaults): OSRM with the covariance statistic leaves `disjoint` merges exactly as good as the
adapters alone (cross-task change 0, merged 0.880 against plain 0.843); the mean statistic helps little; nothing
helps in `disjoint+fc2` or `overlap`; orthogonal adaptation's sum changes each task's logits about `sqrt(T - 1)`
times as much as its own adapter (1.50 for three tasks), far more than plain training. The `disjoint` figures hold at
`--lr 1e-3 --steps 1000`. In `concept-tokens` (4 seeds) orthogonal adaptation is the best: summed, its adapters
keep 0.94 of their 0.96 accuracy alone (cross-task change 0.14), against 0.85 (0.38) for plain training and 0.72-0.78
for OSRM, whose statistics are taken before the concept tokens are trained.

Run: `python benchmarks/bench_training.py [--setting disjoint] [--seeds 0 1 2] [--steps 300] [--lr 1e-2]` (`--lr`
defaults to 1e-2 for the pixel settings and 1e-3 for `concept-tokens`).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adaptermerge import Adapter, AdapterMergeWarning, merge_adapters
from adaptermerge.training import OSRM, BasisAllocator

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_training
    from benchmarks import _concept_tokens as concept_tokens
    from benchmarks._lora import as_adapter, lora_model, with_update
except ImportError:
    import _concept_tokens as concept_tokens
    from _lora import as_adapter, lora_model, with_update

METHODS = ("plain", "osrm-mean", "osrm-covariance", "orthogonal")
RANK = 4
ORTHOGONAL_RANK = 16  # B-only training: out × 16 parameters, about the 4 × (in + out) of a trained rank-4 LoRA
SIDE = 16  # the digits are drawn on a 16×16 canvas; each task puts them somewhere else
PLACES = {"top-right": (0, 8), "bottom-left": (8, 0), "bottom-right": (8, 8), "centre": (4, 4)}
CORNERS = ("top-right", "bottom-left", "bottom-right")
SETTINGS = {  # name → (task domains, LoRA target modules)
    "disjoint": (CORNERS, ("fc1",)),
    "disjoint+fc2": (CORNERS, ("fc1", "fc2")),
    "overlap": ((*CORNERS, "centre"), ("fc1",)),
    "concept-tokens": (tuple(f"<c{d}>" for d in concept_tokens.CONCEPTS), concept_tokens.TARGETS),
}
DEFAULT_LR = {"concept-tokens": 1e-3}  # the others: 1e-2


def learning_rate(setting: str, lr: float | None = None) -> float:
    """`lr`, or the setting's default LoRA learning rate when it is None."""
    return DEFAULT_LR.get(setting, 1e-2) if lr is None else lr


def _placed(row: int, col: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def place(x: torch.Tensor) -> torch.Tensor:
        canvas = torch.zeros(len(x), SIDE, SIDE)
        canvas[:, row : row + 8, col : col + 8] = x.reshape(-1, 8, 8)
        return canvas.reshape(len(x), SIDE * SIDE)

    return place


@dataclass
class Split:
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def load_tasks(seed: int = 0, domains: Sequence[str] = CORNERS) -> tuple[Split, dict[str, Split]]:
    """The top-left digits (for pre-training) and one split per domain, disjoint images for each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    chunks = order.chunk(len(domains) + 1)

    def split(indices: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> Split:
        cut = len(indices) * 2 // 3
        train, test = indices[:cut], indices[cut:]
        return Split(transform(X[train]), y[train], transform(X[test]), y[test])

    tasks = {name: split(idx, _placed(*PLACES[name])) for name, idx in zip(domains, chunks[1:])}
    return split(chunks[0], _placed(0, 0)), tasks


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
    backbone: MLP,
    task: str,
    split: Split,
    method: str,
    *,
    targets: Sequence[str],
    osrm: OSRM | None,
    allocator: BasisAllocator,
    steps: int,
    lr: float,
) -> Adapter:
    """One task's LoRA trained with `method`, returned as an adaptermerge Adapter."""
    rank = ORTHOGONAL_RANK if method == "orthogonal" else RANK
    model = lora_model(backbone, method, task, rank=rank, targets=targets, osrm=osrm, allocator=allocator)
    _fit(model, split.X_train, split.y_train, steps=steps, lr=lr)
    return as_adapter(model, task)


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


def run(
    seeds: Sequence[int] = (0, 1, 2),
    *,
    setting: str = "disjoint",
    steps: int = 300,
    lr: float | None = None,
    methods: Sequence[str] = METHODS,
) -> dict[str, dict[str, list[float]]]:
    """Method → metric → list of values, one per seed."""
    lr = learning_rate(setting, lr)
    if setting == "concept-tokens":
        return concept_tokens.run(seeds, steps=steps, lr=lr, methods=methods)
    domains, targets = SETTINGS[setting]
    results: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for seed in seeds:
        base, tasks = load_tasks(seed, domains)
        backbone = pretrain(base, seed=seed)
        batches = {task: [split.X_train] for task, split in tasks.items()}
        for method in methods:
            torch.manual_seed(seed)
            allocator = BasisAllocator(seed=seed)
            osrm = None
            if method.startswith("osrm"):
                osrm = OSRM(method.removeprefix("osrm-"), target_modules=list(targets)).fit(backbone, batches)
            adapters = {
                task: train_adapter(
                    backbone, task, split, method, targets=targets, osrm=osrm, allocator=allocator, steps=steps, lr=lr
                )
                for task, split in tasks.items()
            }
            for metric, value in evaluate(backbone, adapters, tasks).items():
                results[method].setdefault(metric, []).append(value)
    return results


def _cell(values: list[float]) -> str:
    values = torch.tensor(values, dtype=torch.float64)  # nan-safe: an adapter that never trained gives 0/0
    return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=list(SETTINGS), nargs="+", default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per adapter (full batch).")
    parser.add_argument("--lr", type=float, help="Adam learning rate of the LoRAs, the same for every method.")
    args = parser.parse_args()
    for setting in args.setting:
        start = time.perf_counter()
        with warnings.catch_warnings():  # OSRM warns where the statistics leave fewer than `rank` free directions
            warnings.simplefilter("ignore", AdapterMergeWarning)
            results = run(args.seeds, setting=setting, steps=args.steps, lr=args.lr)
        domains, targets = SETTINGS[setting]
        print(f"\n[{setting}] tasks {', '.join(domains)}; LoRA on {', '.join(targets)}; plain-sum merge; mean ± sd")
        print(f"{'method':<16} {'base acc':>9} {'individual':>14} {'merged':>14} {'interference':>14}")
        for method, metrics in results.items():
            cells = [_cell(metrics[k]) for k in ("individual", "merged", "interference")]
            base = f"{statistics.mean(metrics['base']):.3f}"
            print(f"{method:<16} {base:>9} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}")
        seconds = time.perf_counter() - start
        print(
            f"({len(args.seeds)} seeds, {args.steps} steps, lr {learning_rate(setting, args.lr):g}, {seconds:.1f} s)"
        )


if __name__ == "__main__":
    main()
