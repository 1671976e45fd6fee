"""Merge a suite's task LoRAs with every registered method and with peft's `add_weighted_adapter` types.

Protocol (the same for every row, peft's included), after task arithmetic (Ilharco et al., 2023) and the Core Space,
TIES and KnOTS papers, which all pick the merge coefficient on held-out data:

- one uniform weight per adapter (the scaling coefficient λ), chosen from :data:`GRID` by the average normalised
  accuracy on the validation split; the table reports the test split at that choice;
- a method's sparsity (`density` of ours and of peft's ties/dare/magnitude types) is chosen jointly with λ from
  :data:`DENSITIES` in the same way (the TIES paper's 0.2 is one of them); other hyper-parameters keep their defaults;
- SVD truncations keep `Σ r_t`, the rank every other adaptermerge merge keeps (all nonzero components), so that no
  row is handicapped by a smaller output rank: peft's `*svd` types get `svd_rank = Σ r_t` and our `svd` gets
  `rank = Σ r_t` (both default to the largest input rank). LoRA-LEGO keeps its paper's merged rank `k = r`.

Normalised accuracy is merged accuracy over the task's own adapter's accuracy on the same split.

Methods whose result is not an :class:`~adaptermerge.Adapter` are handled by what the result offers: a result with
``recover`` (RMM's reversible bundle) is reported as the accuracy of each task's adapter recovered from a basis of
``k = T / 2`` elements, since recovery, not one merged model, is what such a method is for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..adapter import Adapter
from ..io import peft as peft_format
from ..merge import merge_adapters
from ..methods import get_method, list_methods
from .suite import Suite

__all__ = [
    "DENSITIES", "GRID", "PEFT_TYPES", "BenchRow", "cached_quality_bench", "reference_rows", "run_method", "run_peft",
    "run_quality_bench",
]  # fmt: skip

logger = logging.getLogger(__name__)
GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 4.0)
DENSITIES = (0.2, 0.5, 0.8)
PEFT_TYPES = ("cat", "linear", "ties", "svd", "ties_svd")
_BASIS_PARAMS = ("k", "num_bases", "n_bases", "basis_size")
_TRUNCATING = ("svd",)  # methods whose default output rank is the largest input rank, as peft's svd types


@dataclass
class BenchRow:
    """One row of the quality table.

    Attributes:
        name: the method (`"peft:ties"` for peft's types) or `"base (weight 0)"` / `"individual"`.
        kind: `"reference"`, `"adaptermerge"`, `"peft"` or `"recovery"`.
        accuracy: task → test accuracy.
        normalised: task → test accuracy / the task's own adapter's test accuracy.
        weight: the uniform weight chosen on validation (`None` for reference and recovery rows).
        params: the method's hyper-parameters chosen on validation with the weight (`density`), if any.
        merge_seconds: wall time of the merge at the chosen weight.
        peak_mib: peak resident memory above the level before the merge, sampled (MiB).
        note: what else a reader needs (an error, the basis size).
        val_curve: candidate (`"<weight> density=<d>"`) → average normalised validation accuracy.
    """

    name: str
    kind: str
    accuracy: dict[str, float] = field(default_factory=dict)
    normalised: dict[str, float] = field(default_factory=dict)
    weight: float | None = None
    merge_seconds: float | None = None
    peak_mib: float | None = None
    note: str = ""
    val_curve: dict[str, float] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float | None:
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else None

    @property
    def mean_normalised(self) -> float | None:
        return sum(self.normalised.values()) / len(self.normalised) if self.normalised else None

    def to_dict(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        return {**row, "mean_accuracy": self.mean_accuracy, "mean_normalised": self.mean_normalised}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> BenchRow:
        """The row :meth:`to_dict` wrote."""
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """Run `fn`; return its result, wall seconds and peak RSS above the starting level in MiB (sampled each ms)."""
    start_rss, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes() or 0)
    return result, seconds, None if start_rss is None else max(peak[0] - start_rss, 0) / 2**20


def _normalise(accuracy: dict[str, float], individual: dict[str, float]) -> dict[str, float]:
    return {t: a / individual[t] if individual[t] else 0.0 for t, a in accuracy.items()}


def reference_rows(suite: Suite) -> tuple[BenchRow, BenchRow, dict[str, dict[str, float]], dict[str, dict]]:
    """The base row, the individual row, each adapter on every task (test), and per-split own-task accuracy."""
    own = {"val": {}, "test": {}}
    cross = {}
    for task, adapter in zip(suite.tasks, suite.adapters()):
        cross[task] = suite.evaluate(adapter)
        own["test"][task] = cross[task][task]
        own["val"][task] = suite.evaluate(adapter, split="val", tasks=[task])[task]
    base = suite.evaluate(None)
    base_row = BenchRow("base (weight 0)", "reference", base, _normalise(base, own["test"]), weight=0.0)
    individual = BenchRow("individual (own adapter)", "reference", own["test"], _normalise(own["test"], own["test"]))
    return base_row, individual, cross, own


def _candidates(grid: Sequence[float], tuned: bool) -> list[tuple[float, dict[str, float]]]:
    """Every (weight, hyper-parameters) pair tried on validation: the grid, times the densities when `tuned`."""
    return [(w, {"density": d}) for d in DENSITIES for w in grid] if tuned else [(w, {}) for w in grid]


def _label(weight: float, params: dict[str, float]) -> str:
    return " ".join([f"{weight:g}", *(f"{k}={v:g}" for k, v in params.items())])


def _select(
    suite: Suite,
    name: str,
    kind: str,
    merge: Callable[[float, dict[str, float]], Adapter],
    own: dict,
    candidates: Sequence[tuple[float, dict[str, float]]],
    tick: Callable[[], Any] = lambda: None,
) -> BenchRow:
    """Merge at every candidate (weight, hyper-parameters), keep the best on validation, report it on test.

    `tick` is called after each candidate (a progress bar's update).
    """
    curve, best = {}, None
    for weight, params in candidates:
        merged, seconds, peak = measure(lambda w=weight, p=params: merge(w, p))
        score = _normalise(suite.evaluate(merged, split="val"), own["val"])
        label = _label(weight, params)
        curve[label] = sum(score.values()) / len(score)
        if best is None or curve[label] > curve[_label(best[0], best[1])]:
            best = (weight, params, merged, seconds, peak)
        tick()
    weight, params, merged, seconds, peak = best
    accuracy = suite.evaluate(merged)
    return BenchRow(
        name, kind, accuracy, _normalise(accuracy, own["test"]), weight, seconds, peak, val_curve=curve, params=params
    )


def _recovery_row(suite: Suite, name: str, own: dict) -> BenchRow:
    """Each task's adapter recovered from a reversible bundle with k = T/2 basis elements."""
    method = get_method(name)
    k = max(1, len(suite.tasks) // 2)
    basis_param = next((p for p in _BASIS_PARAMS if p in method.param_names), None)
    params = {basis_param: k} if basis_param else {}
    bundle, seconds, peak = measure(lambda: merge_adapters(suite.adapters(), method=name, **params))
    accuracy = {}
    for index, task in enumerate(suite.tasks):
        try:  # a bundle may index its tasks by adapter name or by position
            recovered = bundle.recover(task)
        except (KeyError, TypeError, ValueError, IndexError):
            recovered = bundle.recover(index)
        accuracy[task] = suite.evaluate(recovered, tasks=[task])[task]
    note = f"recovery of each task, k={k} ({basis_param}={k})" if basis_param else "recovery (method's default k)"
    return BenchRow(name, "recovery", accuracy, _normalise(accuracy, own["test"]), None, seconds, peak, note)


def _tuned(name: str, *, peft: bool = False) -> bool:
    """Whether a row chooses a density with its weight: our methods with a `density`, peft's sparsifying types."""
    if peft:
        return any(key in name for key in ("ties", "dare", "magnitude"))
    return "density" in get_method(name).param_names


def run_method(
    suite: Suite, name: str, own: dict, *, grid: Sequence[float] = GRID, tick: Callable[[], Any] = lambda: None
) -> BenchRow:
    """One registered method's row (a merge with weight and density chosen on validation, or a recovery row).

    `tick` is called after each merge tried on validation.
    """
    paths = [suite.adapter_paths[t] for t in suite.tasks]
    candidates = _candidates(grid, _tuned(name))
    if name in _TRUNCATING:
        total_rank = sum(adapter[next(iter(adapter))].rank for adapter in suite.adapters())
        candidates = [(w, {"rank": total_rank, **p}) for w, p in candidates]
    try:
        probe = merge_adapters(paths, [grid[0]] * len(paths), method=name)
        if isinstance(probe, Adapter):
            merge = lambda w, p: merge_adapters(paths, [w] * len(paths), name, **p)  # noqa: E731
            return _select(suite, name, "adaptermerge", merge, own, candidates, tick)
        if hasattr(probe, "recover"):
            return _recovery_row(suite, name, own)
        if hasattr(probe, "merge"):
            merge = lambda w, p: merge_adapters(paths, method=name, **p).merge([w] * len(paths))  # noqa: E731
            return _select(suite, name, "adaptermerge", merge, own, candidates, tick)
        return BenchRow(name, "adaptermerge", note=f"result {type(probe).__name__} has neither recover nor merge")
    except Exception as err:  # a broken method must not hide the others' rows
        logger.warning("method %s failed: %s", name, err)
        return BenchRow(name, "adaptermerge", note=f"failed: {type(err).__name__}: {err}"[:200])


def run_peft(
    suite: Suite,
    combination_type: str,
    own: dict,
    *,
    grid: Sequence[float] = GRID,
    tick: Callable[[], Any] = lambda: None,
) -> BenchRow:
    """peft's `add_weighted_adapter(combination_type=...)` on a PeftModel holding every task's LoRA.

    `tick` is called after each merge tried on validation.
    """
    import copy

    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(
        copy.deepcopy(suite.backbone), str(suite.adapter_paths[suite.tasks[0]]), adapter_name=suite.tasks[0]
    )
    for task in suite.tasks[1:]:
        model.load_adapter(str(suite.adapter_paths[task]), adapter_name=task)
    svd_rank = sum(model.peft_config[t].r for t in suite.tasks) if combination_type.endswith("svd") else None

    def merge(weight: float, params: dict[str, float]) -> Adapter:
        if "merged" in model.peft_config:
            model.delete_adapter("merged")
        model.add_weighted_adapter(
            suite.tasks, [weight] * len(suite.tasks), "merged", combination_type=combination_type,
            svd_rank=svd_rank, **params,
        )  # fmt: skip
        state = get_peft_model_state_dict(model, adapter_name="merged")
        config = model.peft_config["merged"].to_dict()
        return peft_format.from_state_dict({k: v.detach().clone() for k, v in state.items()}, config, "merged")

    try:
        row = _select(
            suite,
            f"peft:{combination_type}",
            "peft",
            merge,
            own,
            _candidates(grid, _tuned(combination_type, peft=True)),
            tick,
        )
        row.note = f"svd_rank={svd_rank}" if svd_rank else ""
        return row
    except Exception as err:
        logger.warning("peft %s failed: %s", combination_type, err)
        return BenchRow(f"peft:{combination_type}", "peft", note=f"failed: {type(err).__name__}: {err}"[:200])


def run_quality_bench(
    suite: Suite,
    *,
    methods: Sequence[str] | None = None,
    peft_types: Sequence[str] = PEFT_TYPES,
    grid: Sequence[float] = GRID,
    progressbar: bool = False,
) -> dict[str, Any]:
    """Every row of the quality table for `suite`, plus what the report needs.

    Args:
        suite (`Suite`): a built suite.
        methods (`list[str]`, *optional*): registered method names; every registered method by default.
        peft_types (`list[str]`): peft `combination_type`s to include as baselines (empty for none).
        grid (`list[float]`): the uniform weights tried on validation, the same for every method.
        progressbar (`bool`, defaults to `False`): show a progress bar over the merges tried, naming the row.

    Returns:
        `dict`: `suite`, `tasks`, `descriptions`, `grid`, `rows` (list of :class:`BenchRow`), `cross` (each adapter
        on every task).
    """
    methods = list(methods) if methods is not None else [m.name for m in list_methods()]
    total = sum(len(_candidates(grid, _tuned(n))) for n in methods)
    total += sum(len(_candidates(grid, _tuned(t, peft=True))) for t in peft_types)
    bar = tqdm(total=total, desc=f"merging {suite.config.name} LoRAs", unit="merge", disable=not progressbar)
    with bar:
        bar.set_postfix_str("references")
        base, individual, cross, own = reference_rows(suite)
        rows = [base, individual]
        for name in methods:
            bar.set_postfix_str(name)
            rows.append(run_method(suite, name, own, grid=grid, tick=bar.update))
        for combination_type in peft_types:
            bar.set_postfix_str(f"peft:{combination_type}")
            rows.append(run_peft(suite, combination_type, own, grid=grid, tick=bar.update))
        bar.update(bar.total - bar.n)  # recovery rows and failed rows try fewer merges than counted
    return {
        "suite": suite.config.name,
        "tasks": suite.tasks,
        "descriptions": suite.descriptions,
        "grid": list(grid),
        "densities": list(DENSITIES),
        "rows": rows,
        "cross": cross,
        "cache": str(suite.folder),
    }


def _fingerprint(suite: Suite, settings: dict[str, Any]) -> str:
    """A hash of the suite, the bench settings, the installed peft and every source file of adaptermerge."""
    import peft

    digest = hashlib.sha256(json.dumps({**settings, "suite": suite.config.key(), "peft": peft.__version__}).encode())
    for source in sorted(Path(__file__).parents[1].rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def cached_quality_bench(
    suite: Suite,
    *,
    methods: Sequence[str],
    peft_types: Sequence[str],
    grid: Sequence[float] = GRID,
    progressbar: bool = False,
) -> dict[str, Any]:
    """:func:`run_quality_bench`, its results kept in the suite's cache folder and reused while nothing changed.

    The results are reused only for the same suite, methods, peft types, grid, installed peft and adaptermerge source
    (every `.py` file of the package is hashed), so a changed method is always measured again.

    Returns:
        `dict`: as :func:`run_quality_bench`, plus `"reused": True` when the rows came from the cache.
    """
    settings = {"methods": list(methods), "peft_types": list(peft_types), "grid": list(grid)}
    path = suite.folder / f"bench-{_fingerprint(suite, settings)}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        return {**stored, "rows": [BenchRow.from_dict(r) for r in stored["rows"]], "reused": True}
    results = run_quality_bench(suite, methods=methods, peft_types=peft_types, grid=grid, progressbar=progressbar)
    path.write_text(json.dumps({**results, "rows": [r.to_dict() for r in results["rows"]]}))
    return results
