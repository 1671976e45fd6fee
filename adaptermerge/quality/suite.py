"""A task suite for measuring merge quality: a frozen backbone, one head and one PEFT LoRA per task, cached.

Every suite follows one protocol, so that merging is what the numbers measure (DESIGN.md, "Test data that is real
and offline"):

1. A backbone pretrained elsewhere (the packaged MiniLM) or here on one task (the digits MLP), then frozen.
2. Per task, a frozen linear head: the base model with that head is the "weight 0" row, and every adapter, merged or
   not, is read by the same head. Both suites use zero-shot heads, like CLIP's in the task-arithmetic papers, so the
   base model is weak on the tasks and the adapters carry the skill: the digits backbone's own pretraining head read
   through the task's label map, and MiniLM's embeddings of the class names.
3. Per task, one LoRA trained with peft on the backbone's Linear layers, saved as a PEFT folder, so merges go
   through :func:`adaptermerge.merge_adapters` from files exactly as users run them.

Training is seeded and cached under ``$ADAPTERMERGE_CACHE`` (``~/.cache/adaptermerge/quality`` by default), in a
folder named for a hash of the suite's configuration, so a changed configuration never reuses stale adapters.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapter import Adapter
from ..io import load_adapter

__all__ = ["Suite", "SuiteConfig", "TaskData", "build_suite", "cache_root"]

logger = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$ADAPTERMERGE_CACHE`, else `~/.cache/adaptermerge/quality`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ADAPTERMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adaptermerge" / "quality"


@dataclass(frozen=True)
class TaskData:
    """One task's split: model inputs (a tensor, or a dict of tensors for text) and integer labels."""

    inputs: Any
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> TaskData:
        if isinstance(self.inputs, Mapping):
            return TaskData({k: v[index] for k, v in self.inputs.items()}, self.labels[index])
        return TaskData(self.inputs[index], self.labels[index])


