"""The image suite: scikit-learn's 8×8 digits (shipped inside scikit-learn), an MLP backbone pretrained here.

Why the tasks look the way they do (DESIGN.md lists the pitfalls measured on naive digits suites):

- The backbone is pretrained on a *coarse* task, "which of 0-4, or 5-9 as one class", so its features keep little
  of what tells 5, 6, 7, 8 and 9 apart. Every task is posed on images of 5-9 only, so the base model with a linear
  probe head is weak (the weight-0 row) and each LoRA has something real to add.
- The tasks are different label maps of those images (which digit, parity, ≥ 7, mod 3, has a loop, prime) plus the
  same "which digit" question on rotated and on inverted images: the LoRAs need overlapping but different features,
  so a merge can keep much of each, and methods that handle interference differ visibly.
- Heads are linear probes fitted on the frozen base features and then frozen, so every adapter and every merge is
  read in the same frame.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .suite import SPLITS, Suite, SuiteConfig, TaskData, build_suite

__all__ = ["DIGITS_TASKS", "DigitsBackbone", "digits_config", "load_digits_suite"]

HIGH = (5, 6, 7, 8, 9)


def _image(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 8, 8)


def _rot90(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(_image(x), 1, (1, 2)).reshape(-1, 64)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def _member(*digits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: torch.isin(y, torch.tensor(digits)).long()


# task → (input transform, label map on the digit 5-9, number of classes, description)
DIGITS_TASKS: dict[str, tuple[Callable, Callable, int, str]] = {
    "digit": (_identity, lambda y: y - 5, 5, "which of 5-9"),
    "parity": (_identity, lambda y: y % 2, 2, "odd or even"),
    "ge7": (_identity, lambda y: (y >= 7).long(), 2, "at least 7"),
    "mod3": (_identity, lambda y: y % 3, 3, "digit mod 3"),
    "loop": (_identity, _member(6, 8, 9), 2, "has a closed loop (6, 8, 9)"),
    "prime": (_identity, _member(5, 7), 2, "is prime (5, 7)"),
    "rot90": (_rot90, lambda y: y - 5, 5, "which of 5-9, image rotated 90°"),
    "inverted": (_invert, lambda y: y - 5, 5, "which of 5-9, image inverted"),
}


class DigitsBackbone(nn.Module):
    """A three-layer ReLU MLP on flattened 8×8 images: `fc1` 64→h, `fc2` h→h, `fc3` h→64."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


def digits_config(
    tasks: tuple[str, ...] | None = None, *, epochs: int = 30, pretrain_epochs: int = 60, hidden: int = 128, seed=0
) -> SuiteConfig:
    """The digits suite's configuration; the defaults are the benchmark's, fewer tasks/epochs make a quick one."""
    tasks = tuple(tasks or DIGITS_TASKS)
    unknown = sorted(set(tasks) - set(DIGITS_TASKS))
    if unknown:
        raise ValueError(f"unknown digits task(s) {unknown}; choose from {sorted(DIGITS_TASKS)}")
    return SuiteConfig(
        name="digits",
        tasks=tasks,
        target_modules=("fc1", "fc2", "fc3"),
        rank=4,
        alpha=4,
        epochs=epochs,
        lr=3e-3,
        batch_size=64,
        seed=seed,
        extra={"hidden": hidden, "pretrain_epochs": pretrain_epochs, "version": 1},
    )


def _splits(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Pixels in [0, 1], digit labels, and a fixed 60/15/25 split of the 1797 images."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut1, cut2 = int(0.6 * len(y)), int(0.75 * len(y))
    return x, y, dict(zip(SPLITS, (order[:cut1], order[cut1:cut2], order[cut2:])))


def _pretrain(config: SuiteConfig) -> DigitsBackbone:
    """Pretrain on the coarse task: 0, 1, 2, 3, 4 or "5-9", on the training images of every digit."""
    x, y, splits = _splits(config.seed)
    torch.manual_seed(config.seed)
    backbone, head = DigitsBackbone(config.extra["hidden"]), nn.Linear(64, 6)
    target = y.clamp(max=5)
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
    generator = torch.Generator().manual_seed(config.seed)
    train = splits["train"]
    for _ in range(config.extra["pretrain_epochs"]):
        for index in train[torch.randperm(len(train), generator=generator)].split(64):
            loss = nn.functional.cross_entropy(head(backbone(x[index])), target[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return backbone


def load_digits_suite(config: SuiteConfig | None = None, *, cache_dir: str | Path | None = None) -> Suite:
    """The digits suite, trained on first use (about a minute on 2 CPU cores) and read from the cache after.

    Args:
        config (`SuiteConfig`, *optional*): from :func:`digits_config`; the benchmark's by default.
        cache_dir (`str` or `Path`, *optional*): the cache root (see :func:`~adaptermerge.quality.suite.cache_root`).

    Returns:
        `Suite`: backbone, heads, data and the PEFT folders of the task LoRAs.
    """
    from safetensors.torch import load_file, save_file

    config = config or digits_config()

    def load_backbone(folder: Path) -> nn.Module:
        path = folder / "backbone.safetensors"
        backbone = DigitsBackbone(config.extra["hidden"])
        if path.is_file():
            backbone.load_state_dict(load_file(str(path)))
        else:
            backbone = _pretrain(config)
            save_file(backbone.state_dict(), str(path))
        return backbone

    def load_data():
        x, y, splits = _splits(config.seed)
        data, classes, descriptions = {}, {}, {}
        for task in config.tasks:
            transform, label, classes[task], descriptions[task] = DIGITS_TASKS[task]
            data[task] = {}
            for split, index in splits.items():
                index = index[torch.isin(y[index], torch.tensor(HIGH))]
                data[task][split] = TaskData(transform(x[index]), label(y[index]))
        return data, classes, descriptions

    return build_suite(config, load_backbone=load_backbone, load_data=load_data, cache_dir=cache_dir)
