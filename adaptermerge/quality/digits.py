"""The image suite: scikit-learn's 8×8 digits (shipped inside scikit-learn) on a 16×16 canvas, an MLP pretrained here.

How the suite follows the task-arithmetic protocol (Ilharco et al., 2023, https://arxiv.org/abs/2212.04089), where
CLIP is fine-tuned on eight image datasets and read by its frozen zero-shot heads:

- The backbone is pretrained on one task, "which digit", with the digit upright at the centre of the canvas. Its
  pretraining head is every task's head (composed with the task's label map, e.g. odd/even), frozen: the analogue of
  a zero-shot head, so the base model is near chance on the tasks and each LoRA carries its task.
- Each task is its own input domain, as each dataset is for CLIP: the digit moved to another place on the canvas
  and shown mirrored, rotated, transposed or inverted. Domains overlap in part (neighbouring places share pixels,
  every task shares the backbone's features), so merged LoRAs interfere as they do on real models, and methods that
  handle interference differ visibly.
- One rank-`r` LoRA per task on every Linear layer, trained with peft; the table reports accuracy merged / own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .suite import SPLITS, Suite, SuiteConfig, TaskData, build_suite

__all__ = ["DIGITS_TASKS", "DigitsBackbone", "digits_config", "load_digits_suite"]

CANVAS = 16
CENTRE = (4, 4)


def _mirror(image: torch.Tensor) -> torch.Tensor:
    return image.flip(2)


def _upside_down(image: torch.Tensor) -> torch.Tensor:
    return image.flip(1)


def _rotate(quarter_turns: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda image: torch.rot90(image, quarter_turns, (1, 2))


def _transpose(image: torch.Tensor) -> torch.Tensor:
    return image.transpose(1, 2)


def _invert(image: torch.Tensor) -> torch.Tensor:
    return 1.0 - image


def _upright(image: torch.Tensor) -> torch.Tensor:
    return image


def _digit(y: torch.Tensor) -> torch.Tensor:
    return y


def _parity(y: torch.Tensor) -> torch.Tensor:
    return y % 2


# task → (view of the 8×8 image, its top-left corner on the canvas, label map, classes, description)
DIGITS_TASKS: dict[str, tuple[Callable, tuple[int, int], Callable, int, str]] = {
    "digit": (_upright, (0, 0), _digit, 10, "which digit, top-left"),
    "parity": (_upright, (0, 8), _parity, 2, "odd or even, top-right"),
    "mirrored": (_mirror, (8, 8), _digit, 10, "which digit, mirrored, bottom-right"),
    "rot90": (_rotate(1), (8, 0), _digit, 10, "which digit, rotated 90°, bottom-left"),
    "rot180": (_rotate(2), (0, 4), _digit, 10, "which digit, rotated 180°, top"),
    "inverted": (_invert, (4, 0), _digit, 10, "which digit, inverted, left"),
    "transposed": (_transpose, (4, 8), _digit, 10, "which digit, transposed, right"),
    "upside_down": (_upside_down, (8, 4), _digit, 10, "which digit, upside down, bottom"),
}


def _place(images: torch.Tensor, corner: tuple[int, int]) -> torch.Tensor:
    """`(n, 8, 8)` images pasted on a blank `CANVAS × CANVAS` canvas at `corner`, flattened."""
    canvas = torch.zeros(len(images), CANVAS, CANVAS)
    canvas[:, corner[0] : corner[0] + 8, corner[1] : corner[1] + 8] = images
    return canvas.reshape(len(images), -1)


class DigitsBackbone(nn.Module):
    """A three-layer ReLU MLP on the flattened canvas: `fc1` 256→h, `fc2` h→h, `fc3` h→f (the features)."""

    def __init__(self, hidden: int = 128, features: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(CANVAS * CANVAS, hidden)
        self.fc2, self.fc3 = nn.Linear(hidden, hidden), nn.Linear(hidden, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


def digits_config(
    tasks: tuple[str, ...] | None = None,
    *,
    epochs: int = 40,
    pretrain_epochs: int = 40,
    hidden: int = 128,
    rank: int = 8,
    seed: int = 0,
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
        rank=rank,
        alpha=rank,
        epochs=epochs,
        lr=1e-2,
        batch_size=64,
        seed=seed,
        extra={"hidden": hidden, "features": 64, "pretrain_epochs": pretrain_epochs, "version": 2},
    )


def _splits(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Pixels in [0, 1] as `(n, 8, 8)`, digit labels, and a fixed 60/15/25 split of the 1797 images."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32).reshape(-1, 8, 8) / 16.0, torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut1, cut2 = int(0.6 * len(y)), int(0.75 * len(y))
    return x, y, dict(zip(SPLITS, (order[:cut1], order[cut1:cut2], order[cut2:])))


def _pretrain(config: SuiteConfig, progressbar: bool = False) -> tuple[DigitsBackbone, nn.Linear]:
    """Pretrain backbone and head on "which digit", upright at the canvas centre, on the training images."""
    x, y, splits = _splits(config.seed)
    x = _place(x, CENTRE)
    torch.manual_seed(config.seed)
    backbone = DigitsBackbone(config.extra["hidden"], config.extra["features"])
    head = nn.Linear(config.extra["features"], 10)
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
    generator = torch.Generator().manual_seed(config.seed)
    train = splits["train"]
    epochs = tqdm(range(config.extra["pretrain_epochs"]), desc="pretraining the digits MLP", disable=not progressbar)
    for _ in epochs:
        for index in train[torch.randperm(len(train), generator=generator)].split(64):
            loss = nn.functional.cross_entropy(head(backbone(x[index])), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return backbone, head


def _label_head(pretrained: nn.Linear, label: Callable, classes: int) -> nn.Linear:
    """The pretraining head read through a label map: class `c`'s logit is the mean of its digits' logits."""
    digits = torch.arange(10)
    members = nn.functional.one_hot(label(digits), classes).T.float()  # (classes, 10)
    mix = members / members.sum(1, keepdim=True)
    head = nn.Linear(pretrained.in_features, classes)
    with torch.no_grad():
        head.weight.copy_(mix @ pretrained.weight)
        head.bias.copy_(mix @ pretrained.bias)
    return head


def load_digits_suite(
    config: SuiteConfig | None = None, *, cache_dir: str | Path | None = None, progressbar: bool = False
) -> Suite:
    """The digits suite, trained on first use (about a minute on 2 CPU cores) and read from the cache after.

    Args:
        config (`SuiteConfig`, *optional*): from :func:`digits_config`; the benchmark's by default.
        cache_dir (`str` or `Path`, *optional*): the cache root (see :func:`~adaptermerge.quality.suite.cache_root`).
        progressbar (`bool`, defaults to `False`): show progress bars while training.

    Returns:
        `Suite`: backbone, heads, data and the PEFT folders of the task LoRAs.
    """
    from safetensors.torch import load_file, save_file

    config = config or digits_config()
    extra = config.extra
    pretrained = nn.Linear(extra["features"], 10)

    def load_backbone(folder: Path) -> nn.Module:
        path, head_path = folder / "backbone.safetensors", folder / "pretrain_head.safetensors"
        backbone = DigitsBackbone(extra["hidden"], extra["features"])
        if path.is_file() and head_path.is_file():
            backbone.load_state_dict(load_file(str(path)))
            pretrained.load_state_dict(load_file(str(head_path)))
        else:
            backbone, head = _pretrain(config, progressbar)
            pretrained.load_state_dict(head.state_dict())
            save_file(backbone.state_dict(), str(path))
            save_file(head.state_dict(), str(head_path))
        return backbone

    def load_data():
        x, y, splits = _splits(config.seed)
        data, classes, descriptions = {}, {}, {}
        for task in config.tasks:
            view, corner, label, classes[task], descriptions[task] = DIGITS_TASKS[task]
            data[task] = {split: TaskData(_place(view(x[i]), corner), label(y[i])) for split, i in splits.items()}
        return data, classes, descriptions

    def make_head(task: str, classes: int) -> nn.Linear:
        return _label_head(pretrained, DIGITS_TASKS[task][2], classes)

    return build_suite(
        config,
        load_backbone=load_backbone,
        load_data=load_data,
        make_head=make_head,
        cache_dir=cache_dir,
        progressbar=progressbar,
    )
