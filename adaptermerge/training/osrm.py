"""OSRM: start each task's LoRA in the input subspace the other tasks do not use, so merges interfere less.

Zhang & Zhou, "Unraveling LoRA Interference: Orthogonal Subspaces for Robust Model Merging" (ACL 2025,
https://arxiv.org/abs/2505.22934, code https://github.com/illidanlab/OSRM). After a merge, task `j`'s layer input
`h_j` also passes through task `i`'s adapter and shifts the output by `B_i A_i h_j`. OSRM chooses `A_i` with
orthonormal rows that (nearly) annihilate the other tasks' inputs, then trains as usual from `B_i = 0`.

Two statistics of the other tasks' layer inputs, collected with forward hooks on the pre-trained model:

- `"mean"` (the official code): one mean input vector per task and layer; `A_i` spans the null space of the
  stacked means of the other tasks (`A_i h̄_j = 0` exactly while `r ≤ n - (T - 1)`).
- `"covariance"` (the paper): the second-moment matrix `E[h hᵀ]` per task and layer; `A_i` holds the `r`
  eigenvectors of the summed matrix of the other tasks with the smallest eigenvalues, minimising `‖A_i H_{¬i}‖_F`.

Tokens are averaged over all positions; where a batch carries an `attention_mask` of the input's leading shape,
padding is left out (the official code includes it). Where the other tasks leave more than `rank` directions free,
the rows are the free directions that carry most of the task's own statistic (see :meth:`OSRM.basis`).

Measured (`benchmarks/bench_training.py`, digits in different corners of a canvas): with the covariance statistic,
LoRAs on a layer whose inputs differ per task merge with no cross-task change at all, since `lora_A`'s gradient
never reaches the other tasks' inputs; the mean statistic removes little on such data; on a layer that reads
features every task shares (a hidden layer), neither statistic leaves a subspace free of the other tasks.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..adapter import Adapter
from ..errors import AdapterMergeWarning, InvalidParameterError, NotFittedError
from ..io._write import atomic_path, save_tensors
from ..lowrank import COMPUTE_DTYPE, LowRank, pivot_signs
from ..patterns import find_pattern_key
from ._peft import adapters_disabled, lora_A_weight, lora_layers, module_key

__all__ = ["OSRM"]

logger = logging.getLogger(__name__)

STATISTICS = ("mean", "covariance")
CONFIG_NAME = "osrm_config.json"
WEIGHTS_NAME = "osrm_statistics.safetensors"
# Eigenvalues below this fraction of the largest count as zero when ranking the other tasks' statistics.
RANK_RTOL = 1e-6


class OSRM:
    """Input statistics of the target modules per task, and the OSRM initialisation of a new task's `lora_A`.

    Args:
        statistic (`str`, defaults to `"mean"`): `"mean"` (official code: one mean input per task and module) or
            `"covariance"` (paper: second-moment matrix `E[h hᵀ]`, `in × in` per task and module).
        target_modules (`list[str]`, *optional*): module names or peft-style patterns (a key matches a whole
            dotted tail of the name) of the `nn.Linear` layers to hook. By default, every LoRA layer of the model
            passed to `fit`; a plain model needs them.
        max_samples (`int`, defaults to `100`): examples per task (rows of the batches), as in the official code.

    Attributes:
        statistics_ (`dict[str, dict[str, torch.Tensor]]`): task → module → float64 mean `(in,)` or
            second moment `(in, in)`.
        n_samples_ (`dict[str, int]`): examples seen per task.

    Example:
        ```py
        osrm = OSRM(statistic="covariance").fit(base_model, {"sst2": sst2_batches, "rte": rte_batches})
        osrm.save("osrm_stats")
        model = get_peft_model(base_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        OSRM.load("osrm_stats").init_lora(model, task="mrpc")  # lora_A ⟂ the sst2 and rte inputs, lora_B = 0
        ```
    """

    def __init__(
        self, statistic: str = "mean", *, target_modules: Sequence[str] | None = None, max_samples: int = 100
    ) -> None:
        self.statistic = statistic
        self.target_modules = target_modules
        self.max_samples = max_samples

    def __repr__(self) -> str:
        targets, samples = self.target_modules, self.max_samples
        return f"OSRM(statistic={self.statistic!r}, target_modules={targets!r}, max_samples={samples})"

    def _check_params(self) -> None:
        if self.statistic not in STATISTICS:
            raise InvalidParameterError(f"statistic must be one of {list(STATISTICS)}; got {self.statistic!r}")
        if self.max_samples < 1:
            raise InvalidParameterError(f"max_samples must be at least 1; got {self.max_samples}")

    def fit(
        self, model: nn.Module, tasks: Mapping[str, Iterable[Any]], *, forward: Callable[[nn.Module, Any], Any] = None
    ) -> OSRM:
        """Collect the statistics of every task, forgetting earlier ones.

        Args:
            model (`nn.Module`): the pre-trained model, plain or with peft adapters (they are switched off while
                collecting, so the statistics are the base model's).
            tasks (`Mapping[str, Iterable]`): task name → batches. A batch is a tensor (`model(batch)`), a mapping
                (`model(**batch)`) or a tuple (`model(*batch)`), unless `forward` is given.
            forward (`Callable[[model, batch], Any]`, *optional*): how to run one batch.

        Returns:
            `OSRM`: self.
        """
        self.statistics_: dict[str, dict[str, torch.Tensor]] = {}
        self.n_samples_: dict[str, int] = {}
        return self.partial_fit(model, tasks, forward=forward)

    def partial_fit(
        self, model: nn.Module, tasks: Mapping[str, Iterable[Any]], *, forward: Callable[[nn.Module, Any], Any] = None
    ) -> OSRM:
        """Collect the statistics of more tasks, keeping the others (a task seen before is replaced)."""
        self._check_params()
        if not hasattr(self, "statistics_"):
            self.statistics_, self.n_samples_ = {}, {}
        targets = self._targets(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), adapters_disabled(model):
                for task, batches in tasks.items():
                    self.statistics_[task], self.n_samples_[task] = self._collect(model, targets, batches, forward)
                    logger.info(
                        "OSRM: %s statistics of %d modules on %d examples of task %r",
                        self.statistic,
                        len(targets),
                        self.n_samples_[task],
                        task,
                    )
        finally:
            model.train(was_training)
        return self

    def _targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not any(p in name.split(".") for p in ("lora_A", "lora_B")):
                layers[module_key(name)] = module
        if self.target_modules is None:
            names = list(lora_layers(model, _adapter_names(model)[0]))
        else:
            names = [name for name in layers if find_pattern_key(self.target_modules, name) is not None]
        missing = [name for name in names if name not in layers]
        if missing or not names:
            raise InvalidParameterError(
                f"OSRM hooks nn.Linear layers; {'these are not: ' + ', '.join(missing) if missing else 'none matched'}"
                f" (target_modules={self.target_modules!r}). Pass target_modules naming Linear layers of the model."
            )
        return {name: layers[name] for name in names}

    def _collect(self, model, targets, batches, forward) -> tuple[dict[str, torch.Tensor], int]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = dict.fromkeys(targets, 0.0)
        state: dict[str, torch.Tensor | None] = {"mask": None}

        def hook(name):
            def record(module, args):
                x = args[0].detach().to(COMPUTE_DTYPE)
                mask = state["mask"]
                if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                    weight = mask.reshape(-1, 1).to(COMPUTE_DTYPE)
                else:
                    weight = torch.ones(x.shape[:-1].numel(), 1, dtype=COMPUTE_DTYPE)
                x = x.reshape(-1, x.shape[-1])
                stat = (weight * x).sum(0) if self.statistic == "mean" else (weight * x).T @ x
                sums[name] = stat if name not in sums else sums[name] + stat
                counts[name] += float(weight.sum())

            return record

        handles = [module.register_forward_pre_hook(hook(name)) for name, module in targets.items()]
        seen = 0
        try:
            for batch in batches:
                batch = _take(batch, self.max_samples - seen)
                state["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                if forward is not None:
                    forward(model, batch)
                elif isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                seen += _batch_size(batch)
                if seen >= self.max_samples:
                    break
        finally:
            for handle in handles:
                handle.remove()
        unseen = [name for name in targets if counts[name] == 0]
        if unseen:
            raise InvalidParameterError(
                f"no input reached modules {unseen[:5]} while running the batches; check batches and target_modules"
            )
        return {name: sums[name] / counts[name] for name in targets}, seen

    def _check_fitted(self) -> None:
        if not getattr(self, "statistics_", None):
            raise NotFittedError("this OSRM has no statistics yet; call fit(model, tasks) or OSRM.load(path) first")

    def basis(self, module: str, rank: int, *, task: str | None = None) -> torch.Tensor:
        """The OSRM `lora_A` for one module: `rank` orthonormal rows orthogonal to the other tasks' statistics.

        Args:
            module (`str`): the module name, as in `statistics_`.
            rank (`int`): the number of rows.
            task (`str`, *optional*): the task being trained; its own statistics are left out. A task that was
                not fitted uses every fitted task's statistics.

        When the other tasks' statistics leave more than `rank` directions free (their null space, eigenvalues below
        `RANK_RTOL` of the largest), the paper's objective `min ‖A H_{¬i}‖` does not pick one basis: every `rank`
        rows of the null space reach zero. An arbitrary pick can fall on inputs no task uses (constant pixels, dead
        units), where `A h_i = 0` too, so with `B = 0` neither factor gets a gradient and the LoRA never trains.
        When `task` has statistics, the tie is broken towards the task's own input energy: the rows are the
        null-space directions that carry most of `task`'s statistic (still minimisers of the paper's objective).

        Returns:
            `torch.Tensor` of shape `(rank, in)`, float64, sign-fixed (largest-|entry| of each row positive).

        Raises:
            NotFittedError: before `fit`.
            InvalidParameterError: when no other task has statistics for the module, or `rank > in`.
        """
        self._check_fitted()
        others = [stats[module] for name, stats in self.statistics_.items() if name != task and module in stats]
        if not others:
            raise InvalidParameterError(
                f"no task other than {task!r} has statistics for module {module!r}; fit the other tasks first"
            )
        if self.statistic == "mean":
            stacked = torch.stack(others)
            gram = stacked.T @ stacked
        else:
            gram = torch.stack(others).sum(0)
        n = gram.shape[0]
        if rank > n:
            raise InvalidParameterError(f"module {module!r} has {n} input features; rank {rank} cannot exceed it")
        vectors, values = _eigh_descending(gram)
        used = int((values > RANK_RTOL * values[0]).sum()) if values.numel() and values[0] > 0 else 0
        if rank > n - used:
            warnings.warn(
                f"OSRM: module {module!r} has {n} input features and the other tasks' statistics span {used} of them, "
                f"so only {n - used} directions are free; rank {rank} rows overlap the other tasks' inputs. Use a "
                "smaller rank or statistic='covariance' (which ranks directions by energy)",
                AdapterMergeWarning,
                stacklevel=2,
            )
        rows = vectors[:, n - rank :].flip(1)
        own = self.statistics_.get(task, {}).get(module)
        if own is not None and n - used > 0:
            free = vectors[:, used:]
            own = torch.outer(own, own) if self.statistic == "mean" else own
            preferred, _ = _eigh_descending(free.T @ own @ free)
            k = min(rank, n - used)
            rows = torch.cat([free @ preferred[:, :k], vectors[:, used - (rank - k) : used].flip(1)], 1)
            rows = rows * pivot_signs(rows)
        return rows.T.contiguous()

    def init_lora(self, peft_model: nn.Module, *, task: str | None = None, adapter_name: str = "default") -> list[str]:
        """Write the OSRM `lora_A` (orthonormal rows) and `lora_B = 0` into every LoRA layer of one adapter.

        Args:
            peft_model (`nn.Module`): a `PeftModel` or a model with peft LoRA layers.
            task (`str`, *optional*): the task this adapter will learn (its own statistics are left out).
            adapter_name (`str`, defaults to `"default"`): the peft adapter to initialise.

        Returns:
            `list[str]`: the modules initialised.

        Raises:
            NotFittedError: before `fit`.
            InvalidParameterError: when a LoRA layer has no statistics, or is not a Linear LoRA.
        """
        self._check_fitted()
        layers = lora_layers(peft_model, adapter_name)
        known = set().union(*(stats.keys() for stats in self.statistics_.values()))
        missing = [name for name in layers if name not in known]
        if missing:
            raise InvalidParameterError(
                f"no OSRM statistics for LoRA modules {missing[:5]}; fit with target_modules covering them"
            )
        with torch.no_grad():
            for name, layer in layers.items():
                weight = lora_A_weight(layer, adapter_name)
                if weight.ndim != 2:
                    raise InvalidParameterError(f"module {name!r}: OSRM initialises Linear LoRA layers only")
                weight.copy_(self.basis(name, weight.shape[0], task=task).to(weight.dtype))
                layer.lora_B[adapter_name].weight.zero_()
        return list(layers)

    def project(self, adapter: Adapter, *, task: str | None = None) -> Adapter:
        """Post-hoc OSRM for a trained adapter: `A' = A_i`, `B' = B (A A_iᵀ)`, the update projected on `A_i`'s rows.

        Lossy (the official `post_OSRM.py` retrains afterwards). Modules without statistics are kept unchanged.
        """
        self._check_fitted()
        known = set().union(*(stats.keys() for stats in self.statistics_.values()))
        modules = {}
        for name, lowrank in adapter.items():
            if name not in known or lowrank.kernel_size:
                modules[name] = lowrank
                continue
            A_i = self.basis(name, lowrank.rank, task=task)
            B = lowrank.B.to(COMPUTE_DTYPE) @ (lowrank.A.to(COMPUTE_DTYPE) @ A_i.T)
            modules[name] = LowRank(A_i.to(lowrank.dtype), B.to(lowrank.dtype))
        return adapter.with_modules(modules)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the statistics to a folder: `osrm_statistics.safetensors` and `osrm_config.json`."""
        self._check_fitted()
        tasks = list(self.statistics_)
        tensors = {f"{i}:{m}": stat for i, task in enumerate(tasks) for m, stat in self.statistics_[task].items()}
        config = {
            "statistic": self.statistic,
            "target_modules": list(self.target_modules) if self.target_modules is not None else None,
            "max_samples": self.max_samples,
            "tasks": tasks,
            "n_samples": self.n_samples_,
        }
        with atomic_path(path, overwrite=overwrite, directory=True) as tmp:
            tmp.mkdir(exist_ok=True)
            save_tensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt", "osrm_statistic": self.statistic})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> OSRM:
        """Read statistics written by :meth:`save`; the result is fitted and ready for :meth:`init_lora`."""
        path = Path(path)
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InvalidParameterError(f"{path}: not an OSRM statistics folder ({err})") from None
        osrm = cls(config["statistic"], target_modules=config["target_modules"], max_samples=config["max_samples"])
        tensors = load_file(str(path / WEIGHTS_NAME))
        osrm.statistics_ = {task: {} for task in config["tasks"]}
        for key, value in tensors.items():
            index, module = key.split(":", 1)
            osrm.statistics_[config["tasks"][int(index)]][module] = value
        osrm.n_samples_ = dict(config["n_samples"])
        return osrm


def _eigh_descending(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns) and eigenvalues of a symmetric PSD matrix, values descending, signs fixed.

    Each vector's largest-magnitude entry is made positive so the basis is reproducible.
    """
    values, vectors = torch.linalg.eigh(gram)
    vectors = vectors.flip(1)
    return vectors * pivot_signs(vectors), values.flip(0).clamp_min(0)


def _adapter_names(model: nn.Module) -> list[str]:
    for module in model.modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict):
            return list(lora_A.keys())
    raise InvalidParameterError("the model has no peft LoRA layers; pass target_modules to say which Linear layers")


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    return next(v.shape[0] for v in values if isinstance(v, torch.Tensor))


def _take(batch: Any, k: int) -> Any:
    """The first `k` examples of a batch (tensors sliced on their first dimension)."""
    if isinstance(batch, torch.Tensor):
        return batch[:k]
    if isinstance(batch, Mapping):
        return {key: v[:k] if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[:k] if isinstance(v, torch.Tensor) else v for v in batch)
    return batch