@dataclass(frozen=True)
class SuiteConfig:
    """What defines a suite's trained artefacts; its hash names the cache folder.

    Args:
        name: the suite (`"digits"`, `"text"`).
        tasks: the task names, in table order.
        target_modules: peft `target_modules` (the backbone's Linear layers that get a LoRA).
        rank / alpha: LoRA rank and `lora_alpha`.
        epochs / lr / batch_size: LoRA training.
        seed: the seed of data splits, heads and LoRA initialisation.
        extra: suite-specific settings (backbone size, pretraining epochs, samples per task).
    """

    name: str
    tasks: tuple[str, ...]
    target_modules: tuple[str, ...]
    rank: int = 4
    alpha: int = 4
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        text = json.dumps({k: v for k, v in self.__dict__.items()}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Suite:
    """A trained suite: the frozen backbone, the per-task heads and data, and the task LoRAs on disk.

    Attributes:
        config: the configuration it was built from.
        backbone: the frozen base model; `backbone(inputs)` returns features `(n, d)`.
        heads: task → frozen `nn.Linear(d, classes)`.
        data: task → split (`"train"`, `"val"`, `"test"`) → :class:`TaskData`.
        adapter_paths: task → the PEFT folder of its LoRA.
        descriptions: task → one line saying what the task is.
        folder: the cache folder holding everything.
        trained: whether this call trained the LoRAs (false when they came from the cache).
    """

    config: SuiteConfig
    backbone: nn.Module
    heads: dict[str, nn.Linear]
    data: dict[str, dict[str, TaskData]]
    adapter_paths: dict[str, Path]
    descriptions: dict[str, str]
    folder: Path
    trained: bool = False
    eval_batch_size: int = 4096
    _weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    def adapters(self) -> list[Adapter]:
        """The task LoRAs, read (lazily) from their PEFT folders, named by task."""
        return [load_adapter(self.adapter_paths[t], name=t) for t in self.tasks]

    def evaluate(
        self, adapter: Mapping[str, Any] | None, *, split: str = "test", tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Accuracy per task of the backbone with `adapter`'s update added (the base model for `None`).

        Args:
            adapter (`Adapter` or `None`): a merged or single adapter whose modules name the backbone's Linear
                layers (as peft saves them); `None` evaluates the base model with each task's head.
            split (`str`, defaults to `"test"`): `"train"`, `"val"` or `"test"`.
            tasks (`list[str]`, *optional*): the tasks to evaluate; all by default.

        Returns:
            `dict[str, float]`: task → accuracy in [0, 1].
        """
        if not self._weights:
            linears = (item for item in self.backbone.named_modules() if isinstance(item[1], nn.Linear))
            self._weights = {name: module.weight.detach() for name, module in linears}
        params = {}
        for module, update in (adapter or {}).items():
            if module not in self._weights:
                raise KeyError(f"adapter module {module!r} is not a Linear layer of the {self.config.name} backbone")
            weight = self._weights[module]
            params[f"{module}.weight"] = weight + update.to_dense().to(weight.dtype)
        results = {}
        with torch.no_grad():
            for task in tasks or self.tasks:
                data = self.data[task][split]
                correct = 0
                for start in range(0, len(data), self.eval_batch_size):
                    batch = data.take(torch.arange(start, min(start + self.eval_batch_size, len(data))))
                    features = torch.func.functional_call(self.backbone, params, (batch.inputs,))
                    correct += int((self.heads[task](features).argmax(-1) == batch.labels).sum())
                results[task] = correct / len(data)
        return results


def _train_lora(
    backbone: nn.Module,
    head: nn.Linear,
    train: TaskData,
    config: SuiteConfig,
    seed: int,
    path: Path,
    on_epoch: Callable[[], Any],
) -> None:
    """Train one task's LoRA with peft on a copy of the frozen backbone and save it as a PEFT folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules), lora_dropout=0.0
    )
    model = get_peft_model(copy.deepcopy(backbone), lora)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.epochs):
        for index in torch.randperm(len(train), generator=generator).split(config.batch_size):
            batch = train.take(index)
            loss = nn.functional.cross_entropy(head(model(batch.inputs)), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        on_epoch()
    model.save_pretrained(str(path))


def build_suite(
    config: SuiteConfig,
    *,
    load_backbone: Callable[[Path], nn.Module],
    load_data: Callable[[], tuple[dict[str, dict[str, TaskData]], dict[str, int], dict[str, str]]],
    make_head: Callable[[str, int], nn.Linear],
    cache_dir: str | Path | None = None,
    eval_batch_size: int = 4096,
    progressbar: bool = False,
) -> Suite:
    """Build a suite, training its heads and LoRAs unless a cache folder for `config` holds them already.

    Args:
        config (`SuiteConfig`): what to train.
        load_backbone (`callable`): folder → the frozen backbone (pretraining and caching it there if needed).
        load_data (`callable`): → (task → split → data, task → number of classes, task → description).
        make_head (`callable`): `(task, classes)` → the task's head (frozen after; see the protocol above).
        cache_dir (`str` or `Path`, *optional*): the cache root; see :func:`cache_root`.
        eval_batch_size (`int`): the batch size of evaluation.
        progressbar (`bool`, defaults to `False`): show a progress bar over the LoRAs' training epochs.

    Returns:
        `Suite`: ready to evaluate; `suite.trained` says whether anything was trained.
    """
    from safetensors.torch import load_file, save_file

    folder = cache_root(cache_dir) / f"{config.name}-{config.key()}"
    folder.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(folder).requires_grad_(False).eval()
    data, classes, descriptions = load_data()
    manifest = folder / "suite.json"
    trained = not manifest.is_file()
    heads, paths = {}, {}
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster than two contending ones
    total = len(config.tasks) * config.epochs
    bar = tqdm(total=total, desc=f"training {config.name} LoRAs", unit="epoch", disable=not (progressbar and trained))
    try:
        for index, task in enumerate(config.tasks):
            head_file, adapter_dir = folder / "heads" / f"{task}.safetensors", folder / "adapters" / task
            if trained:
                logger.info("training %s/%s (head, then LoRA)", config.name, task)
                torch.manual_seed(config.seed + index)
                heads[task] = make_head(task, classes[task]).requires_grad_(False).eval()
                head_file.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in heads[task].state_dict().items()}, str(head_file))
                bar.set_postfix_str(task)
                train = data[task]["train"]
                _train_lora(backbone, heads[task], train, config, config.seed + index, adapter_dir, bar.update)
            else:
                state = load_file(str(head_file))
                heads[task] = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
                heads[task].load_state_dict(state)
                heads[task].requires_grad_(False).eval()
            paths[task] = adapter_dir
    finally:
        bar.close()
        torch.set_num_threads(threads)
    suite = Suite(config, backbone, heads, data, paths, descriptions, folder, trained, eval_batch_size)
    if trained:
        config_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()}
        manifest.write_text(json.dumps({"config": config_dict, "train_seconds": time.perf_counter() - start}))
    return suite
